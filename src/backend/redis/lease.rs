//! The purge lease: which of the Prism instances sharing a Redis purges.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use deadpool_redis::redis::aio::ConnectionLike;
use deadpool_redis::redis::Value;

use super::*;
use crate::backend::toolkit::instance_id;
use crate::backend::Error;

/// Takes the lease when it is free or renews it when this holder has it;
/// replies 1 when the caller holds the lease afterwards, else 0.
pub(in crate::backend) const LEASE_SCRIPT: &str = r#"
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
pub(in crate::backend) const RELEASE_SCRIPT: &str = r#"
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
pub(in crate::backend) struct PurgeLease {
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
    pub(in crate::backend) async fn load<C>(
        conn: &mut C,
        prefix: &str,
        ttl: Duration,
    ) -> Result<Self, Error>
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
    pub(in crate::backend) async fn acquire<C>(&self, conn: &mut C) -> Result<bool, Error>
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
    pub(in crate::backend) fn is_held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// Gives the lease up, if held, so another instance takes over at its
    /// next purge instead of after the lease's TTL.
    pub(in crate::backend) async fn release<C>(&self, conn: &mut C)
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
pub(in crate::backend) fn lease_holder() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}/{}", instance_id(), NEXT.fetch_add(1, Ordering::Relaxed))
}
