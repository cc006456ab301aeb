//! Outages of real backend servers under steady load. Each test starts its
//! own throwaway server (a PostgreSQL cluster made by `initdb` in a temp dir,
//! or a `redis-server` child) on a free loopback port, so that stopping it
//! never disturbs the shared servers or tests running in parallel, and runs
//! the gateway in-process against it. With writers putting unique keys into
//! the backend's namespace and into two others, the server is stopped hard,
//! started again, and the tests check that the namespace fails fast with
//! UNAVAILABLE while the others keep working, that the supervisor restarts
//! the pool actor with growing backoff, that the namespace recovers on its
//! own, and that every acknowledged Put is readable afterwards.

mod common;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use common::db::{gateway_waits_for_a_lock, RowLock};
use common::requests::{get, put, with_timeout};
use common::throwaway::{Throwaway, ThrowawayPostgres, ThrowawayRedis};
use common::{eventually, settings, TestServer};
use prism::proto::key_value_client::KeyValueClient;
use prism::proto::PutRequest;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::Code;
use tracing::field::{Field, Visit};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::Layer;

/// The deadline every Put of the load carries.
const DEADLINE: Duration = Duration::from_secs(1);
/// How late past its deadline a request may be answered: scheduling on a
/// busy two-core machine, not backend time.
const DEADLINE_MARGIN: Duration = Duration::from_millis(300);
/// How long the load runs against a healthy server, and again after recovery
/// (part of the scenario, not a wait for an event).
const HEALTHY_LOAD_PERIOD: Duration = Duration::from_secs(1);
/// How long the server stays down while the load runs.
const OUTAGE_PERIOD: Duration = Duration::from_secs(3);
/// The longest the namespace may take to recover once the server is started.
const RECOVERY_LIMIT: Duration = Duration::from_secs(5);
/// The pause between two Puts of one writer: steady, not flat out, so that
/// failing fast does not turn into a busy loop and the check stays short.
const PACE: Duration = Duration::from_millis(4);
/// Writers on the namespace of the server under test.
const TARGET_WRITERS: usize = 4;
/// Writers on each of the other namespaces.
const OTHER_WRITERS: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_fails_fast_recovers_and_loses_no_acknowledged_put() {
    let log = captured_log();
    let mut pg = ThrowawayPostgres::start()
        .await
        .expect("throwaway postgres");
    let backend = format!(
        r#"
[backends.pg]
kind = "postgres"
url = "{url}"
pool_size = 4
min_connections = 2
health_interval = "200ms"
breaker_cooldown = "300ms"
acquire_timeout = "1s"
"#,
        url = pg.url()
    );
    outage_under_load(&mut pg, "pg", &backend, log).await;
}

