//! The live tree: snapshots and dynamic children.

mod common;

use std::time::Duration;

use common::{
    block, eventually, incarnation, probe_until_stopping, total, within, Opts, WorkerMsg,
};
use prism_actors::{
    ActorState, Backoff, ChildSpec, SendError, StopOutcome, Supervisor, SupervisorError,
};

const GRACE: Duration = Duration::from_secs(5);

#[tokio::test(start_paused = true)]
async fn snapshot_shows_name_state_restarts_and_mailbox_depth() {
    let busy = Opts::default();
    let waiting = Opts::default();
    let busy_spec = ChildSpec::with_mailbox("busy", 8, busy.factory("busy"));
    let waiting_spec = ChildSpec::new("waiting", waiting.factory("waiting"));
    let (busy_addr, waiting_addr) = (busy_spec.addr(), waiting_spec.addr());
    let root = Supervisor::new("root")
        .backoff(Backoff {
            initial: Duration::from_secs(60),
            max: Duration::from_secs(60),
            jitter: 0.0,
        })
        .child(busy_spec)
        .child(waiting_spec)
        .spawn();
    assert_eq!(incarnation(&busy_addr).await, 1);
    assert_eq!(incarnation(&waiting_addr).await, 1);

    // "busy" handles a message while three more wait; "waiting" failed and
    // sits out its 60 s backoff (the clock is paused).
    let release = block(&busy_addr).await;
    for k in 1..=3 {
        busy_addr.try_tell(WorkerMsg::Add(k)).unwrap();
    }
    waiting_addr.tell(WorkerMsg::Fail).await.unwrap();
    eventually("waiting in backoff", || {
        waiting_addr.state() == ActorState::Restarting
    })
    .await;

    let snap = root.snapshot().unwrap();
    assert_eq!(snap.name, "root");
    assert!(snap.supervisor);
    assert_eq!(snap.state, ActorState::Running);
    assert_eq!(snap.parent, None);
    let names: Vec<&str> = snap.children.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["busy", "waiting"]);

    let b = snap.find("busy").unwrap();
    assert_eq!(b.id, busy_addr.id());
    assert_eq!(b.parent, Some(snap.id));
    assert!(!b.supervisor);
    assert_eq!(b.state, ActorState::Running);
    assert_eq!(b.restarts, 0);
    assert_eq!(b.mailbox_depth, 3);
    assert_eq!(b.mailbox_capacity, 8);

    let w = snap.find("waiting").unwrap();
    assert_eq!(w.state, ActorState::Restarting);
    assert_eq!(w.restarts, 1);
    assert_eq!(w.mailbox_depth, 0);

    release.send(()).unwrap();
    assert_eq!(total(&busy_addr).await, 6);
    assert_eq!(
        root.snapshot().unwrap().find("busy").unwrap().mailbox_depth,
        0
    );
    root.shutdown(GRACE).await;
}

#[tokio::test]
async fn added_child_runs_and_appears_in_the_snapshot() {
    let root = Supervisor::new("root").spawn();
    let sup = root.supervisor_ref();
    let opts = Opts::default();
    let spec = ChildSpec::new("dyn", opts.factory("dyn"));
    let addr = spec.addr();

    let id = within("add_child", sup.add_child(spec)).await.unwrap();
    assert_eq!(id, addr.id());
    addr.tell(WorkerMsg::Add(4)).await.unwrap();
    assert_eq!(total(&addr).await, 4);

    let snap = sup.snapshot().unwrap();
    let info = snap.find("dyn").unwrap();
    assert_eq!(info.id, id);
    assert_eq!(info.parent, Some(sup.id()));
    assert_eq!(info.state, ActorState::Running);
    assert!(root.shutdown(GRACE).await.is_clean());
}

#[tokio::test]
async fn tell_add_child_gives_a_working_address_at_once() {
    let root = Supervisor::new("root").spawn();
    let sup = root.supervisor_ref();
    let opts = Opts::default();
    let spec = ChildSpec::new("dyn", opts.factory("dyn"));
    let addr = spec.addr();

    // The message is queued before the supervisor has even started the child.
    sup.tell_add_child(spec).await.unwrap();
    addr.tell(WorkerMsg::Add(9)).await.unwrap();
    assert_eq!(total(&addr).await, 9);
    assert_eq!(opts.builds.get(), 1);
    assert!(root.shutdown(GRACE).await.is_clean());
}

#[tokio::test]
async fn add_children_starts_a_whole_pool_with_one_message() {
    let root = Supervisor::new("root").spawn();
    let sup = root.supervisor_ref();
    let opts = Opts::default();
    let specs: Vec<_> = (0..3)
        .map(|i| ChildSpec::new(format!("pool-{i}"), opts.factory("pool")))
        .collect();
    let addrs: Vec<_> = specs.iter().map(|s| s.addr()).collect();
    let ids = sup
        .add_children(specs.into_iter().map(Into::into))
        .await
        .unwrap();
    assert_eq!(ids, addrs.iter().map(|a| a.id()).collect::<Vec<_>>());
    for (i, addr) in addrs.iter().enumerate() {
        addr.tell(WorkerMsg::Add(i as u64 + 1)).await.unwrap();
        assert_eq!(total(addr).await, i as u64 + 1);
    }
    assert_eq!(opts.builds.get(), 3);
    let tree = sup.snapshot().unwrap();
    assert!((0..3).all(|i| tree.find(&format!("pool-{i}")).is_some()));
    let report = root.shutdown(GRACE).await;
    assert!(report.is_clean());
    assert_eq!(report.root.children.len(), 3);
}

