//! Prism: a data-access gateway. One gRPC key-value API, per namespace routed
//! to a backend pool actor (embedded SQLite, memory, ...), with the same
//! semantics, deadlines, backpressure, supervision and draining shutdown for
//! every backend.

pub mod auth;
pub mod backend;
pub mod bench;
pub mod cli;
pub mod client;
pub mod error;
pub mod grpc;
pub mod http;
pub mod kv;
pub mod metrics;
pub mod pool;
pub mod proto;
pub mod server;
pub mod session;
pub mod settings;
pub mod signal;
pub mod telemetry;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod tls;

pub use server::{run, Error, Gateway, Listeners};
pub use settings::Settings;
