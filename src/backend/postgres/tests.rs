//! Tests of the postgres backend against the real server.
use std::str::FromStr as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, Executor, PgConnection};
use tokio::time::Instant;

use super::pool::{Manager, PING_WHEN_IDLE};
use super::{
    keeps_resting, resting_timeout, tolerance, PostgresBackend, PostgresConfig, PostgresConnector,
    MIGRATIONS,
};
use crate::backend::{Backend, Connector, Error, Op, Outcome, PoolStats};
use crate::testing::{eventually, Cleanup};

/// The test database; `PRISM_TEST_POSTGRES_URL` overrides it. Tests fail
/// (never skip) when it is not up.
fn url() -> String {
    std::env::var("PRISM_TEST_POSTGRES_URL").unwrap_or_else(|_| PostgresConfig::default().url)
}

/// A table name no other test (or test run) uses: purge is table-wide,
/// so unique namespaces would not isolate tests.
fn unique_table() -> String {
    format!("prism_kv_t{}", crate::testing::unique_suffix())
}

fn config(table: &str) -> PostgresConfig {
    PostgresConfig {
        url: url(),
        table: table.into(),
        max_connections: 4,
        min_connections: 1,
        ..PostgresConfig::default()
    }
}

/// Drops a test's tables when the test ends, passed or failed.
struct DropTables {
    table: String,
    _cleanup: Cleanup,
}

impl DropTables {
    fn new(table: &str) -> Self {
        let name = table.to_owned();
        let cleanup = Cleanup::new(move || async move {
            let Ok(Ok(mut conn)) =
                tokio::time::timeout(PATIENCE, PgConnection::connect_with(&admin_options())).await
            else {
                return;
            };
            let _ = conn
                .execute(
                    format!(
                        "SET lock_timeout = '5s'; \
                         DROP TABLE IF EXISTS public.\"{name}\"; \
                         DROP TABLE IF EXISTS public.\"{name}_schema_version\""
                    )
                    .as_str(),
                )
                .await;
            let _ = conn.close().await;
        });
        DropTables {
            table: table.to_owned(),
            _cleanup: cleanup,
        }
    }
}

/// A backend on a table of its own with a pool of `max_connections`.
async fn small_pool(max_connections: u32) -> (PostgresBackend, DropTables) {
    resting_pool(max_connections, None).await
}

/// A backend on a table of its own with a pool of `max_connections`, for
/// namespaces whose requests mostly have `common_timeout`.
async fn resting_pool(
    max_connections: u32,
    common_timeout: Option<Duration>,
) -> (PostgresBackend, DropTables) {
    let table = unique_table();
    let guard = DropTables::new(&table);
    let backend = open(PostgresConfig {
        max_connections,
        min_connections: 1,
        common_timeout,
        ..config(&table)
    })
    .await;
    (backend, guard)
}

async fn fresh_concrete() -> (PostgresBackend, DropTables) {
    let table = unique_table();
    let guard = DropTables::new(&table);
    (open(config(&table)).await, guard)
}

/// A backend made with `config`.
async fn open(config: PostgresConfig) -> PostgresBackend {
    PostgresConnector::new(config)
        .expect("valid config")
        .open()
        .await
        .expect("connect to the test postgres (is it running?)")
}

/// How long a test's own statement or connect may take: a server that
/// stops answering fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(10);

/// The test's own sessions: their statements are bounded by `PATIENCE`.
fn admin_options() -> PgConnectOptions {
    PgConnectOptions::from_str(&url())
        .expect("test postgres url")
        .options([("statement_timeout", "10s")])
}

async fn admin() -> PgConnection {
    tokio::time::timeout(PATIENCE, PgConnection::connect_with(&admin_options()))
        .await
        .expect("connecting to the test postgres timed out")
        .expect("connect to the test postgres")
}

async fn versions(table: &str) -> Vec<i64> {
    let mut conn = admin().await;
    let v = sqlx::query_scalar(&format!(
        "SELECT version FROM public.\"{table}_schema_version\" ORDER BY version"
    ))
    .fetch_all(&mut conn)
    .await
    .expect("versions");
    let _ = conn.close().await;
    v
}

fn put_op(key: &str, value: &'static [u8]) -> Op {
    Op::Put {
        key: key.into(),
        value: Bytes::from_static(value),
        ttl: None,
    }
}

#[tokio::test]
async fn schema_migration_is_idempotent_across_connects() {
    let all: Vec<i64> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert!(
        all.windows(2).all(|w| w[1] == w[0] + 1),
        "versions must be consecutive"
    );
    assert_eq!(all.first(), Some(&1));

    let (first, guard) = fresh_concrete().await;
    assert_eq!(versions(&guard.table).await, all);
    first.exec("ns", put_op("k", b"v")).await.expect("put");
    first.close().await;

    let connector = PostgresConnector::new(config(&guard.table)).expect("config");
    for _ in 0..2 {
        let again = connector.connect().await.expect("reconnect");
        assert_eq!(versions(&guard.table).await, all, "a migration ran twice");
        assert_eq!(
            again
                .exec("ns", Op::Exists { key: "k".into() })
                .await
                .expect("exists"),
            Outcome::Exists(true),
            "reconnect lost data"
        );
        again.close().await;
    }
}

