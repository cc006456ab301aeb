//! The `prism.kv.v1.KeyValue` gRPC service: validation, namespace routing,
//! deadlines and client identity; the work goes through a session actor to
//! the namespace's pool actor.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use prism_actors::Addr;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::{debug, Instrument};

use crate::backend::{Op, Outcome};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::pool::{BackendHealth, PoolActor};
use crate::proto::key_value_server::KeyValue;
use crate::proto::{
    DeleteRequest, DeleteResponse, ExistsRequest, ExistsResponse, GetRequest, GetResponse, Item,
    PutRequest, PutResponse, ScanRequest, ScanResponse,
};
use crate::session::{self, Sessions};
use crate::settings::NamespaceSettings;

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Scan page size when the request says 0.
pub const DEFAULT_SCAN_LIMIT: usize = 100;
/// Largest scan page.
pub const MAX_SCAN_LIMIT: usize = 1000;

/// A configured namespace, resolved to its pool actor.
#[derive(Clone)]
pub struct Namespace {
    /// The namespace's name.
    pub name: Arc<str>,
    /// Its settings.
    pub settings: NamespaceSettings,
    /// The pool actor of its backend.
    pub pool: Addr<PoolActor>,
    /// Its backend's health and circuit breaker.
    pub health: Arc<BackendHealth>,
}

/// What every request needs: namespaces, sessions and the request metrics.
#[derive(Clone)]
pub struct Router {
    namespaces: Arc<BTreeMap<String, Namespace>>,
    sessions: Sessions,
    metrics: Metrics,
}

impl Router {
    /// A router over `namespaces`, admitting requests through `sessions`.
    pub fn new(namespaces: BTreeMap<String, Namespace>, sessions: Sessions) -> Self {
        Router {
            namespaces: Arc::new(namespaces),
            sessions,
            metrics: Metrics::new(),
        }
    }

    /// Every namespace, by name.
    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        self.namespaces.values()
    }

    /// The metrics every request (gRPC and REST) is recorded in.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Records a finished request in the metrics; a namespace that is not
    /// configured is recorded under one `(unknown)` label.
    pub fn observe(
        &self,
        namespace: &str,
        op: &'static str,
        code: tonic::Code,
        started: std::time::Instant,
    ) {
        let known = self.namespaces.get(namespace).map(|ns| ns.name.clone());
        self.metrics.request(known, op, code, started.elapsed());
    }

    /// The namespace called `name`.
    pub fn namespace(&self, name: &str) -> Result<&Namespace, ApiError> {
        self.namespaces
            .get(name)
            .ok_or_else(|| ApiError::UnknownNamespace(name.to_owned()))
    }

    /// The sessions.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// Runs `op` on `ns` for `client`, bounded by `timeout` (the client's) or
    /// else the namespace's timeout.
    pub async fn call(
        &self,
        client: &str,
        ns: &Namespace,
        op: Op,
        timeout: Option<Duration>,
    ) -> Result<Outcome, ApiError> {
        let deadline = Instant::now() + timeout.unwrap_or(ns.settings.timeout);
        let (reply, rx) = oneshot::channel();
        let req = session::Request {
            pool: ns.pool.clone(),
            health: ns.health.clone(),
            namespace: ns.name.clone(),
            op,
            deadline,
            reply,
        };
        self.sessions.submit(client, req).await?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(res)) => res,
            // The pool actor dropped the request: it failed (and is being
            // restarted) while the request was queued or running.
            Ok(Err(_)) => Err(ApiError::Unavailable(format!(
                "backend of namespace '{}' failed during the request; retry",
                ns.name
            ))),
            Err(_) => Err(ApiError::DeadlineExceeded("waiting for the backend")),
        }
    }
}

/// Checks a key: 1..=1024 bytes of UTF-8 (guaranteed by protobuf strings)
/// without NUL.
pub fn validate_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::InvalidArgument("key must not be empty".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ApiError::InvalidArgument(format!(
            "key is {} bytes, the limit is {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    if key.contains('\0') {
        return Err(ApiError::InvalidArgument("key must not contain NUL".into()));
    }
    Ok(())
}

/// Checks a value against the namespace's `max_value_size`.
pub fn validate_value(ns: &Namespace, value: &[u8]) -> Result<(), ApiError> {
    validate_value_size(ns, value.len())
}

/// Checks a value's size in bytes against the namespace's `max_value_size`
/// (for a value not read yet, such as an HTTP body).
pub fn validate_value_size(ns: &Namespace, size: usize) -> Result<(), ApiError> {
    if size > ns.settings.max_value_size {
        return Err(ApiError::ValueTooLarge(format!(
            "value is {size} bytes, the limit of namespace '{}' is {} (max_value_size)",
            ns.name, ns.settings.max_value_size
        )));
    }
    Ok(())
}

/// The TTL a Put stores: `ttl_ms`, or the namespace default when 0.
pub fn put_ttl(ns: &Namespace, ttl_ms: u64) -> Option<Duration> {
    if ttl_ms == 0 {
        ns.settings.default_ttl
    } else {
        Some(Duration::from_millis(ttl_ms))
    }
}

/// Builds a scan operation from request fields; `cursor` is a `next_cursor`
/// from an earlier page.
pub fn scan_op(prefix: String, limit: u32, cursor: &str, keys_only: bool) -> Result<Op, ApiError> {
    if prefix.len() > MAX_KEY_BYTES {
        return Err(ApiError::InvalidArgument(format!(
            "prefix is {} bytes, the limit is {MAX_KEY_BYTES}",
            prefix.len()
        )));
    }
    if prefix.contains('\0') {
        return Err(ApiError::InvalidArgument(
            "prefix must not contain NUL".into(),
        ));
    }
    let limit = match limit as usize {
        0 => DEFAULT_SCAN_LIMIT,
        n => n.min(MAX_SCAN_LIMIT),
    };
    let after = if cursor.is_empty() {
        None
    } else {
        Some(decode_cursor(cursor)?)
    };
    Ok(Op::Scan {
        prefix,
        after,
        limit,
        keys_only,
    })
}

/// Cursors are the last key returned, base64url-encoded, so that they are
/// opaque to clients and safe in URLs.
pub fn encode_cursor(last_key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last_key.as_bytes())
}

