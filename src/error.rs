//! The errors a request can end with, and the one place they become gRPC
//! statuses.

use tonic::{Code, Status};

/// Why a request failed, in terms a client can act on. Internal causes are
/// logged where they happen; only the text here reaches the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// A field of the request is invalid; the text names it.
    #[error("{0}")]
    InvalidArgument(String),
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
    /// The client went away; nobody reads this answer.
    #[error("request cancelled by the client")]
    Cancelled,
    /// A failure the client cannot fix; details are in the server log.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::UnknownNamespace(_) => Code::NotFound,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::Cancelled => Code::Cancelled,
            ApiError::Internal => Code::Internal,
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}
