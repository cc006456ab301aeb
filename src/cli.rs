//! The command line: `prism [serve]`, `prism check-config`, `prism kv ...`
//! and `prism bench ...`. `main.rs` parses it and dispatches; the commands
//! other than `serve` run here.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use tonic::{Code, Status};

use crate::bench::{self, BenchOptions, Op};
use crate::client::{self, describe, Client, ClientOptions};
use crate::proto::ScanRequest;
use crate::settings::{self, BackendKind, Settings};

/// Success.
pub const EXIT_OK: u8 = 0;
/// `kv`: the key (or, as gRPC NOT_FOUND, the namespace) does not exist.
pub const EXIT_NOT_FOUND: u8 = 1;
/// `serve`: the server failed after it started.
pub const EXIT_FAILURE: u8 = 1;
/// `kv`, `bench`: any other gRPC error, a connection failure, an I/O error.
pub const EXIT_ERROR: u8 = 2;
/// A bad command line or invalid settings (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;
/// `serve`: `server.grpc_addr` or `server.http_addr` cannot be bound (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// `serve`: a second signal arrived during the drain (128 + SIGINT).
pub const EXIT_FORCED: u8 = 130;

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    success
  1    kv: key not found (get, exists) or NOT_FOUND from the gateway; serve: the server failed
  2    kv, bench: any other gRPC error, a connection failure or an I/O error
  64   bad command line, or invalid settings (the message names the key)
  69   serve: cannot bind server.grpc_addr or server.http_addr
  130  serve: a second SIGTERM/SIGINT/SIGQUIT arrived while draining";

/// `prism`: a data-access gateway.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "prism",
    version,
    about = "Prism: one gRPC key-value API over SQLite, PostgreSQL, Redis and memory backends",
    after_help = EXIT_CODES_HELP
)]
pub struct Cli {
    /// Settings directory: default.toml, then $PRISM_ENV.toml, then PRISM__<SECTION>__<KEY> variables.
    #[arg(
        long,
        value_name = "DIR",
        env = "PRISM_SETTINGS",
        default_value = "settings"
    )]
    pub settings: PathBuf,
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// The command to run: `serve` when none was given.
    pub fn command_to_run(&self) -> Command {
        self.command
            .clone()
            .unwrap_or(Command::Serve(SettingsArg { settings: None }))
    }

    /// The settings directory: the command's `--settings`, else the
    /// top-level one (or `PRISM_SETTINGS`, or `settings`).
    pub fn settings_dir(&self) -> &Path {
        let own = match &self.command {
            Some(Command::Serve(arg)) | Some(Command::CheckConfig(arg)) => arg.settings.as_deref(),
            _ => None,
        };
        own.unwrap_or(&self.settings)
    }
}

/// The commands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run the gateway until SIGTERM/SIGINT/SIGQUIT, then drain (the default command).
    Serve(SettingsArg),
    /// Load and validate the settings and print a summary; binds nothing.
    CheckConfig(SettingsArg),
    /// Call the KeyValue API of a running gateway.
    Kv(KvArgs),
    /// Load-test a running gateway; prints throughput and latency.
    Bench(BenchArgs),
    /// Make tokens for principals ([auth.principals.<name>] token_sha256).
    #[command(subcommand)]
    Auth(AuthCommand),
}

/// `prism auth`
#[derive(Debug, Clone, Subcommand)]
pub enum AuthCommand {
    /// Read a token on stdin and print its token_sha256.
    HashToken,
    /// Print a fresh random token (256 bits) and its token_sha256.
    NewToken,
}

