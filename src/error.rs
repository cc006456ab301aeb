//! The errors a request can end with, and the one place they become gRPC
//! statuses (and HTTP responses, for the admin plane's REST API).

use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use tonic::{Code, Status};

/// Why a request failed, in terms a client can act on. Internal causes are
/// logged where they happen; only the text here reaches the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// A field of the request is invalid; the text names it.
    #[error("{0}")]
    InvalidArgument(String),
    /// The value is larger than the namespace's `max_value_size`. An invalid
    /// argument to gRPC; 413 over HTTP.
    #[error("{0}")]
    ValueTooLarge(String),
    /// The namespace is not configured.
    #[error("unknown namespace '{0}'")]
    UnknownNamespace(String),
    /// The backend is down, draining or restarting.
    #[error("{0}")]
    Unavailable(String),
    /// The request's deadline passed.
    #[error("deadline exceeded {0}")]
    DeadlineExceeded(&'static str),
    /// A limit was hit: in-flight, rate, mailbox or session count.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A failure the client cannot fix; details are in the server log.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument(_) | ApiError::ValueTooLarge(_) => Code::InvalidArgument,
            ApiError::UnknownNamespace(_) => Code::NotFound,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::Internal => Code::Internal,
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

impl actix_web::ResponseError for ApiError {
    /// 400 invalid, 404 unknown namespace, 413 value too large, 429
    /// exhausted, 503 unavailable, 504 deadline; 499 (the client went away)
    /// and 500 internal.
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            ApiError::UnknownNamespace(_) => StatusCode::NOT_FOUND,
            ApiError::ValueTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        http_error(self.status_code(), self.code(), &self.to_string())
    }
}

/// An HTTP error with the JSON body every REST error has:
/// `{"code": "<gRPC code name>", "message": "..."}`, so that REST and gRPC
/// clients see the same codes.
pub fn http_error(status: StatusCode, code: Code, message: &str) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({
        "code": crate::client::code_name(code),
        "message": message,
    }))
}
