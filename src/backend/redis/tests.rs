//! Tests of the redis backend against the real server.
use std::time::Duration;

use bytes::Bytes;
use deadpool_redis::redis::{self, aio::MultiplexedConnection, Value};
use tokio::time::Instant;

use super::{ns_tag, RedisBackend, RedisConfig, RedisConnector};
use crate::backend::{Backend, Connector, Error, Op, Outcome};
use crate::testing::Cleanup;

/// The test server; `PRISM_TEST_REDIS_URL` overrides it. Tests fail
/// (never skip) when it is not up.
fn url() -> String {
    std::env::var("PRISM_TEST_REDIS_URL").unwrap_or_else(|_| RedisConfig::default().url)
}

/// A key prefix no other test (or test run) uses.
fn unique_prefix() -> String {
    format!("prism-test-{}", crate::testing::unique_suffix())
}

fn config(prefix: &str) -> RedisConfig {
    RedisConfig {
        url: url(),
        max_size: 4,
        key_prefix: prefix.into(),
        ..RedisConfig::default()
    }
}

async fn admin() -> MultiplexedConnection {
    redis::Client::open(url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test redis")
}

/// Every key under `prefix`.
async fn keys_under(conn: &mut MultiplexedConnection, prefix: &str) -> Vec<String> {
    let mut cursor = 0u64;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("scan");
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// Deletes a test's keys when the test ends, passed or failed.
struct DropKeys {
    prefix: String,
    _cleanup: Cleanup,
}

impl DropKeys {
    fn new(prefix: &str) -> Self {
        let under = prefix.to_owned();
        let cleanup = Cleanup::new(move || async move {
            let Ok(client) = redis::Client::open(url()) else {
                return;
            };
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                return;
            };
            let keys = keys_under(&mut conn, &under).await;
            for chunk in keys.chunks(500) {
                let _: Result<i64, _> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
            }
        });
        DropKeys {
            prefix: prefix.to_owned(),
            _cleanup: cleanup,
        }
    }
}

async fn fresh_concrete() -> (RedisBackend, DropKeys) {
    let prefix = unique_prefix();
    let guard = DropKeys::new(&prefix);
    let backend = RedisConnector::new(config(&prefix))
        .expect("valid config")
        .open()
        .await
        .expect("connect to the test redis (is it running?)");
    (backend, guard)
}

async fn put(b: &dyn Backend, ns: &str, key: &str, ttl: Option<Duration>) {
    let op = Op::Put {
        key: key.into(),
        value: Bytes::from_static(b"v"),
        ttl,
    };
    assert_eq!(b.exec(ns, op).await.expect("put"), Outcome::Put);
}

async fn scan_keys(b: &dyn Backend, ns: &str, limit: usize) -> (Vec<String>, bool) {
    let op = Op::Scan {
        prefix: String::new(),
        after: None,
        limit,
        max_bytes: usize::MAX,
        keys_only: true,
    };
    match b.exec(ns, op).await.expect("scan") {
        Outcome::Scan { items, more } => (items.into_iter().map(|i| i.key).collect(), more),
        other => panic!("{other:?}"),
    }
}

async fn wait_until_gone(b: &dyn Backend, ns: &str, key: &str) {
    let patience = Instant::now() + Duration::from_secs(10);
    loop {
        match b.exec(ns, Op::Exists { key: key.into() }).await {
            Ok(Outcome::Exists(false)) => return,
            Ok(Outcome::Exists(true)) => {}
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < patience, "{ns}/{key} never expired");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn index(b: &RedisBackend, ns: &str) -> Vec<String> {
    let mut conn = admin().await;
    redis::cmd("ZRANGE")
        .arg(b.index_key(ns))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .expect("zrange")
}

const SHORT: Duration = Duration::from_millis(200);

#[tokio::test]
async fn the_index_stays_consistent_through_expiry_and_purge() {
    let (b, _guard) = fresh_concrete().await;
    put(&b, "ns", "a", None).await;
    put(&b, "ns", "b", Some(SHORT)).await;
    put(&b, "ns", "c", Some(SHORT)).await;
    put(&b, "ns", "d", None).await;
    assert_eq!(index(&b, "ns").await, ["a", "b", "c", "d"]);
    wait_until_gone(&b, "ns", "b").await;
    wait_until_gone(&b, "ns", "c").await;
    // Expired values are gone; their index entries wait for a purge.
    assert_eq!(index(&b, "ns").await, ["a", "b", "c", "d"]);
    assert_eq!(b.purge_expired().await.expect("purge"), 2);
    assert_eq!(index(&b, "ns").await, ["a", "d"]);
    assert_eq!(b.purge_expired().await.expect("purge"), 0);

    // A scan steps over an expired entry and removes it on the way.
    put(&b, "ns", "e", Some(SHORT)).await;
    wait_until_gone(&b, "ns", "e").await;
    assert_eq!(
        scan_keys(&b, "ns", 10).await,
        (vec!["a".into(), "d".into()], false)
    );
    assert_eq!(index(&b, "ns").await, ["a", "d"]);

    // Writing an expired key again indexes it again; deleting unindexes.
    put(&b, "ns", "b", None).await;
    assert_eq!(index(&b, "ns").await, ["a", "b", "d"]);
    assert_eq!(
        b.exec("ns", Op::Delete { key: "a".into() })
            .await
            .expect("delete"),
        Outcome::Delete(true)
    );
    assert_eq!(index(&b, "ns").await, ["b", "d"]);
    assert_eq!(
        scan_keys(&b, "ns", 10).await,
        (vec!["b".into(), "d".into()], false)
    );
}

#[tokio::test]
async fn scan_steps_over_long_runs_of_expired_entries() {
    let (b, _guard) = fresh_concrete().await;
    // More expired entries in a row than one script call may examine.
    let stale = 2 * super::SCAN_STALE_BUDGET + 500;
    let ttl = Some(Duration::from_millis(300));
    let mut conn = admin().await;
    // Written directly (one pipeline), in the layout the backend uses,
    // so that the test does not take thousands of round trips.
    let mut pipe = redis::pipe();
    for i in 0..stale {
        let key = format!("k/{i:05}");
        pipe.cmd("SET")
            .arg(b.value_prefix("ns") + &key)
            .arg("v")
            .arg("PX")
            .arg(300)
            .ignore();
        pipe.cmd("ZADD")
            .arg(b.index_key("ns"))
            .arg(0)
            .arg(&key)
            .ignore();
    }
    let () = pipe.query_async(&mut conn).await.expect("write stale keys");
    for key in ["k/99998", "k/99999", "l"] {
        put(&b, "ns", key, None).await;
    }
    put(&b, "ns", "k/0000-sentinel", ttl).await;
    wait_until_gone(&b, "ns", "k/0000-sentinel").await;
    wait_until_gone(&b, "ns", &format!("k/{:05}", stale - 1)).await;

    let (keys, more) = scan_keys(&b, "ns", 2).await;
    assert_eq!(keys, ["k/99998", "k/99999"]);
    assert!(more, "\"l\" follows");
    let (keys, more) = scan_keys(&b, "ns", 3).await;
    assert_eq!(keys, ["k/99998", "k/99999", "l"]);
    assert!(!more);
    // The scans cleaned the index as they went.
    assert_eq!(index(&b, "ns").await, ["k/99998", "k/99999", "l"]);
    assert_eq!(b.purge_expired().await.expect("purge"), 0);
}

#[tokio::test]
async fn purge_walks_every_namespace_in_batches() {
    let (b, _guard) = fresh_concrete().await;
    let stale = super::PURGE_BATCH * 2 + 7;
    let mut conn = admin().await;
    let mut pipe = redis::pipe();
    for i in 0..stale {
        // Index entries whose values are already gone.
        pipe.cmd("ZADD")
            .arg(b.index_key("big"))
            .arg(0)
            .arg(format!("k{i:05}"))
            .ignore();
    }
    let () = pipe.query_async(&mut conn).await.expect("write index");
    put(&b, "big", "live", None).await;
    put(&b, "small", "dies", Some(SHORT)).await;
    put(&b, "small", "lives", None).await;
    wait_until_gone(&b, "small", "dies").await;
    assert_eq!(
        b.purge_expired().await.expect("purge"),
        u64::try_from(stale + 1).expect("fits")
    );
    assert_eq!(index(&b, "big").await, ["live"]);
    assert_eq!(index(&b, "small").await, ["lives"]);
}

#[tokio::test]
async fn namespaces_with_braces_and_percent_signs_do_not_collide() {
    let (b, _guard) = fresh_concrete().await;
    // Naively spliced into `{ns}`, "x}:v:y" and "x" with key "y}:v:k"
    // would name the same value key.
    put(&b, "x}:v:y", "k", None).await;
    assert_eq!(
        b.exec(
            "x",
            Op::Exists {
                key: "y}:v:k".into()
            }
        )
        .await
        .expect("exists"),
        Outcome::Exists(false)
    );
    for ns in ["%7D", "}", "{", "%", "a{b}c"] {
        put(&b, ns, &format!("in {ns}"), None).await;
    }
    for ns in ["%7D", "}", "{", "%", "a{b}c"] {
        assert_eq!(scan_keys(&b, ns, 10).await.0, [format!("in {ns}")], "{ns}");
    }
    assert_eq!(ns_tag("a{b}c%"), "a%7Bb%7Dc%25");
    assert!(b
        .index_key("a}b")
        .starts_with(&format!("{}:{{a%7Db}}", b.prefix)));
}

#[tokio::test]
async fn a_command_past_its_deadline_times_out_and_its_connection_is_dropped() {
    let (b, guard) = fresh_concrete().await;
    assert_eq!(b.pool.status().size, 1, "connect opened one connection");
    // BLPOP on an empty list holds its connection for 5s: well past the
    // deadline.
    let blocked = guard.prefix.clone() + ":{t}:list";
    let op = async {
        let mut conn = b.pool.get().await.map_err(super::map_pool)?;
        let deadline = Instant::now() + Duration::from_millis(100);
        let res = tokio::time::timeout_at(deadline, async {
            redis::cmd("BLPOP")
                .arg(&blocked)
                .arg(5)
                .query_async::<Value>(&mut *conn)
                .await
                .map_err(super::map_redis)
        })
        .await;
        // The same policy as `exec_bounded`, on a command that no
        // operation sends.
        match res {
            Ok(Err(Error::Timeout)) | Err(_) => {
                drop(super::Connection::take(conn));
                Err(Error::Timeout)
            }
            Ok(other) => other.map(|_| ()),
        }
    };
    assert!(matches!(op.await, Err(Error::Timeout)));
    assert_eq!(
        b.pool.status().size,
        0,
        "the stuck connection was pooled again"
    );
    // The next operation gets a fresh connection, not one stuck behind
    // the BLPOP.
    put(&b, "ns", "k", None).await;

    // An operation whose deadline has passed does not run.
    let res = b
        .exec_until(
            "ns",
            Op::Delete { key: "k".into() },
            Instant::now() - Duration::from_millis(1),
        )
        .await;
    assert!(matches!(res, Err(Error::Timeout)), "{res:?}");
    assert_eq!(
        b.exec("ns", Op::Exists { key: "k".into() })
            .await
            .expect("exists"),
        Outcome::Exists(true)
    );
}

#[tokio::test]
async fn the_command_timeout_bounds_operations_without_a_deadline() {
    let prefix = unique_prefix();
    let _guard = DropKeys::new(&prefix);
    let b = RedisConnector::new(RedisConfig {
        command_timeout: Duration::from_millis(100),
        ..config(&prefix)
    })
    .expect("config")
    .open()
    .await
    .expect("connect");
    // Every connection is checked out, so the operation waits for one
    // past its command timeout.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(b.pool.get().await.expect("connection"));
    }
    let res = b.exec("ns", Op::Exists { key: "k".into() }).await;
    assert!(matches!(res, Err(Error::Timeout)), "{res:?}");
    drop(held);
    assert_eq!(
        b.exec("ns", Op::Exists { key: "k".into() })
            .await
            .expect("exists"),
        Outcome::Exists(false)
    );
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    let connector = RedisConnector::new(RedisConfig {
        url: "redis://127.0.0.1:1".into(),
        create_timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    })
    .expect("config");
    let started = Instant::now();
    match connector.connect().await {
        Err(Error::Unavailable(_)) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("connected to port 1"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn invalid_settings_are_rejected_with_a_clear_message() {
    for prefix in ["", "a{b", "a}b"] {
        match RedisConnector::new(RedisConfig {
            key_prefix: prefix.into(),
            ..RedisConfig::default()
        }) {
            Err(e) => {
                assert_eq!(e.field, "key_prefix");
                let msg = e.to_string();
                assert!(msg.contains("invalid redis key prefix"), "{msg}")
            }
            other => panic!("{prefix:?}: {other:?}"),
        }
    }
    match RedisConnector::new(RedisConfig {
        url: "http://:secret@127.0.0.1:6379".into(),
        ..RedisConfig::default()
    }) {
        Err(e) => {
            assert_eq!(e.field, "url");
            let msg = e.to_string();
            assert!(msg.contains("invalid redis url"), "{msg}");
            assert!(!msg.contains("secret"), "the password leaked: {msg}");
        }
        other => panic!("{other:?}"),
    }
    assert!(RedisConnector::new(RedisConfig::default()).is_ok());
}

#[tokio::test]
async fn scripts_are_reloaded_after_the_script_cache_is_lost() {
    let (b, _guard) = fresh_concrete().await;
    put(&b, "ns", "k", None).await;
    let mut conn = admin().await;
    let mut forget = redis::cmd("EVALSHA");
    // Simulates a server that lost its cache (restart, failover)
    // without flushing the cache every other test relies on: the
    // backend is made to use a digest the server does not know.
    let unknown = "0000000000000000000000000000000000000000";
    let err = forget
        .arg(unknown)
        .arg(0)
        .query_async::<Value>(&mut conn)
        .await
        .expect_err("unknown script");
    assert_eq!(err.code(), Some("NOSCRIPT"));
    let b = RedisBackend {
        scan: super::Script {
            sha: unknown.into(),
            ..b.scan
        },
        ..b
    };
    assert_eq!(scan_keys(&b, "ns", 10).await, (vec!["k".into()], false));
}

#[tokio::test]
async fn connections_report_the_pool() {
    let (b, _guard) = fresh_concrete().await;
    b.health().await.expect("health");
    let stats = b.connections();
    assert!(stats.in_use + stats.idle >= 1, "{stats:?}");
    assert!(stats.in_use + stats.idle <= 4, "{stats:?}");
    assert!(!b.is_inline());
    b.close().await;
    assert!(b.health().await.is_err(), "a closed backend still answers");
}

#[tokio::test]
async fn plain_urls_connect_directly_and_tls_or_resp3_multiplex() {
    use deadpool_redis::redis::IntoConnectionInfo;
    let target = |url: &str| {
        let info = url.into_connection_info().expect("url");
        super::DirectTarget::of(&info, Duration::from_secs(1)).is_some()
    };
    assert!(target("redis://127.0.0.1:6379/2"));
    assert!(target("redis://user:secret@127.0.0.1:6379"));
    assert!(target("redis+unix:///run/redis.sock"));
    assert!(!target("rediss://127.0.0.1:6380"));
    assert!(!target("redis://127.0.0.1:6379/?protocol=resp3"));

    let (b, _guard) = fresh_concrete().await;
    let conn = b.pool.get().await.expect("connection");
    assert!(matches!(*conn, super::Conn::Direct(_)));
}

/// The server's id of the client on `conn`.
async fn id(conn: &mut super::Conn) -> i64 {
    redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut conn.within_deadline())
        .await
        .expect("client id")
}

#[tokio::test]
async fn a_request_cut_off_midway_never_reaches_the_next_user() {
    let prefix = unique_prefix();
    let guard = DropKeys::new(&prefix);
    let b = RedisConnector::new(RedisConfig {
        max_size: 1,
        ..config(&prefix)
    })
    .expect("config")
    .open()
    .await
    .expect("connect");
    put(&b, "ns", "k", None).await;
    let mut conn = b.pool.get().await.expect("connection");
    let first = id(&mut conn).await;
    // A BLPOP that answers (nil) 300 ms later, cut off after 50 ms: the
    // connection goes back to the pool with that reply still on its way,
    // as it does when an operation's caller goes away.
    let blocked = guard.prefix.clone() + ":{t}:list";
    let cut = tokio::time::timeout(Duration::from_millis(50), async {
        redis::cmd("BLPOP")
            .arg(&blocked)
            .arg(0.3)
            .query_async::<Value>(&mut conn.within_deadline())
            .await
    })
    .await;
    assert!(cut.is_err(), "BLPOP answered early: {cut:?}");
    assert!(!conn.is_usable());
    drop(conn);
    // The next user gets a new connection and its own replies.
    let mut conn = b.pool.get().await.expect("connection");
    assert_ne!(
        id(&mut conn).await,
        first,
        "the cut-off connection was reused"
    );
    drop(conn);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = b
        .exec("ns", Op::Get { key: "k".into() })
        .await
        .expect("get");
    assert!(matches!(got, Outcome::Get(Some(_))), "{got:?}");
    assert_eq!(
        b.exec("ns", Op::Exists { key: "k".into() })
            .await
            .expect("exists"),
        Outcome::Exists(true)
    );
}

#[tokio::test]
async fn a_direct_connection_selects_the_urls_database_and_authenticates() {
    let prefix = unique_prefix();
    let base = url();
    let in_db = |db: u8| format!("{}/{db}", base.trim_end_matches('/'));
    let b = RedisConnector::new(RedisConfig {
        url: in_db(3),
        ..config(&prefix)
    })
    .expect("config")
    .open()
    .await
    .expect("connect");
    put(&b, "ns", "k", None).await;
    let mut db3 = redis::Client::open(in_db(3))
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to db 3");
    let keys = keys_under(&mut db3, &prefix).await;
    assert!(!keys.is_empty(), "nothing written in database 3");
    assert!(keys_under(&mut admin().await, &prefix).await.is_empty());
    for chunk in keys.chunks(500) {
        let _: i64 = redis::cmd("DEL")
            .arg(chunk)
            .query_async(&mut db3)
            .await
            .expect("del");
    }

    // A password the server does not take fails the connect, naming AUTH.
    let wrong = base.replacen("redis://", "redis://prism-nobody:wrong@", 1);
    let err = RedisConnector::new(RedisConfig {
        url: wrong,
        ..config(&prefix)
    })
    .expect("config")
    .open()
    .await
    .err()
    .expect("a wrong password connected");
    let message = format!("{err}: {:?}", std::error::Error::source(&err));
    assert!(
        message.contains("WRONGPASS") || message.contains("AUTH"),
        "{message}"
    );
}

/// An operation's future is moved into a box for every call, and its bytes
/// are copied each time it moves: keep connecting, checking and scanning out
/// of its state (all three are boxed where they happen).
#[tokio::test]
async fn an_operations_future_stays_small() {
    let (b, _guard) = fresh_concrete().await;
    let get = b.exec_bounded("ns", Op::Get { key: "k".into() }, Instant::now());
    let size = std::mem::size_of_val(&get);
    // 14.7 KiB when deadpool's checkout held a whole connection handshake
    // inline; about 1.5 KiB in a debug build now.
    assert!(size <= 4096, "an operation's future takes {size} bytes");
}
