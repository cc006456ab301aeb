//! The admin plane: an HTTP server (actix-web) beside the gRPC server, on
//! `server.http_addr`.
//!
//! - `GET /healthz`: 200 while the process runs.
//! - `GET /readyz`: 200 when serving and every backend is up with its circuit
//!   closed; 503 while draining or otherwise, with a JSON body saying which
//!   backend and why.
//! - `GET /metrics`: Prometheus text format (see [`crate::metrics`]).
//! - `GET /v1/actors`: the supervision tree as JSON.
//! - `GET /v1/namespaces`: each namespace, its backend, settings and health.
//! - The key-value API over REST, with the gRPC semantics and validation,
//!   through the same session and pool actors: `GET`, `PUT`, `DELETE`,
//!   `HEAD` on `/v1/kv/{namespace}/{key}` and a scan on
//!   `GET /v1/kv/{namespace}`. Errors are `{"code", "message"}` JSON with
//!   the statuses of [`ApiError`]'s `ResponseError` impl.
//!
//! actix runs each worker on its own thread and single-threaded runtime.
//! Handlers therefore only talk to actors (through the [`Router`]'s
//! addresses and channels, which work across runtimes); nothing here opens a
//! backend connection. actix's own signal handling is off: the gateway's one
//! shutdown path stops this server after the drain has ended, so probes and
//! metrics answer throughout the drain.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::dev::{Server, ServerHandle};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use base64::Engine;
use bytes::{Bytes, BytesMut};
use percent_encoding::percent_decode_str;
use prism_actors::{ActorInfo, SupervisorRef};
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;
use tonic::Code;
use tracing::{debug, error, info, warn, Instrument};

use crate::backend::{Op, Outcome};
use crate::error::{http_error, ApiError};
use crate::pool::Circuit;
use crate::server::BackendHandle;
use crate::service::{
    self, parse_grpc_timeout, put_ttl, scan_op, validate_key, validate_value_size, Namespace,
    Router,
};
use crate::settings::MAX_VALUE_SIZE_LIMIT;

/// Worker threads of the HTTP server. Each has its own runtime; handlers
/// only await actor replies, so two are plenty.
const WORKERS: usize = 2;

/// Seconds the stop waits for open connections once the drain is over:
/// every key-value request has been answered by then, so what is left is
/// idle keep-alive connections and probes.
const STOP_TIMEOUT_SECS: u64 = 1;

/// The response header of a GET that carries the key's remaining time to
/// live in milliseconds, `-1` when it has no expiry (as gRPC's `ttl_ms`).
pub const TTL_HEADER: &str = "x-prism-ttl-ms";

/// The request header naming the client (its session); the peer address
/// when absent, as for gRPC.
pub const CLIENT_HEADER: &str = "x-client-id";

/// The optional request header bounding a request, in the `grpc-timeout`
/// format (`<digits><H|M|S|m|u|n>`, e.g. `250m`); else the namespace timeout.
pub const TIMEOUT_HEADER: &str = "grpc-timeout";

/// The key-value routes' prefix.
const KV_PREFIX: &str = "/v1/kv/";

/// A body is read at most this far: past the largest legal value (plus room
/// for the rest of a request), the rest is not worth reading to produce a
/// clean 413, and the connection is closed instead.
const MAX_BODY_READ: usize = MAX_VALUE_SIZE_LIMIT + 64 * 1024;

/// Set once the gateway begins to drain; readiness answers 503 from then on
/// and REST key-value requests are refused like new gRPC calls.
#[derive(Debug, Clone, Default)]
pub struct Draining(Arc<AtomicBool>);

