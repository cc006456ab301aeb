//! What a shutdown reports: how each actor of the tree ended.

use std::sync::Arc;
use std::time::Duration;

use crate::exit::ExitReason;

/// How one actor ended during a shutdown or a removal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// It handled everything queued and ran its stop hook.
    Drained,
    /// The grace period ran out; it was aborted and its queued asks failed.
    Aborted,
    /// It ended some other way during the drain (a handler failed, it stopped
    /// itself); queued asks failed.
    Failed(ExitReason),
    /// It was not running (waiting for a restart); queued asks failed.
    NotRunning,
}

impl StopOutcome {
    /// How an actor that was asked to drain ended, from its exit reason.
    /// Only [`ExitReason::Shutdown`] means the whole queue was handled: an
    /// actor that stopped itself mid-drain ([`ExitReason::Normal`]), failed,
    /// or was stopped for a restart left messages behind, and those asks fail.
    pub(crate) fn of(reason: ExitReason) -> Self {
        match reason {
            ExitReason::Shutdown => StopOutcome::Drained,
            ExitReason::Aborted => StopOutcome::Aborted,
            other => StopOutcome::Failed(other),
        }
    }
}

/// One actor's line in a shutdown report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorReport {
    /// The actor's name: the same shared string as [`crate::Addr::name`],
    /// so a report line costs no copy of it.
    pub name: Arc<str>,
    /// The actor's id.
    pub id: u64,
    /// How it ended.
    pub outcome: StopOutcome,
    /// Messages it handled after the drain began.
    pub handled: u64,
    /// For a supervisor, its children in the order they were stopped.
    pub children: Vec<ActorReport>,
}

impl ActorReport {
    /// This report and every report below it, depth first.
    pub fn iter(&self) -> Vec<&ActorReport> {
        let mut out = vec![self];
        for c in &self.children {
            out.extend(c.iter());
        }
        out
    }
}

/// The result of [`crate::SupervisorHandle::shutdown`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// The root supervisor's report, with the whole tree below it.
    pub root: ActorReport,
    /// How long the shutdown took.
    pub elapsed: Duration,
}

impl ShutdownReport {
    /// True when every actor drained.
    pub fn is_clean(&self) -> bool {
        fn drained(r: &ActorReport) -> bool {
            r.outcome == StopOutcome::Drained && r.children.iter().all(drained)
        }
        drained(&self.root)
    }

    /// The reports of actors that were aborted.
    pub fn aborted(&self) -> Vec<&ActorReport> {
        self.root
            .iter()
            .into_iter()
            .filter(|r| r.outcome == StopOutcome::Aborted)
            .collect()
    }

    /// The report of the first actor named `name`, depth first.
    pub fn find(&self, name: &str) -> Option<&ActorReport> {
        self.root.iter().into_iter().find(|r| &*r.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_full_drain_counts_as_drained() {
        assert_eq!(StopOutcome::of(ExitReason::Shutdown), StopOutcome::Drained);
        assert_eq!(StopOutcome::of(ExitReason::Aborted), StopOutcome::Aborted);
        for reason in [
            ExitReason::Normal,
            ExitReason::Restart,
            ExitReason::error("bad"),
            ExitReason::Panic("oops".into()),
            ExitReason::Escalated("too many".into()),
        ] {
            assert_eq!(StopOutcome::of(reason.clone()), StopOutcome::Failed(reason));
        }
    }
}
