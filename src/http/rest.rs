//! The key-value API over REST, with the gRPC semantics: every rule is the
//! request core's; this file converts paths, queries, headers and bodies.
//!
//! - `GET /v1/kv/{namespace}/{key}`: the raw value, `x-prism-ttl-ms`; 404
//!   when missing.
//! - `HEAD /v1/kv/{namespace}/{key}`: exists, 200 or 404, without a
//!   `content-length` (the value is not read, so no length is claimed).
//! - `PUT /v1/kv/{namespace}/{key}?ttl_ms=`: the body is the value; 204.
//!   An HTTP/1.0 PUT must send `Content-Length` (else 411): without it the
//!   body's end cannot be told and an empty value would be stored.
//! - `DELETE /v1/kv/{namespace}/{key}`: `{"existed": bool}`.
//! - `GET /v1/kv/{namespace}?prefix=&limit=&cursor=&keys_only=`: a page.
//!
//! Keys are percent-encoded path tails (`a%2Fb` and `a/b` are both `a/b`).
//! Query values must be UTF-8 after percent-decoding (`prefix=%FF` is a
//! 400). A body is read as it arrives, never allocated ahead from the
//! declared `Content-Length`, and within the request's deadline: a body
//! still arriving when it passes ends the request with 504.

use actix_web::body;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{StatusCode, Version};
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine;
use bytes::{Bytes, BytesMut};
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;

use super::{error_response, http_error, method_not_allowed, AdminState};
use crate::error::ApiError;
use crate::kv::caller::{CLIENT_ID, TIMEOUT};
use crate::kv::{ttl_ms, Api, Caller, Core, ScanParams, ValueLimit};
use crate::settings::MAX_VALUE_SIZE_LIMIT;

/// The response header of a GET that carries the key's remaining time to
/// live in milliseconds, `-1` when it has no expiry (as gRPC's `ttl_ms`).
pub const TTL_HEADER: &str = "x-prism-ttl-ms";

/// The key-value routes' prefix.
const KV_PREFIX: &str = "/v1/kv/";

/// A body is read at most this far: past the largest legal value (plus room
/// for the rest of a request), the rest is not worth reading to produce a
/// clean 413, and the connection is closed instead.
const MAX_BODY_READ: usize = MAX_VALUE_SIZE_LIMIT + 64 * 1024;

/// Registers the routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/kv/{namespace}")
            .route(web::get().to(scan))
            .default_service(web::to(method_not_allowed("GET"))),
    )
    .service(
        // `(?s)`-style matching is the router's default, so a key may
        // hold any character, `/` and newlines included.
        web::resource("/v1/kv/{namespace}/{key:.*}")
            .route(web::get().to(get))
            .route(web::head().to(exists))
            .route(web::put().to(put))
            .route(web::delete().to(delete))
            .default_service(web::to(method_not_allowed("GET, HEAD, PUT, DELETE"))),
    );
}

/// The caller of a request to `namespace`; one whose headers are refused
/// is counted through the core.
fn caller(
    req: &HttpRequest,
    core: &Core,
    namespace: &str,
    op: &'static str,
) -> Result<Caller, ApiError> {
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let (id, peer) = (header(CLIENT_ID), req.peer_addr());
    Caller::new(Api::Rest, id, peer, header(TIMEOUT))
        .map(|c| c.with_credentials(super::credentials(req)))
        .map_err(|e| core.refuse(&Caller::identify(Api::Rest, id, peer), namespace, op, e))
}

/// The namespace and key of a `/v1/kv/{namespace}[/{key}]` request, each
/// percent-decoded exactly once from the raw path. The router's own
/// decoding keeps `%2F` encoded and replaces invalid UTF-8, so the key is
/// taken from the raw path instead: `a%2Fb` is the key `a/b`, `%25` is `%`,
/// and bytes that are not UTF-8 are a 400 rather than a different key.
struct KvPath {
    namespace: String,
    key: Result<String, ApiError>,
}

