//! A client of the `prism.kv.v1.KeyValue` API: what `prism kv` and
//! `prism bench` use, and a starting point for Rust applications.
//!
//! - `addr.rs`: the address list (`a` or `a,b,c`), its checks, and the
//!   endpoints (plain or TLS) made from it;
//! - `balance.rs`: balancing over several instances, leaving out those
//!   that do not answer.

mod addr;
mod balance;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::proto::key_value_client::KeyValueClient;
use crate::proto::{
    DeleteRequest, ExistsRequest, GetRequest, GetResponse, PutRequest, ScanRequest, ScanResponse,
};
use crate::settings::MAX_VALUE_SIZE_LIMIT;

pub use addr::{normalize_addr, parse_list, Address};
pub use balance::PROBE_INTERVAL;

/// Largest gRPC message the client sends or accepts: the largest value a
/// namespace may allow, plus room for the key and framing.
pub const MAX_MESSAGE_SIZE: usize = MAX_VALUE_SIZE_LIMIT + 1024 * 1024;

/// The metadata key that names the calling client (its session).
pub const CLIENT_ID_HEADER: &str = "x-client-id";

/// The gateway's default address.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:8980";

/// How to reach the gateway and what to send with every request.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `http://host:port` or `https://host:port`; a bare `host:port` gets
    /// `http://`. Several instances, comma-separated (`a:1,b:2`): requests
    /// are balanced over those that answer (see [`Client::connect`]).
    pub addr: String,
    /// Sent as `x-client-id` metadata.
    pub client_id: Option<String>,
    /// Deadline of each request, sent as `grpc-timeout` and enforced locally.
    pub timeout: Option<Duration>,
    /// How long establishing the connection may take.
    pub connect_timeout: Duration,
    /// Sent as `authorization: Bearer <token>` metadata.
    pub token: Option<String>,
    /// `https://` only: PEM CA bundle that signed the gateway's certificate;
    /// the webpki roots when `None`.
    pub ca: Option<PathBuf>,
    /// `https://` only: PEM client certificate (mutual TLS), with `key`.
    pub cert: Option<PathBuf>,
    /// `https://` only: PEM private key of `cert`.
    pub key: Option<PathBuf>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            addr: DEFAULT_ADDR.into(),
            client_id: None,
            timeout: Some(Duration::from_secs(5)),
            connect_timeout: Duration::from_secs(5),
            token: None,
            ca: None,
            cert: None,
            key: None,
        }
    }
}

/// Errors of building a [`Client`]. Errors of calls are `tonic::Status`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address is not a usable URI.
    #[error("invalid address {addr:?}: {message}")]
    Address {
        /// The address given.
        addr: String,
        /// What is wrong with it.
        message: String,
    },
    /// The client id cannot be sent as gRPC metadata.
    #[error("invalid client id {0:?}: must be printable ASCII")]
    ClientId(String),
    /// The token cannot be sent as gRPC metadata (it is not shown).
    #[error("invalid token: must be non-empty printable ASCII")]
    Token,
    /// The TLS options (CA bundle, client certificate) are unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The gateway could not be reached.
    #[error("cannot connect to {addr}: {message}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why it failed, with its causes.
        message: String,
    },
}

impl Error {
    /// The gRPC code that best describes the error, for uniform reporting.
    pub fn code(&self) -> Code {
        match self {
            Error::Address { .. } | Error::ClientId(_) | Error::Token | Error::Tls(_) => {
                Code::InvalidArgument
            }
            Error::Connect { .. } => Code::Unavailable,
        }
    }
}

/// A KeyValue client. Cloning is cheap and clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    inner: KeyValueClient<Channel>,
    client_id: Option<MetadataValue<Ascii>>,
    authorization: Option<MetadataValue<Ascii>>,
    timeout: Option<Duration>,
    /// Several instances: the watchers that keep the channel to those that
    /// answer.
    balanced: Option<Arc<balance::Balanced>>,
}

