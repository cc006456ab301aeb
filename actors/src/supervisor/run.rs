//! One incarnation of a supervisor: its state ([`Core`], kept across
//! incarnations), its loop, and the bookkeeping of starting, adding and
//! removing children.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::{self, Receiver, UnboundedReceiver};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::spec::Slot;
use super::{
    Backoff, Child, ChildExit, ExitTx, Intensity, RestartPolicy, SlotExit, SupervisionStrategy,
    SupervisorError, SupervisorMsg, TreeCtx,
};
use crate::addr::{Control, Envelope, Reply, Shared};
use crate::by_seq::BySeq;
use crate::exit::ExitReason;
use crate::shutdown::{ActorReport, StopOutcome};
use crate::tree::{ActorState, IdMap};

/// What a supervisor keeps across its own restarts: its configuration and its
/// children (with their mailboxes).
pub(super) struct Core {
    pub(super) name: Arc<str>,
    pub(super) id: u64,
    pub(super) strategy: SupervisionStrategy,
    pub(super) intensity: Intensity,
    pub(super) backoff: Backoff,
    /// Children by seq: start order.
    pub(super) children: BySeq<Entry>,
    /// Child actor id -> seq, for removals by id: built on the first
    /// removal, then kept up to date, so a supervisor whose children are
    /// never removed by id pays no hash insert per child.
    ids: Option<IdMap<u64, u64>>,
    next_seq: u64,
    /// Incarnations of this supervisor so far.
    incarnations: u64,
    /// Requests taken from the mailbox in one batch and not handled yet. They
    /// live here, not in the incarnation, so a restart of the supervisor
    /// loses none of them; a drain refuses them like the ones still queued.
    pub(super) queued: VecDeque<SupervisorMsg>,
}

impl Core {
    pub(super) fn new(name: Arc<str>, id: u64) -> Self {
        Core {
            name,
            id,
            strategy: SupervisionStrategy::default(),
            intensity: Intensity::default(),
            backoff: Backoff::default(),
            children: BySeq::default(),
            ids: None,
            next_seq: 0,
            incarnations: 0,
            queued: VecDeque::new(),
        }
    }

    pub(super) fn push(&mut self, child: Child, dynamic: bool) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(ids) = &mut self.ids {
            ids.insert(child.slot.id(), seq);
        }
        self.children.push(
            seq,
            Entry {
                slot: child.slot,
                restart: child.restart,
                shutdown_timeout: child.shutdown_timeout,
                dynamic,
                history: VecDeque::new(),
                run: Run::Idle,
                awaited: false,
                restart_at: None,
                removal: None,
            },
        );
        seq
    }
}

/// One child as its supervisor tracks it.
pub(super) struct Entry {
    pub(super) slot: Arc<dyn Slot>,
    pub(super) restart: RestartPolicy,
    pub(super) shutdown_timeout: Duration,
    pub(super) dynamic: bool,
    /// Restart times of this child within the intensity window: its backoff attempt.
    pub(super) history: VecDeque<Instant>,
    pub(super) run: Run,
    /// True while a [`SupervisorRun::wait_for`] waits for this child's exit.
    pub(super) awaited: bool,
    /// When set, the child is started again once idle and this instant has passed.
    pub(super) restart_at: Option<Instant>,
    /// When set, the child leaves the tree once it has stopped.
    pub(super) removal: Option<Removal>,
}

impl Entry {
    /// Asks a running child to stop with `mode`, to be aborted if it has not
    /// ended by its shutdown timeout. Returns that kill time, for the
    /// supervisor's timers; `None` if the child was not running.
    pub(super) fn begin_stop(&mut self, mode: Control, now: Instant) -> Option<Instant> {
        let (Run::Running { run, abort } | Run::Stopping { run, abort, .. }) = &self.run else {
            return None;
        };
        let kill_at = now + self.shutdown_timeout;
        self.run = Run::Stopping {
            run: *run,
            abort: abort.clone(),
            kill_at: Some(kill_at),
        };
        self.slot.request_stop(mode);
        Some(kill_at)
    }

