//! Scale-out: a namespace on Redis Cluster spreads over every master and
//! scans it exactly; several Prism instances over one database purge one
//! at a time, and another takes over when the purger stops; a master
//! killed under load fails requests only while the cluster fails over.
//!
//! The cluster tests run on throwaway clusters (three masters, one replica
//! each) started by `common::cluster`.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deadpool_redis::redis as client;
use prism::backend::postgres::{PostgresConfig, PostgresConnector};
use prism::backend::redis::{RedisConfig, RedisConnector};
use prism::backend::redis_cluster::{shard_tag, RedisClusterConfig, RedisClusterConnector};
use prism::backend::{Backend, Connector, Error, Op, Outcome};
use tokio::time::Instant;

use common::cluster::{self, ThrowawayCluster};
use common::db;

fn cluster_connector(urls: Vec<String>, prefix: &str) -> RedisClusterConnector {
    RedisClusterConnector::new(RedisClusterConfig {
        urls,
        key_prefix: prefix.into(),
        max_size: 8,
        ..RedisClusterConfig::default()
    })
    .expect("redis cluster config")
}

async fn shared_cluster() -> &'static ThrowawayCluster {
    tokio::task::spawn_blocking(cluster::shared)
        .await
        .expect("start the shared cluster")
}

async fn put(b: &dyn Backend, ns: &str, key: &str, ttl: Option<Duration>) -> Result<(), Error> {
    let op = Op::Put {
        key: key.into(),
        value: Bytes::from(key.to_owned()),
        ttl,
    };
    match b.exec(ns, op).await? {
        Outcome::Put => Ok(()),
        other => panic!("put answered {other:?}"),
    }
}

async fn get(b: &dyn Backend, ns: &str, key: &str) -> Result<Option<Bytes>, Error> {
    match b.exec(ns, Op::Get { key: key.into() }).await? {
        Outcome::Get(record) => Ok(record.map(|r| r.value)),
        other => panic!("get answered {other:?}"),
    }
}

