//! What a supervisor does when a child ends by itself: apply the restart
//! policy, count the restart against the intensity, stop the strategy's group
//! and start it again after the backoff.

use std::cmp::Reverse;

use tokio::time::Instant;
use tracing::warn;

use super::run::{Removal, Run, Step, SupervisorRun};
use super::{ChildExit, RestartPolicy, SupervisionStrategy};
use crate::addr::Control;
use crate::exit::ExitReason;
use crate::shutdown::StopOutcome;
use crate::tree::ActorState;

impl SupervisorRun {
    pub(super) fn child_exited(&mut self, ce: ChildExit) -> Step {
        let Some((seq, exit)) = self.exit_of(ce) else {
            return Step::Continue;
        };
        let Some(entry) = self.core.children.get_mut(&seq) else {
            return Step::Continue;
        };
        if let Some(removal) = entry.removal.take() {
            let report = entry.report(StopOutcome::of(exit.reason.clone()), Some(exit));
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
        if !entry.restart.restarts_after(&reason) || self.tree.is_shutting_down() {
            if reason.is_failure() {
                warn!(supervisor = %sup, actor = %entry.slot.name(), actor_id = entry.slot.id(), reason = %reason.chain(), "actor not restarted");
            }
            entry.slot.set_state(ActorState::Stopped);
            self.discard(seq);
            return Step::Continue;
        }

        let now = Instant::now();
        let window = self.core.intensity.window;
        self.restarts.retain(|t| now.duration_since(*t) < window);
        self.restarts.push_back(now);
        if self.restarts.len() as u64 > self.core.intensity.max_restarts as u64 {
            return Step::Escalate(format!("{}: {}", entry.slot.name(), reason.chain()));
        }

        let group: Vec<u64> = match self.core.strategy {
            SupervisionStrategy::OneForOne => vec![seq],
            SupervisionStrategy::OneForAll => self.core.children.seqs().collect(),
            SupervisionStrategy::RestForOne => self.core.children.seqs_from(seq).collect(),
        };

        // Invariant: `seq` is a child (checked above) and nothing removed it since.
        let entry = self.core.children.get_mut(&seq).expect("child present");
        entry.history.retain(|t| now.duration_since(*t) < window);
        entry.history.push_back(now);
        let attempt = entry.history.len() as u32;
        let backoff = self.core.backoff.delay(attempt);
        let at = now + backoff;
        self.timers.push(Reverse(at));

        for member in group {
            let Some(e) = self.core.children.get_mut(&member) else {
                continue;
            };
            if member != seq && e.restart == RestartPolicy::Temporary {
                // Temporary siblings are stopped with the group, never restarted.
                e.removal = Some(Removal::Discard);
                match e.begin_stop(Control::Yield, now) {
                    Some(kill_at) => self.timers.push(Reverse(kill_at)),
                    None => {
                        self.discard(member);
                    }
                }
                continue;
            }
            let restarts = e.slot.add_restart();
            e.slot.set_state(ActorState::Restarting);
            e.restart_at = Some(at);
            self.pending.insert(member);
            let why = if member == seq {
                reason.chain().to_string()
            } else {
                ExitReason::Restart.to_string()
            };
            warn!(
                supervisor = %sup,
                actor = %e.slot.name(),
                actor_id = e.slot.id(),
                attempt,
                restarts,
                backoff_ms = backoff.as_millis() as u64,
                reason = %why,
                "actor restarting"
            );
            if let Some(kill_at) = e.begin_stop(Control::Yield, now) {
                self.timers.push(Reverse(kill_at));
            }
        }
        if backoff.is_zero() {
            self.start_due();
        }
        Step::Continue
    }

    pub(super) fn fire_timers(&mut self) {
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
    pub(super) fn start_due(&mut self) {
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
    pub(super) async fn stop_all_for_restart(&mut self) {
        self.pending.clear();
        let seqs: Vec<u64> = self.core.children.seqs().rev().collect();
        for seq in seqs {
            let Some(e) = self.core.children.get_mut(&seq) else {
                continue;
            };
            e.restart_at = None;
            if e.run.task().is_some() {
                e.slot.request_stop(Control::Yield);
                let timeout = e.shutdown_timeout;
                self.wait_for(&[seq], Some(Instant::now() + timeout), |_, _, _| {})
                    .await;
            }
            if let Some(e) = self.core.children.get(&seq) {
                e.slot.set_state(ActorState::Restarting);
            }
        }
        // Whatever still runs (a child that ignored the stop) is cut off.
        self.abort_all().await;
        for e in self.core.children.values_mut() {
            e.run = Run::Idle;
        }
    }
}
