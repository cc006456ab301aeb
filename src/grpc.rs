//! The `prism.kv.v1.KeyValue` gRPC service: converts protobuf messages to
//! and from the request core's operations, nothing else.

use bytes::Bytes;
use tonic::{Request, Response, Status};

use crate::auth::Credentials;
use crate::kv::caller::{AUTHORIZATION, CLIENT_ID, TIMEOUT};
use crate::kv::{ttl_ms, Api, Caller, Core, ScanParams};
use crate::proto::key_value_server::KeyValue;
use crate::proto::{
    DeleteRequest, DeleteResponse, ExistsRequest, ExistsResponse, GetRequest, GetResponse, Item,
    PutRequest, PutResponse, ScanRequest, ScanResponse,
};

/// The gRPC service over a request core.
#[derive(Clone)]
pub struct KvService {
    core: Core,
}

impl KvService {
    /// The service over `core`.
    pub fn new(core: Core) -> Self {
        KvService { core }
    }
}

fn caller<T>(req: &Request<T>) -> Caller {
    let meta = |key| req.metadata().get(key).and_then(|v| v.to_str().ok());
    Caller::new(Api::Grpc, meta(CLIENT_ID), req.remote_addr(), meta(TIMEOUT))
        .with_credentials(Credentials::new(meta(AUTHORIZATION), None))
}

#[tonic::async_trait]
impl KeyValue for KvService {
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let caller = caller(&req);
        let GetRequest { namespace, key } = req.into_inner();
        let response = match self.core.get(&caller, &namespace, key).await? {
            Some(r) => GetResponse {
                found: true,
                value: r.value,
                ttl_ms: ttl_ms(r.ttl),
            },
            None => GetResponse {
                found: false,
                value: Bytes::new(),
                ttl_ms: 0,
            },
        };
        Ok(Response::new(response))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let caller = caller(&req);
        let PutRequest {
            namespace,
            key,
            value,
            ttl_ms,
        } = req.into_inner();
        self.core
            .put(&caller, &namespace, key, ttl_ms, |_| async { Ok(value) })
            .await?;
        Ok(Response::new(PutResponse {}))
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let caller = caller(&req);
        let DeleteRequest { namespace, key } = req.into_inner();
        let existed = self.core.delete(&caller, &namespace, key).await?;
        Ok(Response::new(DeleteResponse { existed }))
    }

    async fn exists(
        &self,
        req: Request<ExistsRequest>,
    ) -> Result<Response<ExistsResponse>, Status> {
        let caller = caller(&req);
        let ExistsRequest { namespace, key } = req.into_inner();
        let exists = self.core.exists(&caller, &namespace, key).await?;
        Ok(Response::new(ExistsResponse { exists }))
    }

    async fn scan(&self, req: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let caller = caller(&req);
        let ScanRequest {
            namespace,
            prefix,
            limit,
            cursor,
            keys_only,
        } = req.into_inner();
        let params = ScanParams {
            prefix,
            limit,
            cursor,
            keys_only,
        };
        let page = self.core.scan(&caller, &namespace, params).await?;
        Ok(Response::new(ScanResponse {
            items: page
                .items
                .into_iter()
                .map(|i| Item {
                    key: i.key,
                    value: i.value,
                })
                .collect(),
            next_cursor: page.next_cursor,
        }))
    }
}
