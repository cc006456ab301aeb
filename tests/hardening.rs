//! Every bad input gets the documented status: forged cursors, TTLs past
//! the limit, oversized names and ids, clients without an id, request
//! messages that do not decode, REST and HTTP edges, the CLI's bounds and
//! the signals the binary ignores; and the limits of the request path
//! (`hardening/limits.rs`). Each through the real server (in process) or
//! the real binary.

mod common;
#[path = "hardening/limits.rs"]
mod limits;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use common::{as_client, base_settings, eventually, TestServer};
use prism::kv::validate::MAX_TTL;
use prism::proto::{GetRequest, PutRequest, ScanRequest};
use reqwest::StatusCode;
use tonic::Code;

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

async fn start(extra: &str) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start(base_settings(dir.path(), extra))
        .await
        .expect("start the gateway");
    (server, dir)
}

/// The `code` and `message` of a REST error, after checking its status.
async fn rest_error(r: reqwest::Response, status: StatusCode) -> (String, String) {
    assert_eq!(r.status(), status);
    let body: serde_json::Value = r.json().await.expect("a JSON error body");
    (
        body["code"].as_str().expect("code").to_owned(),
        body["message"].as_str().expect("message").to_owned(),
    )
}

/// Sends `request` on a new connection and returns everything the server
/// answers until it closes the connection (or 10 s pass).
async fn raw_http(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(request).await.expect("send");
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut response));
    let _ = read.await;
    String::from_utf8_lossy(&response).into_owned()
}

fn status_line(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {response:?}"))
}

// 1. Cursors.

