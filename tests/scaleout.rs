//! Two Prism instances (real `prism serve` processes) over one database:
//! what one writes the other reads and scans, and a client balanced over
//! both loses no acknowledged write when one instance is killed (SIGKILL)
//! under load, while the survivor keeps answering. Over PostgreSQL and
//! over the Redis Cluster of `common::cluster`.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prism::client::{Client, ClientOptions};
use prism::proto::ScanRequest;
use tokio::time::Instant;

use common::binary::Prism;
use common::cluster;
use common::db::{postgres_url, unique_name, DropTable};

/// The bound of each test.
const PATIENCE: Duration = Duration::from_secs(55);

const NAMESPACE: &str = "shared";

/// Settings of one instance with `backend` (a `[backends.shared]` body)
/// behind the namespace `shared`.
fn instance_settings(backend: &str) -> String {
    format!(
        r#"
[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
shutdown_grace = "5s"
drain_delay = "0s"

[backends.shared]
{backend}

[namespaces.{NAMESPACE}]
backend = "shared"
"#
    )
}

fn postgres_backend(table: &str) -> String {
    format!(
        "kind = \"postgres\"\nurl = \"{}\"\ntable = \"{table}\"\npool_size = 4\nmin_connections = 1\n",
        postgres_url()
    )
}

fn cluster_backend(prefix: &str) -> String {
    let urls: Vec<String> = cluster::shared()
        .urls()
        .iter()
        .map(|u| format!("{u:?}"))
        .collect();
    format!(
        "kind = \"redis_cluster\"\nurls = [{}]\nkey_prefix = \"{prefix}\"\npool_size = 4\n",
        urls.join(", ")
    )
}

/// A running instance and its settings directory.
struct Instance {
    prism: Prism,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Instance {
    async fn start(settings: &str) -> Self {
        let dir = common::settings_dir(settings);
        let mut prism = Prism::serve(dir.path());
        let addr = prism.grpc_addr().await;
        Instance {
            prism,
            addr,
            _dir: dir,
        }
    }

    /// SIGKILL, then reap.
    async fn kill(&mut self) {
        let ok = Command::new("kill")
            .args(["-KILL", &self.prism.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -KILL {}", self.prism.id());
        let status = self.prism.wait_exit(Duration::from_secs(10)).await;
        assert!(!status.success(), "killed, not exited: {status:?}");
    }
}

/// Two instances over the same backend, the second started once the first
/// serves (so one of them creates the table or index).
async fn two_instances(settings: &str) -> (Instance, Instance) {
    let a = Instance::start(settings).await;
    let b = Instance::start(settings).await;
    (a, b)
}

async fn client(addr: &str) -> Client {
    Client::connect(&ClientOptions {
        addr: addr.to_owned(),
        timeout: Some(Duration::from_secs(5)),
        ..ClientOptions::default()
    })
    .await
    .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(PATIENCE, test)
        .await
        .unwrap_or_else(|_| panic!("the test took more than {PATIENCE:?}"));
}

/// Writes through `a`, reads and scans through `b`, and back.
async fn writes_through_one_are_read_through_the_other(settings: &str) {
    let (a, b) = two_instances(settings).await;
    let (via_a, via_b) = (
        client(&a.addr.to_string()).await,
        client(&b.addr.to_string()).await,
    );
    let keys: Vec<String> = (0..40).map(|i| format!("cross/{i:03}")).collect();
    for key in &keys {
        via_a
            .put(NAMESPACE, key, Bytes::from(format!("v-{key}")), None)
            .await
            .unwrap_or_else(|e| panic!("put {key} via a: {e}"));
    }
    for key in &keys {
        let got = via_b.get(NAMESPACE, key).await.expect("get via b");
        assert!(got.found, "{key} written via a is not found via b");
        assert_eq!(got.value, format!("v-{key}").as_bytes());
    }
    let scanned = scan_all(&via_b, "cross/").await;
    assert_eq!(scanned, keys.iter().cloned().collect::<BTreeSet<_>>());

    assert!(via_b
        .delete(NAMESPACE, &keys[0])
        .await
        .expect("delete via b"));
    assert!(
        !via_a
            .exists(NAMESPACE, &keys[0])
            .await
            .expect("exists via a"),
        "deleted via b, still there via a"
    );
}

/// Every key under `prefix`, following cursors.
async fn scan_all(client: &Client, prefix: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut cursor = String::new();
    loop {
        let page = client
            .scan(ScanRequest {
                namespace: NAMESPACE.into(),
                prefix: prefix.into(),
                limit: 7,
                cursor: cursor.clone(),
                keys_only: true,
            })
            .await
            .expect("scan");
        for item in page.items {
            assert!(keys.insert(item.key.clone()), "{} scanned twice", item.key);
        }
        if page.next_cursor.is_empty() {
            return keys;
        }
        cursor = page.next_cursor;
    }
}

/// Writers put distinct keys through a client balanced over both
/// instances; one instance is killed mid-way. Every acknowledged key must
/// be readable through the survivor, and the survivor must keep taking
/// writes after the kill.
async fn a_killed_instance_loses_no_acknowledged_write(settings: &str) {
    let (survivor, mut victim) = two_instances(settings).await;
    let balanced = client(&format!("{},{}", survivor.addr, victim.addr)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let failed = Arc::new(AtomicU64::new(0));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4 {
        let (client, stop, acked, failed) = (
            balanced.clone(),
            stop.clone(),
            acked.clone(),
            failed.clone(),
        );
        writers.spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("kill/{w}/{i:06}");
                i += 1;
                match client
                    .put(NAMESPACE, &key, Bytes::from(key.clone()), None)
                    .await
                {
                    Ok(()) => acked.lock().unwrap().push(key),
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    let acked_count = || acked.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(15);
    while acked_count() < 200 {
        assert!(
            Instant::now() < deadline,
            "writes through both are too slow"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    victim.kill().await;
    let at_kill = acked_count();
    let failed_at_kill = failed.load(Ordering::Relaxed);
    // The survivor keeps taking the load.
    let deadline = Instant::now() + Duration::from_secs(15);
    while acked_count() < at_kill + 300 {
        assert!(
            Instant::now() < deadline,
            "after the kill, only {} more writes were acknowledged",
            acked_count() - at_kill
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    while let Some(done) = writers.join_next().await {
        done.expect("writer");
    }
    let failures = failed.load(Ordering::Relaxed);
    eprintln!(
        "acknowledged {} writes ({at_kill} before the kill), {failures} failed ({} after the kill)",
        acked_count(),
        failures - failed_at_kill
    );

    // Every acknowledged write, read through the survivor alone.
    let direct = client(&survivor.addr.to_string()).await;
    let keys = acked.lock().unwrap().clone();
    for key in &keys {
        let got = direct
            .get(NAMESPACE, key)
            .await
            .expect("get via the survivor");
        assert!(got.found, "acknowledged write {key} is lost");
        assert_eq!(got.value, key.as_bytes(), "{key}");
    }
    // The balanced client still answers, through the survivor.
    for key in keys.iter().take(50) {
        let got = balanced.get(NAMESPACE, key).await.expect("balanced get");
        assert!(got.found, "{key}");
    }
}

#[tokio::test]
async fn postgres_writes_through_one_instance_are_read_through_the_other() {
    let table = unique_name("prism_scale");
    let _drop = DropTable(table.clone());
    let settings = instance_settings(&postgres_backend(&table));
    bounded(writes_through_one_are_read_through_the_other(&settings)).await;
}

#[tokio::test]
async fn postgres_killing_one_instance_loses_no_acknowledged_write() {
    let table = unique_name("prism_scale");
    let _drop = DropTable(table.clone());
    let settings = instance_settings(&postgres_backend(&table));
    bounded(a_killed_instance_loses_no_acknowledged_write(&settings)).await;
}

/// The shared cluster (its nodes die with the test process; each test
/// has a key prefix of its own).
async fn cluster_settings() -> String {
    let prefix = unique_name("scale");
    tokio::task::spawn_blocking(move || instance_settings(&cluster_backend(&prefix)))
        .await
        .expect("start the shared cluster")
}

#[tokio::test]
async fn redis_cluster_writes_through_one_instance_are_read_through_the_other() {
    let settings = cluster_settings().await;
    bounded(writes_through_one_are_read_through_the_other(&settings)).await;
}

#[tokio::test]
async fn redis_cluster_killing_one_instance_loses_no_acknowledged_write() {
    let settings = cluster_settings().await;
    bounded(a_killed_instance_loses_no_acknowledged_write(&settings)).await;
}