    /// A report line for a child that ended (or never ran) during a stop.
    pub(super) fn report(&self, outcome: StopOutcome, exit: Option<SlotExit>) -> ActorReport {
        let (handled, children) = exit.map_or((0, Vec::new()), |e| (e.drained, e.children));
        ActorReport {
            name: self.slot.name().clone(),
            id: self.slot.id(),
            outcome,
            handled,
            children,
        }
    }
}

/// What happens to a child once it has stopped.
pub(super) enum Removal {
    /// It leaves the tree (a temporary sibling of a restarted group).
    Discard,
    /// It leaves the tree and its report answers a `remove_child`.
    Reply(Reply<Result<ActorReport, SupervisorError>>),
}

/// Whether a child's task runs. `run` numbers the tasks one supervisor
/// incarnation spawns, so an exit is matched to the task that sent it.
pub(super) enum Run {
    Idle,
    Running {
        run: u64,
        abort: AbortHandle,
    },
    Stopping {
        run: u64,
        abort: AbortHandle,
        kill_at: Option<Instant>,
    },
}

impl Run {
    /// The running task's number, if a task runs.
    pub(super) fn task(&self) -> Option<u64> {
        match self {
            Run::Idle => None,
            Run::Running { run, .. } | Run::Stopping { run, .. } => Some(*run),
        }
    }
}

/// One incarnation of a supervisor.
pub(super) struct SupervisorRun {
    pub(super) core: Core,
    pub(super) shared: Arc<Shared<SupervisorMsg>>,
    pub(super) tree: Arc<TreeCtx>,
    /// Where this incarnation's child tasks report their ends.
    exits_tx: ExitTx,
    exits: UnboundedReceiver<ChildExit>,
    /// Child tasks spawned by this incarnation whose exit has not arrived
    /// yet: every task reports exactly once.
    pub(super) running: usize,
    next_run: u64,
    /// Restart times within the intensity window, all children together.
    pub(super) restarts: VecDeque<Instant>,
    /// Pending restarts and kill deadlines; entries may be stale.
    pub(super) timers: BinaryHeap<Reverse<Instant>>,
    /// Children with a pending restart, in start order.
    pub(super) pending: BTreeSet<u64>,
}

/// How many requests a supervisor takes from its mailbox at once. Taking them
/// together frees their slots together: a caller adding children in a loop
/// then refills the mailbox in one go while the supervisor works, instead of
/// being woken for every single free slot (one thread park and unpark per
/// child on a two-worker runtime).
const COMMAND_BATCH: usize = 64;

/// How many child exits a wait takes from the exit channel at once.
const EXIT_BATCH: usize = 64;

/// What the loop does after handling one event.
pub(super) enum Step {
    Continue,
    /// The restart intensity was exceeded; the text is the last failure.
    Escalate(String),
}

impl SupervisorRun {
    pub(super) fn new(core: Core, shared: Arc<Shared<SupervisorMsg>>, tree: Arc<TreeCtx>) -> Self {
        let (exits_tx, exits) = mpsc::unbounded_channel();
        SupervisorRun {
            core,
            shared,
            tree,
            exits_tx,
            exits,
            running: 0,
            next_run: 0,
            restarts: VecDeque::new(),
            timers: BinaryHeap::new(),
            pending: BTreeSet::new(),
        }
    }

    pub(super) fn name(&self) -> Arc<str> {
        self.core.name.clone()
    }

