//! One incarnation of an actor: the task that runs its hooks and handles its
//! mailbox until it stops, fails or is told to drain.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;

use tokio::sync::mpsc::Receiver;
use tokio::task::JoinHandle;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::actor::{Actor, Context};
use crate::addr::{Addr, Control, Envelope, Shared};
use crate::exit::{panic_message, ExitReason};
use crate::tree::ActorState;

/// How an incarnation ended.
pub(crate) struct Exit {
    pub(crate) reason: ExitReason,
    /// Messages handled after a drain began.
    pub(crate) drained: u64,
}

/// Polls `fut`, turning a panic inside it into `Err(panic message)`. The future
/// is pinned on the stack, so the happy path costs no allocation. Actors use
/// it for work they spawn, to report a panic as their own failure.
pub async fn catch_panic<F: Future>(fut: F) -> Result<F::Output, String> {
    caught(std::pin::pin!(fut)).await
}

/// [`catch_panic`] for a future its caller has pinned already, e.g. with
/// `std::pin::pin!(..)` in an async fn: the future then lives once in the
/// caller's state. `catch_panic(fut)` keeps both its argument and the pinned
/// copy in its own state, which doubles the size of every task that nests it.
pub(crate) fn caught<F: Future>(
    mut fut: Pin<&mut F>,
) -> impl Future<Output = Result<F::Output, String>> + '_ {
    std::future::poll_fn(move |cx| {
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(panic_message(payload))),
        }
    })
}

/// Runs one incarnation to its end, inside a span with the actor's `actor`
/// and `actor_id`, so every event its handlers emit carries them. The span is
/// a root, not a child of the supervisor's: the tree is in the snapshot, and
/// a span per level would make every log line of a deep tree long. The
/// receiver and `shared` are borrowed from the mailbox lease its caller
/// holds; the caller returns the receiver to `shared` (also when the task is
/// aborted) for the next incarnation.
pub(crate) fn run<'a, A: Actor>(
    actor: A,
    shared: &'a Arc<Shared<A::Msg>>,
    rx: &'a mut Receiver<Envelope<A::Msg>>,
) -> impl Future<Output = Exit> + Send + 'a {
    let span = info_span!(parent: None, "actor", actor = %shared.name, actor_id = shared.id);
    run_in_span(actor, shared, rx).instrument(span)
}

async fn run_in_span<A: Actor>(
    mut actor: A,
    shared: &Arc<Shared<A::Msg>>,
    rx: &mut Receiver<Envelope<A::Msg>>,
) -> Exit {
    let name = &shared.name;
    let id = shared.id;
    let mut ctx = Context::new(Addr {
        shared: shared.clone(),
    });
    if let Some(reason) = ExitReason::from_outcome(caught(pin!(actor.started(&mut ctx))).await) {
        warn!(actor = %name, actor_id = id, error = %reason.chain(), "actor failed to start");
        return Exit { reason, drained: 0 };
    }
    // A drain requested while the incarnation was starting is honoured below;
    // only a fresh start may flip the state to running.
    if shared.control() < Control::Drain {
        shared.set_state(ActorState::Running);
    }
    info!(actor = %name, actor_id = id, "actor started");

    // One `catch_panic` around the whole message loop rather than one per
    // message: a panic in a handler still ends the incarnation with
    // `Panic(message)` and `actor`/`ctx` are still ours for `stopped`, but
    // the unwind guard is set up once per poll of the loop, not once per
    // message (a poll handles every message already queued).
    let mut drained = 0u64;
    let mut draining = false;
    let looped = caught(pin!(handle_mailbox(
        &mut actor,
        &mut ctx,
        shared,
        rx,
        &mut drained,
        &mut draining,
    )))
    .await;
    let mut reason = looped.unwrap_or_else(ExitReason::Panic);
    if draining {
        info!(actor = %name, actor_id = id, handled = drained, "actor drained");
    }

    if reason.is_failure() {
        warn!(actor = %name, actor_id = id, error = %reason.chain(), "actor failed");
    }
    shared.set_state(ActorState::Stopping);
    let hook = {
        let stopped = pin!(actor.stopped(&reason, &mut ctx));
        ExitReason::from_outcome(caught(stopped).await)
    };
    if let Some(hook_failure) = hook {
        warn!(actor = %name, actor_id = id, error = %hook_failure.chain(), "actor stop hook failed");
        if !reason.is_failure() {
            reason = hook_failure;
        }
    }
    info!(actor = %name, actor_id = id, reason = %reason, "actor stopped");
    Exit { reason, drained }
}

