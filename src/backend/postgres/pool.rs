//! The backend's pool of PostgreSQL connections: deadpool over sqlx
//! connections, so that taking a connection and giving it back happen in
//! the operation's own task and cost no round trip.
//!
//! sqlx's own pool pings every connection it takes back, in a task of its
//! own: a wake-up and a round trip after every answer. Here a connection
//! goes back as it is, and that is safe only because of what may go back:
//! a connection whose last exchange with the server ended cleanly (an
//! answer, or an error the server sent without ending the session). One
//! whose operation was cut off, or whose driver reported an I/O, protocol
//! or `FATAL` error, is taken out of the pool and closed (see
//! [`Checkout`]). A connection idle for [`PING_WHEN_IDLE`] or more is
//! pinged before use, which replaces one the server or the network dropped
//! meanwhile.
//!
//! A small task of the backend (see [`Reaper`]) closes idle connections
//! above `min_connections` after `idle_timeout` and connections past
//! `max_lifetime`, and opens connections up to `min_connections` again.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use deadpool::managed::{
    self, Metrics, Object, PoolError, QueueMode, RecycleError, RecycleResult, TimeoutType, Timeouts,
};
use deadpool::Runtime;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgDatabaseError, PgSeverity};
use sqlx::Connection as _;
use tokio::task::JoinHandle;

use super::{map_sqlx, PostgresConfig};
use crate::backend::{context, Error, PoolStats};

/// A pooled connection idle for at least this long is pinged before an
/// operation gets it, so one the server or the network dropped meanwhile
/// is replaced instead of failing the operation. One used less long ago
/// ended its last exchange with the server cleanly a moment ago (nothing
/// else goes back to the pool).
///
/// Idleness is counted from the connection's last checkout (deadpool's
/// [`Metrics::last_used`]), so a connection that was busy for a second or
/// more is pinged too: never less often than a clock started at its return.
pub(super) const PING_WHEN_IDLE: Duration = Duration::from_secs(1);

/// Opens the backend's pooled connections and checks them before reuse.
pub(super) struct Manager {
    /// The backend's options with the resting `statement_timeout` as a
    /// startup parameter.
    pub(super) options: PgConnectOptions,
    pub(super) max_lifetime: Option<Duration>,
}

impl managed::Manager for Manager {
    type Type = PgConnection;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<PgConnection, sqlx::Error> {
        PgConnection::connect_with(&self.options).await
    }

    /// Refuses a connection past its `max_lifetime` (deadpool then opens
    /// another) and pings one idle for [`PING_WHEN_IDLE`]; everything else
    /// goes to its next user without a round trip.
    async fn recycle(
        &self,
        conn: &mut PgConnection,
        metrics: &Metrics,
    ) -> RecycleResult<sqlx::Error> {
        if is_expired(metrics, self.max_lifetime) {
            return Err(RecycleError::message(
                "postgres connection reached its max_lifetime",
            ));
        }
        if metrics.last_used() >= PING_WHEN_IDLE {
            conn.ping().await?;
        }
        Ok(())
    }
}

fn is_expired(metrics: &Metrics, max_lifetime: Option<Duration>) -> bool {
    max_lifetime.is_some_and(|max| metrics.age() >= max)
}

/// The pool: cheap to clone, so an operation that outlives its caller
/// (see `PostgresBackend::exec_bounded`) can own it.
pub(super) type Pool = managed::Pool<Manager>;

/// A pool for `config` whose connections start with `options`, holding
/// `min_connections` open connections. Fails when they cannot be opened
/// within `acquire_timeout`.
pub(super) async fn open(
    options: PgConnectOptions,
    config: &PostgresConfig,
) -> Result<Pool, Error> {
    let max = config.max_connections.max(1);
    let wait = config.acquire_timeout;
    let pool = Pool::builder(Manager {
        options,
        max_lifetime: config.max_lifetime,
    })
    .max_size(usize::try_from(max).unwrap_or(usize::MAX))
    // The most recently used connection is handed out first: under light
    // load the same few connections serve (and stay within
    // `PING_WHEN_IDLE`), while the others stay idle long enough for
    // `idle_timeout` to close them.
    .queue_mode(QueueMode::Lifo)
    .wait_timeout(Some(wait))
    .create_timeout(Some(wait))
    // A ping that does not answer in time discards the connection;
    // deadpool opens another.
    .recycle_timeout(Some(wait))
    .runtime(Runtime::Tokio1)
    .build()
    .map_err(|e| Error::Internal(context("cannot build the postgres pool", e)))?;
    let min = min_size(config);
    match tokio::time::timeout(wait, fill(&pool, min, &pool.timeouts())).await {
        Ok(Ok(())) => Ok(pool),
        Ok(Err(e)) => {
            pool.close();
            Err(e)
        }
        Err(_) => {
            pool.close();
            Err(Error::unavailable("timed out connecting to postgres"))
        }
    }
}

