//! The settings as they are written (serde structs with every key optional
//! where a default exists), and their one conversion into the validated
//! types: defaults filled in, every number and duration checked against its
//! bounds, names and references checked.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use config::Value;
use serde::Deserialize;

use super::auth::RawAuth;
use super::backend::parse_backend;
use super::error::Error;
use super::{
    is_valid_name, log_filter, GrpcLimits, LogFormat, LogSettings, NamespaceSettings,
    ServerSettings, SessionSettings, Settings, SupervisorSettings, TlsSettings,
    DEFAULT_MAX_PAGE_BYTES, MAX_NAME_LEN, MAX_VALUE_SIZE_LIMIT, MIN_PAGE_BYTES,
};
use crate::tls::CertFiles;

/// Whole-number keys. The `config` crate would read `true` as 1 and cut
/// `2.7` to 2; here a boolean or a fraction is an error naming the key, and
/// a string (every environment variable is one) must hold just the digits.
pub(super) mod whole {
    use std::fmt;

    use serde::de::{self, Deserializer, Unexpected, Visitor};

    struct Whole;

    impl Visitor<'_> for Whole {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a whole number")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            let digits = v.trim();
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(E::invalid_value(Unexpected::Str(v), &self));
            }
            digits
                .parse()
                .map_err(|_| E::invalid_value(Unexpected::Str(v), &"a whole number below 2^64"))
        }
    }

    /// A whole number that fits `T`.
    pub fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64>,
    {
        let n = d.deserialize_any(Whole)?;
        T::try_from(n).map_err(|_| {
            de::Error::invalid_value(
                Unexpected::Unsigned(n),
                &format!("a whole number of at most {}", max::<T>()).as_str(),
            )
        })
    }

    /// Like [`deserialize`], for a key that may be left out.
    pub fn option<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64>,
    {
        deserialize(d).map(Some)
    }

    /// The largest `u64` that fits `T`.
    fn max<T: TryFrom<u64>>() -> u64 {
        let (mut lo, mut hi) = (0u64, u64::MAX);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if T::try_from(mid).is_ok() {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }
}

/// Upper bounds shared by several keys. Generous, but finite: a deadline
/// added to `Instant::now()` or a capacity handed to an allocator must
/// never overflow.
pub(super) mod bound {
    use std::time::Duration;

    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// Request deadlines, backend timeouts, the drain's grace period.
    pub const TIMEOUT: Duration = HOUR;
    /// Periodic work (purges, health checks, idle expiry) and connection
    /// lifetimes.
    pub const PERIOD: Duration = DAY;
    /// Restart backoffs and the breaker's cool-down.
    pub const BACKOFF: Duration = Duration::from_secs(10 * 60);
    /// The longest TTL: 100 years, as every backend stores it.
    pub const TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    /// Mailboxes and queues, in messages.
    pub const QUEUE: u64 = 1 << 20;
    /// Connections or operations at once per backend.
    pub const POOL: u64 = 10_000;
    /// Counts of clients, requests in flight, rates.
    pub const COUNT: u64 = 10_000_000;
}

/// `value` unless it is 0 or larger than `max`.
pub(super) fn duration(key: &str, value: Duration, max: Duration) -> Result<Duration, Error> {
    if value.is_zero() {
        return Err(Error::invalid(key, "must be greater than 0"));
    }
    if value > max {
        return Err(Error::invalid(
            key,
            format!(
                "{} is too long: at most {}",
                humantime::format_duration(value),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(value)
}

/// `value` unless it is outside `min..=max`.
pub(super) fn number<T>(key: &str, value: T, min: u64, max: u64) -> Result<T, Error>
where
    T: Copy + TryInto<u64> + std::fmt::Display,
{
    let n: u64 = value.try_into().unwrap_or(u64::MAX);
    if n < min || n > max {
        let rule = if min == 1 && n == 0 {
            "must be at least 1".to_owned()
        } else {
            format!("{value} is out of range: must be between {min} and {max}")
        };
        return Err(Error::invalid(key, rule));
    }
    Ok(value)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSettings {
    server: RawServer,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    sessions: RawSessions,
    #[serde(default)]
    supervisor: RawSupervisor,
    /// Parsed from the value tree by [`parse_backend`], which needs the
    /// `kind` before it knows the other keys.
    #[serde(default)]
    backends: BTreeMap<String, serde::de::IgnoredAny>,
    #[serde(default)]
    namespaces: BTreeMap<String, RawNamespace>,
    #[serde(default)]
    auth: RawAuth,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    grpc_addr: SocketAddr,
    #[serde(default = "default_http_addr")]
    http_addr: SocketAddr,
    #[serde(with = "humantime_serde", default = "default_grace")]
    shutdown_grace: Duration,
    #[serde(with = "humantime_serde", default = "default_drain_delay")]
    drain_delay: Duration,
    #[serde(
        default = "default_max_concurrent_streams",
        deserialize_with = "crate::settings::raw::whole::deserialize"
    )]
    grpc_max_concurrent_streams: u32,
    #[serde(
        default = "default_max_pending_reset_streams",
        deserialize_with = "crate::settings::raw::whole::deserialize"
    )]
    grpc_max_pending_reset_streams: usize,
    #[serde(
        default = "default_max_local_reset_streams",
        deserialize_with = "crate::settings::raw::whole::deserialize"
    )]
    grpc_max_local_reset_streams: usize,
    #[serde(with = "humantime_serde", default = "default_keepalive_interval")]
    grpc_keepalive_interval: Duration,
    #[serde(with = "humantime_serde", default = "default_keepalive_timeout")]
    grpc_keepalive_timeout: Duration,
    #[serde(with = "humantime_serde", default = "default_max_connection_age")]
    grpc_max_connection_age: Duration,
    #[serde(default)]
    tls: Option<RawTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    client_ca: Option<PathBuf>,
}

