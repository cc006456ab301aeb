//! The shutdown of one supervisor: refuse new requests, cancel pending
//! restarts, drain dynamic children together, then static children one by
//! one in reverse start order, all within the tree's deadline.

use tokio::sync::mpsc::Receiver;

use super::run::{Run, SupervisorRun};
use super::{SlotExit, SupervisorError, SupervisorMsg, SUBTREE_MARGIN};
use crate::addr::{Control, Envelope};
use crate::exit::ExitReason;
use crate::shutdown::{ActorReport, StopOutcome};
use crate::tree::ActorState;

impl SupervisorRun {
    /// Drains this supervisor's children and reports how each ended.
    pub(super) async fn drain(&mut self, rx: &mut Receiver<Envelope<SupervisorMsg>>) -> SlotExit {
        self.shared.set_state(ActorState::Stopping);
        rx.close();
        // Requests taken from the mailbox but not handled yet came first.
        while let Some(msg) = self.core.queued.pop_front() {
            msg.refuse(SupervisorError::ShuttingDown);
        }
        while let Ok(env) = rx.try_recv() {
            if let Envelope::Msg(msg) = env {
                msg.refuse(SupervisorError::ShuttingDown);
            }
        }
        let deadline = self.tree.deadline();
        let mut reports: Vec<ActorReport> = Vec::with_capacity(self.core.children.len());

        // Children waiting for a restart are not started again.
        self.pending.clear();
        for e in self.core.children.values_mut() {
            if matches!(e.run, Run::Idle) {
                e.restart_at = None;
                reports.push(e.report(StopOutcome::NotRunning, None));
                e.slot.close();
            }
        }

        let dynamic = self.running_last_first(true);
        let statics = self.running_last_first(false);

        let mut groups: Vec<Vec<u64>> = Vec::new();
        if !dynamic.is_empty() {
            groups.push(dynamic);
        }
        groups.extend(statics.into_iter().map(|s| vec![s]));
        for mut group in groups {
            let mut group_deadline = deadline;
            // The group keeps the children still running, each asked to drain.
            group.retain(|seq| {
                let Some(e) = self.core.children.get(seq) else {
                    return false;
                };
                if e.slot.is_supervisor() {
                    // It aborts its own children at the deadline and then
                    // reports them; aborting it at the same instant would
                    // lose that report.
                    group_deadline = deadline.map(|d| d + SUBTREE_MARGIN);
                }
                if e.run.task().is_none() {
                    return false;
                }
                e.slot.request_stop(Control::Drain);
                true
            });
            // Past the deadline every remaining wait aborts at once.
            self.wait_for(&group, group_deadline, |core, seq, exit| {
                if let Some(e) = core.children.get(&seq) {
                    reports.push(e.report(StopOutcome::of(exit.reason.clone()), Some(exit)));
                    e.slot.close();
                }
            })
            .await;
        }
        // Children that ended on their own during the drain, or that a
        // sub-supervisor abort left behind.
        for (seq, _) in self.abort_all().await {
            if let Some(e) = self.core.children.get(&seq) {
                e.slot.set_state(ActorState::Stopped);
                e.slot.close();
            }
        }
        // Every child reported above is idle and closed already (closing sets
        // its state to stopped); only the ones still marked as running need it.
        for e in self.core.children.values() {
            if e.run.task().is_some() {
                e.slot.set_state(ActorState::Stopped);
                e.slot.close();
            }
        }
        self.shared.set_state(ActorState::Stopped);
        SlotExit {
            reason: ExitReason::Shutdown,
            drained: 0,
            children: reports,
        }
    }

    /// The running dynamic (or static) children, last started first.
    fn running_last_first(&self, dynamic: bool) -> Vec<u64> {
        self.core
            .children
            .iter()
            .rev()
            .filter(|(_, e)| e.dynamic == dynamic && e.run.task().is_some())
            .map(|(s, _)| s)
            .collect()
    }
}
