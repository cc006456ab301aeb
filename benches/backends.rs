//! Gateway against direct clients, per backend: how much of a direct client's
//! throughput the gateway keeps, at equal concurrency, on the same machine.
//!
//! For PostgreSQL and Redis, and for each operation, two closed-loop runs:
//!
//! - **direct**: `concurrency` tasks on a pool of the backend's own size (a
//!   sqlx `PgPool`, a deadpool-redis `Pool`), each issuing exactly what the
//!   backend issues for one operation: for PostgreSQL the
//!   `set_config('statement_timeout', ...)` round trip and the same SQL text;
//!   for Redis the same MULTI/EXEC pipelines. Same keys, same value size,
//!   same 5 s deadline. The difference to the gateway run is then the
//!   gateway's own cost: gRPC, sessions, the pool actor, and the load
//!   generator's gRPC client.
//! - **gateway**: [`prism::bench::run`] (what `prism bench` runs) against a
//!   gateway started in this process on `127.0.0.1:0`, with `pg` and `redis`
//!   namespaces.
//!
//! The load generator, the gateway and the databases share this machine's
//! cores; the numbers are what one box sustains, not what a dedicated
//! gateway host would.
//!
//! Run with `cargo bench --bench backends`. Knobs (environment):
//! `PRISM_BENCH_CONCURRENCY` (default 64), `PRISM_BENCH_DURATION` (measured
//! time per run, default `10s`), `PRISM_BENCH_OPS` (default `get,put`; also
//! `mixed`), `PRISM_BENCH_BACKENDS` (default `postgres,redis`), and the
//! servers: `PRISM_TEST_POSTGRES_URL`, `PRISM_TEST_REDIS_URL`.
//!
//! It uses the table `prism_bench_kv` (dropped at the start and the end) and
//! the Redis key prefix `prism-bench` (deleted likewise).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use deadpool_redis::redis;
use hdrhistogram::Histogram;
use prism::bench::{key_name, BenchOptions, BenchReport, Op, MIXED_GET_PERCENT};
use prism::client::{Client, ClientOptions};
use prism::{Gateway, Listeners, Settings};
use sqlx::postgres::{types::PgInterval, PgConnectOptions, PgPool, PgPoolOptions};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// The table both the gateway's backend and the direct client use.
const TABLE: &str = "prism_bench_kv";
/// The Redis key prefix both use.
const KEY_PREFIX: &str = "prism-bench";
/// The gateway's namespaces, also the namespace the direct clients write
/// under, so both touch rows and keys of the same shape.
const PG_NAMESPACE: &str = "pg";
const REDIS_NAMESPACE: &str = "redis";
/// Pool sizes of `settings/test.toml`, for the gateway's backends and the
/// direct pools alike.
const PG_POOL_SIZE: u32 = 20;
const PG_MIN_CONNECTIONS: u32 = 5;
const REDIS_POOL_SIZE: usize = 16;
/// `prism bench` defaults, used by both sides.
const KEYS: u64 = 10_000;
const VALUE_SIZE: usize = 128;
const CONNECTIONS: usize = 4;
const WARMUP: Duration = Duration::from_secs(1);
/// Every request's deadline: the client's default, which the gateway turns
/// into the backend's deadline (and PostgreSQL's statement timeout).
const DEADLINE: Duration = Duration::from_secs(5);
/// The issue's targets.
const TARGET_RATIO: f64 = 0.80;
const TARGET_P99_MS: f64 = 10.0;

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and a
    // minute of load has no place in a test run.
    if !std::env::args().any(|a| a == "--bench") {
        println!("backends: a load bench; run it with `cargo bench --bench backends`");
        return Ok(());
    }
    let config = Config::from_env()?;
    let settings = gateway_settings(&config)?;
    prism::telemetry::init(&settings.log).context("installing the log subscriber")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    rt.block_on(bench(config, settings))
}

/// What to run, from the environment.
struct Config {
    concurrency: usize,
    duration: Duration,
    ops: Vec<Op>,
    backends: Vec<Kind>,
    postgres_url: String,
    redis_url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Postgres,
    Redis,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Postgres => "postgres",
            Kind::Redis => "redis",
        }
    }

    fn namespace(self) -> &'static str {
        match self {
            Kind::Postgres => PG_NAMESPACE,
            Kind::Redis => REDIS_NAMESPACE,
        }
    }
}

