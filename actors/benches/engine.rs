//! Engine overhead: prism-actors against a hand-rolled tokio actor (a task
//! looping on an `mpsc::Receiver` of 64 with `oneshot` replies), scenario by
//! scenario, on a 2-worker multi-thread runtime.
//!
//! Each scenario runs `ROUNDS` times, prism and baseline interleaved (and the
//! order flipped every round so neither always runs on a warm cache); the
//! table shows the median round. `PRISM_BENCH_QUICK=1` divides the work by 10.
//!
//! Run with `cargo bench -p prism-actors --bench engine`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use prism_actors::{Actor, BoxError, ChildSpec, Context, Reply, Supervisor};
use tokio::sync::{mpsc, oneshot};

const ROUNDS: usize = 5;
const MAILBOX: usize = 64;
const GRACE: Duration = Duration::from_secs(60);

// ---- the two actors under test ------------------------------------------------

/// The prism actor: a running sum.
struct Summer {
    sum: u64,
}

enum SummerMsg {
    Add(u64),
    Get { reply: Reply<u64> },
}

impl Actor for Summer {
    type Msg = SummerMsg;

    async fn handle(&mut self, msg: SummerMsg, _ctx: &mut Context<Self>) -> Result<(), BoxError> {
        match msg {
            SummerMsg::Add(k) => self.sum += k,
            SummerMsg::Get { reply } => {
                let _ = reply.send(self.sum);
            }
        }
        Ok(())
    }
}

/// The baseline: the same actor written by hand.
enum RawMsg {
    Add(u64),
    Get { reply: oneshot::Sender<u64> },
}

fn spawn_raw() -> (mpsc::Sender<RawMsg>, tokio::task::JoinHandle<u64>) {
    let (tx, mut rx) = mpsc::channel::<RawMsg>(MAILBOX);
    let join = tokio::spawn(async move {
        let mut sum = 0u64;
        while let Some(msg) = rx.recv().await {
            match msg {
                RawMsg::Add(k) => sum += k,
                RawMsg::Get { reply } => {
                    let _ = reply.send(sum);
                }
            }
        }
        sum
    });
    (tx, join)
}

async fn raw_ask(tx: &mpsc::Sender<RawMsg>) -> u64 {
    let (reply, rx) = oneshot::channel();
    if tx.send(RawMsg::Get { reply }).await.is_err() {
        panic!("baseline actor gone");
    }
    rx.await.expect("baseline actor replied")
}

/// A supervised prism `Summer`, ready to take messages.
async fn spawn_prism() -> (prism_actors::Addr<Summer>, prism_actors::SupervisorHandle) {
    let spec = ChildSpec::with_mailbox("summer", MAILBOX, || Summer { sum: 0 });
    let addr = spec.addr();
    let root = Supervisor::new("bench").child(spec).spawn();
    prism_ask(&addr).await;
    (addr, root)
}

async fn prism_ask(addr: &prism_actors::Addr<Summer>) -> u64 {
    match addr.ask(|reply| SummerMsg::Get { reply }).await {
        Ok(n) => n,
        Err(e) => panic!("prism ask failed: {e}"),
    }
}

// ---- scenarios ----------------------------------------------------------------

/// Work sizes, divided in quick mode.
#[derive(Clone, Copy)]
struct Sizes {
    asks: u64,
    tells: u64,
    fan_tasks: u64,
    fan_asks: u64,
    actors: u64,
}

impl Sizes {
    fn new(div: u64) -> Self {
        Sizes {
            asks: 100_000 / div,
            tells: 500_000 / div,
            fan_tasks: 64,
            fan_asks: 2_000 / div,
            actors: 10_000 / div,
        }
    }
}

/// Times `body`: scenarios call it around the measured work only, after their
/// setup.
async fn timed<F, Fut>(body: F) -> Duration
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let t = Instant::now();
    body().await;
    t.elapsed()
}

async fn prism_ask_round_trip(n: u64) -> Duration {
    let (addr, root) = spawn_prism().await;
    let d = timed(|| async {
        for _ in 0..n {
            prism_ask(&addr).await;
        }
    })
    .await;
    root.shutdown(GRACE).await;
    d
}

async fn raw_ask_round_trip(n: u64) -> Duration {
    let (tx, join) = spawn_raw();
    raw_ask(&tx).await;
    let d = timed(|| async {
        for _ in 0..n {
            raw_ask(&tx).await;
        }
    })
    .await;
    drop(tx);
    let _ = join.await;
    d
}