/// `prism auth ...`: prints to stdout and returns the exit code.
pub fn auth(command: &AuthCommand) -> u8 {
    match command {
        AuthCommand::HashToken => {
            let mut token = String::new();
            if let Err(e) = io::Read::read_to_string(&mut io::stdin(), &mut token) {
                eprintln!("error: cannot read the token from stdin: {e}");
                return EXIT_USAGE;
            }
            if token.trim().is_empty() {
                eprintln!(
                    "error: no token on stdin; e.g. echo -n \"$TOKEN\" | prism auth hash-token"
                );
                return EXIT_USAGE;
            }
            println!("{}", crate::auth::hash_token(&token));
            EXIT_OK
        }
        AuthCommand::NewToken => {
            let (token, hash) = crate::auth::new_token();
            println!("token        = {token}");
            println!("token_sha256 = {hash}");
            EXIT_OK
        }
    }
}

/// `--settings` after the command name.
#[derive(Debug, Clone, Args)]
pub struct SettingsArg {
    /// Settings directory [default: $PRISM_SETTINGS, else "settings"].
    #[arg(long, value_name = "DIR")]
    pub settings: Option<PathBuf>,
}

/// The longest `--timeout` of `kv` and `bench`: a key-value request that
/// may take longer than an hour is a mistake, and larger values overflow
/// the clock arithmetic of a deadline.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// Parses a `--timeout`: a humantime duration, more than 0 and at most
/// [`MAX_TIMEOUT`].
fn parse_timeout(value: &str) -> Result<Duration, String> {
    let timeout = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if timeout.is_zero() {
        return Err("the timeout must be more than 0".into());
    }
    if timeout > MAX_TIMEOUT {
        return Err(format!(
            "the timeout must be at most {}",
            humantime::format_duration(MAX_TIMEOUT)
        ));
    }
    Ok(timeout)
}

/// The longest `bench --duration` and `--warmup`: a day. Larger values
/// would overflow the clock arithmetic of the run's end.
pub const MAX_BENCH_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// Parses a `bench --duration` or `--warmup`: at most [`MAX_BENCH_PERIOD`].
fn parse_bench_period(value: &str) -> Result<Duration, String> {
    let period = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if period > MAX_BENCH_PERIOD {
        return Err(format!(
            "must be at most {}",
            humantime::format_duration(MAX_BENCH_PERIOD)
        ));
    }
    Ok(period)
}

/// `prism kv`.
#[derive(Debug, Clone, Args)]
#[command(after_help = EXIT_CODES_HELP)]
pub struct KvArgs {
    /// Gateway address: http://host:port, https://host:port or host:port; several instances comma-separated (a:1,b:2), requests balanced over those that answer.
    #[arg(long, global = true, env = "PRISM_ADDR", default_value = client::DEFAULT_ADDR)]
    pub addr: String,
    /// https:// only: PEM CA bundle that signed the gateway's certificate [default: the webpki roots].
    #[arg(long, global = true, env = "PRISM_CA", value_name = "PATH")]
    pub ca: Option<PathBuf>,
    /// https:// only: PEM client certificate for mutual TLS (with --key).
    #[arg(
        long = "cert",
        global = true,
        env = "PRISM_CERT",
        value_name = "PATH",
        id = "tls_cert",
        requires = "tls_key"
    )]
    pub cert: Option<PathBuf>,
    /// https:// only: PEM private key of --cert.
    #[arg(
        long = "key",
        global = true,
        env = "PRISM_KEY",
        value_name = "PATH",
        id = "tls_key",
        requires = "tls_cert"
    )]
    pub key: Option<PathBuf>,
    /// Sent as x-client-id metadata (the session the gateway admits the request under).
    #[arg(long, global = true, env = "PRISM_CLIENT_ID")]
    pub client_id: Option<String>,
    /// Bearer token of a principal (when the gateway runs with auth.mode = "token").
    #[arg(long, global = true, env = "PRISM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Deadline of each request (sent as grpc-timeout), e.g. 500ms, 5s; more than 0, at most 1h.
    #[arg(long, global = true, default_value = "5s", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// Print JSON (values in base64) instead of raw values.
    #[arg(long, global = true)]
    pub json: bool,
    /// The operation.
    #[command(subcommand)]
    pub op: KvOp,
}

