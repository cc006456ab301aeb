//! The conformance suite of `prism::testing` against every built-in
//! backend: memory, SQLite, PostgreSQL (127.0.0.1:5432, database `test`) and
//! Redis (127.0.0.1:6379), and Redis Cluster (a throwaway cluster of three
//! masters and three replicas, shared by the checks). Each check, on the backend itself and through a
//! gateway over gRPC, gets a fresh store: a new SQLite file, a PostgreSQL
//! table or a Redis key prefix of its own, removed afterwards.

use std::time::Duration;

use prism::backend::memory::MemoryConnector;
use prism::backend::postgres::{PostgresConfig, PostgresConnector};
use prism::backend::redis::{RedisConfig, RedisConnector};
use prism::backend::sqlite::SqliteConnector;
use prism::testing::conformance::Subject;
use prism::testing::{unique_suffix, Cleanup};

/// The pool size of every subject, in the gateway and in the connector.
const POOL_SIZE: u32 = 8;

fn postgres_url() -> String {
    std::env::var("PRISM_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn redis_url() -> String {
    std::env::var("PRISM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

mod memory {
    use super::*;

    async fn subject() -> Subject {
        Subject::new(MemoryConnector::new())
    }

    prism::conformance_suite!(subject);
}

mod sqlite {
    use super::*;

    async fn subject() -> Subject {
        let dir = tempfile::tempdir().expect("tempdir");
        let connector = SqliteConnector::new(
            dir.path().join("prism.db"),
            Duration::from_secs(5),
            POOL_SIZE,
        );
        Subject::new(connector)
            .backend_settings(&format!("pool_size = {POOL_SIZE}"))
            .keep(dir)
    }

    prism::conformance_suite!(subject);
}

mod postgres {
    use super::*;

    async fn subject() -> Subject {
        let table = format!("prism_conf_{}", unique_suffix());
        let connector = PostgresConnector::new(PostgresConfig {
            url: postgres_url(),
            table: table.clone(),
            max_connections: POOL_SIZE,
            min_connections: 1,
            ..PostgresConfig::default()
        })
        .expect("postgres config");
        let drop_tables = Cleanup::new(move || async move {
            if let Ok(pool) = sqlx::PgPool::connect(&postgres_url()).await {
                for t in [table.clone(), format!("{table}_schema_version")] {
                    let _ = sqlx::query(&format!("DROP TABLE IF EXISTS \"{t}\""))
                        .execute(&pool)
                        .await;
                }
                pool.close().await;
            }
        });
        Subject::new(connector)
            .backend_settings(&format!("pool_size = {POOL_SIZE}"))
            .keep(drop_tables)
    }

    prism::conformance_suite!(subject);
}

mod redis {
    use deadpool_redis::redis as client;

    use super::*;

    async fn subject() -> Subject {
        let prefix = format!("prism-conf-{}", unique_suffix());
        let connector = RedisConnector::new(RedisConfig {
            url: redis_url(),
            key_prefix: prefix.clone(),
            max_size: POOL_SIZE as usize,
            ..RedisConfig::default()
        })
        .expect("redis config");
        let drop_keys = Cleanup::new(move || async move {
            let Ok(redis) = client::Client::open(redis_url()) else {
                return;
            };
            let Ok(mut conn) = redis.get_multiplexed_async_connection().await else {
                return;
            };
            let keys: Vec<String> = client::cmd("KEYS")
                .arg(format!("{prefix}:*"))
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            for chunk in keys.chunks(500) {
                let _: Result<(), _> = client::cmd("DEL").arg(chunk).query_async(&mut conn).await;
            }
        });
        Subject::new(connector)
            .backend_settings(&format!("pool_size = {POOL_SIZE}"))
            .keep(drop_keys)
    }

    prism::conformance_suite!(subject);
}

#[allow(dead_code)]
#[path = "common/cluster.rs"]
mod cluster;

mod redis_cluster {
    use prism::backend::redis_cluster::{RedisClusterConfig, RedisClusterConnector};

    use super::cluster;
    use super::*;

    /// A key prefix of its own on the shared throwaway cluster, which dies
    /// with the test process: nothing to clean up.
    async fn subject() -> Subject {
        let cluster = tokio::task::spawn_blocking(cluster::shared)
            .await
            .expect("start the cluster");
        let connector = RedisClusterConnector::new(RedisClusterConfig {
            urls: cluster.urls(),
            key_prefix: format!("prism-conf-{}", unique_suffix()),
            max_size: POOL_SIZE as usize,
            ..RedisClusterConfig::default()
        })
        .expect("redis cluster config");
        Subject::new(connector).backend_settings(&format!("pool_size = {POOL_SIZE}"))
    }

    prism::conformance_suite!(subject);
}
