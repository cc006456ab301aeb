//! The way requests reach a pool actor's backend.
//!
//! While the actor has a live backend it publishes it in its [`Gate`], and a
//! request runs its operation in the caller's own task, bounded by the same
//! admission limits the actor would apply (`pool_size` running, `queue` more
//! waiting for a slot). A request crosses no mailbox and no extra task: on a
//! database backend the only wake-up left is the database's answer. The
//! actor keeps what needs one owner: connecting, health checks, purges,
//! restarts after a failure (a panicking operation is reported to it), and
//! the graceful stop, which withdraws the backend and waits for the
//! operations running on it before closing it.
//!
//! While the actor has no live backend (it is connecting or restarting), a
//! request queues in the actor's mailbox, as [`PoolMsg::Exec`], and runs
//! when the next incarnation is up, or ends at its deadline.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use prism_actors::{catch_panic, Addr};
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{map_backend_error, record, BackendHealth, PoolActor, PoolConfig, PoolMsg};
use crate::backend::{Backend, Error as BackendError, Op, Outcome};
use crate::error::ApiError;

/// A backend incarnation as requests see it.
#[derive(Clone)]
pub(super) struct Live {
    pub(super) generation: u64,
    pub(super) backend: Arc<dyn Backend>,
    /// Cancelled when the incarnation fails: its operations are cut off.
    pub(super) failed: CancellationToken,
}

/// What a pool actor shares with the requests that run on its backend.
pub struct Gate {
    live: RwLock<Option<Live>>,
    /// Operations running at once (`pool_size`).
    pub(super) permits: Arc<Semaphore>,
    /// Operations admitted, running or waiting for a permit (`pool_size +
    /// queue`); past it, RESOURCE_EXHAUSTED.
    pub(super) admitted: Arc<Semaphore>,
    pool_size: u32,
    queue: usize,
    /// Operations running in callers' tasks on the published backend.
    running: AtomicUsize,
    /// Woken when `running` drops to zero.
    idle: Notify,
}

impl Gate {
    /// A gate with the admission limits of `config`, with no backend yet.
    pub fn new(config: &PoolConfig) -> Self {
        let pool_size = config.pool_size.max(1) as usize;
        Gate {
            live: RwLock::new(None),
            permits: Arc::new(Semaphore::new(pool_size)),
            admitted: Arc::new(Semaphore::new(pool_size + config.queue.max(1))),
            pool_size: config.pool_size,
            queue: config.queue,
            running: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }

    /// Publishes `live` for requests to run on.
    pub(super) fn open(&self, live: Live) {
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Some(live);
    }

    /// Withdraws the backend: requests from now on queue in the mailbox.
    /// Operations already running go on (see [`Gate::wait_idle`]), unless
    /// the incarnation `failed`: then they end at once with UNAVAILABLE.
    pub(super) fn close(&self, failed: bool) {
        let live = self.live.write().unwrap_or_else(|p| p.into_inner()).take();
        if let (Some(live), true) = (live, failed) {
            live.failed.cancel();
        }
    }

    /// Waits until no operation runs on a backend this gate published.
    pub(super) async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            let mut idle = std::pin::pin!(idle);
            idle.as_mut().enable();
            if self.running.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// The published backend, counted as running until the guard drops.
    /// The count is taken under the same lock `close` takes, so once
    /// `close` returns, `wait_idle` sees every operation that got a backend.
    fn enter(&self) -> Option<(Live, Running<'_>)> {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        let live = live.as_ref()?.clone();
        self.running.fetch_add(1, Ordering::AcqRel);
        Some((live, Running(self)))
    }
}

/// One operation running on a published backend.
struct Running<'a>(&'a Gate);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A pool actor as the requests of its namespaces see it.
#[derive(Clone)]
pub struct Pool {
    /// The actor's address.
    pub addr: Addr<PoolActor>,
    /// Its backend's health and circuit breaker.
    pub health: Arc<BackendHealth>,
    /// The backend it publishes, and its admission limits.
    pub gate: Arc<Gate>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("addr", &self.addr)
            .field("pool_size", &self.gate.pool_size)
            .field("queue", &self.gate.queue)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// Runs `op` for `namespace` and returns its outcome, by `deadline`.
    /// `permit` is the caller's in-flight slot in its session, held until
    /// the operation ends.
    pub async fn exec(
        &self,
        namespace: &Arc<str>,
        op: Op,
        deadline: Instant,
        caller_bound: bool,
        permit: OwnedSemaphorePermit,
    ) -> Result<Outcome, ApiError> {
        match self.gate.enter() {
            Some((live, _running)) => {
                let res = self.run(&live, namespace, op, deadline, caller_bound).await;
                drop(permit);
                res
            }
            None => {
                self.queue(namespace, op, deadline, caller_bound, permit)
                    .await
            }
        }
    }

