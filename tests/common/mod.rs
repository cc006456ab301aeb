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
//! - [`cluster`]: a throwaway Redis Cluster (three masters, three replicas);
//! - [`throwaway`]: PostgreSQL and Redis servers of a test's own, to stop
//!   and start;
//! - [`faulty`]: a backend that is slow, blocks, fails or panics on purpose.
#![allow(dead_code)]

pub mod binary;
#[cfg(unix)]
pub mod cluster;
pub mod db;
pub mod faulty;
pub mod http;
pub mod requests;
#[cfg(unix)]
pub mod throwaway;

use std::path::{Path, PathBuf};

use prism::Settings;

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

/// The in-process gateway and the poll-until helper come from the
/// library's `test-util` feature, which third-party backends use too.
#[allow(unused_imports)]
pub use prism::testing::{eventually, TestServer};
