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

/// A child of any kind (actor or supervisor), seen by its supervisor, which
/// holds it as an `Arc<dyn Slot>`: for an actor child that is the actor's
/// [`Shared`] itself (mailbox, flags, factory), so a child costs its
/// supervisor no allocation of its own.
pub(super) trait Slot: Send + Sync {
    /// The child's mailbox and flags, which outlive its incarnations.
    fn lifecycle(&self) -> &dyn Lifecycle;
    /// Takes the child for supervision and puts it (and, for a supervisor,
    /// its subtree) into the tree's registry as child `seq` of `parent` (the
    /// root has none); false, registering nothing, if a supervisor had taken
    /// it already.
    fn register(self: Arc<Self>, tree: &Arc<TreeCtx>, parent: Option<u64>, seq: u64) -> bool;
    /// Spawns a fresh incarnation, number `run` of child `seq`, which reports
    /// its end on `exits`; `None` if the mailbox is gone.
    fn spawn(self: Arc<Self>, exits: &ExitTx, seq: u64, run: u64) -> Option<AbortHandle>;

    fn id(&self) -> u64 {
        self.lifecycle().id()
    }
    fn name(&self) -> &Arc<str> {
        self.lifecycle().name()
    }
    /// Takes child `seq` of `parent` (with its subtree) out of the registry.
    fn unregister(&self, tree: &TreeCtx, parent: u64, seq: u64) {
        tree.registry.remove_child(parent, seq);
    }
    /// True once a supervisor has taken the child.
    fn is_claimed(&self) -> bool {
        self.lifecycle().is_claimed()
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

/// Takes one actor for supervision and puts its live figures into the
/// tree's registry, for snapshots; false if a supervisor had taken it
/// already.
pub(super) fn register_probe<M: Send + 'static>(
    tree: &TreeCtx,
    shared: Arc<Shared<M>>,
    parent: Option<u64>,
    seq: u64,
    supervisor: bool,
) -> bool {
    if !shared.claim() {
        return false;
    }
    let id = shared.id;
    if supervisor {
        tree.registry
            .add_supervisor(id, parent, shared.clone() as Arc<dyn Probe>);
    }
    if let Some(parent) = parent {
        tree.registry
            .add_child(parent, seq, id, supervisor, shared as Arc<dyn Probe>);
    }
    true
}

/// How a supervisor starts one incarnation of an actor child, given the
/// incarnation's exit report (which holds the mailbox lease): kept in the
/// child's [`Shared`], with the factory inside.
pub(crate) type Spawner<M> = Box<dyn Fn(ExitReport<M>) -> AbortHandle + Send + Sync>;

/// The spawner of an actor built by `factory`. A closure without captures
/// makes it a zero-sized box, which allocates nothing.
fn spawner<A: Actor>(factory: impl Fn() -> A + Send + Sync + 'static) -> Spawner<A::Msg> {
    Box::new(move |mut report: ExitReport<A::Msg>| {
        // The incarnation is built here, on the supervisor's task. A factory
        // that panics is a failed start, like a failing hook: its task only
        // reports that.
        let actor = match std::panic::catch_unwind(AssertUnwindSafe(&factory)) {
            Ok(a) => a,
            Err(p) => {
                let exit = SlotExit::new(ExitReason::Panic(panic_message(p)));
                return tokio::spawn(async move { report.finish(exit) }).abort_handle();
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
                    Ok(Exit { reason, drained }) => SlotExit {
                        reason,
                        drained,
                        children: Vec::new(),
                    },
                    Err(p) => SlotExit::new(ExitReason::Panic(p)),
                }
            };
            report.finish(exit);
        });
        task.abort_handle()
    })
}

impl<M: Send + 'static> Slot for Shared<M> {
    fn lifecycle(&self) -> &dyn Lifecycle {
        self
    }
    fn register(self: Arc<Self>, tree: &Arc<TreeCtx>, parent: Option<u64>, seq: u64) -> bool {
        register_probe(tree, self, parent, seq, false)
    }
    fn spawn(self: Arc<Self>, exits: &ExitTx, seq: u64, run: u64) -> Option<AbortHandle> {
        let spawner = self.spawner.as_ref()?;
        let lease = self.lease()?;
        self.reset_control();
        Some(spawner(ExitReport::new(lease, exits, seq, run)))
    }
}

/// The spec of an actor child: its name, mailbox, factory and restart policy.
/// Its address exists from the start and stays valid for the child's whole
/// supervised life.
pub struct ChildSpec<A: Actor> {
    shared: Arc<Shared<A::Msg>>,
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
            shared: Shared::with_spawner(name.into(), capacity, Some(spawner(factory))),
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
    pub(super) slot: Arc<dyn Slot>,
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
            slot: spec.shared,
            restart: spec.restart,
            shutdown_timeout: spec.shutdown_timeout,
        }
    }
}
