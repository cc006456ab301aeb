//! The Redis backend: values in plain string keys with native expiry, and a
//! per-namespace sorted set as the ordered index that scans walk.
//!
//! Layout, for key prefix `P` and namespace `N` (with `%`, `{` and `}`
//! percent-encoded):
//!
//! - `P:{N}:v:<key>`: the value, a string, with `PX` when the key has a TTL;
//! - `P:{N}:idx`: every key of the namespace, all with score 0, so that
//!   `ZRANGEBYLEX` walks them in bytewise order: the order scans promise;
//! - `P:namespaces`: the namespaces ever written, for purge to visit;
//! - `P:purge-lease`: the id of the backend that purges; the others skip
//!   their purges while it is set (see `PurgeLease`).
//!
//! The `{N}` hash tag puts all of a namespace's keys in one Redis Cluster
//! slot, so each operation's keys can be changed together atomically (MULTI
//! or a Lua script). A value key vanishes natively when it expires; its
//! index entry stays until a scan steps over it or a purge removes it, so
//! every read decides liveness by the value key, never by the index.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deadpool_redis::redis::aio::ConnectionLike;
use deadpool_redis::redis::{self, IntoConnectionInfo, RedisError, Value};
use deadpool_redis::{Manager, PoolError, Runtime, TimeoutType};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::toolkit::{fetch_count, redact_url, scan_page, until, KeyRange};
use super::{
    context, Backend, BoxFuture, ConfigError, Connector, Error, Item, Op, Outcome, PoolStats,
};

/// How to reach Redis and name the keys.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// Connection URL, e.g. `redis://:password@host:6379/0`. Default
    /// `redis://127.0.0.1:6379`.
    pub url: String,
    /// Largest number of pooled connections, that is of operations at once.
    /// Default 16.
    pub max_size: usize,
    /// How long an operation waits for a free connection before the backend
    /// counts as unavailable. Default 5s.
    pub wait_timeout: Duration,
    /// How long opening a connection may take. Default 5s.
    pub create_timeout: Duration,
    /// How long the liveness check of a pooled connection, before reuse,
    /// may take. Default 5s.
    pub recycle_timeout: Duration,
    /// Prefix of every key, so several deployments (or other applications)
    /// can share one Redis. Must not contain `{` or `}`. Default `prism`.
    pub key_prefix: String,
    /// Longest wait for the reply to one command; also the deadline of an
    /// operation run without one. Default 5s.
    pub command_timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            max_size: 16,
            wait_timeout: Duration::from_secs(5),
            create_timeout: Duration::from_secs(5),
            recycle_timeout: Duration::from_secs(5),
            key_prefix: "prism".into(),
            command_timeout: Duration::from_secs(5),
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("max_size", &self.max_size)
            .field("wait_timeout", &self.wait_timeout)
            .field("create_timeout", &self.create_timeout)
            .field("recycle_timeout", &self.recycle_timeout)
            .field("key_prefix", &self.key_prefix)
            .field("command_timeout", &self.command_timeout)
            .finish()
    }
}

/// Connects to Redis. Cheap to clone (clones share whether the server's
/// eviction policy was checked).
#[derive(Clone, Debug)]
pub struct RedisConnector {
    config: RedisConfig,
    purge_lease: Duration,
    /// The backend's name in the settings, for log lines.
    name: Arc<str>,
    /// Set once the first connect has asked the server for its
    /// `maxmemory-policy`, so that restarts do not repeat the warning.
    policy_checked: Arc<AtomicBool>,
}

/// The only `maxmemory-policy` under which Redis keeps every key Prism wrote.
pub const REQUIRED_EVICTION_POLICY: &str = "noeviction";

impl RedisConnector {
    /// A connector for `config`. Fails, naming the field (`url` or
    /// `key_prefix`) and the bad value, when the URL does not parse or the
    /// key prefix is empty or holds a hash-tag brace. Nothing is connected
    /// until [`Connector::connect`].
    pub fn new(config: RedisConfig) -> Result<Self, ConfigError> {
        check_key_prefix(&config.key_prefix)?;
        config.url.as_str().into_connection_info().map_err(|e| {
            ConfigError::new(
                "url",
                format!("invalid redis url {}: {e}", redact_url(&config.url)),
            )
        })?;
        Ok(RedisConnector {
            config,
            purge_lease: DEFAULT_PURGE_LEASE,
            name: "redis".into(),
            policy_checked: Arc::default(),
        })
    }

