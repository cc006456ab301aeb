//! Assembles and runs a gateway: the supervision tree (backends, sessions),
//! the gRPC server with health and reflection, and the draining shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use prism_actors::{
    Backoff, Child, ChildSpec, ExitReason, RestartPolicy, Supervisor, SupervisorHandle,
};
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::backend::memory::MemoryConnector;
use crate::backend::postgres::PostgresConnector;
use crate::backend::redis::RedisConnector;
use crate::backend::sqlite::SqliteConnector;
use crate::backend::Connector;
use crate::grpc::KvService;
use crate::http::{AdminServer, AdminState};
use crate::kv::{Core, Draining, Namespace};
use crate::pool::{BackendHandle, BackendHealth, BreakerConfig, PoolActor, PoolConfig};
use crate::proto::key_value_server::KeyValueServer;
use crate::session::Sessions;
use crate::settings::{BackendKind, BackendSettings, CustomSettings, Settings, SupervisorSettings};

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

/// A gateway under construction: settings plus, optionally, connectors that
/// replace the ones the settings describe (custom backends, fault tests).
pub struct Gateway {
    settings: Settings,
    connectors: BTreeMap<String, Arc<dyn Connector>>,
    kinds: BTreeMap<String, ConnectorFactory>,
    children: Vec<Child>,
}

/// Builds the connector of a backend of a registered kind from its name and
/// settings.
pub type ConnectorFactory = Arc<
    dyn Fn(&str, &CustomSettings) -> Result<Arc<dyn Connector>, crate::settings::Error>
        + Send
        + Sync,
>;

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
            kinds: BTreeMap::new(),
            children: Vec::new(),
        }
    }

    /// Builds the backends of kind `name` with `factory`. The settings must
    /// have been loaded with the kind registered too
    /// ([`crate::settings::Loader::kind`]), so that they accept it.
    pub fn kind(
        mut self,
        name: impl Into<String>,
        factory: impl Fn(&str, &CustomSettings) -> Result<Arc<dyn Connector>, crate::settings::Error>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        self.kinds.insert(name.into(), Arc::new(factory));
        self
    }

    /// Runs `child` (an actor or a supervisor of the program's own) in the
    /// gateway's supervision tree, under the root beside the backends and
    /// sessions: it is restarted by its policy, shows in `/v1/actors`, and
    /// is drained first on shutdown, before the sessions and pools it may
    /// use.
    pub fn child(mut self, child: impl Into<Child>) -> Self {
        self.children.push(child.into());
        self
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
        let invalid = |e: crate::backend::Error| Error::Start(format!("backends.{name}: {e}"));
        Ok(match &b.kind {
            BackendKind::Sqlite(s) => Arc::new(SqliteConnector::new(
                s.path.clone(),
                s.busy_timeout,
                b.pool.pool_size,
            )),
            BackendKind::Memory => Arc::new(MemoryConnector::new()),
            BackendKind::Postgres(s) => {
                Arc::new(PostgresConnector::new(s.config(&b.pool)).map_err(invalid)?)
            }
            BackendKind::Redis(s) => {
                Arc::new(RedisConnector::new(s.config(&b.pool)).map_err(invalid)?)
            }
            BackendKind::Custom(c) => {
                let factory = self.kinds.get(&c.kind).ok_or_else(|| {
                    Error::Start(format!(
                        "backends.{name}.kind: no connector is registered for kind {:?} (Gateway::kind)",
                        c.kind
                    ))
                })?;
                factory(name, c).map_err(|e| Error::Start(e.to_string()))?
            }
        })
    }

    /// Builds the supervision tree: root → backends (one pool actor each),
    /// sessions (dynamic, one per client), then the program's own children.
    /// Backends start first, so they stop last.
    fn tree(
        &mut self,
        draining: Draining,
    ) -> Result<(SupervisorHandle, Core, Vec<BackendHandle>), Error> {
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
                    failures: b.pool.breaker_failures,
                    cooldown: b.pool.breaker_cooldown,
                },
            ));
            let config = PoolConfig {
                pool_size: b.pool.pool_size,
                queue: b.pool.mailbox,
                purge_interval: b.pool.purge_interval,
                health_interval: b.pool.health_interval,
            };
            let backend_name: Arc<str> = name.as_str().into();
            // The connector's kind: a test or program may replace the one
            // the settings describe.
            let kind = connector.kind().to_owned();
            let factory_health = health.clone();
            let spec = ChildSpec::with_mailbox(format!("pool:{name}"), b.pool.mailbox, move || {
                PoolActor::new(
                    backend_name.clone(),
                    connector.clone(),
                    config.clone(),
                    factory_health.clone(),
                )
            })
            .shutdown_timeout(s.server.shutdown_grace);
            pools.insert(name.clone(), (spec.addr(), health.clone()));
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
        let mut namespaces = Vec::new();
        for (name, ns) in &s.namespaces {
            // Settings only validate when every namespace names a configured
            // backend, and every configured backend has a pool here.
            let Some((pool, health)) = pools.get(&ns.backend) else {
                return Err(Error::Start(format!(
                    "namespaces.{name}.backend: backend '{}' has no pool",
                    ns.backend
                )));
            };
            namespaces.push(Namespace {
                name: name.as_str().into(),
                settings: ns.clone(),
                pool: pool.clone(),
                health: health.clone(),
            });
        }
        let mut root = Supervisor::new("prism")
            .intensity(sup.max_restarts, sup.restart_window)
            .backoff(backoff(sup))
            .child(backends.restart(RestartPolicy::Permanent))
            .child(sessions_sup.restart(RestartPolicy::Permanent));
        for child in self.children.drain(..) {
            root = root.child(child);
        }
        let core = Core::new(namespaces, sessions, draining);
        Ok((root.spawn(), core, handles))
    }

    /// Serves until `shutdown` resolves (or the supervision tree gives up),
    /// then drains: health turns NOT_SERVING, no new RPC is accepted, accepted
    /// ones complete, sessions then pool actors drain their mailboxes and the
    /// pools close, all within `server.shutdown_grace`.
    pub async fn serve(
        mut self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let grace = self.settings.server.shutdown_grace;
        let max_message = self.settings.max_value_size() + MESSAGE_OVERHEAD;
        let draining = Draining::default();
        let (mut root, core, backends) = self.tree(draining.clone())?;

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
        let kv = KeyValueServer::new(KvService::new(core.clone()))
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
        let upkeep = core.metrics().spawn_upkeep(METRICS_UPKEEP);
        let admin = match listeners.http {
            Some(l) => {
                let state = AdminState::new(core.clone(), backends.clone(), root.supervisor_ref());
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
