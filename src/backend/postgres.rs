//! The PostgreSQL backend: one table keyed by (namespace, key), shared by
//! every Prism instance that points at it.
//!
//! Keys use the `"C"` collation, so comparisons, the primary-key index and
//! `ORDER BY key` all follow the bytewise UTF-8 order the API promises for
//! scans. Expiry is a `TIMESTAMPTZ` computed from the database's `now()`, never
//! from a gateway's clock, so several gateways agree on what has expired.
//!
//! Deadlines reach the server as the session's `statement_timeout`. A
//! future dropped at its deadline leaves its statement running on the
//! server and its connection busy until the statement ends; the statement
//! timeout makes the server cancel it at about the same moment, so the
//! connection comes back to the pool instead of waiting behind, say, a row
//! lock.
//!
//! Most operations arrive with the same deadline: their namespace's
//! `timeout`, minus the little it took them to get here. So every pooled
//! connection carries a *resting* statement timeout, that common one (and
//! never more than the backend's own `statement_timeout`), set once when
//! the connection opens, as a startup parameter that costs no round trip.
//! An operation whose time left is within a small tolerance below the
//! resting value (see [`keeps_resting`]) runs its statement alone: one
//! round trip, and none after its answer (the pool pings a connection
//! before use only after [`pool::PING_WHEN_IDLE`] of idleness, and never
//! when it takes one back; see [`pool`]). Any other (a caller with a
//! deadline of its own, a namespace with another timeout, an operation
//! that waited long for a connection) first sets its own value with
//! `set_config`, runs its statement, answers its caller, and only then
//! restores the resting value, in the background, before the connection
//! goes back to the pool.
//!
//! Invariants: **a connection in the pool always has the resting
//! `statement_timeout`, and its last exchange with the server ended
//! cleanly.** Whatever changes the timeout restores it before releasing
//! the connection; a connection whose restore fails or is cut short, whose
//! user was dropped mid-way, or whose driver reported an I/O or protocol
//! error, is closed instead of pooled (see [`Checkout`]). The migration
//! and purge sessions are not pooled and set their own timeouts.
//!
//! Purges run on one instance at a time: the one whose dedicated session
//! holds the table's purge lock (`pg_try_advisory_lock`). The lock lives as
//! long as that session, so when its instance stops or loses the database,
//! another instance takes it at its next purge.

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sqlx::postgres::{types::PgInterval, PgConnectOptions, PgConnection};
use sqlx::Connection as _;
use tokio::time::Instant;

use self::pool::{Checkout, Pool, Reaper};

use super::toolkit::{
    fetch_count, instance_id, purge_in_batches, redact_url, scan_page_stream, sql_item, stored_ttl,
    Batch, KeyRange, Migration, Schema,
};
use super::{
    context, Backend, BoxFuture, ConfigError, Connector, Error, Op, Outcome, PoolStats, Record,
};

/// How to reach and lay out the PostgreSQL backend.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// Connection URL, e.g. `postgres://user:password@host:5432/database`.
    pub url: String,
    /// Schema of the tables; created when missing. Default `public`.
    pub schema: String,
    /// The key-value table; `<table>_schema_version` records its migrations.
    /// Default `prism_kv`.
    pub table: String,
    /// Largest number of connections. Default 20.
    pub max_connections: u32,
    /// Connections kept open while idle. Default 5.
    pub min_connections: u32,
    /// How long an operation waits for a free connection, or a connect for
    /// the server, before the backend counts as unavailable. Default 5s.
    pub acquire_timeout: Duration,
    /// Idle connections above `min_connections` are closed after this long;
    /// `None` keeps them. Default 10 minutes.
    pub idle_timeout: Option<Duration>,
    /// Connections are replaced after this long; `None` keeps them.
    /// Default 30 minutes.
    pub max_lifetime: Option<Duration>,
    /// Upper bound of any one statement, also for operations without a
    /// deadline (purge). An operation with a deadline is bounded by the time
    /// it has left anyway. Default `None`: no bound beyond the deadline.
    pub statement_timeout: Option<Duration>,
    /// Shown in `pg_stat_activity`. Default `prism`.
    pub application_name: String,
    /// The deadline most operations arrive with: the most common `timeout`
    /// of the namespaces this backend serves. With `statement_timeout` it
    /// gives the resting statement timeout of the pooled connections (the
    /// smaller of the two), under which such operations need no round trip
    /// to set their own. Default `None`: the resting value is
    /// `statement_timeout`.
    pub common_timeout: Option<Duration>,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: "postgres://postgres@127.0.0.1:5432/test".into(),
            schema: "public".into(),
            table: "prism_kv".into(),
            max_connections: 20,
            min_connections: 5,
            acquire_timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
            statement_timeout: None,
            application_name: "prism".into(),
            common_timeout: None,
        }
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_url(&self.url))
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("max_connections", &self.max_connections)
            .field("min_connections", &self.min_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_lifetime", &self.max_lifetime)
            .field("statement_timeout", &self.statement_timeout)
            .field("application_name", &self.application_name)
            .field("common_timeout", &self.common_timeout)
            .finish()
    }
}

