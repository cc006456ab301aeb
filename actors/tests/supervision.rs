//! Supervision: restarts with fresh state, queued messages across restarts,
//! strategies, restart policies, intensity and escalation, backoff.

mod common;

use std::time::Duration;

use common::{block, eventually, incarnation, total, within, Opts, WorkerMsg};
use prism_actors::{
    ActorState, AskError, Backoff, ChildSpec, ExitReason, RestartPolicy, SendError,
    SupervisionStrategy, Supervisor,
};
use tokio::time::Instant;

const GRACE: Duration = Duration::from_secs(5);

fn no_jitter(initial_ms: u64, max_ms: u64) -> Backoff {
    Backoff {
        initial: Duration::from_millis(initial_ms),
        max: Duration::from_millis(max_ms),
        jitter: 0.0,
    }
}

// ---- restarts with fresh state ------------------------------------------------

async fn assert_failure_restarts_with_fresh_state(crash: WorkerMsg) {
    let opts = Opts::default();
    let spec = ChildSpec::new("worker", opts.factory("worker"));
    let addr = spec.addr();
    let root = Supervisor::new("root")
        .backoff(Backoff::NONE)
        .child(spec)
        .spawn();

    addr.tell(WorkerMsg::Add(5)).await.unwrap();
    assert_eq!(total(&addr).await, 5);
    addr.tell(crash).await.unwrap();

    // The next ask is handled by a fresh incarnation: its total starts at 0.
    assert_eq!(total(&addr).await, 0);
    assert_eq!(opts.builds.get(), 2);
    assert!(root.shutdown(GRACE).await.is_clean());
}

#[tokio::test]
async fn handler_panic_restarts_the_child_with_fresh_state() {
    assert_failure_restarts_with_fresh_state(WorkerMsg::Panic).await;
}

#[tokio::test]
async fn handler_error_restarts_the_child_with_fresh_state() {
    assert_failure_restarts_with_fresh_state(WorkerMsg::Fail).await;
}

// ---- messages survive restarts ------------------------------------------------

#[tokio::test(start_paused = true)]
async fn messages_queued_during_restart_backoff_are_handled_by_the_next_incarnation() {
    const N: u64 = 50;
    let backoff = Duration::from_secs(2);
    let opts = Opts::default();
    let spec = ChildSpec::with_mailbox("worker", 128, opts.factory("worker"));
    let addr = spec.addr();
    let root = Supervisor::new("root")
        .backoff(no_jitter(2000, 2000))
        .child(spec)
        .spawn();
    assert_eq!(incarnation(&addr).await, 1);

    addr.tell(WorkerMsg::Fail).await.unwrap();
    // The clock is paused and nothing here sleeps, so the backoff cannot elapse
    // while we wait for the restart to be scheduled and queue messages.
    eventually("worker waiting for its restart", || {
        addr.state() == ActorState::Restarting
    })
    .await;
    let failed_at = Instant::now();
    for _ in 0..N {
        addr.try_tell(WorkerMsg::Add(1)).unwrap();
    }
    assert_eq!(opts.builds.get(), 1, "restarted before the backoff elapsed");

    assert_eq!(total(&addr).await, N);
    assert_eq!(opts.builds.get(), 2);
    assert!(failed_at.elapsed() >= backoff);
    assert!(root.shutdown(GRACE).await.is_clean());
}

#[tokio::test(start_paused = true)]
async fn messages_queued_before_a_crash_in_started_are_handled_by_the_next_incarnation() {
    const N: u64 = 50;
    let opts = Opts {
        fail_starts: 1,
        ..Opts::default()
    };
    let spec = ChildSpec::with_mailbox("worker", 128, opts.factory("worker"));
    let addr = spec.addr();
    // The address works before the tree exists: queue everything up front, so
    // it all waits through the failed first start and its backoff.
    for _ in 0..N {
        addr.try_tell(WorkerMsg::Add(1)).unwrap();
    }
    let root = Supervisor::new("root")
        .backoff(no_jitter(500, 500))
        .child(spec)
        .spawn();

    assert_eq!(total(&addr).await, N);
    assert_eq!(opts.builds.get(), 2);
    assert!(root.shutdown(GRACE).await.is_clean());
}

