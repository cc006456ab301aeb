//! The [`Actor`] trait, its [`Context`] and the [`ExitReason`] an incarnation ends with.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use crate::addr::Addr;

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

/// Why an actor incarnation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The actor asked to stop ([`Context::stop`]) or was removed by its supervisor.
    Normal,
    /// The actor was stopped by a shutdown after draining its mailbox.
    Shutdown,
    /// The supervisor stopped it to restart it together with a failed sibling.
    Restart,
    /// A handler or hook returned an error; the text is the error with its sources.
    Error(String),
    /// A handler or hook panicked; the text is the panic message.
    Panic(String),
    /// A supervisor exceeded its restart intensity and gave up.
    Escalated(String),
    /// The shutdown grace period ran out while the actor was still running.
    Aborted,
}

impl ExitReason {
    /// True for the reasons a transient child is restarted for: errors, panics
    /// and escalations.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            ExitReason::Error(_) | ExitReason::Panic(_) | ExitReason::Escalated(_)
        )
    }

    pub(crate) fn from_error(e: &(dyn std::error::Error + 'static)) -> Self {
        let mut text = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        ExitReason::Error(text)
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Normal => f.write_str("normal"),
            ExitReason::Shutdown => f.write_str("shutdown"),
            ExitReason::Restart => f.write_str("restart"),
            ExitReason::Error(e) => write!(f, "error: {e}"),
            ExitReason::Panic(p) => write!(f, "panic: {p}"),
            ExitReason::Escalated(e) => write!(f, "escalated: {e}"),
            ExitReason::Aborted => f.write_str("aborted"),
        }
    }
}

/// What a running actor knows about itself.
pub struct Context<A: Actor> {
    pub(crate) addr: Addr<A>,
    pub(crate) stop: bool,
}

impl<A: Actor> Context<A> {
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
        self.addr.shared.control() == crate::addr::CONTROL_DRAIN
    }
}
