//! Shutdown: draining, rejection of new messages, stop order, grace period,
//! and no restarts once it has begun.

mod common;

use std::time::Duration;

use common::{block, eventually, probe_until_stopping, within, Journal, Opts, WorkerMsg};
use prism_actors::{
    ActorState, AskError, Backoff, ChildSpec, ExitReason, SendError, StopOutcome, Supervisor,
    SupervisorError,
};

const GRACE: Duration = Duration::from_secs(5);

fn no_jitter(initial_ms: u64) -> Backoff {
    Backoff {
        initial: Duration::from_millis(initial_ms),
        max: Duration::from_millis(initial_ms),
        jitter: 0.0,
    }
}

#[tokio::test]
async fn shutdown_drains_queued_messages_and_reports_them() {
    const N: u64 = 100;
    let opts = Opts::default();
    let spec = ChildSpec::with_mailbox("worker", 1024, opts.factory("worker"));
    let addr = spec.addr();
    let root = Supervisor::new("root").child(spec).spawn();

    let release = block(&addr).await;
    for _ in 0..N {
        addr.try_tell(WorkerMsg::Add(1)).unwrap();
    }
    let shutdown = tokio::spawn(root.shutdown(GRACE));
    // Probes accepted before the drain began are queued like the others.
    let (accepted, _) = probe_until_stopping(&addr).await;
    release.send(()).unwrap();
    let report = within("the shutdown", shutdown).await.unwrap();

    let worker = report.find("worker").unwrap();
    assert_eq!(worker.outcome, StopOutcome::Drained);
    assert_eq!(worker.handled, N + accepted);
    assert!(report.is_clean());
    let stop = opts.journal.events().into_iter().last().unwrap();
    assert_eq!((stop.kind, stop.total), ("stop", N + accepted));
    assert_eq!(addr.state(), ActorState::Stopped);
}

#[tokio::test]
async fn messages_sent_during_shutdown_are_rejected_with_stopping_and_given_back() {
    let opts = Opts::default();
    let spec = ChildSpec::new("worker", opts.factory("worker"));
    let addr = spec.addr();
    let root = Supervisor::new("root").child(spec).spawn();

    let release = block(&addr).await;
    let shutdown = tokio::spawn(root.shutdown(GRACE));
    let (_, rejected) = probe_until_stopping(&addr).await;
    assert!(matches!(rejected, WorkerMsg::Add(1)));

    match addr.tell(WorkerMsg::Add(7)).await {
        Err(SendError::Stopping(WorkerMsg::Add(7))) => {}
        other => panic!("expected Stopping(Add(7)), got {other:?}"),
    }
    match addr.ask(|reply| WorkerMsg::Get { reply }).await {
        Err(AskError::Send(SendError::Stopping(WorkerMsg::Get { .. }))) => {}
        other => panic!("expected Send(Stopping(Get)), got {other:?}"),
    }
    release.send(()).unwrap();
    assert!(within("the shutdown", shutdown).await.unwrap().is_clean());
}

#[tokio::test]
async fn children_stop_in_reverse_start_order() {
    let journal = Journal::default();
    let mut root = Supervisor::new("root");
    for name in ["a", "b", "c", "d"] {
        let opts = Opts {
            journal: journal.clone(),
            ..Opts::default()
        };
        root = root.child(ChildSpec::new(name, opts.factory(name)));
    }
    let root = root.spawn();
    eventually("all started", || {
        journal
            .events()
            .iter()
            .filter(|e| e.kind == "start")
            .count()
            == 4
    })
    .await;

    let report = root.shutdown(GRACE).await;
    assert_eq!(journal.stops(), ["d", "c", "b", "a"]);
    let reported: Vec<&str> = report.root.children.iter().map(|r| &*r.name).collect();
    assert_eq!(reported, ["d", "c", "b", "a"]);
}

#[tokio::test]
async fn nested_supervisors_stop_their_children_in_reverse_order_too() {
    let journal = Journal::default();
    let mk = |name| {
        let opts = Opts {
            journal: journal.clone(),
            ..Opts::default()
        };
        ChildSpec::new(name, opts.factory(name))
    };
    let inner = Supervisor::new("inner").child(mk("i1")).child(mk("i2"));
    let root = Supervisor::new("root")
        .child(mk("a"))
        .child(inner)
        .child(mk("z"))
        .spawn();
    eventually("all started", || {
        journal
            .events()
            .iter()
            .filter(|e| e.kind == "start")
            .count()
            == 4
    })
    .await;

    assert!(root.shutdown(GRACE).await.is_clean());
    assert_eq!(journal.stops(), ["z", "i2", "i1", "a"]);
}