#[tokio::test]
async fn in_flight_ask_at_a_crash_gets_no_reply() {
    let opts = Opts::default();
    let spec = ChildSpec::new("worker", opts.factory("worker"));
    let addr = spec.addr();
    let root = Supervisor::new("root")
        .backoff(Backoff::NONE)
        .child(spec)
        .spawn();

    let res = within(
        "the in-flight ask",
        addr.ask(|reply| WorkerMsg::FailHolding { reply }),
    )
    .await;
    assert!(matches!(res, Err(AskError::NoReply)), "got {res:?}");
    // The next incarnation answers.
    assert_eq!(incarnation(&addr).await, 2);
    assert!(root.shutdown(GRACE).await.is_clean());
}

#[tokio::test]
async fn in_flight_ask_at_a_panic_gets_no_reply_while_queued_asks_are_answered() {
    let opts = Opts::default();
    let spec = ChildSpec::new("worker", opts.factory("worker"));
    let addr = spec.addr();
    let root = Supervisor::new("root")
        .backoff(Backoff::NONE)
        .child(spec)
        .spawn();

    let release = block(&addr).await;
    addr.tell(WorkerMsg::Panic).await.unwrap();
    let queued = {
        let addr = addr.clone();
        tokio::spawn(async move { addr.ask(|reply| WorkerMsg::Incarnation { reply }).await })
    };
    eventually("ask queued", || addr.mailbox_depth() == 2).await;
    release.send(()).unwrap();

    let res = within("the queued ask", queued).await.unwrap();
    assert!(matches!(res, Ok(2)), "got {res:?}");
    assert!(root.shutdown(GRACE).await.is_clean());
}

// ---- strategies ---------------------------------------------------------------

/// Three workers a, b, c under `strategy`; b fails once. Returns how many times
/// each was built once everything runs again.
async fn builds_after_middle_child_fails(strategy: SupervisionStrategy) -> [u32; 3] {
    let (a, b, c) = (Opts::default(), Opts::default(), Opts::default());
    let sa = ChildSpec::new("a", a.factory("a"));
    let sb = ChildSpec::new("b", b.factory("b"));
    let sc = ChildSpec::new("c", c.factory("c"));
    let (aa, ab, ac) = (sa.addr(), sb.addr(), sc.addr());
    let root = Supervisor::new("root")
        .strategy(strategy)
        .backoff(Backoff::NONE)
        .child(sa)
        .child(sb)
        .child(sc)
        .spawn();
    for addr in [&aa, &ab, &ac] {
        assert_eq!(incarnation(addr).await, 1);
    }

    ab.tell(WorkerMsg::Fail).await.unwrap();
    // b restarts last among the group members before it, so once b runs again
    // every earlier restart has happened; c's restart (if any) comes right after.
    assert_eq!(incarnation(&ab).await, 2);
    let expect_c = if strategy == SupervisionStrategy::OneForOne {
        1
    } else {
        2
    };
    eventually("c settled", || c.builds.get() == expect_c).await;
    // Every child answers (none is left stopped) ...
    for addr in [&aa, &ab, &ac] {
        incarnation(addr).await;
    }
    let builds = [a.builds.get(), b.builds.get(), c.builds.get()];
    // ... and the snapshot agrees with the factories.
    let snap = root.snapshot().unwrap();
    for (name, n) in ["a", "b", "c"].iter().zip(builds) {
        assert_eq!(
            snap.find(name).unwrap().restarts,
            n - 1,
            "restarts of {name}"
        );
    }
    assert!(root.shutdown(GRACE).await.is_clean());
    builds
}

#[tokio::test]
async fn one_for_one_restarts_only_the_failed_child() {
    assert_eq!(
        builds_after_middle_child_fails(SupervisionStrategy::OneForOne).await,
        [1, 2, 1]
    );
}

#[tokio::test]
async fn one_for_all_restarts_every_child() {
    assert_eq!(
        builds_after_middle_child_fails(SupervisionStrategy::OneForAll).await,
        [2, 2, 2]
    );
}

#[tokio::test]
async fn rest_for_one_restarts_the_failed_child_and_later_siblings() {
    assert_eq!(
        builds_after_middle_child_fails(SupervisionStrategy::RestForOne).await,
        [1, 2, 2]
    );
}

