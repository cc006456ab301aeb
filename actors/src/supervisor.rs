//! Supervisors: ordered children, restart strategies and policies, restart
//! intensity with escalation, exponential backoff, dynamic children and the
//! reverse-order draining shutdown.

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::{AbortHandle, Id as TaskId, JoinError, JoinSet};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::actor::{Actor, ExitReason};
use crate::addr::{Addr, Envelope, MailboxLease, Reply, Shared, CONTROL_DRAIN, CONTROL_YIELD};
use crate::incarnation::{self, catch_panic, panic_message, Exit};
use crate::shutdown::{ActorReport, ShutdownReport, StopOutcome};
use crate::tree::{ActorInfo, ActorState, Probe, Registry};

/// Which siblings are restarted with a failed child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Only the failed child.
    #[default]
    OneForOne,
    /// Every child: the others are stopped, then all start again in order.
    OneForAll,
    /// The failed child and every child started after it.
    RestForOne,
}

/// When a child is restarted after it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Restart {
    /// Always, whatever the reason.
    #[default]
    Permanent,
    /// Only after a failure (error, panic, escalation).
    Transient,
    /// Never: when it ends its mailbox is closed and it leaves the tree.
    Temporary,
}

/// Restart intensity: more than `max_restarts` restarts within `window` make
/// the supervisor give up, stop its children and fail towards its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intensity {
    /// Restarts allowed within the window.
    pub max_restarts: u32,
    /// The sliding window.
    pub window: Duration,
}

impl Default for Intensity {
    fn default() -> Self {
        Intensity {
            max_restarts: 5,
            window: Duration::from_secs(10),
        }
    }
}

/// Exponential restart backoff: the n-th restart of a child within the
/// intensity window waits `initial * 2^(n-1)`, capped at `max`, then spread by
/// `± jitter` (a fraction) so that siblings do not restart in lockstep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay before the first restart.
    pub initial: Duration,
    /// Upper bound of any delay, jitter included.
    pub max: Duration,
    /// Relative spread, between 0.0 and 1.0.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// No delay at all between a failure and the restart.
    pub const NONE: Backoff = Backoff {
        initial: Duration::ZERO,
        max: Duration::ZERO,
        jitter: 0.0,
    };

    /// The delay before restart number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(32);
        let base = self
            .initial
            .saturating_mul(1u32 << exp.min(31))
            .min(self.max);
        let jitter = self.jitter.clamp(0.0, 1.0);
        if jitter == 0.0 || base.is_zero() {
            return base;
        }
        // A factor in [1 - jitter, 1 + jitter].
        let factor = 1.0 - jitter + 2.0 * jitter * unit_random();
        base.mul_f64(factor).min(self.max)
    }
}

/// A uniform number in [0, 1) from a per-thread xorshift seeded by the OS.
fn unit_random() -> f64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(RandomState::new().hash_one(0u64) | 1);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

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
    /// A child with this id is supervised already.
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
    fn deadline(&self) -> Option<Instant> {
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
}

/// How a child's task ends, whatever kind of child it is.
pub(crate) struct SlotExit {
    reason: ExitReason,
    drained: u64,
    children: Vec<ActorReport>,
}

/// A child of any kind (actor or supervisor), seen by its supervisor.
trait Slot: Send {
    fn id(&self) -> u64;
    fn name(&self) -> &Arc<str>;
    fn register(&self, tree: &Arc<TreeCtx>, parent: Option<u64>);
    fn unregister(&self, tree: &TreeCtx);
    /// Spawns a fresh incarnation into `set`; `None` if the mailbox is gone.
    fn spawn(&self, set: &mut JoinSet<SlotExit>) -> Option<AbortHandle>;
    fn request_stop(&self, mode: u8);
    fn set_state(&self, state: ActorState);
    fn add_restart(&self) -> u32;
    /// Ends the child for good: closes its mailbox, failing every queued ask.
    fn close(&self);
    /// True for supervisors, which enforce the shutdown deadline themselves.
    fn is_supervisor(&self) -> bool {
        false
    }
}

struct ActorSlot<A: Actor> {
    shared: Arc<Shared<A::Msg>>,
    factory: Arc<dyn Fn() -> A + Send + Sync>,
}

impl<A: Actor> Slot for ActorSlot<A> {
    fn id(&self) -> u64 {
        self.shared.id
    }
    fn name(&self) -> &Arc<str> {
        &self.shared.name
    }
    fn register(&self, tree: &Arc<TreeCtx>, parent: Option<u64>) {
        tree.registry.insert(
            self.shared.id,
            self.shared.name.clone(),
            parent,
            false,
            self.shared.clone() as Arc<dyn Probe>,
        );
    }
    fn unregister(&self, tree: &TreeCtx) {
        tree.registry.remove(self.shared.id);
    }
    fn spawn(&self, set: &mut JoinSet<SlotExit>) -> Option<AbortHandle> {
        let lease = self.shared.lease()?;
        self.shared.reset_control();
        let shared = self.shared.clone();
        let factory = self.factory.clone();
        Some(set.spawn(async move {
            // A factory that panics is a failed start, like a failing hook.
            let actor = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| factory())) {
                Ok(a) => a,
                Err(p) => {
                    drop(lease);
                    return SlotExit {
                        reason: ExitReason::Panic(panic_message(p)),
                        drained: 0,
                        children: Vec::new(),
                    };
                }
            };
            let Exit { reason, drained } = incarnation::run(actor, shared, lease).await;
            SlotExit {
                reason,
                drained,
                children: Vec::new(),
            }
        }))
    }
    fn request_stop(&self, mode: u8) {
        self.shared.request_stop(mode);
    }
    fn set_state(&self, state: ActorState) {
        self.shared.set_state(state);
    }
    fn add_restart(&self) -> u32 {
        self.shared.add_restart()
    }
    fn close(&self) {
        self.shared.close_mailbox();
    }
}