/// Longest table name: the derived `<table>_schema_version` must still fit
/// PostgreSQL's 63-byte identifiers, which it would otherwise truncate
/// silently (and two long table names could then share one version table).
const MAX_TABLE_LEN: usize = 63 - "_schema_version".len();

/// Checks `^[A-Za-z_][A-Za-z0-9_]{0,62}$` (and, for the table, the shorter
/// limit that leaves room for derived names).
fn validate_identifier(what: &'static str, value: &str, max_len: usize) -> Result<(), ConfigError> {
    let mut chars = value.chars();
    let well_formed = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !well_formed || value.len() > max_len {
        return Err(ConfigError::new(
            what,
            format!(
                "invalid postgres {what} {value:?}: expected a letter or underscore followed by \
                 letters, digits or underscores, at most {max_len} characters"
            ),
        ));
    }
    Ok(())
}

/// A validated identifier, double-quoted for SQL. Validation leaves no
/// character that needs escaping.
fn quote(ident: &str) -> String {
    format!("\"{ident}\"")
}

/// Connects to PostgreSQL and migrates the schema. Cheap to clone.
#[derive(Clone)]
pub struct PostgresConnector {
    config: PostgresConfig,
    options: PgConnectOptions,
    sql: Arc<Sql>,
}

impl fmt::Debug for PostgresConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConnector")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl PostgresConnector {
    /// A connector for `config`. Fails, naming the field (`url`, `schema`
    /// or `table`) and the bad value, when the URL does not parse or the
    /// schema or table is not a plain identifier. Nothing is connected until
    /// [`Connector::connect`].
    pub fn new(config: PostgresConfig) -> Result<Self, ConfigError> {
        validate_identifier("schema", &config.schema, 63)?;
        validate_identifier("table", &config.table, MAX_TABLE_LEN)?;
        let invalid_url = |why: &dyn fmt::Display| {
            ConfigError::new(
                "url",
                format!("invalid postgres url {}: {why}", redact_url(&config.url)),
            )
        };
        if !(config.url.starts_with("postgres://") || config.url.starts_with("postgresql://")) {
            return Err(invalid_url(&"expected postgres:// or postgresql://"));
        }
        let options = PgConnectOptions::from_str(&config.url)
            .map_err(|e| invalid_url(&e))?
            .application_name(&config.application_name);
        let sql = Arc::new(Sql::new(&config.schema, &config.table));
        Ok(PostgresConnector {
            config,
            options,
            sql,
        })
    }

    /// The settings this connector was made with.
    pub fn config(&self) -> &PostgresConfig {
        &self.config
    }

    async fn open(&self) -> Result<PostgresBackend, Error> {
        // Migrate over one connection of its own first: a server that is
        // down or refuses us is reported with its own error at once, where
        // a pool would retry until its acquire timeout and then only say
        // that it timed out.
        let mut conn = tokio::time::timeout(
            self.config.acquire_timeout,
            PgConnection::connect_with(&self.options),
        )
        .await
        .map_err(|_| Error::unavailable("timed out connecting to postgres"))?
        .map_err(map_sqlx)?;
        let migrated = migrate(&mut conn, &self.sql).await;
        // The connection has done its job either way; failing to say goodbye
        // politely changes nothing.
        let _ = conn.close().await;
        migrated?;

        let resting = resting_timeout(&self.config);
        let pooled = self
            .options
            .clone()
            .options([("statement_timeout", statement_timeout_setting(resting))]);
        let pool = pool::open(pooled, &self.config).await?;
        let reaper = Reaper::start(&pool, &self.config);
        Ok(PostgresBackend {
            pool,
            reaper,
            sql: Arc::clone(&self.sql),
            timeouts: Arc::new(Timeouts {
                statement: self.config.statement_timeout,
                resting,
                sets: AtomicU64::new(0),
            }),
            options: self.options.clone(),
            connect_timeout: self.config.acquire_timeout,
            purge_session: tokio::sync::Mutex::new(None),
            purge_leader: AtomicBool::new(false),
        })
    }
}