#[tokio::test]
async fn concurrent_first_connects_migrate_exactly_once() {
    let table = unique_table();
    let guard = DropTables::new(&table);
    let connector = PostgresConnector::new(config(&table)).expect("config");
    let starts: Vec<_> = (0..6)
        .map(|_| {
            let connector = connector.clone();
            tokio::spawn(async move { connector.connect().await })
        })
        .collect();
    let mut backends = Vec::new();
    for start in starts {
        backends.push(
            start
                .await
                .expect("connect task")
                .expect("a concurrent connect failed"),
        );
    }
    let all: Vec<i64> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(versions(&guard.table).await, all);
    for (i, b) in backends.iter().enumerate() {
        b.exec("ns", put_op(&format!("k{i}"), b"v"))
            .await
            .expect("put");
    }
    for b in backends {
        b.close().await;
    }
}

#[tokio::test]
async fn a_start_waits_for_another_instances_migration() {
    let table = unique_table();
    let _guard = DropTables::new(&table);
    let connector = PostgresConnector::new(config(&table)).expect("config");
    // Another instance in the middle of migrating this table.
    let mut other = admin().await;
    other.execute("BEGIN").await.expect("begin");
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(connector.sql.migration_lock)
        .execute(&mut other)
        .await
        .expect("lock");
    let start = tokio::spawn({
        let connector = connector.clone();
        async move { connector.connect().await }
    });
    // Wait until the start queues on the lock, as the server sees it
    // (from a session of its own: a transaction sees one snapshot of
    // the activity view).
    let mut observer = admin().await;
    let patience = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event = 'advisory' AND query LIKE '%pg_advisory_xact_lock%' \
             AND pid <> pg_backend_pid()",
        )
        .fetch_one(&mut observer)
        .await
        .expect("pg_stat_activity");
        if waiting > 0 {
            break;
        }
        assert!(!start.is_finished(), "started during another's migration");
        assert!(
            Instant::now() < patience,
            "the start never queued on the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!start.is_finished(), "started during another's migration");
    let _ = observer.close().await;
    other.execute("COMMIT").await.expect("commit");
    let _ = other.close().await;
    let b = start.await.expect("start task").expect("connect");
    assert_eq!(
        versions(&table).await,
        MIGRATIONS.iter().map(|m| m.version).collect::<Vec<_>>()
    );
    b.close().await;
}

#[tokio::test]
async fn a_schema_newer_than_this_build_is_refused() {
    let (b, guard) = fresh_concrete().await;
    close(&b).await;
    let mut conn = admin().await;
    sqlx::query(&format!(
        "INSERT INTO public.\"{}_schema_version\" (version, name) VALUES (9999, 'future')",
        guard.table
    ))
    .execute(&mut conn)
    .await
    .expect("insert");
    let _ = conn.close().await;
    match PostgresConnector::new(config(&guard.table))
        .expect("config")
        .connect()
        .await
    {
        Err(e @ Error::Internal(_)) => {
            let msg = e.chain().to_string();
            assert!(msg.contains("9999"), "{msg}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a newer schema was accepted"),
    }
}

#[test]
fn invalid_identifiers_are_rejected_with_a_clear_message() {
    for (schema, table, what) in [
        ("public", "prism-kv", "table"),
        ("public", "kv\"; DROP TABLE x; --", "table"),
        ("public", "1kv", "table"),
        ("public", "", "table"),
        ("public", &"t".repeat(49), "table"),
        ("my schema", "prism_kv", "schema"),
        ("", "prism_kv", "schema"),
        (&"s".repeat(64), "prism_kv", "schema"),
    ] {
        let config = PostgresConfig {
            schema: schema.into(),
            table: table.into(),
            ..PostgresConfig::default()
        };
        match PostgresConnector::new(config) {
            Err(e) => {
                assert_eq!(e.field, what);
                let msg = e.to_string();
                assert!(msg.contains(&format!("invalid postgres {what}")), "{msg}");
                assert!(
                    msg.contains(&format!(
                        "{:?}",
                        if what == "table" { table } else { schema }
                    )),
                    "{msg}"
                );
            }
            Ok(_) => panic!("{schema:?}.{table:?} was accepted"),
        }
    }
    for (schema, table) in [
        ("public", "prism_kv"),
        ("_S1", "T_2"),
        ("a", &"t".repeat(48)),
    ] {
        let config = PostgresConfig {
            schema: schema.into(),
            table: table.into(),
            ..PostgresConfig::default()
        };
        assert!(PostgresConnector::new(config).is_ok(), "{schema}.{table}");
    }
    for url in ["mysql://u:secret@h/db", "postgres://u:secret@h:port/db"] {
        let bad_url = PostgresConfig {
            url: url.into(),
            ..PostgresConfig::default()
        };
        match PostgresConnector::new(bad_url) {
            Err(e) => {
                assert_eq!(e.field, "url");
                let msg = e.to_string();
                assert!(msg.contains("invalid postgres url"), "{msg}");
                assert!(!msg.contains("secret"), "the password leaked: {msg}");
            }
            Ok(other) => panic!("{url}: {other:?}"),
        }
    }
}

#[test]
fn the_config_is_shown_without_its_password() {
    // The redaction itself is tested with the toolkit.
    let config = PostgresConfig {
        url: "postgres://u:hunter2@h/db".into(),
        ..PostgresConfig::default()
    };
    assert!(!format!("{config:?}").contains("hunter2"));
}

#[tokio::test]
async fn a_custom_schema_is_created_and_used() {
    let table = unique_table();
    let schema = format!("s_{table}");
    let b = PostgresConnector::new(PostgresConfig {
        schema: schema.clone(),
        ..config(&table)
    })
    .expect("config")
    .connect()
    .await
    .expect("connect");
    b.exec("ns", put_op("k", b"v")).await.expect("put");
    b.close().await;
    let mut conn = admin().await;
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{schema}\".\"{table}\""))
        .fetch_one(&mut conn)
        .await
        .expect("count");
    assert_eq!(rows, 1);
    conn.execute(format!("DROP SCHEMA \"{schema}\" CASCADE").as_str())
        .await
        .expect("drop schema");
    let _ = conn.close().await;
}

