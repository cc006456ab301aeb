//! The shared PostgreSQL and Redis servers: their URLs, names unique to a
//! test, clean-up, and row locks that hold a gateway's query in flight.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use deadpool_redis::redis as redis_client;
use sqlx::Connection as _;

use super::eventually;

/// `PRISM_TEST_POSTGRES_URL`, or the local server's `test` database.
pub fn postgres_url() -> String {
    std::env::var("PRISM_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// `PRISM_TEST_REDIS_URL`, or the local server.
pub fn redis_url() -> String {
    std::env::var("PRISM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// `<prefix>_<pid>_<n>`: unique to this test process and call, for tables
/// and key prefixes on the shared servers.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}_{}_{n}", std::process::id())
}

/// How long a test's own statement or connect may take: a server that
/// stops answering fails the test instead of hanging it.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Options for the tests' own sessions on `url`: statements and connects
/// are bounded by [`PATIENCE`].
pub fn bounded(url: &str) -> sqlx::postgres::PgConnectOptions {
    use std::str::FromStr as _;
    sqlx::postgres::PgConnectOptions::from_str(url)
        .expect("test postgres url")
        .options([("statement_timeout", "10s")])
}

/// A pool of the tests' own bounded sessions on `url`.
pub async fn bounded_pool(url: &str) -> anyhow::Result<sqlx::PgPool> {
    sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(PATIENCE)
        .connect_with(bounded(url))
        .await
        .context("connect to the test postgres")
}

/// Drops a gateway's table (and its schema version table) on `url`.
pub async fn drop_table(url: &str, table: &str) {
    if let Ok(Ok(pool)) = tokio::time::timeout(PATIENCE, bounded_pool(url)).await {
        for t in [table.to_owned(), format!("{table}_schema_version")] {
            let _ = sqlx::query(&format!("DROP TABLE IF EXISTS \"{t}\""))
                .execute(&pool)
                .await;
        }
        pool.close().await;
    }
}

/// Deletes every Redis key under `prefix:` on `url`.
pub async fn delete_keys(url: &str, prefix: &str) {
    let Ok(client) = redis_client::Client::open(url) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let keys: Vec<String> = redis_client::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    for chunk in keys.chunks(500) {
        let _: Result<(), _> = redis_client::cmd("DEL")
            .arg(chunk)
            .query_async(&mut conn)
            .await;
    }
}

/// Drops a table of the shared PostgreSQL server on drop, also when the
/// test fails.
pub struct DropTable(pub String);

impl Drop for DropTable {
    fn drop(&mut self) {
        let table = self.0.clone();
        // Drop cannot await, and may run inside a runtime: use a thread of
        // its own with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(drop_table(&postgres_url(), &table));
        })
        .join();
    }
}

/// A row of a gateway's table locked `FOR UPDATE` in an open transaction
/// of a connection of its own: a Put of that key through the gateway waits
/// for the lock until it is released or the connection breaks.
pub struct RowLock(sqlx::PgConnection);

impl RowLock {
    pub async fn take(url: &str, table: &str, namespace: &str, key: &str) -> anyhow::Result<Self> {
        let mut conn =
            tokio::time::timeout(PATIENCE, sqlx::PgConnection::connect_with(&bounded(url)))
                .await
                .context("connect timed out")?
                .context("connect")?;
        sqlx::query("BEGIN")
            .execute(&mut conn)
            .await
            .context("begin")?;
        sqlx::query(&format!(
            "SELECT 1 FROM \"{table}\" WHERE namespace = $1 AND key = $2 FOR UPDATE"
        ))
        .bind(namespace)
        .bind(key)
        .execute(&mut conn)
        .await
        .context("lock the row")?;
        Ok(RowLock(conn))
    }

    /// Rolls back and disconnects.
    pub async fn release(self) {
        let _ = self.0.close().await;
    }
}

/// Polls until a query of the gateway (`application_name` prism) on `url`
/// waits for a lock, for up to `within`.
pub async fn gateway_waits_for_a_lock(url: &str, within: Duration) -> bool {
    let Ok(Ok(pool)) = tokio::time::timeout(PATIENCE, bounded_pool(url)).await else {
        return false;
    };
    let waiting = eventually(within, || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND application_name = 'prism'",
        )
        .fetch_one(&pool)
        .await
        .is_ok_and(|n| n > 0)
    })
    .await;
    pool.close().await;
    waiting
}
