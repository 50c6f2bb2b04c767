//! The seam between the gRPC link and the worker supervisor (issue 7).
//!
//! The link turns operator commands into calls on [`WorkerSupervisor`]; the supervisor reports
//! back through the [`WorkerUpdate`] channel it is given. [`AttemptFence`] enforces DESIGN.md
//! safety rule 1 on the agent side: commands for an attempt older than the newest seen for that
//! job are refused.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Errors of worker commands.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The command is for an older attempt than one already seen.
    #[error("job {job_uid}: attempt {got} is stale, expected >= {newest}")]
    StaleAttempt {
        /// Job UID.
        job_uid: String,
        /// Attempt in the command.
        got: u64,
        /// Newest attempt seen.
        newest: u64,
    },
    /// The worker could not be started or stopped.
    #[error("{0}")]
    Failed(String),
}

/// Job, attempt and rank of one worker.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkerId {
    /// Job UID.
    pub job_uid: String,
    /// Attempt number.
    pub attempt: u64,
    /// Global rank.
    pub rank: u32,
}

/// Everything needed to start one worker.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerLaunch {
    /// Who it is.
    pub id: WorkerId,
    /// Local rank on the node.
    pub local_rank: u32,
    /// Ranks in the attempt.
    pub world_size: u32,
    /// GPUs it gets.
    pub gpu_uuids: Vec<String>,
    /// Executable.
    pub command: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Checkpoint directory.
    pub checkpoint_dir: String,
    /// Rendezvous address of rank 0.
    pub master_addr: String,
    /// Rendezvous port of rank 0.
    pub master_port: u32,
}

/// A worker the supervisor runs.
#[derive(Clone, Debug, PartialEq)]
pub struct RunningWorker {
    /// Who it is.
    pub id: WorkerId,
    /// Process-group leader pid.
    pub pid: u32,
    /// GPUs it got.
    pub gpu_uuids: Vec<String>,
    /// Start time, Unix nanoseconds.
    pub started_at_unix_nanos: i64,
}

/// Training progress of a worker (see `flotilla_contract::progress` for each field).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[allow(missing_docs)]
pub struct Progress {
    pub step: u64,
    pub total_steps: u64,
    pub loss: f64,
    pub tokens_per_second: f64,
    pub last_checkpoint_step: u64,
    /// The longest step among the lines this report stands for (0 if unknown).
    pub step_seconds: f64,
    /// Compute time of the newest step (0 if unknown).
    pub compute_seconds: f64,
    pub activity: flotilla_contract::progress::Activity,
    pub waiting_on_rank: Option<u32>,
}

/// What the supervisor reports about a worker.
#[derive(Clone, Debug, PartialEq)]
pub enum WorkerUpdate {
    /// Spawned.
    Started(WorkerId),
    /// Progress report.
    Progress(WorkerId, Progress),
    /// Exited with a code or was killed by a signal.
    Exited {
        /// Who.
        id: WorkerId,
        /// Exit code, if it exited.
        code: Option<i32>,
        /// Signal, if it was killed.
        signal: Option<i32>,
    },
    /// Could not be started.
    FailedToStart(WorkerId, String),
}

/// Runs workers. Implemented by issue 7's process supervisor.
pub trait WorkerSupervisor: Send + Sync + 'static {
    /// Starts a worker (returns once it is spawned or refused).
    fn launch(&self, launch: WorkerLaunch) -> Result<(), SupervisorError>;
    /// Stops one rank, or every rank when `rank` is `None`, of an attempt: SIGTERM, then
    /// SIGKILL after `grace`.
    fn stop(
        &self,
        job_uid: &str,
        attempt: u64,
        rank: Option<u32>,
        grace: Duration,
        reason: &str,
    ) -> Result<(), SupervisorError>;
    /// Kills every worker at once (the fence timeout passed).
    fn kill_all(&self, reason: &str);
    /// Workers running now.
    fn running(&self) -> Vec<RunningWorker>;
}

/// A supervisor that runs nothing: launches are refused. Stands in until issue 7.
#[derive(Debug, Default)]
pub struct NoWorkers;

impl WorkerSupervisor for NoWorkers {
    fn launch(&self, launch: WorkerLaunch) -> Result<(), SupervisorError> {
        Err(SupervisorError::Failed(format!(
            "job {} attempt {} rank {}: this agent has no worker supervisor yet",
            launch.id.job_uid, launch.id.attempt, launch.id.rank
        )))
    }

    fn stop(
        &self,
        _: &str,
        _: u64,
        _: Option<u32>,
        _: Duration,
        _: &str,
    ) -> Result<(), SupervisorError> {
        Ok(()) // nothing runs, so nothing is left running
    }

    fn kill_all(&self, _reason: &str) {}

    fn running(&self) -> Vec<RunningWorker> {
        Vec::new()
    }
}

/// Newest attempt seen per job; refuses older ones.
#[derive(Debug, Default)]
pub struct AttemptFence {
    newest: HashMap<String, u64>,
}

impl AttemptFence {
    /// Accepts `attempt` of `job_uid` if it is not older than the newest seen, and remembers it.
    pub fn admit(&mut self, job_uid: &str, attempt: u64) -> Result<(), SupervisorError> {
        let newest = self.newest.entry(job_uid.to_owned()).or_insert(attempt);
        if attempt < *newest {
            return Err(SupervisorError::StaleAttempt {
                job_uid: job_uid.to_owned(),
                got: attempt,
                newest: *newest,
            });
        }
        *newest = attempt;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_attempts_are_refused_newer_ones_admitted() {
        let mut fence = AttemptFence::default();
        fence.admit("job-a", 2).expect("first sight");
        fence.admit("job-a", 2).expect("same attempt again");
        fence.admit("job-a", 3).expect("newer");
        let err = fence.admit("job-a", 2).expect_err("older");
        assert_eq!(err.to_string(), "job job-a: attempt 2 is stale, expected >= 3");
        fence.admit("job-b", 1).expect("other jobs are independent");
    }
}
