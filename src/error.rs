//! The errors a request can end with, and the one place they become gRPC
//! statuses. (HTTP statuses are mapped once too, in [`crate::http`].)

use prism_actors::SendError;
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
    /// The namespace is not configured. The name is shown [`echo`]ed.
    #[error("unknown namespace '{}'", echo(.0))]
    UnknownNamespace(String),
    /// The key does not exist (REST answers a missing key with 404; gRPC's
    /// Get answers `found = false` instead). Both are shown [`echo`]ed.
    #[error("key '{}' not found in namespace '{}'", echo(.key), echo(.namespace))]
    KeyNotFound {
        /// The namespace.
        namespace: String,
        /// The key.
        key: String,
    },
    /// The backend is down, draining or restarting.
    #[error("{0}")]
    Unavailable(String),
    /// The request's deadline passed.
    #[error("deadline exceeded {0}")]
    DeadlineExceeded(&'static str),
    /// A limit was hit: in-flight, rate, mailbox or session count.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The caller presented no credentials, or unknown ones.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's principal may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// A failure the client cannot fix; details are in the server log.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument(_) | ApiError::ValueTooLarge(_) => Code::InvalidArgument,
            ApiError::UnknownNamespace(_) | ApiError::KeyNotFound { .. } => Code::NotFound,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::Internal => Code::Internal,
        }
    }

    /// A mailbox that refused a message: full is backpressure
    /// (RESOURCE_EXHAUSTED, naming the `setting` that sizes it); stopping or
    /// closed means the actor behind it is going away (UNAVAILABLE).
    /// `owner` names the mailbox's owner as a client would understand it.
    pub fn rejected<M>(e: &SendError<M>, owner: &str, setting: &str) -> ApiError {
        match e {
            SendError::Full(_) => {
                ApiError::ResourceExhausted(format!("{owner} is saturated: {setting} is full"))
            }
            SendError::Stopping(_) => ApiError::Unavailable(format!("{owner} is draining")),
            SendError::Closed(_) => ApiError::Unavailable(format!("{owner} is stopped")),
        }
    }
}

/// How many characters of a client-supplied value an error message shows.
pub const ECHO_CHARS: usize = 64;

/// A client-supplied value (namespace name, key, client id) as error
/// messages show it: whole when it has at most [`ECHO_CHARS`] characters,
/// else its first [`ECHO_CHARS`] characters and `…`. Every value a message
/// echoes goes through here, so that a 64 KiB name gets a small answer
/// rather than one too large for a gRPC header or a log line.
pub fn echo(value: &str) -> std::borrow::Cow<'_, str> {
    match value.char_indices().nth(ECHO_CHARS) {
        None => value.into(),
        Some((end, _)) => format!("{}…", &value[..end]).into(),
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

/// The canonical name of a gRPC code (`NOT_FOUND`), as the metrics label
/// requests and the REST API reports errors.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error and every `source()` below it, `: `-separated, for logs.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_values_are_cut_after_64_characters() {
        assert_eq!(echo("ns"), "ns");
        let exact = "ü".repeat(ECHO_CHARS);
        assert_eq!(echo(&exact), exact);
        let long = "ü".repeat(64 * 1024);
        assert_eq!(echo(&long), format!("{exact}…"));
        let e = ApiError::UnknownNamespace("n".repeat(100_000));
        assert!(e.to_string().len() < 100, "{e}");
    }
}
