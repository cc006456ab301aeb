//! The [`Actor`] trait and its [`Context`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio::time::MissedTickBehavior;
use tracing::Instrument;

use crate::addr::{Addr, Control};
use crate::exit::ExitReason;
use crate::SendError;

/// The error type handlers and hooks return. Any error converts into it with `?`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An actor: state owned by one task, changed only by the messages it handles.
///
/// Handlers run one at a time, in mailbox order. An `Err` from any method, or a
/// panic inside one, ends the current incarnation with [`ExitReason::Error`] or
/// [`ExitReason::Panic`]; a supervisor then decides whether to build a fresh
/// incarnation from the child's factory. The mailbox survives the failure, so
/// queued messages are handled by the next incarnation.
///
/// ```
/// use prism_actors::{Actor, BoxError, Context, Reply};
///
/// struct Counter { n: u64 }
///
/// enum CounterMsg {
///     Add(u64),
///     Get { reply: Reply<u64> },
/// }
///
/// impl Actor for Counter {
///     type Msg = CounterMsg;
///
///     async fn handle(&mut self, msg: CounterMsg, _ctx: &mut Context<Self>) -> Result<(), BoxError> {
///         match msg {
///             CounterMsg::Add(k) => self.n += k,
///             CounterMsg::Get { reply } => { let _ = reply.send(self.n); }
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait Actor: Send + Sized + 'static {
    /// The messages this actor handles, usually an enum `<Actor>Msg`.
    type Msg: Send + 'static;

    /// Runs once per incarnation before the first message is handled.
    fn started(
        &mut self,
        ctx: &mut Context<Self>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let _ = ctx;
        async { Ok(()) }
    }

    /// Handles one message.
    fn handle(
        &mut self,
        msg: Self::Msg,
        ctx: &mut Context<Self>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Runs once when an incarnation whose `started` succeeded ends, whatever
    /// the reason — except an abort at the end of a shutdown grace period,
    /// which runs nothing more. An incarnation that failed in `started` has
    /// nothing to clean up that `started` did not, so it gets no `stopped`.
    fn stopped(
        &mut self,
        reason: &ExitReason,
        ctx: &mut Context<Self>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let _ = (reason, ctx);
        async { Ok(()) }
    }
}

/// What a running actor knows about itself. One context lives as long as
/// one incarnation: what it starts (tickers) ends with the incarnation.
pub struct Context<A: Actor> {
    pub(crate) addr: Addr<A>,
    pub(crate) stop: bool,
    tickers: Vec<AbortHandle>,
}

impl<A: Actor> Context<A> {
    pub(crate) fn new(addr: Addr<A>) -> Self {
        Context {
            addr,
            stop: false,
            tickers: Vec::new(),
        }
    }

    /// The actor's own address (stable across restarts).
    pub fn addr(&self) -> Addr<A> {
        self.addr.clone()
    }

    /// The actor's unique id.
    pub fn id(&self) -> u64 {
        self.addr.id()
    }

    /// The actor's name.
    pub fn name(&self) -> &Arc<str> {
        self.addr.name()
    }

    /// Ends this incarnation with [`ExitReason::Normal`] after the current
    /// message. Messages still queued stay in the mailbox: a permanent child
    /// is restarted and handles them, otherwise its mailbox is closed and each
    /// queued `ask` gets [`crate::AskError::NoReply`].
    pub fn stop(&mut self) {
        self.stop = true;
    }

    /// True once a shutdown of this actor has begun: it is draining its mailbox.
    pub fn is_draining(&self) -> bool {
        self.addr.shared.control() == Control::Drain
    }

    /// Sends `make_msg()` to this actor every `every` (first after one
    /// period), e.g. `ctx.send_interval(Duration::from_secs(1), || Msg::Tick)`,
    /// usually from `started`.
    ///
    /// A tick is skipped when the mailbox is full: a busy actor has work
    /// already, and a ticker must not add backpressure of its own. Ticks the
    /// ticker itself missed (a stalled runtime) are skipped too, not sent in a
    /// burst. The ticker ends when the actor stops accepting messages
    /// (draining or closed), and is cancelled when this incarnation ends, so
    /// a restarted actor starts its tickers afresh instead of doubling them.
    /// A zero period is taken as one millisecond.
    pub fn send_interval<F>(&mut self, every: Duration, make_msg: F) -> Ticker
    where
        F: Fn() -> A::Msg + Send + 'static,
    {
        let every = every.max(Duration::from_millis(1));
        let addr = self.addr.clone();
        let task = tokio::spawn(
            async move {
                let mut interval =
                    tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
                loop {
                    interval.tick().await;
                    match addr.try_tell(make_msg()) {
                        Ok(()) | Err(SendError::Full(_)) => {}
                        Err(SendError::Stopping(_) | SendError::Closed(_)) => break,
                    }
                }
            }
            .in_current_span(),
        );
        let abort = task.abort_handle();
        self.tickers.retain(|t| !t.is_finished());
        self.tickers.push(abort.clone());
        Ticker(abort)
    }
}

impl<A: Actor> Drop for Context<A> {
    fn drop(&mut self) {
        // The context is dropped when the incarnation ends, also when its task
        // is aborted: no ticker outlives the state it was meant for.
        for t in &self.tickers {
            t.abort();
        }
    }
}

/// A ticker started by [`Context::send_interval`]. Dropping it does not stop
/// the ticker; the end of the incarnation does.
#[derive(Debug, Clone)]
pub struct Ticker(AbortHandle);

impl Ticker {
    /// Stops the ticker now: no further message is sent.
    pub fn cancel(&self) {
        self.0.abort();
    }

    /// True once the ticker has ended (cancelled, incarnation over, actor stopping).
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}
