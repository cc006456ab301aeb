//! The embedded SQLite backend: one table keyed by (namespace, key) in a
//! WAL-mode database file.
//!
//! Keys are bound as TEXT and compared with SQLite's default BINARY
//! collation, which is bytewise over UTF-8: exactly the byte order the API
//! promises for scans. Expiry is a wall-clock unix time in milliseconds,
//! because it is persisted and must survive a process restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::toolkit::{
    fetch_count, purge_in_batches, scan_page_stream, sql_item, stored_ttl, Batch, KeyRange,
    Migration, Schema,
};
use super::{context, Backend, BoxFuture, Connector, Error, Op, Outcome, Record};

/// Opens the SQLite database at a path, creating it (and its folder) when
/// missing and migrating its schema.
#[derive(Debug, Clone)]
pub struct SqliteConnector {
    path: PathBuf,
    busy_timeout: Duration,
    pool_size: u32,
}

impl SqliteConnector {
    /// A connector for the database file at `path`, with up to `pool_size`
    /// connections, each waiting up to `busy_timeout` for another's lock.
    pub fn new(path: PathBuf, busy_timeout: Duration, pool_size: u32) -> Self {
        SqliteConnector {
            path,
            busy_timeout,
            pool_size,
        }
    }

    async fn open(&self) -> Result<SqliteBackend, Error> {
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent).await.map_err(|e| {
                Error::Internal(context(
                    format!("cannot create folder {}", parent.display()),
                    e,
                ))
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(&self.path)
            .create_if_missing(true)
            // WAL lets readers run alongside the single writer; NORMAL
            // syncs at checkpoints only, which in WAL mode can lose the last
            // commits on power loss but never corrupts the database.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(self.busy_timeout)
            // Rows a statement's worker thread may step ahead of the reader:
            // few, so that a scan stopped at its byte budget has not read
            // more than a value or two past it (sqlx's default is 50).
            .row_buffer_size(SCAN_READ_AHEAD);
        let pool = SqlitePoolOptions::new()
            .max_connections(self.pool_size.max(1))
            .min_connections(1)
            .connect_with(options)
            .await?;
        if let Err(e) = migrate(&pool).await {
            pool.close().await;
            return Err(e);
        }
        Ok(SqliteBackend { pool })
    }
}

impl Connector for SqliteConnector {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn connect(&self) -> BoxFuture<'_, Result<Arc<dyn Backend>, Error>> {
        Box::pin(async move {
            let backend: Arc<dyn Backend> = Arc::new(self.open().await?);
            Ok(backend)
        })
    }
}

/// The schema steps. Applied steps are recorded in `prism_schema_version`.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "create prism_kv",
    statements: &[
        "CREATE TABLE prism_kv (
            namespace  TEXT    NOT NULL,
            key        TEXT    NOT NULL,
            value      BLOB    NOT NULL,
            expires_at INTEGER NULL, -- unix milliseconds; NULL = no expiry
            PRIMARY KEY (namespace, key)
        ) WITHOUT ROWID",
        // Partial: only keys with a TTL are ever purged.
        "CREATE INDEX prism_kv_expires_at ON prism_kv (expires_at) WHERE expires_at IS NOT NULL",
    ],
}];

/// Brings the schema up to the last migration. Runs in one IMMEDIATE
/// transaction, so two processes opening the same file at once apply each
/// step exactly once, and a failed step leaves no half-applied schema.
async fn migrate(pool: &SqlitePool) -> Result<(), Error> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let schema = Schema {
        kind: "sqlite",
        label: "the sqlite database",
        create_versions: "CREATE TABLE IF NOT EXISTS prism_schema_version (
            version    INTEGER PRIMARY KEY,
            name       TEXT    NOT NULL,
            applied_at INTEGER NOT NULL -- unix milliseconds
        )",
        current_version: "SELECT COALESCE(MAX(version), 0) FROM prism_schema_version",
        // julianday('now') has millisecond precision; 2440587.5 is the
        // unix epoch as a julian day.
        record_version: "INSERT INTO prism_schema_version (version, name, applied_at) \
             VALUES (?1, ?2, CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER))",
        migrations: MIGRATIONS,
        render: &|statement: &str| statement.to_owned(),
        map_err: Error::from,
    };
    super::toolkit::migrate::<sqlx::Sqlite>(&mut tx, &schema).await?;
    tx.commit().await?;
    Ok(())
}

