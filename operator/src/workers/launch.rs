//! Worker command lines, environments and rendezvous ports for a launch (pure): what each
//! rank of a training attempt or a service replica runs, and where.

use crate::agents::WorkerLaunchSpec;
use crate::crd::{Placement, TrainingJob};
use kube::ResourceExt;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use super::ReplicaLaunch;
use flotilla_contract::fnv::fnv1a_32;
use flotilla_contract::worker_env;

/// The exit code recorded for a worker its agent could not start (as a shell's "not found").
pub const FAILED_TO_START_CODE: i32 = 127;
/// Rendezvous ports are `--master-port-base` plus an offset below this, from the job and attempt.
pub(super) const MASTER_PORT_SPAN: u32 = 1000;

/// How the operator launches workers through agents.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerLaunchArgs {
    /// The `flotilla-worker` executable on the nodes (a path or a name on the agent's PATH),
    /// for jobs that use the built-in engine.
    #[arg(long, env = "FLOTILLA_WORKER_BINARY", default_value = "flotilla-worker")]
    pub worker_binary: String,
    /// Checkpoints of jobs without `spec.checkpoint.path` go to `<root>/<namespace>/<name>-<uid>`.
    #[arg(long, env = "FLOTILLA_CHECKPOINT_ROOT", default_value = "/var/lib/flotilla/checkpoints")]
    pub checkpoint_root: PathBuf,
    /// Lowest rendezvous port (MASTER_PORT); each job and attempt gets one of the next 1000.
    #[arg(long, env = "FLOTILLA_MASTER_PORT_BASE", default_value_t = 29500)]
    pub master_port_base: u32,
    /// MASTER_ADDR when rank 0's `GpuNode` reports no address (127.0.0.1 for a one-host demo),
    /// and the address of service replicas' endpoints on such nodes; without it the node's
    /// name is used.
    #[arg(long, env = "FLOTILLA_WORKER_MASTER_ADDR")]
    pub worker_master_addr: Option<String>,
    /// Seconds a stopped worker gets between SIGTERM and SIGKILL.
    #[arg(long, env = "FLOTILLA_WORKER_STOP_GRACE_SECONDS", default_value_t = 30)]
    pub worker_stop_grace_seconds: u64,
}

/// The address the other ranks reach rank 0 of `placement` at: the address its node's agent
/// reported (`reported(node)`, as mirrored into its `GpuNode`), else `--worker-master-addr`,
/// else the node's name.
pub fn master_addr(
    placement: &Placement,
    reported: impl Fn(&str) -> Option<String>,
    args: &WorkerLaunchArgs,
) -> String {
    let rank0 =
        placement.workers.iter().min_by_key(|w| w.rank).map(|w| w.node.clone()).unwrap_or_default();
    reported(&rank0).or_else(|| args.worker_master_addr.clone()).unwrap_or(rank0)
}

/// Every worker of `attempt` of `job` as `(node, launch)`, in rank order. `uuid_of(node, index)`
/// names a GPU as its agent registered it.
pub fn launch_specs(
    job: &TrainingJob,
    attempt: i32,
    uuid_of: &dyn Fn(&str, i32) -> Option<String>,
    master_addr: &str,
    args: &WorkerLaunchArgs,
) -> Result<Vec<(String, WorkerLaunchSpec)>, String> {
    let uid = job.uid().unwrap_or_default();
    let placement = job
        .status
        .as_ref()
        .and_then(|s| s.attempt.as_ref())
        .map(|a| a.placement.clone())
        .unwrap_or_default();
    let checkpoint_dir = match &job.spec.checkpoint {
        Some(c) => c.path.clone(),
        None => args
            .checkpoint_root
            .join(job.namespace().unwrap_or_default())
            .join(format!("{}-{uid}", job.name_any()))
            .display()
            .to_string(),
    };
    let program = worker_program(job, args)?;
    let master_port = args.master_port_base + port_offset(&uid, attempt);
    let rendezvous = (master_addr, master_port);
    rank_specs(&uid, attempt, &placement, &program, &checkpoint_dir, rendezvous, uuid_of)
}

/// A program, its arguments and extra environment.
#[derive(Clone, Debug, PartialEq)]
struct Program {
    command: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
}

