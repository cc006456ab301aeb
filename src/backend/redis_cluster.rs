//! The Redis Cluster backend: the Redis backend's layout, with each
//! namespace split into `shards` keyspaces so that one namespace spreads
//! over every node of the cluster.
//!
//! Layout, for key prefix `P`, namespace `N` (escaped as in the Redis
//! backend) and shard `S` in `0..shards`:
//!
//! - `P:{N:sS}:v:<key>`: the value, a string, with `PX` when it has a TTL;
//! - `P:{N:sS}:idx`: the shard's keys in a sorted set (all score 0), walked
//!   by `ZRANGEBYLEX` in bytewise order;
//! - `P:namespaces`: the namespaces ever written, for purge to visit;
//! - `P:purge-lease`: the instance that purges (see the Redis backend).
//!
//! A key's shard is a stable hash of the key (FNV-1a, modulo `shards`), the
//! same in every instance and build. A shard's value keys and index share
//! the hash tag `{N:sS}`, so each single-key operation touches one slot and
//! stays atomic (one Lua script each: the client follows a `MOVED` redirect
//! of a command, not of the commands inside a `MULTI`), while the shards' tags hash to
//! slots all over the cluster. A scan reads every shard's index from the
//! cursor on (`limit + 1` live keys each, concurrently), merges them in
//! ascending byte order and answers the first `limit`: as every key lives in
//! exactly one shard, the page is exact, continues after the cursor with no
//! gap or duplicate, and `more` says whether any shard had more.
//!
//! The client (redis-rs cluster-async, pooled by deadpool-redis) follows
//! `MOVED`/`ASK` redirects and refreshes the slot map when the topology
//! changes, e.g. after a failover.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use deadpool_redis::cluster::{Connection, Manager, Pool};
use deadpool_redis::redis::{self, IntoConnectionInfo};
use deadpool_redis::Runtime;
use tokio::time::Instant;

use super::redis::{
    check_key_prefix, map_pool, map_redis, ns_tag, Keyspace, OpScripts, PurgeLease, Registry,
    Script, DEFAULT_PURGE_LEASE, PURGE_SCRIPT, SCAN_SCRIPT,
};
use super::toolkit::{fetch_count, redact_url, until, KeyRange, PageBuilder};
use super::{
    context, Backend, BoxFuture, ConfigError, Connector, Error, Item, Op, Outcome, PoolStats,
};

/// Values a scan sizes (`STRLEN`) at once before reading those that fit
/// its page.
const VALUE_BATCH: usize = 64;

/// The most shards a namespace may have: a scan reads every shard.
pub const MAX_SHARDS: u16 = 1024;

/// How to reach the cluster and lay out the keys.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisClusterConfig {
    /// Seed nodes, e.g. `redis://127.0.0.1:7000`; the client learns the
    /// rest of the cluster from them.
    pub urls: Vec<String>,
    /// Largest number of pooled cluster connections (each multiplexes one
    /// connection per node). Default 16.
    pub max_size: usize,
    /// How long an operation waits for a free connection. Default 5s.
    pub wait_timeout: Duration,
    /// How long connecting to the cluster may take. Default 5s.
    pub create_timeout: Duration,
    /// Prefix of every key; no `{` or `}`. Default `prism`.
    pub key_prefix: String,
    /// Longest wait for one operation without a deadline of its own
    /// (purge, health). Default 5s.
    pub command_timeout: Duration,
    /// Index shards per namespace, 1..=[`MAX_SHARDS`]. Default 16.
    pub shards: u16,
}

impl Default for RedisClusterConfig {
    fn default() -> Self {
        RedisClusterConfig {
            urls: vec!["redis://127.0.0.1:7000".into()],
            max_size: 16,
            wait_timeout: Duration::from_secs(5),
            create_timeout: Duration::from_secs(5),
            key_prefix: "prism".into(),
            command_timeout: Duration::from_secs(5),
            shards: 16,
        }
    }
}

impl std::fmt::Debug for RedisClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("RedisClusterConfig")
            .field("urls", &urls)
            .field("max_size", &self.max_size)
            .field("wait_timeout", &self.wait_timeout)
            .field("create_timeout", &self.create_timeout)
            .field("key_prefix", &self.key_prefix)
            .field("command_timeout", &self.command_timeout)
            .field("shards", &self.shards)
            .finish()
    }
}

/// Connects to a Redis Cluster. Cheap to clone.
#[derive(Clone, Debug)]
pub struct RedisClusterConnector {
    config: RedisClusterConfig,
    purge_lease: Duration,
}

