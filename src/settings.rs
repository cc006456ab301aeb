//! Layered settings: `settings/default.toml`, then `settings/$PRISM_ENV.toml`,
//! then `PRISM__<SECTION>__<KEY>` environment variables. Validated as a whole
//! before any port is bound.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, ConfigError, Environment, FileFormat, Value, ValueKind};
use serde::Deserialize;

use crate::backend::postgres::{PostgresConfig, PostgresConnector};
use crate::backend::redis::{RedisConfig, RedisConnector};

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
    /// Admin plane (HTTP: probes, metrics, actor tree, REST key-value API)
    /// listen address.
    #[serde(default = "defaults::http_addr")]
    pub http_addr: SocketAddr,
    /// How long a shutdown may take before what still runs is aborted.
    #[serde(with = "humantime_serde", default = "defaults::grace")]
    pub shutdown_grace: Duration,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
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
            max_restarts: 10,
            restart_window: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
        }
    }
}

/// `[backends.<name>]`: one backend. Keys that belong to another kind are
/// rejected by validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSettings {
    /// `sqlite`, `memory`, `postgres` or `redis`.
    pub kind: BackendKind,
    /// Operations run at once, and for SQLite, PostgreSQL and Redis the most
    /// connections (default: sqlite 8, memory 8, postgres 20, redis 16).
    #[serde(default)]
    pub pool_size: Option<u32>,
    /// Mailbox capacity of the pool actor; a full mailbox answers RESOURCE_EXHAUSTED.
    #[serde(default = "defaults::pool_mailbox")]
    pub mailbox: usize,
    /// How often expired entries are deleted.
    #[serde(with = "humantime_serde", default = "defaults::purge_interval")]
    pub purge_interval: Duration,
    /// How often the backend is pinged.
    #[serde(with = "humantime_serde", default = "defaults::health_interval")]
    pub health_interval: Duration,
    /// Consecutive backend failures that open the circuit breaker.
    #[serde(default = "defaults::breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open circuit rejects requests (UNAVAILABLE, at once)
    /// before one probe request is let through.
    #[serde(with = "humantime_serde", default = "defaults::breaker_cooldown")]
    pub breaker_cooldown: Duration,
    /// sqlite: database file, created with its folder on first start
    /// (default `./data/prism.db`).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// sqlite: how long a statement waits for a lock held by another
    /// connection (default 5 s).
    #[serde(with = "humantime_serde", default)]
    pub busy_timeout: Option<Duration>,
    /// postgres, redis: server URL (required), e.g.
    /// `postgres://postgres@127.0.0.1:5432/test`, `redis://127.0.0.1:6379`.
    #[serde(default)]
    pub url: Option<String>,
    /// postgres: schema of the table, created if missing (default `public`).
    #[serde(default)]
    pub schema: Option<String>,
    /// postgres: table name (default `prism_kv`).
    #[serde(default)]
    pub table: Option<String>,
    /// postgres: connections kept open even when idle (default 5).
    #[serde(default)]
    pub min_connections: Option<u32>,
    /// postgres, redis: longest wait for a pooled connection (default 5 s).
    #[serde(with = "humantime_serde", default)]
    pub acquire_timeout: Option<Duration>,
    /// postgres: an idle connection above `min_connections` is closed after
    /// this long (default 600 s).
    #[serde(with = "humantime_serde", default)]
    pub idle_timeout: Option<Duration>,
    /// postgres: a connection is replaced after this long (default 1800 s).
    #[serde(with = "humantime_serde", default)]
    pub max_lifetime: Option<Duration>,
    /// postgres: server-side bound of any statement, on top of each request's
    /// own deadline (default none).
    #[serde(with = "humantime_serde", default)]
    pub statement_timeout: Option<Duration>,
    /// redis: longest wait to open a connection (default 5 s).
    #[serde(with = "humantime_serde", default)]
    pub connect_timeout: Option<Duration>,
    /// redis: longest wait for any command's reply, on top of each request's
    /// own deadline (default 5 s).
    #[serde(with = "humantime_serde", default)]
    pub command_timeout: Option<Duration>,
    /// redis: prefix of every Redis key Prism writes (default `prism`).
    #[serde(default)]
    pub key_prefix: Option<String>,
}

