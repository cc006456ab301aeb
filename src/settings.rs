//! Layered settings: `settings/default.toml`, then `settings/$PRISM_ENV.toml`,
//! then `PRISM__<SECTION>__<KEY>` environment variables. Validated as a whole
//! before any port is bound.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Every setting of a Prism instance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Listeners and shutdown.
    pub server: ServerSettings,
    /// Log filter and format.
    #[serde(default)]
    pub log: LogSettings,
    /// Per-client admission.
    #[serde(default)]
    pub sessions: SessionSettings,
    /// Restart policy of the pool actors.
    #[serde(default)]
    pub supervisor: SupervisorSettings,
    /// Backends by name.
    #[serde(default)]
    pub backends: BTreeMap<String, BackendSettings>,
    /// Namespaces by name.
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespaceSettings>,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// How long a shutdown may take before what still runs is aborted.
    #[serde(with = "humantime_serde", default = "defaults::grace")]
    pub shutdown_grace: Duration,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// A tracing filter (`info`, `prism=debug,warn`); `RUST_LOG` wins when set.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[sessions]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionSettings {
    /// Requests one client may have in flight; past it, RESOURCE_EXHAUSTED.
    pub max_in_flight: u32,
    /// Requests per second one client may start; 0 turns the limit off.
    pub rate_limit: u32,
    /// Requests a client may start at once above its rate (token bucket size);
    /// 0 means equal to `rate_limit`.
    pub rate_burst: u32,
    /// A session with no request for this long ends.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Sessions alive at once; past it, new clients get RESOURCE_EXHAUSTED.
    pub max_sessions: u32,
    /// Mailbox capacity of each session actor.
    pub mailbox: usize,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            max_in_flight: 256,
            rate_limit: 0,
            rate_burst: 0,
            idle_timeout: Duration::from_secs(60),
            max_sessions: 10_000,
            mailbox: 1024,
        }
    }
}

/// `[supervisor]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorSettings {
    /// Restarts allowed within `restart_window` before the supervisor gives up.
    pub max_restarts: u32,
    /// The restart intensity window.
    #[serde(with = "humantime_serde")]
    pub restart_window: Duration,
    /// Backoff before the first restart.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Largest backoff.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
}

impl Default for SupervisorSettings {
    fn default() -> Self {
        SupervisorSettings {
            max_restarts: 5,
            restart_window: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// `[backends.<name>]`: one backend. Keys that belong to another kind are
/// rejected by validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSettings {
    /// `sqlite` or `memory`.
    pub kind: BackendKind,
    /// Operations run at once (and, for SQL backends, the connection count).
    #[serde(default = "defaults::pool_size")]
    pub pool_size: u32,
    /// Mailbox capacity of the pool actor; a full mailbox answers RESOURCE_EXHAUSTED.
    #[serde(default = "defaults::pool_mailbox")]
    pub mailbox: usize,
    /// How often expired entries are deleted.
    #[serde(with = "humantime_serde", default = "defaults::purge_interval")]
    pub purge_interval: Duration,
    /// How often the backend is pinged.
    #[serde(with = "humantime_serde", default = "defaults::health_interval")]
    pub health_interval: Duration,
    /// sqlite: database file, created with its folder on first start
    /// (default `./data/prism.db`).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// sqlite: how long a statement waits for a lock held by another
    /// connection (default 5 s).
    #[serde(with = "humantime_serde", default)]
    pub busy_timeout: Option<Duration>,
}

/// The kinds of backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Embedded SQLite file.
    Sqlite,
    /// In-process map.
    Memory,
}

impl BackendKind {
    /// The kind's name.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Sqlite => "sqlite",
            BackendKind::Memory => "memory",
        }
    }
}

/// `[namespaces.<name>]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSettings {
    /// The backend's name (a key of `[backends]`).
    pub backend: String,
    /// Deadline of a request whose client sent none.
    #[serde(with = "humantime_serde", default = "defaults::timeout")]
    pub timeout: Duration,
    /// TTL of a Put with `ttl_ms = 0`; absent means no expiry.
    #[serde(with = "humantime_serde", default)]
    pub default_ttl: Option<Duration>,
    /// Largest value accepted, in bytes.
    #[serde(default = "defaults::max_value_size")]
    pub max_value_size: usize,
}

mod defaults {
    use std::path::PathBuf;
    use std::time::Duration;

    pub fn grace() -> Duration {
        Duration::from_secs(30)
    }
    pub fn pool_size() -> u32 {
        8
    }
    pub fn pool_mailbox() -> usize {
        1024
    }
    pub fn purge_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn health_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn sqlite_path() -> PathBuf {
        PathBuf::from("./data/prism.db")
    }
    pub fn busy_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn max_value_size() -> usize {
        1024 * 1024
    }
}