/// The spec of an actor child: its name, mailbox, factory and restart policy.
/// Its address exists from the start and stays valid for the child's whole
/// supervised life.
pub struct ChildSpec<A: Actor> {
    shared: Arc<Shared<A::Msg>>,
    factory: Arc<dyn Fn() -> A + Send + Sync>,
    restart: Restart,
    shutdown_timeout: Duration,
}

/// How long past the shutdown deadline a supervisor waits for a child
/// supervisor to report its own aborted children.
const SUBTREE_MARGIN: Duration = Duration::from_millis(100);

/// Mailbox capacity of [`ChildSpec::new`].
pub const DEFAULT_MAILBOX: usize = 64;

impl<A: Actor> ChildSpec<A> {
    /// A permanent child with a mailbox of [`DEFAULT_MAILBOX`] messages; each
    /// incarnation is built by `factory`.
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
            factory: Arc::new(factory),
            restart: Restart::Permanent,
            shutdown_timeout: Duration::from_secs(5),
        }
    }

    /// Sets the restart policy.
    pub fn restart(mut self, restart: Restart) -> Self {
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
/// [`ChildSpec`] or a [`Supervisor`] with `into()`.
pub struct Child {
    slot: Box<dyn Slot>,
    restart: Restart,
    shutdown_timeout: Duration,
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

/// A supervisor under construction: configure it, add its children in start
/// order, then [`Supervisor::spawn`] it as a tree root or add it as a child of
/// another supervisor.
pub struct Supervisor {
    shared: Arc<Shared<SupervisorMsg>>,
    core: Arc<Mutex<Option<Core>>>,
    tree: Arc<OnceLock<Arc<TreeCtx>>>,
    restart: Restart,
    shutdown_timeout: Duration,
}

/// What a supervisor keeps across its own restarts: its configuration and its
/// children (with their mailboxes).
struct Core {
    name: Arc<str>,
    id: u64,
    strategy: Strategy,
    intensity: Intensity,
    backoff: Backoff,
    children: BTreeMap<u64, Entry>,
    /// Child actor id -> seq, so adds and removals need no scan of `children`.
    ids: HashMap<u64, u64>,
    next_seq: u64,
    /// Incarnations of this supervisor so far.
    incarnations: u64,
}

struct Entry {
    slot: Box<dyn Slot>,
    restart: Restart,
    shutdown_timeout: Duration,
    dynamic: bool,
    /// Restart times of this child within the intensity window: its backoff attempt.
    history: VecDeque<Instant>,
    run: Run,
    /// When set, the child is started again once idle and this instant has passed.
    restart_at: Option<Instant>,
    /// When set, the child leaves the tree once it has stopped.
    removal: Option<Removal>,
}

enum Removal {
    Discard,
    Reply(Reply<Result<ActorReport, SupervisorError>>),
}

enum Run {
    Idle,
    Running {
        task: TaskId,
        abort: AbortHandle,
    },
    Stopping {
        task: TaskId,
        abort: AbortHandle,
        kill_at: Option<Instant>,
    },
}

impl Run {
    fn task(&self) -> Option<TaskId> {
        match self {
            Run::Idle => None,
            Run::Running { task, .. } | Run::Stopping { task, .. } => Some(*task),
        }
    }
}

impl Supervisor {
    /// A one-for-one supervisor with default intensity (5 in 10 s) and backoff.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        let name: Arc<str> = name.into();
        let shared = Shared::new(name.clone(), DEFAULT_MAILBOX);
        let tree = Arc::new(OnceLock::new());
        let core = Core {
            name,
            id: shared.id,
            strategy: Strategy::default(),
            intensity: Intensity::default(),
            backoff: Backoff::default(),
            children: BTreeMap::new(),
            ids: HashMap::new(),
            next_seq: 0,
            incarnations: 0,
        };
        Supervisor {
            shared,
            core: Arc::new(Mutex::new(Some(core))),
            tree,
            restart: Restart::Permanent,
            shutdown_timeout: Duration::from_secs(30),
        }
    }

    fn with_core(mut self, f: impl FnOnce(&mut Core)) -> Self {
        if let Some(core) = self.core_mut().as_mut() {
            f(core);
        }
        self
    }

    fn core_mut(&mut self) -> std::sync::MutexGuard<'_, Option<Core>> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the restart strategy.
    pub fn strategy(self, strategy: Strategy) -> Self {
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
    pub fn restart(mut self, restart: Restart) -> Self {
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
        let tree = Arc::new(TreeCtx {
            registry: Registry::default(),
            shutting_down: AtomicBool::new(false),
            deadline: Mutex::new(None),
        });
        let slot = SupervisorSlot {
            shared: self.shared.clone(),
            core: self.core.clone(),
            tree: self.tree.clone(),
        };
        slot.register(&tree, None);
        let mut set = JoinSet::new();
        // Invariant: a supervisor that was never spawned holds its core and mailbox.
        slot.spawn(&mut set)
            .expect("an unspawned supervisor has its mailbox");
        SupervisorHandle {
            sup: self.supervisor_ref(),
            root: slot,
            tree,
            set,
            exit: None,
        }
    }
}

impl From<Supervisor> for Child {
    fn from(sup: Supervisor) -> Self {
        Child {
            restart: sup.restart,
            shutdown_timeout: sup.shutdown_timeout,
            slot: Box::new(SupervisorSlot {
                shared: sup.shared,
                core: sup.core,
                tree: sup.tree,
            }),
        }
    }
}

struct SupervisorSlot {
    shared: Arc<Shared<SupervisorMsg>>,
    core: Arc<Mutex<Option<Core>>>,
    tree: Arc<OnceLock<Arc<TreeCtx>>>,
}

impl SupervisorSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Core>> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Slot for SupervisorSlot {
    fn id(&self) -> u64 {
        self.shared.id
    }
    fn name(&self) -> &Arc<str> {
        &self.shared.name
    }
    fn register(&self, tree: &Arc<TreeCtx>, parent: Option<u64>) {
        let _ = self.tree.set(tree.clone());
        tree.registry.insert(
            self.shared.id,
            self.shared.name.clone(),
            parent,
            true,
            self.shared.clone() as Arc<dyn Probe>,
        );
        if let Some(core) = self.lock().as_ref() {
            for e in core.children.values() {
                e.slot.register(tree, Some(self.shared.id));
            }
        }
    }
    fn unregister(&self, tree: &TreeCtx) {
        tree.registry.remove(self.shared.id);
        if let Some(core) = self.lock().as_ref() {
            for e in core.children.values() {
                e.slot.unregister(tree);
            }
        }
    }
    fn spawn(&self, set: &mut JoinSet<SlotExit>) -> Option<AbortHandle> {
        let tree = self.tree.get()?.clone();
        let lease = self.shared.lease()?;
        let Some(core) = self.lock().take() else {
            drop(lease);
            return None;
        };
        self.shared.reset_control();
        let home = self.core.clone();
        let shared = self.shared.clone();
        Some(set.spawn(async move {
            let mut run = SupervisorRun::new(core, shared, tree);
            let res = catch_panic(run.supervise(lease)).await;
            let exit = match res {
                Ok(exit) => exit,
                Err(p) => SlotExit {
                    reason: ExitReason::Panic(p),
                    drained: 0,
                    children: Vec::new(),
                },
            };
            // Hand the children back for the next incarnation.
            *home.lock().unwrap_or_else(|p| p.into_inner()) = Some(run.core);
            exit
        }))
    }
    fn request_stop(&self, mode: u8) {
        self.shared.request_stop(mode);
    }
    fn set_state(&self, state: ActorState) {
        self.shared.set_state(state);
    }
    fn add_restart(&self) -> u32 {
        self.shared.add_restart()
    }
    fn is_supervisor(&self) -> bool {
        true
    }
    fn close(&self) {
        self.shared.close_mailbox();
        if let Some(core) = self.lock().as_ref() {
            for e in core.children.values() {
                e.slot.close();
            }
        }
    }
}

impl Core {
    fn push(&mut self, child: Child, dynamic: bool) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.ids.insert(child.slot.id(), seq);
        self.children.insert(
            seq,
            Entry {
                slot: child.slot,
                restart: child.restart,
                shutdown_timeout: child.shutdown_timeout,
                dynamic,
                history: VecDeque::new(),
                run: Run::Idle,
                restart_at: None,
                removal: None,
            },
        );
        seq
    }
}

/// One incarnation of a supervisor.
struct SupervisorRun {
    core: Core,
    shared: Arc<Shared<SupervisorMsg>>,
    tree: Arc<TreeCtx>,
    set: JoinSet<SlotExit>,
    by_task: HashMap<TaskId, u64>,
    /// Restart times within the intensity window, all children together.
    restarts: VecDeque<Instant>,
    /// Pending restarts and kill deadlines; entries may be stale.
    timers: BinaryHeap<Reverse<Instant>>,
    /// Children with a pending restart, in start order.
    pending: BTreeSet<u64>,
}

enum Step {
    Continue,
    Escalate(String),
}

impl SupervisorRun {
    fn new(core: Core, shared: Arc<Shared<SupervisorMsg>>, tree: Arc<TreeCtx>) -> Self {
        SupervisorRun {
            core,
            shared,
            tree,
            set: JoinSet::new(),
            by_task: HashMap::new(),
            restarts: VecDeque::new(),
            timers: BinaryHeap::new(),
            pending: BTreeSet::new(),
        }
    }

    fn name(&self) -> Arc<str> {
        self.core.name.clone()
    }

    async fn supervise(&mut self, mut lease: MailboxLease<SupervisorMsg>) -> SlotExit {
        let name = self.name();
        let id = self.core.id;
        let restarted = self.core.incarnations > 0;
        self.core.incarnations += 1;
        // Children left with a pending removal by an earlier incarnation go now;
        // temporary children do not outlive an incarnation of their supervisor.
        let gone: Vec<u64> = self
            .core
            .children
            .iter()
            .filter(|(_, e)| (restarted && e.restart == Restart::Temporary) || e.removal.is_some())
            .map(|(s, _)| *s)
            .collect();
        for seq in gone {
            self.discard(seq);
        }
        let seqs: Vec<u64> = self.core.children.keys().copied().collect();
        for seq in seqs {
            self.start(seq);
        }
        if self.shared.control() < CONTROL_DRAIN {
            self.shared.set_state(ActorState::Running);
        }
        info!(actor = %name, actor_id = id, children = self.core.children.len(), "supervisor started");

        let rx = lease.rx();
        loop {
            match self.shared.control() {
                CONTROL_YIELD => {
                    self.stop_all_for_restart().await;
                    info!(actor = %name, actor_id = id, reason = "restart", "supervisor stopped");
                    return SlotExit {
                        reason: ExitReason::Restart,
                        drained: 0,
                        children: Vec::new(),
                    };
                }
                CONTROL_DRAIN => {
                    let exit = self.drain(rx).await;
                    info!(actor = %name, actor_id = id, reason = %exit.reason, "supervisor stopped");
                    return exit;
                }
                _ => {}
            }
            let next_timer = self.timers.peek().map(|Reverse(t)| *t);
            let step = tokio::select! {
                biased;
                env = rx.recv() => match env {
                    Some(Envelope::Msg(msg)) => { self.command(msg); Step::Continue }
                    Some(Envelope::Wake) | None => Step::Continue,
                },
                Some(res) = self.set.join_next_with_id(), if !self.set.is_empty() => {
                    self.child_exited(res)
                }
                _ = sleep_until_opt(next_timer), if next_timer.is_some() => {
                    self.fire_timers();
                    Step::Continue
                }
            };
            if let Step::Escalate(cause) = step {
                error!(
                    actor = %name,
                    actor_id = id,
                    max_restarts = self.core.intensity.max_restarts,
                    window_ms = self.core.intensity.window.as_millis() as u64,
                    cause = %cause,
                    "supervisor restart intensity exceeded, escalating"
                );
                self.stop_all_for_restart().await;
                self.shared.set_state(ActorState::Stopping);
                return SlotExit {
                    reason: ExitReason::Escalated(format!(
                        "{name}: more than {} restarts in {:?}; last: {cause}",
                        self.core.intensity.max_restarts, self.core.intensity.window
                    )),
                    drained: 0,
                    children: Vec::new(),
                };
            }
        }
    }

    fn command(&mut self, msg: SupervisorMsg) {
        match msg {
            SupervisorMsg::Add { child, reply } => {
                let res = self.add(child);
                if let Some(reply) = reply {
                    let _ = reply.send(res);
                }
            }
            SupervisorMsg::AddMany { children, reply } => {
                let mut ids = Vec::with_capacity(children.len());
                let mut res = Ok(());
                for child in children {
                    // After a refusal the rest are not supervised either.
                    if res.is_err() {
                        if !self.core.ids.contains_key(&child.slot.id()) {
                            child.slot.close();
                        }
                        continue;
                    }
                    match self.add(child) {
                        Ok(id) => ids.push(id),
                        Err(e) => res = Err(e),
                    }
                }
                let _ = reply.send(res.map(|()| ids));
            }
            SupervisorMsg::Remove { id, reply } => {
                let Some(seq) = self.seq_of(id) else {
                    let _ = reply.send(Err(SupervisorError::NoSuchChild(id)));
                    return;
                };
                let now = Instant::now();
                let entry = self.core.children.get_mut(&seq).expect("seq_of found it");
                entry.restart_at = None;
                self.pending.remove(&seq);
                match &entry.run {
                    Run::Idle => {
                        let report =
                            ActorReport::leaf(entry.slot.as_ref(), StopOutcome::NotRunning, 0);
                        self.discard(seq);
                        let _ = reply.send(Ok(report));
                    }
                    Run::Running { task, abort } | Run::Stopping { task, abort, .. } => {
                        let kill_at = now + entry.shutdown_timeout;
                        entry.run = Run::Stopping {
                            task: *task,
                            abort: abort.clone(),
                            kill_at: Some(kill_at),
                        };
                        entry.removal = Some(Removal::Reply(reply));
                        entry.slot.request_stop(CONTROL_DRAIN);
                        self.timers.push(Reverse(kill_at));
                    }
                }
            }
        }
    }

    /// Registers and starts a dynamic child.
    fn add(&mut self, child: Child) -> Result<u64, SupervisorError> {
        let id = child.slot.id();
        if self.core.ids.contains_key(&id) {
            // The same mailbox is supervised already: leave it open.
            return Err(SupervisorError::Duplicate(id));
        }
        child.slot.register(&self.tree, Some(self.core.id));
        let seq = self.core.push(child, true);
        self.start(seq);
        Ok(id)
    }

    fn seq_of(&self, id: u64) -> Option<u64> {
        self.core.ids.get(&id).copied()
    }

    /// Starts an idle child.
    fn start(&mut self, seq: u64) {
        let Some(entry) = self.core.children.get_mut(&seq) else {
            return;
        };
        if !matches!(entry.run, Run::Idle) {
            return;
        }
        entry.restart_at = None;
        self.pending.remove(&seq);
        match entry.slot.spawn(&mut self.set) {
            Some(abort) => {
                let task = abort.id();
                self.by_task.insert(task, seq);
                entry.run = Run::Running { task, abort };
            }
            None => {
                warn!(actor = %entry.slot.name(), actor_id = entry.slot.id(), "child has no mailbox, removing it");
                self.discard(seq);
            }
        }
    }

    /// Removes a stopped child from the tree and fails its queued asks.
    fn discard(&mut self, seq: u64) -> Option<Entry> {
        let entry = self.core.children.remove(&seq)?;
        self.core.ids.remove(&entry.slot.id());
        self.pending.remove(&seq);
        entry.slot.close();
        entry.slot.unregister(&self.tree);
        Some(entry)
    }

    fn exit_of(&mut self, res: Result<(TaskId, SlotExit), JoinError>) -> Option<(u64, SlotExit)> {
        let (task, exit) = match res {
            Ok((task, exit)) => (task, exit),
            Err(e) => {
                let task = e.id();
                let reason = if e.is_panic() {
                    ExitReason::Panic(panic_message(e.into_panic()))
                } else {
                    ExitReason::Aborted
                };
                (
                    task,
                    SlotExit {
                        reason,
                        drained: 0,
                        children: Vec::new(),
                    },
                )
            }
        };
        let seq = self.by_task.remove(&task)?;
        let entry = self.core.children.get_mut(&seq)?;
        entry.run = Run::Idle;
        Some((seq, exit))
    }

    fn child_exited(&mut self, res: Result<(TaskId, SlotExit), JoinError>) -> Step {
        let Some((seq, exit)) = self.exit_of(res) else {
            return Step::Continue;
        };
        let Some(entry) = self.core.children.get_mut(&seq) else {
            return Step::Continue;
        };
        if let Some(removal) = entry.removal.take() {
            let outcome = match &exit.reason {
                ExitReason::Shutdown | ExitReason::Normal => StopOutcome::Drained,
                ExitReason::Aborted => StopOutcome::Aborted,
                other => StopOutcome::Failed(other.clone()),
            };
            let report = ActorReport {
                name: entry.slot.name().to_string(),
                id: entry.slot.id(),
                outcome,
                handled: exit.drained,
                children: exit.children,
            };
            self.discard(seq);
            if let Removal::Reply(reply) = removal {
                let _ = reply.send(Ok(report));
            }
            return Step::Continue;
        }
        if entry.restart_at.is_some() {
            // Stopped for a sibling's restart: start again in order when due.
            self.start_due();
            return Step::Continue;
        }
        self.on_exit(seq, exit.reason)
    }

    /// Applies the restart policy, intensity and strategy to a child that ended
    /// by itself.
    fn on_exit(&mut self, seq: u64, reason: ExitReason) -> Step {
        let sup = self.name();
        let Some(entry) = self.core.children.get(&seq) else {
            return Step::Continue;
        };
        let restart = match entry.restart {
            Restart::Permanent => true,
            Restart::Transient => reason.is_failure(),
            Restart::Temporary => false,
        };
        if !restart || self.tree.is_shutting_down() {
            if reason.is_failure() {
                warn!(supervisor = %sup, actor = %entry.slot.name(), actor_id = entry.slot.id(), reason = %reason, "actor not restarted");
            }
            entry.slot.set_state(ActorState::Stopped);
            self.discard(seq);
            return Step::Continue;
        }

        let now = Instant::now();
        let window = self.core.intensity.window;
        while self
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            self.restarts.pop_front();
        }
        self.restarts.push_back(now);
        if self.restarts.len() as u64 > self.core.intensity.max_restarts as u64 {
            return Step::Escalate(format!("{}: {reason}", entry.slot.name()));
        }

        let group: Vec<u64> = match self.core.strategy {
            Strategy::OneForOne => vec![seq],
            Strategy::OneForAll => self.core.children.keys().copied().collect(),
            Strategy::RestForOne => self.core.children.range(seq..).map(|(s, _)| *s).collect(),
        };

        // Invariant: `seq` is a child (checked above) and nothing removed it since.
        let entry = self.core.children.get_mut(&seq).expect("child present");
        while entry
            .history
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            entry.history.pop_front();
        }
        entry.history.push_back(now);
        let attempt = entry.history.len() as u32;
        let backoff = self.core.backoff.delay(attempt);
        let at = now + backoff;
        self.timers.push(Reverse(at));

        for member in group {
            let Some(e) = self.core.children.get_mut(&member) else {
                continue;
            };
            if member != seq && e.restart == Restart::Temporary {
                // Temporary siblings are stopped with the group, never restarted.
                e.removal = Some(Removal::Discard);
                if let Run::Running { task, abort } = &e.run {
                    let kill_at = now + e.shutdown_timeout;
                    e.run = Run::Stopping {
                        task: *task,
                        abort: abort.clone(),
                        kill_at: Some(kill_at),
                    };
                    e.slot.request_stop(CONTROL_YIELD);
                    self.timers.push(Reverse(kill_at));
                } else {
                    self.discard(member);
                }
                continue;
            }
            let restarts = e.slot.add_restart();
            e.slot.set_state(ActorState::Restarting);
            e.restart_at = Some(at);
            self.pending.insert(member);
            warn!(
                supervisor = %sup,
                actor = %e.slot.name(),
                actor_id = e.slot.id(),
                attempt,
                restarts,
                backoff_ms = backoff.as_millis() as u64,
                reason = %if member == seq { reason.clone() } else { ExitReason::Restart },
                "actor restarting"
            );
            if let Run::Running { task, abort } = &e.run {
                let kill_at = now + e.shutdown_timeout;
                e.run = Run::Stopping {
                    task: *task,
                    abort: abort.clone(),
                    kill_at: Some(kill_at),
                };
                e.slot.request_stop(CONTROL_YIELD);
                self.timers.push(Reverse(kill_at));
            }
        }
        if backoff.is_zero() {
            self.start_due();
        }
        Step::Continue
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while self.timers.peek().is_some_and(|Reverse(t)| *t <= now) {
            self.timers.pop();
        }
        for e in self.core.children.values_mut() {
            if let Run::Stopping {
                abort,
                kill_at: Some(k),
                ..
            } = &e.run
            {
                if *k <= now {
                    warn!(actor = %e.slot.name(), actor_id = e.slot.id(), timeout_ms = e.shutdown_timeout.as_millis() as u64, "child did not stop in time, aborting");
                    abort.abort();
                }
            }
        }
        self.start_due();
    }

    /// Starts every child whose restart is due, in start order; a child that
    /// is still stopping holds back the ones after it.
    fn start_due(&mut self) {
        // A nested supervisor learns of a shutdown only when its parent drains
        // it; until then no pending restart may fire.
        if self.tree.is_shutting_down() {
            return;
        }
        let now = Instant::now();
        let pending: Vec<u64> = self.pending.iter().copied().collect();
        for seq in pending {
            let Some(e) = self.core.children.get(&seq) else {
                self.pending.remove(&seq);
                continue;
            };
            if !matches!(e.run, Run::Idle) {
                break;
            }
            match e.restart_at {
                Some(at) if at <= now => self.start(seq),
                Some(_) => {}
                None => {
                    self.pending.remove(&seq);
                }
            }
        }
    }

    /// Stops every running child, last started first, keeping their mailboxes
    /// for the next incarnation of this supervisor.
    async fn stop_all_for_restart(&mut self) {
        self.pending.clear();
        let seqs: Vec<u64> = self.core.children.keys().rev().copied().collect();
        for seq in seqs {
            let Some(e) = self.core.children.get_mut(&seq) else {
                continue;
            };
            e.restart_at = None;
            if let Some(task) = e.run.task() {
                e.slot.request_stop(CONTROL_YIELD);
                let timeout = e.shutdown_timeout;
                self.wait_for(&[task], Some(Instant::now() + timeout)).await;
            }
            if let Some(e) = self.core.children.get(&seq) {
                e.slot.set_state(ActorState::Restarting);
            }
        }
        // Whatever still runs (a child that ignored the stop) is cut off.
        self.set.shutdown().await;
        self.by_task.clear();
        for e in self.core.children.values_mut() {
            e.run = Run::Idle;
        }
    }

    /// Waits until every task in `tasks` has ended, aborting all of them at
    /// `deadline`. Returns the exits, in the order they arrived.
    async fn wait_for(
        &mut self,
        tasks: &[TaskId],
        deadline: Option<Instant>,
    ) -> Vec<(u64, SlotExit)> {
        let mut left: std::collections::HashSet<TaskId> = tasks.iter().copied().collect();
        let mut exits = Vec::with_capacity(tasks.len());
        let mut aborted = false;
        // One timer for the whole wait: registering a fresh one per exit would
        // cost a timer-wheel insert and removal for every child.
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let sleep = tokio::time::sleep_until(deadline.unwrap_or(far));
        tokio::pin!(sleep);
        while !left.is_empty() && !self.set.is_empty() {
            let res = match deadline {
                Some(_) if !aborted => {
                    tokio::select! {
                        biased;
                        res = self.set.join_next_with_id() => res,
                        _ = &mut sleep => {
                            for t in &left {
                                if let Some(seq) = self.by_task.get(t) {
                                    if let Some(e) = self.core.children.get(seq) {
                                        warn!(actor = %e.slot.name(), actor_id = e.slot.id(), "grace period over, aborting actor");
                                        if let Run::Running { abort, .. } | Run::Stopping { abort, .. } = &e.run {
                                            abort.abort();
                                        }
                                    }
                                }
                            }
                            aborted = true;
                            continue;
                        }
                    }
                }
                _ => self.set.join_next_with_id().await,
            };
            let Some(res) = res else { break };
            let task = match &res {
                Ok((t, _)) => *t,
                Err(e) => e.id(),
            };
            left.remove(&task);
            if let Some(exit) = self.exit_of(res) {
                exits.push(exit);
            }
        }
        exits
    }

    /// The shutdown of this supervisor: close its own mailbox, cancel pending
    /// restarts, drain dynamic children together, then static children one by
    /// one in reverse start order, all within the tree's deadline.
    async fn drain(
        &mut self,
        rx: &mut tokio::sync::mpsc::Receiver<Envelope<SupervisorMsg>>,
    ) -> SlotExit {
        self.shared.set_state(ActorState::Stopping);
        rx.close();
        while let Ok(env) = rx.try_recv() {
            match env {
                Envelope::Msg(SupervisorMsg::Add { child, reply }) => {
                    child.slot.close();
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(SupervisorError::ShuttingDown));
                    }
                }
                Envelope::Msg(SupervisorMsg::AddMany { children, reply }) => {
                    for child in children {
                        child.slot.close();
                    }
                    let _ = reply.send(Err(SupervisorError::ShuttingDown));
                }
                Envelope::Msg(SupervisorMsg::Remove { reply, .. }) => {
                    let _ = reply.send(Err(SupervisorError::ShuttingDown));
                }
                Envelope::Wake => {}
            }
        }
        let deadline = self.tree.deadline();
        let mut reports: Vec<ActorReport> = Vec::new();

        // Children waiting for a restart are not started again.
        self.pending.clear();
        let idle: Vec<u64> = self
            .core
            .children
            .iter()
            .filter(|(_, e)| matches!(e.run, Run::Idle))
            .map(|(s, _)| *s)
            .collect();
        for seq in idle {
            if let Some(e) = self.core.children.get_mut(&seq) {
                e.restart_at = None;
                reports.push(ActorReport::leaf(
                    e.slot.as_ref(),
                    StopOutcome::NotRunning,
                    0,
                ));
                e.slot.close();
            }
        }

        let dynamic: Vec<u64> = self
            .core
            .children
            .iter()
            .rev()
            .filter(|(_, e)| e.dynamic && e.run.task().is_some())
            .map(|(s, _)| *s)
            .collect();
        let statics: Vec<u64> = self
            .core
            .children
            .iter()
            .rev()
            .filter(|(_, e)| !e.dynamic && e.run.task().is_some())
            .map(|(s, _)| *s)
            .collect();

        let mut groups: Vec<Vec<u64>> = Vec::new();
        if !dynamic.is_empty() {
            groups.push(dynamic);
        }
        groups.extend(statics.into_iter().map(|s| vec![s]));
        for group in groups {
            let mut tasks = Vec::with_capacity(group.len());
            let mut group_deadline = deadline;
            for seq in &group {
                if let Some(e) = self.core.children.get(seq) {
                    if e.slot.is_supervisor() {
                        // It aborts its own children at the deadline and then
                        // reports them; aborting it at the same instant would
                        // lose that report.
                        group_deadline = deadline.map(|d| d + SUBTREE_MARGIN);
                    }
                    if let Some(task) = e.run.task() {
                        e.slot.request_stop(CONTROL_DRAIN);
                        tasks.push(task);
                    }
                }
            }
            // Past the deadline every remaining wait aborts at once.
            for (seq, exit) in self.wait_for(&tasks, group_deadline).await {
                if let Some(e) = self.core.children.get(&seq) {
                    let outcome = match exit.reason {
                        ExitReason::Shutdown => StopOutcome::Drained,
                        ExitReason::Aborted => StopOutcome::Aborted,
                        // A supervisor stopped by its own child's escalation, a
                        // failing handler during the drain, a self-stop: all
                        // ended without a full drain.
                        other => StopOutcome::Failed(other),
                    };
                    reports.push(ActorReport {
                        name: e.slot.name().to_string(),
                        id: e.slot.id(),
                        outcome,
                        handled: exit.drained,
                        children: exit.children,
                    });
                    e.slot.close();
                }
            }
        }
        // Children that ended on their own during the drain, or that a
        // sub-supervisor abort left behind.
        self.set.shutdown().await;
        for e in self.core.children.values() {
            e.slot.set_state(ActorState::Stopped);
            e.slot.close();
        }
        self.shared.set_state(ActorState::Stopped);
        SlotExit {
            reason: ExitReason::Shutdown,
            drained: 0,
            children: reports,
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The address of a supervisor: add and remove children, take snapshots.
#[derive(Clone)]
pub struct SupervisorRef {
    shared: Arc<Shared<SupervisorMsg>>,
    tree: Arc<OnceLock<Arc<TreeCtx>>>,
}

impl std::fmt::Debug for SupervisorRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisorRef")
            .field("name", &self.shared.name)
            .field("id", &self.shared.id)
            .finish()
    }
}

