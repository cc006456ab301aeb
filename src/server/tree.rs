//! The supervision tree of a gateway: root → backends (one pool actor per
//! backend) → sessions (one actor per client, on demand) → the program's
//! own children; and the request core over it.

use std::collections::BTreeMap;
use std::sync::Arc;

use prism_actors::{Backoff, ChildSpec, RestartPolicy, Supervisor, SupervisorHandle};

use super::{Error, Gateway};
use crate::backend::memory::MemoryConnector;
use crate::backend::postgres::PostgresConnector;
use crate::backend::redis::RedisConnector;
use crate::backend::redis_cluster::RedisClusterConnector;
use crate::backend::sqlite::SqliteConnector;
use crate::backend::Connector;
use crate::kv::{Core, Draining, Namespace};
use crate::pool::{BackendHandle, BackendHealth, BreakerConfig, Gate, Pool, PoolActor, PoolConfig};
use crate::session::Sessions;
use crate::settings::{BackendKind, BackendSettings, SupervisorSettings};

fn backoff(s: &SupervisorSettings) -> Backoff {
    Backoff {
        initial: s.backoff_initial,
        max: s.backoff_max,
        jitter: 0.2,
    }
}

impl Gateway {
    fn connector_for(&self, name: &str, b: &BackendSettings) -> Result<Arc<dyn Connector>, Error> {
        if let Some(c) = self.connectors.get(name) {
            return Ok(c.clone());
        }
        let invalid = |e: crate::backend::ConfigError| {
            Error::Start(format!("backends.{name}.{}: {e}", e.field))
        };
        Ok(match &b.kind {
            BackendKind::Sqlite(s) => Arc::new(SqliteConnector::new(
                s.path.clone(),
                s.busy_timeout,
                b.pool.pool_size,
            )),
            BackendKind::Memory => Arc::new(MemoryConnector::new()),
            BackendKind::Postgres(s) => {
                let config = crate::backend::postgres::PostgresConfig {
                    common_timeout: self.settings.common_timeout(name),
                    ..s.config(&b.pool)
                };
                Arc::new(PostgresConnector::new(config).map_err(invalid)?)
            }
            BackendKind::Redis(s) => Arc::new(
                RedisConnector::new(s.config(&b.pool))
                    .map_err(invalid)?
                    .named(name),
            ),
            BackendKind::RedisCluster(s) => {
                Arc::new(RedisClusterConnector::new(s.config(&b.pool)).map_err(invalid)?)
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
    pub(super) fn tree(
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
            let gate = Arc::new(Gate::new(&config));
            let factory_gate = gate.clone();
            let spec = ChildSpec::with_mailbox(format!("pool:{name}"), b.pool.mailbox, move || {
                PoolActor::new(
                    backend_name.clone(),
                    connector.clone(),
                    config.clone(),
                    factory_health.clone(),
                    factory_gate.clone(),
                )
            })
            .shutdown_timeout(s.server.shutdown_grace);
            pools.insert(
                name.clone(),
                Pool {
                    addr: spec.addr(),
                    health: health.clone(),
                    gate,
                },
            );
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
            let Some(pool) = pools.get(&ns.backend) else {
                return Err(Error::Start(format!(
                    "namespaces.{name}.backend: backend '{}' has no pool",
                    ns.backend
                )));
            };
            namespaces.push(Namespace {
                name: name.as_str().into(),
                settings: ns.clone(),
                pool: pool.clone(),
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
        let core = Core::new(namespaces, sessions, draining, &s.auth);
        Ok((root.spawn(), core, handles))
    }
}
