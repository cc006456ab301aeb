//! The admin plane: an HTTP server (actix-web) beside the gRPC server, on
//! `server.http_addr`. Two jobs, one file each:
//!
//! - [`ops`]: probes, metrics, the actor tree and the namespaces;
//! - [`rest`]: the key-value API over REST, a thin adapter over the request
//!   core like the gRPC service.
//!
//! Errors are `{"code", "message"}` JSON; [`error_response`] is the one
//! place an [`ApiError`] becomes an HTTP status. Errors that actix itself
//! answers inside the app (an extractor or payload error, a handler's
//! actix error) get the same body from [`json_errors`].
//!
//! actix runs each worker on its own thread and single-threaded runtime.
//! Handlers therefore only talk to actors (through the core's addresses and
//! channels, which work across runtimes); nothing here opens a backend
//! connection. actix's own signal handling is off: the gateway's one
//! shutdown path stops this server after the drain has ended, so probes and
//! metrics answer throughout the drain.

pub mod ops;
pub mod rest;

use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::body::BoxBody;
use actix_web::dev::{Server, ServerHandle, ServiceResponse};
use actix_web::http::header;
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::{ErrorHandlerResponse, ErrorHandlers};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use prism_actors::SupervisorRef;
use tonic::Code;
use tracing::{info, warn};

use crate::auth::Credentials;
use crate::error::{code_name, ApiError};
use crate::kv::Core;
use crate::pool::BackendHandle;

/// Worker threads of the HTTP server. Each has its own runtime; handlers
/// only await actor replies, so two are plenty.
const WORKERS: usize = 2;

/// Seconds the stop waits for open connections once the drain is over:
/// every key-value request has been answered by then, so what is left is
/// idle keep-alive connections and probes.
const STOP_TIMEOUT_SECS: u64 = 1;

/// What the admin handlers read: the request core (namespaces, sessions,
/// metrics, drain flag), the backends' health and the live tree.
#[derive(Clone)]
pub struct AdminState {
    core: Core,
    backends: Arc<[BackendHandle]>,
    tree: SupervisorRef,
}

