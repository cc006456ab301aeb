//! Assembles and runs a gateway: the supervision tree (backends, sessions),
//! the gRPC server with health and reflection, and the draining shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use prism_actors::{Backoff, ChildSpec, ExitReason, Restart, Supervisor, SupervisorHandle};
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::admin::{AdminServer, AdminState, Draining};
use crate::backend::memory::MemoryConnector;
use crate::backend::postgres::PostgresConnector;
use crate::backend::redis::RedisConnector;
use crate::backend::sqlite::SqliteConnector;
use crate::backend::Connector;
use crate::pool::{BackendHealth, BreakerConfig, PoolActor, PoolConfig};
use crate::proto::key_value_server::KeyValueServer;
use crate::service::{KvService, MeteredKvService, Namespace, Router};
use crate::session::Sessions;
use crate::settings::{BackendKind, BackendSettings, Settings, SupervisorSettings};

/// Room above the largest value for the rest of a request or response.
const MESSAGE_OVERHEAD: usize = 64 * 1024;

/// How often recorded latencies are folded into the metrics' histograms.
const METRICS_UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// The bound listeners Prism serves on. Binding happens before [`run`] so
/// that tests can bind port 0 and settings are validated before any bind.
pub struct Listeners {
    /// The gRPC listener.
    pub grpc: TcpListener,
    /// The admin plane's HTTP listener; `None` serves no admin plane.
    pub http: Option<std::net::TcpListener>,
}

/// Errors that end a gateway.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The gRPC server failed.
    #[error("grpc server failed: {0}")]
    Serve(String),
    /// The supervision tree gave up (restart intensity exceeded at the root).
    #[error("supervision tree failed: {0}")]
    Supervision(String),
    /// The gateway could not be assembled.
    #[error("cannot start: {0}")]
    Start(String),
}

/// One backend of a running gateway.
#[derive(Clone)]
pub struct BackendHandle {
    /// The backend's name.
    pub name: String,
    /// Its kind.
    pub kind: &'static str,
    /// Its live health.
    pub health: Arc<BackendHealth>,
}

/// A gateway under construction: settings plus, optionally, connectors that
/// replace the ones the settings describe (custom backends, fault tests).
pub struct Gateway {
    settings: Settings,
    connectors: BTreeMap<String, Arc<dyn Connector>>,
}

/// Serves `settings` on `listeners` until `shutdown` resolves, then drains.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    Gateway::new(settings).serve(listeners, shutdown).await
}

fn backoff(s: &SupervisorSettings) -> Backoff {
    Backoff {
        initial: s.backoff_initial,
        max: s.backoff_max,
        jitter: 0.2,
    }
}

impl Gateway {
    /// A gateway with the backends its settings describe.
    pub fn new(settings: Settings) -> Self {
        Gateway {
            settings,
            connectors: BTreeMap::new(),
        }
    }

    /// Uses `connector` for the backend named `backend` instead of the one its
    /// settings describe. The backend's pool settings still apply.
    pub fn connector(mut self, backend: impl Into<String>, connector: Arc<dyn Connector>) -> Self {
        self.connectors.insert(backend.into(), connector);
        self
    }

    fn connector_for(&self, name: &str, b: &BackendSettings) -> Result<Arc<dyn Connector>, Error> {
        if let Some(c) = self.connectors.get(name) {
            return Ok(c.clone());
        }
        let invalid = |e: crate::backend::ConfigError| {
            Error::Start(format!("backends.{name}.{}: {e}", e.field))
        };
        Ok(match b.kind {
            BackendKind::Sqlite => Arc::new(SqliteConnector::new(
                b.sqlite_path(),
                b.sqlite_busy_timeout(),
                b.pool_size(),
            )),
            BackendKind::Memory => Arc::new(MemoryConnector::new()),
            BackendKind::Postgres => {
                Arc::new(PostgresConnector::new(b.postgres_config()).map_err(invalid)?)
            }
            BackendKind::Redis => Arc::new(RedisConnector::new(b.redis_config()).map_err(invalid)?),
        })
    }

    /// Builds the supervision tree: root → backends (one pool actor each),
    /// sessions (dynamic, one per client). Backends start first, so they stop
    /// last.
    fn tree(&self) -> Result<(SupervisorHandle, Router, Vec<BackendHandle>), Error> {
        let s = &self.settings;
        let sup = &s.supervisor;
        let mut backends = Supervisor::new("backends")
            .intensity(sup.max_restarts, sup.restart_window)
            .backoff(backoff(sup));
        let mut pools = BTreeMap::new();
        let mut handles = Vec::new();
        for (name, b) in &s.backends {
            let connector = self.connector_for(name, b)?;
            let health = Arc::new(BackendHealth::new(
                name.as_str().into(),
                BreakerConfig {
                    failures: b.breaker_failures,
                    cooldown: b.breaker_cooldown,
                },
            ));
            let config = PoolConfig {
                pool_size: b.pool_size(),
                queue: b.mailbox,
                purge_interval: b.purge_interval,
                health_interval: b.health_interval,
            };
            let backend_name: Arc<str> = name.as_str().into();
            let kind = connector.kind();
            let factory_health = health.clone();
            let spec = ChildSpec::with_mailbox(format!("pool:{name}"), b.mailbox, move || {
                PoolActor::new(
                    backend_name.clone(),
                    connector.clone(),
                    config.clone(),
                    factory_health.clone(),
                )
            })
            .shutdown_timeout(s.server.shutdown_grace);
            pools.insert(name.clone(), spec.addr());
            handles.push(BackendHandle {
                name: name.clone(),
                kind,
                health,
            });
            backends = backends.child(spec);
        }
        let sessions_sup = Supervisor::new("sessions")
            .intensity(sup.max_restarts, sup.restart_window)
            .backoff(backoff(sup));
        let sessions = Sessions::new(sessions_sup.supervisor_ref(), s.sessions.clone());
        let mut namespaces = BTreeMap::new();
        for (name, ns) in &s.namespaces {
            let pool = pools.get(&ns.backend).ok_or_else(|| {
                Error::Start(format!(
                    "namespaces.{name}.backend names backend '{}', which is not configured",
                    ns.backend
                ))
            })?;
            let health = handles
                .iter()
                .find(|h| h.name == ns.backend)
                .map(|h| h.health.clone())
                .unwrap_or_default();
            namespaces.insert(
                name.clone(),
                Namespace {
                    name: name.as_str().into(),
                    settings: ns.clone(),
                    pool: pool.clone(),
                    health,
                },
            );
        }
        let root = Supervisor::new("prism")
            .intensity(sup.max_restarts, sup.restart_window)
            .backoff(backoff(sup))
            .child(backends.restart(Restart::Permanent))
            .child(sessions_sup.restart(Restart::Permanent))
            .spawn();
        Ok((root, Router::new(namespaces, sessions), handles))
    }

