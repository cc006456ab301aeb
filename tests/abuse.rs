//! Abuse: thousands of connections that never finish a request, against
//! the real binary, while a well-behaved client keeps being served.
//!
//! The abusers, all at once: HTTP/2 connections to the gRPC port, each
//! with two `Put` streams that never finish (one sends its headers only,
//! the other a gRPC frame header announcing 1000 bytes and 10 of them);
//! TCP connections that send half of the HTTP/2 preface; and REST `PUT`s
//! to the admin plane that announce a 64 KiB body and then trickle one
//! byte a second or stall. Meanwhile a client with its own connections
//! puts and gets over gRPC and REST, each request with a 5 s deadline.
//!
//! The gateway's resident memory (`VmRSS`) is read before, sampled during
//! the abuse (with `VmHWM`, the kernel's high-water mark) and read after the
//! abusers hang up; the figures are printed. The test asserts that every
//! request of the well-behaved client succeeded, that the gateway held the
//! abusers' connections, that its peak stayed under a generous bound, and
//! that it let go of every socket afterwards. No timing is asserted.
//!
//! The counts shrink, with a printed note, when the open-file limit (raised
//! from soft to hard first) cannot hold them in both processes.

#![cfg(target_os = "linux")]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::binary::{Prism, Signal, STARTUP};
use common::requests::{self, get, put, with_timeout};
use common::settings_dir;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// Connections of each kind when the open-file limit allows.
const H2_CONNECTIONS: usize = 2000;
const PARTIAL_PREFACES: usize = 200;
const SLOW_BODIES: usize = 300;
/// File descriptors each process keeps for everything else.
const RESERVE_FDS: u64 = 256;
/// Descriptors the gateway may hold above its count before the abuse once
/// the abusers are gone (connections of the well-behaved client, sockets
/// still being closed): far below the thousands it held.
const RELEASE_SLACK: usize = 64;
/// How long the abuse holds after every abuser is connected.
const HOLD: Duration = Duration::from_secs(5);
/// The deadline of each request of the well-behaved client: generous,
/// since the abusers, the gateway (a debug build) and the client share
/// the machine's cores.
const DEADLINE: Duration = Duration::from_secs(5);
/// The bound on the gateway's peak resident memory.
const PEAK_BOUND_KIB: u64 = 512 * 1024;
/// The whole test, setup and clean-up included.
const WHOLE_TEST: Duration = Duration::from_secs(60);

const SETTINGS: &str = r#"
[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
shutdown_grace = "10s"
drain_delay = "0s"

[log]
level = "warn,prism=info"

[backends.mem]
kind = "memory"

[namespaces.cache]
backend = "mem"

# Slow bodies are read under this deadline: long enough to outlast the test.
[namespaces.slow]
backend = "mem"
timeout = "50s"
"#;

/// Raises the soft open-file limit to the hard one (children inherit it);
/// returns the soft limit in force.
fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `lim`.
    unsafe {
        assert_eq!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim),
            0,
            "getrlimit"
        );
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