    /// Names the backend in this connector's log lines (default `redis`).
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    /// How long the purge lease lasts unless its holder renews it (default
    /// [`DEFAULT_PURGE_LEASE`]): the longest another Prism instance waits to
    /// take purging over from one that stopped without giving it up.
    pub fn with_purge_lease(mut self, ttl: Duration) -> Self {
        self.purge_lease = ttl;
        self
    }

    /// The settings this connector was made with.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    async fn open(&self) -> Result<RedisBackend, Error> {
        let c = &self.config;
        // The response timeout bounds every command on the connection, also
        // those of purge and health, which have no deadline of their own.
        let connection = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(c.create_timeout))
            .set_response_timeout(Some(c.command_timeout));
        let invalid = |e| {
            Error::Internal(context(
                format!("invalid redis url {}", redact_url(&c.url)),
                e,
            ))
        };
        let manager = Manager::new_with_config(c.url.as_str(), connection).map_err(invalid)?;
        let info = c.url.as_str().into_connection_info().map_err(invalid)?;
        let direct = DirectTarget::of(&info, c.command_timeout);
        let pool = Pool::builder(FreshManager {
            inner: manager,
            direct,
        })
        .max_size(c.max_size.max(1))
        .wait_timeout(Some(c.wait_timeout))
        .create_timeout(Some(c.create_timeout))
        .recycle_timeout(Some(c.recycle_timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| Error::Internal(context("cannot build the redis pool", e)))?;
        // The pool connects lazily: connect now, so that an unreachable
        // server fails the start, and load the scripts while at it.
        let loaded = async {
            let mut conn = pool.get().await.map_err(map_pool)?;
            if !self.policy_checked.swap(true, Ordering::Relaxed) {
                self.check_eviction_policy(&mut *conn).await;
            }
            let scan = Script::load(&mut *conn, SCAN_SCRIPT).await?;
            let purge = Script::load(&mut *conn, PURGE_SCRIPT).await?;
            let lease = PurgeLease::load(&mut *conn, &c.key_prefix, self.purge_lease).await?;
            Ok::<_, Error>((scan, purge, lease))
        };
        let (scan, purge, lease) = match loaded.await {
            Ok(loaded) => loaded,
            Err(e) => {
                pool.close();
                return Err(e);
            }
        };
        Ok(RedisBackend {
            pool,
            prefix: c.key_prefix.clone(),
            command_timeout: c.command_timeout,
            scan,
            purge,
            lease,
            registry: Registry::new(&c.key_prefix),
        })
    }
}

impl RedisConnector {
    /// Warns when the server may evict keys. A value and its entry in the
    /// namespace's scan index are separate keys: under an evicting policy
    /// Redis may drop one without the other (scans then skip live keys),
    /// or drop values that have no TTL and the purge lease. Prism never sets
    /// the policy itself (the server may be shared); a server that hides
    /// `CONFIG` (renamed, disabled, or not granted by its ACL) is not
    /// checked.
    async fn check_eviction_policy<C: ConnectionLike>(&self, conn: &mut C) {
        let reply: Result<std::collections::HashMap<String, String>, RedisError> =
            redis::cmd("CONFIG")
                .arg("GET")
                .arg("maxmemory-policy")
                .query_async(conn)
                .await;
        let backend = &*self.name;
        match reply.map(|mut config| config.remove("maxmemory-policy")) {
            Ok(Some(policy)) if policy.eq_ignore_ascii_case(REQUIRED_EVICTION_POLICY) => {
                debug!(backend, maxmemory_policy = %policy, "redis eviction policy checked");
            }
            Ok(Some(policy)) => warn!(
                backend,
                url = %redact_url(&self.config.url),
                maxmemory_policy = %policy,
                required = REQUIRED_EVICTION_POLICY,
                reason = "under memory pressure redis may evict a value apart from its scan index entry, so scans skip live keys, or evict keys without a ttl and the purge lease",
                "redis may evict keys; set maxmemory-policy noeviction"
            ),
            Ok(None) => {
                debug!(
                    backend,
                    "redis did not report its maxmemory-policy; eviction is not checked"
                );
            }
            Err(e) => {
                debug!(backend, error = %e, "cannot read the redis maxmemory-policy; eviction is not checked");
            }
        }
    }
}

