//! The floor Prism's own cost is measured against: a bare tonic server with
//! Prism's KeyValue proto, answering from a map behind a mutex, with no
//! sessions, limits, deadlines, metrics, logs or backends.
//!
//! ```sh
//! cargo run --release --example bare_kv -- 127.0.0.1:18990
//! prism bench --addr 127.0.0.1:18990 --namespace mem --op get --concurrency 1
//! ```
//!
//! `scripts/own-cost.sh` runs it beside a gateway and compares the two.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use bytes::Bytes;
use prism::proto::key_value_server::{KeyValue, KeyValueServer};
use prism::proto::{
    DeleteRequest, DeleteResponse, ExistsRequest, ExistsResponse, GetRequest, GetResponse, Item,
    PutRequest, PutResponse, ScanRequest, ScanResponse,
};
use tonic::{Request, Response, Status};

#[derive(Default)]
struct Bare {
    map: Mutex<BTreeMap<(String, String), Bytes>>,
}

impl Bare {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), Bytes>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[tonic::async_trait]
impl KeyValue for Bare {
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let GetRequest { namespace, key } = req.into_inner();
        let value = self.map().get(&(namespace, key)).cloned();
        Ok(Response::new(GetResponse {
            found: value.is_some(),
            ttl_ms: if value.is_some() { -1 } else { 0 },
            value: value.unwrap_or_default(),
        }))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let PutRequest {
            namespace,
            key,
            value,
            ..
        } = req.into_inner();
        self.map().insert((namespace, key), value);
        Ok(Response::new(PutResponse {}))
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let DeleteRequest { namespace, key } = req.into_inner();
        let existed = self.map().remove(&(namespace, key)).is_some();
        Ok(Response::new(DeleteResponse { existed }))
    }

    async fn exists(
        &self,
        req: Request<ExistsRequest>,
    ) -> Result<Response<ExistsResponse>, Status> {
        let ExistsRequest { namespace, key } = req.into_inner();
        let exists = self.map().contains_key(&(namespace, key));
        Ok(Response::new(ExistsResponse { exists }))
    }

    async fn scan(&self, req: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let ScanRequest {
            namespace,
            prefix,
            limit,
            ..
        } = req.into_inner();
        let limit = if limit == 0 { 100 } else { limit.min(1000) } as usize;
        let items = self
            .map()
            .range((namespace.clone(), prefix.clone())..)
            .take_while(|((ns, k), _)| *ns == namespace && k.starts_with(&prefix))
            .take(limit)
            .map(|((_, key), value)| Item {
                key: key.clone(),
                value: value.clone(),
            })
            .collect();
        Ok(Response::new(ScanResponse {
            items,
            next_cursor: String::new(),
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = match std::env::args().nth(1) {
        Some(a) => a
            .parse()
            .map_err(|e| format!("address '{a}' is not host:port: {e}"))?,
        None => "127.0.0.1:18990".parse()?,
    };
    eprintln!("bare KeyValue server on {addr}");
    tonic::transport::Server::builder()
        .add_service(KeyValueServer::new(Bare::default()))
        .serve_with_shutdown(addr, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