impl RedisClusterConnector {
    /// A connector for `config`. Fails, naming the field (`urls`,
    /// `key_prefix` or `shards`), when there is no seed URL, a URL does not
    /// parse, the key prefix is empty or holds a brace, or `shards` is out
    /// of range. Nothing is connected until [`Connector::connect`].
    pub fn new(config: RedisClusterConfig) -> Result<Self, ConfigError> {
        check_key_prefix(&config.key_prefix)?;
        if config.urls.is_empty() {
            return Err(ConfigError::new(
                "urls",
                "no redis cluster seed url: give at least one, e.g. [\"redis://127.0.0.1:7000\"]",
            ));
        }
        for url in &config.urls {
            url.as_str().into_connection_info().map_err(|e| {
                ConfigError::new(
                    "urls",
                    format!("invalid redis url {}: {e}", redact_url(url)),
                )
            })?;
        }
        if !(1..=MAX_SHARDS).contains(&config.shards) {
            return Err(ConfigError::new(
                "shards",
                format!(
                    "invalid shard count {}: must be 1..={MAX_SHARDS}",
                    config.shards
                ),
            ));
        }
        Ok(RedisClusterConnector {
            config,
            purge_lease: DEFAULT_PURGE_LEASE,
        })
    }

    /// How long the purge lease lasts unless renewed (default
    /// [`DEFAULT_PURGE_LEASE`]).
    pub fn with_purge_lease(mut self, ttl: Duration) -> Self {
        self.purge_lease = ttl;
        self
    }

    /// The settings this connector was made with.
    pub fn config(&self) -> &RedisClusterConfig {
        &self.config
    }

    async fn open(&self) -> Result<ClusterBackend, Error> {
        let c = &self.config;
        let shown = || {
            c.urls
                .iter()
                .map(|u| redact_url(u))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let manager = Manager::new(c.urls.clone(), false).map_err(|e| {
            Error::Internal(context(
                format!("invalid redis cluster urls {}", shown()),
                e,
            ))
        })?;
        let pool = Pool::builder(manager)
            .max_size(c.max_size.max(1))
            .wait_timeout(Some(c.wait_timeout))
            .create_timeout(Some(c.create_timeout))
            .recycle_timeout(Some(c.create_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Internal(context("cannot build the redis cluster pool", e)))?;
        // Connect now, so that an unreachable cluster fails the start.
        let deadline = Instant::now() + c.create_timeout.max(c.command_timeout);
        let loaded = until(deadline, async {
            let mut conn = pool.get().await.map_err(map_pool)?;
            let scan = Script::load(&mut *conn, SCAN_SCRIPT).await?;
            let purge = Script::load(&mut *conn, PURGE_SCRIPT).await?;
            let lease = PurgeLease::load(&mut *conn, &c.key_prefix, self.purge_lease).await?;
            let ops = OpScripts::load(&mut *conn).await?;
            Ok((scan, purge, lease, ops))
        })
        .await;
        let (scan, purge, lease, ops) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                pool.close();
                return Err(e);
            }
        };
        Ok(ClusterBackend {
            pool,
            prefix: c.key_prefix.clone(),
            shards: c.shards,
            command_timeout: c.command_timeout,
            scan: Arc::new(scan),
            purge,
            ops,
            lease,
            registry: Registry::new(&c.key_prefix),
        })
    }
}

impl Connector for RedisClusterConnector {
    fn kind(&self) -> &'static str {
        "redis_cluster"
    }

    fn connect(&self) -> BoxFuture<'_, Result<Arc<dyn Backend>, Error>> {
        Box::pin(async move {
            let backend: Arc<dyn Backend> = Arc::new(self.open().await?);
            Ok(backend)
        })
    }
}

/// The shard of `key` among `shards`: FNV-1a of its bytes, so every
/// instance and build agrees.
pub fn shard_of(key: &str, shards: u16) -> u16 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // The remainder is below `shards`, a u16.
    (hash % u64::from(shards.max(1))) as u16
}

/// The hash tag (without braces) of one shard of a namespace: the escaped
/// namespace, then `:s` and the shard number. The suffix is always `:s` and
/// digits, so two (namespace, shard) pairs never share a tag.
pub fn shard_tag(namespace: &str, shard: u16) -> String {
    format!("{}:s{shard}", ns_tag(namespace))
}

/// Pooled connections to one Redis Cluster.
struct ClusterBackend {
    pool: Pool,
    prefix: String,
    shards: u16,
    command_timeout: Duration,
    scan: Arc<Script>,
    purge: Script,
    /// Get, Put and Delete as scripts, not transactions: see [`OpScripts`].
    ops: OpScripts,
    lease: PurgeLease,
    registry: Registry,
}

impl ClusterBackend {
    fn keyspace(&self, namespace: &str, shard: u16) -> Keyspace {
        Keyspace::new(&self.prefix, &shard_tag(namespace, shard))
    }