/// The kinds of backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Embedded SQLite file.
    Sqlite,
    /// In-process map.
    Memory,
    /// PostgreSQL server.
    Postgres,
    /// Redis server.
    Redis,
}

impl BackendKind {
    /// The kind's name.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Sqlite => "sqlite",
            BackendKind::Memory => "memory",
            BackendKind::Postgres => "postgres",
            BackendKind::Redis => "redis",
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
    pub fn http_addr() -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], 8981))
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
    pub fn breaker_failures() -> u32 {
        5
    }
    pub fn breaker_cooldown() -> Duration {
        Duration::from_secs(1)
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

impl BackendSettings {
    /// The SQLite database file: `path`, or `./data/prism.db` when unset.
    pub fn sqlite_path(&self) -> PathBuf {
        self.path.clone().unwrap_or_else(defaults::sqlite_path)
    }

    /// The SQLite busy timeout: `busy_timeout`, or 5 s when unset.
    pub fn sqlite_busy_timeout(&self) -> Duration {
        self.busy_timeout.unwrap_or_else(defaults::busy_timeout)
    }

    /// `pool_size`, or the kind's default.
    pub fn pool_size(&self) -> u32 {
        self.pool_size.unwrap_or(match self.kind {
            BackendKind::Sqlite | BackendKind::Memory => 8,
            BackendKind::Postgres => 20,
            BackendKind::Redis => 16,
        })
    }

    /// The PostgreSQL connector settings, defaults filled in.
    pub fn postgres_config(&self) -> PostgresConfig {
        let d = PostgresConfig::default();
        PostgresConfig {
            url: self.url.clone().unwrap_or(d.url),
            schema: self.schema.clone().unwrap_or(d.schema),
            table: self.table.clone().unwrap_or(d.table),
            max_connections: self.pool_size(),
            min_connections: self
                .min_connections
                .unwrap_or(d.min_connections)
                .min(self.pool_size()),
            acquire_timeout: self.acquire_timeout.unwrap_or(d.acquire_timeout),
            idle_timeout: self.idle_timeout.or(d.idle_timeout),
            max_lifetime: self.max_lifetime.or(d.max_lifetime),
            statement_timeout: self.statement_timeout.or(d.statement_timeout),
            application_name: d.application_name,
        }
    }

    /// The Redis connector settings, defaults filled in.
    pub fn redis_config(&self) -> RedisConfig {
        let d = RedisConfig::default();
        RedisConfig {
            url: self.url.clone().unwrap_or(d.url),
            max_size: self.pool_size() as usize,
            wait_timeout: self.acquire_timeout.unwrap_or(d.wait_timeout),
            create_timeout: self.connect_timeout.unwrap_or(d.create_timeout),
            recycle_timeout: self.connect_timeout.unwrap_or(d.recycle_timeout),
            key_prefix: self.key_prefix.clone().unwrap_or(d.key_prefix),
            command_timeout: self.command_timeout.unwrap_or(d.command_timeout),
        }
    }
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

/// What the `config` crate records as the origin of an environment value.
const ENV_ORIGIN: &str = "the environment";

/// Errors of loading or validating settings. Every variant about a value
/// names its key as a dotted path (`namespaces.default.backend`) and, when
/// known, where the value came from (a file, or an environment variable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A settings file that must be read could not be.
    #[error("cannot read settings file {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A settings file is not valid TOML.
    #[error("settings file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key that no setting has: a typo, or a key in the wrong section.
    #[error("unknown settings key `{key}`{}{}", at(.key, .origin.as_deref()), expected_hint(.expected))]
    UnknownKey {
        /// The dotted path of the key.
        key: String,
        /// The file or environment the key came from.
        origin: Option<String>,
        /// The keys allowed where this one was found.
        expected: Vec<String>,
    },
    /// A required key is absent from every layer.
    #[error("missing settings key `{key}`")]
    Missing {
        /// The dotted path of the key.
        key: String,
    },
    /// A value that does not parse as its key's type: a bad duration,
    /// address, number or enum name.
    #[error("bad value for settings key `{key}`{}: {message}", at(.key, .origin.as_deref()))]
    BadValue {
        /// The dotted path of the key.
        key: String,
        /// The file or environment the value came from.
        origin: Option<String>,
        /// What is wrong with it.
        message: String,
    },
    /// A value that parses but breaks a rule: out of range, names a backend
    /// that does not exist, belongs to another backend kind.
    #[error("invalid settings key `{key}`{}: {message}", at(.key, .origin.as_deref()))]
    Invalid {
        /// The dotted path of the key.
        key: String,
        /// The file or environment the value came from.
        origin: Option<String>,
        /// The rule it breaks.
        message: String,
    },
    /// An environment variable that steers loading is unusable.
    #[error("environment variable {name}: {message}")]
    Env {
        /// The variable.
        name: String,
        /// What is wrong with it.
        message: String,
    },
}

impl Error {
    /// The dotted path of the offending key, when the error is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            Error::UnknownKey { key, .. }
            | Error::Missing { key }
            | Error::BadValue { key, .. }
            | Error::Invalid { key, .. } => Some(key),
            Error::Env { name, .. } => Some(name),
            Error::Read { .. } | Error::Syntax { .. } => None,
        }
    }

    /// Where the offending value came from: a file path, or `the environment`.
    pub fn origin(&self) -> Option<&str> {
        match self {
            Error::UnknownKey { origin, .. }
            | Error::BadValue { origin, .. }
            | Error::Invalid { origin, .. } => origin.as_deref(),
            Error::Read { path, .. } | Error::Syntax { path, .. } => Some(path),
            Error::Missing { .. } | Error::Env { .. } => None,
        }
    }

    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            key: key.into(),
            origin: None,
            message: message.into(),
        }
    }

    /// Fills in the origin of a validation error from the loaded value tree.
    fn locate(mut self, root: &Value) -> Self {
        if let Error::Invalid { key, origin, .. } = &mut self {
            if origin.is_none() {
                *origin = lookup(root, key).and_then(origin_of);
            }
        }
        self
    }
}

