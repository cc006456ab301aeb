//! The `prism` binary: parses the command line and hands over to the library.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use prism::cli::{self, Cli, Command, EXIT_FAILURE, EXIT_UNAVAILABLE, EXIT_USAGE};
use prism::{settings, signal, telemetry, Listeners};
use tokio::net::TcpListener;
use tracing::{error, info};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with 0; usage errors to stderr with 64.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    let code = match cli.command_to_run() {
        Command::Serve(_) => serve(cli.settings_dir()).await,
        Command::CheckConfig(_) => cli::check_config(cli.settings_dir()),
        Command::Kv(args) => cli::kv(&args).await,
        Command::Bench(args) => cli::bench(&args).await,
        Command::Auth(command) => cli::auth(&command),
    };
    ExitCode::from(code)
}

/// Loads and validates the settings, then binds, then serves: a bad setting
/// exits 64 before any port is bound.
async fn serve(dir: &Path) -> u8 {
    let settings = match settings::load(dir) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    if let Err(e) = telemetry::init(&settings.log) {
        eprintln!("error: {e}");
        return match e {
            telemetry::Error::Filter { .. } => EXIT_USAGE,
            telemetry::Error::Init(_) => EXIT_FAILURE,
        };
    }
    // Installed before anything slow, so that a SIGTERM during startup
    // already means a graceful stop rather than the default abrupt exit.
    // SIGHUP re-reads the TLS certificates (the listeners share them with
    // this copy of the settings); a failed reload is logged and keeps the
    // ones in use.
    let reload = settings.server.tls.clone().map(|tls| {
        Box::new(move || {
            let _ = tls.reload();
        }) as signal::Reload
    });
    let shutdown = match signal::shutdown_signal(reload).context("installing the signal handlers") {
        Ok(shutdown) => shutdown,
        Err(e) => {
            error!(error = %format!("{e:#}"), "cannot start");
            return EXIT_FAILURE;
        }
    };
    info!(settings = %dir.display(), version = env!("CARGO_PKG_VERSION"), "prism starting");

    let addr = settings.server.grpc_addr;
    let grpc = match TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind server.grpc_addr {addr}"))
    {
        Ok(listener) => listener,
        Err(e) => {
            error!(key = "server.grpc_addr", %addr, error = %format!("{e:#}"), "cannot bind the grpc listener");
            return EXIT_UNAVAILABLE;
        }
    };
    let addr = settings.server.http_addr;
    let http = match std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot bind server.http_addr {addr}"))
    {
        Ok(listener) => listener,
        Err(e) => {
            error!(key = "server.http_addr", %addr, error = %format!("{e:#}"), "cannot bind the http listener");
            return EXIT_UNAVAILABLE;
        }
    };
    let listeners = Listeners {
        grpc,
        http: Some(http),
    };
    match prism::run(settings, listeners, shutdown)
        .await
        .context("prism stopped with an error")
    {
        Ok(()) => 0,
        Err(e) => {
            error!(error = %format!("{e:#}"), "prism failed");
            EXIT_FAILURE
        }
    }
}
