//! Worker commands to agents: the primitives the job lifecycle (issue 7) builds on. Every
//! command carries the job UID and attempt; agents refuse attempts older than one they have seen.

use super::server::AgentServer;
use flotilla_proto::v1 as pb;
use pb::operator_message::Body as Down;
use std::collections::BTreeMap;
use std::time::Duration;

/// One worker to start on one node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerLaunchSpec {
    /// Job UID.
    pub job_uid: String,
    /// Attempt number.
    pub attempt: u64,
    /// Global rank.
    pub rank: u32,
    /// Rank on the node.
    pub local_rank: u32,
    /// Ranks in the attempt.
    pub world_size: u32,
    /// GPUs (UUIDs) on that node.
    pub gpu_uuids: Vec<String>,
    /// Executable.
    pub command: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Checkpoint directory.
    pub checkpoint_dir: String,
    /// Rank 0's address.
    pub master_addr: String,
    /// Rank 0's port.
    pub master_port: u32,
}

impl AgentServer {
    /// Asks `node`'s agent to start a worker; `Ok` once it is spawned, `Err` with the agent's
    /// reason (stale attempt, cordoned or foreign GPU, spawn failure) or a transport problem.
    pub async fn launch_worker(
        &self,
        node: &str,
        spec: &WorkerLaunchSpec,
        timeout: Duration,
    ) -> Result<String, String> {
        let command_id = self.next_command_id();
        let body = Down::LaunchWorker(pb::LaunchWorker {
            command_id,
            worker: Some(pb::WorkerRef {
                job_uid: spec.job_uid.clone(),
                attempt: spec.attempt,
                rank: spec.rank,
            }),
            local_rank: spec.local_rank,
            world_size: spec.world_size,
            gpu_uuids: spec.gpu_uuids.clone(),
            command: spec.command.clone(),
            args: spec.args.clone(),
            env: spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            checkpoint_dir: spec.checkpoint_dir.clone(),
            master_addr: spec.master_addr.clone(),
            master_port: spec.master_port,
        });
        self.call(node, command_id, body, timeout).await
    }

    /// Asks `node`'s agent to stop every worker of `attempt` of `job_uid` (SIGTERM, then SIGKILL
    /// after `grace`).
    pub async fn stop_workers(
        &self,
        node: &str,
        job_uid: &str,
        attempt: u64,
        grace: Duration,
        reason: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        let command_id = self.next_command_id();
        let body = Down::StopWorker(pb::StopWorker {
            command_id,
            worker: Some(pb::WorkerRef { job_uid: job_uid.to_owned(), attempt, rank: 0 }),
            all_ranks: true,
            grace_period_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
            reason: reason.to_owned(),
        });
        self.call(node, command_id, body, timeout).await
    }
}
