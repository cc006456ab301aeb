//! A supervised actor that crashes on a bad message and comes back.
//!
//! Run with `cargo run -p prism-actors --example supervised`; the `WARN ...
//! actor restarting` line in the log is the supervisor at work.

use std::time::Duration;

use anyhow::Context as _;
use prism_actors::{
    Actor, AskError, Backoff, BoxError, ChildSpec, Context, Reply, RestartPolicy, Supervisor,
};

/// A tally: it adds up the numbers it is told about. Its state lives
/// only in the current incarnation, so a restart starts it from zero again.
struct Tally {
    total: i64,
}

/// What a [`Tally`] understands.
enum TallyMsg {
    /// Parse and add a number; anything that is not a number is a bug in the
    /// sender, and the handler fails on it.
    Add(String),
    /// Reply with the total so far.
    Get { reply: Reply<i64> },
}

impl Actor for Tally {
    type Msg = TallyMsg;

    async fn started(&mut self, ctx: &mut Context<Self>) -> Result<(), BoxError> {
        tracing::info!(actor = %ctx.name(), total = self.total, "tally ready");
        Ok(())
    }

    async fn handle(&mut self, msg: TallyMsg, _ctx: &mut Context<Self>) -> Result<(), BoxError> {
        match msg {
            // `?` turns a parse error into a failed incarnation: the
            // supervisor logs it and builds a fresh `Tally`.
            TallyMsg::Add(text) => self.total += text.trim().parse::<i64>()?,
            TallyMsg::Get { reply } => {
                // The caller may have given up; that is not our failure.
                let _ = reply.send(self.total);
            }
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    // The spec owns the mailbox, so its address exists before anything runs
    // and keeps working across restarts.
    let spec = ChildSpec::new("tally", || Tally { total: 0 }).restart(RestartPolicy::Permanent);
    let tally = spec.addr();

    let root = Supervisor::new("root")
        // A short backoff keeps the demo snappy; production code keeps the
        // default so a crash loop does not spin.
        .backoff(Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(1),
            jitter: 0.2,
        })
        .intensity(3, Duration::from_secs(10))
        .child(spec)
        .spawn();

    for text in ["1", "2", "3"] {
        tally.tell(TallyMsg::Add(text.into())).await?;
    }
    let before = tally.ask(|reply| TallyMsg::Get { reply }).await?;
    tracing::info!(total = before, "before the bad message");

    // The bad message fails the handler. The next messages wait in the
    // mailbox through the restart and its backoff, and the new incarnation
    // handles them, starting from zero.
    tally.tell(TallyMsg::Add("seven".into())).await?;
    tally.tell(TallyMsg::Add("10".into())).await?;
    let after = match tally
        .ask_timeout(|reply| TallyMsg::Get { reply }, Duration::from_secs(5))
        .await
    {
        Ok(n) => n,
        Err(AskError::Timeout) => anyhow::bail!("tally did not come back within 5 s"),
        Err(e) => return Err(e).context("asking the restarted tally"),
    };
    tracing::info!(total = after, "after the restart");
    anyhow::ensure!(
        before == 6 && after == 10,
        "unexpected totals {before} / {after}"
    );

    if let Some(tree) = root.snapshot() {
        for node in tree.iter() {
            tracing::info!(actor = %node.name, state = %node.state, restarts = node.restarts, "tree");
        }
    }

    // Drain and stop everything; the report says how each actor ended.
    let report = root.shutdown(Duration::from_secs(5)).await;
    anyhow::ensure!(report.is_clean(), "shutdown was not clean: {report:?}");
    tracing::info!(elapsed_ms = report.elapsed.as_millis() as u64, "done");
    Ok(())
}
