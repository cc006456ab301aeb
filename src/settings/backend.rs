//! `[backends.<name>]`: a `kind`-tagged section. The keys every kind takes
//! (pool, breaker, background work) are one type, [`PoolSettings`]; each
//! kind has its own type for the rest. Which key belongs to which kind, and
//! which kinds exist, is read from those types (their serde field and
//! variant lists), so error messages always list every kind and key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Value, ValueKind};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::error::Error;
use super::load::{from_config, origin_of};
use super::raw::{bound, duration, number};
use crate::backend::postgres::{PostgresConfig, PostgresConnector};
use crate::backend::redis::{RedisConfig, RedisConnector};
use crate::backend::redis_cluster::{RedisClusterConfig, RedisClusterConnector};
use crate::backend::toolkit::redact_url;

/// One configured backend.
#[derive(Debug, Clone)]
pub struct BackendSettings {
    /// The keys every kind takes.
    pub pool: PoolSettings,
    /// The kind and its own keys.
    pub kind: BackendKind,
}

impl BackendSettings {
    /// The kind's name, as written in `kind = "..."`.
    pub fn kind_name(&self) -> &str {
        self.kind.name()
    }
}

/// The keys every backend kind takes.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Operations run at once, and for SQLite, PostgreSQL and Redis the most
    /// connections (default: sqlite 8, memory 8, postgres 20, redis 16).
    pub pool_size: u32,
    /// Mailbox capacity of the pool actor, and how many operations may wait
    /// for a free slot beyond `pool_size`; past either, RESOURCE_EXHAUSTED.
    pub mailbox: usize,
    /// How often expired entries are deleted.
    pub purge_interval: Duration,
    /// How often the backend is pinged.
    pub health_interval: Duration,
    /// Consecutive backend failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long an open circuit rejects requests (UNAVAILABLE, at once)
    /// before one probe request is let through.
    pub breaker_cooldown: Duration,
}

/// A backend's kind, with the keys only that kind takes.
#[derive(Debug, Clone)]
pub enum BackendKind {
    /// Embedded SQLite file.
    Sqlite(SqliteSettings),
    /// In-process map.
    Memory,
    /// PostgreSQL server.
    Postgres(PostgresSettings),
    /// Redis server.
    Redis(RedisSettings),
    /// Redis Cluster, each namespace sharded over every node.
    RedisCluster(RedisClusterSettings),
    /// A kind registered by the program embedding Prism
    /// ([`super::Loader::kind`] and `Gateway::kind`).
    Custom(CustomSettings),
}

impl BackendKind {
    /// The kind's name, as written in `kind = "..."`.
    pub fn name(&self) -> &str {
        match self {
            BackendKind::Sqlite(_) => "sqlite",
            BackendKind::Memory => "memory",
            BackendKind::Postgres(_) => "postgres",
            BackendKind::Redis(_) => "redis",
            BackendKind::RedisCluster(_) => "redis_cluster",
            BackendKind::Custom(c) => &c.kind,
        }
    }
}

/// `kind = "sqlite"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteSettings {
    /// Database file, created with its folder on first start.
    #[serde(default = "default_sqlite_path")]
    pub path: PathBuf,
    /// How long a statement waits for a lock held by another connection.
    #[serde(with = "humantime_serde", default = "five_seconds")]
    pub busy_timeout: Duration,
}

/// `kind = "memory"`: no keys of its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemorySettings {}

/// `kind = "postgres"`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSettings {
    /// Server URL, e.g. `postgres://postgres@127.0.0.1:5432/test`; TLS
    /// with `?sslmode=require` or `verify-full` (and `sslrootcert=<file>`).
    /// Holds the password of `password_file` once loaded.
    pub url: String,
    /// A file holding the password (trimmed), put into the URL at load.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Schema of the table, created if missing.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Table name.
    #[serde(default = "default_table")]
    pub table: String,
    /// Connections kept open even when idle (at most `pool_size`).
    #[serde(
        default = "default_min_connections",
        deserialize_with = "crate::settings::raw::whole::deserialize"
    )]
    pub min_connections: u32,
    /// Longest wait for a pooled connection.
    #[serde(with = "humantime_serde", default = "five_seconds")]
    pub acquire_timeout: Duration,
    /// An idle connection above `min_connections` is closed after this long.
    #[serde(with = "humantime_serde", default = "default_pg_idle_timeout")]
    pub idle_timeout: Duration,
    /// A connection is replaced after this long.
    #[serde(with = "humantime_serde", default = "default_max_lifetime")]
    pub max_lifetime: Duration,
    /// Server-side bound of any statement, on top of each request's own
    /// deadline.
    #[serde(with = "humantime_serde", default)]
    pub statement_timeout: Option<Duration>,
}

