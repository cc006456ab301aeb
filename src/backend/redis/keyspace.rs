//! The keys of a namespace in Redis: the Lua scripts of each operation and
//! of scans and purges, the namespace registry purges walk.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use deadpool_redis::redis::aio::ConnectionLike;
use deadpool_redis::redis::{self, Value};

use super::*;
use crate::backend::toolkit::{item_bytes, purge_in_batches, stored_ttl, Batch, KeyRange};
use crate::backend::{Error, Item, Outcome, Record};

/// A Lua script, run by its SHA1 digest. The digest comes from `SCRIPT LOAD`
/// at connect; a server that has lost its script cache since (restart,
/// failover, `SCRIPT FLUSH`), or a cluster node that never had it, gets the
/// source again.
pub(in crate::backend) struct Script {
    pub(in crate::backend) source: &'static str,
    pub(in crate::backend) sha: String,
}

impl Script {
    pub(in crate::backend) async fn load<C>(
        conn: &mut C,
        source: &'static str,
    ) -> Result<Script, Error>
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
    pub(in crate::backend) async fn run<C>(
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
    pub(in crate::backend) async fn run_keys<C>(
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
pub(in crate::backend) const SCAN_SCRIPT: &str = r#"
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
pub(in crate::backend) const PURGE_SCRIPT: &str = r#"
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
pub(in crate::backend) const PURGE_BATCH: usize = 1000;

/// Expired index entries one scan script call may step over besides the
/// page itself, for the same reason.
pub(in crate::backend) const SCAN_STALE_BUDGET: usize = 1000;

/// The namespace as it appears inside the `{...}` hash tag. Escaping `%` and
/// the braces keeps the mapping one-to-one and the tag closed by our own
/// `}`: an unescaped `}` would end the tag early, and could make two
/// namespaces' keys collide.
pub(in crate::backend) fn ns_tag(namespace: &str) -> String {
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
pub(in crate::backend) struct Keyspace {
    /// The sorted set of keys.
    pub(in crate::backend) index: String,
    /// Prefix of the value keys: the value of `key` is at `values + key`.
    pub(in crate::backend) values: String,
}

impl Keyspace {
    /// The keyspace whose keys start with `P:{tag}:`; `tag` must already be
    /// escaped (see [`ns_tag`]).
    pub(in crate::backend) fn new(prefix: &str, tag: &str) -> Self {
        // Built by hand: `format!` costs several times as much, on every
        // operation.
        let mut values = String::with_capacity(prefix.len() + tag.len() + 8);
        values.push_str(prefix);
        values.push_str(":{");
        values.push_str(tag);
        values.push_str("}:");
        let mut index = String::with_capacity(values.len() + 3);
        index.push_str(&values);
        index.push_str("idx");
        values.push_str("v:");
        Keyspace { index, values }
    }

    /// Runs one single-key operation (not a scan, which may span keyspaces).
    pub(in crate::backend) async fn run<C>(&self, conn: &mut C, op: Op) -> Result<Outcome, Error>
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
    pub(in crate::backend) async fn scan<C>(
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
    pub(in crate::backend) async fn purge<C>(
        &self,
        conn: &mut C,
        script: &Script,
    ) -> Result<u64, Error>
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
pub(in crate::backend) fn record(value: Bytes, pttl: i64) -> Record {
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
pub(in crate::backend) fn px_millis(ttl: Option<Duration>) -> Option<u64> {
    stored_ttl(ttl).map(|ttl| {
        u64::try_from(ttl.as_nanos().div_ceil(1_000_000))
            .unwrap_or(u64::MAX)
            .max(1)
    })
}

/// Reads a value and its remaining TTL: `{}` when absent, else
/// `{value, pttl}`.
pub(in crate::backend) const GET_SCRIPT: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then
  return {}
end
return {v, redis.call('PTTL', KEYS[1])}
"#;

/// Writes value `ARGV[2]` to `KEYS[2]` (with `PX ARGV[3]` unless empty) and
/// indexes member `ARGV[1]` in `KEYS[1]`.
pub(in crate::backend) const PUT_SCRIPT: &str = r#"
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
pub(in crate::backend) const DELETE_SCRIPT: &str = r#"
local n = redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return n
"#;

/// The single-key operations as scripts: one command each, for Redis
/// Cluster, whose client follows a `MOVED` or `ASK` redirect of a command
/// but not of the commands inside a `MULTI` (the transaction aborts).
pub(in crate::backend) struct OpScripts {
    get: Script,
    put: Script,
    delete: Script,
}

impl OpScripts {
    pub(in crate::backend) async fn load<C>(conn: &mut C) -> Result<Self, Error>
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
    pub(in crate::backend) async fn run_scripted<C>(
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
pub(in crate::backend) struct PurgeCursor<'a, C> {
    conn: &'a mut C,
    script: &'a Script,
    keyspace: &'a Keyspace,
    batch: &'a str,
    min: String,
}

/// The set of namespaces ever written (`P:namespaces`), for purge to visit.
pub(in crate::backend) struct Registry {
    key: String,
    /// Namespaces this backend has added; a `std` lock, held for one set
    /// operation and never across an await.
    known: Mutex<HashSet<String>>,
}

impl Registry {
    pub(in crate::backend) fn new(prefix: &str) -> Self {
        Registry {
            key: format!("{prefix}:namespaces"),
            known: Mutex::new(HashSet::new()),
        }
    }

    /// Adds `namespace`, once per backend: the registry is one key outside
    /// the namespace's slot, so it cannot join the namespace's MULTI, and a
    /// registered namespace stays registered.
    pub(in crate::backend) async fn register<C>(
        &self,
        conn: &mut C,
        namespace: &str,
    ) -> Result<(), Error>
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
    pub(in crate::backend) async fn members<C>(&self, conn: &mut C) -> Result<Vec<String>, Error>
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