impl SupervisorRef {
    /// The supervisor's id.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The supervisor's name.
    pub fn name(&self) -> &Arc<str> {
        &self.shared.name
    }

    async fn send(&self, msg: SupervisorMsg) -> Result<(), SupervisorError> {
        // A child that will never be supervised must not leave an open mailbox.
        fn refuse(msg: SupervisorMsg, e: SupervisorError) -> SupervisorError {
            match msg {
                SupervisorMsg::Add { child, .. } => child.slot.close(),
                SupervisorMsg::AddMany { children, .. } => {
                    for child in children {
                        child.slot.close();
                    }
                }
                SupervisorMsg::Remove { .. } => {}
            }
            e
        }
        if self.shared.control() == CONTROL_DRAIN {
            return Err(refuse(msg, SupervisorError::ShuttingDown));
        }
        self.shared.tx.send(Envelope::Msg(msg)).await.map_err(
            |tokio::sync::mpsc::error::SendError(env)| match env {
                Envelope::Msg(msg) => refuse(msg, SupervisorError::Stopped),
                Envelope::Wake => SupervisorError::Stopped,
            },
        )
    }

    /// Adds a child at run time and starts it; it is stopped before the static
    /// children at shutdown, together with the other dynamic children.
    /// Returns the child's id.
    pub async fn add_child(&self, child: impl Into<Child>) -> Result<u64, SupervisorError> {
        let (reply, rx) = oneshot::channel();
        self.send(SupervisorMsg::Add {
            child: child.into(),
            reply: Some(reply),
        })
        .await?;
        rx.await.map_err(|_| SupervisorError::Stopped)?
    }

