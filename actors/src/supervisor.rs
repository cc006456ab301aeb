//! Supervisors: ordered children, restart strategies and policies, restart
//! intensity with escalation, exponential backoff, dynamic children and the
//! reverse-order draining shutdown.
//!
//! This file holds the [`Supervisor`] builder and the supervisor as a child of
//! another; the rest is split by job:
//!
//! - `policy`: strategy, restart policy, intensity, backoff;
//! - `spec`: child specs and the [`Child`] a supervisor holds;
//! - `run`: one incarnation of a supervisor and its loop;
//! - `restart`: what happens when a child ends by itself;
//! - `drain`: the shutdown of one supervisor's children;
//! - `handle`: [`SupervisorRef`] and [`SupervisorHandle`].

mod drain;
mod handle;
mod policy;
mod restart;
mod run;
mod spec;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{info_span, Instrument};

pub use handle::{SupervisorHandle, SupervisorRef};
pub use policy::{Backoff, Intensity, RestartPolicy, SupervisionStrategy};
pub(crate) use spec::Spawner;
pub use spec::{Child, ChildSpec, DEFAULT_MAILBOX};

use crate::addr::{Envelope, Lifecycle, MailboxLease, Reply, Shared};
use crate::exit::ExitReason;
use crate::incarnation::caught;
use crate::shutdown::ActorReport;
use crate::tree::Registry;
use run::{Core, SupervisorRun};
use spec::{register_probe, Slot};

/// Errors of supervisor requests.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SupervisorError {
    /// The supervisor is shutting down and takes no new children.
    #[error("supervisor is shutting down")]
    ShuttingDown,
    /// The supervisor has stopped.
    #[error("supervisor has stopped")]
    Stopped,
    /// No child with this id.
    #[error("no child with id {0}")]
    NoSuchChild(u64),
    /// This child is supervised already: a child is taken by one supervisor,
    /// once.
    #[error("child {0} is supervised already")]
    Duplicate(u64),
}

/// What a whole tree shares: the registry behind snapshots and the shutdown
/// broadcast.
pub(crate) struct TreeCtx {
    pub(crate) registry: Registry,
    shutting_down: AtomicBool,
    deadline: Mutex<Option<Instant>>,
}

impl TreeCtx {
    fn new() -> Self {
        TreeCtx {
            registry: Registry::default(),
            shutting_down: AtomicBool::new(false),
            deadline: Mutex::new(None),
        }
    }

    fn deadline(&self) -> Option<Instant> {
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// The broadcast: every supervisor of the tree sees the flag before it
    /// would start a restart, and drains by `deadline`.
    fn begin_shutdown(&self, deadline: Instant) {
        self.shutting_down.store(true, Ordering::Release);
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner()) = Some(deadline);
    }
}

/// How a child's task ends, whatever kind of child it is.
pub(crate) struct SlotExit {
    reason: ExitReason,
    drained: u64,
    children: Vec<ActorReport>,
}

impl SlotExit {
    /// An end with nothing drained and no children to report.
    fn new(reason: ExitReason) -> Self {
        SlotExit {
            reason,
            drained: 0,
            children: Vec::new(),
        }
    }
}

/// A child task's end as its supervisor receives it: which child (`seq`),
/// which of its incarnations (`run`), and how it ended.
pub(crate) struct ChildExit {
    pub(crate) seq: u64,
    pub(crate) run: u64,
    pub(crate) exit: SlotExit,
}

/// Where a supervisor's children report their ends: one channel per
/// supervisor incarnation, instead of a `JoinSet` with its per-task
/// bookkeeping.
pub(crate) type ExitTx = mpsc::UnboundedSender<ChildExit>;

/// What a child's task owns to report its end: its mailbox lease and the
/// supervisor's exit channel. Exactly one [`ChildExit`] is sent per task:
/// the one given to [`ExitReport::finish`], or `Aborted` when the task is
/// dropped before it finished (cut off at a deadline, or a panic that escaped
/// every guard). The mailbox goes back to the child before the exit is sent,
/// so a supervisor that restarts the child on that exit finds it there.
pub(crate) struct ExitReport<M> {
    lease: MailboxLease<M>,
    tx: ExitTx,
    seq: u64,
    run: u64,
    sent: bool,
}

impl<M> ExitReport<M> {
    pub(crate) fn new(lease: MailboxLease<M>, tx: &ExitTx, seq: u64, run: u64) -> Self {
        ExitReport {
            lease,
            tx: tx.clone(),
            seq,
            run,
            sent: false,
        }
    }