impl Client {
    /// Connects to the gateway at `options.addr`.
    ///
    /// With one address, the connection is made here, and a failure to
    /// make it is an error. With several, each instance is asked for its
    /// health here (at once, each within `connect_timeout`), and it is an
    /// error only when none answers; requests are then spread over the
    /// instances that answer (tonic's balanced channel), an instance that
    /// stops answering its health checks (every [`PROBE_INTERVAL`], or at
    /// once when a call could not reach it) is left out until it answers
    /// again, and a call that could not reach its instance is retried on
    /// another, within the call's deadline. A retried put writes the same
    /// value again; a retried delete may answer `existed = false` when its
    /// first attempt did delete.
    pub async fn connect(options: &ClientOptions) -> Result<Self, Error> {
        // Bad options are reported before the network is touched.
        client_id(options)?;
        authorization(options)?;
        let addresses = parse_list(&options.addr)?;
        let mut endpoints = Vec::with_capacity(addresses.len());
        for address in &addresses {
            endpoints.push((address.uri.clone(), addr::endpoint(address, options)?));
        }
        if endpoints.len() > 1 {
            let (channel, balanced) = balance::connect(endpoints, options.connect_timeout)
                .await
                .map_err(|e| match e {
                    Error::Connect { addr, message } => Error::Connect {
                        addr,
                        message: certificate_hint(message, options),
                    },
                    other => other,
                })?;
            let mut client = Self::from_channel(channel, options)?;
            client.balanced = Some(Arc::new(balanced));
            return Ok(client);
        }
        let Some((addr, endpoint)) = endpoints.pop() else {
            return Err(Error::Address {
                addr: options.addr.clone(),
                message: "no address".into(),
            });
        };
        let connect_error = |message: String| Error::Connect {
            addr: addr.clone(),
            message,
        };
        // `connect_timeout` bounds the TCP connect only; this bounds the
        // HTTP/2 handshake too, so a peer that accepts and stays silent
        // does not hang the caller.
        let channel = tokio::time::timeout(options.connect_timeout, endpoint.connect())
            .await
            .map_err(|_| {
                connect_error(format!(
                    "timed out after {}",
                    humantime::format_duration(options.connect_timeout)
                ))
            })?
            .map_err(|e| connect_error(certificate_hint(error_chain(&e), options)))?;
        Self::from_channel(channel, options)
    }

    /// A client over an existing channel (several clients may share one).
    pub fn from_channel(channel: Channel, options: &ClientOptions) -> Result<Self, Error> {
        let client_id = client_id(options)?;
        let authorization = authorization(options)?;
        let inner = KeyValueClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        Ok(Client {
            inner,
            client_id,
            authorization,
            timeout: options.timeout,
            balanced: None,
        })
    }

    /// Reads a key.
    pub async fn get(&self, namespace: &str, key: &str) -> Result<GetResponse, Status> {
        let request = GetRequest {
            namespace: namespace.into(),
            key: key.into(),
        };
        self.call(request, |mut c, r| async move { c.get(r).await })
            .await
    }

