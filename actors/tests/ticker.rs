//! `Context::send_interval`: a ticker that lives as long as the incarnation.
//! Time is paused, so every period below is virtual and exact.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, within};
use prism_actors::prelude::*;
use prism_actors::Ticker;
use tokio::sync::oneshot;
use tokio::time::sleep;

const PERIOD: Duration = Duration::from_millis(100);
const GRACE: Duration = Duration::from_secs(5);

/// Counts the ticks its incarnations receive; each incarnation starts a
/// ticker in `started` and hands it to the test.
struct Ticking {
    ticks: Arc<AtomicU32>,
    tickers: Arc<Mutex<Vec<Ticker>>>,
}

enum TickingMsg {
    Tick,
    /// Holds the actor busy until the sender fires or is dropped.
    Block(oneshot::Receiver<()>),
    Crash,
    Count {
        reply: Reply<u32>,
    },
}

impl Actor for Ticking {
    type Msg = TickingMsg;

    async fn started(&mut self, ctx: &mut Context<Self>) -> Result<(), BoxError> {
        let ticker = ctx.send_interval(PERIOD, || TickingMsg::Tick);
        self.tickers.lock().unwrap().push(ticker);
        Ok(())
    }

    async fn handle(&mut self, msg: TickingMsg, _ctx: &mut Context<Self>) -> Result<(), BoxError> {
        match msg {
            TickingMsg::Tick => {
                self.ticks.fetch_add(1, Ordering::SeqCst);
            }
            TickingMsg::Block(release) => {
                let _ = release.await;
            }
            TickingMsg::Crash => return Err("asked to crash".into()),
            TickingMsg::Count { reply } => {
                let _ = reply.send(self.ticks.load(Ordering::SeqCst));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Default)]
struct Probe {
    ticks: Arc<AtomicU32>,
    tickers: Arc<Mutex<Vec<Ticker>>>,
}

impl Probe {
    fn spec(&self, capacity: usize) -> ChildSpec<Ticking> {
        let probe = self.clone();
        ChildSpec::with_mailbox("ticking", capacity, move || Ticking {
            ticks: probe.ticks.clone(),
            tickers: probe.tickers.clone(),
        })
    }

    fn tickers(&self) -> Vec<Ticker> {
        self.tickers.lock().unwrap().clone()
    }
}

async fn count(addr: &Addr<Ticking>) -> u32 {
    within("tick count", addr.ask(|reply| TickingMsg::Count { reply }))
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn ticks_arrive_once_per_period_starting_after_one_period() {
    let probe = Probe::default();
    let spec = probe.spec(8);
    let addr = spec.addr();
    let root = Supervisor::new("root").child(spec).spawn();

    assert_eq!(count(&addr).await, 0, "no tick before the first period");
    sleep(PERIOD * 3 + PERIOD / 2).await;
    assert_eq!(count(&addr).await, 3);

    assert!(root.shutdown(GRACE).await.is_clean());
}

#[tokio::test(start_paused = true)]
async fn a_full_mailbox_skips_ticks_instead_of_queueing_them() {
    let probe = Probe::default();
    let spec = probe.spec(1);
    let addr = spec.addr();
    let root = Supervisor::new("root").child(spec).spawn();

    let (release, blocked) = oneshot::channel();
    addr.tell(TickingMsg::Block(blocked)).await.unwrap();
    // Ten periods pass while the actor is busy; its one free slot takes one tick.
    sleep(PERIOD * 10 + PERIOD / 2).await;
    release.send(()).unwrap();
    assert_eq!(count(&addr).await, 1);

    // The ticker kept running: the next periods tick again.
    sleep(PERIOD * 3).await;
    assert_eq!(count(&addr).await, 4);

    assert!(root.shutdown(GRACE).await.is_clean());
}

#[tokio::test(start_paused = true)]
async fn a_restart_does_not_leave_the_old_ticker_running() {
    let probe = Probe::default();
    let spec = probe.spec(8);
    let addr = spec.addr();
    let root = Supervisor::new("root")
        .backoff(Backoff::NONE)
        .child(spec)
        .spawn();

    sleep(PERIOD * 2 + PERIOD / 2).await;
    assert_eq!(count(&addr).await, 2);
    addr.tell(TickingMsg::Crash).await.unwrap();
    eventually("the restarted incarnation started its ticker", || {
        probe.tickers().len() == 2
    })
    .await;
    let first = probe.tickers()[0].clone();
    eventually("the first incarnation's ticker ended", || {
        first.is_finished()
    })
    .await;

    // Only the new incarnation's ticker runs: one tick per period, not two.
    sleep(PERIOD * 10 + PERIOD / 5).await;
    assert_eq!(count(&addr).await, 12);

    assert!(root.shutdown(GRACE).await.is_clean());
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_ticker_sends_nothing_more() {
    let probe = Probe::default();
    let spec = probe.spec(8);
    let addr = spec.addr();
    let root = Supervisor::new("root").child(spec).spawn();

    sleep(PERIOD + PERIOD / 2).await;
    assert_eq!(count(&addr).await, 1);
    let ticker = probe.tickers()[0].clone();
    ticker.cancel();
    eventually("the ticker ended", || ticker.is_finished()).await;
    sleep(PERIOD * 5).await;
    assert_eq!(count(&addr).await, 1);

    assert!(root.shutdown(GRACE).await.is_clean());
}

#[tokio::test(start_paused = true)]
async fn the_ticker_ends_when_the_actor_stops() {
    let probe = Probe::default();
    let handle = prism_actors::spawn(
        "ticking",
        8,
        Ticking {
            ticks: probe.ticks.clone(),
            tickers: probe.tickers.clone(),
        },
    );
    let addr = handle.addr();
    assert_eq!(count(&addr).await, 0);
    let ticker = probe.tickers()[0].clone();
    assert!(!ticker.is_finished());

    handle.stop();
    assert_eq!(within("stop", handle.join()).await, ExitReason::Shutdown);
    eventually("the ticker ended", || ticker.is_finished()).await;
}
