//! The gRPC listener's TLS connections. tonic's own TLS takes a fixed
//! identity; this accept loop uses [`ServerCerts`]' configuration instead,
//! so a reload reaches new gRPC connections too. tonic reads the peer's
//! certificates from the accepted `TlsStream` (`Request::peer_certs`).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::{Stream, StreamExt};
use tracing::debug;

use super::ServerCerts;
use crate::server::listener::Incoming;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshaken connections waiting for the server to take them.
const QUEUE: usize = 64;

/// The TLS connections of a listener. Each handshake runs in a task of its
/// own, so a slow or silent client holds up no one else; connections whose
/// handshake fails (a plaintext client, no or a wrong client certificate)
/// or times out are closed and logged at debug level. Dropping this stops
/// accepting and closes the listener.
pub struct TlsIncoming {
    connections: mpsc::Receiver<TlsStream<TcpStream>>,
    accept: tokio::task::JoinHandle<()>,
}

impl TlsIncoming {
    /// Accepts TLS connections on `listener` with the gRPC configuration of
    /// `certs` (HTTP/2). Must be called inside a tokio runtime.
    pub fn new(listener: TcpListener, certs: &ServerCerts) -> Self {
        let acceptor = TlsAcceptor::from(certs.grpc_config());
        let (tx, connections) = mpsc::channel(QUEUE);
        let accept = tokio::spawn(accept(Incoming::new(listener), acceptor, tx));
        TlsIncoming {
            connections,
            accept,
        }
    }
}

impl TlsIncoming {
    /// A handle that stops accepting and closes the listener, for the drain:
    /// connections already handshaken stay queued for the server.
    pub fn closer(&self) -> tokio::task::AbortHandle {
        self.accept.abort_handle()
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Stream for TlsIncoming {
    type Item = Result<TlsStream<TcpStream>, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.connections.poll_recv(cx).map(|c| c.map(Ok))
    }
}

async fn accept(
    mut incoming: Incoming,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<TlsStream<TcpStream>>,
) {
    loop {
        let stream = tokio::select! {
            biased;
            _ = tx.closed() => return,
            stream = incoming.next() => stream,
        };
        // `Incoming` retries failed accepts itself and never ends.
        let Some(Ok(stream)) = stream else { return };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let peer = stream.peer_addr().ok();
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    // The server may have stopped accepting meanwhile.
                    let _ = tx.send(tls).await;
                }
                Ok(Err(e)) => debug!(peer = ?peer, error = %e, "grpc tls handshake failed"),
                Err(_) => debug!(peer = ?peer, "grpc tls handshake timed out"),
            }
        });
    }
}
