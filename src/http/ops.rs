//! Operations endpoints: `GET /healthz` (200 while the process runs),
//! `GET /readyz` (200 when serving and every backend is up with its circuit
//! closed; else 503 with a JSON body saying which backend and why),
//! `GET /metrics` (Prometheus text), `GET /v1/actors` (the supervision tree)
//! and `GET /v1/namespaces` (each namespace, its backend, settings and
//! health). The probes answer `HEAD` too (same status, no body); other
//! methods get 405 with an `Allow` header.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use prism_actors::ActorInfo;
use serde::Serialize;
use tonic::Code;

use super::{error_response, http_error, method_not_allowed, AdminState};
use crate::error::ApiError;
use crate::pool::{BackendHandle, Circuit};

/// Registers the endpoints.
pub fn routes(cfg: &mut web::ServiceConfig) {
    // A probe asked with HEAD (as some load balancers do) gets the status
    // of the GET; actix leaves the body out.
    cfg.service(
        web::resource("/healthz")
            .route(web::get().to(healthz))
            .route(web::head().to(healthz))
            .default_service(web::to(method_not_allowed("GET, HEAD"))),
    )
    .service(
        web::resource("/readyz")
            .route(web::get().to(readyz))
            .route(web::head().to(readyz))
            .default_service(web::to(method_not_allowed("GET, HEAD"))),
    );
    for (path, handler) in [
        ("/metrics", web::get().to(metrics)),
        ("/v1/actors", web::get().to(actors)),
        ("/v1/namespaces", web::get().to(namespaces)),
    ] {
        cfg.service(
            web::resource(path)
                .route(handler)
                .default_service(web::to(method_not_allowed("GET"))),
        );
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// One backend as readiness sees it.
#[derive(Serialize)]
struct BackendReadiness {
    name: String,
    kind: String,
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
        kind: b.kind.clone(),
        ready,
        up,
        circuit: circuit.as_str(),
        health_failures: b.health.failures(),
        last_error: if ready { None } else { b.health.last_error() },
    }
}

async fn readyz(state: web::Data<AdminState>) -> HttpResponse {
    let draining = state.core.draining().is_draining();
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

/// Admin endpoints answer only an admin principal (anyone with
/// authentication off).
fn admin_only(
    req: &HttpRequest,
    state: &AdminState,
    endpoint: &'static str,
) -> Result<(), ApiError> {
    state
        .core
        .authorize_admin(&super::credentials(req), endpoint)
}

/// Refreshes the scrape-time series (tree, backends, sessions) and renders.
async fn metrics(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Err(e) = admin_only(&req, &state, "metrics") {
        return error_response(&e);
    }
    let m = state.core.metrics();
    if let Some(tree) = state.tree.snapshot() {
        m.observe_tree(&tree);
    }
    for b in state.backends.iter() {
        m.observe_backend(&b.name, b.health.is_up(), b.health.connections());
        m.observe_purge(&b.name, b.health.purge_leader(), b.health.purges());
    }
    m.observe_sessions(state.core.sessions().len());
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

async fn actors(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Err(e) = admin_only(&req, &state, "actors") {
        return error_response(&e);
    }
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
    kind: String,
    timeout_ms: u64,
    max_value_size: usize,
    /// `null` when keys without a TTL never expire.
    default_ttl_ms: Option<u64>,
    health: Option<BackendReadiness>,
}

async fn namespaces(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if let Err(e) = admin_only(&req, &state, "namespaces") {
        return error_response(&e);
    }
    let list: Vec<NamespaceInfo> = state
        .core
        .namespaces()
        .map(|ns| {
            let backend = state
                .backends
                .iter()
                .find(|b| b.name == ns.settings.backend);
            NamespaceInfo {
                name: ns.name.to_string(),
                backend: ns.settings.backend.clone(),
                kind: backend.map_or_else(|| "unknown".to_owned(), |b| b.kind.clone()),
                timeout_ms: ns.settings.timeout.as_millis() as u64,
                max_value_size: ns.settings.max_value_size,
                default_ttl_ms: ns.settings.default_ttl.map(|t| t.as_millis() as u64),
                health: backend.map(backend_readiness),
            }
        })
        .collect();
    HttpResponse::Ok().json(serde_json::json!({ "namespaces": list }))
}