/// `min_connections`, at most the pool's size.
fn min_size(config: &PostgresConfig) -> usize {
    let min = config.min_connections.min(config.max_connections.max(1));
    usize::try_from(min).unwrap_or(usize::MAX)
}

/// Opens connections until the pool holds `min`. The idle connections are
/// checked out on the way (and given back), since deadpool opens a new one
/// only when none is idle.
async fn fill(pool: &Pool, min: usize, timeouts: &Timeouts) -> Result<(), Error> {
    let mut held = Vec::new();
    while pool.status().size < min {
        held.push(pool.timeout_get(timeouts).await.map_err(map_pool)?);
    }
    Ok(())
}

/// Closes `conns` politely (a `Terminate` each), for at most `patience`:
/// they are idle, so nothing is cut short.
async fn close_all(conns: Vec<PgConnection>, patience: Duration) {
    let _ = tokio::time::timeout(patience, async {
        for conn in conns {
            let _ = conn.close().await;
        }
    })
    .await;
}

/// Closes `pool`: its idle connections now (politely, within `patience`),
/// the ones in use when they come back. Checkouts fail from now on.
pub(super) async fn close(pool: &Pool, patience: Duration) {
    let idle = pool.retain(|_, _| false).removed;
    pool.close();
    close_all(idle, patience).await;
}

/// The pool's figures.
pub(super) fn stats(pool: &Pool) -> PoolStats {
    let status = pool.status();
    PoolStats::from_counts(status.size, status.available)
}

/// The backend's task that closes idle connections above
/// `min_connections` after `idle_timeout` and idle connections past
/// `max_lifetime`, and opens connections up to `min_connections` again. It
/// lives until [`Reaper::stop`], or until the backend is dropped.
pub(super) struct Reaper {
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Shortest pause between two rounds of the reaper.
const REAP_FLOOR: Duration = Duration::from_millis(10);

impl Reaper {
    /// Starts the reaper of `pool`, made with `config`, unless there is
    /// nothing to reap (neither `idle_timeout` nor `max_lifetime`).
    pub(super) fn start(pool: &Pool, config: &PostgresConfig) -> Reaper {
        let limit = match (config.idle_timeout, config.max_lifetime) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // A quarter of the shorter limit: a connection goes at most a
        // quarter late.
        let task = limit.map(|limit| {
            let rules = Rules {
                min: min_size(config),
                idle_timeout: config.idle_timeout,
                max_lifetime: config.max_lifetime,
                patience: config.acquire_timeout,
            };
            tokio::spawn(run_reaper(pool.weak(), (limit / 4).max(REAP_FLOOR), rules))
        });
        Reaper {
            task: Mutex::new(task),
        }
    }

    /// Stops the task and waits until it has ended.
    pub(super) async fn stop(&self) {
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let task = self.task.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = task.take() {
            task.abort();
        }
    }
}

/// What the reaper keeps.
struct Rules {
    min: usize,
    idle_timeout: Option<Duration>,
    max_lifetime: Option<Duration>,
    /// Bound of opening a connection and of closing the reaped ones.
    patience: Duration,
}

impl Rules {
    /// Takes the idle connections to close out of `pool`: every one past
    /// `max_lifetime`, and, the longest idle first, those idle for
    /// `idle_timeout` as long as `min` connections are left.
    fn reap(&self, pool: &Pool) -> Vec<PgConnection> {
        let mut size = pool.status().size;
        // The idle connections, oldest returned first.
        pool.retain(|_, metrics| {
            let idle_too_long = self.idle_timeout.is_some_and(|t| metrics.last_used() >= t);
            let keep =
                !is_expired(&metrics, self.max_lifetime) && (!idle_too_long || size <= self.min);
            if !keep {
                size = size.saturating_sub(1);
            }
            keep
        })
        .removed
    }
}

/// The reaper's loop: every `every`, closes what `rules` reap and opens
/// connections up to their minimum. A pool that is gone or closed ends it.
async fn run_reaper(pool: managed::WeakPool<Manager>, every: Duration, rules: Rules) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once; the pool was just filled.
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        if pool.is_closed() {
            return;
        }
        let reaped = rules.reap(&pool);
        close_all(reaped, rules.patience).await;
        // Only when no connection is free does this wait for one (not at
        // all): the pool is busy then, and more than `min` are open.
        let timeouts = Timeouts {
            wait: Some(Duration::ZERO),
            ..pool.timeouts()
        };
        if let Err(e) = fill(&pool, rules.min, &timeouts).await {
            tracing::debug!(error = %e.chain(), "cannot open postgres connections up to min_connections");
        }
    }
}