/// The KeyValue operations.
#[derive(Debug, Clone, Subcommand)]
pub enum KvOp {
    /// Print a key's value as raw bytes (no newline added); exit 1 if absent.
    Get {
        /// Namespace.
        namespace: String,
        /// Key.
        key: String,
    },
    /// Insert or replace a key.
    Put {
        /// Namespace.
        namespace: String,
        /// Key.
        key: String,
        /// The value; read from stdin when omitted or "-".
        #[arg(allow_hyphen_values = true)]
        value: Option<OsString>,
        /// Time to live, e.g. 10s, 5m; the namespace's default TTL when omitted.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Remove a key (idempotent); print whether it existed.
    Delete {
        /// Namespace.
        namespace: String,
        /// Key.
        key: String,
    },
    /// Print whether a key exists; exit 1 if it does not.
    Exists {
        /// Namespace.
        namespace: String,
        /// Key.
        key: String,
    },
    /// List keys in ascending order as `key<TAB>value` lines (values raw).
    Scan {
        /// Namespace.
        namespace: String,
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Page size (the gateway's default is 100, its maximum 1000).
        #[arg(long)]
        limit: Option<u32>,
        /// Start from this cursor (printed on stderr after a page that is not the last).
        #[arg(long)]
        cursor: Option<String>,
        /// Print keys only.
        #[arg(long)]
        keys_only: bool,
        /// Follow cursors to the end of the scan.
        #[arg(long)]
        all: bool,
    },
}

/// `prism bench`.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Mixed is 90% get, 10% put. Keys are pre-populated for get and mixed.\n\n\
                        Exit codes: 0 done (the report counts failed requests), 2 cannot connect or populate, 64 bad arguments."
)]
pub struct BenchArgs {
    /// Gateway address: http://host:port, https://host:port or host:port; several instances comma-separated (a:1,b:2), requests balanced over those that answer.
    #[arg(long, env = "PRISM_ADDR", default_value = client::DEFAULT_ADDR)]
    pub addr: String,
    /// https:// only: PEM CA bundle that signed the gateway's certificate [default: the webpki roots].
    #[arg(long, env = "PRISM_CA", value_name = "PATH")]
    pub ca: Option<PathBuf>,
    /// https:// only: PEM client certificate for mutual TLS (with --key).
    #[arg(
        long = "cert",
        env = "PRISM_CERT",
        value_name = "PATH",
        id = "tls_cert",
        requires = "tls_key"
    )]
    pub cert: Option<PathBuf>,
    /// https:// only: PEM private key of --cert.
    #[arg(
        long = "key",
        env = "PRISM_KEY",
        value_name = "PATH",
        id = "tls_key",
        requires = "tls_cert"
    )]
    pub key: Option<PathBuf>,
    /// Namespace to load.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Operation: get, put, or mixed (90% get, 10% put).
    #[arg(long, value_enum, default_value = "get")]
    pub op: Op,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// gRPC connections the workers share [default: min(concurrency, 4)].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: Option<u32>,
    /// How long to measure; at most 24h.
    #[arg(long, default_value = "10s", value_parser = parse_bench_period)]
    pub duration: Duration,
    /// How long to run before measuring; at most 24h.
    #[arg(long, default_value = "1s", value_parser = parse_bench_period)]
    pub warmup: Duration,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub keys: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 128)]
    pub value_size: usize,
    /// Deadline of each request; more than 0, at most 1h.
    #[arg(long, default_value = "5s", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// Sent as x-client-id metadata.
    #[arg(long, env = "PRISM_CLIENT_ID")]
    pub client_id: Option<String>,
    /// Bearer token of a principal (when the gateway runs with auth.mode = "token").
    #[arg(long, env = "PRISM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