/// Holds a row lock on `ns/key` of `table` in an open transaction until
/// dropped (or rolled back).
async fn lock_row(table: &str, key: &str) -> PgConnection {
    let mut conn = admin().await;
    conn.execute("BEGIN").await.expect("begin");
    let locked: Option<i32> = sqlx::query_scalar(&format!(
        "SELECT 1 FROM public.\"{table}\" WHERE namespace = 'ns' AND key = $1 FOR UPDATE"
    ))
    .bind(key)
    .fetch_optional(&mut conn)
    .await
    .expect("lock");
    assert_eq!(locked, Some(1), "no row to lock");
    conn
}

/// Statements on `table` still running on the server, other than ours.
async fn active_statements(table: &str) -> i64 {
    let mut conn = admin().await;
    let n = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE state = 'active' AND pid <> pg_backend_pid() AND query LIKE $1",
    )
    .bind(format!("%\"{table}\"%"))
    .fetch_one(&mut conn)
    .await
    .expect("pg_stat_activity");
    let _ = conn.close().await;
    n
}

#[tokio::test]
async fn a_deadline_cancels_the_statement_on_the_server() {
    let (b, guard) = fresh_concrete().await;
    b.exec("ns", put_op("k", b"v1")).await.expect("put");
    let mut holder = lock_row(&guard.table, "k").await;

    // The lock is held throughout: the operation can only end by its
    // deadline, and its statement can only leave the server by being
    // cancelled there.
    let deadline = Instant::now() + Duration::from_millis(100);
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        b.exec_until("ns", put_op("k", b"v2"), deadline),
    )
    .await
    .expect("the deadline was not honoured");
    assert!(matches!(res, Err(Error::Timeout)), "{res:?}");

    let patience = Instant::now() + Duration::from_secs(10);
    while active_statements(&guard.table).await > 0 {
        assert!(
            Instant::now() < patience,
            "the statement kept running on the server"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its connection came back to the pool and serves other keys.
    b.exec_until(
        "ns",
        put_op("other", b"x"),
        Instant::now() + Duration::from_secs(5),
    )
    .await
    .expect("put after a cancelled statement");

    holder.execute("ROLLBACK").await.expect("rollback");
    let _ = holder.close().await;
    match b
        .exec_until("ns", Op::Get { key: "k".into() }, Instant::now() + PATIENCE)
        .await
    {
        Ok(Outcome::Get(Some(r))) => {
            assert_eq!(
                r.value,
                Bytes::from_static(b"v1"),
                "the cancelled put applied"
            )
        }
        other => panic!("{other:?}"),
    }
    close(&b).await;
}

#[tokio::test]
async fn a_deadline_bounds_the_wait_for_a_connection() {
    let (b, guard) = small_pool(1).await;
    b.exec("ns", put_op("k", b"v")).await.expect("put");
    let mut holder = lock_row(&guard.table, "k").await;
    // The only connection is stuck behind the lock until its own
    // deadline; the second operation's deadline comes first.
    let stuck = b.exec_until(
        "ns",
        put_op("k", b"w"),
        Instant::now() + Duration::from_secs(3),
    );
    let waiting = b.exec_until(
        "ns",
        Op::Exists { key: "k".into() },
        Instant::now() + Duration::from_millis(100),
    );
    let (stuck, waiting) = tokio::join!(stuck, waiting);
    assert!(matches!(waiting, Err(Error::Timeout)), "{waiting:?}");
    assert!(matches!(stuck, Err(Error::Timeout)), "{stuck:?}");
    holder.execute("ROLLBACK").await.expect("rollback");
    let _ = holder.close().await;
    close(&b).await;
}

#[tokio::test]
async fn the_configured_statement_timeout_bounds_operations_without_a_deadline() {
    let table = unique_table();
    let guard = DropTables::new(&table);
    let b = open(PostgresConfig {
        statement_timeout: Some(Duration::from_millis(100)),
        ..config(&table)
    })
    .await;
    b.exec("ns", put_op("k", b"v")).await.expect("put");
    let mut holder = lock_row(&guard.table, "k").await;
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        b.exec("ns", Op::Delete { key: "k".into() }),
    )
    .await
    .expect("the statement timeout was not honoured");
    assert!(matches!(res, Err(Error::Timeout)), "{res:?}");
    holder.execute("ROLLBACK").await.expect("rollback");
    let _ = holder.close().await;
    close(&b).await;
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    let connector = PostgresConnector::new(PostgresConfig {
        url: "postgres://postgres@127.0.0.1:1/test".into(),
        acquire_timeout: Duration::from_secs(2),
        ..PostgresConfig::default()
    })
    .expect("config");
    let started = Instant::now();
    match connector.connect().await {
        Err(Error::Unavailable(_)) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("connected to port 1"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn scan_is_an_ordered_primary_key_range() {
    let (b, _guard) = fresh_concrete().await;
    let mut conn = b.pool.get().await.expect("conn");
    // Planner settings that make any sort or sequential scan visible
    // on a small table.
    conn.execute("SET enable_seqscan = off; SET enable_sort = off")
        .await
        .expect("settings");
    for (keys_only, exclusive, upper) in [
        (false, false, true),
        (true, true, true),
        (false, true, false),
    ] {
        let sql = format!(
            "EXPLAIN {}",
            b.sql.scan[super::scan_index(keys_only, exclusive, upper)]
        );
        let mut query = sqlx::query_scalar::<_, String>(&sql)
            .bind("ns")
            .bind("a")
            .bind(10i64);
        if upper {
            query = query.bind("b");
        }
        // The page's byte budget.
        query = query.bind(1i64 << 20);
        let plan = query.fetch_all(&mut *conn).await.expect("plan").join("\n");
        assert!(plan.contains("Index"), "{plan}");
        assert!(!plan.contains("Sort"), "scan sorts: {plan}");
        assert!(!plan.contains("Seq Scan"), "{plan}");
        let cond = if exclusive { "(key > " } else { "(key >= " };
        assert!(plan.contains(cond), "{plan}");
        if upper {
            assert!(plan.contains("(key < "), "{plan}");
        }
        assert!(!plan.to_lowercase().contains("like"), "{plan}");
    }
    drop(conn);
    close(&b).await;
}

#[tokio::test]
async fn connections_report_the_pool() {
    let (b, _guard) = fresh_concrete().await;
    b.health().await.expect("health");
    let stats = b.connections();
    assert!(stats.in_use + stats.idle >= 1, "{stats:?}");
    assert!(stats.in_use + stats.idle <= 4, "{stats:?}");
    assert!(!b.is_inline());
    b.close().await;
    assert!(b.health().await.is_err(), "a closed backend still answers");
}

#[tokio::test]
async fn huge_ttls_mean_no_expiry() {
    let (b, _guard) = fresh_concrete().await;
    for ttl in [
        Duration::MAX,
        Duration::from_secs(u64::MAX / 2),
        crate::backend::toolkit::MAX_TTL * 2,
    ] {
        b.exec(
            "ns",
            Op::Put {
                key: "k".into(),
                value: Bytes::from_static(b"v"),
                ttl: Some(ttl),
            },
        )
        .await
        .expect("put");
        match b.exec("ns", Op::Get { key: "k".into() }).await {
            Ok(Outcome::Get(Some(r))) => assert_eq!(r.ttl, None),
            other => panic!("{other:?}"),
        }
    }
    close(&b).await;
}

/// Closes a test's backend once every connection has come back to its
/// pool: one that never does fails the test, showing what the server's
/// sessions were doing, instead of hanging it.
async fn close(b: &PostgresBackend) {
    let all_back = eventually(PATIENCE, move || async move {
        let status = b.pool.status();
        status.available == status.size
    })
    .await;
    if all_back {
        b.close().await;
        return;
    }
    let status = b.pool.status();
    let mut conn = admin().await;
    type Session = (i32, Option<String>, Option<String>, Option<String>);
    let sessions: Vec<Session> = sqlx::query_as(
        "SELECT pid, state, wait_event, left(query, 100) FROM pg_stat_activity \
         WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap_or_default();
    panic!(
        "a connection never came back to the pool (size {}, idle {}); sessions: {sessions:?}",
        status.size, status.available
    );
}

/// Forty puts of `k`, each waiting (behind a lock held on its row) until a
/// deadline of its own between 20 and 110 ms: every one times out, cut off
/// at another point of its exchange with the server.
async fn cut_off_puts(b: PostgresBackend) -> std::sync::Arc<PostgresBackend> {
    let b = std::sync::Arc::new(b);
    let mut cut_off = tokio::task::JoinSet::new();
    for i in 0..40u64 {
        let b = std::sync::Arc::clone(&b);
        let deadline = Instant::now() + Duration::from_millis(20 + (i * 7) % 90);
        cut_off.spawn(async move { b.exec_until("ns", put_op("k", b"v2"), deadline).await });
    }
    while let Some(res) = cut_off.join_next().await {
        let res = res.expect("put task");
        assert!(matches!(res, Err(Error::Timeout)), "{res:?}");
    }
    b
}

#[tokio::test]
async fn connections_of_operations_cut_off_at_their_deadline_come_back_to_the_pool() {
    let (b, guard) = small_pool(2).await;
    b.exec("ns", put_op("k", b"v1")).await.expect("put");
    let holder = lock_row(&guard.table, "k").await;

    // Every put waits for the lock until its deadline; the deadlines end
    // at many different points of their connection's exchange with the
    // server (waiting for a connection, setting the timeout, the statement).
    let b = cut_off_puts(b).await;
    drop(holder);

    // Both connections serve again, and the pool closes: none was lost.
    let mut after = tokio::task::JoinSet::new();
    for i in 0..2 {
        let b = std::sync::Arc::clone(&b);
        after.spawn(async move {
            b.exec_until(
                "ns",
                put_op(&format!("after{i}"), b"x"),
                Instant::now() + PATIENCE,
            )
            .await
        });
    }
    while let Some(res) = after.join_next().await {
        res.expect("put task").expect("put after the cut-offs");
    }
    close(&b).await;
}

/// The `statement_timeout` of the connection `conn`'s session, in
/// milliseconds (0: none).
async fn statement_timeout_ms(conn: &mut PgConnection) -> i64 {
    tokio::time::timeout(
        PATIENCE,
        sqlx::query_scalar(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'statement_timeout'",
        )
        .fetch_one(conn),
    )
    .await
    .expect("reading the statement timeout timed out")
    .expect("statement timeout")
}

/// The `statement_timeout` of every connection of `b`'s pool of `size`
/// (all of them checked out at once), in milliseconds. A connection comes
/// out of the pool only after its last user restored it.
async fn pooled_statement_timeouts_ms(b: &PostgresBackend, size: usize) -> Vec<i64> {
    let mut conns = Vec::new();
    for _ in 0..size {
        conns.push(
            tokio::time::timeout(PATIENCE, b.pool.get())
                .await
                .expect("no connection came back to the pool")
                .expect("acquire"),
        );
    }
    let mut settings = Vec::new();
    for conn in &mut conns {
        settings.push(statement_timeout_ms(conn).await);
    }
    settings
}

fn get_op(key: &str) -> Op {
    Op::Get { key: key.into() }
}

#[test]
fn operations_close_below_the_resting_timeout_keep_it() {
    let ms = Duration::from_millis;
    assert_eq!(tolerance(ms(100)), ms(2), "the floor");
    assert_eq!(tolerance(ms(5000)), ms(50), "1 %");
    for resting in [ms(100), ms(300), ms(5000)] {
        let tol = tolerance(resting);
        let r = Some(resting);
        assert!(keeps_resting(Some(resting), r), "{resting:?}");
        assert!(keeps_resting(Some(resting - tol), r), "{resting:?}");
        assert!(
            !keeps_resting(Some(resting - tol - Duration::from_nanos(1)), r),
            "{resting:?}: too short"
        );
        assert!(
            !keeps_resting(Some(resting + Duration::from_nanos(1)), r),
            "{resting:?}: the server would cancel before the deadline"
        );
        assert!(!keeps_resting(None, r), "no bound wanted, one resting");
        assert!(
            !keeps_resting(Some(resting), None),
            "a bound wanted, none resting"
        );
    }
    assert!(keeps_resting(None, None));

    let with = |statement_timeout, common_timeout| PostgresConfig {
        statement_timeout,
        common_timeout,
        ..PostgresConfig::default()
    };
    assert_eq!(resting_timeout(&with(None, None)), None);
    assert_eq!(resting_timeout(&with(Some(ms(7)), None)), Some(ms(7)));
    assert_eq!(resting_timeout(&with(None, Some(ms(9)))), Some(ms(9)));
    assert_eq!(
        resting_timeout(&with(Some(ms(7)), Some(ms(9)))),
        Some(ms(7))
    );
    assert_eq!(
        resting_timeout(&with(Some(ms(9)), Some(ms(7)))),
        Some(ms(7))
    );
}

#[tokio::test]
async fn operations_with_the_common_deadline_take_one_round_trip() {
    // Long enough that the way from `Instant::now()` to the connection
    // always stays within the tolerance (50 ms).
    let common = Duration::from_secs(5);
    let (b, _guard) = resting_pool(2, Some(common)).await;
    assert_eq!(pooled_statement_timeouts_ms(&b, 2).await, [5000, 5000]);
    let sets = || b.timeouts.sets.load(std::sync::atomic::Ordering::Relaxed);

    for i in 0..50 {
        let key = format!("k{}", i % 5);
        let op = if i % 2 == 0 {
            put_op(&key, b"v")
        } else {
            get_op(&key)
        };
        b.exec_until("ns", op, Instant::now() + common)
            .await
            .expect("common operation");
    }
    b.health().await.expect("health");
    assert_eq!(
        sets(),
        0,
        "a common operation set its own statement timeout"
    );
    assert_eq!(pooled_statement_timeouts_ms(&b, 2).await, [5000, 5000]);

    // A caller with a deadline of its own sets it, and the connection gets
    // the resting value back before anyone else can have it.
    for i in 0..5u64 {
        b.exec_until(
            "ns",
            get_op("k0"),
            Instant::now() + Duration::from_millis(800 + i),
        )
        .await
        .expect("short operation");
        assert_eq!(sets(), 2 * (i + 1), "a setting and its restore");
    }
    assert_eq!(pooled_statement_timeouts_ms(&b, 2).await, [5000, 5000]);
    // So do one with a longer deadline and one without any.
    b.exec_until("ns", get_op("k0"), Instant::now() + common * 2)
        .await
        .expect("long operation");
    b.exec("ns", get_op("k0"))
        .await
        .expect("unbounded operation");
    assert_eq!(sets(), 14);
    assert_eq!(pooled_statement_timeouts_ms(&b, 2).await, [5000, 5000]);
    close(&b).await;
}

#[tokio::test]
async fn the_resting_timeout_cancels_a_common_statement_on_the_server() {
    // Long enough that the way from `Instant::now()` to the connection
    // always stays within the tolerance (20 ms).
    let common = Duration::from_secs(2);
    let (b, guard) = resting_pool(1, Some(common)).await;
    b.exec("ns", put_op("k", b"v1")).await.expect("put");
    let mut holder = lock_row(&guard.table, "k").await;

    let sets_before = b.timeouts.sets.load(std::sync::atomic::Ordering::Relaxed);
    // The attempt itself, not cut off by the gateway at the deadline: with
    // the lock held throughout, only the server's statement timeout can end
    // it.
    let res = tokio::time::timeout(
        PATIENCE,
        b.attempt("ns", put_op("k", b"v2"), Some(Instant::now() + common)),
    )
    .await
    .expect("the statement was not cancelled on the server");
    assert!(matches!(res, Err(Error::Timeout)), "{res:?}");
    assert_eq!(
        b.timeouts.sets.load(std::sync::atomic::Ordering::Relaxed),
        sets_before,
        "the statement ran under a timeout of its own"
    );
    assert_eq!(active_statements(&guard.table).await, 0);
    assert_eq!(pooled_statement_timeouts_ms(&b, 1).await, [2000]);

    holder.execute("ROLLBACK").await.expect("rollback");
    let _ = holder.close().await;
    match b
        .exec_until("ns", get_op("k"), Instant::now() + common)
        .await
    {
        Ok(Outcome::Get(Some(r))) => assert_eq!(r.value, Bytes::from_static(b"v1")),
        other => panic!("{other:?}"),
    }
    close(&b).await;
}

#[tokio::test]
async fn connections_cut_off_with_a_deadline_of_their_own_come_back_restored() {
    let (b, guard) = resting_pool(2, Some(Duration::from_secs(3))).await;
    b.exec("ns", put_op("k", b"v1")).await.expect("put");
    let holder = lock_row(&guard.table, "k").await;
    // Short deadlines, each cut off at another point: waiting for a
    // connection, setting the timeout, the statement, the restore.
    let b = cut_off_puts(b).await;
    drop(holder);
    assert_eq!(pooled_statement_timeouts_ms(&b, 2).await, [3000, 3000]);
    close(&b).await;
}

/// The server-side process id of the connection `b`'s pool hands out
/// next.
async fn backend_pid(b: &PostgresBackend) -> i32 {
    let mut conn = tokio::time::timeout(PATIENCE, b.pool.get())
        .await
        .expect("no connection came back to the pool")
        .expect("checkout");
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .expect("pid")
}

/// Whether the server still has a session with process id `pid`.
async fn session_alive(pid: i32) -> bool {
    let mut conn = admin().await;
    let alive: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
        .bind(pid)
        .fetch_one(&mut conn)
        .await
        .expect("pg_stat_activity");
    let _ = conn.close().await;
    alive > 0
}

/// Ends the server's session `pid` and waits until it is gone.
async fn terminate(pid: i32) {
    let mut conn = admin().await;
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&mut conn)
        .await
        .expect("terminate");
    let _ = conn.close().await;
    assert!(
        eventually(PATIENCE, || async move { !session_alive(pid).await }).await,
        "the session was not terminated"
    );
}

/// The server's sessions of the application `name`.
async fn sessions(name: &str) -> i64 {
    let mut conn = admin().await;
    let n = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
        .bind(name)
        .fetch_one(&mut conn)
        .await
        .expect("pg_stat_activity");
    let _ = conn.close().await;
    n
}

/// An application name no other test uses, to count a pool's sessions.
fn unique_application() -> String {
    format!("prism_t{}", crate::testing::unique_suffix())
}

#[tokio::test]
async fn a_connection_the_server_dropped_while_idle_is_replaced() {
    let (b, guard) = small_pool(1).await;
    b.exec("ns", put_op("k", b"v")).await.expect("put");
    terminate(backend_pid(&b).await).await;
    // Idle long enough to be checked before use: the operation gets a new
    // connection, not an error.
    tokio::time::sleep(PING_WHEN_IDLE + Duration::from_millis(100)).await;
    match b
        .exec_until("ns", get_op("k"), Instant::now() + PATIENCE)
        .await
    {
        Ok(Outcome::Get(Some(r))) => assert_eq!(r.value, Bytes::from_static(b"v")),
        other => panic!("{other:?} (table {})", guard.table),
    }
    close(&b).await;
}

#[tokio::test]
async fn a_connection_that_failed_on_the_wire_is_never_handed_out_again() {
    let (b, _guard) = small_pool(1).await;
    b.exec("ns", put_op("k", b"v")).await.expect("put");
    let pid = backend_pid(&b).await;
    terminate(pid).await;
    // Used again well within PING_WHEN_IDLE: nothing checks the connection
    // first, so the operation meets the ended session.
    let res = b.exec("ns", get_op("k")).await;
    assert!(matches!(res, Err(Error::Unavailable(_))), "{res:?}");
    assert_eq!(
        b.pool.status().size,
        0,
        "the broken connection went back to the pool"
    );
    // The next operation, as soon, gets a new connection.
    match b.exec("ns", get_op("k")).await {
        Ok(Outcome::Get(Some(r))) => assert_eq!(r.value, Bytes::from_static(b"v")),
        other => panic!("{other:?}"),
    }
    assert_ne!(backend_pid(&b).await, pid);
    close(&b).await;
}

#[tokio::test]
async fn a_connection_cut_off_mid_statement_is_never_handed_out_again() {
    let (b, guard) = small_pool(1).await;
    b.exec("ns", put_op("k", b"v1")).await.expect("put");
    let pid = backend_pid(&b).await;
    let holder = lock_row(&guard.table, "k").await;
    // The operation itself (not the deadline's background attempt),
    // dropped while its statement waits for the lock.
    let cut = tokio::time::timeout(
        Duration::from_millis(200),
        b.attempt("ns", put_op("k", b"v2"), None),
    )
    .await;
    assert!(cut.is_err(), "the put did not wait for the lock: {cut:?}");
    assert_eq!(
        b.pool.status().size,
        0,
        "the cut-off connection went back to the pool"
    );
    // A new connection serves at once, while the old session still waits.
    b.exec_until("ns", put_op("other", b"x"), Instant::now() + PATIENCE)
        .await
        .expect("put on a new connection");
    assert_ne!(backend_pid(&b).await, pid);
    assert!(
        session_alive(pid).await,
        "the old statement was not waiting"
    );
    // Once the lock is gone, the old statement ends and its session with it.
    drop(holder);
    assert!(
        eventually(PATIENCE, || async move { !session_alive(pid).await }).await,
        "the cut-off session lives on"
    );
    close(&b).await;
}

/// A relay between the tests' pools and the test server that counts the
/// `Sync` messages clients send: every statement of the extended protocol
/// (sqlx's queries, `set_config`) ends with one, and sqlx's ping is one
/// alone, so it counts round trips. Returns the URL that goes through it.
async fn counting_relay() -> (String, Arc<AtomicU64>) {
    let upstream = PgConnectOptions::from_str(&url()).expect("test postgres url");
    let target = format!("{}:{}", upstream.get_host(), upstream.get_port());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let here = listener.local_addr().expect("address").to_string();
    let syncs = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&syncs);
    let upstream_addr = target.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream_addr).await else {
                continue;
            };
            tokio::spawn(relay(client, server, Arc::clone(&counter)));
        }
    });
    let relayed = url().replacen(&target, &here, 1);
    assert_ne!(relayed, url(), "the test url names no {target}");
    // In clear, so the relay reads the messages.
    let sep = if relayed.contains('?') { '&' } else { '?' };
    (format!("{relayed}{sep}sslmode=disable"), syncs)
}

