//! Prometheus metrics of one gateway: request counts and latencies recorded
//! as requests end, and the live figures of the actor tree, the backends and
//! the sessions refreshed at scrape time.
//!
//! Each gateway owns its recorder instead of installing a global one, so that
//! several gateways in one process (tests) keep separate counts.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use metrics::{Key, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use prism_actors::ActorInfo;
use tonic::Code;

use crate::backend::PoolStats;

/// Requests by `namespace`, `op` and `code` (a gRPC status code name).
pub const REQUESTS_TOTAL: &str = "prism_requests_total";
/// Request latency histogram by `namespace` and `op`, in seconds.
pub const REQUEST_DURATION_SECONDS: &str = "prism_request_duration_seconds";
/// Supervised restarts by `actor`.
pub const ACTOR_RESTARTS_TOTAL: &str = "prism_actor_restarts_total";
/// Messages waiting in a mailbox, by `actor`.
pub const MAILBOX_DEPTH: &str = "prism_mailbox_depth";
/// Backend connections by `backend` and `state` (`in_use`, `idle`).
pub const POOL_CONNECTIONS: &str = "prism_pool_connections";
/// Session actors alive.
pub const SESSIONS_ACTIVE: &str = "prism_sessions_active";
/// 1 when a backend is connected and its last health check passed, else 0.
pub const BACKEND_UP: &str = "prism_backend_up";
/// Requests denied by authentication or authorization, by `reason`.
pub const AUTH_DENIED_TOTAL: &str = "prism_auth_denied_total";

/// 1 when this instance purges a backend shared with other instances (it
/// holds the purge lease or lock), 0 when another instance does, by
/// `backend`; absent for backends that purge without coordination.
pub const PURGE_LEADER: &str = "prism_purge_leader";
/// Purges this instance ran, by `backend`.
pub const PURGES_TOTAL: &str = "prism_purges_total";

/// The `namespace` label of a request that named no configured namespace.
/// Not a valid namespace name, so it cannot collide with one; a single value
/// keeps clients from creating a series per made-up name.
pub const UNKNOWN_NAMESPACE: &str = "(unknown)";

/// Upper bounds of the latency buckets, 0.1 ms to 5 s.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Session actors are named `session:<client>`. They are left out of the
/// per-actor series: one series per client would grow without bound, and
/// `prism_sessions_active` already counts them.
const SESSION_ACTOR_PREFIX: &str = "session:";

enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// The HELP text of every series.
const DESCRIPTIONS: [(Kind, &str, Option<Unit>, &str); 10] = [
    (
        Kind::Counter,
        REQUESTS_TOTAL,
        Some(Unit::Count),
        "Key-value requests (gRPC and REST) by namespace, operation and gRPC status code.",
    ),
    (
        Kind::Histogram,
        REQUEST_DURATION_SECONDS,
        Some(Unit::Seconds),
        "Key-value request latency by namespace and operation.",
    ),
    (
        Kind::Counter,
        ACTOR_RESTARTS_TOTAL,
        Some(Unit::Count),
        "Supervised restarts by actor.",
    ),
    (
        Kind::Gauge,
        MAILBOX_DEPTH,
        Some(Unit::Count),
        "Messages waiting in an actor's mailbox.",
    ),
    (
        Kind::Gauge,
        POOL_CONNECTIONS,
        Some(Unit::Count),
        "Backend connections by state (in_use, idle) at the last health check.",
    ),
    (
        Kind::Gauge,
        SESSIONS_ACTIVE,
        Some(Unit::Count),
        "Session actors alive.",
    ),
    (
        Kind::Gauge,
        BACKEND_UP,
        None,
        "1 when the backend is connected and its last health check passed, else 0.",
    ),
    (
        Kind::Counter,
        AUTH_DENIED_TOTAL,
        Some(Unit::Count),
        "Requests denied by authentication or authorization, by reason (missing, malformed, unknown_token, unknown_certificate, forbidden).",
    ),
    (
        Kind::Gauge,
        PURGE_LEADER,
        None,
        "1 when this instance purges the shared backend (holds its purge lease or lock), 0 when another instance does.",
    ),
    (
        Kind::Counter,
        PURGES_TOTAL,
        Some(Unit::Count),
        "Purges of expired entries this instance ran, by backend.",
    ),
];

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// The metrics of one gateway. Cheap to clone; clones share the counts.
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    handles: Arc<RwLock<HashMap<RequestKey, (metrics::Counter, metrics::Histogram)>>>,
}