impl Connector for PostgresConnector {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn connect(&self) -> BoxFuture<'_, Result<Arc<dyn Backend>, Error>> {
        Box::pin(async move {
            let backend: Arc<dyn Backend> = Arc::new(self.open().await?);
            Ok(backend)
        })
    }
}

/// The schema steps, written with `{table}` (the quoted, qualified key-value
/// table) and `{name}` (its bare name, for derived object names). Applied
/// steps are recorded in `<table>_schema_version`.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "create key-value table",
    statements: &[
        // Both key columns use the "C" collation: the key for byte order,
        // the namespace for cheaper comparisons (it is only ever compared
        // for equality).
        r#"CREATE TABLE {table} (
            namespace  TEXT COLLATE "C" NOT NULL,
            key        TEXT COLLATE "C" NOT NULL,
            value      BYTEA            NOT NULL,
            expires_at TIMESTAMPTZ      NULL,
            PRIMARY KEY (namespace, key)
        )"#,
        // Partial: only keys with a TTL are ever purged.
        r#"CREATE INDEX "{name}_expires_at" ON {table} (expires_at) WHERE expires_at IS NOT NULL"#,
    ],
}];

/// Every statement of the backend, built once for its schema and table.
struct Sql {
    schema: String,
    table: String,
    versions: String,
    /// Serialises migrations of this table across processes.
    migration_lock: i64,
    /// Held by the one instance that purges this table.
    purge_lock: i64,
    get: String,
    put: String,
    delete: String,
    exists: String,
    /// Indexed by [`scan_index`].
    scan: [String; 8],
    purge: String,
}

