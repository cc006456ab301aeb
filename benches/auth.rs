//! What access control costs: memory-namespace Get through a gateway with
//! `auth.mode = "token"` against the same gateway with `auth.mode = "off"`.
//!
//! Both gateways run in this process on `127.0.0.1:0`, each with one memory
//! namespace holding the same keys. The bench alternates closed-loop runs of
//! [`prism::bench::run`] (what `prism bench` runs) against one and then the
//! other, so that both see the same machine, and prints each round and the
//! median ratio token/off of the throughputs.
//!
//! Run with `cargo bench --bench auth`. Knobs (environment):
//! `PRISM_BENCH_DURATION` (measured time per run, default `5s`),
//! `PRISM_BENCH_ROUNDS` (default 5), `PRISM_BENCH_CONCURRENCY` (default 64).

use std::time::Duration;

use anyhow::{bail, Context as _};
use prism::bench::{BenchOptions, BenchReport, Machine, Op};
use prism::client::ClientOptions;
use prism::{Gateway, Listeners, Settings};
use tokio::sync::oneshot;

/// The namespace both gateways serve.
const NAMESPACE: &str = "cache";
/// The token of the bench's principal in the `token` gateway.
const TOKEN: &str = "prism-bench-token-0123456789abcdef";
/// The issue's target for token/off.
const TARGET_RATIO: f64 = 0.95;

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and a
    // minute of load has no place in a test run.
    if !std::env::args().any(|a| a == "--bench") {
        println!("auth: a load bench; run it with `cargo bench --bench auth`");
        return Ok(());
    }
    let duration = env_duration("PRISM_BENCH_DURATION", Duration::from_secs(5))?;
    let rounds = env_number("PRISM_BENCH_ROUNDS", 5)?;
    let concurrency = env_number("PRISM_BENCH_CONCURRENCY", 64)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("the runtime")?
        .block_on(bench(duration, rounds, concurrency))
}

fn env_number(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("{name}={v:?}: expected a whole number above 0"),
        },
        Err(_) => Ok(default),
    }
}

fn env_duration(name: &str, default: Duration) -> anyhow::Result<Duration> {
    match std::env::var(name) {
        Ok(v) => humantime::parse_duration(&v).with_context(|| format!("{name}={v:?}")),
        Err(_) => Ok(default),
    }
}

/// A gateway with one memory namespace; `token` turns access control on
/// with one principal that may read and write every namespace.
fn settings(token: bool) -> anyhow::Result<Settings> {
    let auth = if token {
        format!(
            "[auth]\nmode = \"token\"\n\n[auth.principals.bench]\ntoken_sha256 = \"{}\"\nread = [\"*\"]\nwrite = [\"*\"]\n",
            prism::auth::hash_token(TOKEN)
        )
    } else {
        "[auth]\nmode = \"off\"\n".to_owned()
    };
    let toml = format!(
        r#"
[server]
grpc_addr = "127.0.0.1:0"
shutdown_grace = "10s"

[log]
level = "warn"

[backends.mem]
kind = "memory"

[namespaces.{NAMESPACE}]
backend = "mem"

{auth}
"#
    );
    Settings::from_toml(&toml).context("the gateway settings")
}

