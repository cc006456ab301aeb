//! Shared helpers for the behaviour tests: one configurable test actor
//! ([`Worker`]) that counts its incarnations and records its lifecycle, and
//! synchronisation helpers that never sleep.
#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prism_actors::{Actor, Addr, BoxError, Context, ExitReason, Reply, SendError};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Upper bound for any single wait in a test. Under paused time it is virtual
/// time, so a hang fails fast instead of stalling the suite.
pub const GUARD: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test if it takes longer than [`GUARD`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(GUARD, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Polls `cond` until it holds, yielding to other tasks in between. It never
/// sleeps, so under paused time it does not move the clock (no backoff
/// elapses while we poll); it gives up after [`GUARD`] of wall-clock time.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + GUARD;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition never held: {what}"
        );
        tokio::task::yield_now().await;
    }
}

/// How many times a factory built an actor.
#[derive(Clone, Default)]
pub struct Builds(Arc<AtomicU32>);

impl Builds {
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A lifecycle event recorded by a [`Worker`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: &'static str,
    pub name: &'static str,
    /// The worker's running total at the time of the event.
    pub total: u64,
}

/// Lifecycle events of several workers, in the order they happened.
#[derive(Clone, Default)]
pub struct Journal(Arc<Mutex<Vec<Event>>>);

impl Journal {
    fn push(&self, e: Event) {
        self.0.lock().unwrap().push(e);
    }

    pub fn events(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }

    /// Names of the workers that ran their stop hook, in order.
    pub fn stops(&self) -> Vec<&'static str> {
        self.events()
            .into_iter()
            .filter(|e| e.kind == "stop")
            .map(|e| e.name)
            .collect()
    }
}

/// How a [`Worker`] behaves, shared by all its incarnations.
#[derive(Clone, Default)]
pub struct Opts {
    pub builds: Builds,
    /// `started` fails for incarnations 1..=fail_starts.
    pub fail_starts: u32,
    pub journal: Journal,
    /// Receives the (tokio) instant each incarnation starts.
    pub starts: Option<mpsc::UnboundedSender<Instant>>,
}

impl Opts {
    /// A factory that builds a fresh worker named `name` and counts it.
    pub fn factory(&self, name: &'static str) -> impl Fn() -> Worker + Send + Sync + 'static {
        let opts = self.clone();
        move || {
            let incarnation = opts.builds.0.fetch_add(1, Ordering::SeqCst) + 1;
            Worker {
                name,
                incarnation,
                total: 0,
                seen: Vec::new(),
                opts: opts.clone(),
            }
        }
    }
}

/// The test actor. Its state (`total`, `seen`) is fresh in every incarnation.
pub struct Worker {
    pub name: &'static str,
    pub incarnation: u32,
    pub total: u64,
    pub seen: Vec<u64>,
    opts: Opts,
}

pub enum WorkerMsg {
    /// Adds to the running total.
    Add(u64),
    /// Records a value, to check ordering.
    Log(u64),
    /// Replies with the running total.
    Get { reply: Reply<u64> },
    /// Replies with the recorded values.
    Seen { reply: Reply<Vec<u64>> },
    /// Replies with the incarnation number.
    Incarnation { reply: Reply<u32> },
    /// Panics in the handler.
    Panic,
    /// Returns an error from the handler.
    Fail,
    /// Fails while holding an unanswered reply.
    FailHolding { reply: Reply<u64> },
    /// Ends the incarnation normally (`ctx.stop()`).
    Stop,
    /// Signals `entered`, then waits for `release` (or its drop).
    Block {
        entered: oneshot::Sender<()>,
        release: oneshot::Receiver<()>,
    },
    /// Sleeps (tokio time) in the handler.
    Sleep(Duration),
}

impl Actor for Worker {
    type Msg = WorkerMsg;

    async fn started(&mut self, _ctx: &mut Context<Self>) -> Result<(), BoxError> {
        if let Some(tx) = &self.opts.starts {
            let _ = tx.send(Instant::now());
        }
        self.opts.journal.push(Event {
            kind: "start",
            name: self.name,
            total: 0,
        });
        if self.incarnation <= self.opts.fail_starts {
            return Err("failing start".into());
        }
        Ok(())
    }

    async fn handle(&mut self, msg: WorkerMsg, ctx: &mut Context<Self>) -> Result<(), BoxError> {
        match msg {
            WorkerMsg::Add(k) => self.total += k,
            WorkerMsg::Log(v) => self.seen.push(v),
            WorkerMsg::Get { reply } => {
                let _ = reply.send(self.total);
            }
            WorkerMsg::Seen { reply } => {
                let _ = reply.send(self.seen.clone());
            }
            WorkerMsg::Incarnation { reply } => {
                let _ = reply.send(self.incarnation);
            }
            WorkerMsg::Panic => panic!("worker asked to panic"),
            WorkerMsg::Fail => return Err("worker asked to fail".into()),
            WorkerMsg::FailHolding { reply } => {
                let _held = reply;
                return Err("worker failed before replying".into());
            }
            WorkerMsg::Stop => ctx.stop(),
            WorkerMsg::Block { entered, release } => {
                let _ = entered.send(());
                let _ = release.await;
            }
            WorkerMsg::Sleep(d) => tokio::time::sleep(d).await,
        }
        Ok(())
    }

    async fn stopped(
        &mut self,
        _reason: &ExitReason,
        _ctx: &mut Context<Self>,
    ) -> Result<(), BoxError> {
        self.opts.journal.push(Event {
            kind: "stop",
            name: self.name,
            total: self.total,
        });
        Ok(())
    }
}

/// Makes the worker block inside a handler and returns once it is there.
/// Sending on (or dropping) the returned sender lets it go on.
pub async fn block(addr: &Addr<Worker>) -> oneshot::Sender<()> {
    let (entered_tx, entered_rx) = oneshot::channel();
    let (release_tx, release_rx) = oneshot::channel();
    if addr
        .tell(WorkerMsg::Block {
            entered: entered_tx,
            release: release_rx,
        })
        .await
        .is_err()
    {
        panic!("block message not delivered");
    }
    within("the worker to block", entered_rx)
        .await
        .expect("worker entered the blocking handler");
    release_tx
}

/// The running total of a worker, via `ask`.
pub async fn total(addr: &Addr<Worker>) -> u64 {
    match within("a total", addr.ask(|reply| WorkerMsg::Get { reply })).await {
        Ok(n) => n,
        Err(e) => panic!("ask failed: {e:?}"),
    }
}

/// The incarnation number of a worker, via `ask`.
pub async fn incarnation(addr: &Addr<Worker>) -> u32 {
    match within(
        "an incarnation",
        addr.ask(|reply| WorkerMsg::Incarnation { reply }),
    )
    .await
    {
        Ok(n) => n,
        Err(e) => panic!("ask failed: {e:?}"),
    }
}

/// Sends `Add(1)` probes with `try_tell` until the worker rejects one with
/// [`SendError::Stopping`]. Returns how many probes were accepted before (the
/// drain handles them too) and the rejected message.
pub async fn probe_until_stopping(addr: &Addr<Worker>) -> (u64, WorkerMsg) {
    let mut accepted = 0;
    let rejected = within("the drain to begin", async {
        loop {
            match addr.try_tell(WorkerMsg::Add(1)) {
                Ok(()) => accepted += 1,
                Err(SendError::Stopping(msg)) => break msg,
                Err(e) => panic!("unexpected send error while probing: {e:?}"),
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    (accepted, rejected)
}
