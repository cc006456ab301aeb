//! The `prism.kv.v1.KeyValue` gRPC service: converts protobuf messages to
//! and from the request core's operations, nothing else.
//!
//! [`KvServer`] is the service as it is served: tonic decodes a request
//! message before any handler runs and answers one that does not decode
//! (a string field that is not UTF-8, a truncated message) with INTERNAL;
//! the wrapper turns that answer into INVALID_ARGUMENT, because the fault
//! is the client's.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tonic::codegen::{http, Body, BoxFuture, Context, Poll, Service, StdError};
use tonic::server::NamedService;
use tonic::{Code, Request, Response, Status};

use crate::auth::Credentials;
use crate::kv::caller::{AUTHORIZATION, CLIENT_ID, TIMEOUT};
use crate::kv::{ttl_ms, Api, Caller, Core, ScanParams};
use crate::proto::key_value_server::{KeyValue, KeyValueServer};
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

    /// The caller of a request to `namespace`; one whose metadata is
    /// refused is counted through the core. Marks the request as having
    /// reached a handler, so that [`DecodeErrors`] leaves the handler's
    /// statuses alone.
    fn caller<T>(
        &self,
        req: &Request<T>,
        namespace: &str,
        op: &'static str,
    ) -> Result<Caller, Status> {
        if let Some(reached) = req.extensions().get::<Reached>() {
            reached.0.store(true, Ordering::Release);
        }
        let meta = |key| req.metadata().get(key).and_then(|v| v.to_str().ok());
        let (id, peer) = (meta(CLIENT_ID), req.remote_addr());
        Caller::new(Api::Grpc, id, peer, meta(TIMEOUT))
            .map(|c| {
                let cn = crate::tls::peer_common_name(req).map(|cn| cn.0);
                c.with_credentials(Credentials::new(meta(AUTHORIZATION), cn))
            })
            .map_err(|e| {
                let caller = Caller::identify(Api::Grpc, id, peer);
                self.core.refuse(&caller, namespace, op, e).into()
            })
    }
}

/// The KeyValue service as served: the generated server over
/// [`KvService`], with request messages that tonic cannot decode answered
/// INVALID_ARGUMENT instead of INTERNAL.
pub type KvServer = DecodeErrors<KeyValueServer<KvService>>;

/// [`KvServer`] over `core`, accepting request messages of up to
/// `max_request` bytes and sending responses of up to `max_response`.
pub fn server(core: Core, max_request: usize, max_response: usize) -> KvServer {
    let max_value_size = core
        .namespaces()
        .map(|ns| ns.settings.max_value_size)
        .max()
        .unwrap_or(0);
    DecodeErrors::new(
        KeyValueServer::new(KvService::new(core))
            .max_decoding_message_size(max_request)
            .max_encoding_message_size(max_response),
    )
    .with_message_limit(MessageLimit {
        max_message: max_request,
        max_value_size,
    })
}

/// The gRPC path of `KeyValue/Put`.
const PUT_PATH: &str = "/prism.kv.v1.KeyValue/Put";

/// The transport's cap on request messages, and the largest
/// `max_value_size` it was sized for, to name in the answer to a Put over
/// it.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimit {
    /// The largest request message tonic decodes, in bytes.
    pub max_message: usize,
    /// The largest `max_value_size` of any namespace.
    pub max_value_size: usize,
}

/// A generated gRPC server whose answer to a request that never reached a
/// handler, because tonic could not decode its message, is
/// INVALID_ARGUMENT rather than INTERNAL. The one place that mapping is
/// made.
///
/// A request message over the transport's cap is refused by tonic from
/// its 5-byte frame header, before the message is read (nothing of it is
/// buffered), with OUT_OF_RANGE; that too is the client's fault, and is
/// answered INVALID_ARGUMENT, for a Put naming `max_value_size`.
#[derive(Clone)]
pub struct DecodeErrors<S> {
    inner: S,
    limit: Option<MessageLimit>,
}

impl<S> DecodeErrors<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        DecodeErrors { inner, limit: None }
    }

    /// Names `limit` in the answer to a request message over it.
    pub fn with_message_limit(mut self, limit: MessageLimit) -> Self {
        self.limit = Some(limit);
        self
    }
}

impl<S: NamedService> NamedService for DecodeErrors<S> {
    const NAME: &'static str = S::NAME;
}

/// Set by a handler when a request reaches it: a status the handler did not
/// produce was produced by tonic while reading the request.
#[derive(Clone)]
struct Reached(Arc<AtomicBool>);

impl<S, B> Service<http::Request<B>> for DecodeErrors<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let reached = Reached(Arc::new(AtomicBool::new(false)));
        req.extensions_mut().insert(reached.clone());
        let is_put = req.uri().path() == PUT_PATH;
        let limit = self.limit;
        let call = self.inner.call(req);
        Box::pin(async move {
            let mut response = call.await?;
            if !reached.0.load(Ordering::Acquire) {
                undecodable_is_invalid(response.headers_mut(), is_put, limit);
            }
            Ok(response)
        })
    }
}

/// Rewrites a trailers-only answer given before any handler ran to
/// INVALID_ARGUMENT: INTERNAL (the request message did not decode, or there
/// was none), keeping tonic's description of what was wrong (e.g.
/// `GetRequest.namespace: invalid string value: data is not UTF-8
/// encoded`), and OUT_OF_RANGE (the message is over the transport's cap,
/// the only OUT_OF_RANGE tonic gives while reading a request), naming
/// `max_value_size` for a Put.
fn undecodable_is_invalid(
    headers: &mut http::HeaderMap,
    is_put: bool,
    limit: Option<MessageLimit>,
) {
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    let status = match status.code() {
        Code::Internal => Status::invalid_argument(format!(
            "the request message is invalid: {}",
            status.message()
        )),
        Code::OutOfRange if is_put => Status::invalid_argument(match limit {
            Some(MessageLimit {
                max_message,
                max_value_size,
            }) => format!(
                "value too large: the request message is over the gateway's limit of \
                 {max_message} bytes; values are at most max_value_size bytes, \
                 {max_value_size} in the namespace that allows the most"
            ),
            None => format!("value too large for max_value_size: {}", status.message()),
        }),
        Code::OutOfRange => Status::invalid_argument(format!(
            "the request message is too large: {}",
            status.message()
        )),
        _ => return,
    };
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        headers.remove(name);
    }
    // Only a status whose message cannot be encoded fails here; the
    // message is percent-encoded, so this one can always be.
    let _ = status.add_header(headers);
}

#[tonic::async_trait]
impl KeyValue for KvService {
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let caller = self.caller(&req, &req.get_ref().namespace, "get")?;
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
        let caller = self.caller(&req, &req.get_ref().namespace, "put")?;
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
        let caller = self.caller(&req, &req.get_ref().namespace, "delete")?;
        let DeleteRequest { namespace, key } = req.into_inner();
        let existed = self.core.delete(&caller, &namespace, key).await?;
        Ok(Response::new(DeleteResponse { existed }))
    }

    async fn exists(
        &self,
        req: Request<ExistsRequest>,
    ) -> Result<Response<ExistsResponse>, Status> {
        let caller = self.caller(&req, &req.get_ref().namespace, "exists")?;
        let ExistsRequest { namespace, key } = req.into_inner();
        let exists = self.core.exists(&caller, &namespace, key).await?;
        Ok(Response::new(ExistsResponse { exists }))
    }

    async fn scan(&self, req: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let caller = self.caller(&req, &req.get_ref().namespace, "scan")?;
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
