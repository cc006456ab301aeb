//! Deadlines, cancellation, admission limits and supervised restarts, with a
//! test backend that is slow, blocks or panics on purpose.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::faulty::{reaches, FaultyConnector, Probe};
use common::http::Admin;
use common::requests::{get, put, with_timeout};
use common::{as_client, base_settings, eventually, TestServer};
use prism::backend::Connector;
use tonic::Code;

const FAULTY: &str = r#"
[backends.faulty]
kind = "memory"
pool_size = 4

[namespaces.faulty]
backend = "faulty"
timeout = "2s"
"#;

async fn server(extra: &str) -> (TestServer, Arc<Probe>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (connector, probe) = FaultyConnector::new();
    let settings = base_settings(dir.path(), &format!("{FAULTY}{extra}"));
    let s = TestServer::start_with(settings, vec![("faulty", connector as Arc<dyn Connector>)])
        .await
        .unwrap();
    (s, probe, dir)
}

#[tokio::test]
async fn a_slow_backend_answers_deadline_exceeded_within_the_client_deadline() {
    let (server, probe, _dir) = server("").await;
    let mut c = server.client().await.unwrap();
    let req = with_timeout(get("faulty", "slow/3000/a"), Duration::from_millis(300));
    let started = std::time::Instant::now();
    let e = c.get(req).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered after {:?}",
        started.elapsed()
    );
    // The namespace timeout (2 s) bounds a request without a client deadline.
    let started = std::time::Instant::now();
    let e = c.get(get("faulty", "slow/5000/b")).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded);
    assert!(started.elapsed() < Duration::from_secs(4));
    // The backend work was dropped at the deadline.
    assert!(reaches(&probe.cancelled, 2, Duration::from_secs(2)).await);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_running_backend_call() {
    let (server, probe, _dir) = server("").await;
    let mut c = server.client().await.unwrap();
    let call = tokio::spawn(async move { c.get(get("faulty", "block/1")).await });
    assert!(
        reaches(&probe.started, 1, Duration::from_secs(5)).await,
        "backend call never started"
    );
    call.abort();
    assert!(
        reaches(&probe.cancelled, 1, Duration::from_secs(5)).await,
        "backend future was not dropped after the client went away"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_session_over_its_in_flight_limit_gets_resource_exhausted() {
    let (server, probe, _dir) = server(
        r#"
[sessions]
max_in_flight = 2
"#,
    )
    .await;
    let c = server.client().await.unwrap();
    let mut blocked = Vec::new();
    for i in 0..2 {
        let mut c = c.clone();
        blocked.push(tokio::spawn(async move {
            c.get(as_client("greedy", get("faulty", &format!("block/{i}"))))
                .await
        }));
    }
    assert!(reaches(&probe.started, 2, Duration::from_secs(5)).await);
    let mut c2 = c.clone();
    let e = c2
        .get(as_client("greedy", get("cache", "x")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("max_in_flight"), "{}", e.message());
    // Another client is not affected.
    c2.get(as_client("modest", get("cache", "x")))
        .await
        .unwrap();
    for b in blocked {
        b.abort();
    }
    // Once the blocked calls are cancelled, the greedy client is admitted again.
    assert!(
        eventually(Duration::from_secs(5), || {
            let mut c = c.clone();
            async move { c.get(as_client("greedy", get("cache", "x"))).await.is_ok() }
        })
        .await
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_session_over_its_rate_limit_gets_resource_exhausted() {
    let (server, _probe, _dir) = server(
        r#"
[sessions]
rate_limit = 5
rate_burst = 5
"#,
    )
    .await;
    let mut c = server.client().await.unwrap();
    let mut exhausted = 0;
    for _ in 0..20 {
        if let Err(e) = c.get(as_client("fast", get("cache", "x"))).await {
            assert_eq!(e.code(), Code::ResourceExhausted);
            assert!(e.message().contains("rate_limit"));
            exhausted += 1;
        }
    }
    assert!(exhausted >= 10, "only {exhausted} of 20 were limited");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_pool_actor_panic_restarts_it_and_later_requests_succeed() {
    let (server, probe, _dir) = server("").await;
    let mut c = server.client().await.unwrap();
    c.put(put("faulty", "before", b"v", 0)).await.unwrap();
    assert_eq!(probe.connects.load(Ordering::SeqCst), 1);
    let e = c.get(get("faulty", "panic")).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    // The pool actor is restarted (it connects again) ...
    assert!(
        reaches(&probe.connects, 2, Duration::from_secs(5)).await,
        "pool actor was not restarted"
    );
    // ... and serves again, with the data of the memory store intact.
    let ok = eventually(Duration::from_secs(5), || {
        let mut c = c.clone();
        async move { matches!(c.get(get("faulty", "before")).await, Ok(r) if r.get_ref().found) }
    })
    .await;
    assert!(ok, "requests did not succeed after the restart");
    // Other namespaces never noticed.
    c.put(put("cache", "k", b"v", 0)).await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_full_pool_mailbox_answers_resource_exhausted() {
    // The blocking backend with one slot and a one-message mailbox.
    let dir = tempfile::tempdir().unwrap();
    let (connector, _probe) = FaultyConnector::new();
    let settings = base_settings(
        dir.path(),
        r#"
[backends.faulty]
kind = "memory"
pool_size = 1
mailbox = 1

[namespaces.faulty]
backend = "faulty"
"#,
    );
    let server =
        TestServer::start_with(settings, vec![("faulty", connector as Arc<dyn Connector>)])
            .await
            .unwrap();
    let c = server.client().await.unwrap();
    // Ten blocking calls at once: one runs (the only slot), one waits in the
    // actor for the slot, one waits in the mailbox; the rest are turned away
    // at once instead of queueing without bound.
    let mut calls = Vec::new();
    for i in 0..10 {
        let mut c = c.clone();
        calls.push(tokio::spawn(async move {
            let mut req = as_client(&format!("h{i}"), get("faulty", &format!("block/{i}")));
            req.set_timeout(Duration::from_secs(1));
            let started = std::time::Instant::now();
            (c.get(req).await, started.elapsed())
        }));
    }
    let mut exhausted = 0;
    let mut deadline = 0;
    for call in calls {
        let (res, took) = call.await.unwrap();
        let e = res.expect_err("a blocking call cannot succeed");
        match e.code() {
            Code::ResourceExhausted => {
                assert!(e.message().contains("saturated"), "{}", e.message());
                assert!(took < Duration::from_millis(900), "rejection took {took:?}");
                exhausted += 1;
            }
            Code::DeadlineExceeded | Code::Cancelled => deadline += 1,
            other => panic!("unexpected {other:?}: {}", e.message()),
        }
    }
    assert!(
        exhausted >= 5,
        "only {exhausted} of 10 rejected ({deadline} timed out)"
    );
    assert!(deadline >= 1, "the running call should time out");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn sessions_are_created_on_demand_and_end_when_idle() {
    let (server, _probe, _dir) = server(
        r#"
[sessions]
idle_timeout = "200ms"
"#,
    )
    .await;
    let mut c = server.client().await.unwrap();
    let admin = Admin::new(server.http_url());
    let tree_has = |name: &'static str| {
        let admin = admin.clone();
        async move {
            let body = admin.get_text("/v1/actors").await;
            body.contains(&format!("\"{name}\""))
        }
    };
    assert!(!tree_has("session:sleepy").await);
    c.get(as_client("sleepy", get("cache", "x"))).await.unwrap();
    assert!(
        tree_has("session:sleepy").await,
        "no session actor for the client"
    );
    // With no more requests the session ends and leaves the tree ...
    let gone = eventually(Duration::from_secs(5), || async {
        !tree_has("session:sleepy").await
    })
    .await;
    assert!(gone, "idle session never ended");
    // ... and the next request opens a new one.
    c.get(as_client("sleepy", get("cache", "x"))).await.unwrap();
    assert!(tree_has("session:sleepy").await);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn clients_past_max_sessions_get_resource_exhausted() {
    let (server, _probe, _dir) = server(
        r#"
[sessions]
max_sessions = 1
"#,
    )
    .await;
    let mut c = server.client().await.unwrap();
    c.get(as_client("first", get("cache", "x"))).await.unwrap();
    let e = c
        .get(as_client("second", get("cache", "x")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("max_sessions"), "{}", e.message());
    // The admitted client keeps working.
    c.get(as_client("first", get("cache", "x"))).await.unwrap();
    server.stop().await.unwrap();
}