impl Sql {
    fn new(schema: &str, table: &str) -> Sql {
        let t = format!("{}.{}", quote(schema), quote(table));
        let live = "(expires_at IS NULL OR expires_at > now())";
        let mut scan: [String; 8] = Default::default();
        for keys_only in [false, true] {
            for exclusive in [false, true] {
                for upper in [false, true] {
                    // Each bound is a plain comparison on `key`, so the
                    // primary-key index yields exactly the range
                    // (namespace, lower) .. (namespace, upper) in order: no
                    // sort, no visit of keys before the cursor.
                    //
                    // `before` is the key and value bytes of the rows ahead
                    // of a row in the page (a running sum of lengths, which
                    // PostgreSQL reads from the value's header without
                    // detoasting it). A row is sent when the rows before it
                    // fit the byte budget (the last parameter), and so are
                    // the first two (a page always takes the first, and the
                    // next tells whether more follow): so no row past the
                    // one that ends the page is ever sent.
                    let size = if keys_only {
                        "octet_length(key)"
                    } else {
                        "octet_length(key) + octet_length(value)"
                    };
                    scan[scan_index(keys_only, exclusive, upper)] = format!(
                        "SELECT {cols} FROM (SELECT {cols}, coalesce(sum({size}) OVER \
                         (ORDER BY key ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) \
                         AS before, row_number() OVER (ORDER BY key) AS n \
                         FROM {t} WHERE namespace = $1 AND key {op} $2{upper} \
                         AND {live} ORDER BY key LIMIT $3) AS page \
                         WHERE before <= {budget} OR n <= 2 ORDER BY key",
                        cols = if keys_only { "key" } else { "key, value" },
                        op = if exclusive { ">" } else { ">=" },
                        upper = if upper { " AND key < $4" } else { "" },
                        budget = if upper { "$5" } else { "$4" },
                    );
                }
            }
        }
        Sql {
            schema: schema.to_owned(),
            table: table.to_owned(),
            versions: format!("{}.{}", quote(schema), quote(&format!("{table}_schema_version"))),
            migration_lock: advisory_lock_key(&format!("prism/migrate/{schema}.{table}")),
            purge_lock: advisory_lock_key(&format!("prism/purge/{schema}.{table}")),
            get: format!(
                "SELECT value, (EXTRACT(EPOCH FROM (expires_at - now())) * 1000000)::bigint \
                 FROM {t} WHERE namespace = $1 AND key = $2 AND {live}"
            ),
            put: format!(
                "INSERT INTO {t} (namespace, key, value, expires_at) VALUES ($1, $2, $3, now() + $4) \
                 ON CONFLICT (namespace, key) DO UPDATE \
                 SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at"
            ),
            delete: format!(
                "DELETE FROM {t} WHERE namespace = $1 AND key = $2 RETURNING {live}"
            ),
            exists: format!("SELECT 1 FROM {t} WHERE namespace = $1 AND key = $2 AND {live}"),
            scan,
            // The row locks skip rows an operation holds (and other
            // gateways' purges), so a purge never queues behind a request;
            // the outer condition re-checks a row that was rewritten since
            // it was picked, so a rescued key is never deleted.
            purge: format!(
                "DELETE FROM {t} WHERE ctid = ANY (ARRAY(\
                     SELECT ctid FROM {t} WHERE expires_at <= now() \
                     LIMIT $1 FOR UPDATE SKIP LOCKED)) \
                 AND expires_at <= now()"
            ),
        }
    }
}

fn scan_index(keys_only: bool, exclusive_lower: bool, upper: bool) -> usize {
    usize::from(keys_only) << 2 | usize::from(exclusive_lower) << 1 | usize::from(upper)
}

/// A stable 64-bit key (FNV-1a) for `pg_advisory_xact_lock`: the same name
/// gives the same lock in every process and build.
fn advisory_lock_key(name: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// How long a start waits for a lock during the migration.
const MIGRATION_LOCK_TIMEOUT: &str = "30s";

/// Brings the schema up to the last migration in one transaction. Several
/// Prism instances starting at once queue on an advisory lock taken first, so
/// each step is applied exactly once; a failed step leaves no half-applied
/// schema.
async fn migrate(conn: &mut PgConnection, sql: &Sql) -> Result<(), Error> {
    let mut tx = conn.begin().await.map_err(map_sqlx)?;
    // A start must not hang forever behind another instance's migration or
    // a long lock on the table; giving up makes the pool actor retry later.
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(MIGRATION_LOCK_TIMEOUT)
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(sql.migration_lock)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            let lock_timeout = matches!(
                &e,
                sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03")
            );
            if lock_timeout {
                Error::Unavailable(context(
                    format!(
                        "timed out waiting for another instance to migrate {}.{}",
                        sql.schema, sql.table
                    ),
                    e,
                ))
            } else {
                map_sqlx(e)
            }
        })?;
    // Checked before creating: CREATE SCHEMA IF NOT EXISTS still needs the
    // CREATE privilege on the database, which a deployment into an existing
    // schema should not have to grant.
    let schema_exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(&sql.schema)
            .fetch_one(&mut *tx)
            .await
            .map_err(map_sqlx)?;
    if !schema_exists {
        sqlx::query(&format!("CREATE SCHEMA {}", quote(&sql.schema)))
            .persistent(false)
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx)?;
    }
    let table = format!("{}.{}", quote(&sql.schema), quote(&sql.table));
    let create_versions = format!(
        "CREATE TABLE IF NOT EXISTS {} (
            version    BIGINT      PRIMARY KEY,
            name       TEXT        NOT NULL,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )",
        sql.versions
    );
    let current_version = format!("SELECT COALESCE(MAX(version), 0) FROM {}", sql.versions);
    let record_version = format!(
        "INSERT INTO {} (version, name) VALUES ($1, $2)",
        sql.versions
    );
    let label = format!("postgres table {}.{}", sql.schema, sql.table);
    let render = |statement: &str| {
        statement
            .replace("{table}", &table)
            .replace("{name}", &sql.table)
    };
    let schema = Schema {
        kind: "postgres",
        label: &label,
        create_versions: &create_versions,
        current_version: &current_version,
        record_version: &record_version,
        migrations: MIGRATIONS,
        render: &render,
        map_err: map_sqlx,
    };
    super::toolkit::migrate::<sqlx::Postgres>(&mut tx, &schema).await?;
    tx.commit().await.map_err(map_sqlx)?;
    Ok(())
}