/// A running in-process gateway and how to stop it.
struct Running {
    client: ClientOptions,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(token: bool) -> anyhow::Result<Running> {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a gateway's listener")?;
    let addr = grpc.local_addr().context("a gateway's address")?;
    let (stop, stopped) = oneshot::channel::<()>();
    let gateway = Gateway::new(settings(token)?);
    let served = tokio::spawn(async move {
        gateway
            .serve(Listeners { grpc, http: None }, async move {
                let _ = stopped.await;
            })
            .await
            .context("the gateway stopped with an error")
    });
    let client = ClientOptions {
        addr: format!("http://{addr}"),
        timeout: Some(Duration::from_secs(5)),
        token: token.then(|| TOKEN.to_owned()),
        ..ClientOptions::default()
    };
    Ok(Running {
        client,
        stop,
        served,
    })
}

/// CPU time (user + system) this process has used, in seconds: both
/// gateways and the load generator run in it, and only one of them is
/// loaded at a time.
fn process_cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // The fields after the command name (which may hold spaces): utime and
    // stime are the 12th and 13th of them.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// One run's report and its CPU time per operation, in microseconds, over
/// the whole run (its warm-up included, alike for both modes).
async fn run(
    client: &ClientOptions,
    duration: Duration,
    concurrency: usize,
) -> anyhow::Result<(BenchReport, f64)> {
    let cpu = process_cpu_secs();
    let options = BenchOptions {
        client: client.clone(),
        namespace: NAMESPACE.into(),
        op: Op::Get,
        concurrency,
        duration,
        warmup: Duration::from_secs(1),
        ..BenchOptions::default()
    };
    let report = prism::bench::run(&options).await.context("a bench run")?;
    let cpu = process_cpu_secs() - cpu;
    if report.error_count() > 0 {
        bail!("a run had errors: {:?}", report.errors);
    }
    let ops = report.throughput * (options.duration + options.warmup).as_secs_f64();
    Ok((report, cpu * 1e6 / ops.max(1.0)))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The access decision alone, per request: parsing the `authorization`
/// value and checking it (SHA-256 of the token, compared with every
/// principal's hash, then the grant), in nanoseconds, median of 5 batches.
fn decision_cost() -> anyhow::Result<f64> {
    use prism::auth::{Access, Authorizer, Credentials};
    let settings = settings(true)?;
    let authorizer = Authorizer::new(&settings.auth, prism::metrics::Metrics::new());
    let header = format!("Bearer {TOKEN}");
    const CALLS: u32 = 200_000;
    let mut batches = Vec::new();
    for _ in 0..5 {
        let start = std::time::Instant::now();
        for _ in 0..CALLS {
            let credentials = Credentials::new(Some(std::hint::black_box(&header)), None);
            let principal = authorizer
                .check(&credentials, NAMESPACE, Access::Read, "get")
                .context("the bench principal is refused")?;
            std::hint::black_box(principal);
        }
        batches.push(start.elapsed().as_secs_f64() * 1e9 / f64::from(CALLS));
    }
    Ok(median(batches))
}

async fn bench(duration: Duration, rounds: usize, concurrency: usize) -> anyhow::Result<()> {
    let machine = Machine::current();
    let decision_ns = decision_cost()?;
    let off = start(false).await?;
    let token = start(true).await?;

    let mut table = Vec::new();
    let mut ratios = Vec::new();
    let mut cpu_ratios = Vec::new();
    for round in 1..=rounds {
        // Alternate which goes first, so neither always runs on a machine
        // still busy from the other.
        let (a, b) = if round % 2 == 1 {
            (&off, &token)
        } else {
            (&token, &off)
        };
        let first = run(&a.client, duration, concurrency).await?;
        let second = run(&b.client, duration, concurrency).await?;
        let (r_off, r_token) = if round % 2 == 1 {
            (first, second)
        } else {
            (second, first)
        };
        let ratio = r_token.0.throughput / r_off.0.throughput;
        let cpu_ratio = r_token.1 / r_off.1;
        eprintln!(
            "auth: round {round}: off {:.0} ops/s, token {:.0} ops/s, ratio {ratio:.3}, cpu/op ratio {cpu_ratio:.3}",
            r_off.0.throughput, r_token.0.throughput
        );
        ratios.push(ratio);
        cpu_ratios.push(cpu_ratio);
        table.push((round, r_off, r_token, ratio, cpu_ratio, load_average()));
    }

    for running in [off, token] {
        let _ = running.stop.send(());
        running.served.await.context("a gateway task")??;
    }

    println!(
        "\nmemory-namespace Get, concurrency {concurrency}, {}s per run, {} cores ({} {})\n",
        duration.as_secs_f64(),
        machine.cores,
        machine.os,
        machine.arch
    );
    println!(
        "| round | off ops/s | off p99 ms | off CPU µs/op | token ops/s | token p99 ms | token CPU µs/op | ops/s token/off | CPU/op token/off | load avg |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (round, (off, off_cpu), (token, token_cpu), ratio, cpu_ratio, load) in &table {
        println!(
            "| {round} | {:.0} | {:.2} | {off_cpu:.1} | {:.0} | {:.2} | {token_cpu:.1} | {ratio:.3} | {cpu_ratio:.3} | {load} |",
            off.throughput, off.latency_ms.p99, token.throughput, token.latency_ms.p99
        );
    }
    let m = median(ratios);
    let c = median(cpu_ratios);
    let off_cpu = median(table.iter().map(|row| row.1 .1).collect());
    println!(
        "\naccess decision alone: {:.2} µs per request ({:.1}% of the median CPU per Get with auth off, {off_cpu:.1} µs)",
        decision_ns / 1000.0,
        decision_ns / 10.0 / off_cpu
    );
    println!(
        "\nmedian throughput token/off: {m:.3} (target >= {TARGET_RATIO}: {}); median CPU per op token/off: {c:.3}",
        if m >= TARGET_RATIO { "met" } else { "missed" }
    );
    Ok(())
}
