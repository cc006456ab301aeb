//! Settings: layered TOML files and environment variables, parsed into types
//! once.
//!
//! Layers, later ones winning key by key: `settings/default.toml`, then
//! `settings/$PRISM_ENV.toml`, then `PRISM__<SECTION>__<KEY>` environment
//! variables. [`load`] (or [`Settings::from_toml`]) is the only way to get a
//! [`Settings`]: every key is checked for its type, its range (every number
//! and duration has an upper bound) and its references before a value is
//! returned, so the gateway never re-checks a setting and a bad one is an
//! [`Error`] naming its key and file, never a panic later.
//!
//! - `load.rs`: the layering and the mapping of the `config` crate's errors;
//! - `raw.rs`: the keys as they are written, and their conversion into the
//!   types below (defaults, bounds, references);
//! - `backend.rs`: the `kind`-tagged backend sections;
//! - `auth.rs`: principals and their grants;
//! - `error.rs`: the [`Error`] type.

mod auth;
mod backend;
mod error;
mod load;
mod raw;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

pub use auth::{parse_sha256, AuthMode, AuthSettings, Grant, Principal};
pub use backend::{
    BackendKind, BackendSettings, CustomSettings, PoolSettings, PostgresSettings,
    RedisClusterSettings, RedisSettings, SqliteSettings,
};
pub use error::{env_var_name, Error};
pub use load::{files, load, load_with, Loader};

/// Every setting of a Prism instance, validated. Built only by [`load`],
/// [`load_with`], [`Loader`] or [`Settings::from_toml`] (non-exhaustive, so
/// no other crate can build one that skipped validation).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Settings {
    /// Listeners and shutdown.
    pub server: ServerSettings,
    /// Log filter and format.
    pub log: LogSettings,
    /// Per-client admission.
    pub sessions: SessionSettings,
    /// Restart policy of the pool actors.
    pub supervisor: SupervisorSettings,
    /// Backends by name.
    pub backends: BTreeMap<String, BackendSettings>,
    /// Namespaces by name; each names a key of `backends`.
    pub namespaces: BTreeMap<String, NamespaceSettings>,
    /// Who may call, and what each principal may do.
    pub auth: AuthSettings,
}

impl Settings {
    /// Settings from one TOML text, validated like a settings file (for
    /// tests and programs that embed Prism). Only the built-in backend kinds
    /// are accepted; [`Loader::kind`] adds others.
    pub fn from_toml(toml: &str) -> Result<Settings, Error> {
        Loader::new().from_toml(toml)
    }

    /// The largest `max_value_size` of any namespace.
    pub fn max_value_size(&self) -> usize {
        self.namespaces
            .values()
            .map(|n| n.max_value_size)
            .max()
            .unwrap_or(0)
    }

    /// The deadline most requests to backend `backend` arrive with: the
    /// most common `timeout` among the namespaces it serves (of equally
    /// common ones, the longest); `None` when it serves none.
    pub fn common_timeout(&self, backend: &str) -> Option<Duration> {
        let mut counts: BTreeMap<Duration, usize> = BTreeMap::new();
        for ns in self.namespaces.values().filter(|n| n.backend == backend) {
            *counts.entry(ns.timeout).or_default() += 1;
        }
        counts
            .into_iter()
            .max_by_key(|&(timeout, n)| (n, timeout))
            .map(|(timeout, _)| timeout)
    }
}

/// `[server]`
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// Admin plane (HTTP: probes, metrics, actor tree, REST key-value API)
    /// listen address.
    pub http_addr: SocketAddr,
    /// How long a shutdown may take before what still runs is aborted.
    pub shutdown_grace: Duration,
    /// How long, after a shutdown signal, both listeners keep serving while
    /// health and readiness already say NOT_SERVING, so that load balancers
    /// stop sending before the listeners close.
    pub drain_delay: Duration,
    /// Limits of the gRPC listener's connections.
    pub grpc: GrpcLimits,
    /// TLS on both listeners (`[server.tls]`); `None` serves plaintext.
    pub tls: Option<TlsSettings>,
}

