//! TLS on both listeners (`[server.tls]`): rustls with the ring provider,
//! TLS 1.2 and 1.3 only.
//!
//! - `certs.rs`: the certificate, key and client CA files, loaded and
//!   checked at settings load ([`ServerCerts`]), re-read by
//!   [`ServerCerts::reload`], and the rustls configurations of both
//!   listeners, which read the current files through a swappable resolver
//!   and client verifier;
//! - `incoming.rs`: the gRPC listener's TLS accept loop ([`TlsIncoming`]);
//! - `name.rs`: the subject common name of a client certificate
//!   ([`cert_common_name`]).
//!
//! A verified client certificate's common name reaches the request path as
//! a [`PeerCommonName`]: on gRPC through [`peer_common_name`] (from tonic's
//! `Request::peer_certs`), on REST in the connection data of the request
//! (`HttpRequest::conn_data::<PeerCommonName>()`), put there by
//! [`stash_peer_common_name`].

mod certs;
mod incoming;
mod name;

use std::any::Any;

pub use certs::{CertFiles, Error, ServerCerts};
pub use incoming::TlsIncoming;
pub use name::cert_common_name;

/// The subject common name (CN) of the certificate a client presented and
/// the listener verified against `server.tls.client_ca`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerCommonName(pub String);

/// The common name of the verified client certificate of a gRPC request:
/// `None` without TLS, without a client certificate, or when the
/// certificate has no single CN.
pub fn peer_common_name<T>(request: &tonic::Request<T>) -> Option<PeerCommonName> {
    let certs = request.peer_certs()?;
    certs
        .first()
        .and_then(|c| cert_common_name(c))
        .map(PeerCommonName)
}

/// actix-web's `on_connect` hook: stores the common name of a TLS
/// connection's verified client certificate as a [`PeerCommonName`] in the
/// connection's data, which every request on it reads with
/// `HttpRequest::conn_data::<PeerCommonName>()`.
pub fn stash_peer_common_name(conn: &dyn Any, data: &mut actix_web::dev::Extensions) {
    type Tls = actix_tls::accept::rustls_0_23::TlsStream<actix_web::rt::net::TcpStream>;
    let Some(tls) = conn.downcast_ref::<Tls>() else {
        return;
    };
    let (_, session) = tls.get_ref();
    if let Some(cn) = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| cert_common_name(c))
    {
        data.insert(PeerCommonName(cn));
    }
}
