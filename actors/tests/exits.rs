//! How a child's end reaches its supervisor: every task reports exactly one
//! exit over the supervisor's exit channel, whether it returned, failed,
//! panicked, was cut off, or never got to run its actor.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{block, eventually, incarnation, total, within, Opts, WorkerMsg};
use prism_actors::{
    Actor, Backoff, BoxError, ChildSpec, Context, RestartPolicy, StopOutcome, SupervisionStrategy,
    Supervisor,
};

const GRACE: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_factory_that_panics_is_a_failed_start_and_the_child_is_retried() {
    let opts = Opts::default();
    let inner = opts.factory("worker");
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let spec = ChildSpec::new("worker", move || {
        if counted.fetch_add(1, Ordering::SeqCst) < 2 {
            panic!("factory asked to panic");
        }
        inner()
    });
    let addr = spec.addr();
    // Queued before the tree exists: the first incarnation that gets built
    // handles it.
    addr.try_tell(WorkerMsg::Add(7)).unwrap();
    let root = Supervisor::new("root")
        .backoff(Backoff::NONE)
        .intensity(10, Duration::from_secs(10))
        .child(spec)
        .spawn();

    assert_eq!(total(&addr).await, 7);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(opts.builds.get(), 1);
    let snap = root.snapshot().unwrap();
    assert_eq!(snap.find("worker").unwrap().restarts, 2);
    assert!(root.shutdown(GRACE).await.is_clean());
}

#[tokio::test]
async fn many_children_ending_at_once_are_each_reported_and_restarted_once() {
    const N: usize = 60;
    let opts = Opts::default();
    let mut root = Supervisor::new("root")
        .backoff(Backoff::NONE)
        .intensity(N as u32 * 2, Duration::from_secs(60));
    let mut addrs = Vec::new();
    for _ in 0..N {
        let spec = ChildSpec::new("worker", opts.factory("worker"));
        addrs.push(spec.addr());
        root = root.child(spec);
    }
    let root = root.spawn();
    for a in &addrs {
        a.tell(WorkerMsg::Add(1)).await.unwrap();
        assert_eq!(total(a).await, 1);
    }
    assert_eq!(opts.builds.get(), N as u32);

    // A panic, an error and a normal stop, all in flight together.
    for (i, a) in addrs.iter().enumerate() {
        let end = match i % 3 {
            0 => WorkerMsg::Panic,
            1 => WorkerMsg::Fail,
            _ => WorkerMsg::Stop,
        };
        a.try_tell(end).unwrap();
    }
    for a in &addrs {
        // Each answers from its second incarnation, with fresh state.
        assert_eq!(total(a).await, 0);
    }
    assert_eq!(opts.builds.get(), 2 * N as u32);
    let snap = root.snapshot().unwrap();
    assert_eq!(snap.children.len(), N);
    assert!(snap.children.iter().all(|c| c.restarts == 1));

    let report = root.shutdown(GRACE).await;
    assert!(report.is_clean());
    assert_eq!(report.root.children.len(), N);
}

#[tokio::test(start_paused = true)]
async fn a_child_that_ignores_a_sibling_restart_is_cut_off_and_restarted() {
    let opts = Opts::default();
    let stuck_spec =
        ChildSpec::new("stuck", opts.factory("stuck")).shutdown_timeout(Duration::from_millis(50));
    let failing_spec = ChildSpec::new("failing", opts.factory("failing"));
    let (stuck, failing) = (stuck_spec.addr(), failing_spec.addr());
    let root = Supervisor::new("root")
        .strategy(SupervisionStrategy::OneForAll)
        .backoff(Backoff::NONE)
        .child(stuck_spec)
        .child(failing_spec)
        .spawn();

    // Blocked in a handler: it cannot see the request to stop for the restart.
    let _release = block(&stuck).await;
    failing.tell(WorkerMsg::Fail).await.unwrap();

    // Past its shutdown timeout it is aborted; its task, dropped, still
    // reports, so the group restarts.
    assert_eq!(incarnation(&stuck).await, 3);
    assert_eq!(incarnation(&failing).await, 4);
    let snap = root.snapshot().unwrap();
    assert_eq!(snap.find("stuck").unwrap().restarts, 1);
    assert!(root.shutdown(GRACE).await.is_clean());
}

/// An actor whose state panics when dropped, which happens after its last
/// hook: outside every handler and hook guard.
struct PanicsOnDrop;

impl Actor for PanicsOnDrop {
    type Msg = WorkerMsg;

    async fn handle(&mut self, msg: WorkerMsg, ctx: &mut Context<Self>) -> Result<(), BoxError> {
        match msg {
            WorkerMsg::Stop => ctx.stop(),
            WorkerMsg::Get { reply } => {
                let _ = reply.send(0);
            }
            _ => {}
        }
        Ok(())
    }
}

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("dropped");
        }
    }
}

#[tokio::test]
async fn a_panic_outside_handlers_and_hooks_is_reported_as_a_failure() {
    let builds = Arc::new(AtomicU32::new(0));
    let counted = builds.clone();
    // Transient: restarted after a failure, not after a normal stop.
    let spec = ChildSpec::new("fragile", move || {
        counted.fetch_add(1, Ordering::SeqCst);
        PanicsOnDrop
    })
    .restart(RestartPolicy::Transient);
    let addr = spec.addr();
    let root = Supervisor::new("root")
        .backoff(Backoff::NONE)
        .child(spec)
        .spawn();

    addr.tell(WorkerMsg::Stop).await.unwrap();
    // The stop was normal, but dropping the state panicked: that is the
    // exit, so the transient child is restarted.
    eventually("the child to be built again", || {
        builds.load(Ordering::SeqCst) == 2
    })
    .await;
    let answer = within("an answer", addr.ask(|reply| WorkerMsg::Get { reply })).await;
    assert_eq!(answer.unwrap(), 0);

    let report = root.shutdown(GRACE).await;
    let line = report.find("fragile").unwrap();
    // Its drain ends with the same panic on drop.
    assert!(matches!(line.outcome, StopOutcome::Failed(_)));
}
