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

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use deadpool_redis::redis::aio::ConnectionLike;
use deadpool_redis::redis::{self, IntoConnectionInfo, RedisError, Value};
use deadpool_redis::{Connection, Manager, Pool, PoolError, Runtime, TimeoutType};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::toolkit::{
    fetch_count, instance_id, item_bytes, purge_in_batches, redact_url, scan_page, stored_ttl,
    until, Batch, KeyRange,
};
use super::{
    context, Backend, BoxFuture, ConfigError, Connector, Error, Item, Op, Outcome, PoolStats,
    Record,
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
        let manager = Manager::new_with_config(c.url.as_str(), connection).map_err(|e| {
            Error::Internal(context(
                format!("invalid redis url {}", redact_url(&c.url)),
                e,
            ))
        })?;
        let pool = Pool::builder(manager)
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
                self.check_eviction_policy(&mut conn).await;
            }
            let scan = Script::load(&mut conn, SCAN_SCRIPT).await?;
            let purge = Script::load(&mut conn, PURGE_SCRIPT).await?;
            let lease = PurgeLease::load(&mut conn, &c.key_prefix, self.purge_lease).await?;
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

/// A Lua script, run by its SHA1 digest. The digest comes from `SCRIPT LOAD`
/// at connect; a server that has lost its script cache since (restart,
/// failover, `SCRIPT FLUSH`), or a cluster node that never had it, gets the
/// source again.
pub(super) struct Script {
    source: &'static str,
    sha: String,
}

