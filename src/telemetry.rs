//! Logging: a `tracing` subscriber writing to stderr, as text or JSON lines,
//! filtered by `RUST_LOG` when set, else by `log.level`.

use std::io::IsTerminal;

use tracing_subscriber::filter::EnvFilter;

use crate::settings::{log_filter, LogFormat, LogSettings};

/// Errors of [`init`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The filter does not parse. `key` is `log.level` or `RUST_LOG`.
    #[error("invalid log filter in {key}: {message}")]
    Filter {
        /// Where the filter came from: `log.level` or `RUST_LOG`.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A global subscriber is already installed.
    #[error("cannot install the log subscriber: {0}")]
    Init(String),
}

/// Installs the global subscriber. Call once, after settings are validated.
/// `RUST_LOG`, when set and non-empty, replaces `log.level` (standard
/// `EnvFilter` syntax).
pub fn init(log: &LogSettings) -> Result<(), Error> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(&directives)
            .map_err(|e| Error::Filter {
                key: "RUST_LOG",
                message: format!("{directives:?}: {e}"),
            })?,
        _ => log_filter(&log.level).map_err(|message| Error::Filter {
            key: "log.level",
            message,
        })?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match log.format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    installed.map_err(|e| Error::Init(e.to_string()))
}
