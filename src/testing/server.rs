//! A gateway running in the test's process, on ports the OS picks.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::oneshot;
use tonic::transport::Channel;

use crate::backend::Connector;
use crate::proto::key_value_client::KeyValueClient;
use crate::{Gateway, Listeners, Settings};

/// A real gateway on `127.0.0.1:0` (gRPC and the HTTP admin plane), served
/// by a task of the test's runtime until [`stop`](TestServer::stop) (or
/// drop) begins its drain.
pub struct TestServer {
    /// The gRPC address.
    pub addr: SocketAddr,
    /// The admin plane (HTTP) address.
    pub http_addr: SocketAddr,
    /// Whether both listeners serve TLS (`[server.tls]` in the settings).
    pub tls: bool,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<Result<(), crate::Error>>>,
}

impl TestServer {
    /// Starts a gateway with `settings`; the listen addresses in them are
    /// ignored. With `[server.tls]` both listeners serve TLS, and
    /// [`url`](Self::url) and [`http_url`](Self::http_url) are `https://`.
    pub async fn start(settings: Settings) -> std::io::Result<Self> {
        Self::start_with(settings, Vec::new()).await
    }

    /// Starts a gateway with `settings`, each named backend served by its
    /// connector instead of the one its settings describe.
    pub async fn start_with(
        settings: Settings,
        connectors: Vec<(&str, Arc<dyn Connector>)>,
    ) -> std::io::Result<Self> {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = grpc.local_addr()?;
        let http = std::net::TcpListener::bind("127.0.0.1:0")?;
        let http_addr = http.local_addr()?;
        let tls = settings.server.tls.is_some();
        let mut gateway = Gateway::new(settings);
        for (name, connector) in connectors {
            gateway = gateway.connector(name, connector);
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(gateway.serve(
            Listeners {
                grpc,
                http: Some(http),
            },
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(TestServer {
            addr,
            http_addr,
            tls,
            stop: Some(stop),
            done: Some(done),
        })
    }

    /// The gRPC base URL, `http://127.0.0.1:<port>` (`https://` with TLS).
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), self.addr)
    }

    /// The admin plane's base URL, `http://127.0.0.1:<port>` (`https://`
    /// with TLS).
    pub fn http_url(&self) -> String {
        format!("{}://{}", self.scheme(), self.http_addr)
    }

    fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// A connected plaintext client, accepting messages up to 64 MiB (a TLS
    /// server needs a client with the test's CA, built by the test).
    pub async fn client(&self) -> Result<KeyValueClient<Channel>, tonic::transport::Error> {
        Ok(KeyValueClient::connect(self.url())
            .await?
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }

    /// Signals the drain and waits for the gateway to return.
    pub async fn stop(mut self) -> Result<(), crate::Error> {
        self.begin_stop();
        self.wait().await
    }

    /// Begins the drain without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Waits for the gateway to return (after a drain began elsewhere, e.g.
    /// with [`begin_stop`](Self::begin_stop)).
    pub async fn join(mut self) -> Result<(), crate::Error> {
        self.wait().await
    }

    async fn wait(&mut self) -> Result<(), crate::Error> {
        match self.done.take() {
            // A panic of the server task is a failed test.
            Some(done) => done.await.unwrap_or_else(|e| panic!("server task: {e}")),
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.begin_stop();
    }
}