    /// The mailbox the task handles.
    pub(crate) fn rx(&mut self) -> &mut mpsc::Receiver<Envelope<M>> {
        self.lease.rx()
    }

    /// The child's shared state and the mailbox the task handles.
    pub(crate) fn parts(&mut self) -> (&Arc<Shared<M>>, &mut mpsc::Receiver<Envelope<M>>) {
        self.lease.parts()
    }

    /// Gives the mailbox back, then reports `exit`.
    pub(crate) fn finish(mut self, exit: SlotExit) {
        self.send(exit);
    }

    fn send(&mut self, exit: SlotExit) {
        self.sent = true;
        self.lease.release();
        // A closed channel means the supervisor incarnation is gone and no
        // longer waits for this child.
        let _ = self.tx.send(ChildExit {
            seq: self.seq,
            run: self.run,
            exit,
        });
    }
}

impl<M> Drop for ExitReport<M> {
    fn drop(&mut self) {
        if !self.sent {
            self.send(SlotExit::new(ExitReason::Aborted));
        }
    }
}

/// How long past the shutdown deadline a supervisor waits for a child
/// supervisor to report its own aborted children.
const SUBTREE_MARGIN: Duration = Duration::from_millis(100);

/// Requests a supervisor handles in its mailbox.
pub(crate) enum SupervisorMsg {
    Add {
        child: Child,
        reply: Option<Reply<Result<u64, SupervisorError>>>,
    },
    AddMany {
        children: Vec<Child>,
        reply: Reply<Result<Vec<u64>, SupervisorError>>,
    },
    Remove {
        id: u64,
        reply: Reply<Result<ActorReport, SupervisorError>>,
    },
}

