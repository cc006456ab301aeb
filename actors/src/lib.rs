//! `prism-actors`: a supervised actor engine on tokio.
//!
//! - An [`Actor`] owns its state and handles one message at a time from a
//!   bounded mailbox. Its [`Addr`] offers [`Addr::tell`] (waits for space),
//!   [`Addr::try_tell`] (fails at once when full, giving the message back),
//!   [`Addr::ask`] and [`Addr::ask_timeout`].
//! - A panic or an `Err` in a handler or hook ends the incarnation with a
//!   typed [`ExitReason`]; it never takes down a runtime thread.
//! - A [`Supervisor`] restarts its children by [`SupervisionStrategy`]
//!   (one-for-one, one-for-all, rest-for-one) and [`RestartPolicy`]
//!   (permanent, transient, temporary), with exponential [`Backoff`] and an
//!   [`Intensity`] limit past which it stops its children and fails towards
//!   its own parent.
//! - Addresses survive restarts: the mailbox belongs to the child, not to the
//!   incarnation, so messages queued during a restart and its backoff are
//!   handled by the next incarnation. The caller whose message was being
//!   handled at a crash gets [`AskError::NoReply`].
//! - [`SupervisorHandle::shutdown`] drains the tree: each actor rejects new
//!   messages with [`SendError::Stopping`], handles its queue and runs its stop
//!   hook; supervisors stop children in reverse start order; nothing restarts;
//!   a grace period bounds it all and the [`ShutdownReport`] says who drained
//!   and who was aborted.
//! - Every incarnation runs in a `tracing` span with `actor` and `actor_id`
//!   fields, so every event of its handlers carries them; lifecycle events
//!   carry them as fields too. [`SupervisorRef::snapshot`] returns the live
//!   tree.
//! - [`Context::send_interval`] gives an actor a ticker that lives as long as
//!   the incarnation.
//!
//! `use prism_actors::prelude::*;` brings the common items into scope.
//!
//! # When a child is restarted
//!
//! A child that ends by itself is restarted by its [`RestartPolicy`] and its
//! [`ExitReason`] ([`RestartPolicy::restarts_after`]):
//!
//! | policy \ exit reason | `Normal` | `Shutdown` | `Restart` | `Error` | `Panic` | `Escalated` | `Aborted` |
//! |---|---|---|---|---|---|---|---|
//! | `Permanent` | restarted | restarted | restarted | restarted | restarted | restarted | restarted |
//! | `Transient` | — | — | — | restarted | restarted | restarted | — |
//! | `Temporary` | — | — | — | — | — | — | — |
//!
//! Above this table: once a shutdown has begun nothing restarts, a child
//! removed with [`SupervisorRef::remove_child`] never restarts, and a child
//! stopped because a sibling failed (`Restart`, under one-for-all or
//! rest-for-one) is started again with the group whatever its policy, except
//! a temporary one, which leaves the tree. `Escalated` is how a child
//! supervisor ends when its restart intensity was exceeded; `Aborted`, a task
//! that was cut off.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use prism_actors::{Actor, BoxError, ChildSpec, Context, Reply, Supervisor};
//!
//! struct Counter { n: u64 }
//!
//! enum CounterMsg {
//!     Add(u64),
//!     Crash,
//!     Get { reply: Reply<u64> },
//! }
//!
//! impl Actor for Counter {
//!     type Msg = CounterMsg;
//!
//!     async fn handle(&mut self, msg: CounterMsg, _ctx: &mut Context<Self>) -> Result<(), BoxError> {
//!         match msg {
//!             CounterMsg::Add(k) => self.n += k,
//!             CounterMsg::Crash => return Err("asked to crash".into()),
//!             CounterMsg::Get { reply } => { let _ = reply.send(self.n); }
//!         }
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let spec = ChildSpec::new("counter", || Counter { n: 0 });
//! let counter = spec.addr();
//! let root = Supervisor::new("root").child(spec).spawn();
//!
//! counter.tell(CounterMsg::Add(2)).await.unwrap();
//! counter.tell(CounterMsg::Crash).await.unwrap();
//! // Same address, fresh state after the supervised restart.
//! let n = counter.ask(|reply| CounterMsg::Get { reply }).await.unwrap();
//! assert_eq!(n, 0);
//!
//! let report = root.shutdown(Duration::from_secs(5)).await;
//! assert!(report.is_clean());
//! # }
//! ```
#![warn(missing_docs)]
#![warn(clippy::mod_module_files)]

mod actor;
mod addr;
mod by_seq;
mod exit;
mod incarnation;
mod shutdown;
mod supervisor;
mod tree;

pub use actor::{Actor, BoxError, Context, Ticker};
pub use addr::{Addr, AskError, Reply, SendError};
pub use exit::{Chain, ExitReason, SharedError};
pub use incarnation::{catch_panic, spawn, ActorHandle};
pub use shutdown::{ActorReport, ShutdownReport, StopOutcome};
pub use supervisor::{
    Backoff, Child, ChildSpec, Intensity, RestartPolicy, SupervisionStrategy, Supervisor,
    SupervisorError, SupervisorHandle, SupervisorRef, DEFAULT_MAILBOX,
};
pub use tree::{ActorInfo, ActorState};

/// The items most actors and supervision trees need:
/// `use prism_actors::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Actor, Addr, AskError, Backoff, BoxError, ChildSpec, Context, ExitReason, Reply,
        RestartPolicy, SendError, SupervisionStrategy, Supervisor, SupervisorHandle, SupervisorRef,
    };
}