fn kv_path(req: &HttpRequest) -> Result<KvPath, ApiError> {
    let rest = req.uri().path().strip_prefix(KV_PREFIX).unwrap_or_default();
    let (ns_raw, key_raw) = rest.split_once('/').unwrap_or((rest, ""));
    let decode = |raw: &str, what: &str| -> Result<String, ApiError> {
        percent_decode_str(raw)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| ApiError::InvalidArgument(format!("{what} is not valid UTF-8")))
    };
    Ok(KvPath {
        namespace: decode(ns_raw, "namespace")?,
        key: decode(key_raw, "key"),
    })
}

/// Checks that every name and value of a query string is UTF-8 after
/// percent-decoding (`+` is a space). The query deserializer would replace
/// bad bytes silently, so that `prefix=%FF` scanned for U+FFFD.
fn query_utf8(query: &str) -> Result<(), ApiError> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |raw: &str| {
            let raw = raw.replace('+', " ");
            percent_decode_str(&raw).decode_utf8().is_ok()
        };
        let name_ok = decode(name);
        if !name_ok || !decode(value) {
            let shown = percent_decode_str(name).decode_utf8_lossy().into_owned();
            return Err(ApiError::InvalidArgument(format!(
                "query parameter '{}' is not valid UTF-8 after percent-decoding",
                crate::error::echo(&shown)
            )));
        }
    }
    Ok(())
}

/// Runs `op` with the caller, namespace and key of `req`; a path that does
/// not decode is refused through the core, so it is counted like any
/// failed request.
async fn with_key<F, Fut>(
    req: &HttpRequest,
    state: &AdminState,
    op: &'static str,
    f: F,
) -> HttpResponse
where
    F: FnOnce(Core, Caller, String, String) -> Fut,
    Fut: std::future::Future<Output = Result<HttpResponse, ApiError>>,
{
    let path = kv_path(req).and_then(|p| Ok((p.key?, p.namespace)));
    let namespace = path
        .as_ref()
        .map_or("", |(_, namespace)| namespace.as_str());
    let caller = match caller(req, &state.core, namespace, op) {
        Ok(caller) => caller,
        Err(e) => return error_response(&e),
    };
    let res = match path {
        Ok((key, namespace)) => f(state.core.clone(), caller, namespace, key).await,
        Err(e) => Err(state.core.refuse(&caller, "", op, e)),
    };
    res.unwrap_or_else(|e| error_response(&e))
}

async fn get(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    with_key(
        &req,
        &state,
        "get",
        |core, caller, namespace, key| async move {
            match core.get(&caller, &namespace, key.clone()).await? {
                Some(r) => Ok(HttpResponse::Ok()
                    .content_type("application/octet-stream")
                    .insert_header((TTL_HEADER, HeaderValue::from(ttl_ms(r.ttl))))
                    .body(r.value)),
                None => Err(ApiError::KeyNotFound { namespace, key }),
            }
        },
    )
    .await
}

async fn exists(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    with_key(
        &req,
        &state,
        "exists",
        |core, caller, namespace, key| async move {
            // No body at all rather than an empty one, so that no
            // `content-length: 0` claims an existing value is empty.
            Ok(if core.exists(&caller, &namespace, key).await? {
                HttpResponse::Ok().body(body::None::new())
            } else {
                HttpResponse::NotFound().body(body::None::new())
            })
        },
    )
    .await
}

#[derive(Deserialize)]
struct PutQuery {
    /// Time to live; absent or 0 means the namespace's `default_ttl`.
    #[serde(default)]
    ttl_ms: u64,
}