    /// Like [`SupervisorRef::add_child`] without waiting for the child to
    /// start; the child's address works at once.
    pub async fn tell_add_child(&self, child: impl Into<Child>) -> Result<(), SupervisorError> {
        self.send(SupervisorMsg::Add {
            child: child.into(),
            reply: None,
        })
        .await
    }

    /// Adds many children at run time in one message and starts them in
    /// order, e.g. a pool of identical workers. Returns their ids. After a
    /// duplicate, the remaining children are refused too.
    pub async fn add_children(
        &self,
        children: impl IntoIterator<Item = Child>,
    ) -> Result<Vec<u64>, SupervisorError> {
        let (reply, rx) = oneshot::channel();
        self.send(SupervisorMsg::AddMany {
            children: children.into_iter().collect(),
            reply,
        })
        .await?;
        rx.await.map_err(|_| SupervisorError::Stopped)?
    }

    /// Drains and stops the child with this id and removes it from the tree.
    pub async fn remove_child(&self, id: u64) -> Result<ActorReport, SupervisorError> {
        let (reply, rx) = oneshot::channel();
        self.send(SupervisorMsg::Remove { id, reply }).await?;
        rx.await.map_err(|_| SupervisorError::Stopped)?
    }

    /// A snapshot of this supervisor's subtree, read without messaging any
    /// actor. `None` until the tree is spawned.
    pub fn snapshot(&self) -> Option<ActorInfo> {
        self.tree.get()?.registry.snapshot(self.shared.id)
    }

