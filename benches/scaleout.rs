//! Scale-out: one gateway instance against two, the client balanced over
//! both (`ClientOptions::addr` = `a,b`), over a Redis Cluster of its own
//! (three masters with a replica each, started for the run and stopped
//! after it), Redis and PostgreSQL.
//!
//! For each backend, two `prism serve` processes (the release binary) are
//! started over the same database; then for each operation (get, put) a
//! closed-loop run of [`prism::bench::run`] (what `prism bench` runs)
//! against the first instance alone, and one balanced over both. Besides
//! throughput and latency, it reads each gateway process's CPU time
//! (`utime + stime` of `/proc/<pid>/stat`, sampled every 20 ms) over the
//! measured window and divides it by the operations answered: CPU per
//! operation, for the gateways and for this process (the load generator).
//!
//! The load generator, both gateways and the database share this machine's
//! cores: on a small machine a second instance adds no cores, so what it
//! shows is the cost of balancing and whether a single instance was the
//! bottleneck, not the speed-up of a second host.
//!
//! Run with `cargo bench --bench scaleout`. Knobs (environment):
//! `PRISM_BENCH_DURATION` (measured time per run, default `3s`),
//! `PRISM_BENCH_CONCURRENCY` (default 64), `PRISM_BENCH_BACKENDS` (default
//! `redis_cluster,redis,postgres`), and the servers: `PRISM_TEST_POSTGRES_URL`,
//! `PRISM_TEST_REDIS_URL`. It uses the table `prism_scaleout_kv` and the
//! Redis key prefix `prism-scaleout` (both removed at the start and the
//! end).

#[allow(dead_code)]
#[path = "../tests/common/binary.rs"]
mod binary;
#[allow(dead_code)]
#[path = "../tests/common/cluster.rs"]
mod cluster;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use deadpool_redis::redis;
use prism::bench::{BenchOptions, BenchReport, Op};
use prism::client::ClientOptions;

use binary::Prism;

const TABLE: &str = "prism_scaleout_kv";
const KEY_PREFIX: &str = "prism-scaleout";
const NAMESPACE: &str = "bench";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    RedisCluster,
    Redis,
    Postgres,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::RedisCluster => "redis_cluster",
            Kind::Redis => "redis",
            Kind::Postgres => "postgres",
        }
    }
}

struct Config {
    duration: Duration,
    concurrency: usize,
    backends: Vec<Kind>,
    postgres_url: String,
    redis_url: String,
    /// The seed nodes of the run's own cluster, once it is started.
    cluster_urls: Vec<String>,
}