#[tokio::test]
async fn snapshot_lists_many_children_in_creation_order() {
    const N: usize = 300;
    let opts = Opts::default();
    // Ids are handed out when specs and supervisors are built.
    let first = ChildSpec::new("first", opts.factory("first"));
    let nested = Supervisor::new("nested").child(ChildSpec::new("inner", opts.factory("inner")));
    let nested_ref = nested.supervisor_ref();
    let root = Supervisor::new("root").child(first).child(nested).spawn();
    let sup = root.supervisor_ref();
    let specs: Vec<_> = (0..N)
        .map(|i| ChildSpec::new(format!("pool-{i}"), opts.factory("pool")))
        .collect();
    let mut ids = vec![];
    for spec in specs {
        ids.push(sup.add_child(spec).await.unwrap());
    }

    let snap = root.snapshot().unwrap();
    let names: Vec<String> = snap.children.iter().map(|c| c.name.clone()).collect();
    let mut expected = vec!["first".to_string(), "nested".to_string()];
    expected.extend((0..N).map(|i| format!("pool-{i}")));
    assert_eq!(names, expected);
    let child_ids: Vec<u64> = snap.children.iter().skip(2).map(|c| c.id).collect();
    assert_eq!(child_ids, ids);
    let inner = snap.find("inner").unwrap();
    assert_eq!(inner.parent, Some(nested_ref.id()));
    assert_eq!(snap.iter().len(), N + 4);
    let report = root.shutdown(GRACE).await;
    assert!(report.is_clean());
    assert_eq!(report.root.children.len(), N + 2);
}

#[tokio::test]
async fn added_child_is_supervised_like_a_static_one() {
    let root = Supervisor::new("root").backoff(Backoff::NONE).spawn();
    let sup = root.supervisor_ref();
    let opts = Opts::default();
    let spec = ChildSpec::new("dyn", opts.factory("dyn"));
    let addr = spec.addr();
    sup.add_child(spec).await.unwrap();

    addr.tell(WorkerMsg::Panic).await.unwrap();
    assert_eq!(incarnation(&addr).await, 2);
    assert_eq!(sup.snapshot().unwrap().find("dyn").unwrap().restarts, 1);
    assert!(root.shutdown(GRACE).await.is_clean());
}

#[tokio::test]
async fn removed_child_drains_closes_and_leaves_the_snapshot() {
    const N: u64 = 10;
    let root = Supervisor::new("root").spawn();
    let sup = root.supervisor_ref();
    let opts = Opts::default();
    let spec = ChildSpec::with_mailbox("dyn", 256, opts.factory("dyn"));
    let addr = spec.addr();
    let id = sup.add_child(spec).await.unwrap();

    let release = block(&addr).await;
    for _ in 0..N {
        addr.try_tell(WorkerMsg::Add(1)).unwrap();
    }
    let removal = {
        let sup = sup.clone();
        tokio::spawn(async move { sup.remove_child(id).await })
    };
    let (accepted, _) = probe_until_stopping(&addr).await;
    release.send(()).unwrap();
    let report = within("the removal", removal).await.unwrap().unwrap();

    assert_eq!(&*report.name, "dyn");
    assert_eq!(report.id, id);
    assert_eq!(report.outcome, StopOutcome::Drained);
    assert_eq!(report.handled, N + accepted);
    assert_eq!(opts.journal.stops(), ["dyn"]);
    assert!(sup.snapshot().unwrap().find("dyn").is_none());
    assert_eq!(addr.state(), ActorState::Stopped);
    match addr.tell(WorkerMsg::Add(5)).await {
        Err(SendError::Closed(WorkerMsg::Add(5)) | SendError::Stopping(WorkerMsg::Add(5))) => {}
        other => panic!("expected the message back, got {other:?}"),
    }
    // Removed for good: not restarted.
    assert_eq!(opts.builds.get(), 1);
    assert!(root.shutdown(GRACE).await.is_clean());
}

#[tokio::test]
async fn removing_an_unknown_child_is_an_error() {
    let root = Supervisor::new("root").spawn();
    let sup = root.supervisor_ref();
    assert_eq!(
        sup.remove_child(u64::MAX).await,
        Err(SupervisorError::NoSuchChild(u64::MAX))
    );
    root.shutdown(GRACE).await;
}

#[tokio::test]
async fn a_child_is_removed_only_through_its_own_supervisor() {
    // Children are found by id in the tree's registry, which holds the whole
    // tree: a grandchild's id given to the root is still no child of the root.
    let opts = Opts::default();
    let spec = ChildSpec::new("leaf", opts.factory("leaf"));
    let addr = spec.addr();
    let id = addr.id();
    let mid = Supervisor::new("mid").child(spec);
    let mid_ref = mid.supervisor_ref();
    let root = Supervisor::new("root").child(mid).spawn();
    let sup = root.supervisor_ref();
    assert_eq!(incarnation(&addr).await, 1);

    assert_eq!(
        sup.remove_child(id).await,
        Err(SupervisorError::NoSuchChild(id))
    );
    assert_eq!(addr.state(), ActorState::Running);
    assert!(sup.snapshot().unwrap().find("leaf").is_some());

    let report = mid_ref.remove_child(id).await.unwrap();
    assert_eq!(&*report.name, "leaf");
    assert_eq!(report.outcome, StopOutcome::Drained);
    assert!(sup.snapshot().unwrap().find("leaf").is_none());
    // A removed child's id is free again in the registry, yet nothing of it
    // is left to remove.
    assert_eq!(
        mid_ref.remove_child(id).await,
        Err(SupervisorError::NoSuchChild(id))
    );
    assert!(root.shutdown(GRACE).await.is_clean());
}