/// Handles the mailbox until the incarnation ends and returns why: a
/// handler's `Err`, [`Context::stop`], a [`Control::Yield`], or the end of a
/// drain. A handler's panic unwinds out of here (the caller catches it);
/// `drained` counts the messages handled once `draining` was set, the message
/// that failed or panicked included.
async fn handle_mailbox<A: Actor>(
    actor: &mut A,
    ctx: &mut Context<A>,
    shared: &Shared<A::Msg>,
    rx: &mut Receiver<Envelope<A::Msg>>,
    drained: &mut u64,
    draining: &mut bool,
) -> ExitReason {
    loop {
        // Control before data: a pending stop request wins over queued messages.
        match shared.control() {
            Control::Yield => return ExitReason::Restart,
            Control::Drain => {
                shared.set_state(ActorState::Stopping);
                rx.close();
                *draining = true;
                info!(actor = %shared.name, actor_id = shared.id, queued = rx.len(), "actor draining");
                while let Some(env) = rx.recv().await {
                    let Envelope::Msg(msg) = env else { continue };
                    *drained += 1;
                    if let Err(e) = actor.handle(msg, ctx).await {
                        return ExitReason::Error(Arc::from(e));
                    }
                    if ctx.stop {
                        return ExitReason::Normal;
                    }
                }
                return ExitReason::Shutdown;
            }
            Control::Run => {}
        }
        match rx.recv().await {
            Some(Envelope::Msg(msg)) => {
                if let Err(e) = actor.handle(msg, ctx).await {
                    return ExitReason::Error(Arc::from(e));
                }
                if ctx.stop {
                    return ExitReason::Normal;
                }
            }
            Some(Envelope::Wake) => {}
            // `shared` holds a sender, so the channel only ends once closed.
            None => return ExitReason::Shutdown,
        }
    }
}

/// A handle to an actor spawned without a supervisor.
pub struct ActorHandle<A: Actor> {
    addr: Addr<A>,
    join: JoinHandle<Exit>,
}

impl<A: Actor> ActorHandle<A> {
    /// The actor's address.
    pub fn addr(&self) -> Addr<A> {
        self.addr.clone()
    }

    /// Begins a graceful stop: new messages are rejected with
    /// [`crate::SendError::Stopping`], queued ones are handled, then the stop
    /// hook runs. Await [`ActorHandle::join`] for the end.
    pub fn stop(&self) {
        self.addr.shared.request_stop(Control::Drain);
    }

    /// Waits for the actor to end and returns why. An unsupervised actor is
    /// never restarted: its mailbox is closed and queued asks get an error.
    pub async fn join(self) -> ExitReason {
        let reason = match self.join.await {
            Ok(exit) => exit.reason,
            Err(e) => ExitReason::from_join_error(e),
        };
        self.addr.shared.close_mailbox();
        reason
    }

    /// Ends the actor at once, without draining or running its stop hook.
    pub fn abort(&self) {
        self.join.abort();
    }
}

/// Spawns `actor` on the current tokio runtime without a supervisor, with a
/// mailbox of `capacity` messages. A failure ends it for good; use a
/// [`crate::Supervisor`] for restarts.
pub fn spawn<A: Actor>(name: impl Into<Arc<str>>, capacity: usize, actor: A) -> ActorHandle<A> {
    let shared = Shared::<A::Msg>::new(name.into(), capacity);
    // Invariant: a fresh `Shared` parks its receiver, so the lease exists.
    let lease = shared.lease().expect("a new mailbox is not leased");
    debug!(actor = %shared.name, actor_id = shared.id, "actor spawning");
    let join = tokio::spawn(async move {
        let mut lease = lease;
        let (shared, rx) = lease.parts();
        run(actor, shared, rx).await
        // The lease is dropped here, or with the task when it is aborted.
    });
    ActorHandle {
        addr: Addr { shared },
        join,
    }
}
