//! Folding the agents' worker events into what the operator knows of each attempt (pure).

use crate::agents::{Activity, WorkerPhase, WorkerReport};
use crate::crd::Progress;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

use super::FAILED_TO_START_CODE;

/// An attempt on the agents: the workload's id there (a job's UID, or a replica launch's id)
/// and the attempt number.
pub type AttemptId = (String, u64);

/// What the operator knows of one worker of an attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct RankSeen {
    pub node: String,
    pub gpu_uuids: Vec<String>,
    pub state: RankState,
    /// The process id of the node's agent that runs (or was asked to run) the worker; empty
    /// when unknown. A different agent process that does not list the worker means the agent
    /// restarted, and the worker died with it.
    pub process: String,
    /// What its progress reports said, and when (hang detection, [`super::hang`]).
    pub pace: Option<PaceSeen>,
}

/// One rank's progress as this process saw it arrive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PaceSeen {
    /// Steps it completed, per its newest report.
    pub step: i64,
    /// When a report first showed a step above the ones before; `None` until it steps in this
    /// attempt (it is starting, or this process has not seen it step since it took over).
    pub stepped_at: Option<Instant>,
    /// When its newest report came.
    pub heard_at: Instant,
    /// What it does now.
    pub activity: Activity,
    /// Since when (the first report that said so).
    pub activity_since: Instant,
    /// The peer it waits for (waiting) or gave up on (peer lost).
    pub waiting_on_rank: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RankState {
    /// A launch was sent; no event yet.
    Launching,
    /// Started (or reported progress, or listed by its agent at registration).
    Running,
    /// Exited, or could not be started.
    Exited { code: Option<i32>, signal: Option<i32> },
}

/// What the operator knows of one attempt.
#[derive(Clone, Debug, Default)]
pub struct AttemptSeen {
    /// This process sent every launch of the attempt, so it knows every worker.
    pub launched_here: bool,
    pub ranks: BTreeMap<u32, RankSeen>,
    /// The newest training progress reported for the attempt (the highest step; only rank 0
    /// reports with the built-in engine).
    pub progress: Option<Progress>,
    /// When and at which step the first progress of the attempt came, for the ETA.
    pub progress_origin: Option<(Instant, i64)>,
    /// When this process first knew of the attempt (launched it, or heard of it after taking
    /// over): where start-up budgets count from when no rank has reported yet.
    pub watched_since: Option<Instant>,
    /// The step times ranks reported, newest last, at most [`STEP_TIMES_KEPT`].
    pub step_times: VecDeque<f64>,
    /// Each rank's reported compute times per step, newest last, at most
    /// [`super::straggler::WINDOW`].
    pub compute: BTreeMap<u32, VecDeque<f64>>,
}

/// How many reported step times an attempt keeps for its p99.
pub const STEP_TIMES_KEPT: usize = 256;

impl AttemptSeen {
    /// The 99th percentile of the kept step times, seconds.
    pub fn p99_step_seconds(&self) -> Option<f64> {
        if self.step_times.is_empty() {
            return None;
        }
        let mut sorted: Vec<f64> = self.step_times.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let at = ((sorted.len() as f64 * 0.99).ceil() as usize).clamp(1, sorted.len()) - 1;
        Some(sorted[at])
    }
}

/// What one worker event changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Folded {
    /// Nothing new.
    Nothing,
    /// Only the attempt's training progress.
    Progress,
    /// A worker's state.
    State,
}

/// an exited worker. Progress is kept per attempt: the report with the highest step gives step,
/// total, loss and throughput; the checkpoint step only grows; the ETA comes from the step rate
/// since the attempt's first report.
pub fn fold(
    attempts: &mut HashMap<AttemptId, AttemptSeen>,
    report: &WorkerReport,
    now: Instant,
) -> Folded {
    let seen = attempts.entry((report.job_uid.clone(), report.attempt)).or_default();
    seen.watched_since.get_or_insert(now);
    let progressed = report.progress.as_ref().is_some_and(|p| merge_progress(seen, p, now));
    if let Some(s) = report.pace.and_then(|p| p.step_seconds) {
        if seen.step_times.len() == STEP_TIMES_KEPT {
            seen.step_times.pop_front();
        }
        seen.step_times.push_back(s);
    }
    let rank = seen.ranks.entry(report.rank).or_insert_with(|| RankSeen {
        node: report.node.clone(),
        gpu_uuids: Vec::new(),
        state: RankState::Launching,
        process: String::new(),
        pace: None,
    });
    if let Some(p) = &report.pace {
        rank.pace = Some(merge_pace(rank.pace, p, now));
        if let Some(c) = p.compute_seconds.filter(|_| p.activity == Activity::Training) {
            let window = seen.compute.entry(report.rank).or_default();
            if window.len() == super::straggler::WINDOW {
                window.pop_front();
            }
            window.push_back(c);
        }
    }
    let unchanged = if progressed { Folded::Progress } else { Folded::Nothing };
    if matches!(rank.state, RankState::Exited { .. }) {
        return unchanged;
    }
    let before = rank.state;
    rank.state = match report.phase {
        WorkerPhase::Started | WorkerPhase::Progress => RankState::Running,
        WorkerPhase::Exited => RankState::Exited { code: report.exit_code, signal: report.signal },
        WorkerPhase::FailedToStart => {
            RankState::Exited { code: Some(FAILED_TO_START_CODE), signal: report.signal }
        }
        WorkerPhase::Unspecified => rank.state,
    };
    if rank.state != before { Folded::State } else { unchanged }
}

/// The rank's pace after one more report.
fn merge_pace(before: Option<PaceSeen>, p: &crate::agents::RankPace, now: Instant) -> PaceSeen {
    let stepped = match before {
        // The first report of a rank that is already training counts as a step seen now.
        None => (p.activity != Activity::Starting).then_some(now),
        Some(b) if p.step > b.step => Some(now),
        Some(b) => b.stepped_at,
    };
    let since = match before {
        Some(b) if b.activity == p.activity && b.waiting_on_rank == p.waiting_on_rank => {
            b.activity_since
        }
        _ => now,
    };
    PaceSeen {
        step: before.map_or(p.step, |b| b.step.max(p.step)),
        stepped_at: stepped,
        heard_at: now,
        activity: p.activity,
        activity_since: since,
        waiting_on_rank: p.waiting_on_rank,
    }
}

/// Merge one progress report into the attempt's; true when anything shown changed.
pub fn merge_progress(seen: &mut AttemptSeen, p: &Progress, now: Instant) -> bool {
    let before = seen.progress.clone();
    let (origin_at, origin_step) = *seen.progress_origin.get_or_insert((now, p.step));
    let current = seen.progress.get_or_insert_with(|| Progress { step: -1, ..Default::default() });
    let checkpoint = current.last_checkpoint_step.max(p.last_checkpoint_step);
    if p.step >= current.step {
        current.step = p.step;
        current.total_steps = p.total_steps.or(current.total_steps);
        current.loss = p.loss.or(current.loss);
        current.tokens_per_second = p.tokens_per_second.or(current.tokens_per_second);
        let elapsed = now.saturating_duration_since(origin_at).as_secs_f64();
        let done = (p.step - origin_step) as f64;
        current.eta_seconds = match current.total_steps {
            Some(total) if p.step >= total => Some(0),
            Some(total) if done > 0.0 && elapsed > 0.0 => {
                Some(((total - p.step) as f64 * elapsed / done).ceil() as i64)
            }
            _ => current.eta_seconds,
        };
    }
    current.last_checkpoint_step = checkpoint;
    seen.progress != before
}