/// `kind = "redis"`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// Server URL, e.g. `redis://127.0.0.1:6379`, or `rediss://` for TLS.
    /// Holds the password of `password_file` once loaded.
    pub url: String,
    /// A file holding the password (trimmed), put into the URL at load.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Prefix of every Redis key Prism writes.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Longest wait for a pooled connection.
    #[serde(with = "humantime_serde", default = "five_seconds")]
    pub acquire_timeout: Duration,
    /// Longest wait to open a connection.
    #[serde(with = "humantime_serde", default = "five_seconds")]
    pub connect_timeout: Duration,
    /// Longest wait for any command's reply, on top of each request's own
    /// deadline.
    #[serde(with = "humantime_serde", default = "five_seconds")]
    pub command_timeout: Duration,
}

/// `kind = "redis_cluster"`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisClusterSettings {
    /// Seed node URLs, e.g. `["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"]`.
    pub urls: Vec<String>,
    /// Prefix of every Redis key Prism writes.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Longest wait for a pooled cluster connection.
    #[serde(with = "humantime_serde", default = "five_seconds")]
    pub acquire_timeout: Duration,
    /// Longest wait to connect to the cluster.
    #[serde(with = "humantime_serde", default = "five_seconds")]
    pub connect_timeout: Duration,
    /// Longest wait for an operation without a deadline of its own (purge,
    /// health), on top of each request's own deadline.
    #[serde(with = "humantime_serde", default = "five_seconds")]
    pub command_timeout: Duration,
    /// Index shards per namespace (1..=1024): a namespace's keys spread over
    /// this many hash tags, and so over the cluster's nodes.
    #[serde(
        default = "default_shards",
        deserialize_with = "crate::settings::raw::whole::deserialize"
    )]
    pub shards: u16,
}

impl fmt::Debug for RedisClusterSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("RedisClusterSettings")
            .field("urls", &urls)
            .field("key_prefix", &self.key_prefix)
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

fn default_shards() -> u16 {
    16
}

/// A backend of a kind registered by the embedding program: its kind name
/// and its own keys, which the program's connector factory reads with
/// [`CustomSettings::options`].
#[derive(Debug, Clone)]
pub struct CustomSettings {
    /// The registered kind.
    pub kind: String,
    key: String,
    table: config::Map<String, Value>,
    root: Value,
}

impl CustomSettings {
    /// The kind's own keys (all but the shared pool keys) as `T`; an error
    /// names the offending key and its file.
    pub fn options<T: DeserializeOwned>(&self) -> Result<T, Error> {
        Value::new(None, ValueKind::Table(self.table.clone()))
            .try_deserialize()
            .map_err(|e| from_config(e, Some(&self.root)).under(&self.key, &self.root))
    }
}

impl fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &redact_url(&self.url))
            .field("password_file", &self.password_file)
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("min_connections", &self.min_connections)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &redact_url(&self.url))
            .field("password_file", &self.password_file)
            .field("key_prefix", &self.key_prefix)
            .finish_non_exhaustive()
    }
}

fn default_sqlite_path() -> PathBuf {
    PathBuf::from("./data/prism.db")
}
fn five_seconds() -> Duration {
    Duration::from_secs(5)
}
fn default_schema() -> String {
    "public".into()
}
fn default_table() -> String {
    "prism_kv".into()
}
fn default_min_connections() -> u32 {
    5
}
fn default_pg_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_max_lifetime() -> Duration {
    Duration::from_secs(1800)
}
fn default_key_prefix() -> String {
    "prism".into()
}

/// The shared keys as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    #[serde(default, deserialize_with = "crate::settings::raw::whole::option")]
    pool_size: Option<u32>,
    #[serde(
        default = "default_mailbox",
        deserialize_with = "crate::settings::raw::whole::deserialize"
    )]
    mailbox: usize,
    #[serde(with = "humantime_serde", default = "default_purge_interval")]
    purge_interval: Duration,
    #[serde(with = "humantime_serde", default = "five_seconds")]
    health_interval: Duration,
    #[serde(
        default = "default_breaker_failures",
        deserialize_with = "crate::settings::raw::whole::deserialize"
    )]
    breaker_failures: u32,
    #[serde(with = "humantime_serde", default = "default_breaker_cooldown")]
    breaker_cooldown: Duration,
}