/// Copies one connection both ways, counting the client's `Sync` messages
/// before the server gets them.
async fn relay(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    syncs: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
        let _ = to_client.shutdown().await;
    });
    let up = async {
        // The startup message has a length and no type byte; every later
        // message a type byte, then its length (which counts itself).
        let mut len = [0u8; 4];
        from_client.read_exact(&mut len).await?;
        let mut body = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
        from_client.read_exact(&mut body).await?;
        to_server.write_all(&len).await?;
        to_server.write_all(&body).await?;
        loop {
            let mut head = [0u8; 5];
            from_client.read_exact(&mut head).await?;
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            let mut body = vec![0u8; len.saturating_sub(4)];
            from_client.read_exact(&mut body).await?;
            if head[0] == b'S' {
                syncs.fetch_add(1, Ordering::SeqCst);
            }
            to_server.write_all(&head).await?;
            to_server.write_all(&body).await?;
        }
    };
    let _: std::io::Result<()> = up.await;
    let _ = to_server.shutdown().await;
    let _ = down.await;
}

#[tokio::test]
async fn operations_take_one_round_trip_and_none_after_their_answer() {
    let (relayed, syncs) = counting_relay().await;
    let table = unique_table();
    let _guard = DropTables::new(&table);
    let b = open(PostgresConfig {
        url: relayed,
        max_connections: 1,
        min_connections: 1,
        ..config(&table)
    })
    .await;
    // The statements are prepared on the connection by their first use.
    b.exec("ns", put_op("k", b"v")).await.expect("put");
    b.exec("ns", get_op("k")).await.expect("get");
    b.health().await.expect("health");
    let round_trips = || syncs.load(Ordering::SeqCst);

    let before = round_trips();
    for i in 0..20 {
        let op = if i % 2 == 0 {
            get_op("k")
        } else {
            put_op("k", b"w")
        };
        b.exec("ns", op).await.expect("operation");
    }
    b.health().await.expect("health");
    assert_eq!(
        round_trips() - before,
        21,
        "sequential operations on one connection took more than one round trip each"
    );

    // A connection idle for PING_WHEN_IDLE is checked before use, once.
    tokio::time::sleep(PING_WHEN_IDLE + Duration::from_millis(100)).await;
    let before = round_trips();
    b.exec("ns", get_op("k")).await.expect("get");
    b.exec("ns", get_op("k")).await.expect("get");
    assert_eq!(round_trips() - before, 3, "a ping and two statements");
    close(&b).await;
}