#[tokio::test]
async fn one_for_all_restarts_siblings_in_start_order() {
    let journal = common::Journal::default();
    let mk = |name| {
        let opts = Opts {
            journal: journal.clone(),
            ..Opts::default()
        };
        ChildSpec::new(name, opts.factory(name))
    };
    let (sa, sb, sc) = (mk("a"), mk("b"), mk("c"));
    let (ab, ac) = (sb.addr(), sc.addr());
    let root = Supervisor::new("root")
        .strategy(SupervisionStrategy::OneForAll)
        .backoff(Backoff::NONE)
        .child(sa)
        .child(sb)
        .child(sc)
        .spawn();
    assert_eq!(incarnation(&ac).await, 1);

    ab.tell(WorkerMsg::Fail).await.unwrap();
    // Once b runs again, c has been told to yield, so c's next answer comes
    // from its new incarnation.
    assert_eq!(incarnation(&ab).await, 2);
    assert_eq!(incarnation(&ac).await, 2);
    let starts: Vec<_> = journal
        .events()
        .into_iter()
        .filter(|e| e.kind == "start")
        .map(|e| e.name)
        .collect();
    assert_eq!(starts, ["a", "b", "c", "a", "b", "c"]);
    assert!(root.shutdown(GRACE).await.is_clean());
}

// ---- restart policies ---------------------------------------------------------

/// Adds one child with `restart` at run time, sends it `msg` and reports
/// whether a new incarnation came up (`true`) or the address closed (`false`).
async fn is_restarted_after(restart: RestartPolicy, msg: WorkerMsg) -> bool {
    let opts = Opts::default();
    let spec = ChildSpec::new("worker", opts.factory("worker")).restart(restart);
    let addr = spec.addr();
    let root = Supervisor::new("root").backoff(Backoff::NONE).spawn();
    within("add_child", root.supervisor_ref().add_child(spec))
        .await
        .unwrap();
    assert_eq!(incarnation(&addr).await, 1);

    addr.tell(msg).await.unwrap();
    let res = within("an answer or a closed mailbox", async {
        addr.ask(|reply| WorkerMsg::Incarnation { reply }).await
    })
    .await;
    let restarted = match res {
        Ok(n) => {
            assert_eq!(n, 2);
            true
        }
        Err(AskError::NoReply | AskError::Send(SendError::Closed(_))) => {
            assert_eq!(addr.state(), ActorState::Stopped);
            // It left the tree.
            assert!(root.snapshot().unwrap().find("worker").is_none());
            false
        }
        Err(e) => panic!("unexpected ask error: {e:?}"),
    };
    assert_eq!(opts.builds.get(), if restarted { 2 } else { 1 });
    root.shutdown(GRACE).await;
    restarted
}

#[tokio::test]
async fn permanent_child_is_restarted_after_a_normal_stop() {
    assert!(is_restarted_after(RestartPolicy::Permanent, WorkerMsg::Stop).await);
}

#[tokio::test]
async fn permanent_child_is_restarted_after_a_failure() {
    assert!(is_restarted_after(RestartPolicy::Permanent, WorkerMsg::Fail).await);
}

#[tokio::test]
async fn transient_child_is_restarted_after_a_failure() {
    assert!(is_restarted_after(RestartPolicy::Transient, WorkerMsg::Panic).await);
}

#[tokio::test]
async fn transient_child_is_not_restarted_after_a_normal_stop() {
    assert!(!is_restarted_after(RestartPolicy::Transient, WorkerMsg::Stop).await);
}

#[tokio::test]
async fn temporary_child_is_not_restarted_after_a_failure() {
    assert!(!is_restarted_after(RestartPolicy::Temporary, WorkerMsg::Fail).await);
}

#[tokio::test]
async fn temporary_child_is_not_restarted_after_a_normal_stop() {
    assert!(!is_restarted_after(RestartPolicy::Temporary, WorkerMsg::Stop).await);
}

#[tokio::test]
async fn temporary_child_is_started_with_its_supervisor() {
    let opts = Opts::default();
    let spec = ChildSpec::new("temp", opts.factory("temp")).restart(RestartPolicy::Temporary);
    let addr = spec.addr();
    let root = Supervisor::new("root").child(spec).spawn();

    let res = within(
        "the temporary child",
        addr.ask(|reply| WorkerMsg::Incarnation { reply }),
    )
    .await;
    assert!(matches!(res, Ok(1)), "got {res:?}");
    assert_eq!(opts.builds.get(), 1);
    root.shutdown(GRACE).await;
}

