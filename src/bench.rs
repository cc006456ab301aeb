//! A closed-loop load generator for a running gateway (`prism bench`).
//!
//! `concurrency` workers share `connections` gRPC channels; each sends one
//! request, waits for the answer, and sends the next, for `warmup` +
//! `duration`. Only requests started after the warmup are counted. Keys are
//! drawn uniformly from `keys` names (`bench-0000000000` ...), pre-populated
//! for `get` and `mixed`. `mixed` is 90% get, 10% put.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::Code;

use crate::client::{self, code_name, describe, Client, ClientOptions};

/// The operation a benchmark sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Reads of pre-populated keys.
    Get,
    /// Overwrites.
    Put,
    /// 90% get, 10% put, over pre-populated keys.
    Mixed,
}

impl Op {
    /// The operation's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Put => "put",
            Op::Mixed => "mixed",
        }
    }
}

/// Share of gets in [`Op::Mixed`], in percent.
pub const MIXED_GET_PERCENT: u64 = 90;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The gateway and per-request options (deadline, client id).
    pub client: ClientOptions,
    /// The namespace to load.
    pub namespace: String,
    /// What to send.
    pub op: Op,
    /// Requests in flight at once (workers).
    pub concurrency: usize,
    /// gRPC channels (TCP connections) the workers share.
    pub connections: usize,
    /// How long to measure.
    pub duration: Duration,
    /// How long to run before measuring.
    pub warmup: Duration,
    /// Distinct keys.
    pub keys: u64,
    /// Bytes per value.
    pub value_size: usize,
    /// Print progress to stderr: a line when the warmup ends, then one a
    /// second with that second's operations and errors.
    pub progress: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            client: ClientOptions::default(),
            namespace: "default".into(),
            op: Op::Get,
            concurrency: 64,
            connections: 4,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            keys: 10_000,
            value_size: 128,
            progress: false,
        }
    }
}

/// Errors that stop a benchmark before it measures anything.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The options cannot be run.
    #[error("invalid benchmark options: {0}")]
    Options(String),
    /// A connection could not be made.
    #[error(transparent)]
    Connect(#[from] client::Error),
    /// Pre-populating the keys failed.
    #[error("populating key {key}: {}", describe(.status))]
    Populate {
        /// The key whose put failed.
        key: String,
        /// The status it got.
        status: tonic::Status,
    },
}

/// Latencies in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Slowest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// Where the benchmark ran.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Cores available to this process.
    pub cores: usize,
    /// Operating system.
    pub os: &'static str,
    /// CPU architecture.
    pub arch: &'static str,
}

impl Machine {
    /// This machine.
    pub fn current() -> Self {
        Machine {
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            os: std::env::consts::OS,
            arch: std::env::consts::ARCH,
        }
    }
}

/// The outcome of a benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// What was sent.
    pub op: Op,
    /// Where.
    pub namespace: String,
    /// Workers.
    pub concurrency: usize,
    /// Channels.
    pub connections: usize,
    /// Bytes per value.
    pub value_size: usize,
    /// Distinct keys.
    pub keys: u64,
    /// The measured time, in seconds (from the end of the warmup to the
    /// last answer).
    pub elapsed_secs: f64,
    /// Requests answered OK in the measured time.
    pub ops: u64,
    /// OK answers per second.
    pub throughput: f64,
    /// Latency of OK answers.
    pub latency_ms: Latency,
    /// Failed requests by gRPC code name (`DEADLINE_EXCEEDED`).
    pub errors: BTreeMap<String, u64>,
    /// Where it ran.
    pub machine: Machine,
}

impl BenchReport {
    /// Failed requests, all codes.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.machine;
        writeln!(
            f,
            "prism bench: namespace {}, {} keys, {} B values, {:.1} s measured; machine: {} cores, {} {}",
            self.namespace, self.keys, self.value_size, self.elapsed_secs, m.cores, m.os, m.arch
        )?;
        writeln!(
            f,
            "{:<6} {:>6} {:>6} {:>12} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "op",
            "conc",
            "conns",
            "ops",
            "ops/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "errors"
        )?;
        let l = &self.latency_ms;
        writeln!(
            f,
            "{:<6} {:>6} {:>6} {:>12} {:>12.0} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>8}",
            self.op.as_str(),
            self.concurrency,
            self.connections,
            self.ops,
            self.throughput,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            self.error_count()
        )?;
        for (code, count) in &self.errors {
            writeln!(f, "errors: {code} {count}")?;
        }
        Ok(())
    }
}

