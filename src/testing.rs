//! Test support, behind the `test-util` feature: a real gateway in-process
//! ([`TestServer`]) and the backend conformance suite ([`conformance`]),
//! for Prism's own tests and for backends written elsewhere.
//!
//! ```toml
//! [dev-dependencies]
//! prism = { version = "0.1", features = ["test-util"] }
//! ```
//!
//! This is test code: its checks fail by panicking, as assertions do.

pub mod conformance;
mod server;

use std::future::Future;
use std::time::Duration;

pub use server::TestServer;

use crate::backend::BoxFuture;

/// A suffix no other test (or test run, or process) uses, for the tables and
/// key prefixes that isolate tests on shared servers.
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}_{}_{}",
        nanos % 1_000_000_000_000,
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `f` until it returns true or `timeout` passes; tells which.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How long a clean-up may take before it is given up.
const CLEANUP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs an asynchronous clean-up when dropped, whether the test passed or
/// failed: removes the tables or keys a test made on a shared server.
pub struct Cleanup {
    work: Option<Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>>,
}

impl Cleanup {
    /// A guard that runs `work` when dropped.
    pub fn new<F, Fut>(work: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Cleanup {
            work: Some(Box::new(move || Box::pin(work()))),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Some(work) = self.work.take() else {
            return;
        };
        // A drop inside the test's runtime cannot block on a future: the
        // clean-up runs on a thread with a runtime of its own, and the drop
        // waits for it so that the next test finds the server clean.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            // Bounded: a server that stops answering must not hang the
            // test run; what is left behind has names no other test uses.
            rt.block_on(async {
                let _ = tokio::time::timeout(CLEANUP_PATIENCE, work()).await;
            });
        });
        let _ = cleanup.join();
    }
}
