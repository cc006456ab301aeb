//! Access control through the real gateway, gRPC and REST alike: bearer
//! tokens name principals, grants decide per namespace and operation, admin
//! endpoints need an admin, probes stay open, denials are counted and
//! tokens never reach the log.

mod common;

use std::time::Duration;

use common::binary::Prism;
use common::http::{assert_error, Admin};
use common::requests::{delete, get, put, scan};
use common::{settings, settings_dir, TestServer};
use prism::auth::hash_token;
use prism::proto::key_value_client::KeyValueClient;
use reqwest::StatusCode;
use tonic::transport::Channel;
use tonic::Code;

const READER: &str = "reader-token-0123456789";
const WRITER: &str = "writer-token-0123456789";
const ROOT: &str = "root-token-0123456789";

fn auth_toml() -> String {
    format!(
        r#"
[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
shutdown_grace = "5s"
drain_delay = "0s"

[backends.memory]
kind = "memory"

[namespaces.orders]
backend = "memory"

[namespaces.cache]
backend = "memory"

[auth]
mode = "token"

[auth.principals.reader]
token_sha256 = "{}"
read = ["orders"]

[auth.principals.writer]
token_sha256 = "{}"
read = ["orders"]
write = ["orders"]

[auth.principals.root]
token_sha256 = "{}"
read = ["*"]
write = ["*"]
admin = true
"#,
        hash_token(READER),
        hash_token(WRITER),
        hash_token(ROOT)
    )
}

fn with_token<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    r
}

async fn start() -> (TestServer, KeyValueClient<Channel>, Admin) {
    let server = TestServer::start(settings(&auth_toml()))
        .await
        .expect("gateway starts");
    let client = server.client().await.expect("client");
    let admin = Admin::new(server.http_url());
    (server, client, admin)
}