    /// Inserts or replaces a key. `ttl` of `None` means the namespace's
    /// default TTL; a TTL under a millisecond is rounded up to one.
    pub async fn put(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<(), Status> {
        let ttl_ms = ttl.map_or(0, |ttl| {
            u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        let request = PutRequest {
            namespace: namespace.into(),
            key: key.into(),
            value,
            ttl_ms,
        };
        self.call(request, |mut c, r| async move { c.put(r).await })
            .await
            .map(|_| ())
    }

    /// Removes a key; tells whether it existed.
    pub async fn delete(&self, namespace: &str, key: &str) -> Result<bool, Status> {
        let request = DeleteRequest {
            namespace: namespace.into(),
            key: key.into(),
        };
        self.call(request, |mut c, r| async move { c.delete(r).await })
            .await
            .map(|r| r.existed)
    }

    /// Tells whether a key exists.
    pub async fn exists(&self, namespace: &str, key: &str) -> Result<bool, Status> {
        let request = ExistsRequest {
            namespace: namespace.into(),
            key: key.into(),
        };
        self.call(request, |mut c, r| async move { c.exists(r).await })
            .await
            .map(|r| r.exists)
    }

    /// Reads one page of keys.
    pub async fn scan(&self, request: ScanRequest) -> Result<ScanResponse, Status> {
        self.call(request, |mut c, r| async move { c.scan(r).await })
            .await
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(timeout) = self.timeout {
            request.set_timeout(timeout);
        }
        if let Some(id) = &self.client_id {
            request.metadata_mut().insert(CLIENT_ID_HEADER, id.clone());
        }
        if let Some(auth) = &self.authorization {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        request
    }

    /// Makes a call, bounded by the deadline here too: a server that
    /// ignores `grpc-timeout` (or a connection that stalls) must not hang
    /// the caller. Balanced over several instances, a call that could not
    /// reach its instance is retried (on another, once the watchers have
    /// left the unreachable one out), up to twice per instance.
    async fn call<M, T, F, Fut>(&self, message: M, send: F) -> Result<T, Status>
    where
        M: Clone,
        F: Fn(KeyValueClient<Channel>, Request<M>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let attempts: u64 = self
            .balanced
            .as_ref()
            .map_or(1, |b| 2 * b.up().max(1) as u64 + 1);
        let attempt_all = async {
            let mut attempt = 1;
            loop {
                let result = send(self.inner.clone(), self.request(message.clone())).await;
                match (result, &self.balanced) {
                    (Err(status), Some(balanced))
                        if attempt < attempts && balance::unreached(&status) =>
                    {
                        balanced.wake();
                        // Room for the watchers to probe before the retry.
                        tokio::time::sleep(Duration::from_millis(2 * attempt)).await;
                        attempt += 1;
                    }
                    (result, _) => return result,
                }
            }
        };
        let response = match self.timeout {
            Some(timeout) => tokio::time::timeout(timeout, attempt_all)
                .await
                .map_err(|_| {
                    Status::deadline_exceeded(format!(
                        "no response within {}",
                        humantime::format_duration(timeout)
                    ))
                })?,
            None => attempt_all.await,
        };
        response.map(Response::into_inner)
    }
}

/// The `x-client-id` value of `options`, checked.
fn client_id(options: &ClientOptions) -> Result<Option<MetadataValue<Ascii>>, Error> {
    let Some(id) = options.client_id.as_deref() else {
        return Ok(None);
    };
    // `http` accepts any byte from 0x20 up in a header value, but gRPC
    // metadata (and the session names the gateway builds from it) is ASCII.
    let printable = !id.is_empty() && id.bytes().all(|b| (0x20..0x7f).contains(&b));
    printable
        .then(|| id.parse::<MetadataValue<Ascii>>().ok())
        .flatten()
        .map(Some)
        .ok_or_else(|| Error::ClientId(id.to_owned()))
}

/// The `authorization` value of `options`' token, checked (and marked
/// sensitive, so it is never printed by the transport's debug output).
fn authorization(options: &ClientOptions) -> Result<Option<MetadataValue<Ascii>>, Error> {
    let Some(token) = options.token.as_deref() else {
        return Ok(None);
    };
    let value = format!("Bearer {}", token.trim());
    let printable = !token.trim().is_empty() && value.bytes().all(|b| (0x20..0x7f).contains(&b));
    let mut value = printable
        .then(|| value.parse::<MetadataValue<Ascii>>().ok())
        .flatten()
        .ok_or(Error::Token)?;
    value.set_sensitive(true);
    Ok(Some(value))
}

/// A failed TLS connection says why the certificate was refused; this adds
/// what to do about it.
fn certificate_hint(message: String, options: &ClientOptions) -> String {
    if !message.contains("certificate") {
        return message;
    }
    match &options.ca {
        Some(ca) => format!(
            "{message} (the gateway's certificate is not signed by a CA of {}, or does not name the address)",
            ca.display()
        ),
        None => format!(
            "{message} (the gateway's certificate is not signed by a public CA: give the CA bundle that signed it, --ca PATH)"
        ),
    }
}

/// An error and its causes on one line: tonic's transport errors say only
/// "transport error" at the top.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

pub use crate::error::code_name;

/// `NOT_FOUND: unknown namespace "x"`: how `prism kv` reports a status.
pub fn describe(status: &Status) -> String {
    let message = status.message();
    if message.is_empty() {
        code_name(status.code()).to_owned()
    } else {
        format!("{}: {message}", code_name(status.code()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_addresses_get_the_http_scheme() {
        assert_eq!(normalize_addr("127.0.0.1:8980"), "http://127.0.0.1:8980");
        assert_eq!(
            normalize_addr("https://kv.example:443"),
            "https://kv.example:443"
        );
    }

    #[test]
    fn statuses_are_described_by_canonical_code_and_message() {
        assert_eq!(
            describe(&Status::not_found("unknown namespace \"x\"")),
            "NOT_FOUND: unknown namespace \"x\""
        );
        assert_eq!(describe(&Status::unavailable("")), "UNAVAILABLE");
    }

    #[tokio::test]
    async fn client_ids_that_are_not_ascii_are_rejected() {
        let options = ClientOptions {
            client_id: Some("caf\u{e9}".into()),
            ..ClientOptions::default()
        };
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        assert!(matches!(
            Client::from_channel(channel, &options),
            Err(Error::ClientId(_))
        ));
    }
}
