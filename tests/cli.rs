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
        "1500ms",
        "--warmup",
        "0s",
        "--json",
    ]);
    let out = output(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // Progress goes to stderr while it runs; the report alone to stdout.
    let progress = stderr(&out);
    assert!(progress.contains("warmup over, measuring"), "{progress}");
    assert!(
        progress
            .lines()
            .any(|l| l.contains("1.0 s") && l.contains("ops/s")),
        "{progress}"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    assert!(report["ops"].as_u64().expect("ops") > 0, "{report}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    assert!(report["latency_ms"]["p99"].as_f64().expect("p99") > 0.0);
    assert!(report["machine"]["cores"].as_u64().expect("cores") >= 1);
    gw.stop().await.expect("clean stop");
}

// ---------------------------------------------------------------------------
// Several addresses

#[test]
fn bad_addr_lists_exit_64_naming_addr_and_the_bad_element() {
    for (list, element, expected) in [
        (
            "127.0.0.1:1,,127.0.0.1:2",
            "127.0.0.1:1,,127.0.0.1:2",
            "element 2",
        ),
        ("127.0.0.1:1,", "127.0.0.1:1,", "empty"),
        (
            "127.0.0.1:1,http://127.0.0.1:1",
            "http://127.0.0.1:1",
            "same instance",
        ),
        (
            "127.0.0.1:1,ftp://127.0.0.1:2",
            "ftp://127.0.0.1:2",
            "\"ftp\"",
        ),
        (
            "http://127.0.0.1:1,https://127.0.0.1:2",
            "https://127.0.0.1:2",
            "may not mix http:// and https://",
        ),
    ] {
        for args in [
            vec!["kv", "--addr", list, "get", "default", "k"],
            vec!["bench", "--addr", list, "--duration", "1s"],
        ] {
            let out = run(prism().args(&args));
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
            assert!(err.starts_with("error: --addr: "), "{args:?}: {err}");
            assert!(err.contains(&format!("{element:?}")), "{args:?}: {err}");
            assert!(err.contains(expected), "{args:?}: {err}");
        }
        // The environment variable takes the same lists.
        let out = run(prism()
            .args(["kv", "get", "default", "k"])
            .env("PRISM_ADDR", list));
        assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    }
}

#[tokio::test]
async fn kv_spreads_over_a_list_and_skips_an_instance_that_is_down() {
    let (a, b) = (gateway().await, gateway().await);
    // Bound and dropped: nothing listens there.
    let down = format!("127.0.0.1:{}", free_port());
    let list = format!("{},{down},{}", a.addr, b.addr);
    for i in 0..16 {
        let key = format!("k{i:02}");
        let mut cmd = prism();
        cmd.args(["kv", "--addr", &list, "put", "default", &key, "v"]);
        let out = output(cmd).await;
        assert_eq!(out.status.code(), Some(0), "put {key}: {}", stderr(&out));
    }
    // Memory namespaces are per instance: each holds the keys sent to it.
    let mut counts = Vec::new();
    for gw in [&a, &b] {
        let out = kv(gw, &["scan", "default", "--keys-only", "--all"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        counts.push(stdout(&out).lines().count());
    }
    assert_eq!(counts.iter().sum::<usize>(), 16, "{counts:?}");
    assert!(
        counts.iter().all(|c| *c > 0),
        "both instances got requests: {counts:?}"
    );

    // PRISM_ADDR takes lists too; the dead instance first. The key is on
    // one of the two memory namespaces: found (0) or not (1), not an error.
    let mut cmd = prism();
    cmd.args(["kv", "get", "default", "k00"])
        .env("PRISM_ADDR", format!("{down},{}", a.addr));
    let out = output(cmd).await;
    assert!(
        matches!(out.status.code(), Some(0) | Some(1)),
        "{}",
        stderr(&out)
    );

    let out = run(prism()
        .args(["kv", "--addr", &format!("{down},127.0.0.1:{}", free_port())])
        .args(["get", "default", "k"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.starts_with("error: UNAVAILABLE: "), "{err}");
    assert!(err.contains("no instance answered"), "{err}");
    assert!(err.contains(&down), "each instance is named: {err}");
    a.stop().await.expect("clean stop");
    b.stop().await.expect("clean stop");
}

#[tokio::test]
async fn bench_balances_over_a_list() {
    let (a, b) = (gateway().await, gateway().await);
    let mut cmd = prism();
    cmd.args([
        "bench",
        "--addr",
        &format!("{},{}", a.addr, b.addr),
        "--op",
        "put",
        "--concurrency",
        "4",
        "--keys",
        "50",
        "--duration",
        "300ms",
        "--warmup",
        "0s",
        "--json",
    ]);
    let out = output(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    for gw in [&a, &b] {
        let out = kv(gw, &["scan", "default", "--keys-only", "--limit", "1"]).await;
        assert!(!out.stdout.is_empty(), "an instance got no puts: {report}");
    }
    a.stop().await.expect("clean stop");
    b.stop().await.expect("clean stop");
}

// ---------------------------------------------------------------------------
// TLS

mod pki {
    use std::path::{Path, PathBuf};

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };

    /// A throwaway CA writing the certificates it signs into a temp dir.
    pub struct Pki {
        pub dir: tempfile::TempDir,
        ca: CertifiedIssuer<'static, KeyPair>,
    }

    impl Pki {
        pub fn new(name: &str) -> Self {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
            let pki = Pki {
                dir: tempfile::tempdir().unwrap(),
                ca,
            };
            std::fs::write(pki.ca_path(), pki.ca.pem()).unwrap();
            pki
        }

        pub fn ca_path(&self) -> PathBuf {
            self.dir.path().join("ca.pem")
        }

        /// `<file>.pem` and `<file>.key`, for 127.0.0.1 and localhost
        /// (server) or a client named `cn`.
        pub fn issue(&self, file: &str, cn: &str, server: bool) -> (PathBuf, PathBuf) {
            let names = if server {
                vec!["localhost".into(), "127.0.0.1".into()]
            } else {
                Vec::new()
            };
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![if server {
                ExtendedKeyUsagePurpose::ServerAuth
            } else {
                ExtendedKeyUsagePurpose::ClientAuth
            }];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.ca).unwrap();
            let write = |name: String, text: String| -> PathBuf {
                let path = self.dir.path().join(name);
                std::fs::write(&path, text).unwrap();
                path
            };
            (
                write(format!("{file}.pem"), cert.pem()),
                write(format!("{file}.key"), key.serialize_pem()),
            )
        }

        /// A `[server.tls]` section serving `cert`/`key`, requiring client
        /// certificates of this CA when `mtls`.
        pub fn section(&self, cert: &Path, key: &Path, mtls: bool) -> String {
            let mut s = format!(
                "[server.tls]\ncert = {:?}\nkey = {:?}\n",
                cert.display().to_string(),
                key.display().to_string()
            );
            if mtls {
                s += &format!("client_ca = {:?}\n", self.ca_path().display().to_string());
            }
            s
        }
    }
}

/// `prism kv --addr https://<gw> <args>`.
async fn kv_tls(gw: &TestServer, args: &[&str]) -> std::process::Output {
    let mut cmd = prism();
    cmd.args([
        "kv",
        "--timeout",
        "10s",
        "--addr",
        &format!("https://{}", gw.addr),
    ])
    .args(args);
    output(cmd).await
}

#[tokio::test]
async fn kv_speaks_tls_verifying_the_gateway_against_the_ca_given() {
    let pki = pki::Pki::new("cli test ca");
    let (cert, key) = pki.issue("server", "gateway", true);
    let gw = TestServer::start(settings(&format!(
        "{MEMORY_SETTINGS}\n{}",
        pki.section(&cert, &key, false)
    )))
    .await
    .expect("tls gateway starts");
    let ca = pki.ca_path().display().to_string();

    let out = kv_tls(&gw, &["--ca", &ca, "put", "default", "k", "over tls"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = kv_tls(&gw, &["--ca", &ca, "get", "default", "k"]).await;
    assert_eq!(
        (out.status.code(), out.stdout.as_slice()),
        (Some(0), &b"over tls"[..]),
        "{}",
        stderr(&out)
    );
    // The environment variable names the bundle too.
    let mut cmd = prism();
    cmd.args(["kv", "get", "default", "k"])
        .env("PRISM_ADDR", format!("https://{}", gw.addr))
        .env("PRISM_CA", &ca);
    let out = output(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // Without a CA bundle: the webpki roots do not know this CA.
    let out = kv_tls(&gw, &["get", "default", "k"]).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.starts_with("error: UNAVAILABLE: "), "{err}");
    assert!(err.contains("certificate"), "{err}");
    assert!(err.contains("--ca"), "says what to do: {err}");

    // With another CA.
    let other = pki::Pki::new("another ca");
    let other_ca = other.ca_path().display().to_string();
    let out = kv_tls(&gw, &["--ca", &other_ca, "get", "default", "k"]).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("certificate"), "{err}");
    assert!(err.contains(&other_ca), "names the bundle: {err}");

    // A file that is no CA bundle is a usage error.
    let out = kv_tls(
        &gw,
        &["--ca", &key.display().to_string(), "get", "default", "k"],
    )
    .await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("holds no PEM CERTIFICATE"), "{err}");

    // Plain HTTP to a TLS listener fails; a CA with http:// is refused.
    let out = kv(&gw, &["get", "default", "k"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = kv(&gw, &["--ca", &ca, "get", "default", "k"]).await;
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not an https:// address"),
        "{}",
        stderr(&out)
    );
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn kv_presents_a_client_certificate_for_mutual_tls() {
    let pki = pki::Pki::new("cli mtls ca");
    let (cert, key) = pki.issue("server", "gateway", true);
    let (client_cert, client_key) = pki.issue("client", "cli-user", false);
    let gw = TestServer::start(settings(&format!(
        "{MEMORY_SETTINGS}\n{}",
        pki.section(&cert, &key, true)
    )))
    .await
    .expect("mtls gateway starts");
    let ca = pki.ca_path().display().to_string();
    let (client_cert, client_key) = (
        client_cert.display().to_string(),
        client_key.display().to_string(),
    );

    let out = kv_tls(
        &gw,
        &[
            "--ca",
            &ca,
            "--cert",
            &client_cert,
            "--key",
            &client_key,
            "put",
            "default",
            "k",
            "mutual",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = kv_tls(
        &gw,
        &["--ca", &ca, "--cert", &client_cert, "--key", &client_key]
            .into_iter()
            .chain(["get", "default", "k"])
            .collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(out.stdout, b"mutual", "{}", stderr(&out));

    // Without a client certificate the gateway refuses the connection.
    let out = kv_tls(&gw, &["--ca", &ca, "get", "default", "k"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // A certificate without its key is a usage error.
    let out = kv_tls(
        &gw,
        &["--ca", &ca, "--cert", &client_cert, "get", "default", "k"],
    )
    .await;
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("--key"), "{}", stderr(&out));
    gw.stop().await.expect("clean stop");
}
