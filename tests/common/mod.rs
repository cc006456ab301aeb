//! The one harness every test file shares.
//!
//! - here: test settings, settings directories, the in-process gateway
//!   ([`TestServer`]), [`eventually`] and [`free_port`];
//! - [`requests`]: gRPC request builders and clients;
//! - [`http`]: the admin plane over HTTP (reqwest);
//! - [`binary`]: the real `prism` binary: run a command, or serve and
//!   follow its log, signal it and wait for its exit;
//! - [`db`]: the shared PostgreSQL and Redis (URLs, unique names, clean-up,
//!   row locks);
//! - [`throwaway`]: PostgreSQL and Redis servers of a test's own, to stop
//!   and start;
//! - [`faulty`]: a backend that is slow, blocks, fails or panics on purpose.
#![allow(dead_code)]

pub mod binary;
pub mod db;
pub mod faulty;
pub mod http;
pub mod requests;
#[cfg(unix)]
pub mod throwaway;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use prism::backend::Connector;
use prism::proto::key_value_client::KeyValueClient;
use prism::{Gateway, Listeners, Settings};
use tokio::sync::oneshot;
use tonic::transport::Channel;

// Where the conformance suite finds it.
#[allow(unused_imports)]
pub use requests::as_client;

/// Settings from a TOML text, parsed the way the settings files are. Every
/// test builds its in-process settings here.
pub fn settings(toml: &str) -> Settings {
    Settings::from_toml(toml).unwrap_or_else(|e| panic!("test settings: {e}"))
}

/// Settings with a memory namespace `cache`, an SQLite namespace `default`
/// in `dir`, and `extra` appended.
pub fn base_settings(dir: &Path, extra: &str) -> Settings {
    settings(&format!(
        r#"
[server]
grpc_addr = "127.0.0.1:0"
shutdown_grace = "10s"
drain_delay = "0s"

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

/// The repository's `settings/` directory.
pub fn repo_settings() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("settings")
}

/// A settings directory (for the binary or the loader) holding
/// `default_toml` as its `default.toml`.
pub fn settings_dir(default_toml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("default.toml"), default_toml).expect("write default.toml");
    dir
}

/// A loopback port that was free a moment ago (for servers that cannot be
/// handed a bound listener).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
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
        requests::connect(self.addr).await
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