async fn prism_tell_throughput(n: u64) -> Duration {
    let (addr, root) = spawn_prism().await;
    let d = timed(|| async {
        for i in 0..n {
            if addr.tell(SummerMsg::Add(i)).await.is_err() {
                panic!("prism tell failed");
            }
        }
        assert_eq!(prism_ask(&addr).await, n * (n - 1) / 2);
    })
    .await;
    root.shutdown(GRACE).await;
    d
}

async fn raw_tell_throughput(n: u64) -> Duration {
    let (tx, join) = spawn_raw();
    raw_ask(&tx).await;
    let d = timed(|| async {
        for i in 0..n {
            if tx.send(RawMsg::Add(i)).await.is_err() {
                panic!("baseline tell failed");
            }
        }
        assert_eq!(raw_ask(&tx).await, n * (n - 1) / 2);
    })
    .await;
    drop(tx);
    let _ = join.await;
    d
}

async fn prism_fan_in(tasks: u64, per_task: u64) -> Duration {
    let (addr, root) = spawn_prism().await;
    let d = timed(|| async {
        let callers: Vec<_> = (0..tasks)
            .map(|_| {
                let addr = addr.clone();
                tokio::spawn(async move {
                    for _ in 0..per_task {
                        prism_ask(&addr).await;
                    }
                })
            })
            .collect();
        for c in callers {
            c.await.expect("caller finished");
        }
    })
    .await;
    root.shutdown(GRACE).await;
    d
}

async fn raw_fan_in(tasks: u64, per_task: u64) -> Duration {
    let (tx, join) = spawn_raw();
    raw_ask(&tx).await;
    let d = timed(|| async {
        let callers: Vec<_> = (0..tasks)
            .map(|_| {
                let tx = tx.clone();
                tokio::spawn(async move {
                    for _ in 0..per_task {
                        raw_ask(&tx).await;
                    }
                })
            })
            .collect();
        for c in callers {
            c.await.expect("caller finished");
        }
    })
    .await;
    drop(tx);
    let _ = join.await;
    d
}

async fn prism_spawn_stop(n: u64) -> Duration {
    let name: Arc<str> = Arc::from("child");
    timed(|| async {
        let root = Supervisor::new("bench").spawn();
        let sup = root.supervisor_ref();
        for _ in 1..n {
            let spec = ChildSpec::with_mailbox(name.clone(), MAILBOX, || Summer { sum: 0 });
            sup.tell_add_child(spec).await.expect("child added");
        }
        // One acknowledged add: the supervisor's mailbox is FIFO, so every
        // earlier child has been started once this returns.
        let last = ChildSpec::with_mailbox(name.clone(), MAILBOX, || Summer { sum: 0 });
        sup.add_child(last).await.expect("last child added");
        let report = root.shutdown(GRACE).await;
        assert!(report.is_clean());
        assert_eq!(report.root.children.len() as u64, n);
    })
    .await
}

async fn raw_spawn_stop(n: u64) -> Duration {
    timed(|| async {
        let mut senders = Vec::with_capacity(n as usize);
        let mut joins = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let (tx, join) = spawn_raw();
            senders.push(tx);
            joins.push(join);
        }
        drop(senders);
        for j in joins {
            j.await.expect("baseline actor ended");
        }
    })
    .await
}

// ---- the table ----------------------------------------------------------------