    /// Runs `op` on `live` in the caller's task.
    async fn run(
        &self,
        live: &Live,
        namespace: &Arc<str>,
        op: Op,
        deadline: Instant,
        caller_bound: bool,
    ) -> Result<Outcome, ApiError> {
        let backend = &live.backend;
        if backend.is_inline() {
            let res = catch_panic(backend.exec_until(namespace, op, deadline)).await;
            return self.settle(live, namespace, Some(res), caller_bound);
        }
        // Admission is decided at once; the wait for a free slot is bounded
        // by the deadline.
        let Ok(_admitted) = self.gate.admitted.try_acquire() else {
            return Err(ApiError::ResourceExhausted(format!(
                "backend of namespace '{namespace}' is saturated ({} running, {} waiting)",
                self.gate.pool_size, self.gate.queue
            )));
        };
        // One timer bounds both the wait for a slot and the operation; which
        // of the two the deadline cut short decides the answer.
        let running = AtomicBool::new(false);
        let work = async {
            let Ok(_slot) = self.gate.permits.acquire().await else {
                return Err(ApiError::Unavailable("backend pool closed".into()));
            };
            running.store(true, Ordering::Relaxed);
            let res = catch_panic(backend.exec_until(namespace, op, deadline)).await;
            self.settle(live, namespace, Some(res), caller_bound)
        };
        // Whichever comes first: the outcome, the deadline, or the
        // incarnation failing. Dropping this future (the caller went away)
        // drops the backend's, which cancels the call.
        tokio::select! {
            biased;
            res = tokio::time::timeout_at(deadline, work) => match res {
                Ok(res) => res,
                Err(_) if running.load(Ordering::Relaxed) => self.settle(live, namespace, None, caller_bound),
                Err(_) => Err(ApiError::DeadlineExceeded("waiting for a backend connection")),
            },
            () = live.failed.cancelled() => Err(ApiError::Unavailable(format!(
                "backend of namespace '{namespace}' failed during the request; retry"
            ))),
        }
    }

    /// The outcome of an operation as the client sees it (`None`: it ran
    /// past its deadline), fed to the breaker; a panic is reported to the
    /// actor, which fails and is restarted.
    fn settle(
        &self,
        live: &Live,
        namespace: &str,
        res: Option<Result<Result<Outcome, BackendError>, String>>,
        caller_bound: bool,
    ) -> Result<Outcome, ApiError> {
        match res {
            None => {
                record(&self.health, &Err(BackendError::Timeout), caller_bound);
                Err(ApiError::DeadlineExceeded("in the backend"))
            }
            Some(Err(panic)) => {
                let addr = self.addr.clone();
                let generation = live.generation;
                tokio::spawn(async move {
                    let _ = addr.tell(PoolMsg::Crashed { generation, panic }).await;
                });
                Err(ApiError::Internal)
            }
            Some(Ok(r)) => {
                record(&self.health, &r, caller_bound);
                r.map_err(|e| map_backend_error(namespace, e))
            }
        }
    }

