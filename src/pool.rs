//! The pool actor: one per configured backend. It owns the backend's
//! connection pool, runs up to `pool_size` operations at once, purges expired
//! entries and checks health in the background, and fails (to be restarted by
//! the backends supervisor) when an operation panics or the backend stays
//! unhealthy. Requests run on its backend through its [`Gate`], in their
//! own tasks, while it has one (see `gate.rs`).

mod gate;

pub use gate::{Gate, Pool};

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prism_actors::{catch_panic, Actor, Addr, BoxError, Context, ExitReason, Reply};
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use crate::backend::{Backend, Connector, Error as BackendError, Op, Outcome, PoolStats};
use crate::error::ApiError;

/// Consecutive failed health checks after which the pool actor fails and is
/// restarted (which reconnects).
const HEALTH_FAILURES_BEFORE_RESTART: u32 = 3;

/// What a pool actor needs besides its connector.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Operations run at once.
    pub pool_size: u32,
    /// Operations that may wait for a free slot; past it, RESOURCE_EXHAUSTED.
    pub queue: usize,
    /// How often expired entries are deleted.
    pub purge_interval: Duration,
    /// How often the backend is pinged.
    pub health_interval: Duration,
}

/// Circuit breaker settings.
#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit.
    pub failures: u32,
    /// How long an open circuit rejects requests before a probe is let through.
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 5,
            cooldown: Duration::from_secs(1),
        }
    }
}

/// The state of a backend's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    /// Requests flow.
    Closed,
    /// Requests are rejected at once until the cool-down ends.
    Open,
    /// One probe request is in flight; the rest are rejected.
    HalfOpen,
}

impl Circuit {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open => "open",
            Circuit::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
enum BreakerState {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { since: Instant },
}

/// Live health and circuit breaker of one backend, shared by its pool actor
/// (which reports results), the sessions (which consult it before sending)
/// and readiness. It outlives pool actor restarts.
#[derive(Debug)]
pub struct BackendHealth {
    backend: Arc<str>,
    up: AtomicBool,
    failures: AtomicU32,
    in_use: AtomicU32,
    idle: AtomicU32,
    breaker: BreakerConfig,
    /// True while the circuit is closed with no failure counted: the fast
    /// path of every request reads only this.
    clear: AtomicBool,
    state: std::sync::Mutex<BreakerState>,
    last_error: std::sync::Mutex<Option<String>>,
    /// [`PURGE_UNCOORDINATED`], [`PURGE_LEADER`] or [`PURGE_STANDBY`]: what
    /// the last purge found.
    purge_role: AtomicU8,
    /// Purges this instance ran (as leader, or uncoordinated).
    purges: AtomicU64,
}

const PURGE_UNCOORDINATED: u8 = 0;
const PURGE_LEADER: u8 = 1;
const PURGE_STANDBY: u8 = 2;

impl Default for BackendHealth {
    fn default() -> Self {
        Self::new("unnamed".into(), BreakerConfig::default())
    }
}

/// What the breaker said about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead.
    Pass,
    /// Go ahead as the half-open probe: its result decides the circuit.
    Probe,
    /// The circuit is open: answer UNAVAILABLE at once.
    Reject,
}

impl BackendHealth {
    /// The health of backend `backend`, down until its pool actor connects,
    /// with this breaker.
    pub fn new(backend: Arc<str>, breaker: BreakerConfig) -> Self {
        BackendHealth {
            backend,
            up: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            in_use: AtomicU32::new(0),
            idle: AtomicU32::new(0),
            breaker,
            clear: AtomicBool::new(true),
            state: std::sync::Mutex::new(BreakerState::Closed { failures: 0 }),
            last_error: std::sync::Mutex::new(None),
            purge_role: AtomicU8::new(PURGE_UNCOORDINATED),
            purges: AtomicU64::new(0),
        }
    }

    /// Whether this instance purges the backend (`Some(true)`: it holds the
    /// purge lease or lock) or leaves it to another instance
    /// (`Some(false)`), as of the last purge; `None` for a backend that
    /// purges without coordination (or before the first purge).
    pub fn purge_leader(&self) -> Option<bool> {
        match self.purge_role.load(Ordering::Acquire) {
            PURGE_LEADER => Some(true),
            PURGE_STANDBY => Some(false),
            _ => None,
        }
    }

    /// Purges this instance has run on the backend since it started.
    pub fn purges(&self) -> u64 {
        self.purges.load(Ordering::Acquire)
    }