impl Draining {
    /// Marks the drain as begun.
    pub fn begin(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// True once the drain has begun.
    pub fn is_draining(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What the admin handlers read: the router (namespaces, sessions,
/// metrics), the backends' health, the live tree and the drain flag.
#[derive(Clone)]
pub struct AdminState {
    router: Router,
    backends: Arc<[BackendHandle]>,
    tree: SupervisorRef,
    draining: Draining,
}

impl AdminState {
    /// The state of one gateway.
    pub fn new(
        router: Router,
        backends: Vec<BackendHandle>,
        tree: SupervisorRef,
        draining: Draining,
    ) -> Self {
        AdminState {
            router,
            backends: backends.into(),
            tree,
            draining,
        }
    }
}

/// A running admin server.
pub struct AdminServer {
    handle: ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    addr: Option<SocketAddr>,
}

impl AdminServer {
    /// Starts serving on `listener`, on its own worker threads, driven from
    /// the current tokio runtime.
    pub fn start(listener: std::net::TcpListener, state: AdminState) -> std::io::Result<Self> {
        let addr = listener.local_addr().ok();
        let data = web::Data::new(state);
        let server: Server = HttpServer::new(move || app(data.clone()))
            .workers(WORKERS)
            // Prism's signal handler starts the drain; actix's would stop
            // this server at once, probes and metrics included.
            .disable_signals()
            .shutdown_timeout(STOP_TIMEOUT_SECS)
            .listen(listener)?
            .run();
        let handle = server.handle();
        let task = tokio::spawn(server);
        if let Some(addr) = addr {
            info!(http_addr = %addr, workers = WORKERS, "admin plane serving");
        }
        Ok(AdminServer { handle, task, addr })
    }

    /// The address served on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// Stops accepting, lets open requests finish (briefly), then returns.
    pub async fn stop(self) {
        self.handle.stop(true).await;
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "admin plane stopped with an error"),
            Err(e) => warn!(error = %e, "admin plane task failed"),
        }
        info!("admin plane stopped");
    }
}

fn app(
    data: web::Data<AdminState>,
) -> App<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .app_data(data)
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics))
        .route("/v1/actors", web::get().to(actors))
        .route("/v1/namespaces", web::get().to(namespaces))
        .service(
            web::resource("/v1/kv/{namespace}")
                .route(web::get().to(kv_scan))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            // `(?s)`-style matching is the router's default, so a key may
            // hold any character, `/` and newlines included.
            web::resource("/v1/kv/{namespace}/{key:.*}")
                .route(web::get().to(kv_get))
                .route(web::head().to(kv_exists))
                .route(web::put().to(kv_put))
                .route(web::delete().to(kv_delete))
                .default_service(web::to(method_not_allowed)),
        )
        .default_service(web::to(not_found))
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    http_error(
        StatusCode::NOT_FOUND,
        Code::NotFound,
        &format!("no endpoint at {}", req.path()),
    )
}

async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    http_error(
        StatusCode::METHOD_NOT_ALLOWED,
        Code::Unimplemented,
        &format!("{} is not allowed on {}", req.method(), req.path()),
    )
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// One backend as readiness sees it.
#[derive(Serialize)]
struct BackendReadiness {
    name: String,
    kind: &'static str,
    ready: bool,
    up: bool,
    circuit: &'static str,
    health_failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
}

fn backend_readiness(b: &BackendHandle) -> BackendReadiness {
    let up = b.health.is_up();
    let circuit = b.health.circuit();
    let ready = up && circuit == Circuit::Closed;
    BackendReadiness {
        name: b.name.clone(),
        kind: b.kind,
        ready,
        up,
        circuit: circuit.as_str(),
        health_failures: b.health.failures(),
        last_error: if ready { None } else { b.health.last_error() },
    }
}

