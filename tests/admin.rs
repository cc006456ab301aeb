//! The admin plane over real HTTP: probes, readiness through drains and
//! outages, Prometheus metrics, the actor tree, namespaces, the REST
//! key-value API (statuses, percent-encoded keys, interplay with gRPC) and
//! JSON logs of the real binary.

mod common;

use std::collections::BTreeMap;
use std::ops::Deref;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::binary::{serve_command, Prism, Signal};
use common::faulty::{reaches, FaultyConnector, Probe};
use common::http::{assert_error, json_of, named, Admin};
use common::requests::{get, put};
use common::{as_client, eventually, settings_dir, TestServer};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use prism::backend::memory::MemoryConnector;
use prism::backend::{Backend, BoxFuture, Connector, Error, Op, Outcome, PoolStats};
use reqwest::StatusCode;
use serde_json::Value;

/// Namespaces: `default` (SQLite), `cache` (memory, 10 min default TTL),
/// `small` (memory, 16-byte values), `faulty` (the faulty test backend, with
/// a breaker that opens after 3 failures) and `flaky` (a backend that can be
/// switched off). `extra` is appended.
fn settings(dir: &Path, extra: &str) -> prism::Settings {
    common::settings(&format!(
        r#"
[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
shutdown_grace = "10s"
drain_delay = "0s"

[supervisor]
max_restarts = 1000
backoff_initial = "10ms"
backoff_max = "100ms"

[backends.embedded]
kind = "sqlite"
path = "{}"

[backends.memory]
kind = "memory"

[backends.faulty]
kind = "memory"
pool_size = 4
breaker_failures = 3
breaker_cooldown = "30s"
health_interval = "1s"

[backends.flaky]
kind = "memory"
health_interval = "50ms"

[namespaces.default]
backend = "embedded"

[namespaces.cache]
backend = "memory"
default_ttl = "10m"
timeout = "1500ms"

[namespaces.small]
backend = "memory"
max_value_size = 16

[namespaces.faulty]
backend = "faulty"
timeout = "2s"

[namespaces.flaky]
backend = "flaky"
{extra}
"#,
        dir.join("prism.db").display()
    ))
}

/// A memory backend whose health checks and connects fail while it is
/// switched off.
struct SwitchConnector {
    inner: MemoryConnector,
    on: Arc<AtomicBool>,
}

struct Switched {
    inner: Arc<dyn Backend>,
    on: Arc<AtomicBool>,
}

impl Connector for SwitchConnector {
    fn kind(&self) -> &'static str {
        "switch"
    }

    fn connect(&self) -> BoxFuture<'_, Result<Arc<dyn Backend>, Error>> {
        Box::pin(async move {
            if !self.on.load(Ordering::SeqCst) {
                return Err(Error::Unavailable("switched off".into()));
            }
            let inner = self.inner.connect().await?;
            Ok(Arc::new(Switched {
                inner,
                on: self.on.clone(),
            }) as Arc<dyn Backend>)
        })
    }
}

impl Backend for Switched {
    fn exec<'a>(&'a self, namespace: &'a str, op: Op) -> BoxFuture<'a, Result<Outcome, Error>> {
        self.inner.exec(namespace, op)
    }
    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, Error>> {
        self.inner.purge_expired()
    }
    fn health(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            if self.on.load(Ordering::SeqCst) {
                self.inner.health().await
            } else {
                Err(Error::Unavailable("switched off".into()))
            }
        })
    }
    fn close(&self) -> BoxFuture<'_, ()> {
        self.inner.close()
    }
    fn is_inline(&self) -> bool {
        self.inner.is_inline()
    }
    fn connections(&self) -> PoolStats {
        self.inner.connections()
    }
}

/// A gateway in-process with the test backends, and its admin plane.
struct Harness {
    server: TestServer,
    admin: Admin,
    probe: Arc<Probe>,
    flaky: Arc<AtomicBool>,
    _dir: tempfile::TempDir,
}

impl Deref for Harness {
    type Target = Admin;

    fn deref(&self) -> &Admin {
        &self.admin
    }
}