/// ` in settings/default.toml`, or ` (environment variable PRISM__SERVER__GRPC_ADDR)`.
fn at(key: &str, origin: Option<&str>) -> String {
    match origin {
        None => String::new(),
        Some(ENV_ORIGIN) => format!(" (environment variable {})", env_var_name(key)),
        Some(file) => format!(" in {file}"),
    }
}

fn expected_hint(expected: &[String]) -> String {
    if expected.is_empty() {
        String::new()
    } else {
        format!("; expected one of: {}", expected.join(", "))
    }
}

/// The override variable of a key: `server.grpc_addr` → `PRISM__SERVER__GRPC_ADDR`.
pub fn env_var_name(key: &str) -> String {
    let mut name = String::from(ENV_PREFIX);
    for segment in key.split('.') {
        name.push_str(ENV_SEPARATOR);
        name.push_str(&segment.to_uppercase());
    }
    name
}

/// The files that make up the settings in `dir` for environment `env_name`,
/// in the order they are layered: `default.toml`, then `<env_name>.toml` if
/// it exists. `default.toml` is listed whether or not it exists.
pub fn files(dir: &Path, env_name: Option<&str>) -> Result<Vec<PathBuf>, Error> {
    let mut files = vec![dir.join(DEFAULT_FILE)];
    if let Some(name) = env_name.filter(|n| !n.is_empty()) {
        // The name becomes part of a path: keep it to one plain file name.
        if !is_valid_name(name) {
            return Err(Error::Env {
                name: ENV_NAME_VAR.into(),
                message: format!(
                    "{name:?} is not a valid environment name (letters, digits, `_`, `-`)"
                ),
            });
        }
        let file = dir.join(format!("{name}.toml"));
        if file.is_file() {
            files.push(file);
        }
    }
    Ok(files)
}