fn decode_cursor(cursor: &str) -> Result<String, ApiError> {
    let bad =
        || ApiError::InvalidArgument("cursor is not a next_cursor from an earlier scan".into());
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| bad())?;
    String::from_utf8(bytes).map_err(|_| bad())
}

/// Parses a `grpc-timeout` header value (`<digits><unit>`, unit one of
/// H M S m u n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How much earlier than the client's deadline a request gives up, so that
/// the answer is ours (DEADLINE_EXCEEDED with a reason) and not tonic's
/// timeout layer's (CANCELLED), which fires at the deadline itself: a tenth
/// of the timeout, at least 5 ms (at most half the timeout), at most 20 ms.
pub fn deadline_margin(timeout: Duration) -> Duration {
    (timeout / 10).clamp(
        Duration::from_millis(5).min(timeout / 2),
        Duration::from_millis(20),
    )
}

/// The gRPC service.
#[derive(Clone)]
pub struct KvService {
    router: Router,
}

impl KvService {
    /// The service over `router`.
    pub fn new(router: Router) -> Self {
        KvService { router }
    }

    /// The client identity and deadline of a request. tonic's own timeout
    /// layer answers CANCELLED exactly at the client's deadline, so ours
    /// keeps a small margin to answer DEADLINE_EXCEEDED first.
    fn context<T>(req: &Request<T>) -> (String, Option<Duration>) {
        let client = req
            .metadata()
            .get("x-client-id")
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .or_else(|| req.remote_addr().map(|a| a.to_string()))
            .unwrap_or_else(|| "unknown".to_owned());
        let timeout = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(|t| t.saturating_sub(deadline_margin(t)));
        (client, timeout)
    }

    async fn run(
        &self,
        client: &str,
        namespace: &str,
        op: Op,
        timeout: Option<Duration>,
    ) -> Result<Outcome, Status> {
        let ns = self.router.namespace(namespace)?;
        let name = op.name();
        let span = tracing::info_span!("request", namespace = %ns.name, op = name, session = %client, api = "grpc");
        let res = self
            .router
            .call(client, ns, op, timeout)
            .instrument(span)
            .await;
        if let Err(e) = &res {
            debug!(namespace = %ns.name, op = name, session = %client, code = ?e.code(), error = %e, "request failed");
        }
        Ok(res?)
    }
}

fn unexpected(op: &str) -> Status {
    tracing::error!(op, "backend answered with the outcome of another operation");
    Status::from(ApiError::Internal)
}