/// With `min_connections` > 0, a query cut off by the server going away
/// makes sqlx reconnect in the background for minutes while holding a pool
/// slot, and `PgPool::close()` waits for every slot. A failed pool actor must
/// neither wait for that nor admit requests meanwhile: it trips the circuit
/// first thing and bounds the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_postgres_pool_actor_with_min_connections_stops_at_once() {
    let log = captured_log();
    let name = "pg_locked";
    let actor = format!("pool:{name}");
    let pg = ThrowawayPostgres::start()
        .await
        .expect("throwaway postgres");
    let backend = format!(
        r#"
[backends.{name}]
kind = "postgres"
url = "{url}"
pool_size = 4
min_connections = 4
health_interval = "200ms"
breaker_cooldown = "300ms"
acquire_timeout = "1s"
"#,
        url = pg.url()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = TestServer::start(settings(&gateway_toml(dir.path(), name, &backend)))
        .await
        .expect("gateway starts");
    let client = gateway.client().await.expect("client");
    wait_until_ready(&client, name, "locked").await;

    // A row lock taken behind the gateway's back keeps one of its queries
    // running until the server goes away.
    let locker = RowLock::take(&pg.url(), "prism_kv", name, "locked")
        .await
        .expect("lock the row");
    let mut c = client.clone();
    let blocked = tokio::spawn(async move {
        let mut req = put_request(name, "locked");
        req.set_timeout(Duration::from_secs(10));
        c.put(req).await
    });
    assert!(
        gateway_waits_for_a_lock(&pg.url(), Duration::from_secs(5)).await,
        "the gateway's put never waited for the lock"
    );
    let watcher = common::db::bounded_pool(&pg.url()).await.expect("connect");
    let processes: Vec<i32> =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()")
            .fetch_all(&watcher)
            .await
            .expect("list the server's processes");
    watcher.close().await;

    // The server dies so that new connections are already refused when the
    // blocked query's connection breaks; with `pg_ctl stop` the backends may
    // go first, and sqlx's reconnect then fails at once instead of retrying.
    pg.kill(&processes).await.expect("kill the server");
    drop(locker);
    let cut_off = blocked.await.expect("put task");
    assert!(cut_off.is_err(), "the blocked put succeeded");
    let failed = eventually(Duration::from_secs(5), || async {
        logged(log, "actor failed", &actor)
    })
    .await;
    assert!(failed, "{actor} never failed");

    // Once failed, the pool actor should be restarting and its namespace
    // answering UNAVAILABLE at once.
    let started = Instant::now();
    let mut c = client.clone();
    let answer = c.put(put_request(name, "during")).await;
    let took = started.elapsed();
    assert!(
        matches!(&answer, Err(s) if s.code() == Code::Unavailable) && took < DEADLINE / 4,
        "a put while {actor} had failed got {:?} after {took:?}",
        answer.map_err(|s| s.code())
    );
    let restarting = eventually(Duration::from_secs(1), || async {
        logged(log, "actor restarting", &actor)
    })
    .await;
    assert!(restarting, "{actor} did not restart within 1 s of failing");
    gateway.stop().await.expect("clean stop");
}