    /// True once a shutdown of the tree has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.tree.get().is_some_and(|t| t.is_shutting_down())
    }
}

/// The root of a running supervision tree.
pub struct SupervisorHandle {
    sup: SupervisorRef,
    root: SupervisorSlot,
    tree: Arc<TreeCtx>,
    set: JoinSet<SlotExit>,
    exit: Option<SlotExit>,
}

impl SupervisorHandle {
    /// The root supervisor's address.
    pub fn supervisor_ref(&self) -> SupervisorRef {
        self.sup.clone()
    }

    /// A snapshot of the whole tree.
    pub fn snapshot(&self) -> Option<ActorInfo> {
        self.sup.snapshot()
    }

    /// Waits until the root supervisor ends by itself, which only happens when
    /// its restart intensity is exceeded; returns why.
    pub async fn wait(&mut self) -> ExitReason {
        if let Some(exit) = &self.exit {
            return exit.reason.clone();
        }
        let exit = match self.set.join_next().await {
            Some(Ok(exit)) => exit,
            Some(Err(e)) if e.is_panic() => SlotExit {
                reason: ExitReason::Panic(panic_message(e.into_panic())),
                drained: 0,
                children: Vec::new(),
            },
            _ => SlotExit {
                reason: ExitReason::Aborted,
                drained: 0,
                children: Vec::new(),
            },
        };
        let reason = exit.reason.clone();
        self.exit = Some(exit);
        // Nothing restarts a root: fail every queued and later message.
        self.root.close();
        reason
    }