/// The program every worker runs: the custom command, or `flotilla-worker train` reading the
/// job's engine configuration (JSON) from its environment.
fn worker_program(job: &TrainingJob, args: &WorkerLaunchArgs) -> Result<Program, String> {
    if let Some(cmd) = &job.spec.command {
        let (program, leading) = cmd
            .command
            .split_first()
            .ok_or("spec.command.command: expected a program, got none")?;
        let program_args = leading.iter().chain(&cmd.args).cloned().collect();
        let env = cmd.env.iter().map(|e| (e.name.clone(), e.value.clone())).collect();
        return Ok(Program { command: program.clone(), args: program_args, env });
    }
    let engine = job.spec.engine.as_ref().ok_or("spec: expected engine or command, got neither")?;
    let config = serde_json::to_string(engine).map_err(|e| format!("spec.engine: {e}"))?;
    Ok(Program {
        command: args.worker_binary.clone(),
        args: vec!["train".into()],
        env: BTreeMap::from([(worker_env::ENGINE_CONFIG.to_string(), config)]),
    })
}

/// A rendezvous port offset from the job and attempt (FNV-1a), so attempts and jobs sharing a
/// node rarely collide and a new attempt never reuses the previous one's port.
pub(super) fn port_offset(uid: &str, attempt: i32) -> u32 {
    let h = fnv1a_32(uid.as_bytes());
    (h % MASTER_PORT_SPAN + attempt.max(0) as u32) % MASTER_PORT_SPAN
}

/// The workers of one launch of a service replica, in rank order: `flotilla-worker serve` on
/// the replica's GPUs. Rank 0 listens on every address of its node at `replica.port`; with more
/// than one worker the others join it at `master_addr` as an expert-parallel group (each holds
/// a share of every MoE layer's experts) on a rendezvous port chosen like a training attempt's.
pub fn replica_specs(
    uid: &str,
    attempt: i32,
    replica: &ReplicaLaunch,
    uuid_of: &dyn Fn(&str, i32) -> Option<String>,
    master_addr: &str,
    args: &WorkerLaunchArgs,
) -> Result<Vec<(String, WorkerLaunchSpec)>, String> {
    if replica.placement.workers.is_empty() {
        return Err("placement: expected at least one worker, got none".into());
    }
    let master_port = args.master_port_base + port_offset(uid, attempt);
    let program_args = [
        "serve",
        "--checkpoint",
        &replica.checkpoint,
        "--host",
        "0.0.0.0",
        "--port",
        &replica.port.to_string(),
        "--model-name",
        &replica.served_name,
        "--max-batch-size",
        &replica.max_batch_size.to_string(),
        "--default-max-tokens",
        &replica.default_max_tokens.to_string(),
    ]
    .map(String::from)
    .to_vec();
    let program =
        Program { command: args.worker_binary.clone(), args: program_args, env: BTreeMap::new() };
    let rendezvous = (master_addr, master_port);
    rank_specs(uid, attempt, &replica.placement, &program, &replica.checkpoint, rendezvous, uuid_of)
}

/// One launch spec per worker of `placement`, in rank order: local ranks count the workers of
/// the launch on each node, GPUs are named by the UUIDs their agent registered.
fn rank_specs(
    id: &str,
    attempt: i32,
    placement: &Placement,
    program: &Program,
    checkpoint_dir: &str,
    (master_addr, master_port): (&str, u32),
    uuid_of: &dyn Fn(&str, i32) -> Option<String>,
) -> Result<Vec<(String, WorkerLaunchSpec)>, String> {
    let mut workers = placement.workers.clone();
    workers.sort_by_key(|w| w.rank);
    let world_size = workers.len() as u32;
    let mut on_node: HashMap<&str, u32> = HashMap::new();
    let mut out = Vec::with_capacity(workers.len());
    for w in &workers {
        let local = on_node.entry(w.node.as_str()).or_default();
        let gpu_uuids = w
            .gpus
            .iter()
            .map(|&g| {
                uuid_of(&w.node, g).ok_or_else(|| {
                    format!("rank {}: node {} has no registered GPU {g}", w.rank, w.node)
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.push((
            w.node.clone(),
            WorkerLaunchSpec {
                job_uid: id.to_string(),
                attempt: attempt as u64,
                rank: w.rank as u32,
                local_rank: *local,
                world_size,
                gpu_uuids,
                command: program.command.clone(),
                args: program.args.clone(),
                env: program.env.clone(),
                checkpoint_dir: checkpoint_dir.to_string(),
                master_addr: master_addr.to_string(),
                master_port,
            },
        ));
        *local += 1;
    }
    Ok(out)
}