#[tokio::test]
async fn temporary_child_that_ends_fails_every_queued_ask() {
    let opts = Opts::default();
    let spec = ChildSpec::new("temp", opts.factory("temp")).restart(RestartPolicy::Temporary);
    let addr = spec.addr();
    let root = Supervisor::new("root").backoff(Backoff::NONE).spawn();
    within("add_child", root.supervisor_ref().add_child(spec))
        .await
        .unwrap();

    let release = block(&addr).await;
    addr.tell(WorkerMsg::Fail).await.unwrap();
    let asks: Vec<_> = (0..5)
        .map(|_| {
            let addr = addr.clone();
            tokio::spawn(async move { addr.ask(|reply| WorkerMsg::Get { reply }).await })
        })
        .collect();
    eventually("asks queued", || addr.mailbox_depth() == 6).await;
    release.send(()).unwrap();

    for ask in asks {
        let res = within("a queued ask", ask).await.unwrap();
        assert!(matches!(res, Err(AskError::NoReply)), "got {res:?}");
    }
    match addr.tell(WorkerMsg::Add(3)).await {
        Err(SendError::Closed(WorkerMsg::Add(3))) => {}
        other => panic!("expected Closed(Add(3)), got {other:?}"),
    }
    assert_eq!(opts.builds.get(), 1);
    root.shutdown(GRACE).await;
}

// ---- intensity and escalation -------------------------------------------------

#[tokio::test]
async fn exceeding_restart_intensity_escalates_a_root_supervisor() {
    let opts = Opts::default();
    let spec = ChildSpec::new("worker", opts.factory("worker"));
    let addr = spec.addr();
    let mut root = Supervisor::new("root")
        .intensity(2, Duration::from_secs(60))
        .backoff(Backoff::NONE)
        .child(spec)
        .spawn();

    // Two restarts are allowed; the third failure exceeds the intensity.
    for _ in 0..3 {
        addr.tell(WorkerMsg::Fail).await.unwrap();
    }
    let reason = within("the root to give up", root.wait()).await;
    assert!(matches!(reason, ExitReason::Escalated(_)), "got {reason:?}");
    assert_eq!(opts.builds.get(), 3);
}

#[tokio::test(start_paused = true)]
async fn restarts_outside_the_intensity_window_do_not_escalate() {
    let opts = Opts::default();
    let spec = ChildSpec::new("worker", opts.factory("worker"));
    let addr = spec.addr();
    let root = Supervisor::new("root")
        .intensity(2, Duration::from_secs(1))
        .backoff(Backoff::NONE)
        .child(spec)
        .spawn();

    for expected in 2..=3 {
        addr.tell(WorkerMsg::Fail).await.unwrap();
        assert_eq!(incarnation(&addr).await, expected);
    }
    // Both earlier restarts leave the window before the third failure.
    tokio::time::advance(Duration::from_secs(1)).await;
    addr.tell(WorkerMsg::Fail).await.unwrap();
    assert_eq!(incarnation(&addr).await, 4);
    let snap = root.snapshot().unwrap();
    assert_eq!(snap.state, ActorState::Running);
    assert_eq!(snap.find("worker").unwrap().restarts, 3);
    assert!(root.shutdown(GRACE).await.is_clean());
}

#[tokio::test]
async fn exceeding_restart_intensity_restarts_a_nested_supervisor() {
    let opts = Opts::default();
    let spec = ChildSpec::new("worker", opts.factory("worker"));
    let addr = spec.addr();
    let inner = Supervisor::new("inner")
        .intensity(1, Duration::from_secs(60))
        .backoff(Backoff::NONE);
    let inner_ref = inner.supervisor_ref();
    let root = Supervisor::new("root")
        .backoff(Backoff::NONE)
        .child(inner.child(spec))
        .spawn();
    assert_eq!(incarnation(&addr).await, 1);

    // First failure: inner restarts the worker (build 2). Second: inner gives
    // up; root restarts inner, which starts the worker again (build 3).
    addr.tell(WorkerMsg::Fail).await.unwrap();
    assert_eq!(incarnation(&addr).await, 2);
    addr.tell(WorkerMsg::Fail).await.unwrap();
    assert_eq!(incarnation(&addr).await, 3);

    let snap = root.snapshot().unwrap();
    assert_eq!(snap.state, ActorState::Running);
    let inner_info = snap.find("inner").unwrap();
    assert_eq!(inner_info.id, inner_ref.id());
    assert_eq!(inner_info.restarts, 1);
    assert_eq!(inner_info.state, ActorState::Running);
    assert!(root.shutdown(GRACE).await.is_clean());
}