/// Namespace, operation and gRPC code of a request.
type RequestKey = (SharedString, &'static str, i32);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty set of metrics with its own recorder.
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(REQUEST_DURATION_SECONDS.to_owned()),
                &DURATION_BUCKETS,
            )
            // Invariant: the bucket list is a non-empty constant, the only
            // condition under which this fails.
            .expect("non-empty bucket list");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        for (kind, name, unit, help) in DESCRIPTIONS {
            let key = metrics::KeyName::from_const_str(name);
            match kind {
                Kind::Counter => recorder.describe_counter(key, unit, help.into()),
                Kind::Gauge => recorder.describe_gauge(key, unit, help.into()),
                Kind::Histogram => recorder.describe_histogram(key, unit, help.into()),
            }
        }
        Metrics {
            recorder: Arc::new(recorder),
            handle,
            handles: Arc::default(),
        }
    }

    /// Records one finished key-value request: `namespace` is `None` when the
    /// request named an unknown namespace; `code` is its gRPC status (`Ok`
    /// for success; a REST request records the code its gRPC twin would).
    pub fn request(
        &self,
        namespace: Option<Arc<str>>,
        op: &'static str,
        code: Code,
        elapsed: Duration,
    ) {
        let namespace: SharedString = match namespace {
            Some(n) => n.into(),
            None => SharedString::const_str(UNKNOWN_NAMESPACE),
        };
        // Handles are cached: registering builds and hashes the label set,
        // which on the hot path costs more than the recording itself. The
        // cache is bounded by namespaces × operations × codes.
        let key = (namespace, op, code as i32);
        let cached = self
            .handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let (counter, histogram) = match cached {
            Some(h) => h,
            None => {
                let (namespace, op, _) = key.clone();
                let counter = self.recorder.register_counter(
                    &Key::from_parts(
                        REQUESTS_TOTAL,
                        vec![
                            Label::new("namespace", namespace.clone()),
                            Label::new("op", op),
                            Label::new("code", crate::error::code_name(code)),
                        ],
                    ),
                    &METADATA,
                );
                let histogram = self.recorder.register_histogram(
                    &Key::from_parts(
                        REQUEST_DURATION_SECONDS,
                        vec![Label::new("namespace", namespace), Label::new("op", op)],
                    ),
                    &METADATA,
                );
                self.handles
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, (counter.clone(), histogram.clone()));
                (counter, histogram)
            }
        };
        counter.increment(1);
        histogram.record(elapsed.as_secs_f64());
    }

    /// Sets the per-actor series from a tree snapshot: restart counts and
    /// mailbox depths of supervisors and pool actors (sessions excluded).
    pub fn observe_tree(&self, root: &ActorInfo) {
        for actor in root.iter() {
            if actor.name.starts_with(SESSION_ACTOR_PREFIX) {
                continue;
            }
            let labels = || vec![Label::new("actor", actor.name.clone())];
            self.recorder
                .register_counter(&Key::from_parts(ACTOR_RESTARTS_TOTAL, labels()), &METADATA)
                .absolute(u64::from(actor.restarts));
            self.recorder
                .register_gauge(&Key::from_parts(MAILBOX_DEPTH, labels()), &METADATA)
                .set(actor.mailbox_depth as f64);
        }
    }

    /// Sets the series of one backend: up, and its connections by state.
    pub fn observe_backend(&self, backend: &str, up: bool, connections: PoolStats) {
        let name: SharedString = backend.to_owned().into();
        self.recorder
            .register_gauge(
                &Key::from_parts(BACKEND_UP, vec![Label::new("backend", name.clone())]),
                &METADATA,
            )
            .set(if up { 1.0 } else { 0.0 });
        for (state, n) in [("in_use", connections.in_use), ("idle", connections.idle)] {
            self.recorder
                .register_gauge(
                    &Key::from_parts(
                        POOL_CONNECTIONS,
                        vec![
                            Label::new("backend", name.clone()),
                            Label::new("state", state),
                        ],
                    ),
                    &METADATA,
                )
                .set(f64::from(n));
        }
    }

    /// Counts one denied request.
    pub fn auth_denied(&self, reason: &'static str) {
        self.recorder
            .register_counter(
                &Key::from_parts(AUTH_DENIED_TOTAL, vec![Label::new("reason", reason)]),
                &METADATA,
            )
            .increment(1);
    }

    /// Sets the purge series of one backend: whether this instance purges
    /// it (left out when `leader` is `None`: nothing coordinates its
    /// purges) and how many purges it ran.
    pub fn observe_purge(&self, backend: &str, leader: Option<bool>, purges: u64) {
        let name: SharedString = backend.to_owned().into();
        if let Some(leader) = leader {
            self.recorder
                .register_gauge(
                    &Key::from_parts(PURGE_LEADER, vec![Label::new("backend", name.clone())]),
                    &METADATA,
                )
                .set(if leader { 1.0 } else { 0.0 });
        }
        self.recorder
            .register_counter(
                &Key::from_parts(PURGES_TOTAL, vec![Label::new("backend", name)]),
                &METADATA,
            )
            .absolute(purges);
    }

    /// Sets the number of live sessions.
    pub fn observe_sessions(&self, active: usize) {
        self.recorder
            .register_gauge(&Key::from_name(SESSIONS_ACTIVE), &METADATA)
            .set(active as f64);
    }

    /// Everything recorded, in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Folds recorded latencies into their histograms. Rendering does it too;
    /// this bounds the memory held between scrapes, so call it periodically.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Runs [`Metrics::run_upkeep`] every `every` on the current runtime until
    /// the returned handle is aborted.
    pub fn spawn_upkeep(&self, every: Duration) -> tokio::task::AbortHandle {
        let metrics = self.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                metrics.run_upkeep();
            }
        })
        .abort_handle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_and_timed_by_label() {
        let m = Metrics::new();
        m.request(
            Some("cache".into()),
            "get",
            Code::Ok,
            Duration::from_micros(50),
        );
        m.request(
            Some("cache".into()),
            "get",
            Code::Ok,
            Duration::from_millis(7),
        );
        m.request(None, "put", Code::NotFound, Duration::from_millis(1));
        let text = m.render();
        assert!(
            text.contains(r#"prism_requests_total{namespace="cache",op="get",code="OK"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"prism_requests_total{namespace="(unknown)",op="put",code="NOT_FOUND"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"prism_request_duration_seconds_bucket{namespace="cache",op="get",le="0.0001"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"prism_request_duration_seconds_bucket{namespace="cache",op="get",le="5"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE prism_request_duration_seconds histogram"));
    }

    #[test]
    fn gauges_and_restart_counts_follow_the_latest_observation() {
        let m = Metrics::new();
        m.observe_backend("memory", true, PoolStats { in_use: 2, idle: 6 });
        m.observe_backend("memory", false, PoolStats { in_use: 0, idle: 0 });
        m.observe_sessions(3);
        let text = m.render();
        assert!(
            text.contains(r#"prism_backend_up{backend="memory"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"prism_pool_connections{backend="memory",state="idle"} 0"#),
            "{text}"
        );
        assert!(text.contains("prism_sessions_active 3"), "{text}");
    }

    #[test]
    fn purge_leadership_shows_only_for_coordinated_backends() {
        let m = Metrics::new();
        m.observe_purge("pg", Some(true), 4);
        m.observe_purge("pg", Some(false), 5);
        m.observe_purge("memory", None, 7);
        let text = m.render();
        assert!(
            text.contains(r#"prism_purge_leader{backend="pg"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"prism_purges_total{backend="pg"} 5"#),
            "{text}"
        );
        assert!(
            !text.contains(r#"prism_purge_leader{backend="memory"}"#),
            "{text}"
        );
        assert!(
            text.contains(r#"prism_purges_total{backend="memory"} 7"#),
            "{text}"
        );
    }
}