    /// Records a finished purge: the backend's leadership, and a purge run
    /// here unless another instance holds the lease or lock.
    fn record_purge(&self, leader: Option<bool>) {
        let role = match leader {
            Some(true) => PURGE_LEADER,
            Some(false) => PURGE_STANDBY,
            None => PURGE_UNCOORDINATED,
        };
        self.purge_role.store(role, Ordering::Release);
        if leader != Some(false) {
            self.purges.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        // The state is replaced whole; a poisoned lock still holds a valid one.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when the backend is connected and its last health check passed.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Consecutive failed health checks.
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::Acquire)
    }

    /// Connection pool figures at the last health check.
    pub fn connections(&self) -> PoolStats {
        PoolStats {
            in_use: self.in_use.load(Ordering::Acquire),
            idle: self.idle.load(Ordering::Acquire),
        }
    }

    /// The circuit's state now.
    pub fn circuit(&self) -> Circuit {
        match *self.lock() {
            BreakerState::Closed { .. } => Circuit::Closed,
            BreakerState::Open { .. } => Circuit::Open,
            BreakerState::HalfOpen { .. } => Circuit::HalfOpen,
        }
    }

    /// The last failure seen, for readiness reports.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, up: bool) {
        self.up.store(up, Ordering::Release);
    }

    fn note_error(&self, e: &str) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_owned());
    }

    /// Asks the breaker whether a request may go to the backend.
    pub fn admit(&self) -> Admission {
        if self.clear.load(Ordering::Acquire) {
            return Admission::Pass;
        }
        let mut st = self.lock();
        let now = Instant::now();
        match *st {
            BreakerState::Closed { .. } => Admission::Pass,
            // A probe that never reported back (dropped, refused) does not
            // keep the circuit half-open forever. While the pool actor is
            // down (restarting) there is no probe: it would wait out its
            // deadline in the mailbox; the reconnect is the probe then.
            BreakerState::Open { until } | BreakerState::HalfOpen { since: until }
                if now >= until && self.is_up() =>
            {
                *st = BreakerState::HalfOpen {
                    since: now + self.breaker.cooldown,
                };
                Admission::Probe
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen { .. } => Admission::Reject,
        }
    }

    /// A request or health check succeeded: the circuit closes.
    pub fn record_success(&self) {
        if self.clear.load(Ordering::Acquire) {
            return;
        }
        let mut st = self.lock();
        self.clear.store(true, Ordering::Release);
        if !matches!(*st, BreakerState::Closed { failures: 0 }) {
            if !matches!(*st, BreakerState::Closed { .. }) {
                info!(backend = %self.backend, "circuit closed");
            }
            *st = BreakerState::Closed { failures: 0 };
        }
    }

    /// A request or health check failed because of the backend.
    pub fn record_failure(&self, error: &str) {
        self.note_error(error);
        let mut st = self.lock();
        self.clear.store(false, Ordering::Release);
        let open = match *st {
            BreakerState::Closed { failures } => {
                let failures = failures + 1;
                if failures >= self.breaker.failures {
                    true
                } else {
                    *st = BreakerState::Closed { failures };
                    false
                }
            }
            BreakerState::HalfOpen { .. } => true,
            BreakerState::Open { .. } => false,
        };
        if open {
            warn!(
                backend = %self.backend,
                cooldown_ms = self.breaker.cooldown.as_millis() as u64,
                error,
                "circuit opened"
            );
            *st = BreakerState::Open {
                until: Instant::now() + self.breaker.cooldown,
            };
        }
    }

    /// The pool actor failed: open the circuit at once, so that requests fail
    /// fast while it restarts instead of waiting in its mailbox.
    pub fn trip(&self, error: &str) {
        self.set(false);
        self.note_error(error);
        let mut st = self.lock();
        self.clear.store(false, Ordering::Release);
        if matches!(
            *st,
            BreakerState::Closed { .. } | BreakerState::HalfOpen { .. }
        ) {
            warn!(
                backend = %self.backend,
                cooldown_ms = self.breaker.cooldown.as_millis() as u64,
                error,
                "circuit opened"
            );
        }
        *st = BreakerState::Open {
            until: Instant::now() + self.breaker.cooldown,
        };
    }
}