/// Like `From<sqlx::Error>`, except that a statement cancelled by its
/// statement timeout is a [`Error::Timeout`]: the deadline passed.
fn map_sqlx(e: sqlx::Error) -> Error {
    if let sqlx::Error::Database(db) = &e {
        if db.code().as_deref() == Some("57014") && db.message().contains("statement timeout") {
            return Error::Timeout;
        }
    }
    Error::from(e)
}

/// Rows a purge deletes per statement: each batch is its own short
/// transaction, so a large purge never holds many row locks for long.
const PURGE_BATCH: i64 = 10_000;

/// `ttl` as an interval, rounded up to the next microsecond so a positive TTL
/// never expires on write; `None` for no expiry.
fn ttl_interval(ttl: Option<Duration>) -> Option<PgInterval> {
    let ttl = stored_ttl(ttl)?;
    Some(PgInterval {
        months: 0,
        days: 0,
        // MAX_TTL in microseconds is far below i64::MAX.
        microseconds: i64::try_from(ttl.as_nanos().div_ceil(1000)).unwrap_or(i64::MAX),
    })
}

/// The `statement_timeout` setting for `timeout`: whole milliseconds,
/// rounded up and at least 1 (0 would mean no timeout); "0" for none.
fn statement_timeout_setting(timeout: Option<Duration>) -> String {
    match timeout {
        None => "0".into(),
        Some(t) => {
            let ms = t.as_micros().div_ceil(1000).clamp(1, i32::MAX as u128);
            ms.to_string()
        }
    }
}