/// Loads and validates the settings in `dir` from the process environment:
/// `PRISM_ENV` names the environment layer and `PRISM__<SECTION>__<KEY>`
/// variables override single keys.
pub fn load(dir: &Path) -> Result<Settings, Error> {
    let env_name = std::env::var(ENV_NAME_VAR).ok();
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Ok(name) = name.into_string() else {
            continue;
        };
        if !is_override_var(&name) {
            continue;
        }
        match value.into_string() {
            Ok(value) => vars.push((name, value)),
            Err(_) => {
                return Err(Error::Env {
                    name,
                    message: "value is not valid UTF-8".into(),
                })
            }
        }
    }
    load_with(dir, env_name.as_deref(), vars)
}

/// [`load`] with the environment passed in, so tests need not touch the
/// process environment: `env_name` stands for `PRISM_ENV`, `env_vars` for the
/// process's variables (those without the `PRISM__` prefix are ignored).
///
/// Layers, later ones winning key by key: `<dir>/default.toml` (required),
/// `<dir>/<env_name>.toml` (if it exists), then the `PRISM__` variables.
/// Variable names are matched case-insensitively and their key segments are
/// lowercased, so they address lowercase names only. Values that look like
/// numbers or booleans are parsed as such. The result is validated with
/// [`Settings::validate`].
pub fn load_with<I>(dir: &Path, env_name: Option<&str>, env_vars: I) -> Result<Settings, Error>
where
    I: IntoIterator<Item = (String, String)>,
{
    let files = files(dir, env_name)?;
    let mut builder = Config::builder();
    for file in &files {
        // Checked here rather than left to `config`, whose message does not say
        // which directory it looked in.
        if let Err(e) = std::fs::metadata(file) {
            return Err(Error::Read {
                path: file.display().to_string(),
                reason: e.to_string(),
            });
        }
        builder = builder.add_source(
            config::File::from(file.as_path())
                .format(FileFormat::Toml)
                .required(true),
        );
    }
    let vars: config::Map<String, String> = env_vars
        .into_iter()
        .filter(|(name, _)| is_override_var(name))
        .collect();
    builder = builder.add_source(
        Environment::with_prefix(ENV_PREFIX)
            .prefix_separator(ENV_SEPARATOR)
            .separator(ENV_SEPARATOR)
            .try_parsing(true)
            .ignore_empty(true)
            .source(Some(vars)),
    );
    let config = builder.build().map_err(|e| from_config(e, None))?;
    let root = config.cache.clone();
    let settings: Settings = config
        .try_deserialize()
        .map_err(|e| from_config(e, Some(&root)))?;
    settings.validate().map_err(|e| e.locate(&root))?;
    Ok(settings)
}

fn is_override_var(name: &str) -> bool {
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
    name.len() > prefix.len() && name[..prefix.len()].eq_ignore_ascii_case(&prefix)
}

/// Names of namespaces and backends: they appear in requests, metrics and
/// environment variable names.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Where a value came from. Tables built while merging layers may carry no
/// origin of their own; then the first of their values that has one tells.
fn origin_of(value: &Value) -> Option<String> {
    if let Some(origin) = value.origin() {
        return Some(origin.to_owned());
    }
    match &value.kind {
        ValueKind::Table(table) => {
            let mut keys: Vec<&String> = table.keys().collect();
            keys.sort();
            keys.into_iter().find_map(|k| origin_of(&table[k]))
        }
        ValueKind::Array(values) => values.iter().find_map(origin_of),
        _ => None,
    }
}

/// A name as a segment of a dotted key: quoted, as TOML would, when it is
/// not a plain name.
fn key_segment(name: &str) -> String {
    if is_valid_name(name) {
        name.to_owned()
    } else {
        format!("{name:?}")
    }
}

/// The value at a dotted path of the loaded tree.
fn lookup<'a>(root: &'a Value, key: &str) -> Option<&'a Value> {
    let mut value = root;
    for segment in key.split('.') {
        match &value.kind {
            ValueKind::Table(table) => value = table.get(segment)?,
            _ => return None,
        }
    }
    Some(value)
}

