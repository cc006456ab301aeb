//! gRPC request builders and clients.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use prism::proto::key_value_client::KeyValueClient;
use prism::proto::{DeleteRequest, ExistsRequest, GetRequest, PutRequest, ScanRequest};
use tonic::transport::Channel;

/// A channel to the gRPC server listening on `addr`, for any service.
pub async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await
        .with_context(|| format!("connect to {addr}"))
}

/// A client of the gateway listening on `addr`, allowing messages as large
/// as any namespace may take.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<KeyValueClient<Channel>> {
    Ok(KeyValueClient::new(channel(addr).await?)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

pub fn put(ns: &str, key: &str, value: &[u8], ttl_ms: u64) -> PutRequest {
    PutRequest {
        namespace: ns.into(),
        key: key.into(),
        value: Bytes::copy_from_slice(value),
        ttl_ms,
    }
}

pub fn get(ns: &str, key: &str) -> GetRequest {
    GetRequest {
        namespace: ns.into(),
        key: key.into(),
    }
}

pub fn exists(ns: &str, key: &str) -> ExistsRequest {
    ExistsRequest {
        namespace: ns.into(),
        key: key.into(),
    }
}

pub fn delete(ns: &str, key: &str) -> DeleteRequest {
    DeleteRequest {
        namespace: ns.into(),
        key: key.into(),
    }
}

/// A scan of the whole namespace, first page, server's default limit; set
/// other fields with `..scan(ns)`.
pub fn scan(ns: &str) -> ScanRequest {
    ScanRequest {
        namespace: ns.into(),
        ..Default::default()
    }
}

/// A request with `x-client-id` set.
pub fn as_client<T>(client: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("x-client-id", client.parse().expect("ascii client id"));
    r
}

/// A request with a gRPC deadline of `timeout`.
pub fn with_timeout<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}
