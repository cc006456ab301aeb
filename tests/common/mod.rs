//! Shared helpers: start a real gateway in-process on 127.0.0.1:0 and talk to
//! it over gRPC.
#![allow(dead_code)]

pub mod faulty;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use prism::backend::Connector;
use prism::proto::key_value_client::KeyValueClient;
use prism::{Gateway, Listeners, Settings};
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// Settings from a TOML text, parsed the way the settings files are.
pub fn settings(toml: &str) -> Settings {
    Settings::from_toml(toml).unwrap_or_else(|e| panic!("test settings: {e}"))
}

/// Settings with a memory namespace `cache`, an SQLite namespace `default`
/// in `dir`, and `extra` appended.
pub fn base_settings(dir: &std::path::Path, extra: &str) -> Settings {
    settings(&format!(
        r#"
[server]
grpc_addr = "127.0.0.1:0"
shutdown_grace = "10s"

[supervisor]
backoff_initial = "10ms"
backoff_max = "100ms"

[backends.embedded]
kind = "sqlite"
path = "{}"

[backends.memory]
kind = "memory"

[namespaces.default]
backend = "embedded"

[namespaces.cache]
backend = "memory"
{extra}
"#,
        dir.join("prism.db").display()
    ))
}

/// A gateway running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The admin plane (HTTP) address.
    pub http_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<Result<(), prism::Error>>>,
}

impl TestServer {
    pub async fn start(settings: Settings) -> anyhow::Result<Self> {
        Self::start_with(settings, Vec::new()).await
    }

    pub async fn start_with(
        settings: Settings,
        connectors: Vec<(&str, Arc<dyn Connector>)>,
    ) -> anyhow::Result<Self> {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind")?;
        let addr = grpc.local_addr()?;
        let http = std::net::TcpListener::bind("127.0.0.1:0").context("bind http")?;
        let http_addr = http.local_addr()?;
        let mut gw = Gateway::new(settings);
        for (name, c) in connectors {
            gw = gw.connector(name, c);
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(gw.serve(
            Listeners {
                grpc,
                http: Some(http),
            },
            async move {
                let _ = stopped.await;
            },
        ));
        let server = TestServer {
            addr,
            http_addr,
            stop: Some(stop),
            done: Some(done),
        };
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The admin plane's base URL, `http://127.0.0.1:<port>`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    pub async fn client(&self) -> anyhow::Result<KeyValueClient<Channel>> {
        let channel = Channel::from_shared(self.url())?
            .connect()
            .await
            .context("connect")?;
        Ok(KeyValueClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }

    /// Signals the drain and waits for the gateway to return.
    pub async fn stop(mut self) -> Result<(), prism::Error> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.done.take() {
            Some(d) => d.await.expect("server task"),
            None => Ok(()),
        }
    }

    /// Begins the drain without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    pub async fn join(mut self) -> Result<(), prism::Error> {
        match self.done.take() {
            Some(d) => d.await.expect("server task"),
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A request with `x-client-id` set.
pub fn as_client<T>(client: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("x-client-id", client.parse().expect("ascii client id"));
    r
}
