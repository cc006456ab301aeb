//! What a supervisor decides with: which siblings restart together
//! ([`SupervisionStrategy`]), whether a child restarts at all
//! ([`RestartPolicy`]), how many restarts it tolerates ([`Intensity`]) and how
//! long it waits before each ([`Backoff`]).

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::time::Duration;

use crate::exit::ExitReason;

/// Which siblings are restarted with a failed child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SupervisionStrategy {
    /// Only the failed child.
    #[default]
    OneForOne,
    /// Every child: the others are stopped, then all start again in order.
    OneForAll,
    /// The failed child and every child started after it.
    RestForOne,
}

/// When a child is restarted after it ends by itself. The crate docs have the
/// full table of policy × exit reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestartPolicy {
    /// Always, whatever the reason.
    #[default]
    Permanent,
    /// Only after a failure (error, panic, escalation).
    Transient,
    /// Never: when it ends its mailbox is closed and it leaves the tree.
    Temporary,
}

impl RestartPolicy {
    /// True when a child with this policy that ended with `reason` is
    /// restarted. Outside this rule, nothing restarts once a shutdown has
    /// begun, and a removed child never restarts.
    pub fn restarts_after(self, reason: &ExitReason) -> bool {
        match self {
            RestartPolicy::Permanent => true,
            RestartPolicy::Transient => reason.is_failure(),
            RestartPolicy::Temporary => false,
        }
    }
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

/// A uniform number in [0, 1) from a per-thread xorshift seeded by the OS:
/// jitter needs spread, not cryptographic quality, and no dependency.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The reasons of the crate docs' restart table, by column header.
    fn reason(column: &str) -> ExitReason {
        match column {
            "Normal" => ExitReason::Normal,
            "Shutdown" => ExitReason::Shutdown,
            "Restart" => ExitReason::Restart,
            "Error" => ExitReason::error("e"),
            "Panic" => ExitReason::Panic("p".into()),
            "Escalated" => ExitReason::Escalated("x".into()),
            "Aborted" => ExitReason::Aborted,
            other => panic!("unknown exit reason column {other:?}"),
        }
    }

    fn policy(row: &str) -> RestartPolicy {
        match row {
            "Permanent" => RestartPolicy::Permanent,
            "Transient" => RestartPolicy::Transient,
            "Temporary" => RestartPolicy::Temporary,
            other => panic!("unknown restart policy row {other:?}"),
        }
    }

    fn cells(line: &str) -> Vec<String> {
        line.trim_start_matches("//!")
            .trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().trim_matches('`').to_owned())
            .collect()
    }

    /// The table in the crate docs is the rule users read; this keeps it true.
    #[test]
    fn restart_table_in_the_crate_docs_matches_the_policy() {
        let docs = include_str!("../lib.rs");
        let table: Vec<&str> = docs
            .lines()
            .skip_while(|l| !l.contains("| policy \\ exit reason |"))
            .take_while(|l| l.trim_start_matches("//!").trim().starts_with('|'))
            .collect();
        assert!(table.len() == 5, "restart table not found in lib.rs docs");
        let header = cells(table[0]);
        let mut checked = 0;
        for row in &table[2..] {
            let row = cells(row);
            let policy = policy(&row[0]);
            for (column, cell) in header.iter().zip(&row).skip(1) {
                let documented = match cell.as_str() {
                    "restarted" => true,
                    "—" => false,
                    other => panic!("unknown cell {other:?}"),
                };
                assert_eq!(
                    policy.restarts_after(&reason(column)),
                    documented,
                    "{policy:?} after {column}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 3 * 7);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(350),
            jitter: 0.0,
        };
        let delays: Vec<u64> = (1..=4).map(|n| b.delay(n).as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 350, 350]);
        assert_eq!(Backoff::NONE.delay(7), Duration::ZERO);
    }

    #[test]
    fn jitter_stays_within_its_spread_and_the_cap() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(110),
            jitter: 0.5,
        };
        for _ in 0..1000 {
            let d = b.delay(1);
            assert!(
                d >= Duration::from_millis(50) && d <= Duration::from_millis(110),
                "{d:?}"
            );
        }
    }
}