    pub(super) async fn supervise(
        &mut self,
        rx: &mut Receiver<Envelope<SupervisorMsg>>,
    ) -> SlotExit {
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
            .filter(|(_, e)| {
                (restarted && e.restart == RestartPolicy::Temporary) || e.removal.is_some()
            })
            .map(|(s, _)| s)
            .collect();
        for seq in gone {
            self.discard(seq);
        }
        let seqs: Vec<u64> = self.core.children.seqs().collect();
        for seq in seqs {
            self.start(seq);
        }
        if self.shared.control() < Control::Drain {
            self.shared.set_state(ActorState::Running);
        }
        info!(actor = %name, actor_id = id, children = self.core.children.len(), "supervisor started");

        let mut batch = Vec::with_capacity(COMMAND_BATCH);
        loop {
            // Control before data: a stop request wins over queued commands.
            match self.shared.control() {
                Control::Yield => {
                    self.stop_all_for_restart().await;
                    info!(actor = %name, actor_id = id, reason = "restart", "supervisor stopped");
                    return SlotExit::new(ExitReason::Restart);
                }
                Control::Drain => {
                    let exit = self.drain(rx).await;
                    info!(actor = %name, actor_id = id, reason = %exit.reason, "supervisor stopped");
                    return exit;
                }
                Control::Run => {}
            }
            // One request at a time, with the control check in between, so a
            // stop requested in the middle of a batch is not held up by it.
            if let Some(msg) = self.core.queued.pop_front() {
                self.command(msg);
                continue;
            }
            let next_timer = self.timers.peek().map(|Reverse(t)| *t);
            let step = tokio::select! {
                biased;
                _ = rx.recv_many(&mut batch, COMMAND_BATCH) => {
                    for env in batch.drain(..) {
                        if let Envelope::Msg(msg) = env {
                            self.core.queued.push_back(msg);
                        }
                    }
                    Step::Continue
                }
                Some(exit) = self.exits.recv(), if self.running > 0 => {
                    self.child_exited(exit)
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
                return SlotExit::new(ExitReason::Escalated(format!(
                    "{name}: more than {} restarts in {:?}; last: {cause}",
                    self.core.intensity.max_restarts, self.core.intensity.window
                )));
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
                        if !child.slot.is_claimed() {
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
            SupervisorMsg::Remove { id, reply } => self.remove(id, reply),
        }
    }

    /// Registers and starts a dynamic child.
    fn add(&mut self, child: Child) -> Result<u64, SupervisorError> {
        let id = child.slot.id();
        let seq = self.core.next_seq;
        if !child
            .slot
            .clone()
            .register(&self.tree, Some(self.core.id), seq)
        {
            // The same mailbox is supervised already: leave it open.
            return Err(SupervisorError::Duplicate(id));
        }
        let pushed = self.core.push(child, true);
        debug_assert_eq!(pushed, seq);
        self.start(seq);
        Ok(id)
    }

    /// Drains and removes a child; the reply is sent once it has stopped.
    fn remove(&mut self, id: u64, reply: Reply<Result<ActorReport, SupervisorError>>) {
        let core = &mut self.core;
        let ids = core.ids.get_or_insert_with(|| {
            core.children
                .iter()
                .map(|(seq, e)| (e.slot.id(), seq))
                .collect()
        });
        let Some((seq, entry)) = ids
            .get(&id)
            .and_then(|&seq| Some((seq, core.children.get_mut(&seq)?)))
        else {
            let _ = reply.send(Err(SupervisorError::NoSuchChild(id)));
            return;
        };
        entry.restart_at = None;
        self.pending.remove(&seq);
        match entry.begin_stop(Control::Drain, Instant::now()) {
            Some(kill_at) => {
                entry.removal = Some(Removal::Reply(reply));
                self.timers.push(Reverse(kill_at));
            }
            None => {
                let report = entry.report(StopOutcome::NotRunning, None);
                self.discard(seq);
                let _ = reply.send(Ok(report));
            }
        }
    }

    /// Starts an idle child.
    pub(super) fn start(&mut self, seq: u64) {
        let Some(entry) = self.core.children.get_mut(&seq) else {
            return;
        };
        if !matches!(entry.run, Run::Idle) {
            return;
        }
        entry.restart_at = None;
        self.pending.remove(&seq);
        let run = self.next_run;
        match entry.slot.clone().spawn(&self.exits_tx, seq, run) {
            Some(abort) => {
                self.next_run += 1;
                self.running += 1;
                entry.run = Run::Running { run, abort };
            }
            None => {
                warn!(actor = %entry.slot.name(), actor_id = entry.slot.id(), "child has no mailbox, removing it");
                self.discard(seq);
            }
        }
    }

    /// Removes a stopped child from the tree and fails its queued asks.
    pub(super) fn discard(&mut self, seq: u64) -> Option<Entry> {
        let entry = self.core.children.remove(&seq)?;
        if let Some(ids) = &mut self.core.ids {
            ids.remove(&entry.slot.id());
        }
        self.pending.remove(&seq);
        entry.slot.close();
        entry.slot.unregister(&self.tree, self.core.id, seq);
        Some(entry)
    }

    /// Marks the child whose task ended as idle and returns it with its exit;
    /// `None` for a task this incarnation no longer tracks.
    pub(super) fn exit_of(&mut self, ce: ChildExit) -> Option<(u64, SlotExit)> {
        self.take_exit(ce).map(|(seq, exit, _)| (seq, exit))
    }

    /// [`SupervisorRun::exit_of`], also telling whether a wait was waiting
    /// for this child.
    fn take_exit(&mut self, ce: ChildExit) -> Option<(u64, SlotExit, bool)> {
        self.running = self.running.saturating_sub(1);
        let entry = self.core.children.get_mut(&ce.seq)?;
        if entry.run.task() != Some(ce.run) {
            return None;
        }
        entry.run = Run::Idle;
        let awaited = std::mem::take(&mut entry.awaited);
        Some((ce.seq, ce.exit, awaited))
    }

    /// Waits until every running child in `seqs` has ended, aborting all of
    /// them at `deadline`. Each exit that arrives meanwhile (other children
    /// that ended included) is handed to `on_exit` as it is taken, with the
    /// child's entry still in `core`: no list of exits is built.
    pub(super) async fn wait_for(
        &mut self,
        seqs: &[u64],
        deadline: Option<Instant>,
        mut on_exit: impl FnMut(&Core, u64, SlotExit),
    ) {
        let mut left = 0usize;
        for seq in seqs {
            if let Some(e) = self.core.children.get_mut(seq) {
                if e.run.task().is_some() && !e.awaited {
                    e.awaited = true;
                    left += 1;
                }
            }
        }
        let mut aborted = false;
        // One timer for the whole wait: registering a fresh one per exit would
        // cost a timer-wheel insert and removal for every child.
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let sleep = tokio::time::sleep_until(deadline.unwrap_or(far));
        tokio::pin!(sleep);
        // Exits are taken in batches: one wake of this task and one pass of
        // the select per batch, not per child.
        let mut batch = Vec::with_capacity(EXIT_BATCH.min(left));
        while left > 0 && self.running > 0 {
            let n = match deadline {
                Some(_) if !aborted => {
                    tokio::select! {
                        biased;
                        n = self.exits.recv_many(&mut batch, EXIT_BATCH) => n,
                        _ = &mut sleep => {
                            self.abort_awaited(seqs);
                            aborted = true;
                            continue;
                        }
                    }
                }
                _ => self.exits.recv_many(&mut batch, EXIT_BATCH).await,
            };
            // `self` holds a sender: the channel never ends while it waits.
            if n == 0 {
                break;
            }
            for ce in batch.drain(..) {
                if let Some((seq, exit, awaited)) = self.take_exit(ce) {
                    if awaited {
                        left -= 1;
                    }
                    on_exit(&self.core, seq, exit);
                }
            }
        }
        for seq in seqs {
            if let Some(e) = self.core.children.get_mut(seq) {
                e.awaited = false;
            }
        }
    }

    fn abort_awaited(&self, seqs: &[u64]) {
        for seq in seqs {
            let Some(e) = self.core.children.get(seq) else {
                continue;
            };
            if let Run::Running { abort, .. } | Run::Stopping { abort, .. } = &e.run {
                if e.awaited {
                    warn!(actor = %e.slot.name(), actor_id = e.slot.id(), "grace period over, aborting actor");
                    abort.abort();
                }
            }
        }
    }

    /// Aborts every child task still running and waits for their exits,
    /// which mark them idle: what `JoinSet::shutdown` did. Returns the
    /// exits, in the order they arrived.
    pub(super) async fn abort_all(&mut self) -> Vec<(u64, SlotExit)> {
        for e in self.core.children.values() {
            if let Run::Running { abort, .. } | Run::Stopping { abort, .. } = &e.run {
                abort.abort();
            }
        }
        let mut exits = Vec::new();
        while self.running > 0 {
            let Some(ce) = self.exits.recv().await else {
                break;
            };
            if let Some(exit) = self.exit_of(ce) {
                exits.push(exit);
            }
        }
        exits
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