/// Puts `keys` with `concurrency` writers.
async fn put_all(b: &Arc<dyn Backend>, ns: &str, keys: Vec<String>, concurrency: usize) {
    let keys = Arc::new(keys);
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let (b, keys, ns) = (b.clone(), keys.clone(), ns.to_owned());
        writers.spawn(async move {
            for key in keys.iter().skip(w).step_by(concurrency) {
                put(&*b, &ns, key, None).await.expect("put");
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.expect("writer");
    }
}

/// Keys under `pattern` on one node (not the cluster).
async fn keys_on_node(port: u16, pattern: &str) -> Vec<String> {
    let node = client::Client::open(format!("redis://127.0.0.1:{port}")).expect("node url");
    let mut conn = node
        .get_multiplexed_async_connection()
        .await
        .expect("connect to node");
    client::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut conn)
        .await
        .expect("keys")
}

#[tokio::test]
async fn a_namespace_spreads_over_every_master() {
    let cluster = shared_cluster().await;
    let prefix = db::unique_name("prism-spread");
    let b = cluster_connector(cluster.urls(), &prefix)
        .connect()
        .await
        .expect("connect");
    let keys: Vec<String> = (0..400).map(|i| format!("user/{i}")).collect();
    put_all(&b, "spread", keys.clone(), 16).await;

    let masters = cluster.masters().expect("masters");
    assert_eq!(masters.len(), 3, "{masters:?}");
    let mut seen = BTreeSet::new();
    for port in &masters {
        let here = keys_on_node(*port, &format!("{prefix}:*:v:*")).await;
        assert!(
            here.len() > 20,
            "master {port} holds {} of the namespace's 400 keys",
            here.len()
        );
        seen.extend(here);
    }
    assert_eq!(seen.len(), keys.len(), "every key is on exactly one master");
    // Each shard's value keys and index share a slot.
    let tag = shard_tag("spread", 3);
    let slot = |key: String| {
        let port = masters[0];
        async move {
            cluster::cli(port, &["CLUSTER", "KEYSLOT", &key])
                .expect("keyslot")
                .trim()
                .to_owned()
        }
    };
    assert_eq!(
        slot(format!("{prefix}:{{{tag}}}:idx")).await,
        slot(format!("{prefix}:{{{tag}}}:v:anything")).await
    );
    b.close().await;
}

#[tokio::test]
async fn a_scan_across_all_shards_sees_5000_keys_in_order_under_concurrent_writes() {
    let cluster = shared_cluster().await;
    let prefix = db::unique_name("prism-scan");
    let b = cluster_connector(cluster.urls(), &prefix)
        .connect()
        .await
        .expect("connect");
    let stable: Vec<String> = (0..5000).map(|i| format!("k/{i:05}")).collect();
    put_all(&b, "ns", stable.clone(), 32).await;

    // Writers put and delete other keys between the stable ones (and
    // before and after them) while the scan pages through.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4u64 {
        let (b, stop, writes) = (b.clone(), stop.clone(), writes.clone());
        writers.spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("k/{:05}/w{w}", (i * 7919) % 5001);
                put(&*b, "ns", &key, None).await.expect("writer put");
                if i % 2 == 0 {
                    let _ = b.exec("ns", Op::Delete { key }).await.expect("delete");
                }
                writes.fetch_add(1, Ordering::Relaxed);
                i += 4;
            }
        });
    }

    let mut after: Option<String> = None;
    let mut returned: Vec<String> = Vec::new();
    loop {
        let op = Op::Scan {
            prefix: "k/".into(),
            after: after.clone(),
            limit: 97,
            max_bytes: usize::MAX,
            keys_only: true,
        };
        let Outcome::Scan { items, more } = b.exec("ns", op).await.expect("scan") else {
            panic!("not a scan page");
        };
        assert!(items.len() == 97 || !more, "a short page says more");
        if let Some(last) = items.last() {
            after = Some(last.key.clone());
        }
        returned.extend(items.into_iter().map(|i| i.key));
        if !more {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    while let Some(done) = writers.join_next().await {
        done.expect("writer");
    }
    assert!(writes.load(Ordering::Relaxed) > 0, "the writers wrote");
    assert!(
        returned
            .windows(2)
            .all(|w| w[0].as_bytes() < w[1].as_bytes()),
        "keys out of order or repeated"
    );
    let stable_seen: Vec<&String> = returned.iter().filter(|k| !k.contains("/w")).collect();
    assert_eq!(stable_seen.len(), stable.len(), "a stable key is missing");
    assert!(stable_seen.iter().zip(&stable).all(|(a, b)| *a == b));
    b.close().await;
}

/// Two instances over one store: only the one holding the purge lease or
/// lock purges; closing it hands over at the other's next purge, and when
/// it stops without closing, the other takes over within `takeover`.
async fn instances_purge_one_at_a_time(
    connect: impl Fn() -> Arc<dyn Connector>,
    takeover: Duration,
) {
    let a = connect().connect().await.expect("connect a");
    let b = connect().connect().await.expect("connect b");
    put(&*a, "ns", "dies", Some(Duration::from_millis(50)))
        .await
        .expect("put");
    put(&*a, "ns", "lives", None).await.expect("put");
    let gone = prism::testing::eventually(Duration::from_secs(5), || async {
        get(&*a, "ns", "dies").await.expect("get").is_none()
    })
    .await;
    assert!(gone, "the key never expired");

    // a purges first and takes the lease; b then leaves it to a.
    assert_eq!(a.purge_expired().await.expect("purge a"), 1);
    assert_eq!(a.purge_leader(), Some(true));
    assert_eq!(b.purge_expired().await.expect("purge b"), 0);
    assert_eq!(b.purge_leader(), Some(false));
    assert_eq!(a.purge_expired().await.expect("purge a"), 0);
    assert_eq!(a.purge_leader(), Some(true), "the holder keeps the lease");
    assert_eq!(b.purge_expired().await.expect("purge b"), 0);
    assert_eq!(b.purge_leader(), Some(false));

    // a closes (a stopping instance): b takes over at its next purge.
    a.close().await;
    drop(a);
    b.purge_expired().await.expect("purge b");
    assert_eq!(b.purge_leader(), Some(true), "b did not take over");

    // A third instance stays standby while b holds the lease; b then stops
    // without closing (a crash): c takes over within the takeover time.
    let c = connect().connect().await.expect("connect c");
    c.purge_expired().await.expect("purge c");
    assert_eq!(c.purge_leader(), Some(false));
    let stopped = Instant::now();
    drop(b);
    loop {
        c.purge_expired().await.expect("purge c");
        if c.purge_leader() == Some(true) {
            break;
        }
        assert!(
            stopped.elapsed() < takeover + Duration::from_secs(2),
            "no takeover within {takeover:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.close().await;
}

const LEASE: Duration = Duration::from_secs(2);

#[tokio::test]
async fn redis_instances_purge_one_at_a_time_and_take_over() {
    let prefix = db::unique_name("prism-lease");
    let _cleanup = {
        let prefix = prefix.clone();
        prism::testing::Cleanup::new(move || async move {
            db::delete_keys(&db::redis_url(), &prefix).await;
        })
    };
    let connect = || -> Arc<dyn Connector> {
        Arc::new(
            RedisConnector::new(RedisConfig {
                url: db::redis_url(),
                key_prefix: prefix.clone(),
                max_size: 4,
                ..RedisConfig::default()
            })
            .expect("redis config")
            .with_purge_lease(LEASE),
        )
    };
    instances_purge_one_at_a_time(connect, LEASE).await;
}

#[tokio::test]
async fn redis_cluster_instances_purge_one_at_a_time_and_take_over() {
    let cluster = shared_cluster().await;
    let prefix = db::unique_name("prism-lease");
    let connect = || -> Arc<dyn Connector> {
        Arc::new(cluster_connector(cluster.urls(), &prefix).with_purge_lease(LEASE))
    };
    instances_purge_one_at_a_time(connect, LEASE).await;
}

#[tokio::test]
async fn postgres_instances_purge_one_at_a_time_and_take_over() {
    let table = db::unique_name("prism_purge");
    let _drop = db::DropTable(table.clone());
    let connect = || -> Arc<dyn Connector> {
        Arc::new(
            PostgresConnector::new(PostgresConfig {
                url: db::postgres_url(),
                table: table.clone(),
                max_connections: 4,
                min_connections: 1,
                ..PostgresConfig::default()
            })
            .expect("postgres config"),
        )
    };
    // The lock is a session's: it goes when the session ends, which the
    // server sees as soon as the connection closes.
    instances_purge_one_at_a_time(connect, Duration::from_secs(3)).await;
}

/// What one writer saw: its acknowledged keys, and when its requests
/// failed.
#[derive(Default)]
struct WriterLog {
    acknowledged: Vec<String>,
    /// When requests were answered UNAVAILABLE.
    failures: Vec<Instant>,
    /// Requests past their deadline (also while the machine is busy).
    timeouts: usize,
    last_success: Option<Instant>,
    last_error: Option<String>,
}

#[tokio::test]
async fn a_master_killed_under_load_fails_requests_only_during_failover() {
    let mut cluster = tokio::task::spawn_blocking(ThrowawayCluster::start)
        .await
        .expect("task")
        .expect("start a redis cluster");
    let prefix = db::unique_name("prism-failover");
    let b = RedisClusterConnector::new(RedisClusterConfig {
        urls: cluster.urls(),
        key_prefix: prefix,
        max_size: 8,
        command_timeout: Duration::from_secs(1),
        ..RedisClusterConfig::default()
    })
    .expect("config")
    .connect()
    .await
    .expect("connect");

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..8 {
        let (b, stop) = (b.clone(), stop.clone());
        writers.spawn(async move {
            let mut log = WriterLog::default();
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("w{w}/{n:06}");
                n += 1;
                let deadline = Instant::now() + Duration::from_secs(1);
                let op = Op::Put {
                    key: key.clone(),
                    value: Bytes::from(key.clone()),
                    ttl: None,
                };
                match b.exec_until("ns", op, deadline).await {
                    Ok(Outcome::Put) => {}
                    Ok(other) => panic!("put answered {other:?}"),
                    Err(e @ (Error::Unavailable(_) | Error::Timeout)) => {
                        if matches!(e, Error::Timeout) {
                            log.timeouts += 1;
                        } else {
                            log.failures.push(Instant::now());
                        }
                        log.last_error = Some(e.chain().to_string());
                        // Back off a little while the cluster fails over.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    Err(e) => panic!("a put failed with {}", e.chain()),
                }
                log.acknowledged.push(key.clone());
                // Read an acknowledged key back: right value or an error.
                let deadline = Instant::now() + Duration::from_secs(1);
                match b
                    .exec_until("ns", Op::Get { key: key.clone() }, deadline)
                    .await
                {
                    Ok(Outcome::Get(Some(r))) => assert_eq!(r.value, key.as_bytes(), "wrong value"),
                    Ok(other) => panic!("an acknowledged key read back as {other:?}"),
                    Err(e @ (Error::Unavailable(_) | Error::Timeout)) => {
                        if matches!(e, Error::Timeout) {
                            log.timeouts += 1;
                        } else {
                            log.failures.push(Instant::now());
                        }
                        log.last_error = Some(e.chain().to_string());
                        continue;
                    }
                    Err(e) => panic!("a get failed with {}", e.chain()),
                }
                log.last_success = Some(Instant::now());
            }
            log
        });
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    let masters = cluster.masters().expect("masters");
    let victim = masters[0];
    let killed = Instant::now();
    cluster.kill(victim).expect("kill a master");
    let cluster = tokio::task::spawn_blocking(move || {
        cluster
            .wait_until_ok(Duration::from_secs(30))
            .map(|()| cluster)
    })
    .await
    .expect("task")
    .expect("the cluster failed over");
    let failed_over = killed.elapsed();
    // Requests keep running against the promoted replica for a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut logs = Vec::new();
    while let Some(log) = writers.join_next().await {
        logs.push(log.expect("writer"));
    }

    let recovered = Instant::now() - Duration::from_secs(1);
    let failures: Vec<Instant> = logs.iter().flat_map(|l| l.failures.clone()).collect();
    for log in &logs {
        assert!(
            log.last_success.is_some_and(|t| t > recovered),
            "a writer had not recovered a second before the end; last error: {:?}",
            log.last_error
        );
    }
    let timeouts: usize = logs.iter().map(|l| l.timeouts).sum();
    if let (Some(first), Some(last)) = (failures.iter().min(), failures.iter().max()) {
        assert!(
            *first >= killed,
            "requests were unavailable before the kill"
        );
        let window = *last - killed;
        assert!(
            window < failed_over + Duration::from_secs(3),
            "requests failed for {window:?}, the failover took {failed_over:?}"
        );
        eprintln!(
            "failover {failed_over:?}; {} unavailable requests within {window:?}; {timeouts} timeouts",
            failures.len()
        );
    }

    // Every acknowledged write reads back after the failover.
    let acknowledged: Vec<String> = logs.into_iter().flat_map(|l| l.acknowledged).collect();
    assert!(
        acknowledged.len() > 100,
        "too little load: {}",
        acknowledged.len()
    );
    let mut lost = Vec::new();
    for key in &acknowledged {
        if get(&*b, "ns", key)
            .await
            .expect("get after failover")
            .is_none()
        {
            lost.push(key.clone());
        }
    }
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    b.close().await;
    drop(cluster);
}

#[test]
fn redis_cluster_settings_are_parsed_and_bounded() {
    // The shipped defaults, plus a backend and a namespace.
    let defaults = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/settings/default.toml"
    ))
    .expect("settings/default.toml");
    let section = |extra: &str| {
        format!(
            "{defaults}\n[backends.c]\nkind = \"redis_cluster\"\nurls = [\"redis://127.0.0.1:7000\", \"redis://127.0.0.1:7001\"]\n{extra}\n\
             [namespaces.n]\nbackend = \"c\"\n"
        )
    };
    let s = prism::Settings::from_toml(&section("shards = 64")).expect("valid settings");
    let b = &s.backends["c"];
    assert_eq!(b.kind_name(), "redis_cluster");
    assert_eq!(b.pool.pool_size, 16);
    let prism::settings::BackendKind::RedisCluster(c) = &b.kind else {
        panic!("{:?}", b.kind);
    };
    assert_eq!(
        (c.shards, c.urls.len(), c.key_prefix.as_str()),
        (64, 2, "prism")
    );

    for (extra, key) in [
        ("shards = 0", "backends.c.shards"),
        ("shards = 1025", "backends.c.shards"),
        ("key_prefix = \"a{b\"", "backends.c.key_prefix"),
        ("url = \"redis://127.0.0.1:6379\"", "backends.c.url"),
    ] {
        let e = prism::Settings::from_toml(&section(extra)).expect_err(extra);
        assert!(e.to_string().contains(key), "{extra}: {e}");
    }
    let e = prism::Settings::from_toml(&format!(
        "{defaults}\n[backends.c]\nkind = \"redis_cluster\"\nurls = []\n[namespaces.n]\nbackend = \"c\"\n"
    ))
    .expect_err("no seed url");
    assert!(e.to_string().contains("backends.c.urls"), "{e}");
}
