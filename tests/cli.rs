//! The `prism` binary's command line: `check-config`, `serve`'s startup
//! errors and signal handling, `kv` and `bench` against a real gateway.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::process::Stdio;
use std::time::Duration;

use common::binary::{output, prism, run, stderr, stdout, Prism, Signal};
use common::{free_port, repo_settings, settings, settings_dir, TestServer};

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

#[tokio::test]
async fn serve_with_bad_settings_exits_64_before_binding() {
    // Hold the port the settings name: had prism tried to bind first, it
    // would have failed with 69 instead.
    let held = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("addr").port();
    let text = MEMORY_SETTINGS
        .replacen("127.0.0.1:0", &format!("127.0.0.1:{port}"), 1)
        .replace("backend = \"mem\"", "backend = \"missing\"");
    let dir = settings_dir(&text);
    let mut prism = Prism::serve(dir.path());
    let status = prism.wait_exit(Duration::from_secs(30)).await;
    let err = prism.log_text();
    assert_eq!(status.code(), Some(64), "stderr: {err}");
    assert!(err.contains("`namespaces.default.backend`"), "{err}");
    assert!(!err.contains("bind"), "{err}");
}

#[tokio::test]
async fn serve_exits_69_naming_the_key_when_the_address_is_taken() {
    let held = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("addr").port();
    let dir =
        settings_dir(&MEMORY_SETTINGS.replacen("127.0.0.1:0", &format!("127.0.0.1:{port}"), 1));
    let mut prism = Prism::serve(dir.path());
    let status = prism.wait_exit(Duration::from_secs(30)).await;
    let err = prism.log_text();
    assert_eq!(status.code(), Some(69), "stderr: {err}");
    assert!(err.contains("server.grpc_addr"), "{err}");
}

#[cfg(unix)]
#[tokio::test]
async fn serve_drains_and_exits_0_on_sigterm() {
    let dir = settings_dir(MEMORY_SETTINGS);
    let mut prism = Prism::serve(dir.path());
    // "prism starting" is logged once the signal handlers are installed.
    prism
        .wait_for("prism starting", Duration::from_secs(30))
        .await;
    prism.signal(Signal::Term);
    let status = prism.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", prism.log_text());
    assert!(
        prism.log().iter().any(|l| l.text.contains("SIGTERM")),
        "the signal is logged:\n{}",
        prism.log_text()
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

/// A gateway with the memory settings, served in this process.
async fn gateway() -> TestServer {
    TestServer::start(settings(MEMORY_SETTINGS))
        .await
        .expect("gateway starts")
}

/// `prism kv --addr <gateway> <args>`, run to its end.
async fn kv(gw: &TestServer, args: &[&str]) -> std::process::Output {
    let mut cmd = prism();
    cmd.args(["kv", "--addr", &gw.addr.to_string()]).args(args);
    output(cmd).await
}

#[tokio::test]
async fn kv_commands_round_trip_against_a_running_gateway() {
    let gw = gateway().await;

    let out = kv(&gw, &["put", "default", "greeting", "hello"]).await;
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
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("put task")
        .expect("put from stdin");
    assert_eq!(
        out.status.code(),
        Some(0),
        "put from stdin: {}",
        stderr(&out)
    );

    let out = kv(&gw, &["get", "default", "greeting"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"hello", "raw value, no newline added");

    let out = kv(&gw, &["get", "default", "binary"]).await;
    assert_eq!(out.stdout, b"\x00\xffraw\n", "stdin is taken byte for byte");

    let out = kv(&gw, &["--json", "get", "default", "binary"]).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["found"], true);
    assert_eq!(json["value_base64"], "AP9yYXcK");
    let ttl = json["ttl_ms"].as_i64().expect("ttl_ms");
    assert!(ttl > 0 && ttl <= 3_600_000, "ttl_ms {ttl}");

    let out = kv(&gw, &["get", "default", "absent"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(stderr(&out).contains("absent"), "{}", stderr(&out));

    let out = kv(&gw, &["exists", "default", "greeting"]).await;
    assert_eq!((out.status.code(), stdout(&out).trim()), (Some(0), "true"));
    let out = kv(&gw, &["exists", "default", "absent"]).await;
    assert_eq!((out.status.code(), stdout(&out).trim()), (Some(1), "false"));

    let out = kv(&gw, &["scan", "default"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(out.stdout, b"binary\t\x00\xffraw\n\ngreeting\thello\n");

    let out = kv(&gw, &["scan", "default", "--limit", "1", "--keys-only"]).await;
    assert_eq!(stdout(&out), "binary\n", "one page only without --all");
    assert!(
        stderr(&out).contains("--cursor"),
        "the next cursor is shown: {}",
        stderr(&out)
    );

    let out = kv(
        &gw,
        &[
            "scan",
            "default",
            "--limit",
            "1",
            "--all",
            "--keys-only",
            "--json",
        ],
    )
    .await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let keys: Vec<&str> = json["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["key"].as_str().expect("key"))
        .collect();
    assert_eq!(keys, ["binary", "greeting"], "--all follows the cursors");
    assert_eq!(json["next_cursor"], "");

    let out = kv(&gw, &["delete", "default", "greeting"]).await;
    assert_eq!((out.status.code(), stdout(&out).trim()), (Some(0), "true"));
    let out = kv(&gw, &["delete", "default", "greeting"]).await;
    assert_eq!(
        (out.status.code(), stdout(&out).trim()),
        (Some(0), "false"),
        "delete is idempotent"
    );

    let out = kv(&gw, &["get", "nowhere", "k"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("error: NOT_FOUND: "),
        "{}",
        stderr(&out)
    );

    let out = kv(
        &gw,
        &["--client-id", "tests", "exists", "default", "binary"],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "a client id is accepted: {}",
        stderr(&out)
    );
    gw.stop().await.expect("clean stop");
}

#[test]
fn kv_against_an_unreachable_gateway_exits_2() {
    // Bound and dropped: nothing listens on the port afterwards.
    let port = free_port();
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

#[tokio::test]
async fn bench_reports_throughput_and_latency() {
    let gw = gateway().await;
    let mut cmd = prism();
    cmd.args([
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
    ]);
    let out = output(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    assert!(report["ops"].as_u64().expect("ops") > 0, "{report}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    assert!(report["latency_ms"]["p99"].as_f64().expect("p99") > 0.0);
    assert!(report["machine"]["cores"].as_u64().expect("cores") >= 1);
    gw.stop().await.expect("clean stop");
}