/// The resting statement timeout of `config`'s pooled connections: the
/// smaller of its `statement_timeout` and its `common_timeout`; `None`
/// (no timeout) when it has neither.
fn resting_timeout(config: &PostgresConfig) -> Option<Duration> {
    match (config.statement_timeout, config.common_timeout) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// How far below the resting statement timeout an operation's time left
/// may be and still run under it: 1 % of the resting value, at least 2 ms.
///
/// An operation with the common deadline reaches its connection some tens
/// or hundreds of microseconds after its request arrived (more when it
/// queued for a connection), so its time left is always a little short of
/// the resting value; running it under the resting value lets the server
/// cancel its statement up to that little later than the gateway's
/// deadline, and the tolerance bounds how late. Late by that much costs
/// nothing the client sees: the gateway answers `Timeout` at the deadline
/// regardless, and the statement only holds its connection a moment
/// longer, in the background. The 2 ms floor covers the rounding of every
/// setting up to whole milliseconds and the usual way to the connection;
/// the 1 % keeps operations that queued a moment under load on the one
/// round trip, while a statement still ends at most 1 % (or 2 ms) past its
/// deadline.
fn tolerance(resting: Duration) -> Duration {
    (resting / 100).max(Duration::from_millis(2))
}

/// Whether an operation that needs a statement timeout of `want` (`None`:
/// none) can run under the resting value `resting` without setting its
/// own: `want` is at most the resting value, and short of it by at most
/// the [`tolerance`]. Never when `want` is longer: the server would cancel
/// the statement before its deadline.
fn keeps_resting(want: Option<Duration>, resting: Option<Duration>) -> bool {
    match (want, resting) {
        (None, None) => true,
        (Some(want), Some(resting)) => want <= resting && want + tolerance(resting) >= resting,
        _ => false,
    }
}

/// The statement timeouts of the pooled connections.
struct Timeouts {
    /// [`PostgresConfig::statement_timeout`].
    statement: Option<Duration>,
    /// The value every connection in the pool has; see [`resting_timeout`].
    resting: Option<Duration>,
    /// `set_config` statements run on pooled connections (settings and
    /// restores): the round trips operations spent on timeouts.
    sets: AtomicU64,
}

/// A pool of connections to the database.
struct PostgresBackend {
    pool: Pool,
    /// Closes idle and old connections of `pool`; stopped by `close`.
    reaper: Reaper,
    sql: Arc<Sql>,
    timeouts: Arc<Timeouts>,
    options: PgConnectOptions,
    connect_timeout: Duration,
    /// A session of its own for purges, outside the pool, and whether it
    /// holds the table's purge lock. The lock is a session lock: it is held
    /// exactly as long as this connection lives, so it must not go back to
    /// a pool. Only the pool actor's purge (one at a time) takes the mutex.
    purge_session: tokio::sync::Mutex<Option<(PgConnection, bool)>>,
    purge_leader: AtomicBool,
}

impl PostgresBackend {
    /// Runs `op` on a pooled connection, bounded by `deadline` when there is
    /// one: on the client, by giving up at the deadline (waiting for a
    /// connection included), and on the server, by a statement timeout of
    /// the time left (the resting one when that is close enough, see
    /// [`keeps_resting`]).
    ///
    /// A query future dropped mid-flight can leave its connection waiting
    /// for answers that never come, so the attempt is never cut short: at
    /// the deadline the caller gets `Timeout` and the attempt goes on in the
    /// background, where the statement timeout ends it at about the same
    /// moment and its connection goes back to the pool in a known state.
    async fn exec_bounded(
        &self,
        namespace: &str,
        op: Op,
        deadline: Option<Instant>,
    ) -> Result<Outcome, Error> {
        let work = self.attempt(namespace, op, deadline);
        let Some(deadline) = deadline else {
            return work.await;
        };
        let mut work = Box::pin(work);
        tokio::select! {
            biased;
            out = &mut work => out,
            () = tokio::time::sleep_until(deadline) => {
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(ABANDONED_GRACE, work).await;
                });
                Err(Error::Timeout)
            }
        }
    }

    /// One operation on a pooled connection, owning everything it needs so
    /// that it can finish after its caller has gone.
    fn attempt(
        &self,
        namespace: &str,
        op: Op,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<Outcome, Error>> + Send + 'static {
        let pool = self.pool.clone();
        let sql = Arc::clone(&self.sql);
        let timeouts = Arc::clone(&self.timeouts);
        let namespace = namespace.to_owned();
        async move {
            let mut conn = Checkout::get(&pool).await?;
            let want = match deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        conn.finished();
                        return Err(Error::Timeout);
                    }
                    Some(timeouts.statement.map_or(left, |t| t.min(left)))
                }
                None => timeouts.statement,
            };
            if keeps_resting(want, timeouts.resting) {
                let out = run(&sql, &mut conn, &namespace, op).await;
                conn.finished_after(&out);
                return out.map_err(map_sqlx);
            }
            timeouts.sets.fetch_add(1, Ordering::Relaxed);
            let out = match set_statement_timeout(&mut conn, want).await {
                Ok(()) => run(&sql, &mut conn, &namespace, op).await,
                Err(e) => Err(e),
            };
            if !pool::leaves_usable(&out) {
                // Closed, not restored.
                return out.map_err(map_sqlx);
            }
            // The caller has its answer now; the connection goes back to
            // the pool once it has the resting value again.
            timeouts.sets.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(restore(conn, timeouts));
            out.map_err(map_sqlx)
        }
    }

    /// Purges when this backend holds (or can take) the table's purge
    /// lock, on the session that holds it; otherwise leaves it to the
    /// holder. A session that fails is dropped, which releases the lock.
    async fn purge(&self) -> Result<u64, Error> {
        let mut session = self.purge_session.lock().await;
        let result = self.purge_on(&mut session).await;
        let leader = result.is_ok() && session.as_ref().is_some_and(|(_, held)| *held);
        if result.is_err() {
            *session = None;
        }
        let was = self.purge_leader.swap(leader, Ordering::AcqRel);
        if leader != was {
            let table = format!("{}.{}", self.sql.schema, self.sql.table);
            if leader {
                tracing::info!(%table, instance_id = %instance_id(), "purge lock acquired");
            } else {
                tracing::info!(%table, instance_id = %instance_id(), "purge lock lost");
            }
        }
        result
    }

    async fn purge_on(&self, session: &mut Option<(PgConnection, bool)>) -> Result<u64, Error> {
        if session.is_none() {
            let conn = tokio::time::timeout(
                self.connect_timeout,
                PgConnection::connect_with(&self.options),
            )
            .await
            .map_err(|_| Error::unavailable("timed out connecting to postgres"))?
            .map_err(map_sqlx)?;
            *session = Some((conn, false));
        }
        let Some((conn, held)) = session.as_mut() else {
            return Ok(0);
        };
        set_statement_timeout(conn, self.timeouts.statement)
            .await
            .map_err(map_sqlx)?;
        if !*held {
            *held = sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
                .bind(self.sql.purge_lock)
                .fetch_one(&mut *conn)
                .await
                .map_err(map_sqlx)?;
            if !*held {
                return Ok(0);
            }
        }
        let statement = self.sql.purge.as_str();
        let mut state = (&mut *conn, statement);
        purge_in_batches(&mut state, |(conn, statement)| {
            Box::pin(async move {
                let removed = sqlx::query(statement)
                    .bind(PURGE_BATCH)
                    .execute(&mut **conn)
                    .await
                    .map_err(map_sqlx)?
                    .rows_affected();
                Ok(Batch::of(removed, PURGE_BATCH.unsigned_abs()))
            })
        })
        .await
    }

    /// One statement on a pooled connection, under its resting statement
    /// timeout: nothing to restore.
    async fn ping(&self) -> Result<(), Error> {
        let mut conn = Checkout::get(&self.pool).await?;
        let out = sqlx::query("SELECT 1").execute(&mut *conn).await;
        conn.finished_after(&out);
        out.map_err(map_sqlx)?;
        Ok(())
    }
}

