//! One incarnation of a supervisor: its state ([`Core`], kept across
//! incarnations), its loop, and the bookkeeping of starting, adding and
//! removing children.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::{AbortHandle, Id as TaskId, JoinError, JoinSet};
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::spec::Slot;
use super::{
    Backoff, Child, Intensity, RestartPolicy, SlotExit, SupervisionStrategy, SupervisorError,
    SupervisorMsg, TreeCtx,
};
use crate::addr::{Control, Envelope, MailboxLease, Reply, Shared};
use crate::exit::ExitReason;
use crate::shutdown::{ActorReport, StopOutcome};
use crate::tree::{ActorState, IdMap, IdSet};

/// What a supervisor keeps across its own restarts: its configuration and its
/// children (with their mailboxes).
pub(super) struct Core {
    pub(super) name: Arc<str>,
    pub(super) id: u64,
    pub(super) strategy: SupervisionStrategy,
    pub(super) intensity: Intensity,
    pub(super) backoff: Backoff,
    /// Children by seq: start order.
    pub(super) children: BTreeMap<u64, Entry>,
    /// Child actor id -> seq, so adds and removals need no scan of `children`.
    ids: IdMap<u64, u64>,
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
            children: BTreeMap::new(),
            ids: IdMap::default(),
            next_seq: 0,
            incarnations: 0,
            queued: VecDeque::new(),
        }
    }

    pub(super) fn push(&mut self, child: Child, dynamic: bool) -> u64 {
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

/// One child as its supervisor tracks it.
pub(super) struct Entry {
    pub(super) slot: Box<dyn Slot>,
    pub(super) restart: RestartPolicy,
    pub(super) shutdown_timeout: Duration,
    pub(super) dynamic: bool,
    /// Restart times of this child within the intensity window: its backoff attempt.
    pub(super) history: VecDeque<Instant>,
    pub(super) run: Run,
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
        let (Run::Running { task, abort } | Run::Stopping { task, abort, .. }) = &self.run else {
            return None;
        };
        let kill_at = now + self.shutdown_timeout;
        self.run = Run::Stopping {
            task: *task,
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
            name: self.slot.name().to_string(),
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

/// Whether a child's task runs.
pub(super) enum Run {
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
    pub(super) fn task(&self) -> Option<TaskId> {
        match self {
            Run::Idle => None,
            Run::Running { task, .. } | Run::Stopping { task, .. } => Some(*task),
        }
    }
}

/// One incarnation of a supervisor.
pub(super) struct SupervisorRun {
    pub(super) core: Core,
    pub(super) shared: Arc<Shared<SupervisorMsg>>,
    pub(super) tree: Arc<TreeCtx>,
    pub(super) set: JoinSet<SlotExit>,
    pub(super) by_task: IdMap<TaskId, u64>,
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

/// What the loop does after handling one event.
pub(super) enum Step {
    Continue,
    /// The restart intensity was exceeded; the text is the last failure.
    Escalate(String),
}

impl SupervisorRun {
    pub(super) fn new(core: Core, shared: Arc<Shared<SupervisorMsg>>, tree: Arc<TreeCtx>) -> Self {
        SupervisorRun {
            core,
            shared,
            tree,
            set: JoinSet::new(),
            by_task: IdMap::default(),
            restarts: VecDeque::new(),
            timers: BinaryHeap::new(),
            pending: BTreeSet::new(),
        }
    }

    pub(super) fn name(&self) -> Arc<str> {
        self.core.name.clone()
    }

    pub(super) async fn supervise(&mut self, mut lease: MailboxLease<SupervisorMsg>) -> SlotExit {
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
            .map(|(s, _)| *s)
            .collect();
        for seq in gone {
            self.discard(seq);
        }
        let seqs: Vec<u64> = self.core.children.keys().copied().collect();
        for seq in seqs {
            self.start(seq);
        }
        if self.shared.control() < Control::Drain {
            self.shared.set_state(ActorState::Running);
        }
        info!(actor = %name, actor_id = id, children = self.core.children.len(), "supervisor started");

        let rx = lease.rx();
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
            SupervisorMsg::Remove { id, reply } => self.remove(id, reply),
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

    /// Drains and removes a child; the reply is sent once it has stopped.
    fn remove(&mut self, id: u64, reply: Reply<Result<ActorReport, SupervisorError>>) {
        let Some((seq, entry)) = self
            .core
            .ids
            .get(&id)
            .and_then(|&seq| Some((seq, self.core.children.get_mut(&seq)?)))
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
    pub(super) fn discard(&mut self, seq: u64) -> Option<Entry> {
        let entry = self.core.children.remove(&seq)?;
        self.core.ids.remove(&entry.slot.id());
        self.pending.remove(&seq);
        entry.slot.close();
        entry.slot.unregister(&self.tree);
        Some(entry)
    }

    /// Marks the child whose task ended as idle and returns it with its exit;
    /// `None` for a task this incarnation no longer tracks.
    pub(super) fn exit_of(
        &mut self,
        res: Result<(TaskId, SlotExit), JoinError>,
    ) -> Option<(u64, SlotExit)> {
        let (task, exit) = match res {
            Ok((task, exit)) => (task, exit),
            Err(e) => (e.id(), SlotExit::new(ExitReason::from_join_error(e))),
        };
        let seq = self.by_task.remove(&task)?;
        let entry = self.core.children.get_mut(&seq)?;
        entry.run = Run::Idle;
        Some((seq, exit))
    }

    /// Waits until every task in `tasks` has ended, aborting all of them at
    /// `deadline`. Returns the exits, in the order they arrived.
    pub(super) async fn wait_for(
        &mut self,
        tasks: &[TaskId],
        deadline: Option<Instant>,
    ) -> Vec<(u64, SlotExit)> {
        let mut left: IdSet<TaskId> = tasks.iter().copied().collect();
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
                            self.abort_tasks(&left);
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

    fn abort_tasks(&self, tasks: &IdSet<TaskId>) {
        for t in tasks {
            let Some(e) = self
                .by_task
                .get(t)
                .and_then(|seq| self.core.children.get(seq))
            else {
                continue;
            };
            warn!(actor = %e.slot.name(), actor_id = e.slot.id(), "grace period over, aborting actor");
            if let Run::Running { abort, .. } | Run::Stopping { abort, .. } = &e.run {
                abort.abort();
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