struct Scenario {
    name: &'static str,
    ops: u64,
    target: f64,
    prism: Vec<Duration>,
    raw: Vec<Duration>,
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn fmt_rate(ops: u64, d: Duration) -> String {
    let per_sec = ops as f64 / d.as_secs_f64();
    if per_sec >= 1e6 {
        format!("{:.2} M/s", per_sec / 1e6)
    } else {
        format!("{:.0} k/s", per_sec / 1e3)
    }
}

fn fmt_ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn main() -> anyhow::Result<()> {
    let quick = std::env::var("PRISM_BENCH_QUICK").is_ok_and(|v| v == "1");
    let div = if quick { 10 } else { 1 };
    let sizes = Sizes::new(div);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .context("reading the machine's core count")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the benchmark runtime")?;

    let mut scenarios = vec![
        Scenario {
            name: "ask round trip (1 caller)",
            ops: sizes.asks,
            target: 1.15,
            prism: vec![],
            raw: vec![],
        },
        Scenario {
            name: "tell throughput (+1 ask)",
            ops: sizes.tells,
            target: 1.2,
            prism: vec![],
            raw: vec![],
        },
        Scenario {
            name: "fan-in asks (64 callers)",
            ops: sizes.fan_tasks * sizes.fan_asks,
            target: 1.2,
            prism: vec![],
            raw: vec![],
        },
        Scenario {
            name: "spawn + graceful stop",
            ops: sizes.actors,
            target: 1.5,
            prism: vec![],
            raw: vec![],
        },
    ];

    // Scenario bodies run as tasks on the workers, not on the bench thread.
    let run = |prism: bool, which: usize| -> anyhow::Result<Duration> {
        let s = sizes;
        let task = rt.spawn(async move {
            match (which, prism) {
                (0, true) => prism_ask_round_trip(s.asks).await,
                (0, false) => raw_ask_round_trip(s.asks).await,
                (1, true) => prism_tell_throughput(s.tells).await,
                (1, false) => raw_tell_throughput(s.tells).await,
                (2, true) => prism_fan_in(s.fan_tasks, s.fan_asks).await,
                (2, false) => raw_fan_in(s.fan_tasks, s.fan_asks).await,
                (_, true) => prism_spawn_stop(s.actors).await,
                (_, false) => raw_spawn_stop(s.actors).await,
            }
        });
        rt.block_on(task).context("running a scenario")
    };

    // For profiling one side of one scenario (instruction counts under
    // callgrind): `PRISM_BENCH_ONLY=3` runs only the fourth scenario,
    // `PRISM_BENCH_SIDE=prism` (or `tokio`) only one side of it; the
    // table then shows zero for what did not run.
    let only: Option<usize> = std::env::var("PRISM_BENCH_ONLY")
        .ok()
        .and_then(|v| v.parse().ok());
    let side = std::env::var("PRISM_BENCH_SIDE").unwrap_or_default();
    let (do_prism, do_raw) = (side != "tokio", side != "prism");
    let wanted = |which: usize| only.is_none_or(|o| o == which);

    // One untimed warm-up of everything, then the measured rounds.
    for which in (0..scenarios.len()).filter(|w| wanted(*w)) {
        if do_prism {
            run(true, which)?;
        }
        if do_raw {
            run(false, which)?;
        }
    }
    for round in 0..ROUNDS {
        for (which, sc) in scenarios.iter_mut().enumerate() {
            if !wanted(which) {
                continue;
            }
            for prism_side in [round % 2 == 0, round % 2 != 0] {
                if prism_side && do_prism {
                    sc.prism.push(run(true, which)?);
                } else if !prism_side && do_raw {
                    sc.raw.push(run(false, which)?);
                }
            }
        }
    }

    println!();
    println!(
        "prism-actors engine bench: {cores} cores (available_parallelism), tokio multi-thread runtime with 2 workers, {ROUNDS} rounds interleaved, median shown{}",
        if quick { ", QUICK mode (work / 10)" } else { "" }
    );
    println!("baseline: hand-rolled tokio actor (task looping on mpsc::Receiver({MAILBOX}), oneshot replies)");
    println!();
    println!(
        "{:<27} {:>8} {:>11} {:>11} {:>11} {:>11} {:>7} {:>7} {:>6}",
        "scenario", "ops", "prism", "prism rate", "tokio", "tokio rate", "ratio", "target", ""
    );
    println!("{}", "-".repeat(107));
    for sc in &scenarios {
        let (p, r) = (median(&sc.prism), median(&sc.raw));
        let ratio = p.as_secs_f64() / r.as_secs_f64();
        let target = format!("<={}", sc.target);
        println!(
            "{:<27} {:>8} {:>11} {:>11} {:>11} {:>11} {:>6.2}x {:>6}x {:>6}",
            sc.name,
            sc.ops,
            fmt_ms(p),
            fmt_rate(sc.ops, p),
            fmt_ms(r),
            fmt_rate(sc.ops, r),
            ratio,
            target,
            if ratio <= sc.target { "ok" } else { "MISS" },
        );
    }
    println!();
    println!("spread (min..max over rounds):");
    for sc in &scenarios {
        let span = |v: &[Duration]| {
            let min = v.iter().min().copied().unwrap_or_default();
            let max = v.iter().max().copied().unwrap_or_default();
            format!("{}..{}", fmt_ms(min), fmt_ms(max))
        };
        println!(
            "  {:<27} prism {:<24} tokio {}",
            sc.name,
            span(&sc.prism),
            span(&sc.raw)
        );
    }
    Ok(())
}
