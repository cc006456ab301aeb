//! A test-only backend that is slow, blocks, waits for the test, fails or
//! panics on purpose, chosen by the key, and otherwise stores in a real
//! memory backend:
//!
//! - `panic...`: the handler panics;
//! - `slow/<ms>/...`: takes `<ms>` milliseconds (1000 without a number);
//! - `block/...`: never finishes (until cancelled);
//! - `hold/...`: waits until the test opens [`Probe::gate`];
//! - `fail/...`: answers UNAVAILABLE.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prism::backend::memory::MemoryConnector;
use prism::backend::{Backend, BoxFuture, Connector, Error, Op, Outcome};
use tokio::sync::Notify;

use super::eventually;

/// Counters the test reads.
#[derive(Default)]
pub struct Probe {
    /// Operations whose future was dropped before it finished.
    pub cancelled: AtomicU64,
    /// Operations that started.
    pub started: AtomicU64,
    /// connect() calls: one per pool actor incarnation.
    pub connects: AtomicU64,
    /// Holds `hold/` operations until opened.
    pub gate: Gate,
}

/// Waits until `counter` (of a [`Probe`]) reaches `n`, for up to `within`.
pub async fn reaches(counter: &AtomicU64, n: u64, within: Duration) -> bool {
    eventually(within, || async { counter.load(Ordering::SeqCst) >= n }).await
}

/// A gate that stays open once opened.
#[derive(Default)]
pub struct Gate {
    open: AtomicBool,
    opened: Notify,
}

impl Gate {
    /// Lets every held operation, and every later one, through.
    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.opened.notify_waiters();
    }

    async fn pass(&self) {
        loop {
            // Registered before the check, so an open() in between is seen.
            let opened = self.opened.notified();
            tokio::pin!(opened);
            opened.as_mut().enable();
            if self.open.load(Ordering::SeqCst) {
                return;
            }
            opened.await;
        }
    }
}

pub struct FaultyConnector {
    inner: MemoryConnector,
    pub probe: Arc<Probe>,
}

impl FaultyConnector {
    pub fn new() -> (Arc<Self>, Arc<Probe>) {
        let probe = Arc::new(Probe::default());
        (
            Arc::new(FaultyConnector {
                inner: MemoryConnector::new(),
                probe: probe.clone(),
            }),
            probe,
        )
    }
}

impl Connector for FaultyConnector {
    fn kind(&self) -> &'static str {
        "faulty"
    }
    fn connect(&self) -> BoxFuture<'_, Result<Arc<dyn Backend>, Error>> {
        Box::pin(async move {
            self.probe.connects.fetch_add(1, Ordering::SeqCst);
            let inner = self.inner.connect().await?;
            Ok(Arc::new(Faulty {
                inner,
                probe: self.probe.clone(),
            }) as Arc<dyn Backend>)
        })
    }
}

struct Faulty {
    inner: Arc<dyn Backend>,
    probe: Arc<Probe>,
}

struct CancelGuard(Arc<Probe>, bool);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn key_of(op: &Op) -> &str {
    match op {
        Op::Get { key } | Op::Delete { key } | Op::Exists { key } => key,
        Op::Put { key, .. } => key,
        Op::Scan { prefix, .. } => prefix,
    }
}

impl Backend for Faulty {
    fn exec<'a>(&'a self, namespace: &'a str, op: Op) -> BoxFuture<'a, Result<Outcome, Error>> {
        Box::pin(async move {
            self.probe.started.fetch_add(1, Ordering::SeqCst);
            let mut guard = CancelGuard(self.probe.clone(), false);
            let key = key_of(&op).to_owned();
            if key.starts_with("panic") {
                panic!("faulty backend asked to panic");
            }
            if let Some(rest) = key.strip_prefix("slow/") {
                let ms: u64 = rest
                    .split('/')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1000);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if key.starts_with("block/") {
                std::future::pending::<()>().await;
            }
            if key.starts_with("hold/") {
                self.probe.gate.pass().await;
            }
            if key.starts_with("fail/") {
                guard.1 = true;
                return Err(Error::Unavailable("faulty backend asked to fail".into()));
            }
            let r = self.inner.exec(namespace, op).await;
            guard.1 = true;
            r
        })
    }
    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, Error>> {
        self.inner.purge_expired()
    }
    fn health(&self) -> BoxFuture<'_, Result<(), Error>> {
        self.inner.health()
    }
    fn close(&self) -> BoxFuture<'_, ()> {
        self.inner.close()
    }
}