/// Runs a benchmark against the gateway at `options.client.addr` and
/// returns its numbers.
pub async fn run(options: &BenchOptions) -> Result<BenchReport, Error> {
    check(options)?;
    let mut clients = Vec::with_capacity(options.connections);
    for _ in 0..options.connections {
        clients.push(Client::connect(&options.client).await?);
    }
    let namespace: Arc<str> = Arc::from(options.namespace.as_str());
    let value = Bytes::from(vec![b'x'; options.value_size]);
    if options.op != Op::Put {
        populate(&clients, &namespace, &value, options).await?;
    }

    // 1 µs to 1 h at 3 significant digits; longer latencies saturate.
    let histogram = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
        .map_err(|e| Error::Options(format!("histogram: {e}")))?;
    let start = Instant::now();
    let measure_from = start + options.warmup;
    let end = measure_from + options.duration;
    let tally = Arc::new(Tally::default());
    let reporter = options
        .progress
        .then(|| tokio::spawn(report_progress(tally.clone(), measure_from, end)));
    let mut workers = Vec::with_capacity(options.concurrency);
    for i in 0..options.concurrency {
        let worker = Worker {
            client: clients[i % clients.len()].clone(),
            namespace: namespace.clone(),
            value: value.clone(),
            op: options.op,
            keys: options.keys,
            rng: SplitMix64(0x5eed_0000 + i as u64),
            histogram: histogram.clone(),
            errors: HashMap::new(),
            tally: tally.clone(),
        };
        workers.push(tokio::spawn(worker.run(measure_from, end)));
    }

    let mut total = histogram;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for worker in workers {
        // A worker only fails by panicking, which is a bug here, not a
        // result of the run: report it as such.
        let (histogram, worker_errors) = worker
            .await
            .map_err(|e| Error::Options(format!("a worker failed: {e}")))?;
        total
            .add(&histogram)
            .map_err(|e| Error::Options(format!("histogram: {e}")))?;
        for (code, count) in worker_errors {
            *errors.entry(code_name(code).to_owned()).or_default() += count;
        }
    }
    if let Some(reporter) = reporter {
        reporter.abort();
    }
    let elapsed = Instant::now()
        .saturating_duration_since(measure_from)
        .max(Duration::from_micros(1));
    let ms = |micros: u64| micros as f64 / 1000.0;
    let ops = total.len();
    Ok(BenchReport {
        op: options.op,
        namespace: options.namespace.clone(),
        concurrency: options.concurrency,
        connections: clients.len(),
        value_size: options.value_size,
        keys: options.keys,
        elapsed_secs: elapsed.as_secs_f64(),
        ops,
        throughput: ops as f64 / elapsed.as_secs_f64(),
        latency_ms: Latency {
            p50: ms(total.value_at_quantile(0.50)),
            p90: ms(total.value_at_quantile(0.90)),
            p99: ms(total.value_at_quantile(0.99)),
            p999: ms(total.value_at_quantile(0.999)),
            max: ms(total.max()),
            mean: total.mean() / 1000.0,
        },
        errors,
        machine: Machine::current(),
    })
}

fn check(options: &BenchOptions) -> Result<(), Error> {
    let fail = |m: &str| Err(Error::Options(m.into()));
    if options.concurrency == 0 {
        return fail("concurrency must be at least 1");
    }
    if options.connections == 0 {
        return fail("connections must be at least 1");
    }
    if options.keys == 0 {
        return fail("keys must be at least 1");
    }
    if options.duration.is_zero() {
        return fail("duration must be greater than 0");
    }
    Ok(())
}

/// The name of key number `i`.
pub fn key_name(i: u64) -> String {
    format!("bench-{i:010}")
}

