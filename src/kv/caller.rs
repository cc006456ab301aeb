//! Who is asking, and until when: the identity and the deadline of a
//! request, by the same rules for every transport.

use std::net::SocketAddr;
use std::time::Duration;

use crate::auth::Credentials;
use crate::error::{echo, ApiError};

/// The transport a request came in on, for logs and for the deadline rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// gRPC (`prism.kv.v1.KeyValue`).
    Grpc,
    /// The admin plane's REST key-value API.
    Rest,
}

impl Api {
    /// Lowercase name, as in the `api` field of request spans.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Grpc => "grpc",
            Api::Rest => "rest",
        }
    }
}

/// The metadata key (gRPC) and header (REST) naming the client's session.
pub const CLIENT_ID: &str = "x-client-id";

/// The metadata key and header bounding a request, in the `grpc-timeout`
/// format (`<digits><H|M|S|m|u|n>`, e.g. `250m`).
pub const TIMEOUT: &str = "grpc-timeout";

/// The metadata key and header carrying `Bearer <token>` credentials.
pub const AUTHORIZATION: &str = "authorization";

/// The caller of one request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The session's identity: `x-client-id`, else the peer's IP address
    /// (without the port, so that a client's connections share a session).
    pub client: String,
    /// How long the request may take; `None` means the namespace's timeout.
    pub timeout: Option<Duration>,
    /// The transport.
    pub api: Api,
    /// What the caller presented to authenticate.
    pub credentials: Credentials,
}

impl Caller {
    /// The caller of a request that arrived on `api` from `peer`, with the
    /// `x-client-id` and `grpc-timeout` values it sent. A `grpc-timeout`
    /// that is not `<1 to 8 digits><H|M|S|m|u|n>` is INVALID_ARGUMENT on
    /// every transport, rather than silently "no deadline".
    ///
    /// On gRPC, tonic's own timeout layer answers CANCELLED exactly at the
    /// client's deadline, so the request gives up a small margin earlier
    /// and the client gets DEADLINE_EXCEEDED with a reason instead.
    pub fn new(
        api: Api,
        client_id: Option<&str>,
        peer: Option<SocketAddr>,
        grpc_timeout: Option<&str>,
    ) -> Result<Caller, ApiError> {
        let Caller { client, .. } = Caller::identify(api, client_id, peer);
        let timeout = match grpc_timeout {
            None => None,
            Some(v) => Some(parse_grpc_timeout(v).ok_or_else(|| {
                ApiError::InvalidArgument(format!(
                    "{TIMEOUT} header '{}' is not a timeout: use 1 to 8 digits and a unit H, M, S, m, u or n (e.g. 250m)",
                    echo(v)
                ))
            })?),
        };
        let timeout = match api {
            Api::Grpc => timeout.map(|t| t.saturating_sub(deadline_margin(t))),
            Api::Rest => timeout,
        };
        Ok(Caller {
            client,
            timeout,
            api,
            credentials: Credentials::default(),
        })
    }
}

impl Caller {
    /// Who is asking, without a deadline: the caller a request that
    /// [`Caller::new`] refused is counted and logged under.
    pub fn identify(api: Api, client_id: Option<&str>, peer: Option<SocketAddr>) -> Caller {
        let client = client_id
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .or_else(|| peer.map(|a| a.ip().to_string()))
            .unwrap_or_else(|| "unknown".to_owned());
        Caller {
            client,
            timeout: None,
            api,
            credentials: Credentials::default(),
        }
    }

    /// The caller with these credentials.
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = credentials;
        self
    }
}

/// Parses a `grpc-timeout` value (`<digits><unit>`, unit one of H M S m u
/// n, at most 8 digits).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How much earlier than the client's deadline a gRPC request gives up: a
/// tenth of the timeout, at least 5 ms (at most half the timeout), at most
/// 20 ms.
pub fn deadline_margin(timeout: Duration) -> Duration {
    (timeout / 10).clamp(
        Duration::from_millis(5).min(timeout / 2),
        Duration::from_millis(20),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_values_parse() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("+1S"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }

    #[test]
    fn requests_give_up_a_little_before_the_client_deadline() {
        let ms = Duration::from_millis;
        assert_eq!(deadline_margin(ms(10)), ms(5));
        assert_eq!(deadline_margin(ms(4)), ms(2));
        assert_eq!(deadline_margin(ms(100)), ms(10));
        assert_eq!(deadline_margin(Duration::from_secs(5)), ms(20));
    }

    #[test]
    fn the_client_is_its_id_else_its_ip_address() {
        let peer = Some(SocketAddr::from(([127, 0, 0, 1], 4000)));
        let c = Caller::new(Api::Grpc, Some("svc"), peer, Some("1S")).unwrap();
        assert_eq!(c.client, "svc");
        assert_eq!(c.timeout, Some(Duration::from_millis(980)));
        let c = Caller::new(Api::Rest, Some(""), peer, Some("1S")).unwrap();
        assert_eq!(c.client, "127.0.0.1");
        assert_eq!(c.timeout, Some(Duration::from_secs(1)));
        let v6 = Some("[::1]:5000".parse().unwrap());
        assert_eq!(
            Caller::new(Api::Rest, None, v6, None).unwrap().client,
            "::1"
        );
    }

    #[test]
    fn a_malformed_timeout_is_an_invalid_argument_on_every_transport() {
        for api in [Api::Grpc, Api::Rest] {
            let e = Caller::new(api, None, None, Some("soon")).unwrap_err();
            assert!(
                matches!(&e, ApiError::InvalidArgument(m) if m.contains(TIMEOUT)),
                "{e}"
            );
        }
    }
}
