//! The in-memory backend: one ordered map per namespace, in process.
//!
//! The data belongs to the [`MemoryConnector`], not to the backend it hands
//! out, so a pool actor that restarts (and connects again) finds its data
//! where it left it. Nothing is persisted across a process restart.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::toolkit::{stored_ttl, KeyRange, PageBuilder};
use super::{Backend, BoxFuture, Connector, Error, Item, Op, Outcome, Record};

/// Connects memory backends that all share one store (clones share it too).
#[derive(Debug, Default, Clone)]
pub struct MemoryConnector {
    store: Arc<Store>,
}

impl MemoryConnector {
    /// A connector with an empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Connector for MemoryConnector {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn connect(&self) -> BoxFuture<'_, Result<Arc<dyn Backend>, Error>> {
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend {
            store: Arc::clone(&self.store),
        });
        Box::pin(async move { Ok(backend) })
    }
}

/// A value and its expiry.
#[derive(Debug)]
struct Entry {
    value: Bytes,
    expires_at: Option<Instant>,
}

impl Entry {
    fn is_live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }
}

type Keyspace = BTreeMap<String, Entry>;

/// Every namespace's keyspace.
///
/// The locks are `std` locks, not tokio's: no operation awaits while holding
/// one, each critical section is a few map operations, and a std lock is
/// much cheaper on this hot path. The outer lock is only written when a
/// namespace is first written to; each namespace has its own lock so that
/// namespaces do not contend with each other, and reads of one namespace
/// proceed in parallel.
#[derive(Debug, Default)]
struct Store {
    namespaces: RwLock<HashMap<String, Arc<RwLock<Keyspace>>>>,
}

impl Store {
    /// The namespace's keyspace, if anything was ever written to it.
    fn find(&self, namespace: &str) -> Option<Arc<RwLock<Keyspace>>> {
        // A poisoned lock only means another thread panicked while holding
        // it; every critical section leaves the maps consistent (single map
        // operations), so the data is still good to use.
        let namespaces = self
            .namespaces
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        namespaces.get(namespace).cloned()
    }

    /// The namespace's keyspace, created when missing.
    fn find_or_create(&self, namespace: &str) -> Arc<RwLock<Keyspace>> {
        if let Some(keyspace) = self.find(namespace) {
            return keyspace;
        }
        let mut namespaces = self
            .namespaces
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(namespaces.entry(namespace.to_owned()).or_default())
    }

    fn keyspaces(&self) -> Vec<Arc<RwLock<Keyspace>>> {
        let namespaces = self
            .namespaces
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        namespaces.values().cloned().collect()
    }
}

/// A handle on the connector's store.
struct MemoryBackend {
    store: Arc<Store>,
}

impl MemoryBackend {
    fn run(&self, namespace: &str, op: Op) -> Outcome {
        let now = Instant::now();
        match op {
            Op::Get { key } => Outcome::Get(self.get(namespace, &key, now)),
            Op::Put { key, value, ttl } => {
                self.put(namespace, key, value, ttl, now);
                Outcome::Put
            }
            Op::Delete { key } => Outcome::Delete(self.delete(namespace, &key, now)),
            Op::Exists { key } => Outcome::Exists(self.exists(namespace, &key, now)),
            Op::Scan {
                prefix,
                after,
                limit,
                max_bytes,
                keys_only,
            } => {
                let page = PageBuilder::new(limit, max_bytes);
                self.scan(namespace, &prefix, after.as_deref(), page, keys_only, now)
            }
        }
    }

    fn get(&self, namespace: &str, key: &str, now: Instant) -> Option<Record> {
        let keyspace = self.store.find(namespace)?;
        let keyspace = keyspace.read().unwrap_or_else(PoisonError::into_inner);
        let entry = keyspace.get(key).filter(|e| e.is_live(now))?;
        Some(Record {
            value: entry.value.clone(),
            ttl: entry.expires_at.map(|at| at.saturating_duration_since(now)),
        })
    }

    fn put(&self, namespace: &str, key: String, value: Bytes, ttl: Option<Duration>, now: Instant) {
        // TTLs from MAX_TTL up, and any too large for the clock to
        // represent, are for every practical purpose no expiry.
        let expires_at = stored_ttl(ttl).and_then(|ttl| now.checked_add(ttl));
        // The value may be a slice of a larger request buffer; copy it so a
        // small stored value does not pin the whole buffer for its lifetime.
        let value = Bytes::copy_from_slice(&value);
        let keyspace = self.store.find_or_create(namespace);
        let mut keyspace = keyspace.write().unwrap_or_else(PoisonError::into_inner);
        keyspace.insert(key, Entry { value, expires_at });
    }