/// Puts every key once, `concurrency` at a time.
async fn populate(
    clients: &[Client],
    namespace: &Arc<str>,
    value: &Bytes,
    options: &BenchOptions,
) -> Result<(), Error> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..options.concurrency.min(options.keys as usize).max(1) {
        let client = clients[i % clients.len()].clone();
        let (next, namespace, value, keys) =
            (next.clone(), namespace.clone(), value.clone(), options.keys);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys {
                    return Ok(());
                }
                let key = key_name(i);
                if let Err(status) = client.put(&namespace, &key, value.clone(), None).await {
                    // Stop the other tasks early too.
                    next.store(keys, Ordering::Relaxed);
                    return Err(Error::Populate { key, status });
                }
            }
        }));
    }
    let mut first_error = None;
    for task in tasks {
        let result = task
            .await
            .map_err(|e| Error::Options(format!("a populating task failed: {e}")))
            .and_then(|r| r);
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

struct Worker {
    client: Client,
    namespace: Arc<str>,
    value: Bytes,
    op: Op,
    keys: u64,
    rng: SplitMix64,
    histogram: Histogram<u64>,
    errors: HashMap<Code, u64>,
    tally: Arc<Tally>,
}

impl Worker {
    async fn run(
        mut self,
        measure_from: Instant,
        end: Instant,
    ) -> (Histogram<u64>, HashMap<Code, u64>) {
        loop {
            let started = Instant::now();
            if started >= end {
                break;
            }
            let key = key_name(self.rng.next() % self.keys);
            let get = match self.op {
                Op::Get => true,
                Op::Put => false,
                Op::Mixed => self.rng.next() % 100 < MIXED_GET_PERCENT,
            };
            let result = if get {
                self.client.get(&self.namespace, &key).await.map(|_| ())
            } else {
                self.client
                    .put(&self.namespace, &key, self.value.clone(), None)
                    .await
            };
            if started < measure_from {
                continue;
            }
            match result {
                Ok(()) => {
                    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                    self.histogram.saturating_record(micros.max(1));
                    self.tally.ops.fetch_add(1, Ordering::Relaxed);
                }
                Err(status) => {
                    *self.errors.entry(status.code()).or_default() += 1;
                    self.tally.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        (self.histogram, self.errors)
    }
}

/// Operations and errors measured so far, across workers.
#[derive(Default)]
struct Tally {
    ops: AtomicU64,
    errors: AtomicU64,
}

/// Prints a line to stderr when the warmup ends, then one a second while
/// measuring.
async fn report_progress(tally: Arc<Tally>, measure_from: Instant, end: Instant) {
    let (measure_from, end) = (
        tokio::time::Instant::from_std(measure_from),
        tokio::time::Instant::from_std(end),
    );
    tokio::time::sleep_until(measure_from).await;
    eprintln!("prism bench: warmup over, measuring");
    let second = Duration::from_secs(1);
    let mut ticks = tokio::time::interval_at(measure_from + second, second);
    let (mut ops, mut errors) = (0, 0);
    loop {
        let at = ticks.tick().await;
        if at > end {
            return;
        }
        let (now_ops, now_errors) = (
            tally.ops.load(Ordering::Relaxed),
            tally.errors.load(Ordering::Relaxed),
        );
        eprintln!(
            "prism bench: {:>6.1} s  {:>8} ops/s  {} errors",
            at.saturating_duration_since(measure_from).as_secs_f64(),
            now_ops - ops,
            now_errors - errors
        );
        (ops, errors) = (now_ops, now_errors);
    }
}

/// A small, fast, seedable generator: key choice needs spread, not secrecy.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_draws_about_ninety_percent_gets() {
        let mut rng = SplitMix64(7);
        let gets = (0..10_000)
            .filter(|_| rng.next() % 100 < MIXED_GET_PERCENT)
            .count();
        assert!((8_800..9_200).contains(&gets), "{gets} gets of 10000");
    }

    #[tokio::test]
    async fn options_that_cannot_run_are_rejected_before_connecting() {
        let options = BenchOptions {
            concurrency: 0,
            ..BenchOptions::default()
        };
        assert!(matches!(run(&options).await, Err(Error::Options(_))));
    }
}
