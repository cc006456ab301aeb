//! Limits of the request path, through the real server: scan pages bounded
//! by bytes as well as items, a gRPC Put over the transport's cap, and the
//! circuit breaker counting only the backend's own failures.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use prism::backend::Connector;
use prism::proto::{GetRequest, PutRequest, ScanRequest};
use reqwest::StatusCode;
use tonic::Code;

use super::common::binary::{output, prism, stderr};
use super::common::faulty::FaultyConnector;
use super::common::requests::with_timeout;
use super::common::{base_settings, settings_dir, TestServer};
use super::{rest_error, start};

fn put(ns: &str, key: &str, value: Vec<u8>) -> PutRequest {
    PutRequest {
        namespace: ns.into(),
        key: key.into(),
        value: value.into(),
        ttl_ms: 0,
    }
}

fn get(ns: &str, key: &str) -> GetRequest {
    GetRequest {
        namespace: ns.into(),
        key: key.into(),
    }
}

async fn metrics(server: &TestServer) -> String {
    reqwest::get(format!("{}/metrics", server.http_url()))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

// 1. Scan pages bounded by bytes.

const PAGED: &str = r#"
[namespaces.paged]
backend = "memory"
max_page_bytes = 65536
"#;

#[tokio::test]
async fn scan_pages_of_large_values_fit_the_transport_and_count_ok() {
    let (server, _dir) = start(PAGED).await;
    let mut c = server.client().await.unwrap();
    let value = vec![b'v'; 16 * 1024];
    for ns in ["cache", "paged"] {
        for i in 0..100 {
            c.put(put(ns, &format!("big/{i:03}"), value.clone()))
                .await
                .unwrap();
        }
    }
    // 1.6 MiB in one page at the default settings: larger than a value may
    // be, within the default 4 MiB page.
    let page = c
        .scan(ScanRequest {
            namespace: "cache".into(),
            prefix: "big/".into(),
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("a page of 100 x 16 KiB")
        .into_inner();
    assert_eq!(page.items.len(), 100);
    assert!(page.next_cursor.is_empty());
    // 64 KiB pages: three items each, over gRPC and REST alike.
    let mut cursor = String::new();
    let mut keys = Vec::new();
    loop {
        let page = c
            .scan(ScanRequest {
                namespace: "paged".into(),
                prefix: "big/".into(),
                limit: 1000,
                cursor: cursor.clone(),
                keys_only: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            page.items.len(),
            if page.next_cursor.is_empty() { 1 } else { 3 }
        );
        keys.extend(page.items.into_iter().map(|i| i.key));
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = page.next_cursor;
    }
    let expected: Vec<String> = (0..100).map(|i| format!("big/{i:03}")).collect();
    assert_eq!(keys, expected);
    let r = reqwest::get(format!(
        "{}/v1/kv/paged?prefix=big/&limit=1000",
        server.http_url()
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["items"].as_array().map(Vec::len), Some(3));
    assert!(!body["next_cursor"].as_str().unwrap_or("").is_empty());
    // What the clients got is what the metrics say: every scan OK.
    let m = metrics(&server).await;
    let ok = r#"prism_requests_total{namespace="cache",op="scan",code="OK"} 1"#;
    assert!(m.contains(ok), "no {ok} in\n{m}");
    assert!(
        !m.lines().any(|l| l.starts_with("prism_requests_total")
            && l.contains(r#"op="scan""#)
            && !l.contains(r#"code="OK""#)),
        "a scan counted as failed:\n{m}"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn max_page_bytes_out_of_range_exits_64_naming_the_key() {
    for bad in ["1023", "67108865", "0"] {
        let dir = settings_dir(&format!(
            "[server]\ngrpc_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n\
             [backends.m]\nkind = \"memory\"\n\
             [namespaces.n]\nbackend = \"m\"\nmax_page_bytes = {bad}\n"
        ));
        let mut cmd = prism();
        cmd.arg("--settings").arg(dir.path()).arg("check-config");
        let out = output(cmd).await;
        assert_eq!(out.status.code(), Some(64), "{bad}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("namespaces.n.max_page_bytes"),
            "{bad}: {}",
            stderr(&out)
        );
    }
}

// 2. A gRPC Put over the transport's cap.

const SMALL: &str = r#"
[namespaces.small]
backend = "memory"
max_value_size = 4096
"#;

#[tokio::test]
async fn a_put_over_the_transport_cap_is_invalid_naming_max_value_size() {
    let (server, _dir) = start(SMALL).await;
    let mut c = server.client().await.unwrap();
    let largest = 1024 * 1024;
    for (ns, size, limit) in [
        // Over the transport's cap (the largest max_value_size + 64 KiB):
        // refused from the frame header, before the message is read.
        ("cache", largest + 1024 * 1024, largest),
        ("small", largest + 1024 * 1024, largest),
        ("cache", 8 * largest, largest),
        // Under the cap, over the namespace's own limit: the request core.
        ("small", 4097, 4096),
        ("cache", largest + 1, largest),
    ] {
        let e = c.put(put(ns, "k", vec![0; size])).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{ns} {size}: {e:?}");
        assert!(e.message().contains("max_value_size"), "{ns} {size}: {e:?}");
        assert!(
            e.message().contains(&limit.to_string()),
            "{ns} {size}: {e:?}"
        );
    }
    // Another call refused by the cap: a key too large to be read at all.
    let e = c.get(get("cache", &"k".repeat(2 << 20))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // The connection is still good.
    c.put(put("small", "k", vec![1; 4096])).await.unwrap();
    // REST answers 413 with the documented JSON error.
    let r = reqwest::Client::new()
        .put(format!("{}/v1/kv/cache/k", server.http_url()))
        .body(vec![0u8; largest + 1024 * 1024])
        .send()
        .await
        .unwrap();
    let (code, message) = rest_error(r, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert_eq!(code, "INVALID_ARGUMENT");
    assert!(message.contains("max_value_size"), "{message}");
    server.stop().await.unwrap();
}

/// One HTTP/2 frame: type, flags, stream 1 unless said, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .expect("small frame")
        .to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A header as an HPACK literal without indexing (no Huffman coding).
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    for s in [name, value] {
        out.push(u8::try_from(s.len()).expect("short header"));
        out.extend_from_slice(s.as_bytes());
    }
}

/// A Put whose gRPC frame header claims a 100 MiB message, of which only a
/// few bytes are ever sent: the gateway answers at once, from the header,
/// instead of waiting for (and buffering) a message that never comes.
#[tokio::test]
async fn a_put_over_the_cap_is_answered_from_its_frame_header_alone() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (server, _dir) = start("").await;
    let mut conn = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut headers = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/prism.kv.v1.KeyValue/Put"),
        (":authority", "127.0.0.1"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        hpack_literal(&mut headers, name, value);
    }
    let mut message = vec![0u8];
    message.extend_from_slice(&(100u32 << 20).to_be_bytes());
    message.extend_from_slice(&[0; 16]);
    let mut request = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    request.extend(frame(4, 0, 0, &[]));
    request.extend(frame(1, 0x4, 1, &headers)); // END_HEADERS
    request.extend(frame(0, 0, 1, &message)); // no END_STREAM: more to come
    conn.write_all(&request).await.unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let mut head = [0u8; 9];
            conn.read_exact(&mut head).await.expect("a frame");
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            conn.read_exact(&mut payload)
                .await
                .expect("a frame payload");
            match (kind, stream) {
                // The server's settings: acknowledged.
                (4, 0) if flags & 1 == 0 => conn.write_all(&frame(4, 1, 0, &[])).await.unwrap(),
                // Headers or data that end stream 1: the answer.
                (0 | 1, 1) if flags & 1 == 1 => return "answered",
                (3, 1) => return "reset",
                (7, _) => return "goaway",
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(
        answered,
        Ok("answered"),
        "the gateway waited for the body instead of refusing the frame header"
    );
    server.stop().await.unwrap();
}

// 3. The circuit breaker counts the backend's failures, not its callers'
// deadlines.

const FAULTY: &str = r#"
[backends.faulty]
kind = "memory"
pool_size = 64
breaker_failures = 5
breaker_cooldown = "30s"

[namespaces.faulty]
backend = "faulty"
timeout = "2s"

[namespaces.tight]
backend = "faulty"
timeout = "100ms"
"#;

#[tokio::test]
async fn callers_deadlines_do_not_open_the_circuit_but_backend_timeouts_do() {
    let dir = tempfile::tempdir().unwrap();
    let (connector, probe) = FaultyConnector::new();
    let settings = base_settings(dir.path(), FAULTY);
    let server =
        TestServer::start_with(settings, vec![("faulty", connector as Arc<dyn Connector>)])
            .await
            .unwrap();
    let c = server.client().await.unwrap();
    // A burst of requests with 1 ms deadlines on a backend that takes 50 ms.
    for round in 0..6 {
        let calls: Vec<_> = (0..50)
            .map(|i| {
                let mut c = c.clone();
                let req = with_timeout(
                    get("faulty", &format!("slow/50/{round}/{i}")),
                    Duration::from_millis(1),
                );
                tokio::spawn(async move { c.get(req).await })
            })
            .collect();
        for call in calls {
            let e = call.await.unwrap().expect_err("1 ms is too short");
            assert_ne!(e.code(), Code::Unavailable, "{e:?}");
        }
    }
    // The same over REST, whose client does not give up at its deadline:
    // these reach the backend and run into their deadline there.
    let http = reqwest::Client::new();
    for i in 0..20 {
        let r = http
            .get(format!(
                "{}/v1/kv/faulty/slow%2F300%2Frest{i}",
                server.http_url()
            ))
            .header("grpc-timeout", "20m")
            .send()
            .await
            .unwrap();
        let (code, _) = rest_error(r, StatusCode::GATEWAY_TIMEOUT).await;
        assert_eq!(code, "DEADLINE_EXCEEDED");
    }
    assert!(
        probe.started.load(Ordering::SeqCst) >= 20,
        "requests did not reach the backend"
    );
    // A well-behaved client is served.
    let mut c2 = c.clone();
    let r = c2
        .get(get("faulty", "k"))
        .await
        .expect("circuit still closed");
    assert!(!r.into_inner().found);
    // Requests that run past the namespace's own timeout are the backend's
    // fault: five open the circuit.
    let calls: Vec<_> = (0..5)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move { c.get(get("tight", &format!("slow/1000/{i}"))).await })
        })
        .collect();
    for call in calls {
        let e = call.await.unwrap().expect_err("over the namespace timeout");
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    }
    let e = c2.get(get("faulty", "k")).await.expect_err("circuit open");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("circuit open"), "{e:?}");
    server.stop().await.unwrap();
}

/// A value stored while its namespace allowed 8 MiB is still served, over
/// gRPC, once the limit is 1 MiB: by Get and by Scan, counted OK.
#[tokio::test]
async fn values_stored_under_an_earlier_larger_limit_are_still_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let value = vec![b'v'; 6 * 1024 * 1024];
    let before = "[namespaces.old]\nbackend = \"embedded\"\nmax_value_size = 8388608\n";
    let server = TestServer::start(base_settings(dir.path(), before))
        .await
        .expect("start");
    let mut c = server.client().await.unwrap();
    c.put(put("old", "big", value.clone()))
        .await
        .expect("a 6 MiB put");
    server.stop().await.unwrap();

    let after = "[namespaces.old]\nbackend = \"embedded\"\nmax_value_size = 1048576\n";
    let server = TestServer::start(base_settings(dir.path(), after))
        .await
        .expect("restart");
    let mut c = server.client().await.unwrap();
    let got = c.get(get("old", "big")).await.expect("get").into_inner();
    assert_eq!(got.value.len(), value.len());
    let page = c
        .scan(ScanRequest {
            namespace: "old".into(),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("scan")
        .into_inner();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].value.len(), value.len());
    // A new value over today's limit is still refused.
    let e = c
        .put(put("old", "new", vec![b'v'; 2 * 1024 * 1024]))
        .await
        .expect_err("over the limit");
    assert_eq!(e.code(), Code::InvalidArgument);
    server.stop().await.unwrap();
}