async fn put(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AdminState>,
) -> HttpResponse {
    let request = req.clone();
    with_key(
        &req,
        &state,
        "put",
        |core, caller, namespace, key| async move {
            let query = query_utf8(request.query_string()).and_then(|()| {
                web::Query::<PutQuery>::from_query(request.query_string())
                    .map_err(|e| ApiError::InvalidArgument(format!("ttl_ms: {e}")))
            });
            let query = match query {
                Ok(q) => q,
                Err(e) => return Err(core.refuse(&caller, &namespace, "put", e)),
            };
            if let Some(e) = length_required(&request) {
                core.refuse(&caller, &namespace, "put", e.clone());
                return Ok(http_error(
                    StatusCode::LENGTH_REQUIRED,
                    e.code(),
                    &e.to_string(),
                ));
            }
            core.put(&caller, &namespace, key, query.ttl_ms, |limit| {
                read_value(&request, payload, limit)
            })
            .await?;
            Ok(HttpResponse::NoContent().finish())
        },
    )
    .await
}

/// An HTTP/1.0 request with neither `Content-Length` nor
/// `Transfer-Encoding` has a body that ends when the connection does,
/// which actix does not read (it sees no body); storing an empty value
/// would lose what the client sent, so such a PUT is refused (411). In
/// HTTP/1.1 the same request has an empty body by definition.
fn length_required(req: &HttpRequest) -> Option<ApiError> {
    let headers = req.headers();
    let framed = headers.contains_key(header::CONTENT_LENGTH)
        || headers.contains_key(header::TRANSFER_ENCODING);
    (req.version() == Version::HTTP_10 && !framed).then(|| {
        ApiError::InvalidArgument(
            "an HTTP/1.0 PUT must send Content-Length (Content-Length: 0 for an empty value)"
                .into(),
        )
    })
}

/// Reads a PUT body as the value, under the namespace's limit. An
/// over-long body is still read to its end (up to [`MAX_BODY_READ`]) so
/// that the client gets the 413 rather than a connection reset while it is
/// still sending.
async fn read_value(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: ValueLimit,
) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    // Allocated as the body arrives, not from the declared length: a client
    // may declare any length and send nothing.
    let mut value = BytesMut::new();
    let mut total = 0usize;
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::InvalidArgument(format!("cannot read the request body: {e}")))?;
        total = total.saturating_add(chunk.len());
        if total <= limit.max() {
            value.extend_from_slice(&chunk);
        } else if total > MAX_BODY_READ {
            break;
        }
    }
    limit.check(declared.unwrap_or(0).max(total))?;
    Ok(value.freeze())
}

async fn delete(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    with_key(
        &req,
        &state,
        "delete",
        |core, caller, namespace, key| async move {
            let existed = core.delete(&caller, &namespace, key).await?;
            Ok(HttpResponse::Ok().json(serde_json::json!({ "existed": existed })))
        },
    )
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

async fn scan(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    let res = async {
        let namespace = kv_path(&req).map(|p| p.namespace);
        let caller = caller(
            &req,
            &state.core,
            namespace.as_deref().unwrap_or(""),
            "scan",
        )?;
        let namespace = namespace.map_err(|e| state.core.refuse(&caller, "", "scan", e))?;
        let q = query_utf8(req.query_string())
            .and_then(|()| {
                web::Query::<ScanQuery>::from_query(req.query_string())
                    .map_err(|e| ApiError::InvalidArgument(format!("scan query: {e}")))
            })
            .map_err(|e| state.core.refuse(&caller, &namespace, "scan", e))?
            .into_inner();
        let keys_only = q.keys_only;
        let params = ScanParams {
            prefix: q.prefix,
            limit: q.limit,
            cursor: q.cursor,
            keys_only,
        };
        let page = state.core.scan(&caller, &namespace, params).await?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let items: Vec<ScanItem> = page
            .items
            .into_iter()
            .map(|i| ScanItem {
                key: i.key,
                value: (!keys_only).then(|| b64.encode(&i.value)),
            })
            .collect();
        Ok(HttpResponse::Ok().json(serde_json::json!({
            "items": items,
            "next_cursor": page.next_cursor,
        })))
    }
    .await;
    res.unwrap_or_else(|e: ApiError| error_response(&e))
}
