//! A custom backend: how to put Prism in front of a store it does not know.
//!
//! A backend is two small traits. A `Connector` is kept by the pool actor and
//! called at every (re)start; it returns a connected `Backend`, which runs
//! the five operations. Everything else — validation, deadlines, sessions,
//! admission limits, the circuit breaker, restarts, metrics, the drain — is
//! the gateway's.
//!
//! This one keeps its data in a memory backend and adds a fixed latency to
//! every operation, as a slow remote store would. Run it with
//!
//! ```sh
//! cargo run --example custom_backend
//! ```
//!
//! It starts a gateway on 127.0.0.1 (ports picked by the OS) with namespace
//! `slow` on the custom backend, writes and reads through gRPC, shows that a
//! client deadline shorter than the latency ends as DEADLINE_EXCEEDED, and
//! shuts down. Then it runs the conformance suite of `prism::testing` (the
//! `test-util` feature) against the custom backend, with a shorter latency
//! so that the thousands of operations stay quick, and prints a line per
//! check; it exits with an error when a check fails. A backend crate runs
//! the same suite from its tests with `prism::conformance_suite!`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use prism::backend::memory::MemoryConnector;
use prism::backend::{Backend, BoxFuture, Connector, Error, Op, Outcome};
use prism::client::{Client, ClientOptions};
use prism::settings::Loader;
use prism::testing::conformance::{self, Subject};
use prism::{Gateway, Listeners};

/// The connector outlives pool actor restarts, so it owns what must survive
/// them: here the data (inside the memory connector) and a counter.
struct SlowConnector {
    inner: MemoryConnector,
    latency: Duration,
    ops: Arc<AtomicU64>,
}

impl Connector for SlowConnector {
    fn kind(&self) -> &'static str {
        "slow"
    }

    fn connect(&self) -> BoxFuture<'_, Result<Arc<dyn Backend>, Error>> {
        Box::pin(async move {
            let inner = self.inner.connect().await?;
            Ok(Arc::new(SlowBackend {
                inner,
                latency: self.latency,
                ops: self.ops.clone(),
            }) as Arc<dyn Backend>)
        })
    }
}

struct SlowBackend {
    inner: Arc<dyn Backend>,
    latency: Duration,
    ops: Arc<AtomicU64>,
}

impl Backend for SlowBackend {
    fn exec<'a>(&'a self, namespace: &'a str, op: Op) -> BoxFuture<'a, Result<Outcome, Error>> {
        Box::pin(async move {
            // The pool actor drops this future when the caller goes away or
            // its deadline passes, so a slow store never holds a slot for a
            // request nobody waits for.
            tokio::time::sleep(self.latency).await;
            self.ops.fetch_add(1, Ordering::Relaxed);
            self.inner.exec(namespace, op).await
        })
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<u64, Error>> {
        self.inner.purge_expired()
    }

    fn health(&self) -> BoxFuture<'_, Result<(), Error>> {
        self.inner.health()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        self.inner.close()
    }
}

const SETTINGS: &str = r#"
[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"

# A kind of the program's own, registered with `Loader::kind` (so the
# settings accept it) and `Gateway::kind` (which builds its connector). The
# shared keys (pool_size, mailbox, breaker_*, ...) apply as for every kind;
# the others (`latency`) are the kind's own, read by its factory.
[backends.slow]
kind = "slow"
pool_size = 4
latency = "50ms"

[namespaces.slow]
backend = "slow"
timeout = "2s"
"#;

/// The `slow` kind's own settings keys.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SlowOptions {
    #[serde(with = "humantime_serde")]
    latency: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Loader::new()
        .kind("slow")
        .from_toml(SETTINGS)
        .context("example settings")?;

    let ops = Arc::new(AtomicU64::new(0));
    let counter = ops.clone();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = grpc.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gateway = tokio::spawn(
        Gateway::new(settings)
            .kind("slow", move |_name, custom| {
                // The kind's own keys; a bad value is a settings error
                // naming `backends.slow.latency` and its file.
                let options: SlowOptions = custom.options()?;
                Ok(Arc::new(SlowConnector {
                    inner: MemoryConnector::new(),
                    latency: options.latency,
                    ops: counter.clone(),
                }) as Arc<dyn Connector>)
            })
            .serve(Listeners { grpc, http: None }, async move {
                let _ = stopped.await;
            }),
    );

    let client = Client::connect(&ClientOptions {
        addr: format!("http://{addr}"),
        ..ClientOptions::default()
    })
    .await?;
    client
        .put("slow", "greeting", Bytes::from_static(b"hello"), None)
        .await?;
    let got = client.get("slow", "greeting").await?;
    println!(
        "get slow/greeting -> found={} value={:?}",
        got.found,
        String::from_utf8_lossy(&got.value)
    );

    // A client that will not wait the 50 ms the store needs.
    let impatient = Client::connect(&ClientOptions {
        addr: format!("http://{addr}"),
        timeout: Some(Duration::from_millis(10)),
        ..ClientOptions::default()
    })
    .await?;
    match impatient.get("slow", "greeting").await {
        Ok(_) => println!("impatient get succeeded (the machine is fast today)"),
        Err(e) => println!("impatient get -> {}", prism::client::describe(&e)),
    }

    println!("operations the store ran: {}", ops.load(Ordering::Relaxed));
    let _ = stop.send(());
    gateway.await??;

    println!("conformance suite against the custom backend:");
    let verdicts = conformance::run(|| async {
        // A fresh store for each check.
        Subject::new(SlowConnector {
            inner: MemoryConnector::new(),
            latency: Duration::from_millis(1),
            ops: Arc::new(AtomicU64::new(0)),
        })
    })
    .await;
    let mut failed = 0;
    for verdict in &verdicts {
        match &verdict.result {
            Ok(()) => println!("  pass  {}", verdict.name),
            Err(why) => {
                failed += 1;
                println!("  FAIL  {}: {why}", verdict.name);
            }
        }
    }
    println!("{} passed, {failed} failed", verdicts.len() - failed);
    anyhow::ensure!(failed == 0, "{failed} conformance checks failed");
    Ok(())
}
