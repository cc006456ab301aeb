//! `[auth]`: who may call Prism, and what each principal may do.
//!
//! ```toml
//! [auth]
//! mode = "token"                         # or "off" (default)
//! allow_unauthenticated_remote = false
//!
//! [auth.principals.orders]
//! token_sha256 = "<64 hex digits>"       # SHA-256 of the bearer token
//! read = ["orders", "cache"]             # Get, Exists, Scan; "*" = every namespace
//! write = ["orders"]                     # Put, Delete
//! admin = false                          # /metrics, /v1/actors, /v1/namespaces
//! client_cert_cn = "orders-service"      # a verified client certificate with this CN
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;

use serde::Deserialize;

use super::error::Error;
use super::raw::key_segment;
use super::{is_valid_name, ServerSettings};

/// How callers are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Nobody is authenticated; everyone may do everything. Allowed only on
    /// loopback listeners unless `allow_unauthenticated_remote` is set.
    Off,
    /// Every key-value and admin request needs a known principal's bearer
    /// token or client certificate.
    Token,
}

/// `[auth]`, validated.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// `off` or `token`.
    pub mode: AuthMode,
    /// Principals by name.
    pub principals: BTreeMap<String, Principal>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            mode: AuthMode::Off,
            principals: BTreeMap::new(),
        }
    }
}

/// Namespaces a principal may use for one kind of access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Every namespace (`"*"`), including unknown ones, which then answer
    /// NOT_FOUND.
    All,
    /// These namespaces.
    Only(BTreeSet<String>),
}

impl Grant {
    /// True when the grant covers `namespace`.
    pub fn covers(&self, namespace: &str) -> bool {
        match self {
            Grant::All => true,
            Grant::Only(set) => set.contains(namespace),
        }
    }
}

/// One principal: a service or person with its credentials and grants.
#[derive(Clone)]
pub struct Principal {
    /// The principal's name (its settings key).
    pub name: String,
    /// SHA-256 of its bearer token, if it has one.
    pub token_sha256: Option<[u8; 32]>,
    /// Namespaces for Get, Exists and Scan.
    pub read: Grant,
    /// Namespaces for Put and Delete.
    pub write: Grant,
    /// May read `/metrics`, `/v1/actors` and `/v1/namespaces`.
    pub admin: bool,
    /// The CN of a verified client certificate that identifies it.
    pub client_cert_cn: Option<String>,
}

/// The token hash is not the token, but it is left out all the same: what
/// authenticates never reaches a log.
impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Principal")
            .field("name", &self.name)
            .field("token_sha256", &self.token_sha256.map(|_| "(set)"))
            .field("read", &self.read)
            .field("write", &self.write)
            .field("admin", &self.admin)
            .field("client_cert_cn", &self.client_cert_cn)
            .finish()
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    allow_unauthenticated_remote: bool,
    #[serde(default)]
    principals: BTreeMap<String, RawPrincipal>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrincipal {
    #[serde(default)]
    token_sha256: Option<String>,
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    client_cert_cn: Option<String>,
}

const MODES: [(&str, AuthMode); 2] = [("off", AuthMode::Off), ("token", AuthMode::Token)];

