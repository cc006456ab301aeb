//! The `prism` binary's command line: `check-config`, `serve`'s startup
//! errors and signal handling, `kv` and `bench` against a real gateway.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MEMORY_SETTINGS: &str = r#"
[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
shutdown_grace = "5s"

[backends.mem]
kind = "memory"

[namespaces.default]
backend = "mem"
"#;

/// The binary with an environment free of the caller's Prism variables.
fn prism() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prism"));
    for (name, _) in std::env::vars_os() {
        let upper = name.to_string_lossy().to_ascii_uppercase();
        if upper.starts_with("PRISM") || upper == "RUST_LOG" {
            cmd.env_remove(&name);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run prism")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn repo_settings() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("settings")
}

fn settings_dir(default_toml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("default.toml"), default_toml).expect("write default.toml");
    dir
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for prism") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("prism did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn check_config_accepts_the_repository_settings() {
    let out = run(prism()
        .args(["check-config", "--settings"])
        .arg(repo_settings()));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    for expected in [
        "127.0.0.1:8980",
        "embedded",
        "sqlite",
        "memory",
        "default",
        "cache",
    ] {
        assert!(
            text.contains(expected),
            "summary lacks {expected:?}:\n{text}"
        );
    }
}

#[test]
fn check_config_takes_the_directory_from_prism_settings() {
    let out = run(prism()
        .arg("check-config")
        .env("PRISM_SETTINGS", repo_settings()));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
}

#[test]
fn check_config_rejects_bad_settings_naming_the_key() {
    let cases = [
        (
            "shutdown_grace = \"5s\"",
            "shutdown_grace = \"5s\"\nport = 1",
            "server.port",
        ),
        (
            "backend = \"mem\"",
            "backend = \"mem\"\nttl = 3",
            "namespaces.default.ttl",
        ),
        (
            "backend = \"mem\"",
            "backend = \"pg\"",
            "namespaces.default.backend",
        ),
        (
            "shutdown_grace = \"5s\"",
            "shutdown_grace = \"5 parsecs\"",
            "server.shutdown_grace",
        ),
        ("\"127.0.0.1:0\"", "\"localhost:80\"", "server.grpc_addr"),
        (
            "kind = \"memory\"",
            "kind = \"memory\"\npath = \"x.db\"",
            "backends.mem.path",
        ),
    ];
    for (from, to, key) in cases {
        assert!(MEMORY_SETTINGS.contains(from));
        let dir = settings_dir(&MEMORY_SETTINGS.replacen(from, to, 1));
        let out = run(prism().args(["check-config", "--settings"]).arg(dir.path()));
        assert_eq!(
            out.status.code(),
            Some(64),
            "{key}: stderr: {}",
            stderr(&out)
        );
        let err = stderr(&out);
        assert!(err.starts_with("error: "), "{err}");
        assert!(
            err.contains(&format!("`{key}`")),
            "stderr does not name `{key}`: {err}"
        );
        assert!(
            err.contains("default.toml"),
            "stderr does not name the file: {err}"
        );
        assert!(out.stdout.is_empty(), "nothing on stdout on error");
    }
}

#[test]
fn check_config_names_the_environment_variable_of_a_bad_override() {
    let dir = settings_dir(MEMORY_SETTINGS);
    let out = run(prism()
        .args(["check-config", "--settings"])
        .arg(dir.path())
        .env("PRISM__NAMESPACES__DEFAULT__TIMEOUT", "soon"));
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("PRISM__NAMESPACES__DEFAULT__TIMEOUT"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn serve_with_bad_settings_exits_64_before_binding() {
    // Hold the port the settings name: had prism tried to bind first, it
    // would have failed with 69 instead.
    let held = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("addr").port();
    let text = MEMORY_SETTINGS
        .replacen("127.0.0.1:0", &format!("127.0.0.1:{port}"), 1)
        .replace("backend = \"mem\"", "backend = \"missing\"");
    let dir = settings_dir(&text);
    let mut child = prism()
        .args(["serve", "--settings"])
        .arg(dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn prism");
    let status = wait_with_timeout(&mut child, Duration::from_secs(30));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("read stderr");
    assert_eq!(status.code(), Some(64), "stderr: {err}");
    assert!(err.contains("`namespaces.default.backend`"), "{err}");
    assert!(!err.contains("bind"), "{err}");
}

#[test]
fn serve_exits_69_naming_the_key_when_the_address_is_taken() {
    let held = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("addr").port();
    let dir =
        settings_dir(&MEMORY_SETTINGS.replacen("127.0.0.1:0", &format!("127.0.0.1:{port}"), 1));
    let mut child = prism()
        .args(["serve", "--settings"])
        .arg(dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn prism");
    let status = wait_with_timeout(&mut child, Duration::from_secs(30));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("read stderr");
    assert_eq!(status.code(), Some(69), "stderr: {err}");
    assert!(err.contains("server.grpc_addr"), "{err}");
}

#[cfg(unix)]
#[test]
fn serve_drains_and_exits_0_on_sigterm() {
    let dir = settings_dir(MEMORY_SETTINGS);
    let mut child = prism()
        .args(["serve", "--settings"])
        .arg(dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn prism");
    let (lines_tx, lines_rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    // "prism starting" is logged once the signal handlers are installed.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut log = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) => {
                let started = line.contains("prism starting");
                log.push(line);
                if started {
                    break;
                }
            }
            Err(_) => {
                let _ = child.kill();
                panic!("prism did not start; log:\n{}", log.join("\n"));
            }
        }
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let status = wait_with_timeout(&mut child, Duration::from_secs(30));
    log.extend(lines_rx.try_iter());
    assert_eq!(status.code(), Some(0), "log:\n{}", log.join("\n"));
    assert!(
        log.iter().any(|l| l.contains("SIGTERM")),
        "the signal is logged:\n{}",
        log.join("\n")
    );
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let out = run(prism().arg("--bogus"));
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("--bogus"), "{}", stderr(&out));

    let out = run(prism().args(["kv", "get", "default"]));
    assert_eq!(
        out.status.code(),
        Some(64),
        "a missing argument is a usage error"
    );
}

#[test]
fn help_documents_the_exit_codes() {
    let out = run(prism().arg("--help"));
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    for expected in ["check-config", "kv", "bench", "Exit codes", "64", "69"] {
        assert!(text.contains(expected), "help lacks {expected:?}:\n{text}");
    }
}

/// A gateway served in-process on an ephemeral port, stopped on drop.
struct Gateway {
    addr: SocketAddr,
    runtime: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<Result<(), prism::Error>>>,
    _dir: tempfile::TempDir,
}

impl Gateway {
    fn start() -> Self {
        let dir = settings_dir(MEMORY_SETTINGS);
        let settings = prism::settings::load_with(dir.path(), None, Vec::new()).expect("settings");
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let grpc = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = grpc.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = runtime.spawn(prism::run(
            settings,
            prism::Listeners { grpc, http: None },
            async move {
                let _ = stopped.await;
            },
        ));
        Gateway {
            addr,
            runtime,
            stop: Some(stop),
            served: Some(served),
            _dir: dir,
        }
    }

    fn kv(&self, args: &[&str]) -> Output {
        run(prism()
            .args(["kv", "--addr", &self.addr.to_string()])
            .args(args))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            let _ = self
                .runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), served).await });
        }
    }
}

