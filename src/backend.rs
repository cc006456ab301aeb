//! Backends: the storage behind a pool actor. Every backend gives the same
//! semantics (upsert, TTL, idempotent delete, ordered prefix scan with a
//! cursor), so a namespace can move between them without its clients noticing.

pub mod memory;
pub mod postgres;
pub mod redis;
pub mod redis_cluster;
pub mod sqlite;
pub mod toolkit;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

/// A boxed, sendable future: what backend methods return, so that backends
/// can be used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The cause inside a backend [`Error`]: the driver's or pool's own error,
/// or a message. `"text".into()` makes one from a message.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of a backend. The variant is the classification the gateway acts
/// on (the circuit breaker counts [`Unavailable`](Error::Unavailable) and
/// [`Timeout`](Error::Timeout), clients get a status per variant); the cause
/// is kept as the error's [`source`](std::error::Error::source), so a log
/// line shows the whole chain ([`Error::chain`]) while clients get a generic
/// answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend cannot be reached or refused the operation for now
    /// (connection lost, pool exhausted, server shutting down); a retry
    /// later may succeed.
    #[error("backend unavailable")]
    Unavailable(#[source] Cause),
    /// The operation did not finish before its deadline.
    #[error("backend operation timed out")]
    Timeout,
    /// The backend failed in a way a retry will not fix.
    #[error("backend failure")]
    Internal(#[source] Cause),
}

impl Error {
    /// An [`Error::Unavailable`] caused by `cause`.
    pub fn unavailable(cause: impl Into<Cause>) -> Self {
        Error::Unavailable(cause.into())
    }

    /// An [`Error::Internal`] caused by `cause`.
    pub fn internal(cause: impl Into<Cause>) -> Self {
        Error::Internal(cause.into())
    }

    /// The error followed by each of its sources, for logs.
    pub fn chain(&self) -> ErrorChain<'_> {
        ErrorChain(self)
    }
}

/// Displays an error and each of its sources: `outer: inner: root`. A
/// source whose text the previous one already ends with (drivers often
/// repeat their cause in their own message) is not repeated.
#[derive(Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut previous = self.0.to_string();
        f.write_str(&previous)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            let text = s.to_string();
            if !previous.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            previous = text;
            source = s.source();
        }
        Ok(())
    }
}

impl fmt::Debug for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A message that explains its source, e.g. `cannot create folder /x`
/// caused by the i/o error.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct Context {
    message: String,
    #[source]
    source: Cause,
}

/// A [`Cause`] that says `message`, caused by `source`.
pub(crate) fn context(message: impl Into<String>, source: impl Into<Cause>) -> Cause {
    Box::new(Context {
        message: message.into(),
        source: source.into(),
    })
}

/// A connector setting that cannot work, found when the connector is made,
/// before anything connects. `field` names the setting (`url`, `schema`,
/// `table`, `key_prefix`, ...) so that a caller can point at its key
/// without reading the message; the message names the bad value (with any
/// password left out).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    /// The setting, as named in the backend's settings.
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    /// An error about `field`.
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        ConfigError {
            field,
            message: message.into(),
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        let transient = match &e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => is_transient(db.code().as_deref()),
            _ => false,
        };
        if transient {
            Error::Unavailable(Box::new(e))
        } else {
            Error::Internal(Box::new(e))
        }
    }
}

/// SQLite busy/locked and PostgreSQL's connection, shutdown and
/// cancellation classes are transient.
fn is_transient(code: Option<&str>) -> bool {
    match code {
        Some(c) => {
            matches!(
                c,
                "5" | "6" | "261" | "517" | "57014" | "57P01" | "57P02" | "57P03"
            ) || c.starts_with("08")
                || c.starts_with("53")
        }
        None => false,
    }
}

/// One stored value with its remaining time to live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The value bytes.
    pub value: Bytes,
    /// Remaining time to live; `None` when the key has no expiry.
    pub ttl: Option<Duration>,
}

/// One key of a scan page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The key.
    pub key: String,
    /// The value, empty when the scan asked for keys only.
    pub value: Bytes,
}

/// One key-value operation on a namespace. Keys, values and limits are
/// validated before an operation reaches a backend.
#[derive(Debug, Clone)]
pub enum Op {
    /// Read a key.
    Get {
        /// The key.
        key: String,
    },
    /// Insert or replace a key; `ttl` of `None` means no expiry.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Bytes,
        /// Time to live.
        ttl: Option<Duration>,
    },
    /// Remove a key.
    Delete {
        /// The key.
        key: String,
    },
    /// Tell whether a key exists.
    Exists {
        /// The key.
        key: String,
    },
    /// Up to `limit` keys with `prefix`, strictly after `after`, in ascending
    /// byte order, and no more key and value bytes than `max_bytes`.
    Scan {
        /// The prefix; empty for every key.
        prefix: String,
        /// Continue after this key.
        after: Option<String>,
        /// Page size, at least 1.
        limit: usize,
        /// Most key and value bytes in the page; a page holds at least one
        /// item when one matches, however large (see
        /// [`toolkit::PageBuilder`]). A backend reads no more than the page
        /// and one item, so a scan's memory is bounded by this.
        max_bytes: usize,
        /// Leave values out.
        keys_only: bool,
    },
}

