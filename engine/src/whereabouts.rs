//! Where a training worker is: the last step it completed and what it does now.
//!
//! The training thread and the collective update it; the progress heartbeat
//! ([`crate::progress::ProgressReporter::heartbeats`]) sends it to the agent while the worker is
//! not stepping (starting, checkpointing, waiting for a peer), and the signal handler prints it
//! when the worker is told to stop, so a hung gang's logs say where each rank was.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use flotilla_contract::progress::Activity;

/// The state itself.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Where {
    /// Steps completed.
    pub step: u64,
    /// What the worker does now.
    pub activity: Activity,
    /// The peer a waiting worker waits for.
    pub waiting_on_rank: Option<u32>,
    /// Since when it does it.
    pub since: Instant,
}

/// Shared between the training thread, the collective, the heartbeat and the signal handler.
#[derive(Debug)]
pub struct Whereabouts(Mutex<Where>);

impl Whereabouts {
    /// A worker starting at `step`.
    pub fn starting(step: u64) -> Arc<Self> {
        Arc::new(Self(Mutex::new(Where {
            step,
            activity: Activity::Starting,
            waiting_on_rank: None,
            since: Instant::now(),
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Where> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A copy of the current state.
    pub fn now(&self) -> Where {
        *self.lock()
    }

    /// Now doing `activity` (waiting on nobody); the clock restarts only when it changes.
    pub fn set(&self, activity: Activity) {
        let mut w = self.lock();
        if w.activity != activity || w.waiting_on_rank.is_some() {
            *w = Where { activity, waiting_on_rank: None, since: Instant::now(), ..*w };
        }
    }

    /// Resumed at `step` (from a checkpoint), still starting.
    pub fn resumed_at(&self, step: u64) {
        self.lock().step = step;
    }

    /// `step` is complete; back to training.
    pub fn step_done(&self, step: u64) {
        let mut w = self.lock();
        *w = Where {
            step,
            activity: Activity::Training,
            waiting_on_rank: None,
            since: Instant::now(),
        };
    }

    /// Blocked on `peer`'s data from now on; returns the state to [`Self::restore`] after.
    pub fn wait_on(&self, peer: u32) -> Where {
        let mut w = self.lock();
        let before = *w;
        *w = Where {
            activity: Activity::Waiting,
            waiting_on_rank: Some(peer),
            since: Instant::now(),
            ..before
        };
        before
    }

    /// Back to what [`Self::wait_on`] returned (keeping the step, which may have moved on).
    pub fn restore(&self, before: Where) {
        let mut w = self.lock();
        *w = Where { step: w.step, ..before };
    }

    /// One line for the log: where `rank` is and for how long.
    pub fn describe(&self, rank: usize) -> String {
        let w = self.now();
        let secs = w.since.elapsed().as_secs_f64();
        let doing = match (w.activity, w.waiting_on_rank) {
            (Activity::Waiting, Some(peer)) => {
                format!("waiting in the all-reduce for data from rank {peer}")
            }
            (Activity::PeerLost, Some(peer)) => format!("gave up on rank {peer}"),
            (Activity::Training, _) => format!("computing step {}", w.step + 1),
            (Activity::Starting, _) => "starting (loading, resuming, meeting its peers)".into(),
            (Activity::Checkpointing, _) => "writing a checkpoint".into(),
            (activity, _) => format!("{activity:?}"),
        };
        format!("rank {rank} after step {}: {doing} for {secs:.1}s", w.step)
    }

    /// How long the current activity has lasted.
    pub fn for_how_long(&self) -> Duration {
        self.now().since.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_is_restored_and_described() {
        let w = Whereabouts::starting(4);
        assert_eq!(w.now().activity, Activity::Starting);
        w.step_done(5);
        let before = w.wait_on(2);
        assert_eq!((w.now().activity, w.now().waiting_on_rank), (Activity::Waiting, Some(2)));
        assert!(
            w.describe(1)
                .starts_with("rank 1 after step 5: waiting in the all-reduce for data from rank 2"),
            "{}",
            w.describe(1)
        );
        w.restore(before);
        assert_eq!((w.now().activity, w.now().waiting_on_rank), (Activity::Training, None));
        w.set(Activity::Checkpointing);
        assert!(w.describe(0).contains("writing a checkpoint"));
    }
}