    fn delete(&self, namespace: &str, key: &str, now: Instant) -> bool {
        let Some(keyspace) = self.store.find(namespace) else {
            return false;
        };
        let mut keyspace = keyspace.write().unwrap_or_else(PoisonError::into_inner);
        // An expired entry is removed too (it is garbage), but did not exist.
        keyspace.remove(key).is_some_and(|e| e.is_live(now))
    }

    fn exists(&self, namespace: &str, key: &str, now: Instant) -> bool {
        let Some(keyspace) = self.store.find(namespace) else {
            return false;
        };
        let keyspace = keyspace.read().unwrap_or_else(PoisonError::into_inner);
        keyspace.get(key).is_some_and(|e| e.is_live(now))
    }

    fn scan(
        &self,
        namespace: &str,
        prefix: &str,
        after: Option<&str>,
        mut page: PageBuilder,
        keys_only: bool,
        now: Instant,
    ) -> Outcome {
        let range = KeyRange::new(prefix, after);
        let Some(keyspace) = self.store.find(namespace).filter(|_| !range.is_empty()) else {
            return page.finish();
        };
        let keyspace = keyspace.read().unwrap_or_else(PoisonError::into_inner);
        // `str` orders bytewise, which is the order the API promises.
        let live = keyspace
            .range::<str, _>((range.start(), range.end()))
            .filter(|(_, e)| e.is_live(now));
        for (k, e) in live {
            let item = Item {
                key: k.clone(),
                value: if keys_only {
                    Bytes::new()
                } else {
                    e.value.clone()
                },
            };
            if !page.offer(item) {
                break;
            }
        }
        page.finish()
    }

    fn purge(&self, now: Instant) -> u64 {
        let mut purged = 0u64;
        // One namespace at a time, so readers of other namespaces are never
        // blocked by a purge.
        for keyspace in self.store.keyspaces() {
            let mut keyspace = keyspace.write().unwrap_or_else(PoisonError::into_inner);
            let before = keyspace.len();
            keyspace.retain(|_, e| e.is_live(now));
            purged += (before - keyspace.len()) as u64;
        }
        purged
    }
}

impl Backend for MemoryBackend {
    fn exec<'a>(&'a self, namespace: &'a str, op: Op) -> BoxFuture<'a, Result<Outcome, Error>> {
        // Completes on its first poll, as `is_inline` promises the pool actor.
        Box::pin(async move { Ok(self.run(namespace, op)) })
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, Error>> {
        Box::pin(async move { Ok(self.purge(Instant::now())) })
    }

    fn health(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        // The data belongs to the connector and must outlive this handle.
        Box::pin(async {})
    }

    fn is_inline(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::MemoryConnector;
    use crate::backend::{Backend, Connector, Op, Outcome};

    async fn fresh() -> (Arc<dyn Backend>, ()) {
        let backend = MemoryConnector::new().connect().await.expect("connect");
        (backend, ())
    }

    async fn put(b: &dyn Backend, key: &str) {
        let op = Op::Put {
            key: key.into(),
            value: Bytes::from_static(b"v"),
            ttl: None,
        };
        assert_eq!(b.exec("ns", op).await.expect("put"), Outcome::Put);
    }

    async fn exists(b: &dyn Backend, key: &str) -> bool {
        match b
            .exec("ns", Op::Exists { key: key.into() })
            .await
            .expect("exists")
        {
            Outcome::Exists(e) => e,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn data_survives_a_reconnect_of_the_same_connector() {
        let connector = MemoryConnector::new();
        let first = connector.connect().await.expect("connect");
        put(&*first, "k").await;
        first.close().await;
        drop(first);
        let second = connector.connect().await.expect("reconnect");
        assert!(exists(&*second, "k").await);
        assert_eq!(connector.kind(), "memory");
    }

    #[tokio::test]
    async fn separate_connectors_do_not_share_data() {
        let a = MemoryConnector::new().connect().await.expect("connect");
        let b = MemoryConnector::new().connect().await.expect("connect");
        put(&*a, "k").await;
        assert!(!exists(&*b, "k").await);
    }

    #[tokio::test]
    async fn operations_are_inline_and_safe_to_run_from_many_threads() {
        let (b, ()) = fresh().await;
        assert!(b.is_inline());
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let b = Arc::clone(&b);
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .expect("runtime");
                    rt.block_on(async {
                        for i in 0..500 {
                            put(&*b, &format!("t{t}/{i:03}")).await;
                        }
                    });
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer thread");
        }
        match b
            .exec(
                "ns",
                Op::Scan {
                    prefix: String::new(),
                    after: None,
                    limit: 10_000,
                    max_bytes: usize::MAX,
                    keys_only: true,
                },
            )
            .await
            .expect("scan")
        {
            Outcome::Scan { items, more } => {
                assert_eq!(items.len(), 2000);
                assert!(!more);
            }
            other => panic!("{other:?}"),
        }
    }
}
