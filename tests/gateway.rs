//! The gRPC contract, against a real gateway in-process with its embedded
//! SQLite and memory backends.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use common::{base_settings, TestServer};
use prism::proto::{DeleteRequest, ExistsRequest, GetRequest, PutRequest, ScanRequest};
use tonic::Code;

fn put(ns: &str, key: &str, value: &[u8], ttl_ms: u64) -> PutRequest {
    PutRequest {
        namespace: ns.into(),
        key: key.into(),
        value: Bytes::copy_from_slice(value),
        ttl_ms,
    }
}

fn get(ns: &str, key: &str) -> GetRequest {
    GetRequest {
        namespace: ns.into(),
        key: key.into(),
    }
}

async fn server(extra: &str) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = TestServer::start(base_settings(dir.path(), extra))
        .await
        .expect("server starts");
    (s, dir)
}

#[tokio::test]
async fn every_rpc_works_on_both_embedded_backends() {
    let (server, _dir) = server("").await;
    let mut c = server.client().await.unwrap();
    for ns in ["default", "cache"] {
        c.put(put(ns, "a", b"hi", 0)).await.unwrap();
        let r = c.get(get(ns, "a")).await.unwrap().into_inner();
        assert!(r.found);
        assert_eq!(&r.value[..], b"hi");
        assert_eq!(r.ttl_ms, -1, "no expiry reads as -1");

        // Upsert replaces.
        c.put(put(ns, "a", b"there", 0)).await.unwrap();
        assert_eq!(
            &c.get(get(ns, "a")).await.unwrap().into_inner().value[..],
            b"there"
        );

        let e = c
            .exists(ExistsRequest {
                namespace: ns.into(),
                key: "a".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(e.exists);

        let d = c
            .delete(DeleteRequest {
                namespace: ns.into(),
                key: "a".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(d.existed);
        // Idempotent: the second delete succeeds and says it was gone.
        let d = c
            .delete(DeleteRequest {
                namespace: ns.into(),
                key: "a".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!d.existed);

        let r = c.get(get(ns, "a")).await.unwrap().into_inner();
        assert!(!r.found);
        assert_eq!(r.ttl_ms, 0);
        assert!(r.value.is_empty());
        let e = c
            .exists(ExistsRequest {
                namespace: ns.into(),
                key: "a".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!e.exists);
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn namespaces_are_separate_keyspaces() {
    let (server, _dir) = server(
        r#"
[namespaces.other]
backend = "embedded"
"#,
    )
    .await;
    let mut c = server.client().await.unwrap();
    c.put(put("default", "k", b"1", 0)).await.unwrap();
    assert!(!c.get(get("other", "k")).await.unwrap().into_inner().found);
    assert!(!c.get(get("cache", "k")).await.unwrap().into_inner().found);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn unknown_namespace_is_not_found_and_named() {
    let (server, _dir) = server("").await;
    let mut c = server.client().await.unwrap();
    let e = c.get(get("nope", "a")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("nope"), "{}", e.message());
    let e = c.put(put("nope", "a", b"x", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .scan(ScanRequest {
            namespace: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn invalid_keys_are_rejected_with_the_reason() {
    let (server, _dir) = server("").await;
    let mut c = server.client().await.unwrap();
    let long = "k".repeat(1025);
    for (key, needle) in [
        ("", "empty"),
        (long.as_str(), "1025 bytes"),
        ("a\0b", "NUL"),
    ] {
        let e = c.put(put("default", key, b"x", 0)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{key:?}");
        assert!(e.message().contains(needle), "{}", e.message());
        let e = c.get(get("default", key)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = c
            .delete(DeleteRequest {
                namespace: "default".into(),
                key: key.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = c
            .exists(ExistsRequest {
                namespace: "default".into(),
                key: key.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }
    // The longest valid key, multi-byte UTF-8 included, works.
    let max = format!("{}é", "k".repeat(1022));
    assert_eq!(max.len(), 1024);
    c.put(put("default", &max, b"x", 0)).await.unwrap();
    assert!(
        c.get(get("default", &max))
            .await
            .unwrap()
            .into_inner()
            .found
    );
    let e = c
        .scan(ScanRequest {
            namespace: "default".into(),
            cursor: "%%%".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("cursor"));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn values_are_binary_safe_up_to_the_max_size() {
    let (server, _dir) = server("").await;
    let mut c = server.client().await.unwrap();
    let all: Vec<u8> = (0..=255u8).collect();
    let max = vec![0xA5u8; 1024 * 1024];
    for ns in ["default", "cache"] {
        for (key, value) in [("all", &all[..]), ("empty", &[][..]), ("max", &max[..])] {
            c.put(put(ns, key, value, 0)).await.unwrap();
            let r = c.get(get(ns, key)).await.unwrap().into_inner();
            assert!(r.found, "{ns}/{key}");
            assert_eq!(&r.value[..], value, "{ns}/{key}");
        }
        let over = vec![1u8; 1024 * 1024 + 1];
        let e = c.put(put(ns, "over", &over, 0)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("max_value_size"), "{}", e.message());
        assert!(!c.get(get(ns, "over")).await.unwrap().into_inner().found);
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn ttl_expires_keys_and_an_overwrite_resets_it() {
    let (server, _dir) = server(
        r#"
[namespaces.short]
backend = "memory"
default_ttl = "150ms"
"#,
    )
    .await;
    let mut c = server.client().await.unwrap();
    for ns in ["default", "cache"] {
        c.put(put(ns, "t", b"v", 150)).await.unwrap();
        let r = c.get(get(ns, "t")).await.unwrap().into_inner();
        assert!(r.found);
        assert!(r.ttl_ms > 0 && r.ttl_ms <= 150, "ttl {}", r.ttl_ms);
        // An overwrite without TTL removes the expiry.
        c.put(put(ns, "keep", b"v", 150)).await.unwrap();
        c.put(put(ns, "keep", b"v2", 0)).await.unwrap();
        // An overwrite with a TTL restarts the clock.
        c.put(put(ns, "renew", b"v", 150)).await.unwrap();
        c.put(put(ns, "renew", b"v", 60_000)).await.unwrap();

        let expired = common::eventually(Duration::from_secs(3), || {
            let mut c = c.clone();
            async move { !c.get(get(ns, "t")).await.unwrap().into_inner().found }
        })
        .await;
        assert!(expired, "{ns}: key with ttl never expired");
        // Expired keys are absent for every operation.
        let e = c
            .exists(ExistsRequest {
                namespace: ns.into(),
                key: "t".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!e.exists);
        let d = c
            .delete(DeleteRequest {
                namespace: ns.into(),
                key: "t".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!d.existed);
        let scan = c
            .scan(ScanRequest {
                namespace: ns.into(),
                prefix: "t".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(scan.items.is_empty());

        let keep = c.get(get(ns, "keep")).await.unwrap().into_inner();
        assert!(keep.found);
        assert_eq!(keep.ttl_ms, -1);
        let renew = c.get(get(ns, "renew")).await.unwrap().into_inner();
        assert!(renew.found);
        assert!(renew.ttl_ms > 1000);
    }
    // The namespace default applies to ttl_ms = 0.
    c.put(put("short", "d", b"v", 0)).await.unwrap();
    let r = c.get(get("short", "d")).await.unwrap().into_inner();
    assert!(
        r.found && r.ttl_ms > 0 && r.ttl_ms <= 150,
        "ttl {}",
        r.ttl_ms
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn scan_pages_through_2000_keys_in_order_without_duplicates_or_gaps() {
    let (server, _dir) = server("").await;
    let c = server.client().await.unwrap();
    for ns in ["default", "cache"] {
        let mut expected = BTreeSet::new();
        let mut writers = Vec::new();
        for w in 0..8 {
            let mut c = c.clone();
            writers.push(tokio::spawn(async move {
                for i in 0..260 {
                    let key = format!("scan/{:05}", w * 1000 + i);
                    c.put(put(ns, &key, key.as_bytes(), 0)).await.unwrap();
                }
            }));
            for i in 0..260 {
                expected.insert(format!("scan/{:05}", w * 1000 + i));
            }
        }
        for w in writers {
            w.await.unwrap();
        }
        // Keys outside the prefix, before and after it.
        let mut c = c.clone();
        c.put(put(ns, "scam", b"x", 0)).await.unwrap();
        c.put(put(ns, "scan0", b"x", 0)).await.unwrap();

        // Concurrent writes to other keys while paging.
        let mut noise_client = c.clone();
        let noise = tokio::spawn(async move {
            for i in 0..300 {
                let key = format!("other/{i}");
                noise_client.put(put(ns, &key, b"n", 0)).await.unwrap();
            }
        });

        let mut seen = Vec::new();
        let mut cursor = String::new();
        let mut pages = 0;
        loop {
            let page = c
                .scan(ScanRequest {
                    namespace: ns.into(),
                    prefix: "scan/".into(),
                    limit: 97,
                    cursor: cursor.clone(),
                    keys_only: false,
                })
                .await
                .unwrap()
                .into_inner();
            pages += 1;
            assert!(page.items.len() <= 97);
            for item in &page.items {
                assert_eq!(
                    item.value,
                    Bytes::from(item.key.clone()),
                    "value matches key"
                );
            }
            seen.extend(page.items.into_iter().map(|i| i.key));
            if page.next_cursor.is_empty() {
                break;
            }
            cursor = page.next_cursor;
            assert!(pages < 100, "scan does not terminate");
        }
        noise.await.unwrap();
        let mut sorted = seen.clone();
        sorted.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        assert_eq!(seen, sorted, "{ns}: pages are in ascending byte order");
        let unique: BTreeSet<String> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "{ns}: no duplicates");
        assert_eq!(
            unique, expected,
            "{ns}: no gaps, nothing outside the prefix"
        );

        // keys_only leaves values out; limit 0 means 100; large limits cap at 1000.
        let page = c
            .scan(ScanRequest {
                namespace: ns.into(),
                prefix: "scan/".into(),
                keys_only: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.items.len(), 100);
        assert!(page.items.iter().all(|i| i.value.is_empty()));
        assert!(!page.next_cursor.is_empty());
        let page = c
            .scan(ScanRequest {
                namespace: ns.into(),
                prefix: "scan/".into(),
                limit: 50_000,
                keys_only: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.items.len(), 1000);
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn two_hundred_concurrent_clients_each_see_their_own_writes() {
    let (server, _dir) = server("").await;
    let c = server.client().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = c.clone();
        let ns = if i % 2 == 0 { "default" } else { "cache" };
        tasks.push(tokio::spawn(async move {
            let client = format!("client-{i}");
            for j in 0..10 {
                let key = format!("c{i}/{j}");
                c.put(common::as_client(&client, put(ns, &key, key.as_bytes(), 0)))
                    .await
                    .unwrap();
                let r = c
                    .get(common::as_client(&client, get(ns, &key)))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(r.value, Bytes::from(key));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let (server, _dir) = server("").await;
    let channel = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "prism.kv.v1.KeyValue".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn reflection_lists_the_services_without_the_proto() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let (server, _dir) = server("").await;
    let channel = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream
        .message()
        .await
        .unwrap()
        .expect("a reflection answer");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"prism.kv.v1.KeyValue".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    server.stop().await.unwrap();
}