#[tokio::test]
async fn dynamic_children_stop_before_static_children() {
    let journal = Journal::default();
    let mk = |name| {
        let opts = Opts {
            journal: journal.clone(),
            ..Opts::default()
        };
        ChildSpec::new(name, opts.factory(name))
    };
    let root = Supervisor::new("root")
        .child(mk("s1"))
        .child(mk("s2"))
        .spawn();
    let sup = root.supervisor_ref();
    sup.add_child(mk("d1")).await.unwrap();
    sup.add_child(mk("d2")).await.unwrap();
    eventually("all started", || {
        journal
            .events()
            .iter()
            .filter(|e| e.kind == "start")
            .count()
            == 4
    })
    .await;

    assert!(root.shutdown(GRACE).await.is_clean());
    let stops = journal.stops();
    let mut dynamic = stops[..2].to_vec();
    dynamic.sort();
    assert_eq!(dynamic, ["d1", "d2"]);
    assert_eq!(stops[2..], ["s2", "s1"]);
}

#[tokio::test(start_paused = true)]
async fn grace_period_expiry_aborts_and_reports_the_stuck_actor() {
    let calm = Opts::default();
    let stuck = Opts::default();
    let calm_spec = ChildSpec::new("calm", calm.factory("calm"));
    let stuck_spec = ChildSpec::new("stuck", stuck.factory("stuck"));
    let (calm_addr, stuck_addr) = (calm_spec.addr(), stuck_spec.addr());
    // Stopped in reverse order: "calm" drains first, then "stuck" uses up the
    // rest of the grace period.
    let root = Supervisor::new("root")
        .child(stuck_spec)
        .child(calm_spec)
        .spawn();

    // Held, never sent: the handler never finishes.
    let _never = block(&stuck_addr).await;
    let asks: Vec<_> = (0..3)
        .map(|_| {
            let addr = stuck_addr.clone();
            tokio::spawn(async move { addr.ask(|reply| WorkerMsg::Get { reply }).await })
        })
        .collect();
    eventually("asks queued", || stuck_addr.mailbox_depth() == 3).await;
    calm_addr.tell(WorkerMsg::Add(1)).await.unwrap();

    let grace = Duration::from_millis(200);
    let report = within("the shutdown", root.shutdown(grace)).await;

    let aborted: Vec<&str> = report.aborted().iter().map(|r| &*r.name).collect();
    assert_eq!(aborted, ["stuck"]);
    assert!(!report.is_clean());
    assert!(report.elapsed >= grace);
    // Everything else still drained in the time left.
    assert_eq!(report.find("calm").unwrap().outcome, StopOutcome::Drained);
    assert_eq!(report.find("root").unwrap().outcome, StopOutcome::Drained);
    for ask in asks {
        let res = within("a queued ask", ask).await.unwrap();
        assert!(matches!(res, Err(AskError::NoReply)), "got {res:?}");
    }
    // An aborted actor runs no stop hook.
    assert!(stuck.journal.stops().is_empty());
    assert_eq!(calm.journal.stops(), ["calm"]);
}

#[tokio::test(start_paused = true)]
async fn grace_period_expiry_names_a_stuck_actor_of_a_nested_supervisor() {
    let stuck = Opts::default();
    let stuck_spec = ChildSpec::new("stuck", stuck.factory("stuck"));
    let stuck_addr = stuck_spec.addr();
    let root = Supervisor::new("root")
        .child(Supervisor::new("inner").child(stuck_spec))
        .spawn();
    let _never = block(&stuck_addr).await;

    let report = within("the shutdown", root.shutdown(Duration::from_millis(200))).await;

    let aborted: Vec<&str> = report.aborted().iter().map(|r| &*r.name).collect();
    assert!(aborted.contains(&"stuck"), "aborted: {aborted:?}");
}