fn scalar(value: &Value) -> Option<String> {
    Some(match &value.kind {
        ValueKind::String(s) => format!("{s:?}"),
        ValueKind::Boolean(b) => b.to_string(),
        ValueKind::I64(n) => n.to_string(),
        ValueKind::I128(n) => n.to_string(),
        ValueKind::U64(n) => n.to_string(),
        ValueKind::U128(n) => n.to_string(),
        ValueKind::Float(n) => n.to_string(),
        ValueKind::Nil | ValueKind::Table(_) | ValueKind::Array(_) => return None,
    })
}

fn join_key(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_owned()
    } else {
        format!("{parent}.{child}")
    }
}

/// Turns a `config` error into one that names the key and its origin.
///
/// `config` reports the path of the value that failed to deserialize, but
/// not the name of an unknown key (serde reports that inside a message, at
/// the parent's path), and no origin for messages from serde or
/// `humantime_serde`. Both are recovered here from the value tree.
fn from_config(error: ConfigError, root: Option<&Value>) -> Error {
    let origin_at = |key: &str| root.and_then(|r| lookup(r, key)).and_then(origin_of);
    match error {
        ConfigError::FileParse { uri, cause } => Error::Syntax {
            path: uri.unwrap_or_else(|| "(unknown file)".into()),
            message: cause.to_string().trim_end().to_owned(),
        },
        ConfigError::NotFound(key) => Error::Missing { key },
        ConfigError::Type {
            origin,
            unexpected,
            expected,
            key,
        } => {
            let key = key.unwrap_or_default();
            Error::BadValue {
                origin: origin.or_else(|| origin_at(&key)),
                message: format!("invalid type: {unexpected}, expected {expected}"),
                key,
            }
        }
        ConfigError::At { error, origin, key } => {
            let key = key.unwrap_or_default();
            match *error {
                ConfigError::Message(message) => from_message(&message, key, origin, root),
                other => Error::BadValue {
                    origin: origin.or_else(|| origin_at(&key)),
                    message: other.to_string(),
                    key,
                },
            }
        }
        ConfigError::Message(message) => from_message(&message, String::new(), None, root),
        other => Error::BadValue {
            key: String::new(),
            origin: None,
            message: other.to_string(),
        },
    }
}

/// Classifies a serde message raised at `key`.
fn from_message(message: &str, key: String, origin: Option<String>, root: Option<&Value>) -> Error {
    // serde: "unknown field `foo`, expected one of `a`, `b`" (or "expected `a`",
    // "expected `a` or `b`", "there are no fields"), raised at the parent's path.
    if message.starts_with("unknown field `") {
        let mut quoted = message.split('`').skip(1).step_by(2).map(str::to_owned);
        let field = quoted.next().unwrap_or_default();
        let key = join_key(&key, &field);
        return Error::UnknownKey {
            origin: origin.or_else(|| root.and_then(|r| lookup(r, &key)).and_then(origin_of)),
            expected: quoted.collect(),
            key,
        };
    }
    let raw = root.and_then(|r| lookup(r, &key));
    let origin = origin.or_else(|| raw.and_then(origin_of));
    let message = match raw.map(|v| &v.kind) {
        // humantime_serde only says "expected a duration"; humantime says why.
        Some(ValueKind::String(s)) if message.ends_with("expected a duration") => {
            match humantime::parse_duration(s) {
                Err(e) => format!("invalid duration {s:?}: {e}"),
                Ok(_) => message.to_owned(),
            }
        }
        Some(ValueKind::I64(_) | ValueKind::U64(_) | ValueKind::Float(_))
            if message.ends_with("expected a duration") =>
        {
            format!(
                "invalid duration {}: a duration needs a unit, such as \"5s\" or \"500ms\"",
                raw.and_then(scalar).unwrap_or_default()
            )
        }
        _ if message == "invalid socket address syntax" => format!(
            "invalid address {}: expected ip:port, such as 127.0.0.1:8980",
            raw.and_then(scalar).unwrap_or_default()
        ),
        _ if message.starts_with("enum ")
            && message.contains("does not have variant constructor") =>
        {
            let allowed = if message.starts_with("enum LogFormat ") {
                "text, json"
            } else if message.starts_with("enum BackendKind ") {
                "sqlite, memory"
            } else {
                ""
            };
            let value = raw.and_then(scalar).unwrap_or_default();
            if allowed.is_empty() {
                format!("unknown value {value}")
            } else {
                format!("unknown value {value}; expected one of: {allowed}")
            }
        }
        _ => message.to_owned(),
    };
    Error::BadValue {
        key,
        origin,
        message,
    }
}