    async fn checkout(&self, deadline: Instant) -> Result<Connection, Error> {
        until(deadline, async { self.pool.get().await.map_err(map_pool) }).await
    }

    /// Runs `op`, giving up at `deadline`; a connection whose command timed
    /// out is dropped rather than pooled again, as in the Redis backend.
    async fn exec_bounded(
        &self,
        namespace: &str,
        op: Op,
        deadline: Instant,
    ) -> Result<Outcome, Error> {
        let mut conn = self.checkout(deadline).await?;
        match tokio::time::timeout_at(deadline, self.run(&mut conn, namespace, op)).await {
            Ok(Err(Error::Timeout)) | Err(_) => {
                drop(Connection::take(conn));
                Err(Error::Timeout)
            }
            Ok(res) => res,
        }
    }

    async fn run(&self, conn: &mut Connection, namespace: &str, op: Op) -> Result<Outcome, Error> {
        let key = match &op {
            Op::Scan {
                prefix,
                after,
                limit,
                max_bytes,
                keys_only,
            } => {
                let page = PageBuilder::new(*limit, *max_bytes);
                return self
                    .scan(conn, namespace, prefix, after.as_deref(), page, *keys_only)
                    .await;
            }
            Op::Get { key } | Op::Put { key, .. } | Op::Delete { key } | Op::Exists { key } => key,
        };
        let keyspace = self.keyspace(namespace, shard_of(key, self.shards));
        if matches!(op, Op::Put { .. }) {
            self.registry.register(&mut **conn, namespace).await?;
        }
        keyspace.run_scripted(&mut **conn, &self.ops, op).await
    }

    /// Reads `limit + 1` live keys from every shard at once and merges them;
    /// then reads the values of the page's keys, in order, in batches that
    /// fit the page's byte budget. Reading values only for the merged page
    /// (not `limit + 1` per shard) keeps a scan's memory within the budget
    /// however many shards there are.
    async fn scan(
        &self,
        conn: &mut Connection,
        namespace: &str,
        prefix: &str,
        after: Option<&str>,
        mut page: PageBuilder,
        keys_only: bool,
    ) -> Result<Outcome, Error> {
        let range = KeyRange::new(prefix, after);
        let wanted = fetch_count(page.limit());
        let reads = (0..self.shards).map(|shard| {
            // A cluster connection is a multiplexed handle: a clone shares
            // its node connections, and sends to each shard's node at once.
            let mut conn = (**conn).clone();
            let keyspace = self.keyspace(namespace, shard);
            let script = Arc::clone(&self.scan);
            let range = &range;
            async move {
                // Keys only: at most `wanted` keys of 1 KiB each per shard.
                keyspace
                    .scan(&mut conn, &script, range, wanted, usize::MAX, true)
                    .await
            }
        });
        let mut keys: Vec<Item> = Vec::new();
        for shard in join_all(reads.collect()).await {
            keys.extend(shard?);
        }
        // Keys are UTF-8, so string order is byte order.
        keys.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        keys.truncate(wanted);
        if keys_only {
            for key in keys {
                if !page.offer(key) {
                    break;
                }
            }
            return Ok(page.finish());
        }
        let mut keys = keys.into_iter().map(|i| i.key).peekable();
        while keys.peek().is_some() && !page.is_complete() {
            // The sizes of the next keys' values first, so that only values
            // that fit the page (and the one that ends it) are read.
            let batch: Vec<String> = keys.by_ref().take(VALUE_BATCH).collect();
            let sizes = join_all(
                batch
                    .iter()
                    .map(|key| self.value_cmd(conn, namespace, "STRLEN", key))
                    .collect(),
            )
            .await;
            let mut batch = batch.into_iter().zip(sizes).peekable();
            while batch.peek().is_some() && !page.is_complete() {
                // Up to and including the first value past the budget.
                let mut fits = Vec::new();
                let mut bytes = page.bytes();
                let mut first = page.is_empty();
                for (key, size) in batch.by_ref() {
                    let size: i64 = size?;
                    bytes = bytes
                        .saturating_add(key.len())
                        .saturating_add(usize::try_from(size).unwrap_or(usize::MAX));
                    let over = !first && bytes > page.max_bytes();
                    first = false;
                    fits.push(key);
                    if over || page.len() + fits.len() > page.limit() {
                        break;
                    }
                }
                let values = join_all(
                    fits.iter()
                        .map(|key| self.value_cmd(conn, namespace, "GET", key))
                        .collect(),
                )
                .await;
                for (key, value) in fits.into_iter().zip(values) {
                    // A key that expired since its index entry was read is
                    // absent, as it would be a moment later.
                    let value: Option<Vec<u8>> = value?;
                    if let Some(value) = value {
                        let item = Item {
                            key,
                            value: value.into(),
                        };
                        if !page.offer(item) {
                            break;
                        }
                    }
                }
            }
        }
        Ok(page.finish())
    }

