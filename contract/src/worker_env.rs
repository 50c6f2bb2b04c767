//! The environment every worker gets from its agent, and the variables the engine reads.
//!
//! The agent sets the torchrun variables every training program understands, plus Flotilla's
//! own. `flotilla-worker` reads them as the fallbacks of its flags; a user's program may read
//! them too. The operator adds [`ENGINE_CONFIG`] for `flotilla-worker train`.

/// Global rank of the worker (torchrun).
pub const RANK: &str = "RANK";
/// Rank of the worker among those on its node (torchrun).
pub const LOCAL_RANK: &str = "LOCAL_RANK";
/// Number of workers in the attempt (torchrun).
pub const WORLD_SIZE: &str = "WORLD_SIZE";
/// Address rank 0 listens on for rendezvous (torchrun).
pub const MASTER_ADDR: &str = "MASTER_ADDR";
/// Port rank 0 listens on for rendezvous (torchrun).
pub const MASTER_PORT: &str = "MASTER_PORT";
/// The worker's GPUs, as a comma-separated list of UUIDs (CUDA).
pub const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";
/// UID of the job (or service) the worker belongs to.
pub const JOB_UID: &str = "FLOTILLA_JOB_UID";
/// Attempt number of the job.
pub const ATTEMPT: &str = "FLOTILLA_ATTEMPT";
/// Directory checkpoints are written to and resumed from.
pub const CHECKPOINT_DIR: &str = "FLOTILLA_CHECKPOINT_DIR";
/// Unix socket the worker writes [`crate::progress::ProgressLine`]s to.
pub const PROGRESS_SOCKET: &str = "FLOTILLA_PROGRESS_SOCKET";
/// Plain log lines instead of a terminal progress bar; the agent sets [`NO_PROGRESS_BAR_VALUE`].
/// The engine accepts `1`/`0`, `true`/`false`, `yes`/`no` and `on`/`off`.
pub const NO_PROGRESS_BAR: &str = "FLOTILLA_NO_PROGRESS_BAR";
/// The value the agent gives [`NO_PROGRESS_BAR`]: workers are never on a terminal.
pub const NO_PROGRESS_BAR_VALUE: &str = "1";
/// The engine configuration of `flotilla-worker train`, as JSON (what a `TrainingJob`'s
/// `spec.engine` holds); set by the operator.
pub const ENGINE_CONFIG: &str = "FLOTILLA_ENGINE_CONFIG";

/// With simulated GPUs: the misbehaviour files of the worker's GPUs, joined by `:` (read by
/// `flotilla_engine::sim`; never set on real GPUs).
pub const SIM_GPU_FAULTS: &str = "FLOTILLA_SIM_GPU_FAULTS";