fn default_mailbox() -> usize {
    1024
}
fn default_purge_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_cooldown() -> Duration {
    Duration::from_secs(1)
}

/// The built-in kinds, as `kind` values. Only its variant list is used.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Sqlite,
    Memory,
    Postgres,
    Redis,
    #[serde(rename = "redis_cluster")]
    RedisCluster,
}

impl Kind {
    /// The kind's own keys.
    fn fields(name: &str) -> &'static [&'static str] {
        match name {
            "sqlite" => fields_of::<SqliteSettings>(),
            "memory" => fields_of::<MemorySettings>(),
            "postgres" => fields_of::<PostgresSettings>(),
            "redis" => fields_of::<RedisSettings>(),
            "redis_cluster" => fields_of::<RedisClusterSettings>(),
            _ => &[],
        }
    }

    /// The built-in kind names.
    fn names() -> &'static [&'static str] {
        variants_of::<Kind>()
    }
}

/// Parses the section at `key` (`backends.<name>`) of the loaded tree.
pub(super) fn parse_backend(
    key: &str,
    section: Option<&Value>,
    root: &Value,
    custom_kinds: &[String],
) -> Result<BackendSettings, Error> {
    let mut table = match section.map(|v| &v.kind) {
        Some(ValueKind::Table(t)) => t.clone(),
        _ => {
            return Err(Error::bad_value(
                key,
                "must be a table, e.g. [backends.embedded] kind = \"sqlite\"",
            ))
        }
    };
    let kind_key = format!("{key}.kind");
    let kind = match table.remove("kind").map(|v| v.kind) {
        None => return Err(Error::missing(kind_key)),
        Some(ValueKind::String(s)) => s,
        Some(_) => return Err(Error::bad_value(&kind_key, "must be a string")),
    };
    let builtin = Kind::names().contains(&kind.as_str());
    if !builtin && !custom_kinds.contains(&kind) {
        let mut all: Vec<&str> = Kind::names().to_vec();
        all.extend(custom_kinds.iter().map(String::as_str));
        return Err(Error::bad_value(
            &kind_key,
            format!(
                "unknown backend kind {kind:?}; expected one of: {}",
                all.join(", ")
            ),
        ));
    }
    // Split the section into the shared keys and the kind's own.
    let shared = fields_of::<RawPool>();
    let (pool_table, own_table): (config::Map<_, _>, config::Map<_, _>) = table
        .into_iter()
        .partition(|(k, _)| shared.contains(&k.as_str()));
    if builtin {
        let own = Kind::fields(&kind);
        if let Some(field) = own_table.keys().find(|f| !own.contains(&f.as_str())) {
            let owners: Vec<String> = Kind::names()
                .iter()
                .filter(|k| Kind::fields(k).contains(&field.as_str()))
                .map(|k| format!("{k:?}"))
                .collect();
            let field_key = format!("{key}.{field}");
            if owners.is_empty() {
                let mut expected: Vec<String> = ["kind"]
                    .iter()
                    .chain(shared)
                    .chain(own)
                    .map(|s| (*s).to_owned())
                    .collect();
                expected.sort();
                return Err(Error::UnknownKey {
                    origin: own_table.get(field).and_then(origin_of),
                    key: field_key,
                    expected,
                });
            }
            return Err(Error::invalid(
                field_key,
                format!(
                    "applies only to kind {}, and this backend is kind {kind:?}",
                    owners.join(" or ")
                ),
            ));
        }
    }
    let pool: RawPool = deserialize(key, pool_table, root)?;
    let pool_size = pool.pool_size.unwrap_or(match kind.as_str() {
        "postgres" => 20,
        "redis" | "redis_cluster" => 16,
        _ => 8,
    });
    let pool = PoolSettings {
        pool_size: number(&format!("{key}.pool_size"), pool_size, 1, bound::POOL)?,
        mailbox: number(&format!("{key}.mailbox"), pool.mailbox, 1, bound::QUEUE)?,
        purge_interval: duration(
            &format!("{key}.purge_interval"),
            pool.purge_interval,
            bound::PERIOD,
        )?,
        health_interval: duration(
            &format!("{key}.health_interval"),
            pool.health_interval,
            bound::TIMEOUT,
        )?,
        breaker_failures: number(
            &format!("{key}.breaker_failures"),
            pool.breaker_failures,
            1,
            bound::COUNT,
        )?,
        breaker_cooldown: duration(
            &format!("{key}.breaker_cooldown"),
            pool.breaker_cooldown,
            bound::BACKOFF,
        )?,
    };
    let k = |field: &str| format!("{key}.{field}");
    let kind = match kind.as_str() {
        "sqlite" => {
            let s: SqliteSettings = deserialize(key, own_table, root)?;
            if s.path.as_os_str().is_empty() {
                return Err(Error::invalid(k("path"), "must not be empty"));
            }
            duration(&k("busy_timeout"), s.busy_timeout, bound::TIMEOUT)?;
            BackendKind::Sqlite(s)
        }
        "memory" => {
            let _: MemorySettings = deserialize(key, own_table, root)?;
            BackendKind::Memory
        }
        "postgres" => {
            let mut s: PostgresSettings = deserialize(key, own_table, root)?;
            if let Some(file) = &s.password_file {
                s.url = url_with_password_file(&k("password_file"), &s.url, file)?;
            }
            s.min_connections = s.min_connections.min(pool.pool_size);
            duration(&k("acquire_timeout"), s.acquire_timeout, bound::TIMEOUT)?;
            duration(&k("idle_timeout"), s.idle_timeout, bound::PERIOD)?;
            duration(&k("max_lifetime"), s.max_lifetime, bound::PERIOD)?;
            if let Some(t) = s.statement_timeout {
                duration(&k("statement_timeout"), t, bound::TIMEOUT)?;
            }
            let kind = BackendKind::Postgres(s);
            check_connector(key, &pool, &kind)?;
            kind
        }
        "redis" => {
            let mut s: RedisSettings = deserialize(key, own_table, root)?;
            if let Some(file) = &s.password_file {
                s.url = url_with_password_file(&k("password_file"), &s.url, file)?;
            }
            duration(&k("acquire_timeout"), s.acquire_timeout, bound::TIMEOUT)?;
            duration(&k("connect_timeout"), s.connect_timeout, bound::TIMEOUT)?;
            duration(&k("command_timeout"), s.command_timeout, bound::TIMEOUT)?;
            let kind = BackendKind::Redis(s);
            check_connector(key, &pool, &kind)?;
            kind
        }
        "redis_cluster" => {
            let s: RedisClusterSettings = deserialize(key, own_table, root)?;
            number(
                &k("shards"),
                s.shards,
                1,
                u64::from(crate::backend::redis_cluster::MAX_SHARDS),
            )?;
            duration(&k("acquire_timeout"), s.acquire_timeout, bound::TIMEOUT)?;
            duration(&k("connect_timeout"), s.connect_timeout, bound::TIMEOUT)?;
            duration(&k("command_timeout"), s.command_timeout, bound::TIMEOUT)?;
            let kind = BackendKind::RedisCluster(s);
            check_connector(key, &pool, &kind)?;
            kind
        }
        _ => BackendKind::Custom(CustomSettings {
            kind,
            key: key.to_owned(),
            table: own_table,
            root: root.clone(),
        }),
    };
    Ok(BackendSettings { pool, kind })
}

