//! Why an incarnation ended ([`ExitReason`]), and the one place each other
//! way of ending (a handler result, a panic, a finished task) becomes one.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use tokio::task::JoinError;

use crate::actor::BoxError;

/// The error an [`ExitReason::Error`] carries: shared, so the reason can be
/// cloned into reports and logs without losing the error's `source()` chain.
pub type SharedError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Why an actor incarnation ended.
///
/// `Display` shows the top-level message (`error: connection refused`);
/// [`ExitReason::chain`] adds every `source()` below it, which is what the
/// engine logs.
#[derive(Debug, Clone)]
pub enum ExitReason {
    /// The actor asked to stop ([`crate::Context::stop`]).
    Normal,
    /// The actor was stopped by a shutdown or a removal after draining its mailbox.
    Shutdown,
    /// The supervisor stopped it to restart it together with a failed sibling.
    Restart,
    /// A handler or hook returned this error.
    Error(SharedError),
    /// A handler or hook panicked; the text is the panic message.
    Panic(String),
    /// A supervisor exceeded its restart intensity and gave up.
    Escalated(String),
    /// The shutdown grace period ran out while the actor was still running.
    Aborted,
}

impl ExitReason {
    /// An [`ExitReason::Error`] from any error (or a `&str`/`String` message).
    pub fn error(e: impl Into<BoxError>) -> Self {
        ExitReason::Error(Arc::from(e.into()))
    }

    /// True for the reasons a transient child is restarted for: errors, panics
    /// and escalations.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            ExitReason::Error(_) | ExitReason::Panic(_) | ExitReason::Escalated(_)
        )
    }

    /// Displays the reason followed by every `source()` of its error,
    /// `error: outer: inner`, for logs. Other reasons display as usual.
    pub fn chain(&self) -> Chain<'_> {
        Chain(self)
    }

    /// The reason a task of the engine ended with when it did not return:
    /// a panic that escaped every `catch_panic`, or an abort (grace period
    /// over, supervisor cut off).
    pub(crate) fn from_join_error(e: JoinError) -> Self {
        if e.is_panic() {
            ExitReason::Panic(panic_message(e.into_panic()))
        } else {
            ExitReason::Aborted
        }
    }

    /// The failure a handler or hook outcome (as returned by
    /// [`crate::catch_panic`]) ends the incarnation with, if any.
    pub(crate) fn from_outcome(res: Result<Result<(), BoxError>, String>) -> Option<Self> {
        match res {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(ExitReason::Error(Arc::from(e))),
            Err(panic) => Some(ExitReason::Panic(panic)),
        }
    }
}

/// Two errors are the same reason when they are the same error or show the
/// same message: errors themselves are not comparable.
impl PartialEq for ExitReason {
    fn eq(&self, other: &Self) -> bool {
        use ExitReason::*;
        match (self, other) {
            (Normal, Normal) | (Shutdown, Shutdown) | (Restart, Restart) | (Aborted, Aborted) => {
                true
            }
            (Error(a), Error(b)) => Arc::ptr_eq(a, b) || a.to_string() == b.to_string(),
            (Panic(a), Panic(b)) | (Escalated(a), Escalated(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for ExitReason {}

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

/// An [`ExitReason`] displayed with its error's sources; see [`ExitReason::chain`].
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(&'a ExitReason);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        if let ExitReason::Error(e) = self.0 {
            let mut source = e.source();
            while let Some(s) = source {
                write!(f, ": {s}")?;
                source = s.source();
            }
        }
        Ok(())
    }
}

/// The message of a panic payload: `panic!` yields a `&str` or a `String`.
pub(crate) fn panic_message(payload: Box<dyn Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("query failed")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("connection refused")]
    struct Inner;

    #[test]
    fn error_keeps_its_source_chain() {
        let reason = ExitReason::error(Outer(Inner));
        assert_eq!(reason.to_string(), "error: query failed");
        assert_eq!(
            reason.chain().to_string(),
            "error: query failed: connection refused"
        );
        let ExitReason::Error(e) = &reason else {
            panic!("not an error: {reason:?}")
        };
        assert_eq!(
            e.source().map(|s| s.to_string()).as_deref(),
            Some("connection refused")
        );
    }

    #[test]
    fn errors_with_the_same_message_are_equal() {
        assert_eq!(ExitReason::error("boom"), ExitReason::error("boom"));
        assert_ne!(ExitReason::error("boom"), ExitReason::error("bang"));
        assert_ne!(ExitReason::error("boom"), ExitReason::Panic("boom".into()));
    }

    #[test]
    fn outcome_of_a_handler_becomes_a_failure_or_nothing() {
        assert_eq!(ExitReason::from_outcome(Ok(Ok(()))), None);
        assert_eq!(
            ExitReason::from_outcome(Ok(Err("bad".into()))),
            Some(ExitReason::error("bad"))
        );
        assert_eq!(
            ExitReason::from_outcome(Err("oops".into())),
            Some(ExitReason::Panic("oops".into()))
        );
    }

    #[tokio::test]
    async fn join_error_of_a_panic_is_a_panic_with_its_message() {
        let join = tokio::spawn(async { panic!("exploded") }).await;
        let reason = ExitReason::from_join_error(join.expect_err("the task panicked"));
        assert_eq!(reason, ExitReason::Panic("exploded".into()));
    }

    #[tokio::test]
    async fn join_error_of_an_abort_is_aborted() {
        let task = tokio::spawn(std::future::pending::<()>());
        task.abort();
        let reason = ExitReason::from_join_error(task.await.expect_err("the task was aborted"));
        assert_eq!(reason, ExitReason::Aborted);
    }

    #[test]
    fn panic_payloads_become_their_message() {
        assert_eq!(panic_message(Box::new("static")), "static");
        assert_eq!(panic_message(Box::new(String::from("owned"))), "owned");
        assert_eq!(
            panic_message(Box::new(7u8)),
            "panic with a non-string payload"
        );
    }
}