/// True when an event with `message` about `actor` was captured.
fn logged(log: &Mutex<Vec<Captured>>, message: &str, actor: &str) -> bool {
    log.lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .any(|e| e.message == message && e.field("actor") == Some(actor))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_fails_fast_recovers_and_loses_no_acknowledged_put() {
    let log = captured_log();
    let mut redis = ThrowawayRedis::start().await.expect("throwaway redis");
    let backend = format!(
        r#"
[backends.redis]
kind = "redis"
url = "{url}"
pool_size = 4
health_interval = "200ms"
breaker_cooldown = "300ms"
acquire_timeout = "1s"
connect_timeout = "1s"
command_timeout = "1s"
"#,
        url = redis.url()
    );
    outage_under_load(&mut redis, "redis", &backend, log).await;
}

/// The scenario, for a backend named `name` (its namespace has the same
/// name) on `server`, configured by `backend_toml`. Each test names its
/// backend differently, since they share the captured log.
async fn outage_under_load(
    server: &mut impl Throwaway,
    name: &'static str,
    backend_toml: &str,
    log: &'static Mutex<Vec<Captured>>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = TestServer::start(settings(&gateway_toml(dir.path(), name, backend_toml)))
        .await
        .expect("gateway starts");
    let client = gateway.client().await.expect("client");

    // The pool actor connects in the background; load starts once it has.
    wait_until_ready(&client, name, "ready").await;

    let t0 = Instant::now();
    let load = Load::start(
        &client,
        &[
            (name, TARGET_WRITERS),
            ("cache", OTHER_WRITERS),
            ("default", OTHER_WRITERS),
        ],
    );
    tokio::time::sleep(HEALTHY_LOAD_PERIOD).await;

    let stop_at = Instant::now();
    server.stop().await.expect("stop the server");
    let stopped_at = Instant::now();
    tokio::time::sleep(OUTAGE_PERIOD).await;

    let restart_at = Instant::now();
    server.start_again().await.expect("start the server again");
    let ready_at = Instant::now();
    let recovered = eventually(RECOVERY_LIMIT, || async {
        load.last_ok(name).is_some_and(|t| t > ready_at)
    })
    .await;
    tokio::time::sleep(HEALTHY_LOAD_PERIOD).await;
    let samples = load.stop().await;

    let timeline = Timeline {
        t0,
        stop_at,
        stopped_at,
        restart_at,
        ready_at,
    };
    let report = Report::new(name, &samples, &timeline);
    println!("{report}");
    let events = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let actor = format!("pool:{name}");
    let ours = |e: &&Captured| {
        e.at >= t0 && (e.field("actor") == Some(actor.as_str()) || e.field("backend") == Some(name))
    };
    for e in events.iter().filter(ours) {
        println!(
            "  log {:>5} ms: {} {:?}",
            e.at.saturating_duration_since(t0).as_millis(),
            e.message,
            e.fields
        );
    }

    // Recovery is timed from when the server accepts connections again: how
    // long PostgreSQL takes to replay its log is not the gateway's doing.
    assert!(
        recovered,
        "namespace '{name}' did not recover within {RECOVERY_LIMIT:?} of the server being back"
    );
    let (first_ok, recovery) = report
        .first_ok_after_ready
        .expect("a success after the restart");
    assert!(
        recovery <= RECOVERY_LIMIT,
        "namespace '{name}' recovered {recovery:?} after the server was back"
    );

    // Every request was answered by its deadline.
    let late: Vec<String> = samples
        .iter()
        .filter(|s| s.latency > DEADLINE + DEADLINE_MARGIN)
        .map(|s| format!("{:?}: {}", s.code, s.relative(t0)))
        .collect();
    assert!(
        late.is_empty(),
        "{} requests were answered past their deadline ({timeline:?}): {:#?}",
        late.len(),
        &late[..late.len().min(5)]
    );

    // The other namespaces never noticed, and kept taking writes throughout.
    for other in ["cache", "default"] {
        let errors: Vec<String> = samples
            .iter()
            .filter(|s| s.namespace == other && s.code.is_some())
            .map(|s| format!("{:?}: {}", s.code, s.relative(t0)))
            .collect();
        assert!(
            errors.is_empty(),
            "namespace '{other}' failed {} requests during the '{name}' outage: {:#?}",
            errors.len(),
            &errors[..errors.len().min(5)]
        );
        let during = samples
            .iter()
            .filter(|s| s.namespace == other && s.started >= stopped_at && s.started < restart_at)
            .count();
        assert!(during > 0, "no writes reached '{other}' during the outage");
    }

    // The namespace under test: before the stop everything worked; once the
    // server was gone every answer was UNAVAILABLE, except for requests that
    // were in flight when it went (which may also wait out their deadline);
    // once a Put had succeeded again, everything worked.
    for s in samples.iter().filter(|s| s.namespace == name) {
        let in_flight_at_stop = s.started < stopped_at && s.finished() > stop_at;
        let allowed: &[Option<Code>] = if s.finished() <= stop_at || s.started >= first_ok {
            &[None]
        } else if in_flight_at_stop {
            // The client's own timer (CANCELLED) races the server's
            // DEADLINE_EXCEEDED at the deadline.
            &[
                None,
                Some(Code::Unavailable),
                Some(Code::DeadlineExceeded),
                Some(Code::Cancelled),
            ]
        } else if s.started < restart_at {
            &[Some(Code::Unavailable)]
        } else {
            &[None, Some(Code::Unavailable)]
        };
        assert!(
            allowed.contains(&s.code),
            "answer {:?} to {} ({timeline:?})",
            s.code,
            s.relative(t0)
        );
    }
    let fast_fail = report.unavailable_latency_p90;
    assert!(
        fast_fail < DEADLINE / 4,
        "UNAVAILABLE answers are not fast: p90 {fast_fail:?}"
    );

    // The pool actor failed, and the supervisor restarted it at once and
    // then with growing backoff until the server was back; never while the
    // server was up.
    let failed = events
        .iter()
        .find(|e| e.message == "actor failed" && e.field("actor") == Some(actor.as_str()))
        .unwrap_or_else(|| panic!("no failure of {actor} was logged"));
    let restarts: Vec<&Captured> = events
        .iter()
        .filter(|e| e.message == "actor restarting" && e.field("actor") == Some(actor.as_str()))
        .collect();
    assert!(
        restarts.iter().all(|r| r.at >= stop_at) && failed.at >= stop_at,
        "{actor} failed while the server was up"
    );
    let stopping = restarts
        .first()
        .map(|r| r.at.saturating_duration_since(failed.at));
    assert!(
        stopping.is_some_and(|d| d < Duration::from_millis(500)),
        "{actor} took {stopping:?} to stop after failing (None: never restarted)"
    );
    assert!(
        restarts.len() >= 3,
        "expected at least 3 restarts of {actor}, saw {}",
        restarts.len()
    );
    let attempts: Vec<u64> = restarts.iter().map(|r| r.number("attempt")).collect();
    assert!(
        attempts.windows(2).all(|w| w[0] < w[1]),
        "restart attempts do not increase: {attempts:?}"
    );
    let backoff = |r: &&Captured| r.number("backoff_ms");
    let first = restarts
        .iter()
        .find(|r| r.number("attempt") == 1)
        .map(backoff)
        .expect("a first restart attempt");
    let later = restarts
        .iter()
        .filter(|r| r.number("attempt") >= 3)
        .map(backoff)
        .max()
        .expect("a third restart attempt");
    assert!(
        later > first,
        "backoff did not grow: attempt 1 waited {first} ms, later attempts at most {later} ms"
    );

    // Every acknowledged Put is readable, whichever phase it was in.
    let missing = read_back(&client, &samples).await;
    let acked = samples.iter().filter(|s| s.code.is_none()).count();
    println!(
        "  read back {acked} acknowledged puts: {} missing or wrong",
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "{} acknowledged puts are missing or wrong: {:#?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );

    // Prism itself never restarted: the outage never escalated past the
    // pool actor, and the same gateway served throughout and stops cleanly.
    let escalations: Vec<&Captured> = events
        .iter()
        .filter(|e| {
            e.message == "supervisor restart intensity exceeded, escalating"
                && e.field("cause").is_some_and(|c| c.contains(&actor))
        })
        .collect();
    assert!(
        escalations.is_empty(),
        "the outage escalated: {escalations:?}"
    );
    gateway.stop().await.expect("clean stop");
}

fn gateway_toml(dir: &Path, name: &str, backend_toml: &str) -> String {
    format!(
        r#"
[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
shutdown_grace = "5s"

[supervisor]
max_restarts = 50
restart_window = "10s"
backoff_initial = "100ms"
backoff_max = "1s"

[backends.memory]
kind = "memory"

[backends.embedded]
kind = "sqlite"
path = "{db}"
{backend_toml}
[namespaces.cache]
backend = "memory"
timeout = "1s"

[namespaces.default]
backend = "embedded"
timeout = "1s"

[namespaces.{name}]
backend = "{name}"
timeout = "1s"
"#,
        db = dir.join("prism.db").display(),
    )
}

/// Waits until a Put of `key` into `namespace` succeeds.
async fn wait_until_ready(
    client: &KeyValueClient<Channel>,
    namespace: &'static str,
    key: &'static str,
) {
    assert!(
        eventually(Duration::from_secs(10), || {
            let mut c = client.clone();
            async move { c.put(put_request(namespace, key)).await.is_ok() }
        })
        .await,
        "namespace '{namespace}' never became ready"
    );
}

fn value_of(key: &str) -> Bytes {
    Bytes::from(format!("{key}/value"))
}

/// A Put of the load: the value names the key, the deadline is [`DEADLINE`].
fn put_request(namespace: &str, key: &str) -> tonic::Request<PutRequest> {
    with_timeout(put(namespace, key, &value_of(key), 0), DEADLINE)
}

/// One Put of the load.
#[derive(Debug, Clone)]
struct Sample {
    namespace: &'static str,
    key: String,
    started: Instant,
    latency: Duration,
    /// None when acknowledged.
    code: Option<Code>,
}

impl Sample {
    fn finished(&self) -> Instant {
        self.started + self.latency
    }

    fn relative(&self, t0: Instant) -> String {
        format!(
            "{} {} started at {} ms, took {} ms",
            self.namespace,
            self.key,
            self.started.saturating_duration_since(t0).as_millis(),
            self.latency.as_millis()
        )
    }
}

/// Writers that Put unique keys at a steady pace until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    writers: JoinSet<Vec<Sample>>,
    /// The latest acknowledgement of each namespace.
    last_ok: Arc<Mutex<BTreeMap<&'static str, Instant>>>,
}

impl Load {
    fn start(client: &KeyValueClient<Channel>, plan: &[(&'static str, usize)]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let last_ok = Arc::new(Mutex::new(BTreeMap::new()));
        let mut writers = JoinSet::new();
        for &(namespace, count) in plan {
            for w in 0..count {
                let mut client = client.clone();
                let stop = stop.clone();
                let last_ok = last_ok.clone();
                writers.spawn(async move {
                    let mut samples = Vec::new();
                    let mut pace = tokio::time::interval(PACE);
                    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    for seq in 0u64.. {
                        pace.tick().await;
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        let key = format!("w{w}/{seq:06}");
                        let started = Instant::now();
                        let res = client.put(put_request(namespace, &key)).await;
                        let latency = started.elapsed();
                        if res.is_ok() {
                            last_ok
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(namespace, started + latency);
                        }
                        samples.push(Sample {
                            namespace,
                            key,
                            started,
                            latency,
                            code: res.err().map(|s| s.code()),
                        });
                    }
                    samples
                });
            }
        }
        Load {
            stop,
            writers,
            last_ok,
        }
    }

    fn last_ok(&self, namespace: &str) -> Option<Instant> {
        self.last_ok
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(namespace)
            .copied()
    }

    async fn stop(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Release);
        let mut all = Vec::new();
        while let Some(samples) = self.writers.join_next().await {
            all.extend(samples.expect("writer task"));
        }
        all
    }
}

/// Reads every acknowledged key back, and returns those missing or wrong.
async fn read_back(client: &KeyValueClient<Channel>, samples: &[Sample]) -> Vec<String> {
    const READERS: usize = 16;
    let acked: Vec<(&'static str, String)> = samples
        .iter()
        .filter(|s| s.code.is_none())
        .map(|s| (s.namespace, s.key.clone()))
        .collect();
    let acked = Arc::new(acked);
    let mut readers = JoinSet::new();
    for r in 0..READERS {
        let acked = acked.clone();
        let mut client = client.clone();
        readers.spawn(async move {
            let mut bad = Vec::new();
            for (namespace, key) in acked.iter().skip(r).step_by(READERS) {
                let req = with_timeout(get(namespace, key), Duration::from_secs(5));
                match client.get(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        if !r.found || r.value != value_of(key) {
                            bad.push(format!("{namespace}/{key}: found {}", r.found));
                        }
                    }
                    Err(e) => bad.push(format!("{namespace}/{key}: {:?}", e.code())),
                }
            }
            bad
        });
    }
    let mut bad = Vec::new();
    while let Some(r) = readers.join_next().await {
        bad.extend(r.expect("reader task"));
    }
    bad
}

/// When the server under test went down and came back.
#[derive(Clone, Copy)]
struct Timeline {
    t0: Instant,
    /// The stop was begun.
    stop_at: Instant,
    /// The server was gone.
    stopped_at: Instant,
    /// The start was begun.
    restart_at: Instant,
    /// The server accepted connections again.
    ready_at: Instant,
}

impl fmt::Debug for Timeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |t: Instant| t.saturating_duration_since(self.t0).as_millis();
        write!(
            f,
            "stop {}..{} ms, start {}..{} ms",
            ms(self.stop_at),
            ms(self.stopped_at),
            ms(self.restart_at),
            ms(self.ready_at)
        )
    }
}

/// What the load saw, for the test output.
struct Report {
    name: &'static str,
    timeline: Timeline,
    /// Acknowledged Puts by namespace and phase (before, during, after).
    acked: BTreeMap<&'static str, [usize; 3]>,
    /// Errors by namespace and code (`Code` is not `Ord`: keyed by its number).
    errors: BTreeMap<(&'static str, i32), usize>,
    /// The first acknowledged Put started after the restart began: when it
    /// ended, and how long after the server was back that was.
    first_ok_after_ready: Option<(Instant, Duration)>,
    unavailable_latency_p90: Duration,
    unavailable_latency_max: Duration,
}

impl Report {
    fn new(name: &'static str, samples: &[Sample], timeline: &Timeline) -> Report {
        let mut acked: BTreeMap<&'static str, [usize; 3]> = BTreeMap::new();
        let mut errors = BTreeMap::new();
        for s in samples {
            match s.code {
                None => {
                    let phase = if s.started < timeline.stop_at {
                        0
                    } else if s.started < timeline.ready_at {
                        1
                    } else {
                        2
                    };
                    acked.entry(s.namespace).or_default()[phase] += 1;
                }
                Some(code) => *errors.entry((s.namespace, code as i32)).or_default() += 1,
            }
        }
        let first_ok = samples
            .iter()
            .filter(|s| s.namespace == name && s.code.is_none() && s.started >= timeline.restart_at)
            .map(|s| s.finished())
            .min();
        let mut unavailable: Vec<Duration> = samples
            .iter()
            .filter(|s| s.namespace == name && s.code == Some(Code::Unavailable))
            .map(|s| s.latency)
            .collect();
        unavailable.sort();
        let p90 = unavailable
            .get(unavailable.len() * 9 / 10)
            .copied()
            .unwrap_or_default();
        Report {
            name,
            timeline: *timeline,
            acked,
            errors,
            first_ok_after_ready: first_ok
                .map(|t| (t, t.saturating_duration_since(timeline.ready_at))),
            unavailable_latency_p90: p90,
            unavailable_latency_max: unavailable.last().copied().unwrap_or_default(),
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "outage of '{}': {:?}", self.name, self.timeline)?;
        for (ns, [before, during, after]) in &self.acked {
            writeln!(
                f,
                "  {ns:>8}: acknowledged {before} before, {during} during, {after} after the outage"
            )?;
        }
        for ((ns, code), n) in &self.errors {
            writeln!(f, "  {ns:>8}: {n} x {:?}", Code::from(*code))?;
        }
        writeln!(
            f,
            "  UNAVAILABLE latency p90 {:?}, max {:?}",
            self.unavailable_latency_p90, self.unavailable_latency_max
        )?;
        let t = &self.timeline;
        let ready = t.ready_at.saturating_duration_since(t.restart_at);
        match self.first_ok_after_ready {
            Some((_, after_ready)) => write!(
                f,
                "  server back {ready:?} after its start; first acknowledged put {after_ready:?} after that"
            ),
            None => write!(f, "  server back {ready:?} after its start; no put acknowledged since"),
        }
    }
}

/// One tracing event, as the capturing layer saw it.
#[derive(Debug, Clone)]
struct Captured {
    at: Instant,
    message: String,
    fields: BTreeMap<&'static str, String>,
}

impl Captured {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    fn number(&self, name: &str) -> u64 {
        self.field(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("event {self:?} has no number {name}"))
    }
}

/// Records every event of level INFO and above.
struct Capture(&'static Mutex<Vec<Captured>>);

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let message = fields.0.remove("message").unwrap_or_default();
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Captured {
                at: Instant::now(),
                message,
                fields: fields.0,
            });
    }
}

#[derive(Default)]
struct Fields(BTreeMap<&'static str, String>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name(), format!("{value:?}"));
    }
}

/// The events of this test binary. The first call installs the capturing
/// subscriber as the global default, which every test shares: each test
/// tells its own events apart by the backend names it uses.
fn captured_log() -> &'static Mutex<Vec<Captured>> {
    static LOG: OnceLock<&'static Mutex<Vec<Captured>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log: &'static Mutex<Vec<Captured>> = Box::leak(Box::default());
        let subscriber =
            tracing_subscriber::registry().with(Capture(log).with_filter(LevelFilter::INFO));
        tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber");
        log
    })
}
