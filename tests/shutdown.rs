//! The real binary under SIGTERM and SIGINT: the drain keeps every
//! acknowledged write, and a second signal ends a drain at once.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::binary::{Prism, Signal};
use common::db::{gateway_waits_for_a_lock, postgres_url, unique_name, DropTable, RowLock};
use common::http::Admin;
use common::requests::{connect, get, put, with_timeout};
use common::settings_dir;
use reqwest::StatusCode;

/// The first signal's drain, logged once it has begun.
const DRAINING: &str = "shutdown signal received, draining";

fn sqlite_settings(data: &Path) -> tempfile::TempDir {
    settings_dir(&format!(
        r#"
[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
shutdown_grace = "20s"

[backends.embedded]
kind = "sqlite"
path = "{}"

[namespaces.default]
backend = "embedded"
"#,
        data.join("prism.db").display()
    ))
}

#[tokio::test]
async fn sigterm_drains_and_every_acknowledged_put_survives_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let dir = sqlite_settings(data.path());

    let mut prism = Prism::serve(dir.path());
    let client = connect(prism.grpc_addr().await).await.unwrap();

    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let (first_acks_tx, mut first_acks_rx) = tokio::sync::mpsc::channel::<()>(64);
    let mut writers = Vec::new();
    for w in 0..16 {
        let mut c = client.clone();
        let acked = acked.clone();
        let tx = first_acks_tx.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..100_000u32 {
                let key = format!("w{w}/{i}");
                match c.put(put("default", &key, key.as_bytes(), 0)).await {
                    Ok(_) => {
                        acked.lock().unwrap().insert(key);
                        let _ = tx.try_send(());
                    }
                    // Refused once the drain has begun: stop writing.
                    Err(_) => return i,
                }
            }
            100_000
        }));
    }
    drop(first_acks_tx);
    // Let writes flow, then signal while requests are in flight.
    for _ in 0..50 {
        first_acks_rx.recv().await.expect("writers acknowledged");
    }
    prism.signal(Signal::Term);
    let status = prism.wait_exit(Duration::from_secs(25)).await;
    assert_eq!(status.code(), Some(0), "prism exit status {status:?}");
    assert!(prism.logged(DRAINING), "log:\n{}", prism.log_text());
    for w in writers {
        w.await.unwrap();
    }
    let acked: Vec<String> = acked.lock().unwrap().iter().cloned().collect();
    assert!(
        acked.len() >= 50,
        "only {} writes acknowledged",
        acked.len()
    );

    // Restart on the same file: every acknowledged write is there.
    let mut prism = Prism::serve(dir.path());
    let mut c = connect(prism.grpc_addr().await).await.unwrap();
    let mut missing = Vec::new();
    for key in &acked {
        let r = c.get(get("default", key)).await.unwrap().into_inner();
        if !r.found || r.value != key.as_bytes() {
            missing.push(key.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes lost: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
    prism.signal(Signal::Int);
    let status = prism.wait_exit(Duration::from_secs(25)).await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_while_a_request_is_still_in_flight() {
    let table = unique_name("prism_sig");
    let _cleanup = DropTable(table.clone());
    let dir = settings_dir(&format!(
        r#"
[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
shutdown_grace = "60s"

[backends.pg]
kind = "postgres"
url = "{}"
table = "{table}"
pool_size = 2
min_connections = 1

[namespaces.pg]
backend = "pg"
timeout = "60s"
"#,
        postgres_url()
    ));
    let mut prism = Prism::serve(dir.path());
    let mut client = connect(prism.grpc_addr().await).await.unwrap();
    let admin = Admin::new(format!("http://{}", prism.http_addr().await));
    client.put(put("pg", "locked", b"v", 0)).await.unwrap();

    // Hold the row's lock in another transaction, so that an overwrite
    // through Prism stays in flight.
    let lock = RowLock::take(&postgres_url(), &table, "pg", "locked")
        .await
        .unwrap();
    let mut blocked_client = client.clone();
    let blocked = tokio::spawn(async move {
        let req = with_timeout(put("pg", "locked", b"v", 0), Duration::from_secs(60));
        blocked_client.put(req).await
    });
    assert!(
        gateway_waits_for_a_lock(&postgres_url(), Duration::from_secs(5)).await,
        "the overwrite never waited for the lock"
    );

    // The first signal begins a drain that waits for the request ...
    prism.signal(Signal::Term);
    prism.wait_for(DRAINING, Duration::from_secs(10)).await;
    assert!(
        admin.becomes_unready(Duration::from_secs(5)).await,
        "readiness never turned 503 during the drain"
    );
    let (status, body) = admin.get_json("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["draining"], true, "{body}");
    assert!(
        gateway_waits_for_a_lock(&postgres_url(), Duration::ZERO).await,
        "the request is no longer in flight"
    );
    assert!(
        !prism.has_exited(),
        "prism exited although a request was in flight; log:\n{}",
        prism.log_text()
    );
    // ... the second one ends the process at once.
    let started = std::time::Instant::now();
    prism.signal(Signal::Term);
    let status = prism.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        prism.logged("second signal; exiting without finishing the drain"),
        "log:\n{}",
        prism.log_text()
    );
    assert!(
        !prism.logged("prism stopped"),
        "the drain finished on its own; log:\n{}",
        prism.log_text()
    );
    assert!(
        blocked.await.unwrap().is_err(),
        "the cut-off request cannot have succeeded"
    );
    lock.release().await;
}