/// The counts of each kind of abuser that fit in `fd_limit`, scaled down
/// evenly when they do not all fit.
fn counts(fd_limit: u64) -> (usize, usize, usize) {
    let wanted = (H2_CONNECTIONS + PARTIAL_PREFACES + SLOW_BODIES) as u64;
    let room = fd_limit.saturating_sub(RESERVE_FDS);
    if room >= wanted {
        return (H2_CONNECTIONS, PARTIAL_PREFACES, SLOW_BODIES);
    }
    let scale = |n: usize| ((n as u64 * room) / wanted) as usize;
    println!(
        "note: open-file limit {fd_limit} holds {room} of {wanted} abusive connections; scaling down"
    );
    (
        scale(H2_CONNECTIONS),
        scale(PARTIAL_PREFACES),
        scale(SLOW_BODIES),
    )
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Open file descriptors of the process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read fd dir")
        .count()
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// An HTTP/2 connection with two `Put` streams that never finish. Holding
/// it keeps them open; dropping it closes the connection.
struct StalledH2 {
    _send: h2::client::SendRequest<Bytes>,
    _streams: Vec<(h2::client::ResponseFuture, h2::SendStream<Bytes>)>,
    /// The task driving the connection, which owns the socket.
    driver: tokio::task::AbortHandle,
}

impl Drop for StalledH2 {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn stalled_h2(addr: SocketAddr) -> anyhow::Result<StalledH2> {
    let tcp = TcpStream::connect(addr).await?;
    let (send, connection) = h2::client::handshake(tcp).await?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    })
    .abort_handle();
    let mut send = send.ready().await?;
    let mut streams = Vec::new();
    for partial in [false, true] {
        let request = http::Request::post(format!("http://{addr}/prism.kv.v1.KeyValue/Put"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        let (response, mut body) = send.send_request(request, false)?;
        if partial {
            // A gRPC frame: uncompressed, 1000 bytes announced, 10 sent.
            let mut frame = vec![0u8, 0, 0, 0x03, 0xe8];
            frame.extend_from_slice(&[0x0a; 10]);
            body.send_data(Bytes::from(frame), false)?;
        }
        streams.push((response, body));
        send = send.ready().await?;
    }
    Ok(StalledH2 {
        _send: send,
        _streams: streams,
        driver,
    })
}

/// A connection that sends half of the HTTP/2 client preface.
async fn partial_preface(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(b"PRI * HTTP/2.0\r\n").await?;
    Ok(tcp)
}

/// A REST Put announcing a 64 KiB body, then sending 16 bytes of it; the
/// rest trickles (one byte a second) or never comes.
async fn slow_body(addr: SocketAddr, i: usize) -> anyhow::Result<TcpStream> {
    let mut tcp = TcpStream::connect(addr).await?;
    let head = format!(
        "PUT /v1/kv/slow/k{i} HTTP/1.1\r\nHost: {addr}\r\nx-client-id: slow-{i}\r\n\
         Content-Length: 65536\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(&[b's'; 16]).await?;
    Ok(tcp)
}

/// What the well-behaved client saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    slowest_ms: AtomicU64,
}

impl Tally {
    fn record(&self, ok: bool, started: std::time::Instant) {
        let counter = if ok { &self.ok } else { &self.failed };
        counter.fetch_add(1, Ordering::Relaxed);
        let ms = started.elapsed().as_millis() as u64;
        self.slowest_ms.fetch_max(ms, Ordering::Relaxed);
    }
}

/// Puts and gets over gRPC and REST, one after another, each within
/// [`DEADLINE`], on connections of its own, until aborted.
async fn well_behaved(grpc: SocketAddr, http: SocketAddr, tally: Arc<Tally>) {
    let mut client = requests::connect(grpc).await.expect("connect grpc");
    let rest = reqwest::Client::builder()
        .timeout(DEADLINE)
        .build()
        .expect("reqwest client");
    let url = format!("http://{http}/v1/kv/cache/good");
    for n in 0u64.. {
        let value = n.to_string();
        let started = std::time::Instant::now();
        let put_ok = client
            .put(with_timeout(
                put("cache", "good", value.as_bytes(), 0),
                DEADLINE,
            ))
            .await
            .is_ok();
        tally.record(put_ok, started);
        let started = std::time::Instant::now();
        let get_ok = client
            .get(with_timeout(get("cache", "good"), DEADLINE))
            .await
            .is_ok_and(|r| r.into_inner().value == value.as_bytes());
        tally.record(get_ok, started);
        let started = std::time::Instant::now();
        let rest_ok = rest
            .get(&url)
            .header("x-client-id", "good")
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        tally.record(rest_ok, started);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Samples the gateway's VmRSS every 50 ms until aborted; keeps the peak.
async fn sample_rss(pid: u32, peak: Arc<AtomicU64>) {
    loop {
        peak.fetch_max(status_kib(pid, "VmRSS"), Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_leave_a_well_behaved_client_served_and_memory_bounded() {
    tokio::time::timeout(WHOLE_TEST, abuse())
        .await
        .expect("the abuse test ran past its time");
}

async fn abuse() {
    let fd_limit = raise_fd_limit();
    let (n_h2, n_prefaces, n_slow) = counts(fd_limit);
    let dir = settings_dir(SETTINGS);
    let mut prism = Prism::serve(dir.path());
    let grpc = prism.grpc_addr().await;
    let http = prism.http_addr().await;
    let pid = prism.id();

    // Warm up: the well-behaved client's paths have run before "before".
    let tally = Arc::new(Tally::default());
    let mut background = JoinSet::new();
    background.spawn(well_behaved(grpc, http, tally.clone()));
    let warm =
        common::eventually(STARTUP, || async { tally.ok.load(Ordering::Relaxed) >= 30 }).await;
    assert!(
        warm,
        "the well-behaved client is not served; log:\n{}",
        prism.log_text()
    );
    let fds_before = open_fds(pid);
    let rss_before = status_kib(pid, "VmRSS");
    let peak = Arc::new(AtomicU64::new(rss_before));
    background.spawn(sample_rss(pid, peak.clone()));

    // The abusers, 32 connecting at a time.
    let mut h2_conns = Vec::with_capacity(n_h2);
    while h2_conns.len() < n_h2 {
        let mut opening = JoinSet::new();
        for _ in 0..(n_h2 - h2_conns.len()).min(32) {
            opening.spawn(stalled_h2(grpc));
        }
        while let Some(opened) = opening.join_next().await {
            h2_conns.push(
                opened
                    .expect("opening task")
                    .expect("open a stalled http/2 connection"),
            );
        }
    }
    let mut prefaces = Vec::with_capacity(n_prefaces);
    for _ in 0..n_prefaces {
        prefaces.push(partial_preface(grpc).await.expect("partial preface"));
    }
    let mut slow = Vec::with_capacity(n_slow);
    for i in 0..n_slow {
        slow.push(slow_body(http, i).await.expect("slow body"));
    }
    let abusers = n_h2 + n_prefaces + n_slow;
    let held = common::eventually(Duration::from_secs(10), || async {
        open_fds(pid) >= fds_before + abusers
    })
    .await;
    assert!(
        held,
        "the gateway holds {} descriptors, expected {fds_before} + {abusers}",
        open_fds(pid)
    );
    let connected_ok = tally.ok.load(Ordering::Relaxed);

    // Hold: half the slow bodies trickle a byte a second, the rest stall.
    let deadline = tokio::time::Instant::now() + HOLD;
    while tokio::time::Instant::now() < deadline {
        for tcp in slow.iter_mut().step_by(2) {
            tcp.write_all(b"t").await.expect("trickle");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The slow bodies are still being read: none has an answer yet.
    let mut buf = [0u8; 64];
    let answered = slow
        .iter()
        .filter(|tcp| !matches!(tcp.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock))
        .count();
    assert_eq!(
        answered, 0,
        "slow bodies answered (or closed) before they ended"
    );
    let fds_peak = open_fds(pid);
    let rss_at_peak = status_kib(pid, "VmRSS");
    peak.fetch_max(rss_at_peak, Ordering::Relaxed);
    let hwm = status_kib(pid, "VmHWM");
    let served_during = tally.ok.load(Ordering::Relaxed) - connected_ok;

    // Hang up every abuser, then see the gateway let go of the sockets.
    drop(h2_conns);
    drop(prefaces);
    drop(slow);
    // Wait for nearly all (the gateway notices each hang-up on its own
    // time), but only require that the thousands are gone.
    common::eventually(Duration::from_secs(15), || async {
        open_fds(pid) <= fds_before + 8
    })
    .await;
    let fds_after = open_fds(pid);
    let released = fds_after <= fds_before + RELEASE_SLACK;
    let rss_after = status_kib(pid, "VmRSS");
    background.shutdown().await;
    let ok = tally.ok.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    let slowest = tally.slowest_ms.load(Ordering::Relaxed);
    let peak = peak.load(Ordering::Relaxed).max(hwm);

    println!(
        "abuse: {n_h2} http/2 connections x 2 stalled Put streams, {n_prefaces} half prefaces, \
         {n_slow} slow REST bodies (open-file limit {fd_limit})"
    );
    println!(
        "gateway VmRSS: before {}, peak {} (VmHWM {}), after {}",
        mib(rss_before),
        mib(peak),
        mib(hwm),
        mib(rss_after)
    );
    println!("gateway open descriptors: before {fds_before}, peak {fds_peak}, after {fds_after}");
    println!(
        "well-behaved client: {ok} requests answered ({served_during} during the hold), \
         {failed} failed, slowest {slowest} ms (deadline {DEADLINE:?})"
    );

    assert_eq!(failed, 0, "the well-behaved client had failures");
    assert!(
        served_during > 0,
        "the client was not served during the hold"
    );
    assert!(
        peak < PEAK_BOUND_KIB,
        "peak resident memory {} over {}",
        mib(peak),
        mib(PEAK_BOUND_KIB)
    );
    assert!(
        released,
        "the gateway still holds {fds_after} descriptors, {fds_before} before the abuse"
    );

    // A clean stop with everything released.
    prism.signal(Signal::Term);
    let status = prism.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", prism.log_text());
}