/// Wall-clock now, in unix milliseconds.
fn now_ms() -> i64 {
    // A clock before 1970 is a broken host; counting it as the epoch keeps
    // serving (keys with a TTL then live longer) instead of failing requests.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The expiry of a key written at `now` with `ttl`, rounded up to the next
/// millisecond so a positive TTL never expires on write.
fn expiry_ms(now: i64, ttl: Duration) -> i64 {
    let ttl_ms = i64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(i64::MAX);
    now.saturating_add(ttl_ms)
}

/// Rows a purge deletes per statement: each batch is its own short write
/// transaction, so a large purge never holds the write lock long enough to
/// push requests into their busy timeout.
const PURGE_BATCH: i64 = 1000;

/// The scan statement for one combination of (values or keys only, lower
/// bound exclusive or inclusive, upper bound present or not). Statements are
/// static so that each is prepared once per connection, and each bound is a
/// plain comparison on `key` so that SQLite walks exactly the primary-key
/// range `(namespace, lower) .. (namespace, upper)` in order: no sort, no
/// visit of keys before the cursor.
///
/// Parameters: ?1 namespace, ?2 lower bound, ?3 now (ms), ?4 row limit,
/// ?5 upper bound (only when present).
fn scan_sql(keys_only: bool, exclusive_lower: bool, upper: bool) -> &'static str {
    macro_rules! scan {
        ($cols:literal, $lower:literal, $upper:literal) => {
            concat!(
                "SELECT ",
                $cols,
                " FROM prism_kv WHERE namespace = ?1 AND key ",
                $lower,
                " ?2",
                $upper,
                " AND (expires_at IS NULL OR expires_at > ?3) ORDER BY key LIMIT ?4"
            )
        };
    }
    match (keys_only, exclusive_lower, upper) {
        (false, false, false) => scan!("key, value", ">=", ""),
        (false, false, true) => scan!("key, value", ">=", " AND key < ?5"),
        (false, true, false) => scan!("key, value", ">", ""),
        (false, true, true) => scan!("key, value", ">", " AND key < ?5"),
        (true, false, false) => scan!("key", ">=", ""),
        (true, false, true) => scan!("key", ">=", " AND key < ?5"),
        (true, true, false) => scan!("key", ">", ""),
        (true, true, true) => scan!("key", ">", " AND key < ?5"),
    }
}

/// Rows the SQLite worker may read ahead of a scan (see `row_buffer_size`).
const SCAN_READ_AHEAD: usize = 2;

/// A pool of connections to one database file.
struct SqliteBackend {
    pool: SqlitePool,
}

impl SqliteBackend {
    async fn run(&self, namespace: &str, op: Op) -> Result<Outcome, Error> {
        let now = now_ms();
        match op {
            Op::Get { key } => {
                let row: Option<(Vec<u8>, Option<i64>)> = sqlx::query_as(
                    "SELECT value, expires_at FROM prism_kv \
                     WHERE namespace = ?1 AND key = ?2 AND (expires_at IS NULL OR expires_at > ?3)",
                )
                .bind(namespace)
                .bind(key.as_str())
                .bind(now)
                .fetch_optional(&self.pool)
                .await?;
                Ok(Outcome::Get(row.map(|(value, expires_at)| {
                    Record {
                        value: Bytes::from(value),
                        // The filter above guarantees `at > now`.
                        ttl: expires_at
                            .map(|at| Duration::from_millis(at.saturating_sub(now).unsigned_abs())),
                    }
                })))
            }
            Op::Put { key, value, ttl } => {
                sqlx::query(
                    "INSERT INTO prism_kv (namespace, key, value, expires_at) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT (namespace, key) DO UPDATE \
                     SET value = excluded.value, expires_at = excluded.expires_at",
                )
                .bind(namespace)
                .bind(key.as_str())
                .bind(&value[..])
                .bind(stored_ttl(ttl).map(|ttl| expiry_ms(now, ttl)))
                .execute(&self.pool)
                .await?;
                Ok(Outcome::Put)
            }
            Op::Delete { key } => {
                // One statement removes the row, expired or not, and tells
                // whether it was live.
                let row: Option<(Option<i64>,)> = sqlx::query_as(
                    "DELETE FROM prism_kv WHERE namespace = ?1 AND key = ?2 RETURNING expires_at",
                )
                .bind(namespace)
                .bind(key.as_str())
                .fetch_optional(&self.pool)
                .await?;
                let existed =
                    matches!(row, Some((expires_at,)) if expires_at.is_none_or(|at| at > now));
                Ok(Outcome::Delete(existed))
            }
            Op::Exists { key } => {
                let row: Option<i64> = sqlx::query_scalar(
                    "SELECT 1 FROM prism_kv \
                     WHERE namespace = ?1 AND key = ?2 AND (expires_at IS NULL OR expires_at > ?3)",
                )
                .bind(namespace)
                .bind(key.as_str())
                .bind(now)
                .fetch_optional(&self.pool)
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
                let sql = scan_sql(
                    keys_only,
                    range.lower_is_exclusive(),
                    range.upper().is_some(),
                );
                let mut query = sqlx::query(sql)
                    .bind(namespace)
                    .bind(range.lower())
                    .bind(now)
                    .bind(fetch);
                if let Some(upper) = range.upper() {
                    query = query.bind(upper);
                }
                // Streamed: the statement stops stepping at the first row
                // past the page, so a page of large values never sits in
                // memory whole, beyond its byte budget.
                let rows = query.fetch(&self.pool);
                Ok(
                    scan_page_stream(rows, |row| sql_item(row, keys_only), limit, max_bytes)
                        .await?,
                )
            }
        }
    }