#[tokio::test]
async fn the_manager_pings_only_idle_connections_and_refuses_old_ones() {
    use deadpool::managed::{Manager as _, Metrics};
    let (relayed, syncs) = counting_relay().await;
    let manager = Manager {
        options: PgConnectOptions::from_str(&relayed).expect("url"),
        max_lifetime: Some(Duration::from_secs(60)),
    };
    let mut conn = manager.create().await.expect("connect");
    let now = std::time::Instant::now();
    let ago = |d: Duration| now.checked_sub(d).expect("an instant in the past");
    let round_trips = || syncs.load(Ordering::SeqCst);
    let before = round_trips();
    let used_just_now = Metrics {
        created: ago(Duration::from_secs(30)),
        recycled: Some(now),
        recycle_count: 7,
    };
    assert!(manager.recycle(&mut conn, &used_just_now).await.is_ok());
    assert_eq!(
        round_trips(),
        before,
        "a connection used just now was pinged"
    );
    let idle = Metrics {
        recycled: Some(ago(PING_WHEN_IDLE)),
        ..used_just_now
    };
    assert!(manager.recycle(&mut conn, &idle).await.is_ok());
    assert_eq!(
        round_trips(),
        before + 1,
        "an idle connection was not pinged"
    );
    let old = Metrics {
        created: ago(Duration::from_secs(60)),
        ..used_just_now
    };
    assert!(
        manager.recycle(&mut conn, &old).await.is_err(),
        "a connection past its max_lifetime was handed out"
    );
    let _ = conn.close().await;
}