/// A key prefix must be non-empty and hold no hash-tag brace: the tags
/// Prism writes after it must be the first braces of each key.
pub(super) fn check_key_prefix(prefix: &str) -> Result<(), ConfigError> {
    if prefix.is_empty() || prefix.contains(['{', '}']) {
        return Err(ConfigError::new(
            "key_prefix",
            format!(
                "invalid redis key prefix {prefix:?}: must be non-empty and contain no '{{' or '}}'"
            ),
        ));
    }
    Ok(())
}

impl Connector for RedisConnector {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn connect(&self) -> BoxFuture<'_, Result<Arc<dyn Backend>, Error>> {
        Box::pin(async move {
            let backend: Arc<dyn Backend> = Arc::new(self.open().await?);
            Ok(backend)
        })
    }
}

/// How recently a pooled connection must have been handed out to be handed
/// out again without a `PING` first.
const FRESH: Duration = Duration::from_secs(1);

/// Makes the pool's connections: direct ones (see [`direct`]) where the URL
/// allows, deadpool-redis' multiplexed ones otherwise. A connection handed
/// out within [`FRESH`] of its previous use goes straight to its next user:
/// under load that saves a round trip per operation. A connection idle for
/// longer is pinged first. A connection whose command failed in a way that
/// may have left it broken is never returned to the pool (see
/// `RedisBackend::exec_bounded`), and a direct connection cut off
/// mid-request (its operation dropped) is discarded here, so skipping the
/// ping never hands a known broken connection out again.
struct FreshManager {
    inner: Manager,
    direct: Option<DirectTarget>,
}

impl deadpool::managed::Manager for FreshManager {
    type Type = Conn;
    type Error = RedisError;

    // Connecting and checking are boxed: deadpool's checkout future holds
    // both inline, and every operation would otherwise carry (and copy)
    // the state of a whole connection handshake, some 14 KiB.
    async fn create(&self) -> Result<Conn, RedisError> {
        Box::pin(async {
            Ok(match &self.direct {
                Some(target) => Conn::Direct(target.connect().await?),
                None => Conn::Multiplexed(deadpool::managed::Manager::create(&self.inner).await?),
            })
        })
        .await
    }

    async fn recycle(
        &self,
        conn: &mut Conn,
        metrics: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<RedisError> {
        if !conn.is_usable() {
            return Err(deadpool::managed::RecycleError::message(
                "connection was cut off in the middle of a request",
            ));
        }
        if metrics.last_used() < FRESH {
            return Ok(());
        }
        Box::pin(self.ping(conn, metrics)).await
    }
}

impl FreshManager {
    async fn ping(
        &self,
        conn: &mut Conn,
        metrics: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<RedisError> {
        match conn {
            Conn::Multiplexed(conn) => {
                deadpool::managed::Manager::recycle(&self.inner, conn, metrics).await
            }
            Conn::Direct(_) => {
                let _: String = redis::cmd("PING")
                    .query_async(conn)
                    .await
                    .map_err(deadpool::managed::RecycleError::Backend)?;
                Ok(())
            }
        }
    }
}

type Pool = deadpool::managed::Pool<FreshManager>;
type Connection = deadpool::managed::Object<FreshManager>;

/// A pool of connections to one Redis server.
struct RedisBackend {
    pool: Pool,
    prefix: String,
    command_timeout: Duration,
    scan: Script,
    purge: Script,
    lease: PurgeLease,
    registry: Registry,
}

impl RedisBackend {
    fn keyspace(&self, namespace: &str) -> Keyspace {
        Keyspace::new(&self.prefix, &ns_tag(namespace))
    }

    #[cfg(test)]
    fn index_key(&self, namespace: &str) -> String {
        self.keyspace(namespace).index
    }

    #[cfg(test)]
    fn value_prefix(&self, namespace: &str) -> String {
        self.keyspace(namespace).values
    }