#[tokio::test]
async fn grpc_requests_without_or_with_unknown_tokens_are_unauthenticated() {
    let (server, mut c, _) = start().await;
    let e = c.get(get("orders", "k")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = c
        .get(with_token("not-a-token", get("orders", "k")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let mut r = tonic::Request::new(get("orders", "k"));
    r.metadata_mut()
        .insert("authorization", "Basic abc".parse().unwrap());
    assert_eq!(c.get(r).await.unwrap_err().code(), Code::Unauthenticated);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn grants_decide_per_namespace_and_operation_on_grpc() {
    let (server, mut c, _) = start().await;
    // A writer writes and reads its namespace.
    c.put(with_token(WRITER, put("orders", "o1", b"v", 0)))
        .await
        .expect("writer puts");
    let got = c
        .get(with_token(WRITER, get("orders", "o1")))
        .await
        .unwrap()
        .into_inner();
    assert!(got.found);
    // A reader reads but may not write or delete.
    assert!(c.get(with_token(READER, get("orders", "o1"))).await.is_ok());
    assert!(c.scan(with_token(READER, scan("orders"))).await.is_ok());
    let e = c
        .put(with_token(READER, put("orders", "o2", b"v", 0)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = c
        .delete(with_token(READER, delete("orders", "o1")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // A writer of one namespace may not touch another, not even learn
    // whether a namespace exists.
    let e = c
        .put(with_token(WRITER, put("cache", "k", b"v", 0)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c
        .get(with_token(WRITER, get("no-such-namespace", "k")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // A wildcard grant reaches every namespace and learns of unknown ones.
    c.put(with_token(ROOT, put("cache", "k", b"v", 0)))
        .await
        .expect("root puts anywhere");
    let e = c
        .get(with_token(ROOT, get("no-such-namespace", "k")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn rest_answers_401_with_a_challenge_and_403_by_grant() {
    let (server, _, admin) = start().await;
    let r = admin.get_kv("orders", "k").await;
    assert_eq!(
        r.headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned()),
        Some("Bearer realm=\"prism\"".to_owned())
    );
    assert_error(r, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED").await;

    let put = |token: &'static str, ns: &'static str| {
        admin
            .http
            .put(admin.kv(ns, "k"))
            .bearer_auth(token)
            .body("v")
            .send()
    };
    let r = put(WRITER, "orders").await.unwrap();
    let status = r.status();
    assert_eq!(status, StatusCode::NO_CONTENT, "{:?}", r.text().await);
    let r = put(READER, "orders").await.unwrap();
    assert_error(r, StatusCode::FORBIDDEN, "PERMISSION_DENIED").await;
    let r = put(WRITER, "cache").await.unwrap();
    assert_error(r, StatusCode::FORBIDDEN, "PERMISSION_DENIED").await;
    let r = admin
        .http
        .get(admin.kv("orders", "k"))
        .bearer_auth(READER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn admin_endpoints_need_an_admin_and_probes_stay_open() {
    let (server, _, admin) = start().await;
    for path in ["/metrics", "/v1/actors", "/v1/namespaces"] {
        let r = admin.get(path).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
        let r = admin
            .http
            .get(admin.url(path))
            .bearer_auth(WRITER)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
        let r = admin
            .http
            .get(admin.url(path))
            .bearer_auth(ROOT)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    assert_eq!(admin.status("/healthz").await, Some(StatusCode::OK));
    assert!(admin.becomes_ready(Duration::from_secs(5)).await);
    // gRPC health needs no credentials either.
    let channel = common::requests::channel(server.addr).await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers without a token")
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // Denials are counted by reason.
    let metrics = admin
        .http
        .get(admin.url("/metrics"))
        .bearer_auth(ROOT)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("prism_auth_denied_total{reason=\"missing\"}")),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("prism_auth_denied_total{reason=\"forbidden\"}")),
        "{metrics}"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_principal_is_the_session_whatever_x_client_id_says() {
    let (server, mut c, admin) = start().await;
    for client in ["a", "b", "c"] {
        let mut r = with_token(WRITER, put("orders", client, b"v", 0));
        r.metadata_mut()
            .insert("x-client-id", client.parse().unwrap());
        c.put(r).await.expect("put");
    }
    let tree = admin
        .http
        .get(admin.url("/v1/actors"))
        .bearer_auth(ROOT)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(tree.contains("session:writer"), "{tree}");
    for client in ["session:a\"", "session:b\"", "session:c\""] {
        assert!(!tree.contains(client), "{client} in {tree}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn tokens_never_reach_the_log() {
    let toml = auth_toml().replace("[server]", "[log]\nlevel = \"debug\"\n\n[server]");
    let dir = settings_dir(&toml);
    let mut prism = Prism::serve(dir.path());
    let addr = prism.grpc_addr().await;
    let http = prism.http_addr().await;
    let mut c = common::requests::connect(addr).await.unwrap();
    let _ = c.get(with_token(READER, get("orders", "k"))).await;
    let _ = c
        .get(with_token("wrong-secret-abc", get("orders", "k")))
        .await;
    let _ = c.put(with_token(READER, put("orders", "k", b"v", 0))).await;
    let admin = Admin::new(format!("http://{http}"));
    let _ = admin
        .http
        .get(admin.kv("orders", "k"))
        .bearer_auth("wrong-secret-abc")
        .send()
        .await;
    prism
        .wait_for("request denied", Duration::from_secs(10))
        .await;
    prism.signal(common::binary::Signal::Term);
    let status = prism.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success());
    let log = prism.log_text();
    assert!(log.contains("request denied"), "{log}");
    for secret in [READER, "wrong-secret-abc", &hash_token(READER)] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

#[tokio::test]
async fn the_cli_makes_tokens_and_calls_with_one() {
    use std::io::Write as _;
    use std::process::Stdio;
    // new-token prints a token and its hash; hash-token agrees.
    let out = common::binary::output({
        let mut cmd = common::binary::prism();
        cmd.args(["auth", "new-token"]);
        cmd
    })
    .await;
    assert!(out.status.success());
    let text = common::binary::stdout(&out);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim_start_matches([' ', '=']).trim().to_owned())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    let (token, hash) = (field("token "), field("token_sha256"));
    assert_eq!(hash, hash_token(&token));
    let mut child = common::binary::prism()
        .args(["auth", "hash-token"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(token.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), hash);

    // `prism kv --token` reaches a gateway that requires one.
    let (server, _, _) = start().await;
    let kv = |token: Option<&str>| {
        let mut cmd = common::binary::prism();
        cmd.args(["kv", "--addr", &server.addr.to_string()]);
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        cmd.args(["put", "orders", "cli", "v"]);
        common::binary::output(cmd)
    };
    let out = kv(Some(WRITER)).await;
    assert!(out.status.success(), "{}", common::binary::stderr(&out));
    let out = kv(None).await;
    assert!(!out.status.success());
    let err = common::binary::stderr(&out);
    assert!(err.contains("UNAUTHENTICATED"), "{err}");
    let out = kv(Some(READER)).await;
    let err = common::binary::stderr(&out);
    assert!(err.contains("PERMISSION_DENIED"), "{err}");
    assert!(!err.contains(READER), "the token is echoed: {err}");
    server.stop().await.unwrap();
}