impl Harness {
    async fn start(extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (faulty, probe) = FaultyConnector::new();
        let flaky = Arc::new(AtomicBool::new(true));
        let switch = Arc::new(SwitchConnector {
            inner: MemoryConnector::new(),
            on: flaky.clone(),
        });
        let server = TestServer::start_with(
            settings(dir.path(), extra),
            vec![
                ("faulty", faulty as Arc<dyn Connector>),
                ("flaky", switch as Arc<dyn Connector>),
            ],
        )
        .await
        .expect("server starts");
        let h = Harness {
            admin: Admin::new(server.http_url()),
            server,
            probe,
            flaky,
            _dir: dir,
        };
        assert!(
            h.becomes_ready(Duration::from_secs(10)).await,
            "the gateway never became ready: {:?}",
            h.get_json("/readyz").await
        );
        h
    }

    async fn scrape(&self) -> Metrics {
        let r = self.get("/metrics").await;
        assert_eq!(r.status(), StatusCode::OK);
        let content_type = r.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        Metrics::parse(&r.text().await.expect("body"))
    }
}

// ---- a small Prometheus text-format parser ----

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug)]
struct Metrics {
    samples: Vec<Sample>,
    types: BTreeMap<String, String>,
}

impl Metrics {
    /// Every non-comment line must be `name{label="value",...} value`.
    fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line");
                types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("no value: {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|e| panic!("bad value ({e}): {line:?}"));
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest
                        .strip_suffix('}')
                        .unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
                    (name, parse_labels(body, line))
                }
            };
            assert!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                    && !name.starts_with(|c: char| c.is_ascii_digit()),
                "bad metric name: {line:?}"
            );
            samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        Metrics { samples, types }
    }

    /// The value of the series with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }
}