#[tokio::test]
async fn idle_connections_above_the_minimum_close_after_idle_timeout() {
    let table = unique_table();
    let _guard = DropTables::new(&table);
    let app = unique_application();
    let b = open(PostgresConfig {
        max_connections: 4,
        min_connections: 2,
        idle_timeout: Some(Duration::from_millis(400)),
        application_name: app.clone(),
        ..config(&table)
    })
    .await;
    assert_eq!(
        sessions(&app).await,
        2,
        "min_connections are opened at start"
    );
    assert_eq!(b.connections(), PoolStats { in_use: 0, idle: 2 });

    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(b.pool.get().await.expect("checkout"));
    }
    assert_eq!(sessions(&app).await, 4);
    drop(held);
    assert!(
        eventually(Duration::from_secs(3), || {
            let app = app.clone();
            async move { sessions(&app).await == 2 }
        })
        .await,
        "idle connections above the minimum stay open"
    );
    // And the minimum stays, however long it idles.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(sessions(&app).await, 2, "the reaper went below the minimum");
    assert_eq!(b.connections(), PoolStats { in_use: 0, idle: 2 });
    b.close().await;
    assert!(
        eventually(PATIENCE, || {
            let app = app.clone();
            async move { sessions(&app).await == 0 }
        })
        .await,
        "close left sessions open"
    );
}