impl Settings {
    /// Checks the rules that types alone do not: references between
    /// sections, ranges, names, keys that belong to another backend kind.
    /// Returns the first violation, in file order (server, log, sessions,
    /// supervisor, backends, namespaces).
    pub fn validate(&self) -> Result<(), Error> {
        positive("server.shutdown_grace", self.server.shutdown_grace)?;
        crate::telemetry::filter(&self.log.level).map_err(|e| Error::invalid("log.level", e))?;
        self.sessions.validate()?;
        self.supervisor.validate()?;
        for (name, backend) in &self.backends {
            let key = format!("backends.{}", key_segment(name));
            if !is_valid_name(name) {
                return Err(Error::invalid(
                    key,
                    format!("backend name {name:?} must be non-empty letters, digits, `_` or `-`"),
                ));
            }
            backend.validate(&key)?;
        }
        if self.namespaces.is_empty() {
            return Err(Error::invalid(
                "namespaces",
                "no namespace is defined; add one, e.g. [namespaces.default] backend = \"embedded\"",
            ));
        }
        for (name, namespace) in &self.namespaces {
            let key = format!("namespaces.{}", key_segment(name));
            if !is_valid_name(name) {
                return Err(Error::invalid(
                    key,
                    format!(
                        "namespace name {name:?} must be non-empty letters, digits, `_` or `-`"
                    ),
                ));
            }
            if !self.backends.contains_key(&namespace.backend) {
                let defined: Vec<&str> = self.backends.keys().map(String::as_str).collect();
                let defined = if defined.is_empty() {
                    "none is defined".to_owned()
                } else {
                    format!("defined: {}", defined.join(", "))
                };
                return Err(Error::invalid(
                    format!("{key}.backend"),
                    format!(
                        "names backend {:?}, which is not under [backends] ({defined})",
                        namespace.backend
                    ),
                ));
            }
            namespace.validate(&key)?;
        }
        Ok(())
    }
}

impl SessionSettings {
    fn validate(&self) -> Result<(), Error> {
        at_least_one("sessions.max_in_flight", self.max_in_flight as usize)?;
        at_least_one("sessions.max_sessions", self.max_sessions as usize)?;
        at_least_one("sessions.mailbox", self.mailbox)?;
        positive("sessions.idle_timeout", self.idle_timeout)
    }
}

impl SupervisorSettings {
    fn validate(&self) -> Result<(), Error> {
        at_least_one("supervisor.max_restarts", self.max_restarts as usize)?;
        positive("supervisor.restart_window", self.restart_window)?;
        positive("supervisor.backoff_initial", self.backoff_initial)?;
        if self.backoff_initial > self.backoff_max {
            return Err(Error::invalid(
                "supervisor.backoff_initial",
                format!(
                    "{} is larger than supervisor.backoff_max ({})",
                    humantime::format_duration(self.backoff_initial),
                    humantime::format_duration(self.backoff_max)
                ),
            ));
        }
        Ok(())
    }
}

