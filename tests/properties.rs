//! Property tests: arbitrary input never panics and always ends in one of
//! the documented outcomes.
//!
//! - request validation (keys, namespaces, values, TTLs, scan fields): OK,
//!   or INVALID_ARGUMENT whose message names the field, or NOT_FOUND for a
//!   namespace that is not configured, both directly and through a gateway
//!   over gRPC;
//! - scan cursors: every valid key round-trips, and any string decodes to
//!   a valid key or is a "bad cursor";
//! - TTLs: any `ttl_ms` is refused past 100 years, or stored and reported
//!   back at most as long as asked and never 0 for a live key, on memory,
//!   SQLite, PostgreSQL and Redis;
//! - settings: arbitrary values of numeric and duration keys, from a file
//!   or a variable, load or give a settings error naming the key; arbitrary
//!   TOML-ish text loads, or is a syntax error naming the line, or an error
//!   naming a key; never a panic.
//!
//! Each property runs a modest number of cases so the file finishes in
//! seconds; a failure prints the smallest input proptest found.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use prism::backend::memory::MemoryConnector;
use prism::backend::postgres::{PostgresConfig, PostgresConnector};
use prism::backend::redis::{RedisConfig, RedisConnector};
use prism::backend::sqlite::SqliteConnector;
use prism::backend::{Backend, Connector, Op, Outcome};
use prism::error::ApiError;
use prism::kv::validate::{self, ScanParams, MAX_KEY_BYTES, MAX_SCAN_LIMIT, MAX_TTL};
use prism::proto::ScanRequest;
use prism::settings::{self, Error, NamespaceSettings, Settings};
use prism::testing::{unique_suffix, Cleanup};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tonic::Code;

use common::db::{delete_keys, postgres_url, redis_url, DropTable};
use common::requests::{get, put};
use common::TestServer;

/// Cases per property: enough to reach the edges the strategies aim at,
/// few enough for a run of seconds.
const CASES: u32 = 256;

fn config() -> Config {
    Config {
        cases: CASES,
        // Failures are reported, not written to files next to the tests.
        failure_persistence: None,
        ..Config::default()
    }
}

fn runner() -> TestRunner {
    TestRunner::new(config())
}

const MAX_TTL_MS: u64 = MAX_TTL.as_millis() as u64;

// ---------------------------------------------------------------------------
// Strategies

/// Keys of every kind: valid ones, empty, with NUL, around the byte limit
/// (in one- and two-byte characters), and arbitrary text.
fn any_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9/_.-]{1,24}",
        1 => Just(String::new()),
        1 => "[a-z]{0,8}\0[a-z]{0,8}",
        1 => (MAX_KEY_BYTES - 2..=MAX_KEY_BYTES + 2).prop_map(|n| "k".repeat(n)),
        1 => (MAX_KEY_BYTES / 2 - 1..=MAX_KEY_BYTES / 2 + 1).prop_map(|n| "é".repeat(n)),
        2 => any::<String>(),
    ]
}

/// Keys that are valid: 1..=1024 bytes of UTF-8 without NUL.
fn valid_key() -> impl Strategy<Value = String> {
    prop_oneof![
        "[^\0]{1,64}",
        (1..=MAX_KEY_BYTES / 4).prop_map(|n| "ü€".repeat(n).chars().take(n).collect()),
        Just("k".repeat(MAX_KEY_BYTES)),
    ]
    .prop_filter("1..=1024 bytes", |k| {
        !k.is_empty() && k.len() <= MAX_KEY_BYTES
    })
}

/// TTLs in milliseconds: none, tiny, ordinary, around the 100-year limit,
/// and anything up to `u64::MAX`.
fn any_ttl_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        1 => Just(0u64),
        2 => 1u64..50,
        3 => 50u64..100_000_000,
        3 => MAX_TTL_MS - 1_000..=MAX_TTL_MS + 1_000,
        2 => any::<u64>(),
    ]
}

/// Cursors: encodings of valid keys, of arbitrary bytes, and arbitrary
/// text.
fn any_cursor() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just(String::new()),
        2 => valid_key().prop_map(|k| validate::encode_cursor(&k)),
        3 => proptest::collection::vec(any::<u8>(), 0..1100).prop_map(|b| b64(&b)),
        2 => any::<String>(),
    ]
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

// ---------------------------------------------------------------------------
// (a), (b): validation and cursors, directly

