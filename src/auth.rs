//! Authentication and authorization, decided once for every transport:
//! a caller's credentials (a bearer token, or the CN of a verified client
//! certificate) name a principal; the principal's grants say which
//! namespaces it may read or write and whether it may use the admin
//! endpoints. Deny by default.
//!
//! Tokens are never stored: settings hold their SHA-256, and a presented
//! token is hashed and compared with every principal's hash in constant
//! time. Neither tokens nor their hashes reach a log, an error or `Debug`
//! output. Denials are counted (`prism_auth_denied_total{reason}`) and
//! logged at warn, at most [`DENIAL_LOGS_PER_SECOND`] a second so that a
//! flood cannot fill the log.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sha2::{Digest, Sha256};
use tracing::warn;

use crate::error::{echo, ApiError};
use crate::metrics::Metrics;
use crate::settings::{AuthMode, AuthSettings, Principal};

/// Denials logged per second at most; the rest are counted and reported in
/// the next line.
pub const DENIAL_LOGS_PER_SECOND: u32 = 10;

/// What a caller presented.
#[derive(Clone, Default)]
pub struct Credentials {
    /// The bearer token of an `authorization: Bearer <token>` header.
    pub bearer: Option<String>,
    /// The CN of the caller's verified client certificate (mTLS).
    pub cert_cn: Option<String>,
    /// An `authorization` value that is not `Bearer <token>`.
    malformed: bool,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("bearer", &self.bearer.as_ref().map(|_| "(redacted)"))
            .field("cert_cn", &self.cert_cn)
            .finish()
    }
}

impl Credentials {
    /// Credentials from an `authorization` header value (gRPC metadata or
    /// HTTP header) and a verified certificate's CN.
    pub fn new(authorization: Option<&str>, cert_cn: Option<String>) -> Self {
        let (bearer, malformed) = match authorization {
            None => (None, false),
            Some(v) => match v.trim().split_once(' ') {
                Some((scheme, token))
                    if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
                {
                    (Some(token.trim().to_owned()), false)
                }
                _ => (None, true),
            },
        };
        Credentials {
            bearer,
            cert_cn,
            malformed,
        }
    }
}

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Get, Exists, Scan.
    Read,
    /// Put, Delete.
    Write,
    /// `/metrics`, `/v1/actors`, `/v1/namespaces`.
    Admin,
}

impl Access {
    fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Admin => "admin",
        }
    }
}

/// Decides who a caller is and what it may do.
pub struct Authorizer {
    mode: AuthMode,
    principals: Vec<Arc<Principal>>,
    by_cn: HashMap<String, Arc<Principal>>,
    metrics: Metrics,
    log_budget: Mutex<LogBudget>,
}

struct LogBudget {
    second: Instant,
    logged: u32,
    suppressed: u64,
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorizer")
            .field("mode", &self.mode)
            .field("principals", &self.principals.len())
            .finish_non_exhaustive()
    }
}