impl Config {
    fn from_env() -> anyhow::Result<Config> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let concurrency = match var("PRISM_BENCH_CONCURRENCY") {
            Some(v) => v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .with_context(|| {
                    format!("PRISM_BENCH_CONCURRENCY={v:?}: expected a positive integer")
                })?,
            None => 64,
        };
        let duration = match var("PRISM_BENCH_DURATION") {
            Some(v) => humantime::parse_duration(v.trim())
                .ok()
                .filter(|d| !d.is_zero())
                .with_context(|| {
                    format!("PRISM_BENCH_DURATION={v:?}: expected a duration such as 3s")
                })?,
            None => Duration::from_secs(10),
        };
        let ops = list(
            var("PRISM_BENCH_OPS").as_deref().unwrap_or("get,put"),
            |s| match s {
                "get" => Some(Op::Get),
                "put" => Some(Op::Put),
                "mixed" => Some(Op::Mixed),
                _ => None,
            },
        )
        .context("PRISM_BENCH_OPS: expected a comma-separated list of get, put, mixed")?;
        let backends = list(
            var("PRISM_BENCH_BACKENDS")
                .as_deref()
                .unwrap_or("postgres,redis"),
            |s| match s {
                "postgres" => Some(Kind::Postgres),
                "redis" => Some(Kind::Redis),
                _ => None,
            },
        )
        .context("PRISM_BENCH_BACKENDS: expected a comma-separated list of postgres, redis")?;
        Ok(Config {
            concurrency,
            duration,
            ops,
            backends,
            postgres_url: var("PRISM_TEST_POSTGRES_URL")
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into()),
            redis_url: var("PRISM_TEST_REDIS_URL")
                .unwrap_or_else(|| "redis://127.0.0.1:6379".into()),
        })
    }
}