impl Op {
    /// The operation's name, as used in logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Get { .. } => "get",
            Op::Put { .. } => "put",
            Op::Delete { .. } => "delete",
            Op::Exists { .. } => "exists",
            Op::Scan { .. } => "scan",
        }
    }
}

/// The result of an [`Op`], variant for variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The record, if the key exists and has not expired.
    Get(Option<Record>),
    /// The write is durable (as far as the backend promises durability).
    Put,
    /// Whether the key existed.
    Delete(bool),
    /// Whether the key exists.
    Exists(bool),
    /// The page, and whether more keys may follow it.
    Scan {
        /// Keys in ascending byte order.
        items: Vec<Item>,
        /// True when at least one more key matched after the page.
        more: bool,
    },
}

/// A connected backend. Implementations are cheap to share (`Arc`) and safe
/// to call concurrently: the pool actor runs up to its pool size of
/// operations at once.
pub trait Backend: Send + Sync + 'static {
    /// Runs one operation in `namespace`.
    fn exec<'a>(&'a self, namespace: &'a str, op: Op) -> BoxFuture<'a, Result<Outcome, Error>>;

    /// Runs one operation that is abandoned at `deadline`. The caller drops
    /// the future then, which stops the client side only: a backend whose
    /// server would keep working on a dropped request (a statement blocked on
    /// a lock, holding its connection) overrides this to bound the work on
    /// the server too, and answers [`Error::Timeout`] when the deadline
    /// passes. The default forwards to [`exec`](Backend::exec).
    fn exec_until<'a>(
        &'a self,
        namespace: &'a str,
        op: Op,
        _deadline: tokio::time::Instant,
    ) -> BoxFuture<'a, Result<Outcome, Error>> {
        self.exec(namespace, op)
    }

    /// Deletes expired entries; returns how many. Expired entries are already
    /// invisible to every operation: this only reclaims space.
    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, Error>>;

    /// Whether this backend's last [`purge_expired`](Backend::purge_expired)
    /// purged (`Some(true)`) or left purging to another Prism instance that
    /// holds the store's purge lease or lock (`Some(false)`), so that
    /// several instances over one database purge one at a time. `None`
    /// (the default): the backend purges without coordination, as a store
    /// local to one instance does.
    fn purge_leader(&self) -> Option<bool> {
        None
    }

    /// A cheap round trip proving the backend answers.
    fn health(&self) -> BoxFuture<'_, Result<(), Error>>;

    /// Closes connections; called once when the pool actor stops.
    fn close(&self) -> BoxFuture<'_, ()>;

    /// True when operations complete without waiting on I/O, so the pool
    /// actor runs them in place instead of spawning a task for each.
    fn is_inline(&self) -> bool {
        false
    }

    /// Connections in use and idle, for metrics and the actor tree.
    fn connections(&self) -> PoolStats {
        PoolStats::default()
    }
}

/// Connection pool figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections handing out work.
    pub in_use: u32,
    /// Connections waiting for work.
    pub idle: u32,
}

impl PoolStats {
    /// Figures from a pool's total and idle connection counts, as pools
    /// report them (the idle count may lag and is capped at the total).
    pub fn from_counts(size: usize, idle: usize) -> Self {
        let size = u32::try_from(size).unwrap_or(u32::MAX);
        let idle = u32::try_from(idle).unwrap_or(u32::MAX).min(size);
        PoolStats {
            in_use: size - idle,
            idle,
        }
    }
}

/// Opens a backend. A pool actor calls it at each start (and restart), so it
/// holds whatever must outlive a restart, such as the data of a memory
/// backend.
pub trait Connector: Send + Sync + 'static {
    /// The backend kind, e.g. `sqlite`.
    fn kind(&self) -> &'static str;

    /// Connects (and creates or migrates the schema).
    fn connect(&self) -> BoxFuture<'_, Result<Arc<dyn Backend>, Error>>;
}

#[cfg(test)]
mod tests {
    use super::{context, Error};

    #[test]
    fn an_error_keeps_its_causes_and_shows_them_in_its_chain() {
        let e = Error::Unavailable(context(
            "cannot reach the server",
            std::io::Error::other("connection reset"),
        ));
        assert_eq!(e.to_string(), "backend unavailable");
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(
            e.chain().to_string(),
            "backend unavailable: cannot reach the server: connection reset"
        );
        // A driver error that repeats its cause in its message shows it once,
        // and keeps its classification.
        let e = Error::from(sqlx::Error::Io(std::io::Error::other("broken pipe")));
        assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
        let chain = e.chain().to_string();
        assert!(chain.starts_with("backend unavailable: "), "{chain}");
        assert_eq!(chain.matches("broken pipe").count(), 1, "{chain}");
        let e = Error::from(sqlx::Error::RowNotFound);
        assert!(matches!(e, Error::Internal(_)), "{e:?}");
    }
}