#[tonic::async_trait]
impl KeyValue for KvService {
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let (client, timeout) = Self::context(&req);
        let GetRequest { namespace, key } = req.into_inner();
        self.router.namespace(&namespace)?;
        validate_key(&key)?;
        match self
            .run(&client, &namespace, Op::Get { key }, timeout)
            .await?
        {
            Outcome::Get(Some(r)) => Ok(Response::new(GetResponse {
                found: true,
                value: r.value,
                ttl_ms: match r.ttl {
                    // A live key with under 1 ms left still reads as live.
                    Some(t) => (t.as_millis() as i64).max(1),
                    None => -1,
                },
            })),
            Outcome::Get(None) => Ok(Response::new(GetResponse {
                found: false,
                value: Bytes::new(),
                ttl_ms: 0,
            })),
            _ => Err(unexpected("get")),
        }
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let (client, timeout) = Self::context(&req);
        let PutRequest {
            namespace,
            key,
            value,
            ttl_ms,
        } = req.into_inner();
        let ns = self.router.namespace(&namespace)?;
        validate_key(&key)?;
        validate_value(ns, &value)?;
        let ttl = put_ttl(ns, ttl_ms);
        match self
            .run(&client, &namespace, Op::Put { key, value, ttl }, timeout)
            .await?
        {
            Outcome::Put => Ok(Response::new(PutResponse {})),
            _ => Err(unexpected("put")),
        }
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let (client, timeout) = Self::context(&req);
        let DeleteRequest { namespace, key } = req.into_inner();
        self.router.namespace(&namespace)?;
        validate_key(&key)?;
        match self
            .run(&client, &namespace, Op::Delete { key }, timeout)
            .await?
        {
            Outcome::Delete(existed) => Ok(Response::new(DeleteResponse { existed })),
            _ => Err(unexpected("delete")),
        }
    }

    async fn exists(
        &self,
        req: Request<ExistsRequest>,
    ) -> Result<Response<ExistsResponse>, Status> {
        let (client, timeout) = Self::context(&req);
        let ExistsRequest { namespace, key } = req.into_inner();
        self.router.namespace(&namespace)?;
        validate_key(&key)?;
        match self
            .run(&client, &namespace, Op::Exists { key }, timeout)
            .await?
        {
            Outcome::Exists(exists) => Ok(Response::new(ExistsResponse { exists })),
            _ => Err(unexpected("exists")),
        }
    }

    async fn scan(&self, req: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let (client, timeout) = Self::context(&req);
        let ScanRequest {
            namespace,
            prefix,
            limit,
            cursor,
            keys_only,
        } = req.into_inner();
        self.router.namespace(&namespace)?;
        let op = scan_op(prefix, limit, &cursor, keys_only)?;
        match self.run(&client, &namespace, op, timeout).await? {
            Outcome::Scan { items, more } => {
                let next_cursor = match (more, items.last()) {
                    (true, Some(last)) => encode_cursor(&last.key),
                    _ => String::new(),
                };
                Ok(Response::new(ScanResponse {
                    items: items
                        .into_iter()
                        .map(|i| Item {
                            key: i.key,
                            value: i.value,
                        })
                        .collect(),
                    next_cursor,
                }))
            }
            _ => Err(unexpected("scan")),
        }
    }
}

/// The gRPC service as served: [`KvService`] with every request, early
/// validation failures included, counted and timed in the router's metrics.
#[derive(Clone)]
pub struct MeteredKvService {
    inner: KvService,
}

impl MeteredKvService {
    /// Meters `inner`.
    pub fn new(inner: KvService) -> Self {
        MeteredKvService { inner }
    }

    fn observe<T>(
        &self,
        namespace: &str,
        op: &'static str,
        started: std::time::Instant,
        res: &Result<T, Status>,
    ) {
        let code = match res {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.inner.router.observe(namespace, op, code, started);
    }
}

#[tonic::async_trait]
impl KeyValue for MeteredKvService {
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let (started, namespace) = (std::time::Instant::now(), req.get_ref().namespace.clone());
        let res = self.inner.get(req).await;
        self.observe(&namespace, "get", started, &res);
        res
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let (started, namespace) = (std::time::Instant::now(), req.get_ref().namespace.clone());
        let res = self.inner.put(req).await;
        self.observe(&namespace, "put", started, &res);
        res
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let (started, namespace) = (std::time::Instant::now(), req.get_ref().namespace.clone());
        let res = self.inner.delete(req).await;
        self.observe(&namespace, "delete", started, &res);
        res
    }

    async fn exists(
        &self,
        req: Request<ExistsRequest>,
    ) -> Result<Response<ExistsResponse>, Status> {
        let (started, namespace) = (std::time::Instant::now(), req.get_ref().namespace.clone());
        let res = self.inner.exists(req).await;
        self.observe(&namespace, "exists", started, &res);
        res
    }

    async fn scan(&self, req: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let (started, namespace) = (std::time::Instant::now(), req.get_ref().namespace.clone());
        let res = self.inner.scan(req).await;
        self.observe(&namespace, "scan", started, &res);
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_values_parse() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }

    #[test]
    fn requests_give_up_a_little_before_the_client_deadline() {
        let ms = Duration::from_millis;
        assert_eq!(deadline_margin(ms(10)), ms(5));
        assert_eq!(deadline_margin(ms(4)), ms(2));
        assert_eq!(deadline_margin(ms(100)), ms(10));
        assert_eq!(deadline_margin(Duration::from_secs(5)), ms(20));
    }

    #[test]
    fn keys_are_validated() {
        assert!(validate_key("a").is_ok());
        assert!(validate_key(&"k".repeat(1024)).is_ok());
        assert!(validate_key("").is_err());
        assert!(validate_key(&"k".repeat(1025)).is_err());
        assert!(validate_key("a\0b").is_err());
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_rejected() {
        let c = encode_cursor("user/ü/42");
        let Op::Scan { after, limit, .. } = scan_op(String::new(), 0, &c, false).unwrap() else {
            panic!("not a scan");
        };
        assert_eq!(after.as_deref(), Some("user/ü/42"));
        assert_eq!(limit, DEFAULT_SCAN_LIMIT);
        assert!(scan_op(String::new(), 5000, "", false)
            .is_ok_and(|op| matches!(op, Op::Scan { limit, .. } if limit == MAX_SCAN_LIMIT)));
        assert!(scan_op(String::new(), 1, "!!not base64!!", false).is_err());
    }
}