/// A non-empty comma-separated list, each item parsed by `parse`.
fn list<T>(text: &str, parse: impl Fn(&str) -> Option<T>) -> anyhow::Result<Vec<T>> {
    let items = text
        .split(',')
        .map(|s| parse(s.trim()).with_context(|| format!("unknown item {:?}", s.trim())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if items.is_empty() {
        bail!("empty list");
    }
    Ok(items)
}

/// The gateway: `pg` and `redis` namespaces with the pools of
/// `settings/test.toml`, logging at warn.
fn gateway_settings(config: &Config) -> anyhow::Result<Settings> {
    let toml = format!(
        r#"
[server]
grpc_addr = "127.0.0.1:0"
shutdown_grace = "10s"

[log]
level = "warn"

[backends.pg]
kind = "postgres"
url = "{pg}"
table = "{TABLE}"
pool_size = {PG_POOL_SIZE}
min_connections = {PG_MIN_CONNECTIONS}

[backends.redis]
kind = "redis"
url = "{redis}"
key_prefix = "{KEY_PREFIX}"
pool_size = {REDIS_POOL_SIZE}

[namespaces.{PG_NAMESPACE}]
backend = "pg"

[namespaces.{REDIS_NAMESPACE}]
backend = "redis"
"#,
        pg = config.postgres_url,
        redis = config.redis_url,
    );
    Settings::from_toml(&toml).context("the gateway settings")
}

/// One run's numbers.
struct Measured {
    throughput: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    errors: u64,
    /// One error message, to tell what failed.
    first_error: Option<String>,
    /// CPU time of this process (clients, and the gateway when it runs)
    /// per operation, in microseconds, over the measured time.
    cpu_us_per_op: f64,
    /// Share of the host's CPU time busy over the measured time, all
    /// processes: near 100% means the run was bound by the cores.
    host_busy: f64,
}

impl Measured {
    fn from_histogram(h: &Histogram<u64>, elapsed: Duration, errors: u64) -> Measured {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Measured {
            throughput: h.len() as f64 / elapsed.as_secs_f64(),
            p50: ms(0.50),
            p99: ms(0.99),
            p999: ms(0.999),
            errors,
            first_error: None,
            cpu_us_per_op: 0.0,
            host_busy: 0.0,
        }
    }

    fn from_report(r: &BenchReport) -> Measured {
        Measured {
            throughput: r.throughput,
            p50: r.latency_ms.p50,
            p99: r.latency_ms.p99,
            p999: r.latency_ms.p999,
            errors: r.error_count(),
            first_error: r.errors.keys().next().cloned(),
            cpu_us_per_op: 0.0,
            host_busy: 0.0,
        }
    }

    /// Fills in the CPU figures from `usage` over the measured time.
    fn with_usage(mut self, usage: Option<Usage>, measured: Duration) -> Measured {
        if let Some(u) = usage {
            let ops = self.throughput * measured.as_secs_f64();
            self.cpu_us_per_op = u.process_secs * 1e6 / ops.max(1.0);
            self.host_busy = u.host_busy;
        }
        self
    }
}

/// One row pair of the table.
struct Row {
    kind: Kind,
    op: Op,
    direct: Measured,
    gateway: Measured,
}

async fn bench(config: Config, settings: Settings) -> anyhow::Result<()> {
    let machine = Machine::current();
    // An interrupted run leaves its table and keys behind: start from
    // nothing, so that every run measures the same data.
    cleanup(&config).await?;

    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the gateway's listener")?;
    let addr = grpc.local_addr().context("the gateway's address")?;
    let (stop, stopped) = oneshot::channel::<()>();
    let gateway = tokio::spawn(Gateway::new(settings).serve(
        Listeners { grpc, http: None },
        async move {
            let _ = stopped.await;
        },
    ));
    let client = ClientOptions {
        addr: format!("http://{addr}"),
        timeout: Some(DEADLINE),
        ..ClientOptions::default()
    };

    let measured = measure_all(&config, &client).await;

    let _ = stop.send(());
    let served = gateway.await;
    let cleaned = cleanup(&config).await;
    let rows = measured?;
    served
        .context("the gateway task")?
        .context("the gateway stopped with an error")?;
    cleaned?;
    print_table(&config, &machine, &rows);
    Ok(())
}

async fn measure_all(config: &Config, client: &ClientOptions) -> anyhow::Result<Vec<Row>> {
    let cpu = CpuSampler::start();
    let mut rows = Vec::new();
    for &kind in &config.backends {
        wait_until_ready(client, kind.namespace()).await?;
        // After the gateway is ready: its backend has created the table.
        let direct = Arc::new(Direct::connect(kind, config).await?);
        for &op in &config.ops {
            eprintln!("backends: {} {}: direct ...", kind.as_str(), op.as_str());
            let (d, window) = drive_direct(&direct, op, config).await?;
            let d = d.with_usage(cpu.usage(window).await, config.duration);
            eprintln!("backends: {} {}: gateway ...", kind.as_str(), op.as_str());
            let report = prism::bench::run(&BenchOptions {
                client: client.clone(),
                namespace: kind.namespace().into(),
                op,
                concurrency: config.concurrency,
                connections: CONNECTIONS,
                duration: config.duration,
                warmup: WARMUP,
                keys: KEYS,
                value_size: VALUE_SIZE,
                progress: false,
            })
            .await
            .with_context(|| format!("prism bench on {}", kind.namespace()))?;
            let done = Instant::now();
            let measured = Duration::from_secs_f64(report.elapsed_secs);
            let window = (done.checked_sub(measured).unwrap_or(done), done);
            rows.push(Row {
                kind,
                op,
                direct: d,
                gateway: Measured::from_report(&report)
                    .with_usage(cpu.usage(window).await, measured),
            });
        }
        direct.close().await;
    }
    Ok(rows)
}

/// Polls the namespace until the gateway answers for it: its pool actor
/// connects (and migrates) after the server is up.
async fn wait_until_ready(options: &ClientOptions, namespace: &str) -> anyhow::Result<()> {
    let patience = Instant::now() + Duration::from_secs(30);
    loop {
        let last = match Client::connect(options).await {
            Ok(client) => match client.get(namespace, "bench-ready").await {
                Ok(_) => return Ok(()),
                Err(status) => format!("{:?}: {}", status.code(), status.message()),
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() >= patience {
            bail!("namespace {namespace} not ready within 30s: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- the direct clients -------------------------------------------------------

/// A client that talks to the database itself, the way the backend does.
enum Direct {
    Postgres(PgDirect),
    Redis(RedisDirect),
}

impl Direct {
    async fn connect(kind: Kind, config: &Config) -> anyhow::Result<Direct> {
        Ok(match kind {
            Kind::Postgres => Direct::Postgres(PgDirect::connect(&config.postgres_url).await?),
            Kind::Redis => Direct::Redis(RedisDirect::connect(&config.redis_url).await?),
        })
    }

    async fn exec(&self, get: bool, key: &str, value: &[u8]) -> Result<(), String> {
        match self {
            Direct::Postgres(d) => d.exec(get, key, value).await,
            Direct::Redis(d) => d.exec(get, key, value).await,
        }
    }

    async fn close(&self) {
        match self {
            Direct::Postgres(d) => d.pool.close().await,
            Direct::Redis(d) => d.pool.close(),
        }
    }
}

/// sqlx on a pool configured as the backend's, with the backend's statements.
struct PgDirect {
    pool: PgPool,
    get: String,
    put: String,
}

impl PgDirect {
    async fn connect(url: &str) -> anyhow::Result<PgDirect> {
        let options = PgConnectOptions::from_str(url)
            .context("the postgres url")?
            .application_name("prism-bench-direct");
        // As `PostgresConnector::open` builds the backend's pool.
        let pool = PgPoolOptions::new()
            .max_connections(PG_POOL_SIZE)
            .min_connections(PG_MIN_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(5))
            .idle_timeout(Some(Duration::from_secs(600)))
            .max_lifetime(Some(Duration::from_secs(1800)))
            .connect_with(options)
            .await
            .context("connecting to postgres")?;
        // The text of `Sql::new` in src/backend/postgres.rs, for schema
        // `public`: kept identical so the server does the same work.
        let t = format!("\"public\".\"{TABLE}\"");
        let live = "(expires_at IS NULL OR expires_at > now())";
        Ok(PgDirect {
            pool,
            get: format!(
                "SELECT value, (EXTRACT(EPOCH FROM (expires_at - now())) * 1000000)::bigint \
                 FROM {t} WHERE namespace = $1 AND key = $2 AND {live}"
            ),
            put: format!(
                "INSERT INTO {t} (namespace, key, value, expires_at) VALUES ($1, $2, $3, now() + $4) \
                 ON CONFLICT (namespace, key) DO UPDATE \
                 SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at"
            ),
        })
    }

    /// `PostgresBackend::exec_bounded` + `run` for get and put.
    async fn exec(&self, get: bool, key: &str, value: &[u8]) -> Result<(), String> {
        let deadline = Instant::now() + DEADLINE;
        let work = async {
            let mut conn = self.pool.acquire().await.map_err(|e| e.to_string())?;
            let left = deadline.saturating_duration_since(Instant::now());
            // `statement_timeout_setting`: whole milliseconds, rounded up.
            let ms = left.as_micros().div_ceil(1000).clamp(1, i32::MAX as u128);
            sqlx::query("SELECT set_config('statement_timeout', $1, false)")
                .bind(ms.to_string())
                .execute(&mut *conn)
                .await
                .map_err(|e| e.to_string())?;
            if get {
                let row: Option<(Vec<u8>, Option<i64>)> = sqlx::query_as(&self.get)
                    .bind(PG_NAMESPACE)
                    .bind(key)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(|e| e.to_string())?;
                // Keys are populated: a miss means the run measured
                // something else.
                row.map(|_| ()).ok_or_else(|| "key not found".to_owned())
            } else {
                sqlx::query(&self.put)
                    .bind(PG_NAMESPACE)
                    .bind(key)
                    .bind(value)
                    .bind(None::<PgInterval>)
                    .execute(&mut *conn)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        };
        tokio::time::timeout_at(deadline, work)
            .await
            .unwrap_or_else(|_| Err("deadline exceeded".into()))
    }
}

/// deadpool-redis on a pool configured as the backend's, with the
/// backend's pipelines and key layout.
struct RedisDirect {
    pool: deadpool_redis::Pool,
    value_prefix: String,
    index: String,
}

impl RedisDirect {
    async fn connect(url: &str) -> anyhow::Result<RedisDirect> {
        // As `RedisConnector::open` builds the backend's pool.
        let timeout = Duration::from_secs(5);
        let connection = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let manager =
            deadpool_redis::Manager::new_with_config(url, connection).context("the redis url")?;
        let pool = deadpool_redis::Pool::builder(manager)
            .max_size(REDIS_POOL_SIZE)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .runtime(deadpool_redis::Runtime::Tokio1)
            .build()
            .context("building the redis pool")?;
        // The backend registers a namespace once, on its first put; the
        // gateway has done that already or will, so the direct puts skip it
        // as the backend's steady state does.
        let mut conn = pool.get().await.context("connecting to redis")?;
        let _: i64 = redis::cmd("SADD")
            .arg(format!("{KEY_PREFIX}:namespaces"))
            .arg(REDIS_NAMESPACE)
            .query_async(&mut conn)
            .await
            .context("registering the namespace")?;
        drop(conn);
        Ok(RedisDirect {
            pool,
            value_prefix: format!("{KEY_PREFIX}:{{{REDIS_NAMESPACE}}}:v:"),
            index: format!("{KEY_PREFIX}:{{{REDIS_NAMESPACE}}}:idx"),
        })
    }

    /// `RedisBackend::exec_bounded` + `run` for get and put.
    async fn exec(&self, get: bool, key: &str, value: &[u8]) -> Result<(), String> {
        let deadline = Instant::now() + DEADLINE;
        let mut conn = match tokio::time::timeout_at(deadline, self.pool.get()).await {
            Ok(conn) => conn.map_err(|e| e.to_string())?,
            Err(_) => return Err("deadline exceeded".into()),
        };
        let vkey = self.value_prefix.clone() + key;
        let work = async {
            if get {
                let (value, _pttl): (Option<Bytes>, i64) = redis::pipe()
                    .atomic()
                    .cmd("GET")
                    .arg(&vkey)
                    .cmd("PTTL")
                    .arg(&vkey)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                value.map(|_| ()).ok_or_else(|| "key not found".to_owned())
            } else {
                let () = redis::pipe()
                    .atomic()
                    .cmd("SET")
                    .arg(&vkey)
                    .arg(value)
                    .cmd("ZADD")
                    .arg(&self.index)
                    .arg(0)
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
        };
        tokio::time::timeout_at(deadline, work)
            .await
            .unwrap_or_else(|_| Err("deadline exceeded".into()))
    }
}

/// The direct side of one comparison: populate (for reads), then the same
/// closed loop as `prism::bench::run`: a warmup, then the measured time.
/// Returns the numbers and the measured window.
async fn drive_direct(
    direct: &Arc<Direct>,
    op: Op,
    config: &Config,
) -> anyhow::Result<(Measured, (Instant, Instant))> {
    let value = Bytes::from(vec![b'x'; VALUE_SIZE]);
    if op != Op::Put {
        populate(direct, &value, config.concurrency).await?;
    }
    // 1 µs to 1 h at 3 significant digits, as `prism bench`.
    let histogram =
        Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).context("creating the histogram")?;
    let measure_from = Instant::now() + WARMUP;
    let end = measure_from + config.duration;
    let mut workers = Vec::with_capacity(config.concurrency);
    for i in 0..config.concurrency {
        let (direct, value, mut histogram) = (direct.clone(), value.clone(), histogram.clone());
        let mut rng = SplitMix64(0x5eed_0000 + i as u64);
        workers.push(tokio::spawn(async move {
            let mut errors = 0u64;
            let mut first_error = None;
            loop {
                let started = Instant::now();
                if started >= end {
                    break;
                }
                let key = key_name(rng.next() % KEYS);
                let get = match op {
                    Op::Get => true,
                    Op::Put => false,
                    Op::Mixed => rng.next() % 100 < MIXED_GET_PERCENT,
                };
                let result = direct.exec(get, &key, &value).await;
                if started < measure_from {
                    continue;
                }
                match result {
                    Ok(()) => {
                        let micros =
                            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                        histogram.saturating_record(micros.max(1));
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            (histogram, errors, first_error)
        }));
    }
    let mut total = histogram;
    let mut errors = 0;
    let mut first_error = None;
    for worker in workers {
        let (h, e, first) = worker.await.context("a direct worker panicked")?;
        total.add(&h).context("merging histograms")?;
        errors += e;
        first_error = first_error.or(first);
    }
    let done = Instant::now();
    let elapsed = done
        .saturating_duration_since(measure_from)
        .max(Duration::from_micros(1));
    let mut measured = Measured::from_histogram(&total, elapsed, errors);
    measured.first_error = first_error;
    Ok((measured, (measure_from, done)))
}

/// Writes every key once, `concurrency` at a time, as `prism bench` does.
async fn populate(direct: &Arc<Direct>, value: &Bytes, concurrency: usize) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>> = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (direct, value, next) = (direct.clone(), value.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= KEYS {
                    return Ok(());
                }
                let key = key_name(i);
                direct
                    .exec(false, &key, &value)
                    .await
                    .map_err(|e| anyhow::anyhow!("populating {key}: {e}"))?;
            }
        }));
    }
    for task in tasks {
        task.await.context("a populating task panicked")??;
    }
    Ok(())
}

/// The generator `prism bench` uses: key choice needs spread, not secrecy.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

// ---- CPU accounting ----------------------------------------------------------

/// CPU use over one window.
#[derive(Debug, Clone, Copy)]
struct Usage {
    /// CPU seconds of this process.
    process_secs: f64,
    /// Busy share of all the host's cores, 0..=1.
    host_busy: f64,
}

/// One reading of the CPU counters, in clock ticks.
#[derive(Debug, Clone, Copy)]
struct CpuReading {
    at: Instant,
    process: u64,
    host_busy: u64,
    host_total: u64,
}

impl CpuReading {
    /// From /proc; `None` where there is no /proc.
    fn now() -> Option<CpuReading> {
        let at = Instant::now();
        // /proc/self/stat: the fields after the command's closing
        // parenthesis start at field 3; utime and stime are fields 14, 15.
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let process = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // /proc/stat: cpu user nice system idle iowait irq softirq steal ...
        let host = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = host
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        let [user, nice, system, idle, iowait, irq, softirq, steal] = cpu[..] else {
            return None;
        };
        let host_busy = user + nice + system + irq + softirq + steal;
        Some(CpuReading {
            at,
            process,
            host_busy,
            host_total: host_busy + idle + iowait,
        })
    }
}

/// /proc reports CPU time in USER_HZ ticks, 100 a second on Linux.
const TICKS_PER_SEC: f64 = 100.0;

/// Reads the CPU counters every 100 ms on a thread of its own, outside the
/// runtime it measures, so that a run's window can be looked up afterwards
/// (`prism::bench::run` decides its own window).
struct CpuSampler {
    readings: Arc<Mutex<Vec<CpuReading>>>,
    stop: Arc<AtomicBool>,
}

impl CpuSampler {
    fn start() -> CpuSampler {
        let readings = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (readings.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(reading) = CpuReading::now() {
                    r.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(reading);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        CpuSampler { readings, stop }
    }

    /// Use between the last reading at or before `from` and the first at or
    /// after `to`; `None` without readings around the window.
    async fn usage(&self, (from, to): (Instant, Instant)) -> Option<Usage> {
        // The sampler reads every 100 ms: wait for the reading after `to`.
        tokio::time::sleep_until(to + Duration::from_millis(150)).await;
        let readings = self.readings.lock().unwrap_or_else(PoisonError::into_inner);
        let start = readings.iter().rev().find(|r| r.at <= from)?;
        let end = readings.iter().find(|r| r.at >= to)?;
        let total = end.host_total.saturating_sub(start.host_total).max(1);
        Some(Usage {
            process_secs: end.process.saturating_sub(start.process) as f64 / TICKS_PER_SEC,
            host_busy: end.host_busy.saturating_sub(start.host_busy) as f64 / total as f64,
        })
    }
}

impl Drop for CpuSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---- cleanup --------------------------------------------------------------------

/// Drops the bench's tables and deletes its Redis keys.
async fn cleanup(config: &Config) -> anyhow::Result<()> {
    if config.backends.contains(&Kind::Postgres) {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(&config.postgres_url)
            .await
            .context("connecting to postgres for cleanup")?;
        for table in [TABLE.to_owned(), format!("{TABLE}_schema_version")] {
            sqlx::query(&format!("DROP TABLE IF EXISTS public.\"{table}\""))
                .execute(&pool)
                .await
                .with_context(|| format!("dropping {table}"))?;
        }
        pool.close().await;
    }
    if config.backends.contains(&Kind::Redis) {
        let client = redis::Client::open(config.redis_url.as_str()).context("the redis url")?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .context("connecting to redis for cleanup")?;
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{KEY_PREFIX}:*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .context("scanning the bench's redis keys")?;
            if !keys.is_empty() {
                let _: i64 = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .context("deleting the bench's redis keys")?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(())
}

// ---- the report -----------------------------------------------------------------

/// Where the bench ran, and how busy the machine was.
struct Machine {
    cores: usize,
    cpu: String,
    memory_gib: f64,
    load_before: String,
}

impl Machine {
    fn current() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = field(&cpuinfo, "model name").unwrap_or_else(|| "unknown CPU".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_gib = field(&meminfo, "MemTotal")
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
        Machine {
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            cpu,
            memory_gib,
            load_before: load_average(),
        }
    }
}

/// The value of the first `name: value` line of a /proc file.
fn field(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn print_table(config: &Config, machine: &Machine, rows: &[Row]) {
    println!();
    println!(
        "prism gateway vs direct clients: concurrency {} on both sides, {} measured per run after {} warmup, \
         {KEYS} keys, {VALUE_SIZE} B values, {DEADLINE:?} deadline",
        config.concurrency,
        humantime::format_duration(config.duration),
        humantime::format_duration(WARMUP),
    );
    println!(
        "machine: {} cores (available_parallelism), {}, {:.1} GiB, {} {}; load average before {}, after {} (includes this bench)",
        machine.cores,
        machine.cpu,
        machine.memory_gib,
        std::env::consts::OS,
        std::env::consts::ARCH,
        machine.load_before,
        load_average(),
    );
    println!(
        "shared cores: load generator, gateway (one process, one tokio runtime) and PostgreSQL/Redis \
         all run on these {} cores",
        machine.cores
    );
    println!(
        "direct: sqlx PgPool of {PG_POOL_SIZE} (set_config + the backend's SQL per op) / deadpool-redis \
         pool of {REDIS_POOL_SIZE} (the backend's MULTI pipelines); gateway: prism::bench::run over \
         {CONNECTIONS} gRPC connections, backend pools of the same sizes"
    );
    println!(
        "targets: gateway/direct throughput >= {TARGET_RATIO:.2}, gateway p99 < {TARGET_P99_MS} ms"
    );
    println!();
    println!(
        "{:<9} {:<6} {:<8} {:>9} {:>8} {:>8} {:>9} {:>7} {:>10} {:>9} {:>10} {:>7} {:>7}",
        "backend",
        "op",
        "client",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "errors",
        "cpu us/op",
        "host busy",
        "gw/direct",
        "ratio",
        "p99"
    );
    println!("{}", "-".repeat(118));
    let mut met = 0;
    for row in rows {
        let ratio = row.gateway.throughput / row.direct.throughput.max(f64::MIN_POSITIVE);
        let ratio_ok = ratio >= TARGET_RATIO;
        let p99_ok = row.gateway.p99 < TARGET_P99_MS;
        met += usize::from(ratio_ok && p99_ok);
        for (client, m) in [("direct", &row.direct), ("gateway", &row.gateway)] {
            let verdict = |ok: bool| if ok { "ok" } else { "MISS" };
            let (share, r, p) = if client == "gateway" {
                (format!("{ratio:.2}"), verdict(ratio_ok), verdict(p99_ok))
            } else {
                (String::new(), "", "")
            };
            println!(
                "{:<9} {:<6} {:<8} {:>9.0} {:>8.3} {:>8.3} {:>9.3} {:>7} {:>10.1} {:>8.0}% {:>10} {:>7} {:>7}",
                row.kind.as_str(),
                row.op.as_str(),
                client,
                m.throughput,
                m.p50,
                m.p99,
                m.p999,
                m.errors,
                m.cpu_us_per_op,
                m.host_busy * 100.0,
                share,
                r,
                p,
            );
        }
    }
    println!();
    println!(
        "cpu us/op: CPU time of this process per operation (direct: the client; gateway: gateway + \
         load generator); host busy: all cores, all processes, over the measured time"
    );
    println!("targets met (both): {met} of {}", rows.len());
    let mut errors: BTreeMap<String, &str> = BTreeMap::new();
    for row in rows {
        for (client, m) in [("direct", &row.direct), ("gateway", &row.gateway)] {
            if let Some(e) = &m.first_error {
                errors.insert(
                    format!("{} {} {client}", row.kind.as_str(), row.op.as_str()),
                    e.as_str(),
                );
            }
        }
    }
    for (run, error) in errors {
        println!("errors in {run}, e.g.: {error}");
    }
}