/// `url` with the password read from `file` (trimmed) as its userinfo
/// password, percent-encoded. A URL that already holds a password is an
/// error: two sources of one secret would leave which one wins unclear.
/// No message holds the password.
fn url_with_password_file(key: &str, url: &str, file: &Path) -> Result<String, Error> {
    let password = std::fs::read_to_string(file)
        .map_err(|e| Error::invalid(key, format!("cannot read {}: {e}", file.display())))?;
    let password = password.trim();
    if password.is_empty() {
        return Err(Error::invalid(key, format!("{} is empty", file.display())));
    }
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        // The connector reports the URL itself.
        return Ok(url.to_owned());
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (user, host) = match rest[..authority_end].rfind('@') {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => ("", rest),
    };
    if user.contains(':') {
        return Err(Error::invalid(
            key,
            format!(
                "the url ({}) already holds a password; remove it or this key",
                redact_url(url)
            ),
        ));
    }
    let encoded =
        percent_encoding::utf8_percent_encode(password, percent_encoding::NON_ALPHANUMERIC);
    Ok(format!("{}{user}:{encoded}@{host}", &url[..scheme_end]))
}

/// Builds the kind's connector once, so that what only the connector
/// checks (a URL, an identifier) is a settings error naming its key.
fn check_connector(key: &str, pool: &PoolSettings, kind: &BackendKind) -> Result<(), Error> {
    let checked = match kind {
        BackendKind::Postgres(s) => PostgresConnector::new(s.config(pool)).map(drop),
        BackendKind::Redis(s) => RedisConnector::new(s.config(pool)).map(drop),
        BackendKind::RedisCluster(s) => RedisClusterConnector::new(s.config(pool)).map(drop),
        _ => Ok(()),
    };
    checked.map_err(|e| Error::invalid(format!("{key}.{}", e.field), e.message))
}