impl Authorizer {
    /// The authorizer of `settings`, counting denials in `metrics`.
    pub fn new(settings: &AuthSettings, metrics: Metrics) -> Self {
        let principals: Vec<Arc<Principal>> = settings
            .principals
            .values()
            .cloned()
            .map(Arc::new)
            .collect();
        let by_cn = principals
            .iter()
            .filter_map(|p| p.client_cert_cn.clone().map(|cn| (cn, p.clone())))
            .collect();
        Authorizer {
            mode: settings.mode,
            principals,
            by_cn,
            metrics,
            log_budget: Mutex::new(LogBudget {
                second: Instant::now(),
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// True when callers must authenticate.
    pub fn is_on(&self) -> bool {
        self.mode == AuthMode::Token
    }

    /// Checks that `credentials` name a principal allowed `access` to
    /// `namespace` (ignored for [`Access::Admin`]). Returns the principal;
    /// `None` when authentication is off. Permission is checked before the
    /// namespace is looked up, so a principal learns whether a namespace
    /// exists only when its grant covers it (`"*"` covers every name).
    pub fn check(
        &self,
        credentials: &Credentials,
        namespace: &str,
        access: Access,
        op: &'static str,
    ) -> Result<Option<Arc<Principal>>, ApiError> {
        if self.mode == AuthMode::Off {
            return Ok(None);
        }
        let principal = self.authenticate(credentials, namespace, op)?;
        let allowed = match access {
            Access::Read => principal.read.covers(namespace),
            Access::Write => principal.write.covers(namespace),
            Access::Admin => principal.admin,
        };
        if !allowed {
            self.denied("forbidden", Some(&principal.name), namespace, op);
            return Err(ApiError::PermissionDenied(match access {
                Access::Admin => format!("principal '{}' is not an admin", principal.name),
                _ => format!(
                    "principal '{}' may not {} namespace '{}'",
                    principal.name,
                    access.as_str(),
                    echo(namespace)
                ),
            }));
        }
        Ok(Some(principal))
    }

    fn authenticate(
        &self,
        credentials: &Credentials,
        namespace: &str,
        op: &'static str,
    ) -> Result<Arc<Principal>, ApiError> {
        if credentials.malformed {
            self.denied("malformed", None, namespace, op);
            return Err(ApiError::Unauthenticated(
                "the authorization header must be `Bearer <token>`".into(),
            ));
        }
        if let Some(token) = &credentials.bearer {
            let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            // Every principal is compared, whatever matched, so the time
            // taken says nothing about which hash came closest.
            let mut found = None;
            for p in &self.principals {
                if let Some(expected) = &p.token_sha256 {
                    if constant_time_eq(expected, &hash) {
                        found = Some(p.clone());
                    }
                }
            }
            return found.ok_or_else(|| {
                self.denied("unknown_token", None, namespace, op);
                ApiError::Unauthenticated("the bearer token is not known".into())
            });
        }
        if let Some(cn) = &credentials.cert_cn {
            return self.by_cn.get(cn).cloned().ok_or_else(|| {
                self.denied("unknown_certificate", None, namespace, op);
                ApiError::Unauthenticated(format!(
                    "no principal has the client certificate name '{}'",
                    echo(cn)
                ))
            });
        }
        self.denied("missing", None, namespace, op);
        Err(ApiError::Unauthenticated(
            "credentials are required: an `authorization: Bearer <token>` header or a client certificate"
                .into(),
        ))
    }

    fn denied(&self, reason: &'static str, principal: Option<&str>, namespace: &str, op: &str) {
        self.metrics.auth_denied(reason);
        let now = Instant::now();
        let suppressed = {
            let mut b = self.log_budget.lock().unwrap_or_else(|p| p.into_inner());
            if now.duration_since(b.second).as_secs() >= 1 {
                b.second = now;
                b.logged = 0;
            }
            if b.logged >= DENIAL_LOGS_PER_SECOND {
                b.suppressed += 1;
                return;
            }
            b.logged += 1;
            std::mem::take(&mut b.suppressed)
        };
        warn!(
            reason,
            principal = principal.unwrap_or("(none)"),
            namespace = %echo(namespace),
            op,
            suppressed_before = suppressed,
            "request denied"
        );
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `token_sha256` of a token: its SHA-256 as 64 lowercase hex digits.
pub fn hash_token(token: &str) -> String {
    hex(&Sha256::digest(token.trim().as_bytes()))
}

/// A fresh random token (256 bits, URL-safe base64) and its `token_sha256`.
pub fn new_token() -> (String, String) {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let hash = hash_token(&token);
    (token, hash)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Settings;

    fn authorizer(principals: &str) -> Authorizer {
        let toml = format!(
            "[server]\ngrpc_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:1\"\n\
             [backends.m]\nkind = \"memory\"\n[namespaces.a]\nbackend = \"m\"\n\
             [namespaces.b]\nbackend = \"m\"\n[auth]\nmode = \"token\"\n{principals}"
        );
        let settings = Settings::from_toml(&toml).unwrap();
        Authorizer::new(&settings.auth, Metrics::new())
    }

    #[test]
    fn tokens_hash_to_64_hex_digits_and_new_tokens_differ() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let (t1, h1) = new_token();
        let (t2, _) = new_token();
        assert_ne!(t1, t2);
        assert!(t1.len() >= 43, "256 bits in base64");
        assert_eq!(h1, hash_token(&t1));
    }

    #[test]
    fn grants_decide_per_namespace_and_access() {
        let a = authorizer(&format!(
            "[auth.principals.reader]\ntoken_sha256 = \"{}\"\nread = [\"a\"]\n\
             [auth.principals.root]\ntoken_sha256 = \"{}\"\nread = [\"*\"]\nwrite = [\"*\"]\nadmin = true\n",
            hash_token("r"),
            hash_token("x")
        ));
        let reader = Credentials::new(Some("Bearer r"), None);
        assert!(a.check(&reader, "a", Access::Read, "get").is_ok());
        let e = a.check(&reader, "a", Access::Write, "put").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let e = a.check(&reader, "b", Access::Read, "get").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(a.check(&reader, "", Access::Admin, "metrics").is_err());
        let root = Credentials::new(Some("bearer x"), None);
        assert!(a.check(&root, "nope", Access::Write, "put").is_ok());
        assert!(a.check(&root, "", Access::Admin, "metrics").is_ok());
        for bad in [None, Some("Bearer nope"), Some("Basic r"), Some("Bearer ")] {
            let e = a
                .check(&Credentials::new(bad, None), "a", Access::Read, "get")
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }

    #[test]
    fn credentials_never_show_the_token() {
        let c = Credentials::new(Some("Bearer s3cr3t-token"), None);
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }
}