#[tokio::test]
async fn connections_past_max_lifetime_are_replaced() {
    let table = unique_table();
    let _guard = DropTables::new(&table);
    let app = unique_application();
    let lifetime = Duration::from_millis(300);
    let b = open(PostgresConfig {
        max_connections: 1,
        min_connections: 1,
        idle_timeout: None,
        max_lifetime: Some(lifetime),
        application_name: app.clone(),
        ..config(&table)
    })
    .await;
    // In use past its lifetime: replaced at its next checkout.
    let first = {
        let mut conn = b.pool.get().await.expect("checkout");
        tokio::time::sleep(lifetime + Duration::from_millis(50)).await;
        sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await
            .expect("pid")
    };
    let second = backend_pid(&b).await;
    assert_ne!(first, second, "a connection past max_lifetime was reused");
    // Idle past its lifetime: closed by the reaper, which opens another to
    // keep min_connections.
    assert!(
        eventually(PATIENCE, || async move { !session_alive(second).await }).await,
        "an idle connection outlived max_lifetime"
    );
    assert!(
        eventually(PATIENCE, || {
            let app = app.clone();
            async move { sessions(&app).await == 1 }
        })
        .await,
        "min_connections were not kept"
    );
    close(&b).await;
}

#[tokio::test]
async fn an_exhausted_pool_is_unavailable_after_acquire_timeout() {
    let table = unique_table();
    let _guard = DropTables::new(&table);
    let acquire_timeout = Duration::from_millis(300);
    let b = open(PostgresConfig {
        max_connections: 1,
        acquire_timeout,
        ..config(&table)
    })
    .await;
    let held = b.pool.get().await.expect("checkout");
    let started = Instant::now();
    match b.exec("ns", get_op("k")).await {
        Err(e @ Error::Unavailable(_)) => {
            let chain = e.chain().to_string();
            assert!(
                chain.contains("postgres connection pool exhausted"),
                "{chain}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() >= acquire_timeout,
        "{:?}",
        started.elapsed()
    );
    drop(held);
    b.exec("ns", get_op("k"))
        .await
        .expect("get once it is back");
    close(&b).await;
}

#[tokio::test]
async fn a_closed_backend_is_unavailable_and_leaves_no_task_behind() {
    let (b, _guard) = fresh_concrete().await;
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    assert_eq!(tasks(), 1, "the reaper runs");
    b.exec("ns", put_op("k", b"v")).await.expect("put");
    b.close().await;
    assert_eq!(tasks(), 0, "close left a task running");
    match b.exec("ns", get_op("k")).await {
        Err(e @ Error::Unavailable(_)) => {
            let chain = e.chain().to_string();
            assert!(chain.contains("pool closed"), "{chain}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(b.connections(), PoolStats::default());
}

#[tokio::test]
async fn a_pooled_connection_runs_transactions() {
    let (b, guard) = small_pool(1).await;
    {
        let mut conn = b.pool.get().await.expect("checkout");
        let mut tx = conn.begin().await.expect("begin");
        sqlx::query(&format!(
            "INSERT INTO public.\"{}\" (namespace, key, value) VALUES ('ns', 'k', '\\x01')",
            guard.table
        ))
        .execute(&mut *tx)
        .await
        .expect("insert");
        tx.rollback().await.expect("rollback");
    }
    assert_eq!(
        b.exec("ns", Op::Exists { key: "k".into() })
            .await
            .expect("exists"),
        Outcome::Exists(false)
    );
    close(&b).await;
}
