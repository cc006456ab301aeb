//! The floor Prism's own cost is measured against: a bare tonic server with
//! Prism's KeyValue proto, answering from a map behind a mutex, with no
//! sessions, limits, deadlines, metrics, logs or backends.
//!
//! With a database URL as second argument, Get and Put go to that database
//! instead, through its own Rust client used the plain way, one statement
//! per call: `redis://` through redis-rs' multiplexed connection (`GET
//! prism-bare:<key>`, `SET prism-bare:<key> <value>`), `postgres://`
//! through an sqlx `PgPool` on the table `prism_bare_kv` (created if
//! missing; `SELECT value ... WHERE key = $1`, `INSERT ... ON CONFLICT`).
//! That is the floor of a gRPC call that reaches the database: what Prism
//! adds is measured above it.
//!
//! ```sh
//! cargo run --release --example bare_kv -- 127.0.0.1:18990
//! cargo run --release --example bare_kv -- 127.0.0.1:18991 redis://127.0.0.1:6379
//! prism bench --addr 127.0.0.1:18990 --namespace mem --op get --concurrency 1
//! ```
//!
//! `scripts/own-cost.py` runs it beside a gateway and compares the two.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use bytes::Bytes;
use deadpool_redis::redis;
use prism::proto::key_value_server::{KeyValue, KeyValueServer};
use prism::proto::{
    DeleteRequest, DeleteResponse, ExistsRequest, ExistsResponse, GetRequest, GetResponse, Item,
    PutRequest, PutResponse, ScanRequest, ScanResponse,
};
use tonic::{Request, Response, Status};

#[derive(Default)]
struct Bare {
    map: Mutex<BTreeMap<(String, String), Bytes>>,
    db: Option<Db>,
}

/// A database behind Get and Put.
enum Db {
    Redis(redis::aio::MultiplexedConnection),
    Postgres(sqlx::PgPool),
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

impl Db {
    async fn open(url: &str) -> Result<Db, Box<dyn std::error::Error>> {
        if url.starts_with("redis") {
            let conn = redis::Client::open(url)?
                .get_multiplexed_async_connection()
                .await?;
            return Ok(Db::Redis(conn));
        }
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(16)
            .connect(url)
            .await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS prism_bare_kv (key text COLLATE \"C\" PRIMARY KEY, value bytea NOT NULL)",
        )
        .execute(&pool)
        .await?;
        Ok(Db::Postgres(pool))
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, Status> {
        match self {
            Db::Redis(conn) => {
                let value: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(format!("prism-bare:{key}"))
                    .query_async(&mut conn.clone())
                    .await
                    .map_err(internal)?;
                Ok(value.map(Bytes::from))
            }
            Db::Postgres(pool) => {
                let value: Option<Vec<u8>> =
                    sqlx::query_scalar("SELECT value FROM prism_bare_kv WHERE key = $1")
                        .bind(key)
                        .fetch_optional(pool)
                        .await
                        .map_err(internal)?;
                Ok(value.map(Bytes::from))
            }
        }
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<(), Status> {
        match self {
            Db::Redis(conn) => redis::cmd("SET")
                .arg(format!("prism-bare:{key}"))
                .arg(value)
                .query_async(&mut conn.clone())
                .await
                .map_err(internal),
            Db::Postgres(pool) => sqlx::query(
                "INSERT INTO prism_bare_kv (key, value) VALUES ($1, $2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .bind(key)
            .bind(value)
            .execute(pool)
            .await
            .map(|_| ())
            .map_err(internal),
        }
    }
}

impl Bare {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), Bytes>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[tonic::async_trait]
impl KeyValue for Bare {
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let GetRequest { namespace, key } = req.into_inner();
        let value = match &self.db {
            Some(db) => db.get(&key).await?,
            None => self.map().get(&(namespace, key)).cloned(),
        };
        Ok(Response::new(GetResponse {
            found: value.is_some(),
            ttl_ms: if value.is_some() { -1 } else { 0 },
            value: value.unwrap_or_default(),
        }))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let PutRequest {
            namespace,
            key,
            value,
            ..
        } = req.into_inner();
        match &self.db {
            Some(db) => db.put(&key, &value).await?,
            None => {
                self.map().insert((namespace, key), value);
            }
        }
        Ok(Response::new(PutResponse {}))
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let DeleteRequest { namespace, key } = req.into_inner();
        let existed = self.map().remove(&(namespace, key)).is_some();
        Ok(Response::new(DeleteResponse { existed }))
    }

    async fn exists(
        &self,
        req: Request<ExistsRequest>,
    ) -> Result<Response<ExistsResponse>, Status> {
        let ExistsRequest { namespace, key } = req.into_inner();
        let exists = self.map().contains_key(&(namespace, key));
        Ok(Response::new(ExistsResponse { exists }))
    }

    async fn scan(&self, req: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let ScanRequest {
            namespace,
            prefix,
            limit,
            ..
        } = req.into_inner();
        let limit = if limit == 0 { 100 } else { limit.min(1000) } as usize;
        let items = self
            .map()
            .range((namespace.clone(), prefix.clone())..)
            .take_while(|((ns, k), _)| *ns == namespace && k.starts_with(&prefix))
            .take(limit)
            .map(|((_, key), value)| Item {
                key: key.clone(),
                value: value.clone(),
            })
            .collect();
        Ok(Response::new(ScanResponse {
            items,
            next_cursor: String::new(),
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = match std::env::args().nth(1) {
        Some(a) => a
            .parse()
            .map_err(|e| format!("address '{a}' is not host:port: {e}"))?,
        None => "127.0.0.1:18990".parse()?,
    };
    let db = match std::env::args().nth(2) {
        Some(url) => Some(Db::open(&url).await?),
        None => None,
    };
    eprintln!("bare KeyValue server on {addr}");
    let bare = Bare {
        db,
        ..Bare::default()
    };
    tonic::transport::Server::builder()
        .add_service(KeyValueServer::new(bare))
        .serve_with_shutdown(addr, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