#[tokio::test]
async fn a_child_failing_during_shutdown_is_not_restarted() {
    let opts = Opts::default();
    let spec = ChildSpec::new("worker", opts.factory("worker"));
    let addr = spec.addr();
    let root = Supervisor::new("root")
        .backoff(Backoff::NONE)
        .child(spec)
        .spawn();

    let release = block(&addr).await;
    addr.tell(WorkerMsg::Fail).await.unwrap();
    let shutdown = tokio::spawn(root.shutdown(GRACE));
    probe_until_stopping(&addr).await;
    release.send(()).unwrap();
    let report = within("the shutdown", shutdown).await.unwrap();

    let worker = report.find("worker").unwrap();
    assert!(
        matches!(&worker.outcome, StopOutcome::Failed(ExitReason::Error(_))),
        "got {:?}",
        worker.outcome
    );
    assert_eq!(opts.builds.get(), 1);
    assert_eq!(addr.state(), ActorState::Stopped);
}

#[tokio::test]
async fn a_handler_panicking_mid_drain_fails_the_child_counts_it_and_fails_later_asks() {
    let opts = Opts::default();
    let spec = ChildSpec::with_mailbox("worker", 16, opts.factory("worker"));
    let addr = spec.addr();
    let root = Supervisor::new("root")
        .backoff(Backoff::NONE)
        .child(spec)
        .spawn();

    // Queued behind the blocking handler: two adds, a panic, then an ask
    // that the panic leaves unanswered.
    let release = block(&addr).await;
    addr.try_tell(WorkerMsg::Add(1)).unwrap();
    addr.try_tell(WorkerMsg::Add(1)).unwrap();
    addr.try_tell(WorkerMsg::Panic).unwrap();
    let (reply, late) = tokio::sync::oneshot::channel();
    addr.try_tell(WorkerMsg::Get { reply }).unwrap();
    let shutdown = tokio::spawn(root.shutdown(GRACE));
    let (accepted, _) = probe_until_stopping(&addr).await;
    release.send(()).unwrap();
    let report = within("the shutdown", shutdown).await.unwrap();

    let worker = report.find("worker").unwrap();
    assert_eq!(
        worker.outcome,
        StopOutcome::Failed(ExitReason::Panic("worker asked to panic".into()))
    );
    // Handled after the drain began: the two adds and the panicking message;
    // the drain began while the blocking handler ran, so it is not counted.
    assert_eq!(worker.handled, 3, "probes accepted: {accepted}");
    assert!(within("the late ask", late).await.is_err());
    // The stop hook ran on the same incarnation, with the state it had.
    let stop = opts.journal.events().into_iter().last().unwrap();
    assert_eq!((stop.kind, stop.total), ("stop", 2));
    assert_eq!(opts.builds.get(), 1);
    assert_eq!(addr.state(), ActorState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_added_in_a_burst_during_shutdown_are_supervised_or_refused_never_left_open() {
    // The supervisor takes requests from its mailbox in batches; a shutdown
    // that begins in the middle of a batch must refuse the rest of it. Where
    // the shutdown lands is up to the scheduler, so the race runs a few times.
    for _ in 0..10 {
        burst_of_adds_raced_by_a_shutdown(500).await;
    }
}

async fn burst_of_adds_raced_by_a_shutdown(n: usize) {
    let root = Supervisor::new("root").spawn();
    let sup = root.supervisor_ref();
    let opts = Opts::default();
    let specs: Vec<_> = (0..n)
        .map(|_| ChildSpec::with_mailbox("burst", 4, opts.factory("burst")))
        .collect();
    let addrs: Vec<_> = specs.iter().map(|s| s.addr()).collect();
    let adder = {
        let sup = sup.clone();
        tokio::spawn(async move {
            let mut refused = 0;
            for spec in specs {
                if sup.tell_add_child(spec).await.is_err() {
                    refused += 1;
                }
            }
            refused
        })
    };
    // Shut down once the supervisor is busy adding.
    eventually("the first child to be added", || {
        sup.snapshot().is_some_and(|s| !s.children.is_empty())
    })
    .await;
    let report = within("the shutdown", root.shutdown(GRACE)).await;
    let refused = within("the adder", adder).await.unwrap();

    let reported = report.root.children.len();
    assert!(
        reported + refused <= n,
        "{reported} reported, {refused} refused"
    );
    assert!(report.is_clean(), "{report:?}");
    for addr in &addrs {
        match addr.try_tell(WorkerMsg::Add(1)) {
            Err(SendError::Closed(_) | SendError::Stopping(_)) => {}
            Ok(()) => panic!("child {} left with an open mailbox", addr.id()),
            Err(e) => panic!("child {}: unexpected {e:?}", addr.id()),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_child_waiting_for_its_restart_is_not_restarted_by_shutdown() {
    let opts = Opts::default();
    let spec = ChildSpec::new("worker", opts.factory("worker"));
    let addr = spec.addr();
    let root = Supervisor::new("root")
        .backoff(no_jitter(1000))
        .child(spec)
        .spawn();

    addr.tell(WorkerMsg::Fail).await.unwrap();
    eventually("worker in backoff", || {
        addr.state() == ActorState::Restarting
    })
    .await;
    let queued = {
        let addr = addr.clone();
        tokio::spawn(async move { addr.ask(|reply| WorkerMsg::Get { reply }).await })
    };
    eventually("ask queued", || addr.mailbox_depth() == 1).await;

    let report = within("the shutdown", root.shutdown(GRACE)).await;
    assert_eq!(
        report.find("worker").unwrap().outcome,
        StopOutcome::NotRunning
    );
    assert_eq!(opts.builds.get(), 1);
    let res = within("the queued ask", queued).await.unwrap();
    assert!(matches!(res, Err(AskError::NoReply)), "got {res:?}");
}

#[tokio::test(start_paused = true)]
async fn a_nested_child_waiting_for_its_restart_is_not_restarted_during_shutdown() {
    let worker = Opts::default();
    let slow = Opts::default();
    let worker_spec = ChildSpec::new("worker", worker.factory("worker"));
    let slow_spec = ChildSpec::new("slow", slow.factory("slow"));
    let (worker_addr, slow_addr) = (worker_spec.addr(), slow_spec.addr());
    // Stopped in reverse order: "slow" first, then "inner" with its worker.
    let root = Supervisor::new("root")
        .child(
            Supervisor::new("inner")
                .backoff(no_jitter(100))
                .child(worker_spec),
        )
        .child(slow_spec)
        .spawn();

    worker_addr.tell(WorkerMsg::Fail).await.unwrap();
    eventually("worker in backoff", || {
        worker_addr.state() == ActorState::Restarting
    })
    .await;
    // "slow" takes 500 ms to drain, well past the worker's 100 ms backoff.
    slow_addr
        .tell(WorkerMsg::Sleep(Duration::from_millis(500)))
        .await
        .unwrap();

    let report = within("the shutdown", root.shutdown(GRACE)).await;
    assert_eq!(
        worker.builds.get(),
        1,
        "the worker was restarted after the shutdown began"
    );
    assert_eq!(
        report.find("worker").unwrap().outcome,
        StopOutcome::NotRunning
    );
}

/// Starts a shutdown while "worker" blocks in a handler; returns once the drain
/// has begun, with the release of the worker and the running shutdown.
async fn shutdown_in_progress() -> (
    prism_actors::SupervisorRef,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<prism_actors::ShutdownReport>,
) {
    let opts = Opts::default();
    let spec = ChildSpec::new("worker", opts.factory("worker"));
    let addr = spec.addr();
    let root = Supervisor::new("root").child(spec).spawn();
    let sup = root.supervisor_ref();
    let release = block(&addr).await;
    let shutdown = tokio::spawn(root.shutdown(GRACE));
    probe_until_stopping(&addr).await;
    (sup, release, shutdown)
}

#[tokio::test]
async fn add_child_during_shutdown_is_refused() {
    let (sup, release, shutdown) = shutdown_in_progress().await;
    assert!(sup.is_shutting_down());

    let late = Opts::default();
    let res = sup
        .add_child(ChildSpec::new("late", late.factory("late")))
        .await;
    assert_eq!(res, Err(SupervisorError::ShuttingDown));
    release.send(()).unwrap();
    within("the shutdown", shutdown).await.unwrap();
    assert_eq!(late.builds.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_child_refused_during_shutdown_rejects_messages() {
    let (sup, release, shutdown) = shutdown_in_progress().await;

    let late = Opts::default();
    let late_spec = ChildSpec::new("late", late.factory("late"));
    let late_addr = late_spec.addr();
    assert!(sup.add_child(late_spec).await.is_err());
    // The child will never run: its address must not swallow asks.
    let res = within(
        "an ask to the refused child",
        late_addr.ask(|reply| WorkerMsg::Get { reply }),
    )
    .await;
    assert!(res.is_err(), "a child that never ran answered");
    release.send(()).unwrap();
    within("the shutdown", shutdown).await.unwrap();
}