    /// Runs `op`, giving up at `deadline`. A connection whose command timed
    /// out is dropped rather than pooled again: its reply may still be on
    /// the way (a slow script), and the next user would queue behind it.
    async fn exec_bounded(
        &self,
        namespace: &str,
        op: Op,
        deadline: Instant,
    ) -> Result<Outcome, Error> {
        // A timer polls its future before itself: without this, a command
        // whose deadline has already passed would still be sent.
        if Instant::now() >= deadline {
            return Err(Error::Timeout);
        }
        // One timer bounds the checkout and the command.
        let mut held: Option<Connection> = None;
        let work = async {
            let conn = held.insert(self.pool.get().await.map_err(map_pool)?);
            self.run(&mut conn.within_deadline(), namespace, op).await
        };
        let res = until(deadline, work).await;
        // A connection whose command was cut off, or that failed to talk to
        // the server, is not trusted again: the next user would not know it
        // (no `PING` for fresh connections).
        if let (Err(Error::Timeout | Error::Unavailable(_)), Some(conn)) = (&res, held) {
            drop(Connection::take(conn));
        }
        res
    }

    /// A pooled connection, waited for until `deadline`.
    async fn checkout(&self, deadline: Instant) -> Result<Connection, Error> {
        until(deadline, async { self.pool.get().await.map_err(map_pool) }).await
    }

    async fn run<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        namespace: &str,
        op: Op,
    ) -> Result<Outcome, Error> {
        let keyspace = self.keyspace(namespace);
        match op {
            Op::Scan {
                prefix,
                after,
                limit,
                max_bytes,
                keys_only,
            } => {
                let range = KeyRange::new(&prefix, after.as_deref());
                // One item past the page tells whether more follow. Boxed:
                // a scan's state is the largest of any operation's, and
                // every operation's future would otherwise carry it.
                let items = Box::pin(keyspace.scan(
                    conn,
                    &self.scan,
                    &range,
                    fetch_count(limit),
                    max_bytes,
                    keys_only,
                ))
                .await?;
                scan_page(items.into_iter().map(Ok::<_, Error>), limit, max_bytes)
            }
            op @ Op::Put { .. } => {
                self.registry.register(conn, namespace).await?;
                keyspace.run(conn, op).await
            }
            op => keyspace.run(conn, op).await,
        }
    }

    /// Purges every namespace when this backend holds the purge lease;
    /// otherwise leaves it to the holder.
    async fn purge_all(&self) -> Result<u64, Error> {
        let deadline = Instant::now() + self.command_timeout;
        let mut conn = self.checkout(deadline).await?;
        if !self.lease.acquire(&mut *conn).await? {
            return Ok(0);
        }
        let mut purged = 0u64;
        for namespace in self.registry.members(&mut *conn).await? {
            purged += self
                .keyspace(&namespace)
                .purge(&mut *conn, &self.purge)
                .await?;
        }
        Ok(purged)
    }

    async fn ping(&self) -> Result<(), Error> {
        let deadline = Instant::now() + self.command_timeout;
        let mut conn = self.checkout(deadline).await?;
        let _: String = redis::cmd("PING")
            .query_async(&mut *conn)
            .await
            .map_err(map_redis)?;
        Ok(())
    }