impl RawAuth {
    /// Validates `[auth]` against the listeners and the namespaces.
    pub(super) fn validate(
        self,
        server: &ServerSettings,
        namespaces: &BTreeSet<&str>,
    ) -> Result<AuthSettings, Error> {
        let mode = match self.mode.as_deref() {
            None => AuthMode::Off,
            Some(m) => MODES
                .iter()
                .find(|(name, _)| *name == m)
                .map(|(_, mode)| *mode)
                .ok_or_else(|| {
                    Error::bad_value(
                        "auth.mode",
                        format!("unknown value {m:?}; expected one of: off, token"),
                    )
                })?,
        };
        if mode == AuthMode::Off && !self.allow_unauthenticated_remote {
            for (key, addr) in [
                ("server.grpc_addr", server.grpc_addr),
                ("server.http_addr", server.http_addr),
            ] {
                if !addr.ip().is_loopback() {
                    return Err(Error::invalid(
                        "auth.mode",
                        protected_mode_message(key, addr),
                    ));
                }
            }
        }
        let mut principals = BTreeMap::new();
        let mut tokens = BTreeMap::new();
        for (name, p) in self.principals {
            let key = format!("auth.principals.{}", key_segment(&name));
            if !is_valid_name(&name) {
                return Err(Error::invalid(
                    key,
                    "a principal name must be 1 to 64 letters, digits, `_` or `-`",
                ));
            }
            let token_sha256 = match p.token_sha256 {
                Some(hex) => {
                    let hash = parse_sha256(&hex).ok_or_else(|| {
                        Error::invalid(
                            format!("{key}.token_sha256"),
                            "must be 64 hexadecimal digits: the SHA-256 of the token (`prism auth hash-token`)",
                        )
                    })?;
                    if let Some(other) = tokens.insert(hash, name.clone()) {
                        return Err(Error::invalid(
                            format!("{key}.token_sha256"),
                            format!("is also the token of principal {other:?}"),
                        ));
                    }
                    Some(hash)
                }
                None => None,
            };
            if token_sha256.is_none() && p.client_cert_cn.is_none() {
                return Err(Error::invalid(
                    key,
                    "has neither token_sha256 nor client_cert_cn, so nobody can be it",
                ));
            }
            if p.client_cert_cn.as_deref() == Some("") {
                return Err(Error::invalid(
                    format!("{key}.client_cert_cn"),
                    "must not be empty",
                ));
            }
            let read = grant(&format!("{key}.read"), p.read, namespaces)?;
            let write = grant(&format!("{key}.write"), p.write, namespaces)?;
            principals.insert(
                name.clone(),
                Principal {
                    name,
                    token_sha256,
                    read,
                    write,
                    admin: p.admin,
                    client_cert_cn: p.client_cert_cn,
                },
            );
        }
        let mut cns = BTreeMap::new();
        for p in principals.values() {
            if let Some(cn) = &p.client_cert_cn {
                if let Some(other) = cns.insert(cn.clone(), p.name.clone()) {
                    return Err(Error::invalid(
                        format!("auth.principals.{}.client_cert_cn", p.name),
                        format!("{cn:?} is also the certificate name of principal {other:?}"),
                    ));
                }
            }
        }
        if mode == AuthMode::Token && principals.is_empty() {
            return Err(Error::invalid(
                "auth.mode",
                "is \"token\" but no principal is defined under [auth.principals], so nobody could call Prism",
            ));
        }
        Ok(AuthSettings { mode, principals })
    }
}

fn protected_mode_message(key: &str, addr: SocketAddr) -> String {
    format!(
        "is \"off\" (no authentication) while {key} = {addr} is not a loopback address: \
         anyone who reaches it could read and write every namespace. Set auth.mode = \"token\" \
         with principals, listen on 127.0.0.1, or set auth.allow_unauthenticated_remote = true"
    )
}

fn grant(key: &str, names: Vec<String>, namespaces: &BTreeSet<&str>) -> Result<Grant, Error> {
    if names.iter().any(|n| n == "*") {
        return Ok(Grant::All);
    }
    for n in &names {
        if !namespaces.contains(n.as_str()) {
            let shown: String = n.chars().take(64).collect();
            return Err(Error::invalid(
                key,
                format!("names namespace {shown:?}, which is not under [namespaces]"),
            ));
        }
    }
    Ok(Grant::Only(names.into_iter().collect()))
}

/// 64 hex digits as 32 bytes.
pub fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_hex_parses_and_rejects_garbage() {
        let h = "00".repeat(31) + "ff";
        assert_eq!(parse_sha256(&h).unwrap()[31], 0xff);
        assert!(parse_sha256("abc").is_none());
        assert!(parse_sha256(&"zz".repeat(32)).is_none());
        assert!(parse_sha256(&"é".repeat(32)).is_none());
    }
}
