//! Assembles and runs a gateway: the supervision tree (backends, sessions),
//! the gRPC server with health and reflection, and the draining shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use prism_actors::{Child, ExitReason};
use tokio::net::TcpListener;
use tracing::{debug, error, info, warn};

use crate::backend::Connector;
use crate::http::{AdminServer, AdminState};
use crate::kv::Draining;
use crate::settings::{CustomSettings, Settings};

pub(crate) mod listener;
mod tree;

/// How long the gRPC server may still hold connections after the last
/// request finished: time to flush the last responses. Streams still open
/// then (health watch, reflection) are cut.
const STREAM_LINGER: std::time::Duration = std::time::Duration::from_millis(250);

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

    /// Serves until `shutdown` resolves (or the supervision tree gives up),
    /// then drains, all within `server.shutdown_grace`:
    ///
    /// 1. health (`""` and `prism.kv.v1.KeyValue`) turns NOT_SERVING and
    ///    readiness 503, while both listeners keep serving for
    ///    `server.drain_delay`, so that load balancers stop sending;
    /// 2. new requests are refused and the gRPC listener closes; requests in
    ///    flight on either transport (an upload being received included)
    ///    finish; long-lived streams (health watch, reflection) are cut, so
    ///    they cannot hold the drain;
    /// 3. the session actors, then the pool actors drain their mailboxes and
    ///    the pools close;
    /// 4. the admin plane stops.
    ///
    /// The last log line, `prism stopped`, says whether anything was cut.
    pub async fn serve(
        mut self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let server_settings = self.settings.server.clone();
        let grace = server_settings.shutdown_grace;
        let draining = Draining::default();
        let (mut root, core, backends) = self.tree(draining.clone())?;
        let (router, health) = match listener::router(
            core.clone(),
            &server_settings.grpc,
            self.settings.max_value_size(),
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                root.shutdown(grace).await;
                return Err(e);
            }
        };

        let addr = listeners
            .grpc
            .local_addr()
            .map_err(|e| Error::Start(format!("server.grpc_addr: {e}")))?;
        let tls = server_settings.tls.clone();
        info!(
            grpc_addr = %addr,
            backends = backends.len(),
            tls = tls.is_some(),
            client_certs = tls.as_ref().is_some_and(|t| t.requires_client_certs()),
            "prism serving"
        );
        let upkeep = core.metrics().spawn_upkeep(METRICS_UPKEEP);
        let admin = match listeners.http {
            Some(l) => {
                let state = AdminState::new(core.clone(), backends.clone(), root.supervisor_ref());
                match AdminServer::start(l, state, tls.as_ref().map(|t| t.certs())) {
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

        let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
        let close = async move {
            let _ = close_rx.await;
        };
        // With `[server.tls]` the connections are handshaken by Prism's own
        // acceptor (its certificates can be reloaded); tonic sees them as
        // TLS streams and offers the client's certificates to handlers.
        let mut stop_accepting = None;
        let mut server: std::pin::Pin<Box<dyn Future<Output = _> + Send>> = match &tls {
            Some(tls) => {
                let incoming = crate::tls::TlsIncoming::new(listeners.grpc, tls.certs());
                // The accept loop is a task of its own: stopped when the
                // drain refuses new requests, so that no new connection is
                // handshaken only to be dropped.
                stop_accepting = Some(incoming.closer());
                Box::pin(router.serve_with_incoming_shutdown(incoming, close))
            }
            None => Box::pin(
                router.serve_with_incoming_shutdown(listener::Incoming::new(listeners.grpc), close),
            ),
        };
        let mut shutdown = std::pin::pin!(shutdown);

        let mut failure = None;
        let mut served = None;
        tokio::select! {
            res = &mut server => served = Some(res),
            _ = &mut shutdown => {
                info!(grace_ms = grace.as_millis() as u64, drain_delay_ms = server_settings.drain_delay.as_millis() as u64, "shutdown signal received, draining");
            }
            reason = root.wait() => {
                error!(reason = %reason.chain(), "supervision tree failed, stopping");
                failure = Some(reason);
            }
        }
        let started = tokio::time::Instant::now();
        let deadline = started + grace;
        draining.announce();
        listener::set_not_serving(&health).await;
        if served.is_none() && failure.is_none() && !server_settings.drain_delay.is_zero() {
            // Still serving: load balancers see NOT_SERVING and move away.
            tokio::select! {
                res = &mut server => served = Some(res),
                _ = tokio::time::sleep(server_settings.drain_delay) => {}
            }
        }
        draining.refuse();
        let _ = close_tx.send(());
        if let Some(stop) = stop_accepting {
            stop.abort();
        }
        // Requests in flight on both transports finish; what the gRPC server
        // still holds after them is streams and idle connections.
        let finished = tokio::time::timeout_at(deadline, draining.idle())
            .await
            .is_ok();
        if served.is_none() {
            match tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + STREAM_LINGER),
                &mut server,
            )
            .await
            {
                Ok(res) => served = Some(res),
                Err(_) => debug!("grpc streams still open after the requests finished, closed"),
            }
        }
        let cut = draining.in_flight();
        if !finished {
            warn!(
                grace_ms = grace.as_millis() as u64,
                requests = cut,
                "grace period over with requests still running"
            );
        }
        let report = root
            .shutdown(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await;
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
            clean = report.is_clean() && cut == 0,
            requests_cut = cut,
            actors_aborted = report.aborted().len(),
            "prism stopped"
        );
        if let Some(reason) = failure {
            return Err(Error::Supervision(match reason {
                ExitReason::Escalated(e) => e,
                other => other.chain().to_string(),
            }));
        }
        match served {
            Some(Err(e)) => Err(Error::Serve(e.to_string())),
            _ => Ok(()),
        }
    }
}