    /// Shuts the whole tree down: no restart happens from now on; every
    /// supervisor stops its children in reverse start order (dynamic children
    /// together, first); each actor rejects new messages, handles its queue and
    /// runs its stop hook. Whatever still runs after `grace` is aborted and its
    /// queued asks fail. Returns what happened to each actor.
    pub async fn shutdown(mut self, grace: Duration) -> ShutdownReport {
        let started = Instant::now();
        let deadline = started + grace;
        self.tree.shutting_down.store(true, Ordering::Release);
        *self.tree.deadline.lock().unwrap_or_else(|p| p.into_inner()) = Some(deadline);
        info!(actor = %self.sup.shared.name, actor_id = self.sup.shared.id, grace_ms = grace.as_millis() as u64, "shutdown begun");
        self.sup.shared.request_stop(CONTROL_DRAIN);
        let root = if let Some(exit) = self.exit.take() {
            exit
        } else {
            // Every supervisor enforces the deadline on its own children; the
            // margin only catches a supervisor that is itself stuck.
            let margin = Duration::from_secs(1);
            match tokio::time::timeout_at(deadline + margin, self.set.join_next()).await {
                Ok(Some(Ok(exit))) => exit,
                Ok(Some(Err(e))) if e.is_panic() => SlotExit {
                    reason: ExitReason::Panic(panic_message(e.into_panic())),
                    drained: 0,
                    children: Vec::new(),
                },
                _ => {
                    warn!(actor = %self.sup.shared.name, "grace period over, aborting the tree");
                    self.set.shutdown().await;
                    SlotExit {
                        reason: ExitReason::Aborted,
                        drained: 0,
                        children: Vec::new(),
                    }
                }
            }
        };
        self.root.close();
        let outcome = match root.reason {
            ExitReason::Shutdown => StopOutcome::Drained,
            ExitReason::Aborted => StopOutcome::Aborted,
            other => StopOutcome::Failed(other),
        };
        let report = ShutdownReport {
            root: ActorReport {
                name: self.sup.shared.name.to_string(),
                id: self.sup.shared.id,
                outcome,
                handled: root.drained,
                children: root.children,
            },
            elapsed: started.elapsed(),
        };
        info!(
            actor = %self.sup.shared.name,
            actor_id = self.sup.shared.id,
            elapsed_ms = report.elapsed.as_millis() as u64,
            clean = report.is_clean(),
            "shutdown finished"
        );
        report
    }
}

impl ActorReport {
    fn leaf(slot: &dyn Slot, outcome: StopOutcome, handled: u64) -> Self {
        ActorReport {
            name: slot.name().to_string(),
            id: slot.id(),
            outcome,
            handled,
            children: Vec::new(),
        }
    }
}