impl AdminState {
    /// The state of one gateway.
    pub fn new(core: Core, backends: Vec<BackendHandle>, tree: SupervisorRef) -> Self {
        AdminState {
            core,
            backends: backends.into(),
            tree,
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
    /// the current tokio runtime. With `tls`, only TLS is served (HTTPS),
    /// and the common name of a verified client certificate is in each
    /// request's connection data as a [`crate::tls::PeerCommonName`].
    pub fn start(
        listener: std::net::TcpListener,
        state: AdminState,
        tls: Option<&crate::tls::ServerCerts>,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr().ok();
        let data = web::Data::new(state);
        let server = HttpServer::new(move || {
            App::new()
                .wrap(ErrorHandlers::new().default_handler(json_errors))
                .app_data(data.clone())
                .configure(ops::routes)
                .configure(rest::routes)
                .default_service(web::to(not_found))
        })
        .workers(WORKERS)
        // Prism's signal handler starts the drain; actix's would stop
        // this server at once, probes and metrics included.
        .disable_signals()
        .shutdown_timeout(STOP_TIMEOUT_SECS)
        .on_connect(crate::tls::stash_peer_common_name);
        let server: Server = match tls {
            Some(certs) => server.listen_rustls_0_23(listener, certs.http_config())?,
            None => server.listen(listener)?,
        }
        .run();
        let handle = server.handle();
        let task = tokio::spawn(server);
        if let Some(addr) = addr {
            info!(http_addr = %addr, workers = WORKERS, tls = tls.is_some(), "admin plane serving");
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

/// An HTTP error with the JSON body every error has:
/// `{"code": "<gRPC code name>", "message": "..."}`, so that REST and gRPC
/// clients see the same codes.
pub fn http_error(status: StatusCode, code: Code, message: &str) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({
        "code": code_name(code),
        "message": message,
    }))
}

/// The HTTP status of an [`ApiError`]: 400 invalid, 404 unknown namespace
/// or missing key, 413 value too large, 429 exhausted, 503 unavailable,
/// 504 deadline, 401 unauthenticated, 403 permission denied, 500 internal.
pub fn status_of(e: &ApiError) -> StatusCode {
    match e {
        ApiError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        ApiError::UnknownNamespace(_) | ApiError::KeyNotFound { .. } => StatusCode::NOT_FOUND,
        ApiError::ValueTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        ApiError::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
        ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        ApiError::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
        ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        ApiError::PermissionDenied(_) => StatusCode::FORBIDDEN,
        ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An [`ApiError`] as its JSON response; a 401 says how to authenticate
/// (`WWW-Authenticate: Bearer`).
pub fn error_response(e: &ApiError) -> HttpResponse {
    let mut response = http_error(status_of(e), e.code(), &e.to_string());
    if matches!(e, ApiError::Unauthenticated(_)) {
        response.headers_mut().insert(
            actix_web::http::header::WWW_AUTHENTICATE,
            actix_web::http::header::HeaderValue::from_static("Bearer realm=\"prism\""),
        );
    }
    response
}

/// What a request presented to authenticate: its `Authorization` header,
/// and the CN of its verified client certificate (mTLS).
pub fn credentials(req: &HttpRequest) -> Credentials {
    let authorization = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let cn = req
        .conn_data::<crate::tls::PeerCommonName>()
        .map(|cn| cn.0.clone());
    Credentials::new(authorization, cn)
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    http_error(
        StatusCode::NOT_FOUND,
        Code::NotFound,
        &format!("no endpoint at {}", req.path()),
    )
}

/// The handler of a resource's other methods: 405 with an `Allow` header
/// listing `allowed`.
fn method_not_allowed(
    allowed: &'static str,
) -> impl Fn(HttpRequest) -> std::future::Ready<HttpResponse> + Clone + 'static {
    move |req: HttpRequest| {
        let mut res = http_error(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::Unimplemented,
            &format!(
                "{} is not allowed on {}; allowed: {allowed}",
                req.method(),
                req.path()
            ),
        );
        res.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static(allowed));
        std::future::ready(res)
    }
}

/// The gRPC code an HTTP error status stands for, for errors that did not
/// start as an [`ApiError`].
fn code_of_status(status: StatusCode) -> Code {
    match status {
        StatusCode::NOT_FOUND => Code::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => Code::Unimplemented,
        StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => Code::DeadlineExceeded,
        StatusCode::TOO_MANY_REQUESTS => Code::ResourceExhausted,
        StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        s if s.is_client_error() => Code::InvalidArgument,
        _ => Code::Internal,
    }
}

/// Gives an error response that is not JSON yet (one actix made: a
/// payload or extractor error, a handler's actix error) the documented
/// `{"code", "message"}` body, keeping its status and its headers. HEAD
/// answers have no body and are left alone.
fn json_errors<B>(res: ServiceResponse<B>) -> actix_web::Result<ErrorHandlerResponse<B>> {
    let is_json = res
        .response()
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || res.request().method() == Method::HEAD {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let status = res.status();
    let message = match res.response().error() {
        Some(e) => e.to_string(),
        None => status.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    let (req, old) = res.into_parts();
    let mut new: HttpResponse<BoxBody> = http_error(status, code_of_status(status), &message);
    for (name, value) in old.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            new.headers_mut().append(name.clone(), value.clone());
        }
    }
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(req, new).map_into_right_body::<B>(),
    ))
}

#[cfg(test)]
mod tests {
    use actix_web::test::{call_service, init_service, read_body_json, TestRequest};

    use super::*;

    #[actix_web::test]
    async fn errors_actix_makes_get_the_json_body() {
        let app = init_service(
            App::new()
                .wrap(ErrorHandlers::new().default_handler(json_errors))
                .route(
                    "/fails",
                    web::get().to(|| async {
                        Err::<HttpResponse, _>(actix_web::error::ErrorBadRequest(
                            "query: bad digit",
                        ))
                    }),
                ),
        )
        .await;
        let res = call_service(&app, TestRequest::get().uri("/fails").to_request()).await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        let body: serde_json::Value = read_body_json(res).await;
        assert_eq!(body["code"], "INVALID_ARGUMENT");
        assert_eq!(body["message"], "query: bad digit");
        let res = call_service(&app, TestRequest::get().uri("/nothing").to_request()).await;
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        let body: serde_json::Value = read_body_json(res).await;
        assert_eq!(body["code"], "NOT_FOUND");
    }
}