impl BenchArgs {
    /// The library options these arguments stand for.
    pub fn options(&self) -> BenchOptions {
        let concurrency = self.concurrency as usize;
        BenchOptions {
            client: ClientOptions {
                addr: self.addr.clone(),
                client_id: self.client_id.clone(),
                timeout: Some(self.timeout),
                token: self.token.clone(),
                ca: self.ca.clone(),
                cert: self.cert.clone(),
                key: self.key.clone(),
                ..ClientOptions::default()
            },
            namespace: self.namespace.clone(),
            op: self.op,
            concurrency,
            connections: self.connections.map_or(concurrency.min(4), |c| c as usize),
            duration: self.duration,
            warmup: self.warmup,
            keys: self.keys,
            value_size: self.value_size,
            progress: true,
        }
    }
}

/// `prism check-config`: loads and validates the settings in `dir`, prints
/// a summary on stdout, and returns the exit code (0, or 64 with the error
/// on stderr).
pub fn check_config(dir: &Path) -> u8 {
    match settings::load(dir) {
        Ok(settings) => {
            let env_name = std::env::var(settings::ENV_NAME_VAR).ok();
            let files = settings::files(dir, env_name.as_deref()).unwrap_or_default();
            let mut overrides: Vec<String> = std::env::vars_os()
                .filter_map(|(name, _)| name.into_string().ok())
                .filter(|name| name.to_ascii_uppercase().starts_with("PRISM__"))
                .collect();
            overrides.sort();
            print!("{}", summary(&settings, &files, &overrides));
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_USAGE
        }
    }
}

/// The `check-config` summary: layers, listener, backends, namespaces.
pub fn summary(settings: &Settings, files: &[PathBuf], overrides: &[String]) -> String {
    let mut out = String::new();
    let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    out.push_str(&format!("settings ok: {}\n", files.join(", ")));
    if !overrides.is_empty() {
        out.push_str(&format!("overridden by: {}\n", overrides.join(", ")));
    }
    out.push_str(&format!(
        "grpc: {} (shutdown grace {})\n",
        settings.server.grpc_addr,
        humantime::format_duration(settings.server.shutdown_grace)
    ));
    out.push_str(&format!(
        "http: {} (admin plane)\n",
        settings.server.http_addr
    ));
    out.push_str("backends:\n");
    for (name, backend) in &settings.backends {
        let detail = match &backend.kind {
            BackendKind::Sqlite(s) => format!(
                " path={} busy_timeout={}",
                s.path.display(),
                humantime::format_duration(s.busy_timeout)
            ),
            BackendKind::Memory | BackendKind::Custom(_) => String::new(),
            BackendKind::Postgres(s) => format!(" schema={} table={}", s.schema, s.table),
            BackendKind::Redis(s) => format!(" key_prefix={}", s.key_prefix),
            BackendKind::RedisCluster(s) => {
                format!(" key_prefix={} shards={}", s.key_prefix, s.shards)
            }
        };
        out.push_str(&format!(
            "  {name:<16} {:<7} pool_size={} mailbox={}{detail}\n",
            backend.kind_name(),
            backend.pool.pool_size,
            backend.pool.mailbox
        ));
    }
    out.push_str("namespaces:\n");
    for (name, ns) in &settings.namespaces {
        let ttl = ns.default_ttl.map_or("none".to_owned(), |t| {
            humantime::format_duration(t).to_string()
        });
        out.push_str(&format!(
            "  {name:<16} -> {:<16} timeout={} default_ttl={ttl} max_value_size={}\n",
            ns.backend,
            humantime::format_duration(ns.timeout),
            ns.max_value_size
        ));
    }
    out
}

