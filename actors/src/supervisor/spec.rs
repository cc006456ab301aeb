//! What a supervisor holds: a [`Child`] of any kind behind the [`Slot`]
//! trait, and the [`ChildSpec`] an actor child is described by.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::AbortHandle;

use super::{ExitReport, ExitTx, RestartPolicy, SlotExit, TreeCtx};
use crate::actor::Actor;
use crate::addr::{Addr, Control, Lifecycle, Shared};
use crate::exit::{panic_message, ExitReason};
use crate::incarnation::{self, caught, Exit};
use crate::tree::{ActorState, Probe};

/// Mailbox capacity of [`ChildSpec::new`].
pub const DEFAULT_MAILBOX: usize = 64;

/// A child of any kind (actor or supervisor), seen by its supervisor.
pub(super) trait Slot: Send {
    /// The child's mailbox and flags, which outlive its incarnations.
    fn lifecycle(&self) -> &dyn Lifecycle;
    fn register(&self, tree: &Arc<TreeCtx>, parent: Option<u64>);
    /// Spawns a fresh incarnation, number `run` of child `seq`, which reports
    /// its end on `exits`; `None` if the mailbox is gone.
    fn spawn(&self, exits: &ExitTx, seq: u64, run: u64) -> Option<AbortHandle>;

    fn id(&self) -> u64 {
        self.lifecycle().id()
    }
    fn name(&self) -> &Arc<str> {
        self.lifecycle().name()
    }
    fn unregister(&self, tree: &TreeCtx) {
        tree.registry.remove(self.id());
    }
    fn request_stop(&self, mode: Control) {
        self.lifecycle().request_stop(mode);
    }
    fn set_state(&self, state: ActorState) {
        self.lifecycle().set_state(state);
    }
    fn add_restart(&self) -> u32 {
        self.lifecycle().add_restart()
    }
    /// Ends the child for good: closes its mailbox, failing every queued ask.
    fn close(&self) {
        self.lifecycle().close_mailbox();
    }
    /// True for supervisors, which enforce the shutdown deadline themselves.
    fn is_supervisor(&self) -> bool {
        false
    }
}

/// Puts one actor's live figures into the tree's registry, for snapshots.
pub(super) fn register_probe<M: Send + 'static>(
    tree: &TreeCtx,
    shared: &Arc<Shared<M>>,
    parent: Option<u64>,
    supervisor: bool,
) {
    tree.registry.insert(
        shared.id,
        shared.name.clone(),
        parent,
        supervisor,
        shared.clone() as Arc<dyn Probe>,
    );
}

struct ActorSlot<A: Actor> {
    shared: Arc<Shared<A::Msg>>,
    factory: Box<dyn Fn() -> A + Send + Sync>,
}

impl<A: Actor> Slot for ActorSlot<A> {
    fn lifecycle(&self) -> &dyn Lifecycle {
        &*self.shared
    }
    fn register(&self, tree: &Arc<TreeCtx>, parent: Option<u64>) {
        register_probe(tree, &self.shared, parent, false);
    }
    fn spawn(&self, exits: &ExitTx, seq: u64, run: u64) -> Option<AbortHandle> {
        let lease = self.shared.lease()?;
        self.shared.reset_control();
        let mut report = ExitReport::new(lease, exits, seq, run);
        // The incarnation is built here, on the supervisor's task, so the
        // factory is not shared with (nor cloned into) every task. A factory
        // that panics is a failed start, like a failing hook: its task only
        // reports that.
        let actor = match std::panic::catch_unwind(AssertUnwindSafe(|| (self.factory)())) {
            Ok(a) => a,
            Err(p) => {
                let exit = SlotExit::new(ExitReason::Panic(panic_message(p)));
                let task = tokio::spawn(async move { report.finish(exit) });
                return Some(task.abort_handle());
            }
        };
        let task = tokio::spawn(async move {
            // The incarnation catches its handlers' and hooks' panics; this
            // guard is for the engine's own code around them. Its state is
            // boxed by the task itself, on its first poll: the task stays
            // small, and tokio copies a task's whole future when it spawns it
            // (on the supervisor) and again when it completes.
            let exit = {
                let (shared, rx) = report.parts();
                let mut run = Box::pin(incarnation::run(actor, shared, rx));
                match caught(run.as_mut()).await {
                    Ok(Exit {
                        reason,
                        drained,
                        name,
                    }) => SlotExit {
                        reason,
                        drained,
                        children: Vec::new(),
                        name,
                    },
                    Err(p) => SlotExit::new(ExitReason::Panic(p)),
                }
            };
            report.finish(exit);
        });
        Some(task.abort_handle())
    }
}

/// The spec of an actor child: its name, mailbox, factory and restart policy.
/// Its address exists from the start and stays valid for the child's whole
/// supervised life.
pub struct ChildSpec<A: Actor> {
    shared: Arc<Shared<A::Msg>>,
    factory: Box<dyn Fn() -> A + Send + Sync>,
    restart: RestartPolicy,
    shutdown_timeout: Duration,
}

impl<A: Actor> ChildSpec<A> {
    /// A permanent child with a mailbox of [`DEFAULT_MAILBOX`] messages; each
    /// incarnation is built by `factory`, which the supervisor calls right
    /// before it spawns the incarnation's task (keep it cheap: it holds up the
    /// supervisor's other work).
    pub fn new(name: impl Into<Arc<str>>, factory: impl Fn() -> A + Send + Sync + 'static) -> Self {
        Self::with_mailbox(name, DEFAULT_MAILBOX, factory)
    }

    /// Like [`ChildSpec::new`] with a mailbox of `capacity` messages.
    pub fn with_mailbox(
        name: impl Into<Arc<str>>,
        capacity: usize,
        factory: impl Fn() -> A + Send + Sync + 'static,
    ) -> Self {
        ChildSpec {
            shared: Shared::new(name.into(), capacity),
            factory: Box::new(factory),
            restart: RestartPolicy::Permanent,
            shutdown_timeout: Duration::from_secs(5),
        }
    }

    /// Sets the restart policy.
    pub fn restart(mut self, restart: RestartPolicy) -> Self {
        self.restart = restart;
        self
    }

    /// How long the supervisor waits for this child to stop before a sibling
    /// restart or a removal aborts it (default 5 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// The child's address.
    pub fn addr(&self) -> Addr<A> {
        Addr {
            shared: self.shared.clone(),
        }
    }
}

/// A child of any kind, ready to be given to a supervisor. Built from a
/// [`ChildSpec`] or a [`crate::Supervisor`] with `into()`.
pub struct Child {
    pub(super) slot: Box<dyn Slot>,
    pub(super) restart: RestartPolicy,
    pub(super) shutdown_timeout: Duration,
}

impl Child {
    /// The child's id.
    pub fn id(&self) -> u64 {
        self.slot.id()
    }
}

impl<A: Actor> From<ChildSpec<A>> for Child {
    fn from(spec: ChildSpec<A>) -> Self {
        Child {
            slot: Box::new(ActorSlot {
                shared: spec.shared,
                factory: spec.factory,
            }),
            restart: spec.restart,
            shutdown_timeout: spec.shutdown_timeout,
        }
    }
}