#[tokio::test]
async fn forged_cursors_are_bad_cursors_on_grpc_and_rest() {
    let (server, _dir) = start("").await;
    let mut grpc = server.client().await.unwrap();
    let http = reqwest::Client::new();
    for forged in [b"a\0b".to_vec(), vec![b'k'; 1025], vec![0xff, 0xfe]] {
        let cursor = b64url(&forged);
        let e = grpc
            .scan(ScanRequest {
                namespace: "cache".into(),
                cursor: cursor.clone(),
                ..ScanRequest::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with("bad cursor"), "{e:?}");
        let r = http
            .get(format!("{}/v1/kv/cache?cursor={cursor}", server.http_url()))
            .send()
            .await
            .unwrap();
        let (code, message) = rest_error(r, StatusCode::BAD_REQUEST).await;
        assert_eq!(code, "INVALID_ARGUMENT");
        assert!(message.starts_with("bad cursor"), "{message}");
    }
    server.stop().await.unwrap();
}

// 2. TTLs.

#[tokio::test]
async fn ttls_past_a_hundred_years_are_invalid_on_grpc_and_rest() {
    let (server, _dir) = start("").await;
    let mut grpc = server.client().await.unwrap();
    let http = reqwest::Client::new();
    let max = MAX_TTL.as_millis() as u64;
    for namespace in ["cache", "default"] {
        for ttl_ms in [max + 1, u64::MAX] {
            let e = grpc
                .put(PutRequest {
                    namespace: namespace.into(),
                    key: "k".into(),
                    value: Bytes::from_static(b"v"),
                    ttl_ms,
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
            assert!(e.message().contains("ttl_ms"), "{e:?}");
            assert!(e.message().contains(&max.to_string()), "{e:?}");
            let r = http
                .put(format!(
                    "{}/v1/kv/{namespace}/k?ttl_ms={ttl_ms}",
                    server.http_url()
                ))
                .body("v")
                .send()
                .await
                .unwrap();
            let (code, message) = rest_error(r, StatusCode::BAD_REQUEST).await;
            assert_eq!(code, "INVALID_ARGUMENT");
            assert!(message.contains("ttl_ms") && message.contains(&max.to_string()));
        }
        // The limit itself is stored, and reported without wrapping.
        grpc.put(PutRequest {
            namespace: namespace.into(),
            key: "k".into(),
            value: Bytes::from_static(b"v"),
            ttl_ms: max,
        })
        .await
        .unwrap();
        let got = grpc
            .get(GetRequest {
                namespace: namespace.into(),
                key: "k".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(got.found);
        assert!(
            got.ttl_ms > (max - 60_000) as i64 && got.ttl_ms <= max as i64,
            "{namespace}: ttl_ms {}",
            got.ttl_ms
        );
    }
    server.stop().await.unwrap();
}

// 3. Names and messages.

#[tokio::test]
async fn a_huge_namespace_name_gets_a_small_not_found() {
    let (server, _dir) = start("").await;
    let mut grpc = server.client().await.unwrap();
    let name = "n".repeat(64 * 1024);
    let e = grpc
        .get(GetRequest {
            namespace: name.clone(),
            key: "k".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().len() < 200, "{} bytes", e.message().len());
    assert!(e.message().contains('…'), "{}", e.message());
    // Within the request line actix accepts.
    let http = reqwest::Client::new();
    let long = "n".repeat(4000);
    let r = http
        .get(format!("{}/v1/kv/{long}/k", server.http_url()))
        .send()
        .await
        .unwrap();
    let (code, message) = rest_error(r, StatusCode::NOT_FOUND).await;
    assert_eq!(code, "NOT_FOUND");
    assert!(message.len() < 200 && message.contains('…'), "{message}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn keys_and_client_ids_in_messages_are_cut_short() {
    let (server, _dir) = start("[sessions]\nrate_limit = 1\nrate_burst = 1\n").await;
    let http = reqwest::Client::new();
    let key = "k".repeat(1024);
    let r = http
        .get(format!("{}/v1/kv/cache/{key}", server.http_url()))
        .header("x-client-id", "reader")
        .send()
        .await
        .unwrap();
    let (code, message) = rest_error(r, StatusCode::NOT_FOUND).await;
    assert_eq!(code, "NOT_FOUND");
    assert!(message.len() < 200 && message.contains('…'), "{message}");
    let id = "c".repeat(4000);
    let get = || {
        http.get(format!("{}/v1/kv/cache/k", server.http_url()))
            .header("x-client-id", id.as_str())
            .send()
    };
    assert_eq!(get().await.unwrap().status(), StatusCode::NOT_FOUND);
    let (code, message) = rest_error(get().await.unwrap(), StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(code, "RESOURCE_EXHAUSTED");
    assert!(message.len() < 200 && message.contains('…'), "{message}");
    server.stop().await.unwrap();
}

// 4. Sessions.

/// The names of the session actors in the tree.
async fn session_names(server: &TestServer) -> Vec<String> {
    fn walk(node: &serde_json::Value, out: &mut Vec<String>) {
        if let Some(name) = node["name"].as_str() {
            if name.starts_with("session:") {
                out.push(name.to_owned());
            }
        }
        for child in node["children"].as_array().into_iter().flatten() {
            walk(child, out);
        }
    }
    let tree: serde_json::Value = reqwest::get(format!("{}/v1/actors", server.http_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut names = Vec::new();
    walk(&tree, &mut names);
    names
}

#[tokio::test]
async fn clients_without_an_id_get_one_session_per_ip_address() {
    let (server, _dir) = start("").await;
    // Every request on a new connection, so on a new source port.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for _ in 0..60 {
        let r = http
            .get(format!("{}/v1/kv/cache/k", server.http_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }
    for _ in 0..20 {
        let mut grpc = server.client().await.unwrap();
        grpc.get(GetRequest {
            namespace: "cache".into(),
            key: "k".into(),
        })
        .await
        .unwrap();
    }
    assert_eq!(session_names(&server).await, ["session:127.0.0.1"]);
    server.stop().await.unwrap();
}

async fn sessions_active(server: &TestServer) -> f64 {
    let text = reqwest::get(format!("{}/metrics", server.http_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("prism_sessions_active "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no prism_sessions_active in {text}"))
}

#[tokio::test]
async fn cancelled_requests_do_not_keep_session_slots() {
    let (server, _dir) = start("[sessions]\nmax_sessions = 4\nidle_timeout = \"200ms\"\n").await;
    let grpc = server.client().await.unwrap();
    // Callers that go away at every point of their request, session
    // creation included.
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let mut grpc = grpc.clone();
        tasks.push(tokio::spawn(async move {
            let call = grpc.get(as_client(
                &format!("gone-{i}"),
                GetRequest {
                    namespace: "cache".into(),
                    key: "k".into(),
                },
            ));
            let _ = tokio::time::timeout(Duration::from_micros(50 * (i % 40)), call).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Every session that was opened ends when idle, leaving no slot taken.
    assert!(
        eventually(Duration::from_secs(10), || async {
            sessions_active(&server).await == 0.0
        })
        .await,
        "sessions still open: {:?}",
        session_names(&server).await
    );
    let mut grpc = grpc.clone();
    for i in 0..4 {
        grpc.get(as_client(
            &format!("after-{i}"),
            GetRequest {
                namespace: "cache".into(),
                key: "k".into(),
            },
        ))
        .await
        .unwrap_or_else(|e| panic!("client after-{i}: {e:?}"));
    }
    server.stop().await.unwrap();
}

// 5. gRPC strings that are not UTF-8.

/// `GetRequest` and `ScanRequest` with byte fields where the real ones
/// have strings, so that a test can send what no generated client can.
mod raw {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Get {
        #[prost(bytes = "vec", tag = "1")]
        pub namespace: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub key: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Scan {
        #[prost(bytes = "vec", tag = "1")]
        pub namespace: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub prefix: Vec<u8>,
        #[prost(uint32, tag = "3")]
        pub limit: u32,
        #[prost(bytes = "vec", tag = "4")]
        pub cursor: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Empty {}
}

async fn raw_call<M: prost::Message + Send + Sync + 'static>(
    addr: SocketAddr,
    method: &'static str,
    message: M,
) -> tonic::Status {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    let codec = tonic_prost::ProstCodec::<M, raw::Empty>::default();
    grpc.unary(tonic::Request::new(message), path, codec)
        .await
        .expect_err("a request that does not decode")
}

/// A call to make against a gRPC address.
type RawCall = Box<dyn FnOnce(SocketAddr) -> BoxedCall>;

/// Requests whose string fields are not UTF-8, each with the field tonic
/// names in its error.
fn bad_utf8_requests() -> Vec<(&'static str, RawCall)> {
    let get = |namespace: &[u8], key: &[u8]| raw::Get {
        namespace: namespace.to_vec(),
        key: key.to_vec(),
    };
    let scan = |prefix: &[u8], cursor: &[u8]| raw::Scan {
        namespace: b"cache".to_vec(),
        prefix: prefix.to_vec(),
        limit: 0,
        cursor: cursor.to_vec(),
    };
    let (g1, g2) = (get(b"ca\xffche", b"k"), get(b"cache", b"\xc3("));
    let (s1, s2) = (scan(b"\xff", b""), scan(b"", b"\xfe\xff"));
    vec![
        (
            "GetRequest.namespace",
            Box::new(move |a| Box::pin(raw_call(a, "/prism.kv.v1.KeyValue/Get", g1))),
        ),
        (
            "GetRequest.key",
            Box::new(move |a| Box::pin(raw_call(a, "/prism.kv.v1.KeyValue/Get", g2))),
        ),
        (
            "ScanRequest.prefix",
            Box::new(move |a| Box::pin(raw_call(a, "/prism.kv.v1.KeyValue/Scan", s1))),
        ),
        (
            "ScanRequest.cursor",
            Box::new(move |a| Box::pin(raw_call(a, "/prism.kv.v1.KeyValue/Scan", s2))),
        ),
    ]
}

type BoxedCall = std::pin::Pin<Box<dyn std::future::Future<Output = tonic::Status> + Send>>;

fn assert_invalid_utf8(field: &str, status: &tonic::Status) {
    assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
    assert!(status.message().contains(field), "{field}: {status:?}");
    assert!(status.message().contains("UTF-8"), "{field}: {status:?}");
}

/// A KeyValue implementation that must never be reached.
struct Unreachable;

#[tonic::async_trait]
impl prism::proto::key_value_server::KeyValue for Unreachable {
    async fn get(
        &self,
        _: tonic::Request<GetRequest>,
    ) -> Result<tonic::Response<prism::proto::GetResponse>, tonic::Status> {
        Err(tonic::Status::aborted("reached"))
    }
    async fn put(
        &self,
        _: tonic::Request<PutRequest>,
    ) -> Result<tonic::Response<prism::proto::PutResponse>, tonic::Status> {
        Err(tonic::Status::aborted("reached"))
    }
    async fn delete(
        &self,
        _: tonic::Request<prism::proto::DeleteRequest>,
    ) -> Result<tonic::Response<prism::proto::DeleteResponse>, tonic::Status> {
        Err(tonic::Status::aborted("reached"))
    }
    async fn exists(
        &self,
        _: tonic::Request<prism::proto::ExistsRequest>,
    ) -> Result<tonic::Response<prism::proto::ExistsResponse>, tonic::Status> {
        Err(tonic::Status::aborted("reached"))
    }
    async fn scan(
        &self,
        _: tonic::Request<ScanRequest>,
    ) -> Result<tonic::Response<prism::proto::ScanResponse>, tonic::Status> {
        Err(tonic::Status::aborted("reached"))
    }
}

/// The mapping itself, on a tonic server of this test's own: the
/// generated server wrapped in `prism::grpc::DecodeErrors`.
#[tokio::test]
async fn undecodable_request_messages_are_invalid_arguments() {
    use prism::proto::key_value_server::KeyValueServer;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = prism::grpc::DecodeErrors::new(KeyValueServer::new(Unreachable));
    let served = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    for (field, call) in bad_utf8_requests() {
        assert_invalid_utf8(field, &call(addr).await);
    }
    // A request that decodes reaches the handler, whose status is kept.
    let ok = raw_call(
        addr,
        "/prism.kv.v1.KeyValue/Get",
        raw::Get {
            namespace: b"cache".to_vec(),
            key: b"k".to_vec(),
        },
    )
    .await;
    assert_eq!(ok.code(), Code::Aborted, "{ok:?}");
    served.abort();
}

/// Through the gateway.
#[tokio::test]
async fn the_gateway_answers_non_utf8_strings_with_invalid_argument() {
    let (server, _dir) = start("").await;
    for (field, call) in bad_utf8_requests() {
        assert_invalid_utf8(field, &call(server.addr).await);
    }
    server.stop().await.unwrap();
}

// 6. REST edges.

#[tokio::test]
async fn a_malformed_grpc_timeout_header_is_a_400_naming_it() {
    let (server, _dir) = start("").await;
    let http = reqwest::Client::new();
    for value in ["soon", "5", "123456789S", "-1S"] {
        let r = http
            .get(format!("{}/v1/kv/cache/k", server.http_url()))
            .header("grpc-timeout", value)
            .send()
            .await
            .unwrap();
        let (code, message) = rest_error(r, StatusCode::BAD_REQUEST).await;
        assert_eq!(code, "INVALID_ARGUMENT");
        assert!(message.contains("grpc-timeout"), "{message}");
        let r = http
            .get(format!("{}/v1/kv/cache?prefix=a", server.http_url()))
            .header("grpc-timeout", value)
            .send()
            .await
            .unwrap();
        rest_error(r, StatusCode::BAD_REQUEST).await;
    }
    // Refused requests are counted like any other failed one.
    let metrics = reqwest::get(format!("{}/metrics", server.http_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for op in ["get", "scan"] {
        let line = format!(
            r#"prism_requests_total{{namespace="cache",op="{op}",code="INVALID_ARGUMENT"}} 4"#
        );
        assert!(metrics.contains(&line), "no {line} in\n{metrics}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn query_values_that_are_not_utf8_are_a_400() {
    let (server, _dir) = start("").await;
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/v1/kv/cache?prefix=%FF", server.http_url()))
        .send()
        .await
        .unwrap();
    let (code, message) = rest_error(r, StatusCode::BAD_REQUEST).await;
    assert_eq!(code, "INVALID_ARGUMENT");
    assert!(
        message.contains("'prefix'") && message.contains("UTF-8"),
        "{message}"
    );
    let r = http
        .put(format!("{}/v1/kv/cache/k?ttl_ms=%C3%28", server.http_url()))
        .body("v")
        .send()
        .await
        .unwrap();
    let (_, message) = rest_error(r, StatusCode::BAD_REQUEST).await;
    assert!(message.contains("'ttl_ms'"), "{message}");
    // Valid percent-encoded UTF-8 still scans.
    let r = http
        .get(format!("{}/v1/kv/cache?prefix=%C3%BC", server.http_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_body_that_arrives_too_slowly_ends_at_the_deadline() {
    let extra = "[namespaces.quick]\nbackend = \"memory\"\ntimeout = \"300ms\"\n";
    let (server, _dir) = start(extra).await;
    // The namespace's timeout, then the caller's deadline; the body
    // declares 1000 bytes (within the limit) and sends 3.
    for (path, header) in [
        ("/v1/kv/quick/slow", ""),
        ("/v1/kv/cache/slow", "grpc-timeout: 300m\r\n"),
    ] {
        let started = Instant::now();
        let request = format!(
            "PUT {path} HTTP/1.1\r\nHost: prism\r\nContent-Length: 1000\r\n{header}Connection: close\r\n\r\nabc"
        );
        let response = raw_http(server.http_addr, request.as_bytes()).await;
        assert_eq!(status_line(&response), 504, "{response}");
        assert!(response.contains("DEADLINE_EXCEEDED"), "{response}");
        assert!(started.elapsed() < Duration::from_secs(4), "{path}");
    }
    let r = reqwest::get(format!("{}/v1/kv/quick/slow", server.http_url()))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "nothing was stored");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn an_http_1_0_put_without_a_length_is_411_not_an_empty_value() {
    let (server, _dir) = start("").await;
    let response = raw_http(
        server.http_addr,
        b"PUT /v1/kv/cache/h10 HTTP/1.0\r\nHost: prism\r\n\r\n",
    )
    .await;
    assert_eq!(status_line(&response), 411, "{response}");
    assert!(
        response.contains("\"code\":\"INVALID_ARGUMENT\""),
        "{response}"
    );
    assert!(response.contains("Content-Length"), "{response}");
    let r = reqwest::get(format!("{}/v1/kv/cache/h10", server.http_url()))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "no empty value stored");
    // With a length, HTTP/1.0 works.
    let response = raw_http(
        server.http_addr,
        b"PUT /v1/kv/cache/h10 HTTP/1.0\r\nHost: prism\r\nContent-Length: 2\r\n\r\nhi",
    )
    .await;
    assert_eq!(status_line(&response), 204, "{response}");
    server.stop().await.unwrap();
}

// 7. HTTP edges.

#[tokio::test]
async fn probes_answer_head_without_a_body() {
    let (server, _dir) = start("").await;
    let ready = format!("{}/readyz", server.http_url());
    assert!(
        eventually(Duration::from_secs(10), || async {
            reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200)
        })
        .await
    );
    for path in ["/healthz", "/readyz"] {
        let response = raw_http(
            server.http_addr,
            format!("HEAD {path} HTTP/1.1\r\nHost: prism\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status_line(&response), 200, "{path}: {response}");
        let (_, body) = response.split_once("\r\n\r\n").expect("headers end");
        assert!(body.is_empty(), "{path}: {body:?}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn method_not_allowed_lists_the_allowed_methods() {
    let (server, _dir) = start("").await;
    let http = reqwest::Client::new();
    for (method, path, allowed) in [
        (
            reqwest::Method::POST,
            "/v1/kv/cache/k",
            "GET, HEAD, PUT, DELETE",
        ),
        (reqwest::Method::PUT, "/v1/kv/cache", "GET"),
        (reqwest::Method::POST, "/healthz", "GET, HEAD"),
        (reqwest::Method::DELETE, "/readyz", "GET, HEAD"),
        (reqwest::Method::POST, "/metrics", "GET"),
    ] {
        let r = http
            .request(method.clone(), format!("{}{path}", server.http_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.headers().get("allow").and_then(|v| v.to_str().ok()),
            Some(allowed),
            "{method} {path}"
        );
        let (code, message) = rest_error(r, StatusCode::METHOD_NOT_ALLOWED).await;
        assert_eq!(code, "UNIMPLEMENTED");
        assert!(message.contains(allowed), "{message}");
    }
    let r = http
        .get(format!("{}/no/such/endpoint", server.http_url()))
        .send()
        .await
        .unwrap();
    let (code, _) = rest_error(r, StatusCode::NOT_FOUND).await;
    assert_eq!(code, "NOT_FOUND");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn head_on_a_key_claims_no_empty_length() {
    let (server, _dir) = start("").await;
    let http = reqwest::Client::new();
    let r = http
        .put(format!("{}/v1/kv/cache/k", server.http_url()))
        .body("a value")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    for (key, status) in [("k", 200), ("missing", 404)] {
        let response = raw_http(
            server.http_addr,
            format!("HEAD /v1/kv/cache/{key} HTTP/1.1\r\nHost: prism\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_eq!(status_line(&response), status, "{response}");
        assert!(
            !response.to_ascii_lowercase().contains("content-length: 0"),
            "{response}"
        );
    }
    server.stop().await.unwrap();
}

// 8. The CLI.

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

fn assert_usage_error(args: &[&str], expected: &str) {
    let out = prism().args(args).output().expect("run prism");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
    assert!(stderr.contains(expected), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
}

#[test]
fn kv_and_bench_reject_timeouts_of_zero_or_over_an_hour() {
    for timeout in ["0s", "2h", "100000000h"] {
        assert_usage_error(
            &["kv", "--timeout", timeout, "get", "default", "k"],
            "--timeout",
        );
        assert_usage_error(&["bench", "--timeout", timeout], "--timeout");
    }
    assert_usage_error(&["bench", "--duration", "100000000h"], "--duration");
    assert_usage_error(&["bench", "--warmup", "100000000h"], "--warmup");
}

#[test]
fn kv_and_bench_reject_addresses_that_are_not_http_or_https() {
    for (addr, expected) in [
        (
            "http://127.0.0.1:1,https://127.0.0.1:2",
            "may not mix http:// and https://",
        ),
        ("ftp://127.0.0.1:1", "\"ftp\" is not supported"),
    ] {
        assert_usage_error(&["kv", "--addr", addr, "get", "default", "k"], expected);
        assert_usage_error(
            &[
                "bench",
                "--addr",
                addr,
                "--duration",
                "1s",
                "--warmup",
                "0s",
            ],
            expected,
        );
    }
}

// 9. Signals.

const BINARY_SETTINGS: &str = r#"
[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
shutdown_grace = "5s"

[backends.mem]
kind = "memory"

[namespaces.default]
backend = "mem"
"#;

/// A running `prism serve` and its log lines.
struct Binary {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Binary {
    fn start() -> Binary {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("default.toml"), BINARY_SETTINGS).expect("settings");
        let mut child = prism()
            .arg("--settings")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn prism");
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut binary = Binary {
            child,
            lines,
            log: Vec::new(),
            _dir: dir,
        };
        binary.wait_for("admin plane serving");
        binary
    }

    /// Waits for a log line containing `text`.
    fn wait_for(&mut self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(text);
                    self.log.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    panic!("no {text:?} in the log:\n{}", self.log.join("\n"));
                }
            }
        }
    }

    fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success());
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    /// The exit code, waiting at most 30 s.
    fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                self.log.extend(self.lines.try_iter());
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("prism did not exit; log:\n{}", self.log.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sighup_and_sigusr1_are_logged_and_ignored() {
    let mut prism = Binary::start();
    prism.signal("HUP");
    prism.wait_for("reload requested; nothing to reload");
    prism.signal("USR1");
    prism.wait_for("signal ignored");
    assert!(prism.is_running(), "log:\n{}", prism.log.join("\n"));
    prism.signal("TERM");
    assert_eq!(prism.exit_code(), Some(0), "log:\n{}", prism.log.join("\n"));
}

#[test]
fn sigquit_drains_like_sigterm() {
    let mut prism = Binary::start();
    prism.signal("QUIT");
    prism.wait_for("shutdown requested");
    assert_eq!(prism.exit_code(), Some(0), "log:\n{}", prism.log.join("\n"));
    assert!(
        prism.log.iter().any(|l| l.contains("SIGQUIT")),
        "log:\n{}",
        prism.log.join("\n")
    );
    assert!(
        prism.log.iter().any(|l| l.contains("prism stopped")),
        "log:\n{}",
        prism.log.join("\n")
    );
}