/// `prism bench`: runs the benchmark and prints its report; returns the
/// exit code.
pub async fn bench(args: &BenchArgs) -> u8 {
    let options = args.options();
    let addresses = match check_addr(&args.addr) {
        Ok(addresses) => addresses,
        Err(message) => {
            eprintln!("error: {message}");
            return EXIT_USAGE;
        }
    };
    if !args.json {
        eprintln!(
            "running {} against {} namespace {} for {} (+{} warmup), {} workers on {} connections",
            options.op.as_str(),
            addresses,
            options.namespace,
            humantime::format_duration(options.duration),
            humantime::format_duration(options.warmup),
            options.concurrency,
            options.connections
        );
    }
    match bench::run(&options).await {
        Ok(report) => {
            let printed = if args.json {
                serde_json::to_string_pretty(&report).map(|json| println!("{json}"))
            } else {
                print!("{report}");
                Ok(())
            };
            match printed {
                Ok(()) => EXIT_OK,
                Err(e) => {
                    eprintln!("error: {e}");
                    EXIT_ERROR
                }
            }
        }
        Err(e) => {
            let code = match &e {
                bench::Error::Options(_) => EXIT_USAGE,
                bench::Error::Connect(c) if c.code() == Code::InvalidArgument => EXIT_USAGE,
                _ => EXIT_ERROR,
            };
            match &e {
                bench::Error::Connect(c) => {
                    eprintln!("error: {}: {c}", client::code_name(c.code()))
                }
                other => eprintln!("error: {other}"),
            }
            code
        }
    }
}

/// Checks an `--addr` list before anything connects: a bad list is a
/// usage error naming `--addr` and the bad element. Returns the list,
/// normalized, for messages.
fn check_addr(list: &str) -> Result<String, String> {
    match client::parse_list(list) {
        Ok(addresses) => Ok(addresses
            .iter()
            .map(|a| a.uri.as_str())
            .collect::<Vec<_>>()
            .join(",")),
        Err(e) => Err(format!("--addr: {e}")),
    }
}

/// Why a `kv` command failed.
enum Failure {
    /// The command line cannot be run.
    Usage(String),
    /// The key is absent (get, exists).
    Absent(String),
    /// The gateway answered with an error.
    Status(Status),
    /// No client could be built.
    Client(client::Error),
    /// Reading stdin or writing stdout failed.
    Io(&'static str, io::Error),
}

impl Failure {
    fn report(&self) -> u8 {
        match self {
            Failure::Usage(message) => {
                eprintln!("error: {message}");
                EXIT_USAGE
            }
            Failure::Absent(what) => {
                eprintln!("not found: {what}");
                EXIT_NOT_FOUND
            }
            Failure::Status(status) => {
                eprintln!("error: {}", describe(status));
                if status.code() == Code::NotFound {
                    EXIT_NOT_FOUND
                } else {
                    EXIT_ERROR
                }
            }
            Failure::Client(e) => {
                eprintln!("error: {}: {e}", client::code_name(e.code()));
                if e.code() == Code::InvalidArgument {
                    EXIT_USAGE
                } else {
                    EXIT_ERROR
                }
            }
            // `prism kv scan ... | head` closes the pipe early: not an error.
            Failure::Io(_, e) if e.kind() == io::ErrorKind::BrokenPipe => EXIT_OK,
            Failure::Io(what, e) => {
                eprintln!("error: {what}: {e}");
                EXIT_ERROR
            }
        }
    }
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Failure::Status(status)
    }
}

fn output(e: io::Error) -> Failure {
    Failure::Io("writing output", e)
}

/// `prism kv`: runs one operation and returns the exit code.
pub async fn kv(args: &KvArgs) -> u8 {
    match run_kv(args).await {
        Ok(()) => EXIT_OK,
        Err(failure) => failure.report(),
    }
}