impl SupervisorMsg {
    /// Refuses the request with `e`. A child that will never be supervised
    /// must not leave an open mailbox behind, so its mailbox is closed.
    fn refuse(self, e: SupervisorError) {
        match self {
            SupervisorMsg::Add { child, reply } => {
                child.slot.close();
                if let Some(reply) = reply {
                    let _ = reply.send(Err(e));
                }
            }
            SupervisorMsg::AddMany { children, reply } => {
                for child in children {
                    child.slot.close();
                }
                let _ = reply.send(Err(e));
            }
            SupervisorMsg::Remove { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

/// A supervisor under construction: configure it, add its children in start
/// order, then [`Supervisor::spawn`] it as a tree root or add it as a child of
/// another supervisor.
pub struct Supervisor {
    shared: Arc<Shared<SupervisorMsg>>,
    core: Arc<Mutex<Option<Core>>>,
    tree: Arc<OnceLock<Arc<TreeCtx>>>,
    restart: RestartPolicy,
    shutdown_timeout: Duration,
}

impl Supervisor {
    /// A one-for-one supervisor with default intensity (5 in 10 s) and backoff.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        let name: Arc<str> = name.into();
        let shared = Shared::new(name.clone(), DEFAULT_MAILBOX);
        let core = Core::new(name, shared.id);
        Supervisor {
            shared,
            core: Arc::new(Mutex::new(Some(core))),
            tree: Arc::new(OnceLock::new()),
            restart: RestartPolicy::Permanent,
            shutdown_timeout: Duration::from_secs(30),
        }
    }

    fn with_core(self, f: impl FnOnce(&mut Core)) -> Self {
        if let Some(core) = lock_core(&self.core).as_mut() {
            f(core);
        }
        self
    }

    /// Sets the restart strategy.
    pub fn strategy(self, strategy: SupervisionStrategy) -> Self {
        self.with_core(|c| c.strategy = strategy)
    }

    /// Sets the restart intensity.
    pub fn intensity(self, max_restarts: u32, window: Duration) -> Self {
        self.with_core(|c| {
            c.intensity = Intensity {
                max_restarts,
                window,
            }
        })
    }

    /// Sets the restart backoff.
    pub fn backoff(self, backoff: Backoff) -> Self {
        self.with_core(|c| c.backoff = backoff)
    }

    /// Sets this supervisor's own restart policy, used when it is a child.
    pub fn restart(mut self, restart: RestartPolicy) -> Self {
        self.restart = restart;
        self
    }

    /// Adds a child; children start in the order they are added and stop in
    /// reverse order.
    pub fn child(self, child: impl Into<Child>) -> Self {
        let child = child.into();
        self.with_core(move |c| {
            c.push(child, false);
        })
    }

    /// The supervisor's address, usable before it is spawned.
    pub fn supervisor_ref(&self) -> SupervisorRef {
        SupervisorRef {
            shared: self.shared.clone(),
            tree: self.tree.clone(),
        }
    }

    /// Spawns this supervisor as the root of a new tree on the current tokio
    /// runtime and starts its children in order.
    pub fn spawn(self) -> SupervisorHandle {
        let tree = Arc::new(TreeCtx::new());
        let sup = self.supervisor_ref();
        let slot = Arc::new(SupervisorSlot {
            shared: self.shared,
            core: self.core,
            tree: self.tree,
        });
        slot.clone().register(&tree, None, 0);
        let (tx, exits) = mpsc::unbounded_channel();
        // Invariant: a supervisor that was never spawned holds its core and mailbox.
        let abort = slot
            .clone()
            .spawn(&tx, 0, 0)
            .expect("an unspawned supervisor has its mailbox");
        SupervisorHandle {
            sup,
            root: slot,
            tree,
            exits,
            abort,
            exit: None,
        }
    }
}

impl From<Supervisor> for Child {
    fn from(sup: Supervisor) -> Self {
        Child {
            restart: sup.restart,
            shutdown_timeout: sup.shutdown_timeout,
            slot: Arc::new(SupervisorSlot {
                shared: sup.shared,
                core: sup.core,
                tree: sup.tree,
            }),
        }
    }
}

fn lock_core(core: &Mutex<Option<Core>>) -> MutexGuard<'_, Option<Core>> {
    // The core is moved in or out whole, so a poisoned lock still holds a
    // consistent value.
    core.lock().unwrap_or_else(|p| p.into_inner())
}

/// A supervisor seen by its parent (or by its [`SupervisorHandle`]). Its core
/// lives here between incarnations, and inside the running incarnation while
/// one runs.
struct SupervisorSlot {
    shared: Arc<Shared<SupervisorMsg>>,
    core: Arc<Mutex<Option<Core>>>,
    tree: Arc<OnceLock<Arc<TreeCtx>>>,
}

impl Slot for SupervisorSlot {
    fn lifecycle(&self) -> &dyn Lifecycle {
        &*self.shared
    }
    fn register(self: Arc<Self>, tree: &Arc<TreeCtx>, parent: Option<u64>, seq: u64) -> bool {
        if !register_probe(tree, self.shared.clone(), parent, seq, true) {
            return false;
        }
        let _ = self.tree.set(tree.clone());
        if let Some(core) = lock_core(&self.core).as_ref() {
            for (seq, e) in core.children.iter() {
                e.slot.clone().register(tree, Some(self.shared.id), seq);
            }
        }
        true
    }
    fn spawn(self: Arc<Self>, exits: &ExitTx, seq: u64, run: u64) -> Option<AbortHandle> {
        let tree = self.tree.get()?.clone();
        let lease = self.shared.lease()?;
        let Some(core) = lock_core(&self.core).take() else {
            drop(lease);
            return None;
        };
        self.shared.reset_control();
        let home = self.core.clone();
        let shared = self.shared.clone();
        // Supervisors are actors too: their events carry `actor` and `actor_id`.
        // A root span, like an actor's: see `incarnation::run`.
        let span =
            info_span!(parent: None, "supervisor", actor = %shared.name, actor_id = shared.id);
        let mut report = ExitReport::new(lease, exits, seq, run);
        let task = tokio::spawn(
            async move {
                let mut run = SupervisorRun::new(core, shared, tree);
                let exit = {
                    let supervise = std::pin::pin!(run.supervise(report.rx()));
                    match caught(supervise).await {
                        Ok(exit) => exit,
                        Err(p) => SlotExit::new(ExitReason::Panic(p)),
                    }
                };
                // Hand the children back for the next incarnation.
                *lock_core(&home) = Some(run.core);
                report.finish(exit);
            }
            .instrument(span),
        );
        Some(task.abort_handle())
    }
    fn is_supervisor(&self) -> bool {
        true
    }
    fn close(&self) {
        self.shared.close_mailbox();
        if let Some(core) = lock_core(&self.core).as_mut() {
            // Requests taken from the mailbox but never handled are refused
            // like those the closed mailbox dropped would have been answered.
            for msg in core.queued.drain(..) {
                msg.refuse(SupervisorError::Stopped);
            }
            for e in core.children.values() {
                e.slot.close();
            }
        }
    }
}