#[test]
fn kv_commands_round_trip_against_a_running_gateway() {
    let gw = Gateway::start();

    let out = gw.kv(&["put", "default", "greeting", "hello"]);
    assert_eq!(out.status.code(), Some(0), "put: {}", stderr(&out));

    let mut child = prism()
        .args([
            "kv",
            "--addr",
            &gw.addr.to_string(),
            "put",
            "default",
            "binary",
            "--ttl",
            "1h",
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn put");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"\x00\xffraw\n")
        .expect("write stdin");
    let out = child.wait_with_output().expect("put from stdin");
    assert_eq!(
        out.status.code(),
        Some(0),
        "put from stdin: {}",
        stderr(&out)
    );

    let out = gw.kv(&["get", "default", "greeting"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"hello", "raw value, no newline added");

    let out = gw.kv(&["get", "default", "binary"]);
    assert_eq!(out.stdout, b"\x00\xffraw\n", "stdin is taken byte for byte");

    let out = gw.kv(&["--json", "get", "default", "binary"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["found"], true);
    assert_eq!(json["value_base64"], "AP9yYXcK");
    let ttl = json["ttl_ms"].as_i64().expect("ttl_ms");
    assert!(ttl > 0 && ttl <= 3_600_000, "ttl_ms {ttl}");

    let out = gw.kv(&["get", "default", "absent"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(stderr(&out).contains("absent"), "{}", stderr(&out));

    let out = gw.kv(&["exists", "default", "greeting"]);
    assert_eq!((out.status.code(), stdout(&out).trim()), (Some(0), "true"));
    let out = gw.kv(&["exists", "default", "absent"]);
    assert_eq!((out.status.code(), stdout(&out).trim()), (Some(1), "false"));

    let out = gw.kv(&["scan", "default"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(out.stdout, b"binary\t\x00\xffraw\n\ngreeting\thello\n");

    let out = gw.kv(&["scan", "default", "--limit", "1", "--keys-only"]);
    assert_eq!(stdout(&out), "binary\n", "one page only without --all");
    assert!(
        stderr(&out).contains("--cursor"),
        "the next cursor is shown: {}",
        stderr(&out)
    );

    let out = gw.kv(&[
        "scan",
        "default",
        "--limit",
        "1",
        "--all",
        "--keys-only",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let keys: Vec<&str> = json["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["key"].as_str().expect("key"))
        .collect();
    assert_eq!(keys, ["binary", "greeting"], "--all follows the cursors");
    assert_eq!(json["next_cursor"], "");

    let out = gw.kv(&["delete", "default", "greeting"]);
    assert_eq!((out.status.code(), stdout(&out).trim()), (Some(0), "true"));
    let out = gw.kv(&["delete", "default", "greeting"]);
    assert_eq!(
        (out.status.code(), stdout(&out).trim()),
        (Some(0), "false"),
        "delete is idempotent"
    );

    let out = gw.kv(&["get", "nowhere", "k"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("error: NOT_FOUND: "),
        "{}",
        stderr(&out)
    );

    let out = gw.kv(&["--client-id", "tests", "exists", "default", "binary"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a client id is accepted: {}",
        stderr(&out)
    );
}

#[test]
fn kv_against_an_unreachable_gateway_exits_2() {
    // Bind and drop: nothing listens on the port afterwards.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let out = run(prism().args([
        "kv",
        "--addr",
        &format!("127.0.0.1:{port}"),
        "get",
        "default",
        "k",
    ]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("error: UNAVAILABLE: "),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bench_reports_throughput_and_latency() {
    let gw = Gateway::start();
    let out = run(prism().args([
        "bench",
        "--addr",
        &gw.addr.to_string(),
        "--op",
        "mixed",
        "--concurrency",
        "2",
        "--keys",
        "20",
        "--duration",
        "300ms",
        "--warmup",
        "0s",
        "--json",
    ]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    assert!(report["ops"].as_u64().expect("ops") > 0, "{report}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    assert!(report["latency_ms"]["p99"].as_f64().expect("p99") > 0.0);
    assert!(report["machine"]["cores"].as_u64().expect("cores") >= 1);
}