impl RawTls {
    /// Reads and checks the files: a settings error names the key and file.
    fn load(&self) -> Result<TlsSettings, Error> {
        for (key, path) in [
            ("server.tls.cert", &self.cert),
            ("server.tls.key", &self.key),
        ]
        .into_iter()
        .chain(self.client_ca.iter().map(|p| ("server.tls.client_ca", p)))
        {
            if path.as_os_str().is_empty() {
                return Err(Error::invalid(key, "must not be empty"));
            }
        }
        let certs = crate::tls::ServerCerts::load(CertFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            client_ca: self.client_ca.clone(),
        })
        .map_err(|e| Error::invalid(e.key(), e.to_string()))?;
        Ok(TlsSettings { certs })
    }
}

fn default_drain_delay() -> Duration {
    Duration::from_secs(1)
}
fn default_max_concurrent_streams() -> u32 {
    1024
}
fn default_max_pending_reset_streams() -> usize {
    20
}
fn default_max_local_reset_streams() -> usize {
    1024
}
fn default_keepalive_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_keepalive_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_connection_age() -> Duration {
    Duration::from_secs(3600)
}

fn default_http_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8981))
}

fn default_grace() -> Duration {
    Duration::from_secs(30)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: String,
    format: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSessions {
    #[serde(deserialize_with = "crate::settings::raw::whole::deserialize")]
    max_in_flight: u32,
    #[serde(deserialize_with = "crate::settings::raw::whole::deserialize")]
    rate_limit: u32,
    #[serde(deserialize_with = "crate::settings::raw::whole::deserialize")]
    rate_burst: u32,
    #[serde(with = "humantime_serde")]
    idle_timeout: Duration,
    #[serde(deserialize_with = "crate::settings::raw::whole::deserialize")]
    max_sessions: u32,
    #[serde(deserialize_with = "crate::settings::raw::whole::deserialize")]
    mailbox: usize,
}

impl Default for RawSessions {
    fn default() -> Self {
        let d = SessionSettings::default();
        RawSessions {
            max_in_flight: d.max_in_flight,
            rate_limit: d.rate_limit,
            rate_burst: d.rate_burst,
            idle_timeout: d.idle_timeout,
            max_sessions: d.max_sessions,
            mailbox: d.mailbox,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSupervisor {
    #[serde(deserialize_with = "crate::settings::raw::whole::deserialize")]
    max_restarts: u32,
    #[serde(with = "humantime_serde")]
    restart_window: Duration,
    #[serde(with = "humantime_serde")]
    backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    backoff_max: Duration,
}

impl Default for RawSupervisor {
    fn default() -> Self {
        RawSupervisor {
            max_restarts: 10,
            restart_window: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamespace {
    backend: String,
    #[serde(with = "humantime_serde", default = "default_timeout")]
    timeout: Duration,
    #[serde(with = "humantime_serde", default)]
    default_ttl: Option<Duration>,
    #[serde(
        default = "default_max_value_size",
        deserialize_with = "crate::settings::raw::whole::deserialize"
    )]
    max_value_size: usize,
    #[serde(
        default = "default_max_page_bytes",
        deserialize_with = "crate::settings::raw::whole::deserialize"
    )]
    max_page_bytes: usize,
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_max_value_size() -> usize {
    1024 * 1024
}

fn default_max_page_bytes() -> usize {
    DEFAULT_MAX_PAGE_BYTES
}

/// A name as a segment of a dotted key: quoted, as TOML would, when it is
/// not a plain name.
pub(super) fn key_segment(name: &str) -> String {
    if is_valid_name(name) {
        name.to_owned()
    } else {
        format!("{name:?}")
    }
}

fn check_name(key: &str, what: &str, name: &str) -> Result<(), Error> {
    if is_valid_name(name) {
        return Ok(());
    }
    let shown: String = name.chars().take(MAX_NAME_LEN + 1).collect();
    Err(Error::invalid(
        key,
        format!("{what} name {shown:?} must be 1 to {MAX_NAME_LEN} letters, digits, `_` or `-`"),
    ))
}

impl RawSettings {
    /// The one conversion into [`Settings`]. Returns the first violation,
    /// in file order (server, log, sessions, supervisor, backends,
    /// namespaces). `root` is the loaded value tree, from which backend
    /// sections are parsed; `custom_kinds` are the backend kinds registered
    /// besides the built-in ones.
    pub(super) fn validate(self, root: &Value, custom_kinds: &[String]) -> Result<Settings, Error> {
        let v = &self.server;
        let server = ServerSettings {
            grpc_addr: v.grpc_addr,
            http_addr: v.http_addr,
            shutdown_grace: duration("server.shutdown_grace", v.shutdown_grace, bound::TIMEOUT)?,
            drain_delay: if v.drain_delay.is_zero() {
                v.drain_delay
            } else {
                duration("server.drain_delay", v.drain_delay, bound::BACKOFF)?
            },
            grpc: GrpcLimits {
                max_concurrent_streams: number(
                    "server.grpc_max_concurrent_streams",
                    v.grpc_max_concurrent_streams,
                    1,
                    bound::QUEUE,
                )?,
                max_pending_reset_streams: number(
                    "server.grpc_max_pending_reset_streams",
                    v.grpc_max_pending_reset_streams,
                    1,
                    bound::QUEUE,
                )?,
                max_local_reset_streams: number(
                    "server.grpc_max_local_reset_streams",
                    v.grpc_max_local_reset_streams,
                    1,
                    bound::QUEUE,
                )?,
                keepalive_interval: duration(
                    "server.grpc_keepalive_interval",
                    v.grpc_keepalive_interval,
                    bound::TIMEOUT,
                )?,
                keepalive_timeout: duration(
                    "server.grpc_keepalive_timeout",
                    v.grpc_keepalive_timeout,
                    bound::TIMEOUT,
                )?,
                max_connection_age: duration(
                    "server.grpc_max_connection_age",
                    v.grpc_max_connection_age,
                    bound::PERIOD,
                )?,
            },
            tls: v.tls.as_ref().map(RawTls::load).transpose()?,
        };
        if server.drain_delay >= server.shutdown_grace {
            return Err(Error::invalid(
                "server.drain_delay",
                format!(
                    "{} is not shorter than server.shutdown_grace ({})",
                    humantime::format_duration(server.drain_delay),
                    humantime::format_duration(server.shutdown_grace)
                ),
            ));
        }
        if server.grpc_addr == server.http_addr && server.grpc_addr.port() != 0 {
            return Err(Error::invalid(
                "server.http_addr",
                format!(
                    "{} is also server.grpc_addr; the two listeners need different addresses",
                    server.http_addr
                ),
            ));
        }
        log_filter(&self.log.level).map_err(|e| Error::invalid("log.level", e))?;
        let format = LogFormat::ALL
            .into_iter()
            .find(|f| f.as_str() == self.log.format)
            .ok_or_else(|| {
                let all: Vec<&str> = LogFormat::ALL.iter().map(|f| f.as_str()).collect();
                Error::bad_value(
                    "log.format",
                    format!(
                        "unknown value {:?}; expected one of: {}",
                        self.log.format,
                        all.join(", ")
                    ),
                )
            })?;
        let log = LogSettings {
            level: self.log.level,
            format,
        };
        let s = self.sessions;
        let sessions = SessionSettings {
            max_in_flight: number("sessions.max_in_flight", s.max_in_flight, 1, bound::COUNT)?,
            rate_limit: number("sessions.rate_limit", s.rate_limit, 0, bound::COUNT)?,
            rate_burst: number("sessions.rate_burst", s.rate_burst, 0, bound::COUNT)?,
            idle_timeout: duration("sessions.idle_timeout", s.idle_timeout, bound::PERIOD)?,
            max_sessions: number("sessions.max_sessions", s.max_sessions, 1, bound::COUNT)?,
            mailbox: number("sessions.mailbox", s.mailbox, 1, bound::QUEUE)?,
        };
        let s = self.supervisor;
        let supervisor = SupervisorSettings {
            max_restarts: number("supervisor.max_restarts", s.max_restarts, 1, 1_000_000)?,
            restart_window: duration("supervisor.restart_window", s.restart_window, bound::PERIOD)?,
            backoff_initial: duration(
                "supervisor.backoff_initial",
                s.backoff_initial,
                bound::BACKOFF,
            )?,
            backoff_max: duration("supervisor.backoff_max", s.backoff_max, bound::BACKOFF)?,
        };
        if supervisor.backoff_initial > supervisor.backoff_max {
            return Err(Error::invalid(
                "supervisor.backoff_initial",
                format!(
                    "{} is larger than supervisor.backoff_max ({})",
                    humantime::format_duration(supervisor.backoff_initial),
                    humantime::format_duration(supervisor.backoff_max)
                ),
            ));
        }
        let mut backends = BTreeMap::new();
        for name in self.backends.keys() {
            let key = format!("backends.{}", key_segment(name));
            check_name(&key, "backend", name)?;
            // Valid names hold no `.`, so the key is also the tree's path.
            let table = super::load::lookup(root, &key);
            backends.insert(
                name.clone(),
                parse_backend(&key, table, root, custom_kinds)?,
            );
        }
        if self.namespaces.is_empty() {
            return Err(Error::invalid(
                "namespaces",
                "no namespace is defined; add one, e.g. [namespaces.default] backend = \"embedded\"",
            ));
        }
        let mut namespaces = BTreeMap::new();
        for (name, ns) in self.namespaces {
            let key = format!("namespaces.{}", key_segment(&name));
            check_name(&key, "namespace", &name)?;
            if !backends.contains_key(&ns.backend) {
                let defined: Vec<&str> = backends.keys().map(String::as_str).collect();
                let defined = if defined.is_empty() {
                    "none is defined".to_owned()
                } else {
                    format!("defined: {}", defined.join(", "))
                };
                return Err(Error::invalid(
                    format!("{key}.backend"),
                    format!(
                        "names backend {:?}, which is not under [backends] ({defined})",
                        ns.backend
                    ),
                ));
            }
            let default_ttl = match ns.default_ttl {
                Some(ttl) if ttl.is_zero() => {
                    return Err(Error::invalid(
                        format!("{key}.default_ttl"),
                        "must be greater than 0; leave the key out for no expiry",
                    ))
                }
                Some(ttl) => Some(duration(&format!("{key}.default_ttl"), ttl, bound::TTL)?),
                None => None,
            };
            if ns.max_value_size == 0 || ns.max_value_size > MAX_VALUE_SIZE_LIMIT {
                return Err(Error::invalid(
                    format!("{key}.max_value_size"),
                    format!(
                        "{} is out of range: must be between 1 and {MAX_VALUE_SIZE_LIMIT} (64 MiB)",
                        ns.max_value_size
                    ),
                ));
            }
            if !(MIN_PAGE_BYTES..=MAX_VALUE_SIZE_LIMIT).contains(&ns.max_page_bytes) {
                return Err(Error::invalid(
                    format!("{key}.max_page_bytes"),
                    format!(
                        "{} is out of range: must be between {MIN_PAGE_BYTES} (1 KiB) and {MAX_VALUE_SIZE_LIMIT} (64 MiB)",
                        ns.max_page_bytes
                    ),
                ));
            }
            namespaces.insert(
                name,
                NamespaceSettings {
                    timeout: duration(&format!("{key}.timeout"), ns.timeout, bound::TIMEOUT)?,
                    backend: ns.backend,
                    default_ttl,
                    max_value_size: ns.max_value_size,
                    max_page_bytes: ns.max_page_bytes,
                },
            );
        }
        let names: std::collections::BTreeSet<&str> =
            namespaces.keys().map(String::as_str).collect();
        let auth = self.auth.validate(&server, &names)?;
        Ok(Settings {
            auth,
            server,
            log,
            sessions,
            supervisor,
            backends,
            namespaces,
        })
    }
}