#[tokio::test(start_paused = true)]
async fn queued_asks_fail_when_a_root_supervisor_escalates() {
    let opts = Opts::default();
    let spec = ChildSpec::new("worker", opts.factory("worker"));
    let addr = spec.addr();
    let mut root = Supervisor::new("root")
        .intensity(0, Duration::from_secs(60))
        .backoff(Backoff::NONE)
        .child(spec)
        .spawn();

    let release = block(&addr).await;
    addr.tell(WorkerMsg::Fail).await.unwrap();
    let queued = {
        let addr = addr.clone();
        tokio::spawn(async move { addr.ask(|reply| WorkerMsg::Get { reply }).await })
    };
    eventually("ask queued", || addr.mailbox_depth() == 2).await;
    release.send(()).unwrap();

    let reason = within("the root to give up", root.wait()).await;
    assert!(matches!(reason, ExitReason::Escalated(_)), "got {reason:?}");
    // Nobody will ever restart this tree: the queued ask must fail, not hang.
    let res = within("the queued ask", queued).await.unwrap();
    assert!(
        matches!(
            res,
            Err(AskError::NoReply | AskError::Send(SendError::Closed(_)))
        ),
        "got {res:?}"
    );
}

// ---- backoff ------------------------------------------------------------------

#[test]
fn backoff_delay_doubles_from_initial_and_is_capped() {
    let b = no_jitter(100, 1000);
    let ms: Vec<u128> = (1..=6).map(|n| b.delay(n).as_millis()).collect();
    assert_eq!(ms, [100, 200, 400, 800, 1000, 1000]);
    assert_eq!(b.delay(40), Duration::from_millis(1000));
    assert_eq!(b.delay(u32::MAX), Duration::from_millis(1000));
    assert_eq!(Backoff::NONE.delay(3), Duration::ZERO);
}

#[test]
fn backoff_jitter_stays_within_its_spread_and_the_cap() {
    let b = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(1000),
        jitter: 0.5,
    };
    let mut distinct = std::collections::BTreeSet::new();
    for _ in 0..500 {
        let d1 = b.delay(1);
        assert!(
            d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(150),
            "{d1:?}"
        );
        distinct.insert(d1);
        let d5 = b.delay(5);
        assert!(
            d5 >= Duration::from_millis(500) && d5 <= Duration::from_millis(1000),
            "{d5:?}"
        );
    }
    assert!(distinct.len() > 1, "jitter never varied the delay");
}

#[tokio::test(start_paused = true)]
async fn restart_delays_grow_and_are_capped() {
    let (tx, mut starts) = tokio::sync::mpsc::unbounded_channel();
    let opts = Opts {
        fail_starts: 5,
        starts: Some(tx),
        ..Opts::default()
    };
    let spec = ChildSpec::new("worker", opts.factory("worker"));
    let addr = spec.addr();
    let root = Supervisor::new("root")
        .intensity(10, Duration::from_secs(60))
        .backoff(no_jitter(100, 400))
        .child(spec)
        .spawn();

    // Five failed starts, then one that sticks.
    let mut at = Vec::new();
    for _ in 0..6 {
        at.push(within("a start", starts.recv()).await.unwrap());
    }
    assert_eq!(incarnation(&addr).await, 6);
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, expected_ms) in gaps.iter().zip([100u64, 200, 400, 400, 400]) {
        let expected = Duration::from_millis(expected_ms);
        assert!(
            *gap >= expected && *gap < expected + Duration::from_millis(5),
            "gaps {gaps:?}"
        );
    }
    assert!(root.shutdown(GRACE).await.is_clean());
}

#[tokio::test]
async fn messages_queued_behind_a_crashing_one_reach_the_next_incarnation_in_order() {
    let opts = Opts::default();
    let spec = ChildSpec::with_mailbox("batch", 128, opts.factory("batch"));
    let addr = spec.addr();
    let root = Supervisor::new("root")
        .backoff(Backoff::NONE)
        .child(spec)
        .spawn();
    // Hold the actor so that everything below is queued at once, with the
    // crash in the middle.
    let release = block(&addr).await;
    for k in 1..=5 {
        addr.tell(WorkerMsg::Add(k)).await.unwrap();
    }
    addr.tell(WorkerMsg::Panic).await.unwrap();
    for k in 1..=10 {
        addr.tell(WorkerMsg::Log(k)).await.unwrap();
        addr.tell(WorkerMsg::Add(100)).await.unwrap();
    }
    let _ = release.send(());
    assert_eq!(incarnation(&addr).await, 2);
    // Fresh state, and every message after the crash handled, in order.
    assert_eq!(total(&addr).await, 1000);
    let seen = addr.ask(|reply| WorkerMsg::Seen { reply }).await.unwrap();
    assert_eq!(seen, (1..=10).collect::<Vec<u64>>());
    assert!(root.shutdown(GRACE).await.is_clean());
}