fn namespace_settings(default_ttl: Option<&str>) -> NamespaceSettings {
    let ttl = default_ttl.map_or(String::new(), |t| format!("default_ttl = \"{t}\"\n"));
    let s = Settings::from_toml(&format!(
        "[server]\ngrpc_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n\
         [backends.m]\nkind = \"memory\"\n[namespaces.n]\nbackend = \"m\"\n{ttl}"
    ))
    .expect("settings");
    s.namespaces["n"].clone()
}

/// The rules of a key, written out once more independently of the code.
fn key_is_valid(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_BYTES && !key.contains('\0')
}

fn invalid_argument_naming(e: &ApiError, field: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        matches!(e, ApiError::InvalidArgument(_)),
        "not INVALID_ARGUMENT: {e:?}"
    );
    prop_assert_eq!(e.code(), Code::InvalidArgument);
    prop_assert!(e.to_string().contains(field), "does not name {field}: {e}");
    Ok(())
}

#[test]
fn any_key_is_accepted_exactly_when_valid_or_refused_naming_the_key() {
    runner()
        .run(&any_key(), |key| {
            match validate::key(&key) {
                Ok(()) => prop_assert!(key_is_valid(&key), "accepted {key:?}"),
                Err(e) => {
                    prop_assert!(!key_is_valid(&key), "refused valid {key:?}: {e}");
                    invalid_argument_naming(&e, "key")?;
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn any_ttl_is_stored_up_to_100_years_or_refused_naming_ttl_ms() {
    let plain = namespace_settings(None);
    let with_default = namespace_settings(Some("10m"));
    runner()
        .run(&any_ttl_ms(), |ttl_ms| {
            for ns in [&plain, &with_default] {
                match validate::put_ttl(ns, ttl_ms) {
                    Ok(ttl) if ttl_ms == 0 => prop_assert_eq!(ttl, ns.default_ttl),
                    Ok(ttl) => {
                        prop_assert!(ttl_ms <= MAX_TTL_MS);
                        prop_assert_eq!(ttl, Some(Duration::from_millis(ttl_ms)));
                    }
                    Err(e) => {
                        prop_assert!(ttl_ms > MAX_TTL_MS, "refused {ttl_ms}: {e}");
                        invalid_argument_naming(&e, "ttl_ms")?;
                    }
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn a_reported_ttl_is_positive_for_any_remaining_time() {
    runner()
        .run(&(any::<u64>(), 0u32..1_000_000_000), |(secs, nanos)| {
            let d = Duration::new(secs, nanos);
            let ms = prism::kv::ttl_ms(Some(d));
            prop_assert!(ms >= 1, "{d:?} reported as {ms}");
            prop_assert!(u128::try_from(ms).unwrap() <= d.as_millis().max(1));
            Ok(())
        })
        .unwrap();
    assert_eq!(prism::kv::ttl_ms(None), -1);
}

#[test]
fn every_valid_key_round_trips_through_a_cursor() {
    let ns = namespace_settings(None);
    runner()
        .run(&valid_key(), |key| {
            let cursor = validate::encode_cursor(&key);
            prop_assert!(cursor
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            let op = validate::scan_op(
                ScanParams {
                    cursor,
                    ..ScanParams::default()
                },
                &ns,
            );
            match op {
                Ok(Op::Scan { after, .. }) => prop_assert_eq!(after, Some(key)),
                other => prop_assert!(false, "{other:?}"),
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn any_cursor_decodes_to_a_valid_key_or_is_a_bad_cursor() {
    let ns = namespace_settings(None);
    runner()
        .run(&any_cursor(), |cursor| {
            let op = validate::scan_op(
                ScanParams {
                    cursor: cursor.clone(),
                    ..ScanParams::default()
                },
                &ns,
            );
            match op {
                Ok(Op::Scan { after: None, .. }) => prop_assert!(cursor.is_empty()),
                Ok(Op::Scan { after: Some(k), .. }) => {
                    prop_assert!(key_is_valid(&k), "{cursor:?} decoded to {k:?}");
                    prop_assert_eq!(validate::encode_cursor(&k), cursor);
                }
                Ok(other) => prop_assert!(false, "{other:?}"),
                Err(e) => {
                    invalid_argument_naming(&e, "bad cursor")?;
                    prop_assert!(e.to_string().starts_with("bad cursor"), "{e}");
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn any_scan_request_is_a_bounded_page_or_names_its_bad_field() {
    let ns = namespace_settings(None);
    let params = (any_key(), any::<u32>(), any_cursor(), any::<bool>());
    runner()
        .run(&params, |(prefix, limit, cursor, keys_only)| {
            let op = validate::scan_op(
                ScanParams {
                    prefix: prefix.clone(),
                    limit,
                    cursor,
                    keys_only,
                },
                &ns,
            );
            match op {
                Ok(Op::Scan {
                    limit: l,
                    max_bytes,
                    ..
                }) => {
                    prop_assert!((1..=MAX_SCAN_LIMIT).contains(&l), "page of {l}");
                    prop_assert_eq!(max_bytes, ns.max_page_bytes);
                    prop_assert!(prefix.len() <= MAX_KEY_BYTES && !prefix.contains('\0'));
                }
                Ok(other) => prop_assert!(false, "{other:?}"),
                Err(e) => {
                    prop_assert_eq!(e.code(), Code::InvalidArgument);
                    let m = e.to_string();
                    prop_assert!(
                        m.contains("prefix") || m.starts_with("bad cursor"),
                        "names no field: {m}"
                    );
                }
            }
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------
// (a) + (c) through a gateway over gRPC

/// A gateway request: the namespace is `small` (memory, 64-byte values) or
/// anything else, with arbitrary key, value size and TTL.
fn any_put() -> impl Strategy<Value = (String, String, usize, u64)> {
    let namespace = prop_oneof![
        6 => Just("small".to_owned()),
        1 => any::<String>(),
        1 => "[a-z]{1,8}",
    ];
    (namespace, any_key(), 0usize..130, any_ttl_ms())
}

const SMALL_VALUE: usize = 64;

#[test]
fn any_put_through_the_gateway_ends_in_its_documented_status() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let server = rt.block_on(async {
        TestServer::start(common::settings(&format!(
            "[server]\ngrpc_addr = \"127.0.0.1:0\"\n[backends.m]\nkind = \"memory\"\n\
             [namespaces.small]\nbackend = \"m\"\nmax_value_size = {SMALL_VALUE}\n"
        )))
        .await
        .expect("start gateway")
    });
    let client = rt.block_on(server.client()).expect("connect");
    runner()
        .run(&any_put(), |(ns, key, size, ttl_ms)| {
            let mut client = client.clone();
            rt.block_on(async move {
                let value = vec![b'v'; size];
                let res = client.put(put(&ns, &key, &value, ttl_ms)).await;
                // The documented order: namespace, key, value, TTL.
                let expected = if ns != "small" {
                    Some((Code::NotFound, "namespace"))
                } else if !key_is_valid(&key) {
                    Some((Code::InvalidArgument, "key"))
                } else if size > SMALL_VALUE {
                    Some((Code::InvalidArgument, "max_value_size"))
                } else if ttl_ms > MAX_TTL_MS {
                    Some((Code::InvalidArgument, "ttl_ms"))
                } else {
                    None
                };
                match (res, expected) {
                    (Ok(_), None) => {}
                    (Err(status), Some((code, field))) => {
                        prop_assert_eq!(status.code(), code, "{:?}", status.message());
                        prop_assert!(
                            status.message().contains(field),
                            "does not name {field}: {}",
                            status.message()
                        );
                        return Ok(());
                    }
                    (res, expected) => {
                        prop_assert!(false, "got {res:?}, expected {expected:?}")
                    }
                }
                // Stored: read back, the TTL reported no longer than asked.
                let got = client
                    .get(get(&ns, &key))
                    .await
                    .map_err(|s| TestCaseError::fail(format!("get: {s:?}")))?
                    .into_inner();
                if ttl_ms == 0 {
                    prop_assert!(got.found);
                    prop_assert_eq!(got.ttl_ms, -1);
                } else if got.found {
                    prop_assert!(
                        (1..=ttl_ms as i64).contains(&got.ttl_ms),
                        "asked {ttl_ms}, reported {}",
                        got.ttl_ms
                    );
                } else {
                    // Only a TTL shorter than the round trip may be gone.
                    prop_assert!(ttl_ms < 1_000, "a {ttl_ms} ms key vanished");
                    prop_assert_eq!(got.ttl_ms, 0);
                }
                prop_assert_eq!(got.value.len(), if got.found { size } else { 0 });
                Ok(())
            })
        })
        .unwrap();
}

#[test]
fn any_scan_through_the_gateway_ends_in_its_documented_status() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let server = rt.block_on(async {
        TestServer::start(common::settings(
            "[server]\ngrpc_addr = \"127.0.0.1:0\"\n[backends.m]\nkind = \"memory\"\n\
             [namespaces.n]\nbackend = \"m\"\n",
        ))
        .await
        .expect("start gateway")
    });
    let mut client = rt.block_on(server.client()).expect("connect");
    rt.block_on(async {
        for k in ["a", "a/1", "a/2", "b", "é", "\u{10FFFF}"] {
            client.put(put("n", k, b"v", 0)).await.expect("seed");
        }
    });
    let params = (
        prop_oneof![Just(String::new()), any_key()],
        any::<u32>(),
        any_cursor(),
    );
    runner()
        .run(&params, |(prefix, limit, cursor)| {
            let mut client = client.clone();
            rt.block_on(async move {
                let req = ScanRequest {
                    namespace: "n".into(),
                    prefix: prefix.clone(),
                    limit,
                    cursor: cursor.clone(),
                    keys_only: false,
                };
                match client.scan(req).await {
                    Ok(page) => {
                        let page = page.into_inner();
                        let cap = match limit as usize {
                            0 => validate::DEFAULT_SCAN_LIMIT,
                            n => n.min(MAX_SCAN_LIMIT),
                        };
                        prop_assert!(page.items.len() <= cap);
                        prop_assert!(page.items.iter().all(|i| i.key.starts_with(&prefix)));
                        prop_assert!(page.items.windows(2).all(|w| w[0].key < w[1].key));
                        if !page.next_cursor.is_empty() {
                            let last = &page.items.last().expect("a page before a cursor").key;
                            prop_assert_eq!(&page.next_cursor, &validate::encode_cursor(last));
                        }
                    }
                    Err(status) => {
                        prop_assert_eq!(status.code(), Code::InvalidArgument);
                        let m = status.message();
                        prop_assert!(m.contains("prefix") || m.starts_with("bad cursor"), "{m}");
                    }
                }
                Ok(())
            })
        })
        .unwrap();
}

// ---------------------------------------------------------------------------
// (c) TTL arithmetic on every backend

/// Puts a key with any `ttl_ms` the request core accepts and reads it back:
/// the reported TTL is at most the one asked for, and at least 1 ms while
/// the key is live.
fn ttls_round_trip(backend: Arc<dyn Backend>, rt: &tokio::runtime::Runtime, cases: u32) {
    let ns = namespace_settings(None);
    let mut runner = TestRunner::new(Config { cases, ..config() });
    let counter = std::sync::atomic::AtomicU64::new(0);
    runner
        .run(&any_ttl_ms(), |ttl_ms| {
            let ttl = match validate::put_ttl(&ns, ttl_ms) {
                Ok(ttl) => ttl,
                Err(e) => {
                    prop_assert!(ttl_ms > MAX_TTL_MS);
                    return invalid_argument_naming(&e, "ttl_ms");
                }
            };
            let key = format!(
                "ttl/{}",
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            let backend = backend.clone();
            rt.block_on(async move {
                let put = Op::Put {
                    key: key.clone(),
                    value: bytes::Bytes::from_static(b"v"),
                    ttl,
                };
                let stored = backend.exec("props", put).await;
                prop_assert!(matches!(stored, Ok(Outcome::Put)), "{stored:?}");
                let got = backend.exec("props", Op::Get { key }).await;
                let record = match got {
                    Ok(Outcome::Get(record)) => record,
                    other => return Err(TestCaseError::fail(format!("get: {other:?}"))),
                };
                match (ttl, record) {
                    (None, Some(r)) => prop_assert_eq!(prism::kv::ttl_ms(r.ttl), -1),
                    (Some(_), Some(r)) => {
                        let reported = prism::kv::ttl_ms(r.ttl);
                        prop_assert!(
                            (1..=ttl_ms as i64).contains(&reported),
                            "asked {ttl_ms} ms, reported {reported}"
                        );
                    }
                    (Some(_), None) => {
                        prop_assert!(ttl_ms < 1_000, "a {ttl_ms} ms key vanished")
                    }
                    (None, None) => prop_assert!(false, "a key without TTL vanished"),
                }
                Ok(())
            })
        })
        .unwrap();
}

#[test]
fn ttls_round_trip_on_memory() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let backend = rt
        .block_on(MemoryConnector::new().connect())
        .expect("memory");
    ttls_round_trip(backend, &rt, CASES);
}

#[test]
fn ttls_round_trip_on_sqlite() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let connector = SqliteConnector::new(dir.path().join("prism.db"), Duration::from_secs(5), 2);
    let backend = rt.block_on(connector.connect()).expect("sqlite");
    ttls_round_trip(backend.clone(), &rt, CASES);
    rt.block_on(backend.close());
}

#[test]
fn ttls_round_trip_on_postgres() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let table = format!("prism_props_{}", unique_suffix());
    let _drop = DropTable(table.clone());
    let connector = PostgresConnector::new(PostgresConfig {
        url: postgres_url(),
        table,
        max_connections: 2,
        min_connections: 1,
        ..PostgresConfig::default()
    })
    .expect("postgres config");
    let backend = rt.block_on(connector.connect()).expect("postgres");
    ttls_round_trip(backend.clone(), &rt, CASES);
    rt.block_on(backend.close());
}

#[test]
fn ttls_round_trip_on_redis() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let prefix = format!("prism_props_{}", unique_suffix());
    let cleanup_prefix = prefix.clone();
    let _cleanup = Cleanup::new(move || async move {
        delete_keys(&redis_url(), &cleanup_prefix).await;
    });
    let connector = RedisConnector::new(RedisConfig {
        url: redis_url(),
        key_prefix: prefix,
        max_size: 2,
        ..RedisConfig::default()
    })
    .expect("redis config");
    let backend = rt.block_on(connector.connect()).expect("redis");
    ttls_round_trip(backend.clone(), &rt, CASES);
    rt.block_on(backend.close());
}

// ---------------------------------------------------------------------------
// (d) settings

/// Settings that load, with a backend of every kind whose keys can be
/// given without a server.
const BASE: &str = r#"[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
drain_delay = "0s"

[sessions]
max_in_flight = 256

[supervisor]
max_restarts = 10

[backends.m]
kind = "memory"

[backends.s]
kind = "sqlite"
path = "/nonexistent/prism-props.db"

[backends.pg]
kind = "postgres"
url = "postgres://postgres@127.0.0.1:5432/test"

[backends.r]
kind = "redis"
url = "redis://127.0.0.1:6379"

[backends.c]
kind = "redis_cluster"
urls = ["redis://127.0.0.1:7000"]

[namespaces.n]
backend = "m"
"#;

/// Keys whose values are numbers or durations, as `(section, key)`.
const NUMERIC_KEYS: &[(&str, &str)] = &[
    ("server", "grpc_max_concurrent_streams"),
    ("server", "grpc_max_pending_reset_streams"),
    ("server", "grpc_max_local_reset_streams"),
    ("sessions", "max_in_flight"),
    ("sessions", "rate_limit"),
    ("sessions", "rate_burst"),
    ("sessions", "max_sessions"),
    ("sessions", "mailbox"),
    ("supervisor", "max_restarts"),
    ("backends.m", "pool_size"),
    ("backends.m", "mailbox"),
    ("backends.m", "breaker_failures"),
    ("backends.pg", "min_connections"),
    ("backends.c", "shards"),
    ("namespaces.n", "max_value_size"),
];

const DURATION_KEYS: &[(&str, &str)] = &[
    ("server", "shutdown_grace"),
    ("server", "drain_delay"),
    ("server", "grpc_keepalive_interval"),
    ("server", "grpc_keepalive_timeout"),
    ("server", "grpc_max_connection_age"),
    ("sessions", "idle_timeout"),
    ("supervisor", "restart_window"),
    ("supervisor", "backoff_initial"),
    ("supervisor", "backoff_max"),
    ("backends.m", "purge_interval"),
    ("backends.m", "health_interval"),
    ("backends.m", "breaker_cooldown"),
    ("backends.s", "busy_timeout"),
    ("backends.pg", "acquire_timeout"),
    ("backends.pg", "idle_timeout"),
    ("backends.pg", "max_lifetime"),
    ("backends.pg", "statement_timeout"),
    ("backends.r", "connect_timeout"),
    ("backends.r", "command_timeout"),
    ("namespaces.n", "timeout"),
    ("namespaces.n", "default_ttl"),
];

/// A TOML string literal holding `s` (JSON's escapes are TOML's).
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// Durations as people write them, right and wrong.
fn duration_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,25} ?(ns|us|ms|s|m|min|h|d|w|M|y|parsecs|)",
        "[0-9]{1,6}(s|ms) ?[0-9]{1,6}(s|ms)",
        "-[0-9]{1,4}s",
        "[0-9]{1,3}\\.[0-9]{1,3}s",
        any::<String>(),
    ]
}

/// A TOML literal of any type: integers of every size, floats, strings
/// (durations among them), booleans, arrays, tables.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => any::<i64>().prop_map(|n| n.to_string()),
        2 => (-2i64..70_000_000).prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|f| {
            if f.is_nan() {
                "nan".to_owned()
            } else if f.is_infinite() {
                if f > 0.0 { "inf" } else { "-inf" }.to_owned()
            } else {
                format!("{f:?}")
            }
        }),
        4 => duration_text().prop_map(|s| toml_string(&s)),
        1 => any::<bool>().prop_map(|b| b.to_string()),
        1 => Just("[1, 2]".to_owned()),
        1 => Just("{ a = 1 }".to_owned()),
    ]
}

/// `BASE` with `key = value` set in `section` (replacing what `BASE` has).
fn with_value(section: &str, key: &str, value: &str) -> String {
    let header = format!("[{section}]\n");
    let start = BASE.find(&header).expect("section in BASE") + header.len();
    let end = BASE[start..]
        .find("\n[")
        .map_or(BASE.len(), |i| start + i + 1);
    let body: String = BASE[start..end]
        .lines()
        .filter(|l| !l.starts_with(&format!("{key} =")))
        .map(|l| format!("{l}\n"))
        .collect();
    format!("{}{body}{key} = {value}\n{}", &BASE[..start], &BASE[end..])
}

fn any_setting() -> impl Strategy<Value = (&'static str, &'static str, String)> {
    let keys: Vec<(&str, &str)> = NUMERIC_KEYS.iter().chain(DURATION_KEYS).copied().collect();
    (proptest::sample::select(keys), toml_value()).prop_map(|((s, k), v)| (s, k, v))
}

/// A settings error names a non-empty key, and its message shows it.
fn names_a_key(e: &Error) -> Result<(), TestCaseError> {
    let message = e.to_string();
    let Some(key) = e.key() else {
        return Err(TestCaseError::fail(format!("names no key: {message}")));
    };
    prop_assert!(!key.is_empty(), "empty key: {message}");
    prop_assert!(message.contains(key), "{message}");
    Ok(())
}

/// [`names_a_key`], and the key is `set` when its value did not parse (a
/// value that parses may break a rule that another key names, such as
/// `server.drain_delay` shorter than `server.shutdown_grace`).
fn names_the_key(e: &Error, set: &str) -> Result<(), TestCaseError> {
    names_a_key(e)?;
    if matches!(e, Error::BadValue { .. }) {
        prop_assert_eq!(e.key(), Some(set), "{}", e);
    }
    Ok(())
}

#[test]
fn base_settings_load() {
    Settings::from_toml(BASE).expect("BASE loads");
    for (s, k) in NUMERIC_KEYS.iter().chain(DURATION_KEYS) {
        let text = with_value(s, k, "\"x\"");
        let e = Settings::from_toml(&text).expect_err(k);
        assert_eq!(e.key(), Some(format!("{s}.{k}").as_str()), "{e}");
    }
}

#[test]
fn any_value_of_a_numeric_or_duration_key_loads_or_names_the_key() {
    runner()
        .run(&any_setting(), |(section, key, value)| {
            let text = with_value(section, key, &value);
            let full = format!("{section}.{key}");
            if let Err(e) = Settings::from_toml(&text) {
                names_the_key(&e, &full)?;
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn any_value_of_a_variable_loads_or_names_the_variable() {
    let dir = common::settings_dir(BASE);
    let value = prop_oneof![duration_text(), toml_value(), any::<String>()];
    let keys: Vec<(&str, &str)> = NUMERIC_KEYS.iter().chain(DURATION_KEYS).copied().collect();
    runner()
        .run(
            &(proptest::sample::select(keys), value),
            |((section, key), value)| {
                let full = format!("{section}.{key}");
                let var = settings::env_var_name(&full);
                let vars = vec![(var.clone(), value)];
                if let Err(e) = settings::load_with(dir.path(), None, vars) {
                    names_the_key(&e, &full)?;
                    if e.key() == Some(full.as_str()) {
                        prop_assert!(e.to_string().contains(&var), "{e}");
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}

/// Text made of TOML's punctuation and words of the settings, and `BASE`
/// with a slice of such text spliced in.
fn toml_ish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("[".to_owned()),
        Just("]".to_owned()),
        Just("[[".to_owned()),
        Just(" = ".to_owned()),
        Just("\n".to_owned()),
        Just("\"".to_owned()),
        Just("'''".to_owned()),
        Just(".".to_owned()),
        Just("#".to_owned()),
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just(",".to_owned()),
        Just("server".to_owned()),
        Just("namespaces".to_owned()),
        Just("backends".to_owned()),
        Just("kind".to_owned()),
        Just("\"memory\"".to_owned()),
        Just("backend".to_owned()),
        Just("timeout".to_owned()),
        Just("grpc_addr".to_owned()),
        Just("\"127.0.0.1:0\"".to_owned()),
        Just("\"5s\"".to_owned()),
        "[a-z_]{1,8}",
        any::<i64>().prop_map(|n| n.to_string()),
        "[0-9]{19,22}",
        any::<String>(),
    ];
    let text = proptest::collection::vec(piece, 0..40).prop_map(|p| p.concat());
    // Edits of whole lines keep most of the text valid TOML, so that the
    // checks after parsing see it.
    let edit = prop_oneof![
        Just(LineEdit::Delete),
        toml_value().prop_map(LineEdit::Value),
        "[a-z_]{1,12}".prop_map(LineEdit::Key),
        ("[a-z_]{1,12}", toml_value()).prop_map(|(k, v)| LineEdit::Insert(k, v)),
        "[a-z_]{1,8}(\\.[a-z_]{1,8})?".prop_map(LineEdit::Section),
    ];
    let edits = proptest::collection::vec((any::<proptest::sample::Index>(), edit), 1..5);
    prop_oneof![
        1 => text.clone(),
        4 => edits.prop_map(|edits| edit_lines(BASE, &edits)),
        1 => (0..BASE.len(), 0usize..40, text).prop_map(|(at, cut, insert)| {
            let at = (0..=at).rev().find(|i| BASE.is_char_boundary(*i)).unwrap_or(0);
            let end = (at + cut).min(BASE.len());
            format!("{}{insert}{}", &BASE[..at], &BASE[end..])
        }),
    ]
}

/// An edit of one line of a settings text.
#[derive(Debug, Clone)]
enum LineEdit {
    /// Leave the line out.
    Delete,
    /// Give the line's key this value.
    Value(String),
    /// Rename the line's key.
    Key(String),
    /// Add `key = value` after the line.
    Insert(String, String),
    /// Add a section header after the line.
    Section(String),
}

fn edit_lines(text: &str, edits: &[(proptest::sample::Index, LineEdit)]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for (at, edit) in edits {
        if lines.is_empty() {
            break;
        }
        let i = at.index(lines.len());
        let split = lines[i]
            .split_once(" = ")
            .map(|(k, v)| (k.to_owned(), v.to_owned()));
        match (edit, split) {
            (LineEdit::Delete, _) => {
                lines.remove(i);
            }
            (LineEdit::Value(v), Some((k, _))) => lines[i] = format!("{k} = {v}"),
            (LineEdit::Key(k), Some((_, v))) => lines[i] = format!("{k} = {v}"),
            (LineEdit::Insert(k, v), _) => lines.insert(i + 1, format!("{k} = {v}")),
            (LineEdit::Section(name), _) => lines.insert(i + 1, format!("[{name}]")),
            _ => {}
        }
    }
    lines.join("\n")
}

#[test]
fn any_toml_ish_text_loads_or_is_a_settings_error() {
    runner()
        .run(&toml_ish(), |text| {
            match Settings::from_toml(&text) {
                Ok(_) => {}
                Err(Error::Syntax { message, .. }) => {
                    prop_assert!(message.contains("line"), "{message}")
                }
                Err(e) => names_a_key(&e)?,
            }
            Ok(())
        })
        .unwrap();
}
