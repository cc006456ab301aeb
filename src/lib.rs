//! Prism: a data-access gateway. One gRPC key-value API, per namespace routed
//! to a backend pool actor (embedded SQLite, memory, ...), with the same
//! semantics, deadlines, backpressure, supervision and draining shutdown for
//! every backend.

pub mod backend;
pub mod proto;
pub mod settings;

use std::future::Future;

use tokio::net::TcpListener;

pub use settings::Settings;

/// The bound listeners Prism serves on. Binding happens before [`run`] so
/// that tests can bind port 0 and settings are validated before any bind.
pub struct Listeners {
    /// The gRPC listener.
    pub grpc: TcpListener,
}

/// Errors that end [`run`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Serve(String),
    /// The supervision tree gave up (restart intensity exceeded at the root).
    #[error("supervision tree failed: {0}")]
    Supervision(String),
}

/// Serves until `shutdown` resolves, then drains and returns.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let _ = (settings, listeners);
    shutdown.await;
    Ok(())
}
