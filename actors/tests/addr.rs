//! Addresses: ordering, backpressure and delivery errors.

mod common;

use std::time::Duration;

use common::{block, within, Opts, WorkerMsg};
use prism_actors::{AskError, ChildSpec, ExitReason, SendError, Supervisor};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_from_one_sender_are_handled_in_send_order() {
    const SENDERS: u64 = 4;
    const PER_SENDER: u64 = 500;
    let opts = Opts::default();
    // A small mailbox makes senders wait for space and interleave.
    let actor = prism_actors::spawn("fifo", 8, opts.factory("fifo")());
    let addr = actor.addr();

    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let addr = addr.clone();
        senders.push(tokio::spawn(async move {
            for i in 0..PER_SENDER {
                if addr.tell(WorkerMsg::Log(s * 1_000_000 + i)).await.is_err() {
                    panic!("tell failed");
                }
            }
        }));
    }
    for s in senders {
        within("a sender", s).await.unwrap();
    }
    let seen = within("the log", addr.ask(|reply| WorkerMsg::Seen { reply }))
        .await
        .unwrap();

    assert_eq!(seen.len() as u64, SENDERS * PER_SENDER);
    for s in 0..SENDERS {
        let from_s: Vec<u64> = seen
            .iter()
            .filter(|v| **v / 1_000_000 == s)
            .map(|v| v % 1_000_000)
            .collect();
        let expected: Vec<u64> = (0..PER_SENDER).collect();
        assert_eq!(from_s, expected, "sender {s} saw its messages reordered");
    }
    actor.stop();
    assert_eq!(actor.join().await, ExitReason::Shutdown);
}

#[tokio::test]
async fn try_tell_on_a_full_mailbox_returns_full_with_the_message() {
    let actor = prism_actors::spawn("full", 2, Opts::default().factory("full")());
    let addr = actor.addr();
    let release = block(&addr).await;
    addr.try_tell(WorkerMsg::Add(1)).unwrap();
    addr.try_tell(WorkerMsg::Add(2)).unwrap();

    match addr.try_tell(WorkerMsg::Add(42)) {
        Err(SendError::Full(WorkerMsg::Add(42))) => {}
        Err(e) => panic!("expected Full(Add(42)), got {e:?}"),
        Ok(()) => panic!("a full mailbox accepted a message"),
    }
    assert_eq!(addr.mailbox_depth(), 2);

    // The two queued messages are still handled once there is room.
    release.send(()).unwrap();
    assert_eq!(common::total(&addr).await, 3);
}

#[tokio::test]
async fn try_ask_on_a_full_mailbox_fails_at_once_with_the_message() {
    let actor = prism_actors::spawn("full", 1, Opts::default().factory("full")());
    let addr = actor.addr();
    let _release = block(&addr).await;
    addr.try_tell(WorkerMsg::Add(1)).unwrap();

    match addr.try_ask(|reply| WorkerMsg::Get { reply }).await {
        Err(AskError::Send(SendError::Full(WorkerMsg::Get { .. }))) => {}
        other => panic!("expected Send(Full(Get)), got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn ask_timeout_on_a_full_mailbox_times_out() {
    let actor = prism_actors::spawn("full", 1, Opts::default().factory("full")());
    let addr = actor.addr();
    let _release = block(&addr).await;
    addr.try_tell(WorkerMsg::Add(1)).unwrap();

    let started = tokio::time::Instant::now();
    let res = addr
        .ask_timeout(|reply| WorkerMsg::Get { reply }, Duration::from_millis(300))
        .await;
    assert!(matches!(res, Err(AskError::Timeout)), "got {res:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test(start_paused = true)]
async fn ask_timeout_on_a_busy_actor_times_out() {
    let actor = prism_actors::spawn("busy", 8, Opts::default().factory("busy")());
    let addr = actor.addr();
    let _release = block(&addr).await;

    let res = addr
        .ask_timeout(|reply| WorkerMsg::Get { reply }, Duration::from_millis(300))
        .await;
    assert!(matches!(res, Err(AskError::Timeout)), "got {res:?}");
}

#[tokio::test]
async fn tell_to_an_ended_actor_returns_closed_with_the_message() {
    let actor = prism_actors::spawn("gone", 4, Opts::default().factory("gone")());
    let addr = actor.addr();
    addr.tell(WorkerMsg::Fail).await.unwrap();
    assert!(matches!(
        within("the actor to end", actor.join()).await,
        ExitReason::Error(_)
    ));

    match addr.tell(WorkerMsg::Add(7)).await {
        Err(SendError::Closed(WorkerMsg::Add(7))) => {}
        other => panic!("expected Closed(Add(7)), got {other:?}"),
    }
    match addr.try_tell(WorkerMsg::Add(8)) {
        Err(SendError::Closed(WorkerMsg::Add(8))) => {}
        other => panic!("expected Closed(Add(8)), got {other:?}"),
    }
}

#[tokio::test]
async fn queued_asks_fail_when_an_unsupervised_actor_fails() {
    let actor = prism_actors::spawn("doomed", 8, Opts::default().factory("doomed")());
    let addr = actor.addr();
    let release = block(&addr).await;
    addr.tell(WorkerMsg::Fail).await.unwrap();
    let asks: Vec<_> = (0..3)
        .map(|_| {
            let addr = addr.clone();
            tokio::spawn(async move { addr.ask(|reply| WorkerMsg::Get { reply }).await })
        })
        .collect();
    common::eventually("asks queued", || addr.mailbox_depth() == 4).await;

    release.send(()).unwrap();
    assert!(matches!(
        within("the actor to end", actor.join()).await,
        ExitReason::Error(_)
    ));
    for ask in asks {
        let res = within("a queued ask", ask).await.unwrap();
        assert!(matches!(res, Err(AskError::NoReply)), "got {res:?}");
    }
}

#[tokio::test]
async fn address_is_the_same_actor_across_restarts() {
    let opts = Opts::default();
    let spec = ChildSpec::new("stable", opts.factory("stable"))
        .restart(prism_actors::RestartPolicy::Permanent);
    let addr = spec.addr();
    let copy = addr.clone();
    let root = Supervisor::new("root")
        .backoff(prism_actors::Backoff::NONE)
        .child(spec)
        .spawn();

    addr.tell(WorkerMsg::Fail).await.unwrap();
    assert_eq!(common::incarnation(&copy).await, 2);
    assert!(copy.same_actor(&addr));
    assert_eq!(copy.id(), addr.id());
    assert!(root.shutdown(Duration::from_secs(5)).await.is_clean());
}