impl Script {
    pub(super) async fn load<C>(conn: &mut C, source: &'static str) -> Result<Script, Error>
    where
        C: ConnectionLike + Send,
    {
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(source)
            .query_async(conn)
            .await
            .map_err(map_redis)?;
        Ok(Script { source, sha })
    }

    /// Runs the script on one key (the index or lease it works on, which
    /// also routes it to its cluster node) and `args`.
    pub(super) async fn run<C>(
        &self,
        conn: &mut C,
        key: &str,
        args: &[&[u8]],
    ) -> Result<Value, Error>
    where
        C: ConnectionLike + Send,
    {
        self.run_keys(conn, &[key], args).await
    }

    /// Runs the script on `keys` (all in one slot; the first routes it)
    /// and `args`.
    pub(super) async fn run_keys<C>(
        &self,
        conn: &mut C,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<Value, Error>
    where
        C: ConnectionLike + Send,
    {
        let invocation = |command: &str, script: &[u8]| {
            let mut cmd = redis::cmd(command);
            cmd.arg(script).arg(keys.len()).arg(keys);
            for arg in args {
                cmd.arg(*arg);
            }
            cmd
        };
        match invocation("EVALSHA", self.sha.as_bytes())
            .query_async(conn)
            .await
        {
            Err(e) if e.code() == Some("NOSCRIPT") => invocation("EVAL", self.source.as_bytes())
                .query_async(conn)
                .await
                .map_err(map_redis),
            other => other.map_err(map_redis),
        }
    }
}

/// One page of a scan, from `ARGV[2]` (a `ZRANGEBYLEX` min) to `ARGV[3]`
/// (a max), skipping index entries whose value key has expired, and
/// removing them: they are garbage, and the check happens atomically with
/// the read. Collects up to `ARGV[4]` live keys (with their values unless
/// `ARGV[5]` is "1"), examining at most `ARGV[6]` index entries so that a
/// long run of expired entries cannot keep the server busy in one call, and
/// stopping at the first key whose bytes (key and value) take the page past
/// `ARGV[7]`: that key is still in the reply (it tells the caller that more
/// follow), so a reply is at most the byte budget and one value; `last` is
/// then that key.
///
/// Replies `{exhausted, last, key1, value1, key2, ...}` (no values when keys
/// only): `exhausted` is 1 when the range has no more entries, and `last` is
/// the last entry examined, where the next call continues when the page is
/// not full.
///
/// The value keys are derived from `ARGV[1]` rather than declared: they share
/// the index's hash tag, so they live in its cluster slot.
pub(super) const SCAN_SCRIPT: &str = r#"
local idx = KEYS[1]
local vprefix = ARGV[1]
local min = ARGV[2]
local max = ARGV[3]
local wanted = tonumber(ARGV[4])
local keys_only = ARGV[5] == '1'
local budget = tonumber(ARGV[6])
local max_bytes = tonumber(ARGV[7])
local out = {0, ''}
local found = 0
local examined = 0
local bytes = 0
while found < wanted and examined < budget do
  local n = math.min(wanted - found, budget - examined)
  local members = redis.call('ZRANGEBYLEX', idx, min, max, 'LIMIT', 0, n)
  for _, m in ipairs(members) do
    local vkey = vprefix .. m
    if keys_only then
      if redis.call('EXISTS', vkey) == 1 then
        found = found + 1
        out[#out + 1] = m
        bytes = bytes + #m
        if bytes > max_bytes then
          out[2] = m
          return out
        end
      else
        redis.call('ZREM', idx, m)
      end
    else
      local v = redis.call('GET', vkey)
      if v then
        found = found + 1
        out[#out + 1] = m
        out[#out + 1] = v
        bytes = bytes + #m + #v
        if bytes > max_bytes then
          out[2] = m
          return out
        end
      else
        redis.call('ZREM', idx, m)
      end
    end
  end
  examined = examined + #members
  if #members < n then
    out[1] = 1
    return out
  end
  out[2] = members[#members]
  min = '(' .. members[#members]
end
return out
"#;

/// Removes, from up to `ARGV[3]` index entries after `ARGV[2]` (a
/// `ZRANGEBYLEX` min), those whose value key (`ARGV[1]` + entry) is gone.
/// Replies `{removed, done, last}`; when not done, the next batch starts
/// after `last`.
pub(super) const PURGE_SCRIPT: &str = r#"
local idx = KEYS[1]
local vprefix = ARGV[1]
local batch = tonumber(ARGV[3])
local members = redis.call('ZRANGEBYLEX', idx, ARGV[2], '+', 'LIMIT', 0, batch)
local removed = 0
for _, m in ipairs(members) do
  if redis.call('EXISTS', vprefix .. m) == 0 then
    redis.call('ZREM', idx, m)
    removed = removed + 1
  end
end
if #members < batch then
  return {removed, 1, ''}
end
return {removed, 0, members[#members]}
"#;

/// Index entries one purge script call examines: each call is atomic and
/// blocks the server while it runs, so it must stay short.
const PURGE_BATCH: usize = 1000;

/// Expired index entries one scan script call may step over besides the
/// page itself, for the same reason.
const SCAN_STALE_BUDGET: usize = 1000;

/// The namespace as it appears inside the `{...}` hash tag. Escaping `%` and
/// the braces keeps the mapping one-to-one and the tag closed by our own
/// `}`: an unescaped `}` would end the tag early, and could make two
/// namespaces' keys collide.
pub(super) fn ns_tag(namespace: &str) -> String {
    let mut tag = String::with_capacity(namespace.len());
    for c in namespace.chars() {
        match c {
            '%' => tag.push_str("%25"),
            '{' => tag.push_str("%7B"),
            '}' => tag.push_str("%7D"),
            c => tag.push(c),
        }
    }
    tag
}

/// A sorted-set index and the value keys it lists, under one hash tag, so
/// that an operation's keys are in one cluster slot and change together
/// atomically (MULTI or a script). The single-node backend has one per
/// namespace; the cluster backend one per shard of a namespace.
pub(super) struct Keyspace {
    /// The sorted set of keys.
    pub(super) index: String,
    /// Prefix of the value keys: the value of `key` is at `values + key`.
    pub(super) values: String,
}

impl Keyspace {
    /// The keyspace whose keys start with `P:{tag}:`; `tag` must already be
    /// escaped (see [`ns_tag`]).
    pub(super) fn new(prefix: &str, tag: &str) -> Self {
        Keyspace {
            index: format!("{prefix}:{{{tag}}}:idx"),
            values: format!("{prefix}:{{{tag}}}:v:"),
        }
    }

    /// Runs one single-key operation (not a scan, which may span keyspaces).
    pub(super) async fn run<C>(&self, conn: &mut C, op: Op) -> Result<Outcome, Error>
    where
        C: ConnectionLike + Send,
    {
        match op {
            Op::Get { key } => {
                let vkey = self.values.clone() + &key;
                let (value, pttl): (Option<Bytes>, i64) = redis::pipe()
                    .atomic()
                    .cmd("GET")
                    .arg(&vkey)
                    .cmd("PTTL")
                    .arg(&vkey)
                    .query_async(conn)
                    .await
                    .map_err(map_redis)?;
                Ok(Outcome::Get(value.map(|value| record(value, pttl))))
            }
            Op::Put { key, value, ttl } => {
                let vkey = self.values.clone() + &key;
                let mut pipe = redis::pipe();
                pipe.atomic();
                // SET without KEEPTTL replaces any previous expiry.
                let set = pipe.cmd("SET").arg(&vkey).arg(&value[..]);
                // Redis rejects expiry times past its clock range: a huge
                // TTL is stored as none.
                if let Some(ms) = px_millis(ttl) {
                    set.arg("PX").arg(ms);
                }
                pipe.cmd("ZADD").arg(&self.index).arg(0).arg(&key);
                let () = pipe.query_async(conn).await.map_err(map_redis)?;
                Ok(Outcome::Put)
            }
            Op::Delete { key } => {
                let vkey = self.values.clone() + &key;
                // DEL counts only a live key: an expired one is reclaimed
                // first and does not count.
                let (deleted, _removed): (i64, i64) = redis::pipe()
                    .atomic()
                    .cmd("DEL")
                    .arg(&vkey)
                    .cmd("ZREM")
                    .arg(&self.index)
                    .arg(&key)
                    .query_async(conn)
                    .await
                    .map_err(map_redis)?;
                Ok(Outcome::Delete(deleted > 0))
            }
            Op::Exists { key } => {
                let vkey = self.values.clone() + &key;
                let n: i64 = redis::cmd("EXISTS")
                    .arg(&vkey)
                    .query_async(conn)
                    .await
                    .map_err(map_redis)?;
                Ok(Outcome::Exists(n > 0))
            }
            Op::Scan { .. } => Err(Error::internal("a scan is not a single-key operation")),
        }
    }

    /// Up to `wanted` live keys of `range` in ascending byte order (with
    /// their values unless `keys_only`), removing the index entries of
    /// expired keys on the way, and stopping at the first key that takes
    /// their bytes past `max_bytes` (it is included). Fewer than `wanted`
    /// within `max_bytes` means the range has no more live keys.
    pub(super) async fn scan<C>(
        &self,
        conn: &mut C,
        script: &Script,
        range: &KeyRange<'_>,
        wanted: usize,
        max_bytes: usize,
        keys_only: bool,
    ) -> Result<Vec<Item>, Error>
    where
        C: ConnectionLike + Send,
    {
        if range.is_empty() || wanted == 0 {
            return Ok(Vec::new());
        }
        // The range in ZRANGEBYLEX syntax.
        let mut min = match range.lower() {
            lower if range.lower_is_exclusive() => format!("({lower}"),
            "" => "-".to_owned(),
            lower => format!("[{lower}"),
        };
        let max = range
            .upper()
            .map_or_else(|| "+".to_owned(), |s| format!("({s}"));
        let keys_only_arg: &[u8] = if keys_only { b"1" } else { b"0" };
        let mut items: Vec<Item> = Vec::new();
        let mut bytes = 0usize;
        loop {
            let left = wanted - items.len();
            let budget = left.saturating_add(SCAN_STALE_BUDGET);
            let bytes_left = max_bytes.saturating_sub(bytes);
            let reply = script
                .run(
                    conn,
                    &self.index,
                    &[
                        self.values.as_bytes(),
                        min.as_bytes(),
                        max.as_bytes(),
                        left.to_string().as_bytes(),
                        keys_only_arg,
                        budget.to_string().as_bytes(),
                        bytes_left.to_string().as_bytes(),
                    ],
                )
                .await?;
            let page = ScanReply::parse(reply, keys_only)?;
            bytes = page
                .items
                .iter()
                .map(item_bytes)
                .fold(bytes, usize::saturating_add);
            items.extend(page.items);
            // Past the budget, the page is complete once it holds an item
            // that does not fit; a first item that alone is over the
            // budget still needs the next, which tells whether more follow.
            if page.exhausted || items.len() >= wanted || (bytes > max_bytes && items.len() >= 2) {
                return Ok(items);
            }
            // Not exhausted and not full: the script stopped at one of its
            // budgets after examining at least one entry, so `last` moves
            // forward.
            min = format!("({}", page.last);
        }
    }

    /// Removes the index entries whose value key has expired, in batches;
    /// returns how many.
    pub(super) async fn purge<C>(&self, conn: &mut C, script: &Script) -> Result<u64, Error>
    where
        C: ConnectionLike + Send,
    {
        let batch = PURGE_BATCH.to_string();
        let mut cursor = PurgeCursor {
            conn,
            script,
            keyspace: self,
            batch: &batch,
            min: "-".to_owned(),
        };
        purge_in_batches(&mut cursor, |c| {
            Box::pin(async move {
                let reply = c
                    .script
                    .run(
                        c.conn,
                        &c.keyspace.index,
                        &[
                            c.keyspace.values.as_bytes(),
                            c.min.as_bytes(),
                            c.batch.as_bytes(),
                        ],
                    )
                    .await?;
                let (removed, done, last) = parse_purge_reply(reply)?;
                c.min = format!("({last}");
                Ok(Batch {
                    removed,
                    last: done,
                })
            })
        })
        .await
    }
}

/// A value and its `PTTL` as a record.
fn record(value: Bytes, pttl: i64) -> Record {
    Record {
        value,
        // -1: no expiry. A live key reports at least 1ms: PTTL rounds down,
        // and zero would read as "expired".
        ttl: u64::try_from(pttl)
            .ok()
            .map(|ms| Duration::from_millis(ms.max(1))),
    }
}

/// The `PX` of a write with `ttl`, `None` for no expiry. Redis rejects
/// expiry times past its clock range, so a huge TTL is stored as none; a
/// positive TTL is rounded up so that it never expires on write.
fn px_millis(ttl: Option<Duration>) -> Option<u64> {
    stored_ttl(ttl).map(|ttl| {
        u64::try_from(ttl.as_nanos().div_ceil(1_000_000))
            .unwrap_or(u64::MAX)
            .max(1)
    })
}

/// Reads a value and its remaining TTL: `{}` when absent, else
/// `{value, pttl}`.
const GET_SCRIPT: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then
  return {}
end
return {v, redis.call('PTTL', KEYS[1])}
"#;

/// Writes value `ARGV[2]` to `KEYS[2]` (with `PX ARGV[3]` unless empty) and
/// indexes member `ARGV[1]` in `KEYS[1]`.
const PUT_SCRIPT: &str = r#"
if ARGV[3] == '' then
  redis.call('SET', KEYS[2], ARGV[2])
else
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
end
redis.call('ZADD', KEYS[1], 0, ARGV[1])
return 1
"#;

/// Deletes `KEYS[2]` and unindexes member `ARGV[1]` from `KEYS[1]`;
/// replies how many live keys were deleted.
const DELETE_SCRIPT: &str = r#"
local n = redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return n
"#;

/// The single-key operations as scripts: one command each, for Redis
/// Cluster, whose client follows a `MOVED` or `ASK` redirect of a command
/// but not of the commands inside a `MULTI` (the transaction aborts).
pub(super) struct OpScripts {
    get: Script,
    put: Script,
    delete: Script,
}

impl OpScripts {
    pub(super) async fn load<C>(conn: &mut C) -> Result<Self, Error>
    where
        C: ConnectionLike + Send,
    {
        Ok(OpScripts {
            get: Script::load(conn, GET_SCRIPT).await?,
            put: Script::load(conn, PUT_SCRIPT).await?,
            delete: Script::load(conn, DELETE_SCRIPT).await?,
        })
    }
}

impl Keyspace {
    /// [`run`](Keyspace::run) with one script per operation instead of a
    /// transaction: the same keys, atomic in the same way.
    pub(super) async fn run_scripted<C>(
        &self,
        conn: &mut C,
        scripts: &OpScripts,
        op: Op,
    ) -> Result<Outcome, Error>
    where
        C: ConnectionLike + Send,
    {
        match op {
            Op::Get { key } => {
                let vkey = self.values.clone() + &key;
                match scripts.get.run(conn, &vkey, &[]).await? {
                    Value::Array(reply) => match <[Value; 2]>::try_from(reply) {
                        Ok([Value::BulkString(v), Value::Int(pttl)]) => {
                            Ok(Outcome::Get(Some(record(Bytes::from(v), pttl))))
                        }
                        Ok(other) => Err(unexpected("get", &other)),
                        Err(empty) if empty.is_empty() => Ok(Outcome::Get(None)),
                        Err(other) => Err(unexpected("get", &other)),
                    },
                    other => Err(unexpected("get", &other)),
                }
            }
            Op::Put { key, value, ttl } => {
                let vkey = self.values.clone() + &key;
                let px = px_millis(ttl).map(|ms| ms.to_string()).unwrap_or_default();
                scripts
                    .put
                    .run_keys(
                        conn,
                        &[&self.index, &vkey],
                        &[key.as_bytes(), &value[..], px.as_bytes()],
                    )
                    .await?;
                Ok(Outcome::Put)
            }
            Op::Delete { key } => {
                let vkey = self.values.clone() + &key;
                match scripts
                    .delete
                    .run_keys(conn, &[&self.index, &vkey], &[key.as_bytes()])
                    .await?
                {
                    Value::Int(n) => Ok(Outcome::Delete(n > 0)),
                    other => Err(unexpected("delete", &other)),
                }
            }
            op => self.run(conn, op).await,
        }
    }
}

/// Where a purge of one index is: batches continue after `min`.
struct PurgeCursor<'a, C> {
    conn: &'a mut C,
    script: &'a Script,
    keyspace: &'a Keyspace,
    batch: &'a str,
    min: String,
}

/// The set of namespaces ever written (`P:namespaces`), for purge to visit.
pub(super) struct Registry {
    key: String,
    /// Namespaces this backend has added; a `std` lock, held for one set
    /// operation and never across an await.
    known: Mutex<HashSet<String>>,
}

impl Registry {
    pub(super) fn new(prefix: &str) -> Self {
        Registry {
            key: format!("{prefix}:namespaces"),
            known: Mutex::new(HashSet::new()),
        }
    }

    /// Adds `namespace`, once per backend: the registry is one key outside
    /// the namespace's slot, so it cannot join the namespace's MULTI, and a
    /// registered namespace stays registered.
    pub(super) async fn register<C>(&self, conn: &mut C, namespace: &str) -> Result<(), Error>
    where
        C: ConnectionLike + Send,
    {
        let known = self
            .known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(namespace);
        if known {
            return Ok(());
        }
        let _: i64 = redis::cmd("SADD")
            .arg(&self.key)
            .arg(namespace)
            .query_async(conn)
            .await
            .map_err(map_redis)?;
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(namespace.to_owned());
        Ok(())
    }

    /// Every registered namespace.
    pub(super) async fn members<C>(&self, conn: &mut C) -> Result<Vec<String>, Error>
    where
        C: ConnectionLike + Send,
    {
        redis::cmd("SMEMBERS")
            .arg(&self.key)
            .query_async(conn)
            .await
            .map_err(map_redis)
    }
}

/// Takes the lease when it is free or renews it when this holder has it;
/// replies 1 when the caller holds the lease afterwards, else 0.
const LEASE_SCRIPT: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;

/// Gives the lease up if this holder has it.
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// How long the purge lease lasts unless renewed, by default: the holder
/// renews it at each purge, so an instance that stops purging (it died, or
/// lost Redis) leaves it to another within this time.
pub const DEFAULT_PURGE_LEASE: Duration = Duration::from_secs(10);

/// The purge lease (`P:purge-lease`): the Prism instance whose id it holds
/// purges; the others skip their purges until it expires. One key, in one
/// slot, taken with `SET NX PX` semantics in a script.
pub(super) struct PurgeLease {
    key: String,
    holder: String,
    ttl: Duration,
    acquire: Script,
    release: Script,
    held: AtomicBool,
}

impl PurgeLease {
    /// The lease of the backend with key prefix `prefix`; `holder` names
    /// this backend: the instance id and this backend's incarnation.
    pub(super) async fn load<C>(conn: &mut C, prefix: &str, ttl: Duration) -> Result<Self, Error>
    where
        C: ConnectionLike + Send,
    {
        Ok(PurgeLease {
            key: format!("{prefix}:purge-lease"),
            holder: lease_holder(),
            ttl,
            acquire: Script::load(conn, LEASE_SCRIPT).await?,
            release: Script::load(conn, RELEASE_SCRIPT).await?,
            held: AtomicBool::new(false),
        })
    }

    /// Takes or renews the lease; true when this backend holds it and so
    /// should purge now. Logs when the lease is won or lost.
    pub(super) async fn acquire<C>(&self, conn: &mut C) -> Result<bool, Error>
    where
        C: ConnectionLike + Send,
    {
        let ms = u64::try_from(self.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let reply = self
            .acquire
            .run(
                conn,
                &self.key,
                &[self.holder.as_bytes(), ms.to_string().as_bytes()],
            )
            .await;
        let held = matches!(reply, Ok(Value::Int(1)));
        let was = self.held.swap(held, Ordering::AcqRel);
        if held != was {
            if held {
                tracing::info!(lease = %self.key, holder = %self.holder, "purge lease acquired");
            } else {
                tracing::info!(lease = %self.key, holder = %self.holder, "purge lease lost");
            }
        }
        match reply {
            Ok(Value::Int(_)) => Ok(held),
            Ok(other) => Err(unexpected("lease", &other)),
            Err(e) => Err(e),
        }
    }

    /// True when the last [`acquire`](Self::acquire) won the lease.
    pub(super) fn is_held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// Gives the lease up, if held, so another instance takes over at its
    /// next purge instead of after the lease's TTL.
    pub(super) async fn release<C>(&self, conn: &mut C)
    where
        C: ConnectionLike + Send,
    {
        if self.held.swap(false, Ordering::AcqRel) {
            let _ = self
                .release
                .run(conn, &self.key, &[self.holder.as_bytes()])
                .await;
        }
    }
}

/// The id a backend holds a lease with: the instance id and a number of
/// this process, so that two backends of one process (a restarted pool, two
/// gateways in a test) are distinct holders.
fn lease_holder() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}/{}", instance_id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

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
        let mut conn = self.checkout(deadline).await?;
        match tokio::time::timeout_at(deadline, self.run(&mut conn, namespace, op)).await {
            Ok(Err(Error::Timeout)) | Err(_) => {
                drop(Connection::take(conn));
                Err(Error::Timeout)
            }
            Ok(res) => res,
        }
    }

    /// A pooled connection, waited for until `deadline`.
    async fn checkout(&self, deadline: Instant) -> Result<Connection, Error> {
        until(deadline, async { self.pool.get().await.map_err(map_pool) }).await
    }

    async fn run(&self, conn: &mut Connection, namespace: &str, op: Op) -> Result<Outcome, Error> {
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
                // One item past the page tells whether more follow.
                let items = keyspace
                    .scan(
                        conn,
                        &self.scan,
                        &range,
                        fetch_count(limit),
                        max_bytes,
                        keys_only,
                    )
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
        if !self.lease.acquire(&mut conn).await? {
            return Ok(0);
        }
        let mut purged = 0u64;
        for namespace in self.registry.members(&mut conn).await? {
            purged += self
                .keyspace(&namespace)
                .purge(&mut conn, &self.purge)
                .await?;
        }
        Ok(purged)
    }

    async fn ping(&self) -> Result<(), Error> {
        let deadline = Instant::now() + self.command_timeout;
        let mut conn = self.checkout(deadline).await?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(map_redis)?;
        Ok(())
    }

    async fn shut(&self) {
        let deadline = Instant::now() + self.command_timeout;
        if let Ok(mut conn) = self.checkout(deadline).await {
            let _ = until(deadline, async {
                self.lease.release(&mut conn).await;
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

#[cfg(test)]
mod tests;
