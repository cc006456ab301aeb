//! Backends: the storage behind a pool actor. Every backend gives the same
//! semantics (upsert, TTL, idempotent delete, ordered prefix scan with a
//! cursor), so a namespace can move between them without its clients noticing.

#[cfg(test)]
pub(crate) mod conformance;
pub mod memory;
pub mod postgres;
pub mod redis;
pub mod sqlite;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

/// A boxed, sendable future: what backend methods return, so that backends
/// can be used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Errors of a backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend cannot be reached or refused the operation for now
    /// (connection lost, pool exhausted, server shutting down).
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The operation did not finish before its deadline.
    #[error("backend operation timed out")]
    Timeout,
    /// The backend failed in a way a retry will not fix.
    #[error("backend failure: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut => Error::Unavailable("connection pool timed out".into()),
            sqlx::Error::PoolClosed => Error::Unavailable("connection pool closed".into()),
            sqlx::Error::Io(e) => Error::Unavailable(format!("i/o: {e}")),
            sqlx::Error::Tls(e) => Error::Unavailable(format!("tls: {e}")),
            sqlx::Error::WorkerCrashed => Error::Unavailable("database worker crashed".into()),
            sqlx::Error::Database(db) if is_transient(db.code().as_deref()) => {
                Error::Unavailable(db.to_string())
            }
            other => Error::Internal(other.to_string()),
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
    /// byte order.
    Scan {
        /// The prefix; empty for every key.
        prefix: String,
        /// Continue after this key.
        after: Option<String>,
        /// Page size, at least 1.
        limit: usize,
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

/// One step of an SQL backend's schema. Applied steps are recorded in a
/// version table; a new step is appended with the next version and never
/// edits an applied one.
pub(crate) struct Migration {
    pub(crate) version: i64,
    pub(crate) name: &'static str,
    pub(crate) statements: &'static [&'static str],
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

/// The smallest string greater than every string that starts with `prefix`,
/// or `None` when no such bound exists (empty prefix, or only `char::MAX`).
/// Used as the exclusive upper bound of an index range scan.
pub fn prefix_successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let mut next = last as u32 + 1;
        // Skip the surrogate range, which no `char` occupies.
        if (0xD800..=0xDFFF).contains(&next) {
            next = 0xE000;
        }
        if let Some(c) = char::from_u32(next) {
            chars.push(c);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::prefix_successor;

    #[test]
    fn prefix_successor_bounds_every_key_with_the_prefix() {
        assert_eq!(prefix_successor("ab").as_deref(), Some("ac"));
        assert_eq!(prefix_successor(""), None);
        assert_eq!(prefix_successor("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_successor("\u{D7FF}").as_deref(), Some("\u{E000}"));
        let p = "user/";
        let s = prefix_successor(p).unwrap();
        for k in [
            "user/",
            "user/\u{10FFFF}\u{10FFFF}",
            "user/zzz",
            "user/\u{7F}",
        ] {
            assert!(
                k.as_bytes() >= p.as_bytes() && k.as_bytes() < s.as_bytes(),
                "{k}"
            );
        }
        assert!("user0".as_bytes() >= s.as_bytes());
    }
}