/// Messages of the pool actor.
pub enum PoolMsg {
    /// Run an operation and reply with its outcome.
    Exec {
        /// The namespace.
        namespace: Arc<str>,
        /// The operation.
        op: Op,
        /// The request's deadline.
        deadline: Instant,
        /// The deadline is the caller's, shorter than the namespace's
        /// timeout: running into it is not a backend failure.
        caller_bound: bool,
        /// The caller's admission slot, released when the operation ends.
        permit: Option<OwnedSemaphorePermit>,
        /// Where the outcome goes.
        reply: Reply<Result<Outcome, ApiError>>,
    },
    /// Delete expired entries (sent by the purge ticker).
    Purge,
    /// Ping the backend (sent by the health ticker).
    Health,
    /// A health check of incarnation `generation` ended.
    HealthResult {
        /// The incarnation that ran the check.
        generation: u64,
        /// Its result.
        result: Result<(), String>,
    },
    /// The purge of incarnation `generation` ended.
    PurgeDone {
        /// The incarnation that ran it.
        generation: u64,
    },
    /// An operation of incarnation `generation` panicked: fail it.
    Crashed {
        /// The incarnation that ran it.
        generation: u64,
        /// The panic message.
        panic: String,
    },
}

/// Incarnation numbers, so that the results of a failed incarnation's
/// background work do not count against the next one.
static GENERATION: AtomicU64 = AtomicU64::new(1);

/// How long the connection pool of a failed incarnation is given to close.
/// A pool whose server is gone may keep reconnecting for minutes.
const FAILED_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The pool actor of one backend.
pub struct PoolActor {
    backend_name: Arc<str>,
    connector: Arc<dyn Connector>,
    config: PoolConfig,
    health: Arc<BackendHealth>,
    backend: Option<Arc<dyn Backend>>,
    generation: u64,
    /// The backend as requests see it, and the admission limits.
    gate: Arc<Gate>,
    tasks: JoinSet<()>,
    tickers: Vec<AbortHandle>,
    purging: bool,
}

impl PoolActor {
    /// A pool actor that connects through `connector` when it starts and
    /// publishes its backend in `gate` (made from the same `config`; it
    /// outlives incarnations, as `health` does).
    pub fn new(
        backend_name: Arc<str>,
        connector: Arc<dyn Connector>,
        config: PoolConfig,
        health: Arc<BackendHealth>,
        gate: Arc<Gate>,
    ) -> Self {
        PoolActor {
            backend_name,
            connector,
            config,
            health,
            backend: None,
            generation: 0,
            gate,
            tasks: JoinSet::new(),
            tickers: Vec::new(),
            purging: false,
        }
    }

    fn ticker(addr: Addr<PoolActor>, every: Duration, make: fn() -> PoolMsg) -> AbortHandle {
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval.tick().await;
            loop {
                interval.tick().await;
                // A full mailbox already means work; skip this tick. A closed
                // one means the actor is gone for good.
                if let Err(prism_actors::SendError::Closed(_)) = addr.try_tell(make()) {
                    break;
                }
            }
        })
        .abort_handle()
    }
}

/// Feeds an operation's result to the breaker: only failures of the
/// backend itself count, not a bad request, and a timeout only when the
/// deadline was the namespace's `timeout` (a bound the backend should
/// meet), not a shorter one the caller chose (`caller_bound`).
fn record(health: &BackendHealth, r: &Result<Outcome, BackendError>, caller_bound: bool) {
    match r {
        Ok(_) => health.record_success(),
        Err(BackendError::Timeout) if caller_bound => {
            debug!("operation ran past its caller's deadline, not counted against the backend")
        }
        Err(e @ (BackendError::Unavailable(_) | BackendError::Timeout)) => {
            health.record_failure(&e.chain().to_string())
        }
        Err(BackendError::Internal(_)) => {}
    }
}

/// Backend errors as the client sees them: generic, while the cause is
/// logged here with its chain.
fn map_backend_error(namespace: &str, e: BackendError) -> ApiError {
    match e {
        BackendError::Unavailable(_) => {
            warn!(namespace, error = %e.chain(), "backend unavailable");
            ApiError::Unavailable(format!("backend of namespace '{namespace}' is unavailable"))
        }
        BackendError::Timeout => ApiError::DeadlineExceeded("in the backend"),
        BackendError::Internal(_) => {
            warn!(namespace, error = %e.chain(), "backend operation failed");
            ApiError::Internal
        }
    }
}

impl Actor for PoolActor {
    type Msg = PoolMsg;

    async fn started(&mut self, ctx: &mut Context<Self>) -> Result<(), BoxError> {
        let backend = match self.connector.connect().await {
            Ok(b) => b,
            Err(e) => {
                self.health.trip(&e.chain().to_string());
                return Err(Box::new(e));
            }
        };
        self.backend = Some(backend.clone());
        self.generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        self.gate.open(gate::Live {
            generation: self.generation,
            backend,
            failed: tokio_util::sync::CancellationToken::new(),
        });
        self.health.failures.store(0, Ordering::Release);
        self.health.set(true);
        self.health.record_success();
        let addr = ctx.addr();
        self.tickers.push(Self::ticker(
            addr.clone(),
            self.config.purge_interval,
            || PoolMsg::Purge,
        ));
        self.tickers
            .push(Self::ticker(addr, self.config.health_interval, || {
                PoolMsg::Health
            }));
        info!(backend = %self.backend_name, kind = self.connector.kind(), pool_size = self.config.pool_size, "backend connected");
        Ok(())
    }