/// Runs one operation's statement on `conn`.
async fn run(
    sql: &Sql,
    conn: &mut PgConnection,
    namespace: &str,
    op: Op,
) -> Result<Outcome, sqlx::Error> {
    match op {
        Op::Get { key } => {
            let row: Option<(Vec<u8>, Option<i64>)> = sqlx::query_as(&sql.get)
                .bind(namespace)
                .bind(key.as_str())
                .fetch_optional(&mut *conn)
                .await?;
            Ok(Outcome::Get(row.map(|(value, ttl_us)| Record {
                value: Bytes::from(value),
                // The liveness filter guarantees a positive remainder;
                // the floor keeps a live key from reporting zero.
                ttl: ttl_us.map(|us| Duration::from_micros(us.max(1).unsigned_abs())),
            })))
        }
        Op::Put { key, value, ttl } => {
            sqlx::query(&sql.put)
                .bind(namespace)
                .bind(key.as_str())
                .bind(&value[..])
                .bind(ttl_interval(ttl))
                .execute(&mut *conn)
                .await?;
            Ok(Outcome::Put)
        }
        Op::Delete { key } => {
            // One statement removes the row, expired or not, and tells
            // whether it was live.
            let live: Option<bool> = sqlx::query_scalar(&sql.delete)
                .bind(namespace)
                .bind(key.as_str())
                .fetch_optional(&mut *conn)
                .await?;
            Ok(Outcome::Delete(live == Some(true)))
        }
        Op::Exists { key } => {
            let row: Option<i32> = sqlx::query_scalar(&sql.exists)
                .bind(namespace)
                .bind(key.as_str())
                .fetch_optional(&mut *conn)
                .await?;
            Ok(Outcome::Exists(row.is_some()))
        }
        Op::Scan {
            prefix,
            after,
            limit,
            max_bytes,
            keys_only,
        } => {
            let range = KeyRange::new(&prefix, after.as_deref());
            // One row past the page tells whether more follow.
            let fetch = i64::try_from(fetch_count(limit)).unwrap_or(i64::MAX);
            let index = scan_index(
                keys_only,
                range.lower_is_exclusive(),
                range.upper().is_some(),
            );
            let mut query = sqlx::query(&sql.scan[index])
                .bind(namespace)
                .bind(range.lower())
                .bind(fetch);
            if let Some(upper) = range.upper() {
                query = query.bind(upper);
            }
            // The statement itself stops one row past the byte budget
            // (`$budget`, see `Sql::new`), and the rows are streamed, so
            // neither the server sends nor the gateway holds more than
            // the page and one row.
            let budget = i64::try_from(max_bytes).unwrap_or(i64::MAX);
            let rows = query.bind(budget).fetch(&mut *conn);
            scan_page_stream(rows, |row| sql_item(row, keys_only), limit, max_bytes).await
        }
    }
}