impl Config {
    fn from_env() -> anyhow::Result<Self> {
        let var = |name: &str| std::env::var(name).ok();
        let duration = match var("PRISM_BENCH_DURATION") {
            None => Duration::from_secs(3),
            Some(v) => humantime::parse_duration(&v)
                .ok()
                .filter(|d| !d.is_zero())
                .with_context(|| {
                    format!("PRISM_BENCH_DURATION={v:?}: expected a duration such as 3s")
                })?,
        };
        let concurrency = match var("PRISM_BENCH_CONCURRENCY") {
            None => 64,
            Some(v) => v.parse().ok().filter(|c| *c > 0).with_context(|| {
                format!("PRISM_BENCH_CONCURRENCY={v:?}: expected a positive integer")
            })?,
        };
        let mut backends = Vec::new();
        for name in var("PRISM_BENCH_BACKENDS")
            .as_deref()
            .unwrap_or("redis_cluster,redis,postgres")
            .split(',')
        {
            backends.push(match name.trim() {
                "redis_cluster" => Kind::RedisCluster,
                "redis" => Kind::Redis,
                "postgres" => Kind::Postgres,
                other => {
                    bail!("PRISM_BENCH_BACKENDS: {other:?} is not redis_cluster, redis or postgres")
                }
            });
        }
        Ok(Config {
            duration,
            concurrency,
            backends,
            postgres_url: var("PRISM_TEST_POSTGRES_URL")
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into()),
            redis_url: var("PRISM_TEST_REDIS_URL")
                .unwrap_or_else(|| "redis://127.0.0.1:6379".into()),
            cluster_urls: Vec::new(),
        })
    }

    fn settings(&self, kind: Kind) -> String {
        let backend = match kind {
            Kind::RedisCluster => format!(
                "kind = \"redis_cluster\"\nurls = [{}]\nkey_prefix = \"{KEY_PREFIX}\"",
                self.cluster_urls
                    .iter()
                    .map(|u| format!("\"{u}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Kind::Redis => format!(
                "kind = \"redis\"\nurl = \"{}\"\nkey_prefix = \"{KEY_PREFIX}\"",
                self.redis_url
            ),
            Kind::Postgres => format!(
                "kind = \"postgres\"\nurl = \"{}\"\ntable = \"{TABLE}\"",
                self.postgres_url
            ),
        };
        format!(
            r#"
[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
shutdown_grace = "5s"
drain_delay = "0s"

[backends.kv]
{backend}

[namespaces.{NAMESPACE}]
backend = "kv"
"#
        )
    }
}

/// A `prism serve` process and its settings directory.
struct Instance {
    prism: Prism,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Instance {
    async fn start(settings: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("tempdir")?;
        std::fs::write(dir.path().join("default.toml"), settings).context("settings")?;
        let mut prism = Prism::serve(dir.path());
        let addr = prism.grpc_addr().await;
        Ok(Instance {
            prism,
            addr,
            _dir: dir,
        })
    }

    fn pid(&self) -> u32 {
        self.prism.id()
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` times.
fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// `utime + stime` of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces) start at 3.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    field(14).unwrap_or(0) + field(15).unwrap_or(0)
}

/// CPU samples of some processes, taken by a thread of its own.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, Vec<u64>)>>,
}

impl Sampler {
    fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                samples.push((Instant::now(), pids.iter().map(|p| cpu_ticks(*p)).collect()));
                std::thread::sleep(Duration::from_millis(20));
            }
            samples.push((Instant::now(), pids.iter().map(|p| cpu_ticks(*p)).collect()));
            samples
        });
        Sampler { stop, thread }
    }

    /// CPU seconds of each process between `from` and `to` (interpolated
    /// between samples).
    fn finish(self, from: Instant, to: Instant, ticks: u64) -> Vec<f64> {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self.thread.join().expect("sampler thread");
        let at = |t: Instant, i: usize| -> f64 {
            let after = samples.iter().position(|(s, _)| *s >= t);
            match after {
                None => samples.last().map_or(0.0, |(_, v)| v[i] as f64),
                Some(0) => samples[0].1[i] as f64,
                Some(k) => {
                    let ((t0, v0), (t1, v1)) = (&samples[k - 1], &samples[k]);
                    let span = t1.duration_since(*t0).as_secs_f64().max(1e-9);
                    let part = t.duration_since(*t0).as_secs_f64() / span;
                    v0[i] as f64 + (v1[i] as f64 - v0[i] as f64) * part
                }
            }
        };
        let n = samples.first().map_or(0, |(_, v)| v.len());
        (0..n)
            .map(|i| (at(to, i) - at(from, i)) / ticks as f64)
            .collect()
    }
}

/// One row of the table.
struct Row {
    backend: Kind,
    instances: usize,
    report: BenchReport,
    /// µs of CPU per answered operation, each gateway.
    gateway_us: Vec<f64>,
    client_us: f64,
}

async fn measure(
    config: &Config,
    kind: Kind,
    instances: &[&Instance],
    op: Op,
    ticks: u64,
) -> anyhow::Result<Row> {
    let addr = instances
        .iter()
        .map(|i| i.addr.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let options = BenchOptions {
        client: ClientOptions {
            addr,
            timeout: Some(Duration::from_secs(5)),
            ..ClientOptions::default()
        },
        namespace: NAMESPACE.into(),
        op,
        concurrency: config.concurrency,
        connections: 4,
        duration: config.duration,
        warmup: Duration::from_secs(1),
        keys: 10_000,
        value_size: 128,
        progress: false,
    };
    let mut pids: Vec<u32> = instances.iter().map(|i| i.pid()).collect();
    pids.push(std::process::id());
    let sampler = Sampler::start(pids);
    let report = prism::bench::run(&options)
        .await
        .with_context(|| format!("{} {} x{}", kind.name(), op.as_str(), instances.len()))?;
    let to = Instant::now();
    let from = to - Duration::from_secs_f64(report.elapsed_secs);
    let mut cpu = sampler.finish(from, to, ticks);
    let ops = report.ops.max(1) as f64;
    let client_us = cpu.pop().unwrap_or(0.0) * 1e6 / ops;
    Ok(Row {
        backend: kind,
        instances: instances.len(),
        gateway_us: cpu.iter().map(|s| s * 1e6 / ops).collect(),
        client_us,
        report,
    })
}

async fn cleanup(config: &Config) -> anyhow::Result<()> {
    if config.backends.contains(&Kind::Postgres) {
        let pool = sqlx::PgPool::connect(&config.postgres_url)
            .await
            .context("connecting to postgres for cleanup")?;
        for table in [TABLE.to_owned(), format!("{TABLE}_schema_version")] {
            sqlx::query(&format!("DROP TABLE IF EXISTS \"{table}\""))
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
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{KEY_PREFIX}:*"))
            .query_async(&mut conn)
            .await
            .context("listing keys")?;
        for chunk in keys.chunks(1000) {
            let _: () = redis::cmd("DEL")
                .arg(chunk)
                .query_async(&mut conn)
                .await
                .context("deleting keys")?;
        }
    }
    Ok(())
}

fn print(config: &Config, rows: &[Row]) {
    let m = prism::bench::Machine::current();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    println!(
        "\nscale-out: {} cores ({model}), {} {}; concurrency {}, 4 connections, 10 000 keys, 128 B values, {} measured per run\n",
        m.cores,
        m.os,
        m.arch,
        config.concurrency,
        humantime::format_duration(config.duration)
    );
    println!("| backend | instances | op | ops/s | p50 ms | p99 ms | errors | gateway CPU µs/op (per instance) | client CPU µs/op |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let l = &r.report.latency_ms;
        let total: f64 = r.gateway_us.iter().sum();
        let each = r
            .gateway_us
            .iter()
            .map(|u| format!("{u:.0}"))
            .collect::<Vec<_>>()
            .join(" + ");
        println!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {} | {total:.0} ({each}) | {:.0} |",
            r.backend.name(),
            r.instances,
            r.report.op.as_str(),
            r.report.throughput,
            l.p50,
            l.p99,
            r.report.error_count(),
            r.client_us
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; there are no other arguments.
    let mut config = Config::from_env()?;
    // A cluster of the run's own, its nodes stopped when it is dropped.
    let _cluster = if config.backends.contains(&Kind::RedisCluster) {
        let cluster = tokio::task::spawn_blocking(cluster::ThrowawayCluster::start)
            .await
            .context("starting the cluster")??;
        config.cluster_urls = cluster.urls();
        Some(cluster)
    } else {
        None
    };
    let ticks = clock_ticks();
    cleanup(&config).await?;
    let mut rows = Vec::new();
    for &kind in &config.backends {
        let settings = config.settings(kind);
        // One after the other: the first creates the table.
        let a = Instance::start(&settings).await?;
        let b = Instance::start(&settings).await?;
        for op in [Op::Get, Op::Put] {
            for instances in [vec![&a], vec![&a, &b]] {
                let row = measure(&config, kind, &instances, op, ticks).await?;
                eprintln!(
                    "{} {} x{}: {:.0} ops/s",
                    kind.name(),
                    op.as_str(),
                    instances.len(),
                    row.report.throughput
                );
                rows.push(row);
            }
        }
        drop((a, b));
    }
    cleanup(&config).await?;
    print(&config, &rows);
    Ok(())
}