    async fn handle(&mut self, msg: PoolMsg, ctx: &mut Context<Self>) -> Result<(), BoxError> {
        // Reap finished operations so the set does not grow.
        while self.tasks.try_join_next().is_some() {}
        let Some(backend) = self.backend.clone() else {
            return Err("pool actor has no backend".into());
        };
        match msg {
            PoolMsg::Exec {
                namespace,
                op,
                deadline,
                caller_bound,
                permit,
                mut reply,
            } => {
                if reply.is_closed() {
                    debug!(backend = %self.backend_name, "caller went away while queued, skipped");
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    let _ = reply.send(Err(ApiError::DeadlineExceeded(
                        "while queued for the backend",
                    )));
                    return Ok(());
                }
                if backend.is_inline() {
                    let res = match catch_panic(backend.exec_until(&namespace, op, deadline)).await
                    {
                        Ok(r) => {
                            record(&self.health, &r, caller_bound);
                            r.map_err(|e| map_backend_error(&namespace, e))
                        }
                        Err(panic) => {
                            let _ = reply.send(Err(ApiError::Internal));
                            return Err(format!("operation panicked: {panic}").into());
                        }
                    };
                    drop(permit);
                    let _ = reply.send(res);
                    return Ok(());
                }
                // Admission is bounded here, at once, and the wait for a free
                // slot happens in the operation's own task: the actor never
                // blocks, so health checks and failures are handled promptly
                // even when every slot is busy.
                let Ok(admitted) = self.gate.admitted.clone().try_acquire_owned() else {
                    let _ = reply.send(Err(ApiError::ResourceExhausted(format!(
                        "backend of namespace '{namespace}' is saturated ({} running, {} waiting)",
                        self.config.pool_size, self.config.queue
                    ))));
                    return Ok(());
                };
                let permits = self.gate.permits.clone();
                let me = ctx.addr();
                let generation = self.generation;
                let health = self.health.clone();
                let span = tracing::debug_span!("op", backend = %self.backend_name, namespace = %namespace, op = op.name());
                self.tasks.spawn(
                    async move {
                        let _slots = (permit, admitted);
                        let _running = tokio::select! {
                            biased;
                            p = permits.acquire_owned() => match p {
                                Ok(p) => p,
                                Err(_) => return,
                            },
                            _ = reply.closed() => return,
                            _ = tokio::time::sleep_until(deadline) => {
                                let _ = reply.send(Err(ApiError::DeadlineExceeded("waiting for a backend connection")));
                                return;
                            }
                        };
                        // Whichever comes first: the caller going away (the
                        // backend future is dropped, which cancels the call),
                        // the deadline, or the result.
                        let res = tokio::select! {
                            biased;
                            _ = reply.closed() => None,
                            r = tokio::time::timeout_at(deadline, catch_panic(backend.exec_until(&namespace, op, deadline))) => Some(r),
                        };
                        match res {
                            // The request core gives up at the deadline too,
                            // and may drop the reply a moment before this
                            // task's own timer fires: gone at the deadline
                            // is a timeout, gone before it a caller that
                            // left, which says nothing about the backend.
                            None if Instant::now() >= deadline => {
                                record(&health, &Err(BackendError::Timeout), caller_bound);
                                debug!("operation ran past its deadline, cancelled");
                            }
                            None => debug!("caller went away, operation cancelled"),
                            Some(Err(_)) => {
                                record(&health, &Err(BackendError::Timeout), caller_bound);
                                let _ = reply.send(Err(ApiError::DeadlineExceeded("in the backend")));
                            }
                            Some(Ok(Err(panic))) => {
                                let _ = reply.send(Err(ApiError::Internal));
                                let _ = me.tell(PoolMsg::Crashed { generation, panic }).await;
                            }
                            Some(Ok(Ok(r))) => {
                                record(&health, &r, caller_bound);
                                let _ = reply.send(r.map_err(|e| map_backend_error(&namespace, e)));
                            }
                        }
                    }
                    .instrument(span),
                );
            }
            PoolMsg::Purge => {
                if self.purging {
                    return Ok(());
                }
                let Ok(permit) = self.gate.permits.clone().try_acquire_owned() else {
                    return Ok(());
                };
                self.purging = true;
                let name = self.backend_name.clone();
                let me = ctx.addr();
                let generation = self.generation;
                let health = self.health.clone();
                self.tasks.spawn(async move {
                    let _permit = permit;
                    // Over a shared database, the backend purges only while
                    // this instance holds the purge lease or lock.
                    match backend.purge_expired().await {
                        Ok(n) => {
                            health.record_purge(backend.purge_leader());
                            if n > 0 {
                                debug!(backend = %name, purged = n, "expired entries purged");
                            }
                        }
                        Err(e) => warn!(backend = %name, error = %e.chain(), "purge failed"),
                    }
                    let _ = me.tell(PoolMsg::PurgeDone { generation }).await;
                });
            }
            PoolMsg::Health => {
                let me = ctx.addr();
                let generation = self.generation;
                let timeout = self.config.health_interval.max(Duration::from_millis(100));
                self.tasks.spawn(async move {
                    let result = match tokio::time::timeout(timeout, backend.health()).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(e.chain().to_string()),
                        Err(_) => Err("health check timed out".to_owned()),
                    };
                    let _ = me.tell(PoolMsg::HealthResult { generation, result }).await;
                });
            }
            // Results of an earlier incarnation's work say nothing about
            // this one's connections.
            PoolMsg::PurgeDone { generation }
            | PoolMsg::HealthResult { generation, .. }
            | PoolMsg::Crashed { generation, .. }
                if generation != self.generation => {}
            PoolMsg::PurgeDone { .. } => self.purging = false,
            PoolMsg::HealthResult { result, .. } => {
                let stats = backend.connections();
                self.health.in_use.store(stats.in_use, Ordering::Release);
                self.health.idle.store(stats.idle, Ordering::Release);
                match result {
                    Ok(()) => {
                        if !self.health.is_up() {
                            info!(backend = %self.backend_name, "backend healthy again");
                        }
                        self.health.failures.store(0, Ordering::Release);
                        self.health.set(true);
                        self.health.record_success();
                    }
                    Err(e) => {
                        let n = self.health.failures.fetch_add(1, Ordering::AcqRel) + 1;
                        self.health.set(false);
                        self.health.record_failure(&e);
                        warn!(backend = %self.backend_name, failures = n, error = %e, "backend health check failed");
                        if n >= HEALTH_FAILURES_BEFORE_RESTART {
                            return Err(format!("{n} consecutive health checks failed: {e}").into());
                        }
                    }
                }
            }
            PoolMsg::Crashed { panic, .. } => {
                return Err(format!("operation panicked: {panic}").into());
            }
        }
        Ok(())
    }

    async fn stopped(
        &mut self,
        reason: &ExitReason,
        _ctx: &mut Context<Self>,
    ) -> Result<(), BoxError> {
        // Requests from now on queue for the next incarnation; a failed
        // incarnation's running operations end now.
        self.gate.close(reason.is_failure());
        // First, so that requests fail fast while this incarnation cleans up
        // and the next one starts.
        if reason.is_failure() {
            self.health.trip(&reason.to_string());
        }
        for t in self.tickers.drain(..) {
            t.abort();
        }
        let graceful = matches!(reason, ExitReason::Shutdown | ExitReason::Normal);
        if graceful {
            // A graceful stop lets every running operation finish and reply,
            // those in the actor's tasks and those in callers' tasks.
            while self.tasks.join_next().await.is_some() {}
            self.gate.wait_idle().await;
        } else {
            // A failed incarnation cuts the operations of its tasks off; their
            // callers get UNAVAILABLE. Operations running in callers' tasks
            // end with their result or at their deadline, on the old pool,
            // which closes in the background.
            self.tasks.shutdown().await;
        }
        if let Some(backend) = self.backend.take() {
            if graceful {
                backend.close().await;
            } else {
                // The restart does not wait for the old pool: it closes in
                // the background, given up on after a bound.
                let name = self.backend_name.clone();
                tokio::spawn(async move {
                    if tokio::time::timeout(FAILED_CLOSE_TIMEOUT, backend.close())
                        .await
                        .is_err()
                    {
                        warn!(backend = %name, timeout_ms = FAILED_CLOSE_TIMEOUT.as_millis() as u64, "old connection pool did not close in time, dropped");
                    }
                });
            }
        }
        if !reason.is_failure() && !matches!(reason, ExitReason::Restart) {
            self.health.set(false);
        }
        Ok(())
    }
}

/// One backend of a running gateway, as the admin plane reports it.
#[derive(Clone)]
pub struct BackendHandle {
    /// The backend's name.
    pub name: String,
    /// Its kind, as written in its settings.
    pub kind: String,
    /// Its live health.
    pub health: Arc<BackendHealth>,
}