    async fn shut(&self) {
        let deadline = Instant::now() + self.command_timeout;
        if let Ok(mut conn) = self.checkout(deadline).await {
            let _ = until(deadline, async {
                self.lease.release(&mut *conn).await;
                Ok(())
            })
            .await;
        }
        // Closing drops the idle connections and refuses new checkouts;
        // connections in use close when their operation returns them.
        self.pool.close();
    }
}

/// A parsed reply of [`SCAN_SCRIPT`].
struct ScanReply {
    exhausted: bool,
    last: String,
    items: Vec<Item>,
}

impl ScanReply {
    fn parse(reply: Value, keys_only: bool) -> Result<ScanReply, Error> {
        let Value::Array(values) = reply else {
            return Err(unexpected("scan", &reply));
        };
        let mut values = values.into_iter();
        let exhausted = match values.next() {
            Some(Value::Int(flag)) => flag == 1,
            other => return Err(unexpected("scan", &other)),
        };
        let last = match values.next() {
            Some(v) => string(v)?,
            None => return Err(unexpected("scan", &None::<Value>)),
        };
        let mut items = Vec::with_capacity(values.len() / if keys_only { 1 } else { 2 });
        while let Some(key) = values.next() {
            let key = string(key)?;
            let value = if keys_only {
                Bytes::new()
            } else {
                match values.next() {
                    Some(Value::BulkString(v)) => Bytes::from(v),
                    other => return Err(unexpected("scan value", &other)),
                }
            };
            items.push(Item { key, value });
        }
        Ok(ScanReply {
            exhausted,
            last,
            items,
        })
    }
}

/// `(removed, done, last)` of a [`PURGE_SCRIPT`] reply.
fn parse_purge_reply(reply: Value) -> Result<(u64, bool, String), Error> {
    match reply {
        Value::Array(values) => match <[Value; 3]>::try_from(values) {
            Ok([Value::Int(removed), Value::Int(done), last]) => {
                Ok((removed.unsigned_abs(), done == 1, string(last)?))
            }
            Ok(other) => Err(unexpected("purge", &other)),
            Err(other) => Err(unexpected("purge", &other)),
        },
        other => Err(unexpected("purge", &other)),
    }
}

/// A key from a script reply. Index entries are only ever written from
/// `String` keys, so they are UTF-8.
fn string(value: Value) -> Result<String, Error> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes)
            .map_err(|e| Error::Internal(context("redis index entry is not utf-8", e))),
        other => Err(unexpected("key", &other)),
    }
}

pub(super) fn unexpected(what: &str, value: &dyn fmt::Debug) -> Error {
    Error::internal(format!("unexpected redis {what} reply: {value:?}"))
}

/// Server errors a retry (after a failover, a reload, a script ending) can
/// fix.
const TRANSIENT_CODES: &[&str] = &[
    "LOADING",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "READONLY",
    "BUSY",
    "OOM",
];

/// Command errors: a reply that did not come in time is a timeout, a lost or
/// refused connection or a server that cannot serve for now is unavailable,
/// anything else is internal.
pub(super) fn map_redis(e: RedisError) -> Error {
    if e.is_timeout() {
        Error::Timeout
    } else if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.code().is_some_and(|code| TRANSIENT_CODES.contains(&code))
    {
        Error::Unavailable(Box::new(e))
    } else {
        Error::Internal(Box::new(e))
    }
}

/// Pool errors: not getting a connection, for whatever reason, makes the
/// backend unavailable, except for errors of our own making.
pub(super) fn map_pool(e: PoolError) -> Error {
    let unavailable = |message: &str, e: PoolError| Error::Unavailable(context(message, e));
    match e {
        PoolError::Timeout(TimeoutType::Wait) => unavailable("redis connection pool exhausted", e),
        PoolError::Timeout(TimeoutType::Create) => unavailable("timed out connecting to redis", e),
        PoolError::Timeout(TimeoutType::Recycle) => {
            unavailable("timed out checking a pooled redis connection", e)
        }
        PoolError::Closed => unavailable("redis connection pool closed", e),
        // A connect that timed out is a server out of reach.
        PoolError::Backend(e) if e.is_timeout() => {
            Error::Unavailable(context("timed out connecting to redis", e))
        }
        PoolError::Backend(e) => map_redis(e),
        PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => {
            Error::Internal(context("redis pool", e))
        }
    }
}

impl Backend for RedisBackend {
    fn exec<'a>(&'a self, namespace: &'a str, op: Op) -> BoxFuture<'a, Result<Outcome, Error>> {
        Box::pin(async move {
            let deadline = Instant::now() + self.command_timeout;
            self.exec_bounded(namespace, op, deadline).await
        })
    }

    fn exec_until<'a>(
        &'a self,
        namespace: &'a str,
        op: Op,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Outcome, Error>> {
        Box::pin(self.exec_bounded(namespace, op, deadline))
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, Error>> {
        Box::pin(self.purge_all())
    }

    fn health(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(self.ping())
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.shut())
    }

    fn purge_leader(&self) -> Option<bool> {
        Some(self.lease.is_held())
    }

    fn connections(&self) -> PoolStats {
        let status = self.pool.status();
        PoolStats::from_counts(status.size, status.available)
    }
}

mod direct;
mod keyspace;
mod lease;

use direct::{Conn, DirectTarget};

pub(super) use keyspace::*;
pub use lease::DEFAULT_PURGE_LEASE;
pub(super) use lease::*;

#[cfg(test)]
mod tests;