    async fn purge(&self) -> Result<u64, Error> {
        let now = now_ms();
        let mut pool = &self.pool;
        purge_in_batches(&mut pool, |pool| {
            Box::pin(async move {
                let removed = sqlx::query(
                    "DELETE FROM prism_kv WHERE (namespace, key) IN \
                     (SELECT namespace, key FROM prism_kv WHERE expires_at <= ?1 LIMIT ?2)",
                )
                .bind(now)
                .bind(PURGE_BATCH)
                .execute(*pool)
                .await?
                .rows_affected();
                Ok(Batch::of(removed, PURGE_BATCH.unsigned_abs()))
            })
        })
        .await
    }
}

impl Backend for SqliteBackend {
    fn exec<'a>(&'a self, namespace: &'a str, op: Op) -> BoxFuture<'a, Result<Outcome, Error>> {
        Box::pin(self.run(namespace, op))
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, Error>> {
        Box::pin(self.purge())
    }

    fn health(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            Ok(())
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.pool.close())
    }

    fn connections(&self) -> super::PoolStats {
        super::PoolStats::from_counts(self.pool.size() as usize, self.pool.num_idle())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use tempfile::TempDir;

    use super::{SqliteBackend, SqliteConnector, MIGRATIONS};
    use crate::backend::{Backend, Connector, Error, Op, Outcome, Record};

    fn connector(path: &Path, pool_size: u32) -> SqliteConnector {
        SqliteConnector::new(path.to_path_buf(), Duration::from_secs(5), pool_size)
    }

    async fn put(b: &dyn Backend, key: &str, value: &'static [u8], ttl: Option<Duration>) {
        let op = Op::Put {
            key: key.into(),
            value: Bytes::from_static(value),
            ttl,
        };
        assert_eq!(b.exec("ns", op).await.expect("put"), Outcome::Put);
    }

    async fn get(b: &dyn Backend, key: &str) -> Option<Record> {
        match b
            .exec("ns", Op::Get { key: key.into() })
            .await
            .expect("get")
        {
            Outcome::Get(r) => r,
            other => panic!("{other:?}"),
        }
    }

    async fn versions(b: &SqliteBackend) -> Vec<i64> {
        sqlx::query_scalar("SELECT version FROM prism_schema_version ORDER BY version")
            .fetch_all(&b.pool)
            .await
            .expect("versions")
    }

    #[tokio::test]
    async fn data_persists_after_close_and_reconnect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let connector = connector(&dir.path().join("prism.db"), 2);
        let first = connector.connect().await.expect("connect");
        put(&*first, "plain", b"one", None).await;
        put(&*first, "with-ttl", b"two", Some(Duration::from_secs(3600))).await;
        first.close().await;
        assert!(
            first.health().await.is_err(),
            "a closed backend still answers"
        );

        let second = connector.connect().await.expect("reconnect");
        assert_eq!(
            get(&*second, "plain").await,
            Some(Record {
                value: Bytes::from_static(b"one"),
                ttl: None
            })
        );
        let ttl = get(&*second, "with-ttl")
            .await
            .and_then(|r| r.ttl)
            .expect("ttl survives");
        assert!(ttl > Duration::from_secs(3500), "{ttl:?}");
        second.close().await;
    }