    /// Serves until `shutdown` resolves (or the supervision tree gives up),
    /// then drains: health turns NOT_SERVING, no new RPC is accepted, accepted
    /// ones complete, sessions then pool actors drain their mailboxes and the
    /// pools close, all within `server.shutdown_grace`.
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let grace = self.settings.server.shutdown_grace;
        let max_value = self
            .settings
            .namespaces
            .values()
            .map(|n| n.max_value_size)
            .max()
            .unwrap_or(0);
        let max_message = max_value + MESSAGE_OVERHEAD;
        let (mut root, router, backends) = self.tree()?;

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<KeyValueServer<KvService>>().await;
        // Both reflection versions: grpcurl and older tools still ask v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| Error::Start(format!("grpc reflection: {e}")))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| Error::Start(format!("grpc reflection: {e}")))?;
        let kv = KeyValueServer::new(MeteredKvService::new(KvService::new(router.clone())))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);

        let addr = listeners
            .grpc
            .local_addr()
            .map_err(|e| Error::Start(format!("server.grpc_addr: {e}")))?;
        info!(
            grpc_addr = %addr,
            backends = backends.len(),
            "prism serving"
        );
        let draining = Draining::default();
        let upkeep = router.metrics().spawn_upkeep(METRICS_UPKEEP);
        let admin = match listeners.http {
            Some(l) => {
                let state = AdminState::new(
                    router.clone(),
                    backends.clone(),
                    root.supervisor_ref(),
                    draining.clone(),
                );
                match AdminServer::start(l, state) {
                    Ok(admin) => Some(admin),
                    Err(e) => {
                        upkeep.abort();
                        root.shutdown(grace).await;
                        return Err(Error::Start(format!("server.http_addr: {e}")));
                    }
                }
            }
            None => None,
        };

        // The drain begins on the shutdown signal: health first, so that load
        // balancers stop sending before the listener closes.
        let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
        let signal_health = health.clone();
        let (signalled_tx, mut signalled_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            shutdown.await;
            let _ = signalled_tx.send(());
        });
        // The builder's own nodelay setting only applies to listeners it
        // binds itself; this one is bound by the caller.
        let incoming =
            tonic::transport::server::TcpIncoming::from(listeners.grpc).with_nodelay(Some(true));
        let server = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(kv)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = drain_rx.await;
            });
        let mut server = std::pin::pin!(server);

        let mut drain_tx = Some(drain_tx);
        let mut failure = None;
        let mut served = None;
        tokio::select! {
            res = &mut server => served = Some(res),
            _ = &mut signalled_rx => {
                info!(grace_ms = grace.as_millis() as u64, "shutdown signal received, draining");
            }
            reason = root.wait() => {
                error!(reason = %reason, "supervision tree failed, stopping");
                failure = Some(reason);
            }
        }
        let started = tokio::time::Instant::now();
        draining.begin();
        signal_health
            .set_not_serving::<KeyValueServer<KvService>>()
            .await;
        if let Some(tx) = drain_tx.take() {
            let _ = tx.send(());
        }
        if served.is_none() {
            match tokio::time::timeout(grace, &mut server).await {
                Ok(res) => served = Some(res),
                Err(_) => warn!(
                    grace_ms = grace.as_millis() as u64,
                    "grace period over with requests still running"
                ),
            }
        }
        let left = grace.saturating_sub(started.elapsed());
        let report = root.shutdown(left).await;
        for r in report.aborted() {
            warn!(actor = %r.name, actor_id = r.id, "actor aborted at the end of the grace period");
        }
        // Probes and metrics answered through the drain; now it is over.
        if let Some(admin) = admin {
            admin.stop().await;
        }
        upkeep.abort();
        info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            clean = report.is_clean(),
            "prism stopped"
        );
        if let Some(reason) = failure {
            return Err(Error::Supervision(match reason {
                ExitReason::Escalated(e) => e,
                other => other.to_string(),
            }));
        }
        match served {
            Some(Err(e)) => Err(Error::Serve(e.to_string())),
            _ => Ok(()),
        }
    }
}