async fn readyz(state: web::Data<AdminState>) -> HttpResponse {
    let draining = state.draining.is_draining();
    let backends: Vec<BackendReadiness> = state.backends.iter().map(backend_readiness).collect();
    let mut reasons = Vec::new();
    if draining {
        reasons.push("draining: shutdown in progress".to_owned());
    }
    for b in backends.iter().filter(|b| !b.ready) {
        let why = if !b.up {
            "is down"
        } else if b.circuit == Circuit::Open.as_str() {
            "has its circuit breaker open"
        } else {
            "has its circuit breaker half-open (probing)"
        };
        let mut reason = format!("backend '{}' {why}", b.name);
        if let Some(e) = &b.last_error {
            reason.push_str(": ");
            reason.push_str(e);
        }
        reasons.push(reason);
    }
    let ready = reasons.is_empty();
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not_ready" },
        "draining": draining,
        "reasons": reasons,
        "backends": backends,
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Refreshes the scrape-time series (tree, backends, sessions) and renders.
async fn metrics(state: web::Data<AdminState>) -> HttpResponse {
    let m = state.router.metrics();
    if let Some(tree) = state.tree.snapshot() {
        m.observe_tree(&tree);
    }
    for b in state.backends.iter() {
        m.observe_backend(&b.name, b.health.is_up(), b.health.connections());
    }
    m.observe_sessions(state.router.sessions().len());
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(m.render())
}

/// One node of the tree, as JSON.
#[derive(Serialize)]
struct ActorNode {
    name: String,
    id: u64,
    parent: Option<u64>,
    supervisor: bool,
    state: &'static str,
    restarts: u32,
    mailbox_depth: usize,
    mailbox_capacity: usize,
    children: Vec<ActorNode>,
}

impl From<&ActorInfo> for ActorNode {
    fn from(a: &ActorInfo) -> Self {
        ActorNode {
            name: a.name.clone(),
            id: a.id,
            parent: a.parent,
            supervisor: a.supervisor,
            state: a.state.as_str(),
            restarts: a.restarts,
            mailbox_depth: a.mailbox_depth,
            mailbox_capacity: a.mailbox_capacity,
            children: a.children.iter().map(ActorNode::from).collect(),
        }
    }
}

async fn actors(state: web::Data<AdminState>) -> HttpResponse {
    match state.tree.snapshot() {
        Some(tree) => HttpResponse::Ok().json(ActorNode::from(&tree)),
        None => http_error(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Unavailable,
            "the supervision tree has stopped",
        ),
    }
}

#[derive(Serialize)]
struct NamespaceInfo {
    name: String,
    backend: String,
    kind: &'static str,
    timeout_ms: u64,
    max_value_size: usize,
    /// `null` when keys without a TTL never expire.
    default_ttl_ms: Option<u64>,
    health: Option<BackendReadiness>,
}

async fn namespaces(state: web::Data<AdminState>) -> HttpResponse {
    let list: Vec<NamespaceInfo> = state
        .router
        .namespaces()
        .map(|ns| {
            let backend = state
                .backends
                .iter()
                .find(|b| b.name == ns.settings.backend);
            NamespaceInfo {
                name: ns.name.to_string(),
                backend: ns.settings.backend.clone(),
                kind: backend.map_or("unknown", |b| b.kind),
                timeout_ms: ns.settings.timeout.as_millis() as u64,
                max_value_size: ns.settings.max_value_size,
                default_ttl_ms: ns.settings.default_ttl.map(|t| t.as_millis() as u64),
                health: backend.map(backend_readiness),
            }
        })
        .collect();
    HttpResponse::Ok().json(serde_json::json!({ "namespaces": list }))
}

// ---- REST key-value API ----

/// Who is asking and for how long: the same rules as gRPC.
struct Caller {
    client: String,
    timeout: Option<Duration>,
}

fn caller(req: &HttpRequest) -> Caller {
    let client = req
        .headers()
        .get(CLIENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .or_else(|| req.peer_addr().map(|a| a.to_string()))
        .unwrap_or_else(|| "unknown".to_owned());
    let timeout = req
        .headers()
        .get(TIMEOUT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    Caller { client, timeout }
}

/// The namespace and key of a `/v1/kv/{namespace}[/{key}]` request, each
/// percent-decoded exactly once from the raw path. The router's own
/// decoding keeps `%2F` encoded and replaces invalid UTF-8, so the key is
/// taken from the raw path instead: `a%2Fb` is the key `a/b`, `%25` is `%`,
/// and bytes that are not UTF-8 are a 400 rather than a different key.
fn kv_path(req: &HttpRequest) -> (String, Result<Option<String>, ApiError>) {
    let rest = req.uri().path().strip_prefix(KV_PREFIX).unwrap_or_default();
    let (ns_raw, key_raw) = match rest.split_once('/') {
        Some((ns, key)) => (ns, Some(key)),
        None => (rest, None),
    };
    let decode = |raw: &str, what: &str| -> Result<String, ApiError> {
        percent_decode_str(raw)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| ApiError::InvalidArgument(format!("{what} is not valid UTF-8")))
    };
    match decode(ns_raw, "namespace") {
        Err(e) => (String::new(), Err(e)),
        Ok(ns) => {
            let key = key_raw.map(|k| decode(k, "key")).transpose();
            (ns, key)
        }
    }
}

/// Runs one REST key-value request in a span like gRPC's, records it in the
/// request metrics under the code its gRPC twin would have, and turns an
/// error into its JSON response.
async fn metered<F>(
    state: &AdminState,
    namespace: &str,
    op: &'static str,
    client: &str,
    work: F,
) -> HttpResponse
where
    F: std::future::Future<Output = Result<HttpResponse, ApiError>>,
{
    let started = Instant::now();
    let span =
        tracing::info_span!("request", namespace = %namespace, op, session = %client, api = "rest");
    let res = work.instrument(span).await;
    let code = match &res {
        Ok(_) => Code::Ok,
        Err(e) => e.code(),
    };
    state.router.observe(namespace, op, code, started);
    match res {
        Ok(r) => r,
        Err(e) => {
            debug!(namespace, op, session = %client, code = ?e.code(), error = %e, "request failed");
            actix_web::ResponseError::error_response(&e)
        }
    }
}

/// The common first steps: not draining, a known namespace, a valid key.
fn admit<'a>(
    state: &'a AdminState,
    namespace: &str,
    key: Result<Option<String>, ApiError>,
) -> Result<(&'a Namespace, String), ApiError> {
    if state.draining.is_draining() {
        return Err(ApiError::Unavailable("server is draining".into()));
    }
    let key = key?.unwrap_or_default();
    let ns = state.router.namespace(namespace)?;
    validate_key(&key)?;
    Ok((ns, key))
}

fn unexpected(op: &str) -> ApiError {
    error!(op, "backend answered with the outcome of another operation");
    ApiError::Internal
}

fn key_not_found(ns: &Namespace, key: &str) -> HttpResponse {
    http_error(
        StatusCode::NOT_FOUND,
        Code::NotFound,
        &format!("key '{key}' not found in namespace '{}'", ns.name),
    )
}

async fn kv_get(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    let Caller { client, timeout } = caller(&req);
    let (namespace, key) = kv_path(&req);
    metered(&state, &namespace, "get", &client, async {
        let (ns, key) = admit(&state, &namespace, key)?;
        let op = Op::Get { key: key.clone() };
        match state.router.call(&client, ns, op, timeout).await? {
            Outcome::Get(Some(r)) => {
                let ttl_ms = match r.ttl {
                    // A live key with under 1 ms left still reads as live.
                    Some(t) => (t.as_millis() as i64).max(1),
                    None => -1,
                };
                Ok(HttpResponse::Ok()
                    .content_type("application/octet-stream")
                    .insert_header((TTL_HEADER, HeaderValue::from(ttl_ms)))
                    .body(r.value))
            }
            Outcome::Get(None) => Ok(key_not_found(ns, &key)),
            _ => Err(unexpected("get")),
        }
    })
    .await
}

async fn kv_exists(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    let Caller { client, timeout } = caller(&req);
    let (namespace, key) = kv_path(&req);
    metered(&state, &namespace, "exists", &client, async {
        let (ns, key) = admit(&state, &namespace, key)?;
        match state
            .router
            .call(&client, ns, Op::Exists { key }, timeout)
            .await?
        {
            Outcome::Exists(true) => Ok(HttpResponse::Ok().finish()),
            Outcome::Exists(false) => Ok(HttpResponse::NotFound().finish()),
            _ => Err(unexpected("exists")),
        }
    })
    .await
}

#[derive(Deserialize)]
struct PutQuery {
    /// Time to live; absent or 0 means the namespace's `default_ttl`.
    #[serde(default)]
    ttl_ms: u64,
}

async fn kv_put(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AdminState>,
) -> HttpResponse {
    let Caller { client, timeout } = caller(&req);
    let (namespace, key) = kv_path(&req);
    metered(&state, &namespace, "put", &client, async {
        let (ns, key) = admit(&state, &namespace, key)?;
        let query = web::Query::<PutQuery>::from_query(req.query_string())
            .map_err(|e| ApiError::InvalidArgument(format!("ttl_ms: {e}")))?;
        let value = read_value(&req, payload, ns).await?;
        let ttl = put_ttl(ns, query.ttl_ms);
        match state
            .router
            .call(&client, ns, Op::Put { key, value, ttl }, timeout)
            .await?
        {
            Outcome::Put => Ok(HttpResponse::NoContent().finish()),
            _ => Err(unexpected("put")),
        }
    })
    .await
}

/// Reads a PUT body as the value. The size is checked against the
/// namespace's `max_value_size` by the same rule as gRPC; an over-long body
/// is still read to its end (up to [`MAX_BODY_READ`]) so that the client
/// gets the 413 rather than a connection reset while it is still sending.
async fn read_value(
    req: &HttpRequest,
    mut payload: web::Payload,
    ns: &Namespace,
) -> Result<Bytes, ApiError> {
    let limit = ns.settings.max_value_size;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let mut value = BytesMut::with_capacity(declared.unwrap_or(0).min(limit));
    let mut total = 0usize;
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::InvalidArgument(format!("cannot read the request body: {e}")))?;
        total = total.saturating_add(chunk.len());
        if total <= limit {
            value.extend_from_slice(&chunk);
        } else if total > MAX_BODY_READ {
            break;
        }
    }
    validate_value_size(ns, declared.unwrap_or(0).max(total))?;
    Ok(value.freeze())
}

