//! Folding the agents' worker events into what the operator knows of each attempt (pure).

use crate::agents::{WorkerPhase, WorkerReport};
use crate::crd::Progress;
use std::collections::{BTreeMap, HashMap};
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
    let progressed = report.progress.as_ref().is_some_and(|p| merge_progress(seen, p, now));
    let rank = seen.ranks.entry(report.rank).or_insert_with(|| RankSeen {
        node: report.node.clone(),
        gpu_uuids: Vec::new(),
        state: RankState::Launching,
        process: String::new(),
    });
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