/// How long an operation whose caller gave up at its deadline may go on
/// in the background before its connection is closed instead.
const ABANDONED_GRACE: Duration = Duration::from_secs(5);

/// How long restoring a connection's resting statement timeout may take
/// before the connection is closed instead.
const RESTORE_GRACE: Duration = Duration::from_secs(5);

/// Gives `conn` its resting statement timeout back, then returns it to
/// the pool; closes it when that fails or takes longer than
/// [`RESTORE_GRACE`], so that no connection with another value is ever
/// pooled.
async fn restore(mut conn: Checkout, timeouts: Arc<Timeouts>) {
    let restored = tokio::time::timeout(
        RESTORE_GRACE,
        set_statement_timeout(&mut conn, timeouts.resting),
    )
    .await;
    if matches!(restored, Ok(Ok(()))) {
        conn.finished();
    }
}

/// Sets the session's statement timeout: one round trip, where a
/// transaction with `SET LOCAL` would cost two more (BEGIN and COMMIT). On
/// a pooled connection, [`restore`] must follow.
async fn set_statement_timeout(
    conn: &mut PgConnection,
    timeout: Option<Duration>,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT set_config('statement_timeout', $1, false)")
        .bind(statement_timeout_setting(timeout))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

impl Backend for PostgresBackend {
    fn exec<'a>(&'a self, namespace: &'a str, op: Op) -> BoxFuture<'a, Result<Outcome, Error>> {
        Box::pin(self.exec_bounded(namespace, op, None))
    }

    fn exec_until<'a>(
        &'a self,
        namespace: &'a str,
        op: Op,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Outcome, Error>> {
        Box::pin(self.exec_bounded(namespace, op, Some(deadline)))
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, Error>> {
        Box::pin(self.purge())
    }

    fn health(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(self.ping())
    }

    fn purge_leader(&self) -> Option<bool> {
        Some(self.purge_leader.load(Ordering::Acquire))
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            // Giving the purge lock up before ending its session lets
            // another instance take over at its next purge (the server
            // releases a closed session's locks only once its process has
            // ended, a moment later). Bounded: a purge stuck on an
            // unanswering server must not hold the stop up; dropping the
            // backend drops the session anyway.
            let release = async {
                if let Some((mut conn, held)) = self.purge_session.lock().await.take() {
                    if held {
                        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                            .bind(self.sql.purge_lock)
                            .execute(&mut conn)
                            .await;
                    }
                    let _ = conn.close().await;
                }
            };
            let _ = tokio::time::timeout(self.connect_timeout, release).await;
            self.purge_leader.store(false, Ordering::Release);
            self.reaper.stop().await;
            pool::close(&self.pool, self.connect_timeout).await;
        })
    }

    fn connections(&self) -> PoolStats {
        pool::stats(&self.pool)
    }
}

mod pool;

#[cfg(test)]
mod tests;