impl PostgresSettings {
    /// The connector's configuration.
    pub fn config(&self, pool: &PoolSettings) -> PostgresConfig {
        PostgresConfig {
            url: self.url.clone(),
            schema: self.schema.clone(),
            table: self.table.clone(),
            max_connections: pool.pool_size,
            min_connections: self.min_connections,
            acquire_timeout: self.acquire_timeout,
            idle_timeout: Some(self.idle_timeout),
            max_lifetime: Some(self.max_lifetime),
            statement_timeout: self.statement_timeout,
            application_name: PostgresConfig::default().application_name,
            // The namespaces' timeouts are not the backend's to know; the
            // gateway fills this in (see `Settings::common_timeout`).
            common_timeout: None,
        }
    }
}

impl RedisSettings {
    /// The connector's configuration.
    pub fn config(&self, pool: &PoolSettings) -> RedisConfig {
        RedisConfig {
            url: self.url.clone(),
            max_size: pool.pool_size as usize,
            wait_timeout: self.acquire_timeout,
            create_timeout: self.connect_timeout,
            recycle_timeout: self.connect_timeout,
            key_prefix: self.key_prefix.clone(),
            command_timeout: self.command_timeout,
        }
    }
}

impl RedisClusterSettings {
    /// The connector's configuration.
    pub fn config(&self, pool: &PoolSettings) -> RedisClusterConfig {
        RedisClusterConfig {
            urls: self.urls.clone(),
            max_size: pool.pool_size as usize,
            wait_timeout: self.acquire_timeout,
            create_timeout: self.connect_timeout,
            key_prefix: self.key_prefix.clone(),
            command_timeout: self.command_timeout,
            shards: self.shards,
        }
    }
}

/// Deserializes part of a backend section, naming keys from the section.
fn deserialize<T: DeserializeOwned>(
    key: &str,
    table: config::Map<String, Value>,
    root: &Value,
) -> Result<T, Error> {
    Value::new(None, ValueKind::Table(table))
        .try_deserialize()
        .map_err(|e| from_config(e, None).under(key, root))
}

/// The field names of a struct, as serde sees them.
fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut names: &'static [&'static str] = &[];
    let _ = T::deserialize(introspect::Names(&mut names));
    names
}

/// The variant names of an enum, as serde sees them.
fn variants_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    fields_of::<T>()
}

mod introspect {
    //! A deserializer that produces nothing and records the field or
    //! variant names serde passes to it.

    use serde::de::{self, Visitor};

    pub(super) struct Names<'a>(pub(super) &'a mut &'static [&'static str]);

    impl<'de> de::Deserializer<'de> for Names<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("introspection only"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("introspection only"))
        }

        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _: &'static str,
            variants: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = variants;
            Err(de::Error::custom("introspection only"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map identifier ignored_any
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_their_keys_are_read_from_the_types() {
        assert_eq!(
            Kind::names(),
            ["sqlite", "memory", "postgres", "redis", "redis_cluster"]
        );
        assert!(Kind::fields("redis_cluster").contains(&"shards"));
        assert!(Kind::fields("sqlite").contains(&"busy_timeout"));
        assert!(Kind::fields("postgres").contains(&"statement_timeout"));
        assert!(Kind::fields("memory").is_empty());
        assert!(fields_of::<RawPool>().contains(&"breaker_cooldown"));
    }

    #[test]
    fn a_password_file_fills_the_url_password() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cr:t/@x\n").unwrap();
        let k = "backends.pg.password_file";
        assert_eq!(
            url_with_password_file(k, "postgres://app@db:5432/test?sslmode=require", &file)
                .unwrap(),
            "postgres://app:s3cr%3At%2F%40x@db:5432/test?sslmode=require"
        );
        assert_eq!(
            url_with_password_file(k, "rediss://cache:6380", &file).unwrap(),
            "rediss://:s3cr%3At%2F%40x@cache:6380"
        );
        let twice = url_with_password_file(k, "redis://u:hunter2@cache", &file).unwrap_err();
        assert_eq!(twice.key(), Some(k));
        assert!(!twice.to_string().contains("hunter2"), "{twice}");
        let missing = url_with_password_file(k, "redis://cache", &dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains(k) && missing.contains("nope"), "{missing}");
    }
}