impl BackendSettings {
    fn validate(&self, key: &str) -> Result<(), Error> {
        at_least_one(&format!("{key}.pool_size"), self.pool_size() as usize)?;
        at_least_one(&format!("{key}.mailbox"), self.mailbox)?;
        positive(&format!("{key}.purge_interval"), self.purge_interval)?;
        positive(&format!("{key}.health_interval"), self.health_interval)?;
        at_least_one(
            &format!("{key}.breaker_failures"),
            self.breaker_failures as usize,
        )?;
        positive(&format!("{key}.breaker_cooldown"), self.breaker_cooldown)?;
        use BackendKind::{Postgres, Redis, Sqlite};
        let kind_specific: [(&str, bool, &[BackendKind]); 13] = [
            ("path", self.path.is_some(), &[Sqlite]),
            ("busy_timeout", self.busy_timeout.is_some(), &[Sqlite]),
            ("url", self.url.is_some(), &[Postgres, Redis]),
            ("schema", self.schema.is_some(), &[Postgres]),
            ("table", self.table.is_some(), &[Postgres]),
            (
                "min_connections",
                self.min_connections.is_some(),
                &[Postgres],
            ),
            (
                "acquire_timeout",
                self.acquire_timeout.is_some(),
                &[Postgres, Redis],
            ),
            ("idle_timeout", self.idle_timeout.is_some(), &[Postgres]),
            ("max_lifetime", self.max_lifetime.is_some(), &[Postgres]),
            (
                "statement_timeout",
                self.statement_timeout.is_some(),
                &[Postgres],
            ),
            ("connect_timeout", self.connect_timeout.is_some(), &[Redis]),
            ("command_timeout", self.command_timeout.is_some(), &[Redis]),
            ("key_prefix", self.key_prefix.is_some(), &[Redis]),
        ];
        for (field, set, kinds) in kind_specific {
            if set && !kinds.contains(&self.kind) {
                let names: Vec<String> =
                    kinds.iter().map(|k| format!("{:?}", k.as_str())).collect();
                return Err(Error::invalid(
                    format!("{key}.{field}"),
                    format!(
                        "applies only to kind {}, and this backend is kind {:?}",
                        names.join(" or "),
                        self.kind.as_str()
                    ),
                ));
            }
        }
        let durations = [
            ("acquire_timeout", self.acquire_timeout),
            ("idle_timeout", self.idle_timeout),
            ("max_lifetime", self.max_lifetime),
            ("statement_timeout", self.statement_timeout),
            ("connect_timeout", self.connect_timeout),
            ("command_timeout", self.command_timeout),
        ];
        for (field, d) in durations {
            if let Some(d) = d {
                positive(&format!("{key}.{field}"), d)?;
            }
        }
        if matches!(self.kind, Postgres | Redis) && self.url.is_none() {
            return Err(Error::invalid(
                format!("{key}.url"),
                format!("is required for kind {:?}", self.kind.as_str()),
            ));
        }
        // The connectors check URLs and identifiers; their errors name the
        // field and the value.
        let checked = match self.kind {
            Postgres => PostgresConnector::new(self.postgres_config()).map(drop),
            Redis => RedisConnector::new(self.redis_config()).map(drop),
            _ => Ok(()),
        };
        if let Err(e) = checked {
            return Err(Error::invalid(format!("{key}.{}", e.field), e.message));
        }
        if let Some(busy_timeout) = self.busy_timeout {
            positive(&format!("{key}.busy_timeout"), busy_timeout)?;
        }
        if self.path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(Error::invalid(format!("{key}.path"), "must not be empty"));
        }
        Ok(())
    }
}

impl NamespaceSettings {
    fn validate(&self, key: &str) -> Result<(), Error> {
        positive(&format!("{key}.timeout"), self.timeout)?;
        if let Some(ttl) = self.default_ttl {
            if ttl.is_zero() {
                return Err(Error::invalid(
                    format!("{key}.default_ttl"),
                    "must be greater than 0; leave the key out for no expiry",
                ));
            }
        }
        if self.max_value_size == 0 || self.max_value_size > MAX_VALUE_SIZE_LIMIT {
            return Err(Error::invalid(
                format!("{key}.max_value_size"),
                format!(
                    "{} is out of range: must be between 1 and {MAX_VALUE_SIZE_LIMIT} (64 MiB)",
                    self.max_value_size
                ),
            ));
        }
        Ok(())
    }
}

fn at_least_one(key: &str, value: usize) -> Result<(), Error> {
    if value == 0 {
        return Err(Error::invalid(key, "must be at least 1"));
    }
    Ok(())
}

fn positive(key: &str, value: Duration) -> Result<(), Error> {
    if value.is_zero() {
        return Err(Error::invalid(key, "must be greater than 0"));
    }
    Ok(())
}