    #[tokio::test]
    async fn schema_migration_is_idempotent_on_reconnect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let connector = connector(&dir.path().join("prism.db"), 2);
        let all: Vec<i64> = MIGRATIONS.iter().map(|m| m.version).collect();
        assert!(
            all.windows(2).all(|w| w[1] == w[0] + 1),
            "versions must be consecutive"
        );
        assert_eq!(all.first(), Some(&1));

        let first = connector.open().await.expect("connect");
        assert_eq!(versions(&first).await, all);
        put(&first, "k", b"v", None).await;
        first.pool.close().await;
        for _ in 0..2 {
            let again = connector.open().await.expect("reconnect");
            assert_eq!(versions(&again).await, all, "a migration ran twice");
            assert!(get(&again, "k").await.is_some(), "reconnect lost data");
            again.pool.close().await;
        }
    }

    #[tokio::test]
    async fn a_schema_newer_than_this_build_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let connector = connector(&dir.path().join("prism.db"), 1);
        let b = connector.open().await.expect("connect");
        sqlx::query("INSERT INTO prism_schema_version (version, name, applied_at) VALUES (9999, 'future', 0)")
            .execute(&b.pool)
            .await
            .expect("insert");
        b.pool.close().await;
        match connector.open().await {
            Err(e @ Error::Internal(_)) => {
                let msg = e.chain().to_string();
                assert!(msg.contains("9999"), "{msg}");
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a newer schema was accepted"),
        }
    }

    #[tokio::test]
    async fn connect_creates_missing_folders() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a").join("b").join("prism.db");
        let b = connector(&path, 1).connect().await.expect("connect");
        put(&*b, "k", b"v", None).await;
        b.close().await;
        assert!(path.is_file());
    }

    #[tokio::test]
    async fn connections_report_the_pool() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = connector(&dir.path().join("prism.db"), 3)
            .connect()
            .await
            .expect("connect");
        b.health().await.expect("health");
        let stats = b.connections();
        assert!(stats.in_use + stats.idle >= 1, "{stats:?}");
        assert!(stats.in_use + stats.idle <= 3, "{stats:?}");
        assert!(!b.is_inline());
        b.close().await;
    }

    #[tokio::test]
    async fn concurrent_writers_wait_for_the_lock_instead_of_failing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = connector(&dir.path().join("prism.db"), 8)
            .connect()
            .await
            .expect("connect");
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let b = Arc::clone(&b);
                tokio::spawn(async move {
                    for i in 0..100 {
                        let op = Op::Put {
                            key: format!("t{t}/{i:03}"),
                            value: Bytes::from_static(b"v"),
                            ttl: None,
                        };
                        b.exec("ns", op).await.expect("put under contention");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("writer task");
        }
        let op = Op::Scan {
            prefix: "t".into(),
            after: None,
            limit: 1000,
            max_bytes: usize::MAX,
            keys_only: true,
        };
        match b.exec("ns", op).await.expect("scan") {
            Outcome::Scan { items, more } => {
                assert_eq!(items.len(), 800);
                assert!(!more);
            }
            other => panic!("{other:?}"),
        }
        b.close().await;
    }

    #[tokio::test]
    async fn scan_is_an_ordered_primary_key_range() {
        let (b, _dir) = fresh_concrete().await;
        for (keys_only, exclusive, upper) in [
            (false, false, true),
            (true, true, true),
            (false, true, false),
        ] {
            let sql = format!(
                "EXPLAIN QUERY PLAN {}",
                super::scan_sql(keys_only, exclusive, upper)
            );
            let mut query = sqlx::query(&sql)
                .bind("ns")
                .bind("a")
                .bind(0i64)
                .bind(10i64);
            if upper {
                query = query.bind("b");
            }
            let plan: Vec<String> = query
                .fetch_all(&b.pool)
                .await
                .expect("plan")
                .iter()
                .map(|row| sqlx::Row::get::<String, _>(row, "detail"))
                .collect();
            let plan = plan.join("\n");
            assert!(
                plan.contains("USING PRIMARY KEY (namespace=? AND key>"),
                "{plan}"
            );
            if upper {
                assert!(plan.contains("AND key<?)"), "{plan}");
            }
            assert!(!plan.contains("TEMP B-TREE"), "scan sorts: {plan}");
        }
        b.pool.close().await;
    }

    async fn fresh_concrete() -> (SqliteBackend, TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = connector(&dir.path().join("prism.db"), 1)
            .open()
            .await
            .expect("connect");
        (b, dir)
    }
}