    /// `cmd` (`GET`, `STRLEN`) on the value key of `key`, on a clone of the
    /// multiplexed `conn`, so that a batch of them runs at once.
    fn value_cmd<T: redis::FromRedisValue>(
        &self,
        conn: &Connection,
        namespace: &str,
        cmd: &'static str,
        key: &str,
    ) -> impl Future<Output = Result<T, Error>> + use<T> {
        let mut conn = (**conn).clone();
        let vkey = self.keyspace(namespace, shard_of(key, self.shards)).values + key;
        async move {
            redis::cmd(cmd)
                .arg(vkey)
                .query_async(&mut conn)
                .await
                .map_err(map_redis)
        }
    }

    /// Purges every shard of every namespace when this backend holds the
    /// purge lease.
    async fn purge_all(&self) -> Result<u64, Error> {
        let deadline = Instant::now() + self.command_timeout;
        let mut conn = self.checkout(deadline).await?;
        if !self.lease.acquire(&mut *conn).await? {
            return Ok(0);
        }
        let mut purged = 0u64;
        for namespace in self.registry.members(&mut *conn).await? {
            for shard in 0..self.shards {
                purged += self
                    .keyspace(&namespace, shard)
                    .purge(&mut *conn, &self.purge)
                    .await?;
            }
        }
        Ok(purged)
    }

    /// `PING` to every node: the cluster answers only when all are up.
    async fn ping(&self) -> Result<(), Error> {
        let deadline = Instant::now() + self.command_timeout;
        until(deadline, async {
            let mut conn = self.checkout(deadline).await?;
            let _: String = redis::cmd("PING")
                .query_async(&mut *conn)
                .await
                .map_err(map_redis)?;
            Ok(())
        })
        .await
    }

    async fn shut(&self) {
        let deadline = Instant::now() + self.command_timeout;
        let _ = until(deadline, async {
            let mut conn = self.checkout(deadline).await?;
            self.lease.release(&mut *conn).await;
            Ok(())
        })
        .await;
        self.pool.close();
    }
}

/// Runs `futures` concurrently on this task; their outputs in order.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(v) => *output = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    // The loop above ends only when every output is set.
    outputs.into_iter().flatten().collect()
}

impl Backend for ClusterBackend {
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

    fn purge_leader(&self) -> Option<bool> {
        Some(self.lease.is_held())
    }

    fn health(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(self.ping())
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.shut())
    }

    fn connections(&self) -> PoolStats {
        let status = self.pool.status();
        PoolStats::from_counts(status.size, status.available)
    }
}

#[cfg(test)]
mod tests {
    use super::{shard_of, shard_tag, RedisClusterConfig, RedisClusterConnector};

    #[test]
    fn keys_spread_over_every_shard_and_stay_in_theirs() {
        let mut seen = [0u32; 16];
        for i in 0..1600 {
            let key = format!("user/{i}");
            let shard = shard_of(&key, 16);
            assert_eq!(shard, shard_of(&key, 16));
            seen[usize::from(shard)] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
        assert_eq!(shard_of("anything", 1), 0);
        // Fixed forever: instances of different builds must agree.
        assert_eq!(shard_of("a", 16), 0xaf63dc4c8601ec8c_u64 as u16 % 16);
        assert_eq!(shard_tag("a}b", 3), "a%7Db:s3");
    }

    #[test]
    fn invalid_settings_name_their_field() {
        let bad = |c: RedisClusterConfig| RedisClusterConnector::new(c).expect_err("invalid");
        let e = bad(RedisClusterConfig {
            urls: vec![],
            ..RedisClusterConfig::default()
        });
        assert_eq!(e.field, "urls");
        let e = bad(RedisClusterConfig {
            urls: vec!["http://:secret@h:1".into()],
            ..RedisClusterConfig::default()
        });
        assert_eq!(e.field, "urls");
        assert!(!e.message.contains("secret"), "{}", e.message);
        for shards in [0, 1025] {
            let e = bad(RedisClusterConfig {
                shards,
                ..RedisClusterConfig::default()
            });
            assert_eq!(e.field, "shards");
        }
        let e = bad(RedisClusterConfig {
            key_prefix: "a{".into(),
            ..RedisClusterConfig::default()
        });
        assert_eq!(e.field, "key_prefix");
        assert!(RedisClusterConnector::new(RedisClusterConfig::default()).is_ok());
    }
}