/// `[server.tls]`: when present, both listeners serve TLS only.
///
/// The files are read and checked when the settings load, so a clone of
/// these settings holds the certificates themselves; clones share them, so
/// [`TlsSettings::reload`] on any clone (the one a signal handler keeps)
/// reaches the running listeners.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    certs: crate::tls::ServerCerts,
}

impl TlsSettings {
    /// The files (`server.tls.cert`, `server.tls.key`, `server.tls.client_ca`).
    pub fn files(&self) -> &crate::tls::CertFiles {
        self.certs.files()
    }

    /// Whether clients must present a certificate signed by
    /// `server.tls.client_ca`.
    pub fn requires_client_certs(&self) -> bool {
        self.files().client_ca.is_some()
    }

    /// The loaded certificates that both listeners serve.
    pub fn certs(&self) -> &crate::tls::ServerCerts {
        &self.certs
    }

    /// Re-reads the files; new connections get the new certificates, and on
    /// an error the ones in use stay. See [`crate::tls::ServerCerts::reload`].
    pub fn reload(&self) -> Result<(), crate::tls::Error> {
        self.certs.reload()
    }
}

/// Limits of the gRPC listener: what one client connection may hold, and
/// how long it lives. Keys `server.grpc_*`.
#[derive(Debug, Clone)]
pub struct GrpcLimits {
    /// Concurrent streams (calls) one connection may open
    /// (`server.grpc_max_concurrent_streams`).
    pub max_concurrent_streams: u32,
    /// Streams a client may open and reset before the server has accepted
    /// them, a defence against rapid-reset floods
    /// (`server.grpc_max_pending_reset_streams`).
    pub max_pending_reset_streams: usize,
    /// Streams the server may reset on one connection because of the
    /// client's protocol errors before it closes the connection
    /// (`server.grpc_max_local_reset_streams`).
    pub max_local_reset_streams: usize,
    /// HTTP/2 PING interval on idle connections
    /// (`server.grpc_keepalive_interval`).
    pub keepalive_interval: Duration,
    /// A connection whose PING is not answered within this is closed
    /// (`server.grpc_keepalive_timeout`).
    pub keepalive_timeout: Duration,
    /// A connection is asked to go away (GOAWAY, calls in flight finish)
    /// after this long, so no connection, idle or busy, lives forever and
    /// clients rebalance (`server.grpc_max_connection_age`).
    pub max_connection_age: Duration,
}

/// `[log]`
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// A tracing filter (`info`, `prism=debug,warn`), checked by
    /// [`log_filter`]; `RUST_LOG` wins when set.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// Every format, in the order error messages list them.
    pub const ALL: [LogFormat; 2] = [LogFormat::Text, LogFormat::Json];

    /// The format's name in settings.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// `[sessions]`
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Requests one client may have in flight; past it, RESOURCE_EXHAUSTED.
    pub max_in_flight: u32,
    /// Requests per second one client may start; 0 turns the limit off.
    pub rate_limit: u32,
    /// Token bucket size: requests a client may start at once above its
    /// rate. Equal to `rate_limit` when the key is 0 or absent.
    pub rate_burst: u32,
    /// A session with no request for this long ends.
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
#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    /// Restarts allowed within `restart_window` before the supervisor gives up.
    pub max_restarts: u32,
    /// The restart intensity window.
    pub restart_window: Duration,
    /// Backoff before the first restart; at most `backoff_max`.
    pub backoff_initial: Duration,
    /// Largest backoff.
    pub backoff_max: Duration,
}

/// `[namespaces.<name>]`
#[derive(Debug, Clone)]
pub struct NamespaceSettings {
    /// The backend's name (a key of `[backends]`).
    pub backend: String,
    /// Deadline of a request whose client sent none.
    pub timeout: Duration,
    /// TTL of a Put with `ttl_ms = 0`; `None` means no expiry.
    pub default_ttl: Option<Duration>,
    /// Largest value accepted, in bytes.
    pub max_value_size: usize,
    /// Most key and value bytes in one scan page (a page holds at least
    /// one item, however large).
    pub max_page_bytes: usize,
}