async fn run_kv(args: &KvArgs) -> Result<(), Failure> {
    // Read stdin before connecting, so a slow producer does not eat into
    // the connection's idle time or the request deadline.
    let put_value = match &args.op {
        KvOp::Put { value, .. } => Some(put_value(value.as_deref())?),
        _ => None,
    };
    check_addr(&args.addr).map_err(Failure::Usage)?;
    let options = ClientOptions {
        addr: args.addr.clone(),
        client_id: args.client_id.clone(),
        timeout: Some(args.timeout),
        connect_timeout: args.timeout,
        token: args.token.clone(),
        ca: args.ca.clone(),
        cert: args.cert.clone(),
        key: args.key.clone(),
    };
    let client = Client::connect(&options).await.map_err(Failure::Client)?;
    let mut out = io::stdout();
    match &args.op {
        KvOp::Get { namespace, key } => {
            let response = client.get(namespace, key).await?;
            if args.json {
                let json = serde_json::json!({
                    "found": response.found,
                    "value_base64": base64::engine::general_purpose::STANDARD.encode(&response.value),
                    "ttl_ms": response.ttl_ms,
                });
                writeln!(out, "{json}").map_err(output)?;
            } else if response.found {
                out.write_all(&response.value).map_err(output)?;
            }
            out.flush().map_err(output)?;
            if !response.found {
                return Err(Failure::Absent(format!(
                    "key {key:?} in namespace {namespace:?}"
                )));
            }
        }
        KvOp::Put {
            namespace,
            key,
            ttl,
            ..
        } => {
            let value = put_value.unwrap_or_default();
            client.put(namespace, key, value, *ttl).await?;
            if args.json {
                writeln!(out, "{{}}").map_err(output)?;
            }
        }
        KvOp::Delete { namespace, key } => {
            let existed = client.delete(namespace, key).await?;
            if args.json {
                writeln!(out, "{}", serde_json::json!({ "existed": existed })).map_err(output)?;
            } else {
                writeln!(out, "{existed}").map_err(output)?;
            }
        }
        KvOp::Exists { namespace, key } => {
            let exists = client.exists(namespace, key).await?;
            if args.json {
                writeln!(out, "{}", serde_json::json!({ "exists": exists })).map_err(output)?;
            } else {
                writeln!(out, "{exists}").map_err(output)?;
            }
            if !exists {
                return Err(Failure::Absent(format!(
                    "key {key:?} in namespace {namespace:?}"
                )));
            }
        }
        KvOp::Scan {
            namespace,
            prefix,
            limit,
            cursor,
            keys_only,
            all,
        } => {
            scan(
                &client,
                ScanRequest {
                    namespace: namespace.clone(),
                    prefix: prefix.clone(),
                    limit: limit.unwrap_or(0),
                    cursor: cursor.clone().unwrap_or_default(),
                    keys_only: *keys_only,
                },
                *all,
                args.json,
            )
            .await?;
        }
    }
    out.flush().map_err(output)
}

/// Prints pages as they arrive. JSON output is one object,
/// `{"items":[{"key":..,"value_base64":..}],"next_cursor":".."}`, streamed
/// so that `--all` over many keys does not buffer them.
async fn scan(
    client: &Client,
    mut request: ScanRequest,
    all: bool,
    json: bool,
) -> Result<(), Failure> {
    let engine = base64::engine::general_purpose::STANDARD;
    let mut first = true;
    if json {
        write!(io::stdout(), "{{\"items\":[").map_err(output)?;
    }
    loop {
        let page = client.scan(request.clone()).await?;
        let mut out = io::stdout().lock();
        for item in &page.items {
            if json {
                let mut entry = BTreeMap::new();
                entry.insert("key", item.key.clone());
                if !request.keys_only {
                    entry.insert("value_base64", engine.encode(&item.value));
                }
                let separator = if first { "" } else { "," };
                write!(out, "{separator}{}", serde_json::json!(entry)).map_err(output)?;
            } else if request.keys_only {
                writeln!(out, "{}", item.key).map_err(output)?;
            } else {
                write!(out, "{}\t", item.key).map_err(output)?;
                out.write_all(&item.value).map_err(output)?;
                out.write_all(b"\n").map_err(output)?;
            }
            first = false;
        }
        out.flush().map_err(output)?;
        drop(out);
        if page.next_cursor.is_empty() || !all {
            if json {
                writeln!(
                    io::stdout(),
                    "],\"next_cursor\":{}}}",
                    serde_json::json!(page.next_cursor)
                )
                .map_err(output)?;
            } else if !page.next_cursor.is_empty() {
                eprintln!(
                    "more keys: continue with --cursor {:?}, or use --all",
                    page.next_cursor
                );
            }
            return Ok(());
        }
        request.cursor = page.next_cursor;
    }
}

