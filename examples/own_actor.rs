//! Your own actor in the gateway's supervision tree.
//!
//! `Gateway::child` runs an actor (or a whole supervisor) of the program's
//! own under the gateway's root supervisor, beside the backends and the
//! sessions: it is restarted by its policy when it fails, shows in
//! `GET /v1/actors`, and is drained with everything else on shutdown —
//! first, before the sessions and pools it may depend on.
//!
//! ```sh
//! cargo run --example own_actor
//! ```
//!
//! It starts a gateway on 127.0.0.1 (ports picked by the OS) with an
//! `Auditor` actor, sends it a few messages, crashes it once to show the
//! supervised restart (same address, fresh state), and shuts down.

use std::time::Duration;

use anyhow::Context as _;
use prism::{Gateway, Listeners, Settings};
use prism_actors::prelude::*;
use tokio::sync::oneshot;

const SETTINGS: &str = r#"
[server]
grpc_addr = "127.0.0.1:0"
shutdown_grace = "5s"

[backends.memory]
kind = "memory"

[namespaces.cache]
backend = "memory"
"#;

/// Counts audit records; ticks once a second.
struct Auditor {
    records: u64,
    ticks: u64,
}

enum AuditorMsg {
    Record(String),
    Crash,
    Tick,
    Count { reply: Reply<u64> },
}

impl Actor for Auditor {
    type Msg = AuditorMsg;

    async fn started(&mut self, ctx: &mut Context<Self>) -> Result<(), BoxError> {
        // Cancelled with this incarnation; a restart starts a fresh one.
        ctx.send_interval(Duration::from_secs(1), || AuditorMsg::Tick);
        Ok(())
    }

    async fn handle(&mut self, msg: AuditorMsg, _ctx: &mut Context<Self>) -> Result<(), BoxError> {
        match msg {
            AuditorMsg::Record(what) => {
                self.records += 1;
                tracing::info!(record = %what, total = self.records, "audit record");
            }
            AuditorMsg::Crash => return Err("asked to crash".into()),
            AuditorMsg::Tick => self.ticks += 1,
            AuditorMsg::Count { reply } => {
                let _ = reply.send(self.records);
            }
        }
        Ok(())
    }

    async fn stopped(
        &mut self,
        reason: &ExitReason,
        _ctx: &mut Context<Self>,
    ) -> Result<(), BoxError> {
        println!("auditor stopped ({reason}) after {} records", self.records);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let settings = Settings::from_toml(SETTINGS).context("example settings")?;

    let spec = ChildSpec::new("auditor", || Auditor {
        records: 0,
        ticks: 0,
    })
    .restart(RestartPolicy::Permanent);
    let auditor = spec.addr();

    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (stop, stopped) = oneshot::channel::<()>();
    let gateway = tokio::spawn(Gateway::new(settings).child(spec).serve(
        Listeners { grpc, http: None },
        async move {
            let _ = stopped.await;
        },
    ));

    for what in ["login", "export", "logout"] {
        auditor.tell(AuditorMsg::Record(what.into())).await?;
    }
    let n = auditor.ask(|reply| AuditorMsg::Count { reply }).await?;
    println!("auditor has {n} records");

    // A failure is the supervisor's business: the address stays valid and
    // the next incarnation starts from a fresh state.
    auditor.tell(AuditorMsg::Crash).await?;
    let n = auditor.ask(|reply| AuditorMsg::Count { reply }).await?;
    println!("after a supervised restart the auditor has {n} records");
    auditor
        .tell(AuditorMsg::Record("after restart".into()))
        .await?;

    let _ = stop.send(());
    gateway.await?.context("gateway")?;
    Ok(())
}