fn parse_labels(body: &str, line: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = body.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert_eq!(chars.next(), Some('"'), "label value not quoted: {line:?}");
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => panic!("dangling escape: {line:?}"),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => panic!("unterminated label value: {line:?}"),
            }
        }
        labels.insert(key.trim().to_owned(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    labels
}

// ---- probes ----

#[tokio::test]
async fn healthz_and_readyz_answer_200_when_serving_with_healthy_backends() {
    let h = Harness::start("").await;
    let (status, body) = h.get_json("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    let (status, body) = h.get_json("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ready");
    assert_eq!(body["draining"], false);
    assert_eq!(body["reasons"].as_array().unwrap().len(), 0);
    let names: Vec<&str> = body["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["embedded", "faulty", "flaky", "memory"]);
    for b in body["backends"].as_array().unwrap() {
        assert_eq!(b["ready"], true, "{b}");
        assert_eq!(b["circuit"], "closed", "{b}");
    }
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn unknown_paths_and_methods_get_json_errors() {
    let h = Harness::start("").await;
    let r = h.get("/nope").await;
    assert_error(r, StatusCode::NOT_FOUND, "NOT_FOUND").await;
    let r = h.http.post(h.kv("cache", "k")).send().await.unwrap();
    assert_error(r, StatusCode::METHOD_NOT_ALLOWED, "UNIMPLEMENTED").await;
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn readiness_is_503_while_draining_and_probes_answer_until_the_drain_ends() {
    let mut h = Harness::start("").await;
    // A request that holds the drain open until the test lets it finish.
    let held = tokio::spawn(h.http.put(h.kv("faulty", "hold/1")).body("v").send());
    assert!(reaches(&h.probe.started, 1, Duration::from_secs(5)).await);
    h.server.begin_stop();
    assert!(
        h.becomes_unready(Duration::from_secs(5)).await,
        "readiness never turned 503 during the drain"
    );
    let (_, body) = h.get_json("/readyz").await;
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["draining"], true);
    assert!(body["reasons"][0].as_str().unwrap().contains("draining"));
    // Liveness and metrics still answer during the drain; new REST work does not.
    assert_eq!(h.status("/healthz").await, Some(StatusCode::OK));
    assert_eq!(h.status("/metrics").await, Some(StatusCode::OK));
    let r = h.get_kv("cache", "k").await;
    let message = assert_error(r, StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE").await;
    assert!(message.contains("draining"), "{message}");
    // The request in flight completes, and then the admin plane stops too.
    h.probe.gate.open();
    let r = held.await.unwrap().expect("in-flight request answered");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let Harness { server, admin, .. } = h;
    server.join().await.unwrap();
    assert_eq!(
        admin.status("/healthz").await,
        None,
        "the admin plane still answers"
    );
}

#[tokio::test]
async fn readiness_is_503_while_a_backend_is_down_and_200_after_recovery() {
    let h = Harness::start("").await;
    h.flaky.store(false, Ordering::SeqCst);
    assert!(
        h.becomes_unready(Duration::from_secs(5)).await,
        "readiness never turned 503 with the backend down"
    );
    let (_, body) = h.get_json("/readyz").await;
    assert_eq!(body["draining"], false);
    let flaky = named(&body["backends"], "flaky").clone();
    assert_eq!(flaky["ready"], false, "{body}");
    let reason = body["reasons"][0].as_str().unwrap();
    assert!(reason.contains("'flaky'"), "{reason}");
    assert!(reason.contains("switched off"), "{reason}");
    // The namespaces view shows the same health.
    let (_, ns) = h.get_json("/v1/namespaces").await;
    let flaky_ns = named(&ns["namespaces"], "flaky").clone();
    assert_eq!(flaky_ns["health"]["ready"], false, "{flaky_ns}");

    h.flaky.store(true, Ordering::SeqCst);
    assert!(
        h.becomes_ready(Duration::from_secs(10)).await,
        "readiness never came back after recovery: {:?}",
        h.get_json("/readyz").await
    );
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn readiness_is_503_while_a_circuit_breaker_is_open() {
    let h = Harness::start("").await;
    // Three backend failures open the faulty backend's circuit; its next
    // passing health check (every second) closes it again. Should a check
    // land between the failures and the probe, open it again.
    let mut seen = None;
    for attempt in 0..5 {
        for i in 0..3 {
            let r = h.get_kv("faulty", &format!("fail/{attempt}/{i}")).await;
            assert_error(r, StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE").await;
        }
        let (status, body) = h.get_json("/readyz").await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            seen = Some(body);
            break;
        }
    }
    let body = seen.expect("readiness never saw the open circuit");
    assert_eq!(body["status"], "not_ready");
    let reason = body["reasons"][0].as_str().unwrap();
    assert!(reason.contains("'faulty'"), "{reason}");
    assert!(reason.contains("circuit breaker open"), "{reason}");
    let faulty = named(&body["backends"], "faulty").clone();
    assert_eq!(faulty["circuit"], "open", "{faulty}");
    assert_eq!(faulty["up"], true, "{faulty}");
    // While open, requests are refused at once.
    let r = h.get_kv("faulty", "k").await;
    assert_error(r, StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE").await;
    assert!(
        h.becomes_ready(Duration::from_secs(5)).await,
        "the circuit never closed: {:?}",
        h.get_json("/readyz").await
    );
    h.server.stop().await.unwrap();
}

// ---- introspection ----

#[tokio::test]
async fn the_actor_tree_is_served_as_json() {
    let h = Harness::start("").await;
    let (status, root) = h.get_json("/v1/actors").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(root["name"], "prism");
    assert_eq!(root["supervisor"], true);
    assert_eq!(root["parent"], Value::Null);
    assert_eq!(root["state"], "running");
    let children: Vec<&str> = root["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(children, ["backends", "sessions"]);
    let backends = &root["children"][0];
    assert_eq!(backends["parent"], root["id"]);
    let pool = named(&backends["children"], "pool:memory");
    assert_eq!(pool["parent"], backends["id"]);
    assert_eq!(pool["supervisor"], false);
    assert_eq!(pool["state"], "running");
    assert_eq!(pool["restarts"], 0);
    assert_eq!(pool["mailbox_depth"], 0);
    assert_eq!(pool["mailbox_capacity"], 1024);
    assert!(pool["children"].as_array().unwrap().is_empty());
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn namespaces_list_their_backend_kind_settings_and_health() {
    let h = Harness::start("").await;
    let (status, body) = h.get_json("/v1/namespaces").await;
    assert_eq!(status, StatusCode::OK);
    let list = body["namespaces"].as_array().unwrap();
    let names: Vec<&str> = list.iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["cache", "default", "faulty", "flaky", "small"]);
    let cache = &list[0];
    assert_eq!(cache["backend"], "memory");
    assert_eq!(cache["kind"], "memory");
    assert_eq!(cache["timeout_ms"], 1500);
    assert_eq!(cache["default_ttl_ms"], 600_000);
    assert_eq!(cache["max_value_size"], 1_048_576);
    assert_eq!(cache["health"]["ready"], true);
    let default = &list[1];
    assert_eq!(default["kind"], "sqlite");
    assert_eq!(default["default_ttl_ms"], Value::Null);
    assert_eq!(default["timeout_ms"], 5000);
    assert_eq!(list[2]["kind"], "faulty");
    assert_eq!(list[4]["max_value_size"], 16);
    h.server.stop().await.unwrap();
}

// ---- metrics ----

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_move_with_traffic_and_restarts() {
    let h = Harness::start("").await;
    let before = h.scrape().await;
    for name in [
        "prism_actor_restarts_total",
        "prism_mailbox_depth",
        "prism_pool_connections",
        "prism_sessions_active",
        "prism_backend_up",
    ] {
        assert!(!before.series(name).is_empty(), "{name} missing");
    }
    assert_eq!(
        before.get("prism_actor_restarts_total", &[("actor", "pool:faulty")]),
        Some(0.0)
    );
    assert_eq!(
        before.get("prism_backend_up", &[("backend", "memory")]),
        Some(1.0)
    );
    assert!(before
        .get(
            "prism_pool_connections",
            &[("backend", "embedded"), ("state", "in_use")]
        )
        .is_some());
    assert!(before
        .get("prism_mailbox_depth", &[("actor", "pool:memory")])
        .is_some());
    assert_eq!(before.types["prism_actor_restarts_total"], "counter");
    assert_eq!(before.types["prism_mailbox_depth"], "gauge");

    // Traffic: two gRPC gets and one REST get on `cache`, both APIs on an
    // unknown namespace, and a REST put over the value limit.
    let mut c = h.server.client().await.unwrap();
    for _ in 0..2 {
        c.get(as_client("metrics", get("cache", "k")))
            .await
            .unwrap();
    }
    let r = h.get_kv("cache", "k").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let e = c.get(get("nope", "k")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let r = h.get_kv("nope", "k").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = h.put_kv("small", "k", vec![0u8; 17]).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let after = h.scrape().await;
    let count = |m: &Metrics, labels: &[(&str, &str)]| m.get("prism_requests_total", labels);
    assert_eq!(
        count(
            &after,
            &[("namespace", "cache"), ("op", "get"), ("code", "OK")]
        ),
        Some(3.0)
    );
    assert_eq!(
        count(
            &after,
            &[
                ("namespace", "(unknown)"),
                ("op", "get"),
                ("code", "NOT_FOUND")
            ]
        ),
        Some(2.0)
    );
    assert_eq!(
        count(
            &after,
            &[
                ("namespace", "small"),
                ("op", "put"),
                ("code", "INVALID_ARGUMENT")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(after.types["prism_requests_total"], "counter");
    assert_eq!(after.types["prism_request_duration_seconds"], "histogram");
    let labels = [("namespace", "cache"), ("op", "get")];
    assert_eq!(
        after.get("prism_request_duration_seconds_count", &labels),
        Some(3.0)
    );
    let mut bounds: Vec<f64> = after
        .series("prism_request_duration_seconds_bucket")
        .into_iter()
        .filter(|s| s.labels["namespace"] == "cache" && s.labels["op"] == "get")
        .map(|s| s.labels["le"].parse::<f64>().unwrap())
        .collect();
    bounds.sort_by(f64::total_cmp);
    assert_eq!(bounds.first(), Some(&0.0001));
    assert_eq!(bounds[bounds.len() - 2], 5.0);
    assert!(bounds.last().unwrap().is_infinite());
    assert_eq!(
        after.get(
            "prism_request_duration_seconds_bucket",
            &[("namespace", "cache"), ("op", "get"), ("le", "+Inf")]
        ),
        Some(3.0)
    );
    assert!(after.get("prism_sessions_active", &[]).unwrap() >= 1.0);

    // A panic in the faulty backend restarts its pool actor.
    let e = c.get(get("faulty", "panic")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Internal);
    let restarts = std::sync::Mutex::new(None);
    assert!(
        eventually(Duration::from_secs(5), || async {
            let n = h
                .scrape()
                .await
                .get("prism_actor_restarts_total", &[("actor", "pool:faulty")]);
            *restarts.lock().unwrap() = n;
            n == Some(1.0)
        })
        .await,
        "restarts of pool:faulty: {:?}",
        restarts.lock().unwrap()
    );
    h.server.stop().await.unwrap();
}

// ---- REST key-value API ----

#[tokio::test]
async fn rest_put_get_head_delete_round_trip() {
    let h = Harness::start("").await;
    let value: Vec<u8> = (0..=255u8).collect();
    let r = h.put_kv("default", "user/1", value.clone()).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);

    let r = h.get_kv("default", "user/1").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-prism-ttl-ms"], "-1");
    assert_eq!(r.bytes().await.unwrap(), Bytes::from(value));

    // An explicit TTL, and the namespace default when there is none.
    let r = h
        .http
        .put(format!("{}?ttl_ms=60000", h.kv("default", "ttl")))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = h.get_kv("default", "ttl").await;
    let ttl: i64 = r.headers()["x-prism-ttl-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60_000).contains(&ttl), "{ttl}");
    h.put_kv("cache", "defaulted", "x").await;
    let r = h.get_kv("cache", "defaulted").await;
    let ttl: i64 = r.headers()["x-prism-ttl-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ttl > 500_000 && ttl <= 600_000, "{ttl}");

    let r = h.http.head(h.kv("default", "user/1")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = h
        .http
        .delete(h.kv("default", "user/1"))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(r).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["existed"], true);
    let r = h
        .http
        .delete(h.kv("default", "user/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await.1["existed"], false);
    let r = h.http.head(h.kv("default", "user/1")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = h.get_kv("default", "user/1").await;
    let message = assert_error(r, StatusCode::NOT_FOUND, "NOT_FOUND").await;
    assert!(message.contains("user/1"), "{message}");
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn rest_errors_have_the_grpc_validation_and_http_statuses() {
    let h = Harness::start("").await;
    // 404: unknown namespace.
    let r = h.get_kv("nope", "k").await;
    let message = assert_error(r, StatusCode::NOT_FOUND, "NOT_FOUND").await;
    assert!(message.contains("unknown namespace 'nope'"), "{message}");
    let r = h.get("/v1/kv/nope").await;
    assert_error(r, StatusCode::NOT_FOUND, "NOT_FOUND").await;
    // 400: empty key, long key, NUL, bad TTL, bad cursor, bad limit.
    let r = h.get("/v1/kv/cache/").await;
    assert_error(r, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT").await;
    let r = h.get_kv("cache", &"k".repeat(1025)).await;
    assert_error(r, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT").await;
    let r = h.put_kv("cache", "a\0b", "v").await;
    assert_error(r, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT").await;
    let r = h
        .http
        .put(format!("{}?ttl_ms=soon", h.kv("cache", "k")))
        .body("v")
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT").await;
    let r = h.get("/v1/kv/cache?cursor=!!").await;
    assert_error(r, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT").await;
    let r = h.get("/v1/kv/cache?limit=-1").await;
    assert_error(r, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT").await;
    // 413: one byte over the namespace limit, with and without a length.
    let r = h.put_kv("small", "k", vec![1u8; 17]).await;
    let message = assert_error(r, StatusCode::PAYLOAD_TOO_LARGE, "INVALID_ARGUMENT").await;
    assert!(message.contains("max_value_size"), "{message}");
    let (status, body) = chunked_put(&h, "/v1/kv/small/k", &[&[1u8; 10], &[2u8; 10]]).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("INVALID_ARGUMENT"), "{body}");
    let r = h.put_kv("small", "k", vec![1u8; 16]).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    // Past the default 1 MiB limit, and past actix's own payload limit.
    let r = h.put_kv("cache", "big", vec![1u8; 1_048_577]).await;
    assert_error(r, StatusCode::PAYLOAD_TOO_LARGE, "INVALID_ARGUMENT").await;
    let r = h.put_kv("cache", "big", vec![1u8; 1_048_576]).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    // 503: the backend is unavailable.
    let r = h.get_kv("faulty", "fail/x").await;
    assert_error(r, StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE").await;
    // 504: the client's deadline passes first.
    let r = h
        .http
        .get(h.kv("faulty", "slow/3000/x"))
        .header("grpc-timeout", "200m")
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::GATEWAY_TIMEOUT, "DEADLINE_EXCEEDED").await;
    h.server.stop().await.unwrap();
}

/// A PUT whose body is sent in chunks, without a content length, over a
/// raw connection; returns the status and the response text.
async fn chunked_put(h: &Harness, path: &str, chunks: &[&[u8]]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(h.server.http_addr)
        .await
        .unwrap();
    let mut req = format!(
        "PUT {path} HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        h.server.http_addr
    )
    .into_bytes();
    for chunk in chunks {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    conn.write_all(&req).await.unwrap();
    let mut response = Vec::new();
    conn.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    (status, text)
}

#[tokio::test]
async fn rest_answers_429_when_a_client_has_too_many_requests_in_flight() {
    let h = Harness::start("[sessions]\nmax_in_flight = 1\n").await;
    let held = tokio::spawn(
        h.http
            .get(h.kv("faulty", "block/1"))
            .header("x-client-id", "greedy")
            .send(),
    );
    assert!(reaches(&h.probe.started, 1, Duration::from_secs(5)).await);
    let r = h
        .http
        .get(h.kv("cache", "k"))
        .header("x-client-id", "greedy")
        .send()
        .await
        .unwrap();
    let message = assert_error(r, StatusCode::TOO_MANY_REQUESTS, "RESOURCE_EXHAUSTED").await;
    assert!(message.contains("greedy"), "{message}");
    // Another client is not affected.
    let r = h
        .http
        .get(h.kv("cache", "k"))
        .header("x-client-id", "modest")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // The held request ends at the namespace timeout.
    let r = held.await.unwrap().unwrap();
    assert_error(r, StatusCode::GATEWAY_TIMEOUT, "DEADLINE_EXCEEDED").await;
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn keys_with_reserved_characters_work_percent_encoded() {
    let h = Harness::start("").await;
    let mut c = h.server.client().await.unwrap();
    let keys = [
        "a/b/c",
        "trailing/",
        "100%",
        "%2F literally",
        "q?x=1&y#frag",
        "plus+and space",
        "ünï/cødé",
        "new\nline",
        "semi;colon,comma",
    ];
    for (i, key) in keys.iter().enumerate() {
        let value = format!("v{i}");
        let r = h.put_kv("cache", key, value.clone()).await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT, "{key:?}");
        // gRPC sees exactly this key.
        let got = c.get(get("cache", key)).await.unwrap().into_inner();
        assert!(got.found, "{key:?} not found over gRPC");
        assert_eq!(got.value, Bytes::from(value.clone()), "{key:?}");
        let r = h.get_kv("cache", key).await;
        assert_eq!(r.status(), StatusCode::OK, "{key:?}");
        assert_eq!(r.text().await.unwrap(), value, "{key:?}");
    }
    // A literal `/` in the path is part of the key, same as `%2F`.
    let r = h.get("/v1/kv/cache/a/b/c").await;
    assert_eq!(r.text().await.unwrap(), "v0");
    let r = h.get("/v1/kv/cache/a%2fb%2Fc").await;
    assert_eq!(r.text().await.unwrap(), "v0");
    // Bytes that are not UTF-8 are a bad key, not some other key.
    let r = h.get("/v1/kv/cache/%FF%FE").await;
    assert_error(r, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT").await;
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn rest_scan_pages_with_cursors_and_keys_only() {
    let h = Harness::start("").await;
    for i in 0..5 {
        h.put_kv("default", &format!("scan/{i}"), format!("value-{i}"))
            .await;
    }
    h.put_kv("default", "other", "x").await;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut keys = Vec::new();
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let url = format!(
            "{}?prefix=scan%2F&limit=2&cursor={}",
            h.url("/v1/kv/default"),
            utf8_percent_encode(&cursor, NON_ALPHANUMERIC)
        );
        let (status, body) = json_of(h.http.get(url).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        pages += 1;
        for item in body["items"].as_array().unwrap() {
            let key = item["key"].as_str().unwrap().to_owned();
            let value = b64.decode(item["value"].as_str().unwrap()).unwrap();
            assert_eq!(
                String::from_utf8(value).unwrap(),
                format!("value-{}", &key["scan/".len()..])
            );
            keys.push(key);
        }
        cursor = body["next_cursor"].as_str().unwrap().to_owned();
        if cursor.is_empty() {
            break;
        }
    }
    assert_eq!(keys, ["scan/0", "scan/1", "scan/2", "scan/3", "scan/4"]);
    assert_eq!(pages, 3);
    let (_, body) = h.get_json("/v1/kv/default?keys_only=true").await;
    let items = body["items"].as_array().unwrap();
    assert_eq!(items.len(), 6);
    assert!(items.iter().all(|i| i.get("value").is_none()), "{body}");
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn rest_and_grpc_see_each_others_writes() {
    let h = Harness::start("").await;
    let mut c = h.server.client().await.unwrap();
    // REST write, gRPC read.
    h.http
        .put(format!("{}?ttl_ms=30000", h.kv("default", "shared/rest")))
        .body("from rest")
        .send()
        .await
        .unwrap();
    let got = c
        .get(get("default", "shared/rest"))
        .await
        .unwrap()
        .into_inner();
    assert!(got.found);
    assert_eq!(got.value, Bytes::from_static(b"from rest"));
    assert!(got.ttl_ms > 0 && got.ttl_ms <= 30_000, "{}", got.ttl_ms);
    // gRPC write, REST read, REST delete, gRPC read.
    c.put(put("default", "shared/grpc", b"from grpc", 0))
        .await
        .unwrap();
    let r = h.get_kv("default", "shared/grpc").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap(), "from grpc");
    let r = h
        .http
        .delete(h.kv("default", "shared/grpc"))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await.1["existed"], true);
    let got = c
        .get(get("default", "shared/grpc"))
        .await
        .unwrap()
        .into_inner();
    assert!(!got.found);
    h.server.stop().await.unwrap();
}

// ---- logs of the real binary ----

const BINARY_SETTINGS: &str = r#"
[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
shutdown_grace = "5s"

[log]
level = "info"

[supervisor]
max_restarts = 1000
backoff_initial = "20ms"
backoff_max = "200ms"

# A database under a file, not a folder: every connect fails.
[backends.broken]
kind = "sqlite"
path = "/dev/null/prism.db"

[backends.memory]
kind = "memory"

[namespaces.default]
backend = "memory"

[namespaces.broken]
backend = "broken"
"#;

/// Asserts that every line of the log so far is a JSON event.
fn assert_json_lines(prism: &Prism) {
    for line in prism.log() {
        let v = line
            .json()
            .unwrap_or_else(|| panic!("log line is not JSON: {:?}", line.text));
        assert!(v["timestamp"].is_string(), "{v}");
        assert!(v["level"].is_string(), "{v}");
        assert!(v["message"].is_string(), "{v}");
    }
}

#[tokio::test]
async fn json_logs_parse_and_a_restart_logs_actor_attempt_backoff_and_cause() {
    let dir = settings_dir(BINARY_SETTINGS);
    let mut cmd = serve_command(dir.path());
    cmd.env("PRISM__LOG__FORMAT", "json");
    let mut prism = Prism::spawn(cmd);
    let restart = prism
        .wait_for_line(
            |l| l.is("actor restarting") && l.field("actor").as_deref() == Some("pool:broken"),
            Duration::from_secs(20),
        )
        .await
        .unwrap_or_else(|log| panic!("no restart line within 20 s; got:\n{log}"));
    let restart = restart.json().expect("a JSON event").clone();
    let http_addr = prism.http_addr().await;
    assert_json_lines(&prism);
    assert_eq!(restart["level"], "WARN", "{restart}");
    assert!(restart["attempt"].as_u64().unwrap() >= 1, "{restart}");
    assert!(restart["backoff_ms"].is_u64(), "{restart}");
    assert!(restart["actor_id"].is_u64(), "{restart}");
    assert_eq!(restart["supervisor"], "backends", "{restart}");
    let cause = restart["reason"].as_str().unwrap();
    assert!(cause.contains("/dev/null"), "{restart}");

    // The binary serves the admin plane, and readiness names the broken backend.
    let admin = Admin::new(format!("http://{http_addr}"));
    assert_eq!(admin.status("/healthz").await, Some(StatusCode::OK));
    let (status, body) = admin.get_json("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["reasons"][0].as_str().unwrap().contains("'broken'"),
        "{body}"
    );
    drop(admin);

    prism.signal(Signal::Term);
    let status = prism.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
    // Every line up to the exit is JSON too.
    assert_json_lines(&prism);
}