/// The value of `kv put`: the argument, or stdin when it is absent or "-".
fn put_value(arg: Option<&std::ffi::OsStr>) -> Result<Bytes, Failure> {
    match arg {
        Some(value) if value != "-" => Ok(Bytes::from(os_bytes(value))),
        _ => {
            let mut buf = Vec::new();
            io::stdin()
                .lock()
                .read_to_end(&mut buf)
                .map_err(|e| Failure::Io("reading the value from stdin", e))?;
            Ok(Bytes::from(buf))
        }
    }
}

/// The bytes of an argument as given, without UTF-8 validation on Unix.
#[cfg(unix)]
fn os_bytes(value: &std::ffi::OsStr) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    value.as_bytes().to_vec()
}

#[cfg(not(unix))]
fn os_bytes(value: &std::ffi::OsStr) -> Vec<u8> {
    value.to_string_lossy().into_owned().into_bytes()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_is_the_default_command() {
        let cli = Cli::parse_from(["prism"]);
        assert!(matches!(cli.command_to_run(), Command::Serve(_)));
    }

    #[test]
    fn settings_may_follow_the_command() {
        let cli = Cli::parse_from(["prism", "check-config", "--settings", "/etc/prism"]);
        assert_eq!(cli.settings_dir(), Path::new("/etc/prism"));
        let cli = Cli::parse_from(["prism", "--settings", "/srv/prism", "serve"]);
        assert_eq!(cli.settings_dir(), Path::new("/srv/prism"));
    }

    #[test]
    fn kv_options_may_follow_the_operation() {
        let cli = Cli::parse_from([
            "prism",
            "kv",
            "get",
            "default",
            "k",
            "--json",
            "--timeout",
            "250ms",
        ]);
        let Some(Command::Kv(kv)) = cli.command else {
            panic!("not a kv command");
        };
        assert!(kv.json);
        assert_eq!(kv.timeout, Duration::from_millis(250));
    }

    #[test]
    fn timeouts_are_more_than_zero_and_at_most_an_hour() {
        for bad in ["0s", "0ms", "61m", "100000000h", "soon"] {
            for cmd in [
                vec!["prism", "kv", "--timeout", bad, "get", "n", "k"],
                vec!["prism", "bench", "--timeout", bad],
            ] {
                let e = Cli::try_parse_from(cmd).unwrap_err();
                assert!(e.use_stderr(), "{bad}: {e}");
                assert!(e.to_string().contains("--timeout"), "{e}");
            }
        }
        assert!(Cli::try_parse_from(["prism", "kv", "--timeout", "1h", "get", "n", "k"]).is_ok());
        for flag in ["--duration", "--warmup"] {
            let e = Cli::try_parse_from(["prism", "bench", flag, "100000000h"]).unwrap_err();
            assert!(e.to_string().contains("at most 1day"), "{e}");
        }
    }

    #[test]
    fn bench_connections_default_to_at_most_four() {
        let cli = Cli::parse_from(["prism", "bench", "--concurrency", "2"]);
        let Some(Command::Bench(args)) = cli.command else {
            panic!("not a bench command");
        };
        assert_eq!(args.options().connections, 2);
        let cli = Cli::parse_from(["prism", "bench"]);
        let Some(Command::Bench(args)) = cli.command else {
            panic!("not a bench command");
        };
        assert_eq!(args.options().connections, 4);
    }
}