/// The file every settings directory must hold.
pub const DEFAULT_FILE: &str = "default.toml";
/// The environment variable naming the environment layer, `<dir>/$PRISM_ENV.toml`.
pub const ENV_NAME_VAR: &str = "PRISM_ENV";
/// Prefix of the variables that override single keys: `PRISM__SERVER__GRPC_ADDR`
/// sets `server.grpc_addr`.
pub const ENV_PREFIX: &str = "PRISM";
/// Separates the prefix and the key segments in override variables. Two
/// underscores, because keys themselves contain single ones (`grpc_addr`).
pub const ENV_SEPARATOR: &str = "__";
/// The largest `max_value_size` a namespace may set: 64 MiB, the gRPC message
/// size the server and the bundled client accept.
pub const MAX_VALUE_SIZE_LIMIT: usize = 64 * 1024 * 1024;

/// The default `max_page_bytes` of a namespace: 4 MiB.
pub const DEFAULT_MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// The smallest `max_page_bytes` a namespace may set: 1 KiB. (The largest
/// is [`MAX_VALUE_SIZE_LIMIT`].)
pub const MIN_PAGE_BYTES: usize = 1024;

/// Parses a `log.level` filter: a level (`info`) or `EnvFilter` directives
/// (`prism=debug,warn`). Stricter than `EnvFilter` in one way: a bare word
/// must be a level, because `EnvFilter` would read a misspelt level
/// (`level = "inf"`) as a target name and silently log almost nothing.
pub fn log_filter(directives: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    use tracing_subscriber::filter::LevelFilter;
    if directives.trim().is_empty() {
        return Err(
            "is empty; use a level such as \"info\" or directives such as \"prism=debug,warn\""
                .into(),
        );
    }
    for directive in directives
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
    {
        if !directive.contains(['=', '[']) && directive.parse::<LevelFilter>().is_err() {
            return Err(format!(
                "{directive:?} is not a level (off, error, warn, info, debug, trace); write `target=level` to filter one target"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(directives).map_err(|e| format!("{directives:?}: {e}"))
}

/// Names of namespaces and backends: they appear in requests, metrics and
/// environment variable names.
pub(crate) fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The longest namespace or backend name.
pub const MAX_NAME_LEN: usize = 64;

#[cfg(test)]
mod tests {
    use super::log_filter;
    use super::Settings;
    use std::time::Duration;

    #[test]
    fn the_common_timeout_is_the_most_frequent_then_the_longest() {
        let s = Settings::from_toml(
            r#"
            [server]
            grpc_addr = "127.0.0.1:0"
            http_addr = "127.0.0.1:0"
            [log]
            level = "warn"
            [backends.pg]
            kind = "memory"
            [backends.other]
            kind = "memory"
            [backends.idle]
            kind = "memory"
            [namespaces.a]
            backend = "pg"
            timeout = "2s"
            [namespaces.b]
            backend = "pg"
            timeout = "2s"
            [namespaces.c]
            backend = "pg"
            timeout = "9s"
            [namespaces.d]
            backend = "other"
            timeout = "1s"
            [namespaces.e]
            backend = "other"
            timeout = "3s"
            [namespaces.f]
            backend = "other"
            "#,
        )
        .expect("settings");
        assert_eq!(s.common_timeout("pg"), Some(Duration::from_secs(2)));
        // One each: the longest (f has the default, 5s).
        assert_eq!(s.common_timeout("other"), Some(Duration::from_secs(5)));
        assert_eq!(s.common_timeout("idle"), None);
    }

    #[test]
    fn levels_and_directives_are_accepted() {
        for ok in [
            "info",
            "WARN",
            "prism=debug,warn",
            "prism::session=trace",
            "off",
        ] {
            assert!(log_filter(ok).is_ok(), "{ok} should parse");
        }
    }

    #[test]
    fn misspelt_levels_and_empty_filters_are_rejected() {
        for bad in ["", " ", "inf", "prism=loud"] {
            assert!(log_filter(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