async fn kv_delete(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    let Caller { client, timeout } = caller(&req);
    let (namespace, key) = kv_path(&req);
    metered(&state, &namespace, "delete", &client, async {
        let (ns, key) = admit(&state, &namespace, key)?;
        match state
            .router
            .call(&client, ns, Op::Delete { key }, timeout)
            .await?
        {
            Outcome::Delete(existed) => {
                Ok(HttpResponse::Ok().json(serde_json::json!({ "existed": existed })))
            }
            _ => Err(unexpected("delete")),
        }
    })
    .await
}

#[derive(Deserialize)]
struct ScanQuery {
    #[serde(default)]
    prefix: String,
    /// Page size: 0 or absent for the default (100), at most 1000.
    #[serde(default)]
    limit: u32,
    /// A `next_cursor` of an earlier page.
    #[serde(default)]
    cursor: String,
    #[serde(default)]
    keys_only: bool,
}

#[derive(Serialize)]
struct ScanItem {
    key: String,
    /// Standard base64; absent with `keys_only`.
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
}

async fn kv_scan(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    let Caller { client, timeout } = caller(&req);
    let (namespace, _) = kv_path(&req);
    metered(&state, &namespace, "scan", &client, async {
        if state.draining.is_draining() {
            return Err(ApiError::Unavailable("server is draining".into()));
        }
        let ns = state.router.namespace(&namespace)?;
        let q = web::Query::<ScanQuery>::from_query(req.query_string())
            .map_err(|e| ApiError::InvalidArgument(format!("scan query: {e}")))?
            .into_inner();
        let op = scan_op(q.prefix, q.limit, &q.cursor, q.keys_only)?;
        match state.router.call(&client, ns, op, timeout).await? {
            Outcome::Scan { items, more } => {
                let next_cursor = match (more, items.last()) {
                    (true, Some(last)) => service::encode_cursor(&last.key),
                    _ => String::new(),
                };
                let b64 = base64::engine::general_purpose::STANDARD;
                let items: Vec<ScanItem> = items
                    .into_iter()
                    .map(|i| ScanItem {
                        key: i.key,
                        value: (!q.keys_only).then(|| b64.encode(&i.value)),
                    })
                    .collect();
                Ok(HttpResponse::Ok().json(serde_json::json!({
                    "items": items,
                    "next_cursor": next_cursor,
                })))
            }
            _ => Err(unexpected("scan")),
        }
    })
    .await
}
