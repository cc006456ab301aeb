//! The real binary under SIGTERM: the drain keeps every acknowledged write.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prism::proto::key_value_client::KeyValueClient;
use prism::proto::{GetRequest, PutRequest};
use tonic::transport::Channel;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn write_settings(dir: &Path, port: u16) {
    let db = dir.join("data").join("prism.db");
    std::fs::write(
        dir.join("default.toml"),
        format!(
            r#"
[server]
grpc_addr = "127.0.0.1:{port}"
http_addr = "127.0.0.1:0"
shutdown_grace = "20s"

[backends.embedded]
kind = "sqlite"
path = "{}"

[namespaces.default]
backend = "embedded"
"#,
            db.display()
        ),
    )
    .expect("write settings");
}

struct Prism(Child);

impl Prism {
    fn start(settings: &Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_prism"))
            .arg("--settings")
            .arg(settings)
            .arg("serve")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn prism");
        Prism(child)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.0.id().to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "prism did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Prism {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn connect(port: u16) -> KeyValueClient<Channel> {
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..500 {
        if let Ok(ch) = Channel::from_shared(url.clone()).unwrap().connect().await {
            return KeyValueClient::new(ch);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("prism never accepted connections on {url}");
}

#[tokio::test]
async fn sigterm_drains_and_every_acknowledged_put_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    write_settings(dir.path(), port);

    let mut prism = Prism::start(dir.path());
    let client = connect(port).await;

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
                let req = PutRequest {
                    namespace: "default".into(),
                    key: key.clone(),
                    value: Bytes::from(key.clone().into_bytes()),
                    ttl_ms: 0,
                };
                match c.put(req).await {
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
    prism.signal("TERM");
    let status = prism.wait_exit(Duration::from_secs(25)).await;
    assert_eq!(status.code(), Some(0), "prism exit status {status:?}");
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
    let mut prism = Prism::start(dir.path());
    let mut c = connect(port).await;
    let mut missing = Vec::new();
    for key in &acked {
        let r = c
            .get(GetRequest {
                namespace: "default".into(),
                key: key.clone(),
            })
            .await
            .unwrap()
            .into_inner();
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
    prism.signal("INT");
    let status = prism.wait_exit(Duration::from_secs(25)).await;
    assert_eq!(status.code(), Some(0));
}

fn postgres_url() -> String {
    std::env::var("PRISM_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Drops the test's table even when the test fails.
struct DropTable(String);

impl Drop for DropTable {
    fn drop(&mut self) {
        let table = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(pool) = sqlx::PgPool::connect(&postgres_url()).await {
                    for t in [table.clone(), format!("{table}_schema_version")] {
                        let _ = sqlx::query(&format!("DROP TABLE IF EXISTS \"{t}\""))
                            .execute(&pool)
                            .await;
                    }
                }
            });
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_while_a_request_is_still_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let table = format!("prism_sig_{}", std::process::id());
    let _cleanup = DropTable(table.clone());
    std::fs::write(
        dir.path().join("default.toml"),
        format!(
            r#"
[server]
grpc_addr = "127.0.0.1:{port}"
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
        ),
    )
    .unwrap();
    let mut prism = Prism::start(dir.path());
    let mut client = connect(port).await;
    let put = |key: &str| PutRequest {
        namespace: "pg".into(),
        key: key.into(),
        value: Bytes::from_static(b"v"),
        ttl_ms: 0,
    };
    client.put(put("locked")).await.unwrap();

    // Hold the row's lock in another transaction, so that an overwrite
    // through Prism stays in flight.
    let pool = sqlx::PgPool::connect(&postgres_url()).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(&format!(
        "SELECT 1 FROM \"{table}\" WHERE namespace = 'pg' AND key = 'locked' FOR UPDATE"
    ))
    .execute(&mut *tx)
    .await
    .unwrap();
    let mut blocked_client = client.clone();
    let blocked = tokio::spawn(async move {
        let mut req = tonic::Request::new(put("locked"));
        req.set_timeout(Duration::from_secs(60));
        blocked_client.put(req).await
    });
    let mut waiting = false;
    for _ in 0..500 {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND application_name = 'prism'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if n > 0 {
            waiting = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(waiting, "the overwrite never waited for the lock");

    // The first signal begins a drain that waits for the request ...
    prism.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        prism.0.try_wait().unwrap().is_none(),
        "prism exited although a request was in flight"
    );
    // ... the second one ends the process at once.
    let started = std::time::Instant::now();
    prism.signal("TERM");
    let status = prism.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        blocked.await.unwrap().is_err(),
        "the cut-off request cannot have succeeded"
    );
    tx.rollback().await.unwrap();
    pool.close().await;
}