    /// Queues `op` in the actor's mailbox, for the next incarnation.
    async fn queue(
        &self,
        namespace: &Arc<str>,
        op: Op,
        deadline: Instant,
        caller_bound: bool,
        permit: OwnedSemaphorePermit,
    ) -> Result<Outcome, ApiError> {
        let (reply, rx) = oneshot::channel();
        let msg = PoolMsg::Exec {
            namespace: namespace.clone(),
            op,
            deadline,
            caller_bound,
            permit: Some(permit),
            reply,
        };
        if let Err(e) = self.addr.try_tell(msg) {
            let owner = format!("backend of namespace '{namespace}'");
            return Err(ApiError::rejected(
                &e,
                &owner,
                "its pool mailbox (backends.<name>.mailbox)",
            ));
        }
        debug!(namespace = %namespace, "backend restarting, request queued");
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(res)) => res,
            // The pool actor dropped the request: it failed (and is being
            // restarted) while the request was queued or running.
            Ok(Err(_)) => Err(ApiError::Unavailable(format!(
                "backend of namespace '{namespace}' failed during the request; retry"
            ))),
            Err(_) => Err(ApiError::DeadlineExceeded("waiting for the backend")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use prism_actors::ChildSpec;

    use super::*;
    use crate::backend::memory::MemoryConnector;
    use crate::backend::{BoxFuture, Connector};
    use crate::pool::BreakerConfig;

    /// A test backend whose operations wait until released, one for each
    /// permit added to `release`.
    struct Held {
        release: Semaphore,
    }

    impl Held {
        fn new() -> Arc<Self> {
            Arc::new(Held {
                release: Semaphore::new(0),
            })
        }
    }

    impl Backend for Held {
        fn exec<'a>(
            &'a self,
            _namespace: &'a str,
            _op: Op,
        ) -> BoxFuture<'a, Result<Outcome, BackendError>> {
            Box::pin(async move {
                self.release.acquire().await.unwrap().forget();
                Ok(Outcome::Put)
            })
        }
        fn purge_expired(&self) -> BoxFuture<'_, Result<u64, BackendError>> {
            Box::pin(async { Ok(0) })
        }
        fn health(&self) -> BoxFuture<'_, Result<(), BackendError>> {
            Box::pin(async { Ok(()) })
        }
        fn close(&self) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    /// A pool whose actor never runs: whatever reaches its mailbox stays
    /// there.
    fn pool() -> Pool {
        let config = PoolConfig {
            pool_size: 2,
            queue: 2,
            purge_interval: Duration::from_secs(60),
            health_interval: Duration::from_secs(60),
        };
        let spec = ChildSpec::with_mailbox("pool:test", 4, || -> PoolActor {
            unreachable!("the actor of this pool is never started")
        });
        Pool {
            addr: spec.addr(),
            health: Arc::new(BackendHealth::new("test".into(), BreakerConfig::default())),
            gate: Arc::new(Gate::new(&config)),
        }
    }

    fn open(pool: &Pool, backend: Arc<dyn Backend>) -> CancellationToken {
        let failed = CancellationToken::new();
        pool.gate.open(Live {
            generation: 1,
            backend,
            failed: failed.clone(),
        });
        failed
    }

    /// Waits until `n` operations run on the published backend.
    async fn until_running(pool: &Pool, n: usize) {
        let started = Instant::now();
        while pool.gate.running.load(Ordering::Acquire) < n {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "operations did not start"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn permit() -> OwnedSemaphorePermit {
        Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap()
    }

    fn put(key: &str) -> Op {
        Op::Put {
            key: key.into(),
            value: Bytes::from_static(b"v"),
            ttl: None,
        }
    }

    /// A put with a distant deadline, running in a task of its own.
    fn spawn_put(pool: &Pool, key: &str) -> tokio::task::JoinHandle<Result<Outcome, ApiError>> {
        let (pool, op) = (pool.clone(), put(key));
        tokio::spawn(async move {
            let ns: Arc<str> = "n".into();
            pool.exec(&ns, op, after(30_000), false, permit()).await
        })
    }

    fn after(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[tokio::test]
    async fn a_request_runs_on_the_published_backend_without_crossing_the_mailbox() {
        let pool = pool();
        open(&pool, MemoryConnector::new().connect().await.unwrap());
        let ns: Arc<str> = "n".into();
        let put = pool.exec(&ns, put("k"), after(5_000), false, permit());
        assert!(matches!(put.await, Ok(Outcome::Put)));
        let get = pool.exec(
            &ns,
            Op::Get { key: "k".into() },
            after(5_000),
            false,
            permit(),
        );
        match get.await {
            Ok(Outcome::Get(Some(r))) => assert_eq!(&r.value[..], b"v"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn without_a_published_backend_a_request_waits_in_the_mailbox_until_its_deadline() {
        let pool = pool();
        let ns: Arc<str> = "n".into();
        let res = pool.exec(&ns, put("k"), after(50), false, permit()).await;
        match res {
            Err(ApiError::DeadlineExceeded(at)) => assert_eq!(at, "waiting for the backend"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_failed_incarnation_cuts_its_running_operations_off() {
        let pool = pool();
        open(&pool, Held::new());
        let running = spawn_put(&pool, "k");
        until_running(&pool, 1).await;
        pool.gate.close(true);
        let res = tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("the operation was not cut off")
            .unwrap();
        match res {
            Err(ApiError::Unavailable(m)) => {
                assert!(m.contains("failed during the request"), "{m}")
            }
            other => panic!("unexpected {other:?}"),
        }
        pool.gate.wait_idle().await;
    }

    #[tokio::test]
    async fn a_graceful_close_waits_for_the_operations_running_on_the_backend() {
        let pool = pool();
        let held = Held::new();
        open(&pool, held.clone());
        let running = spawn_put(&pool, "k");
        until_running(&pool, 1).await;
        pool.gate.close(false);
        let early = tokio::time::timeout(Duration::from_millis(100), pool.gate.wait_idle()).await;
        assert!(
            early.is_err(),
            "the close did not wait for the running operation"
        );
        held.release.add_permits(1);
        tokio::time::timeout(Duration::from_secs(5), pool.gate.wait_idle())
            .await
            .expect("the close never saw the operation end");
        assert!(matches!(running.await.unwrap(), Ok(Outcome::Put)));
    }

    #[tokio::test]
    async fn past_pool_size_and_queue_a_request_is_refused_at_once() {
        let pool = pool();
        let held = Held::new();
        open(&pool, held.clone());
        let ns: Arc<str> = "n".into();
        // Two run (pool_size) and two wait (queue).
        let running: Vec<_> = (0..4).map(|i| spawn_put(&pool, &format!("k{i}"))).collect();
        until_running(&pool, 4).await;
        // The two waiting hold their admission before this one asks.
        let started = Instant::now();
        while pool.gate.admitted.available_permits() > 0 {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "operations not admitted"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        match pool
            .exec(&ns, put("over"), after(30_000), false, permit())
            .await
        {
            Err(ApiError::ResourceExhausted(m)) => assert!(m.contains("saturated"), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
        held.release.add_permits(4);
        for r in running {
            let res = tokio::time::timeout(Duration::from_secs(5), r).await;
            assert!(matches!(res, Ok(Ok(Ok(Outcome::Put)))), "{res:?}");
        }
    }
}
