//! The backend-independent parts of the gRPC contract (routing, validation,
//! health, reflection) against a real gateway in-process. What every backend
//! must do alike is in `conformance.rs`.

mod common;

use common::requests::{channel, delete, exists, get, put, scan};
use common::{base_settings, TestServer};
use prism::proto::ScanRequest;
use tonic::Code;

async fn server(extra: &str) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = TestServer::start(base_settings(dir.path(), extra))
        .await
        .expect("server starts");
    (s, dir)
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
    let e = c.scan(scan("nope")).await.unwrap_err();
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
        let e = c.delete(delete("default", key)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = c.exists(exists("default", key)).await.unwrap_err();
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
            cursor: "%%%".into(),
            ..scan("default")
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("cursor"));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let (server, _dir) = server("").await;
    let ch = channel(server.addr).await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
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
    let ch = channel(server.addr).await.unwrap();
    let mut client = ServerReflectionClient::new(ch);
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