/// A pooled connection that goes back to the pool only when its user
/// finished with it cleanly. Dropped in the middle of a statement (its
/// future cancelled), or left unfinished after an error that may have
/// broken it, it is taken out of the pool and closed: its protocol state is
/// unknown, and nothing checks a connection given back before its next use
/// (see [`PING_WHEN_IDLE`]).
pub(super) struct Checkout {
    /// `Some` from checkout until drop.
    conn: Option<Object<Manager>>,
    finished: bool,
}

impl Checkout {
    /// A connection from `pool`, waiting at most `acquire_timeout`.
    pub(super) async fn get(pool: &Pool) -> Result<Checkout, Error> {
        let conn = pool.get().await.map_err(map_pool)?;
        Ok(Checkout {
            conn: Some(conn),
            finished: false,
        })
    }

    /// Marks the connection as fit to go back to the pool.
    pub(super) fn finished(&mut self) {
        self.finished = true;
    }

    /// Marks the connection as fit to go back to the pool when `result`, of
    /// its last exchange with the server, leaves it usable (see
    /// [`leaves_usable`]).
    pub(super) fn finished_after<T>(&mut self, result: &Result<T, sqlx::Error>) {
        if leaves_usable(result) {
            self.finished();
        }
    }
}

/// Whether a connection can serve again after `result` of a statement: an
/// answer, or an error the server sent without ending the session (a
/// constraint, a cancelled statement). An I/O, TLS, protocol or decoding
/// error, or a `FATAL` one after which the server closes the session,
/// leaves the connection in a state nobody knows.
pub(super) fn leaves_usable<T>(result: &Result<T, sqlx::Error>) -> bool {
    match result {
        Ok(_) => true,
        Err(sqlx::Error::Database(db)) => !db
            .try_downcast_ref::<PgDatabaseError>()
            .is_some_and(|pg| matches!(pg.severity(), PgSeverity::Fatal | PgSeverity::Panic)),
        Err(_) => false,
    }
}

impl std::ops::Deref for Checkout {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn
            .as_deref()
            .expect("a checkout holds its connection until dropped")
    }
}

impl std::ops::DerefMut for Checkout {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
            .as_deref_mut()
            .expect("a checkout holds its connection until dropped")
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if !self.finished {
            if let Some(conn) = self.conn.take() {
                // Out of the pool, which may open another in its place;
                // dropping the connection closes its socket, and the server
                // ends the session once it reads the end of the stream.
                drop(Object::take(conn));
            }
        }
    }
}

/// Not getting a connection, for whatever reason, makes the backend
/// unavailable, except for errors of our own making.
pub(super) fn map_pool(e: PoolError<sqlx::Error>) -> Error {
    let unavailable =
        |message: &str, e: PoolError<sqlx::Error>| Error::Unavailable(context(message, e));
    match e {
        PoolError::Timeout(TimeoutType::Wait) => {
            unavailable("postgres connection pool exhausted", e)
        }
        PoolError::Timeout(TimeoutType::Create) => {
            unavailable("timed out connecting to postgres", e)
        }
        PoolError::Timeout(TimeoutType::Recycle) => {
            unavailable("timed out checking a pooled postgres connection", e)
        }
        PoolError::Closed => unavailable("postgres connection pool closed", e),
        PoolError::Backend(e) => map_sqlx(e),
        PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => {
            Error::Internal(context("postgres pool", e))
        }
    }
}
