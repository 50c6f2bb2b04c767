//! Crash-safe checkpoints.
//!
//! Layout under the checkpoint directory:
//!
//! ```text
//! step-00000040/model.safetensors      weights and router biases, Hugging Face DeepSeek names
//! step-00000040/optimizer.safetensors  AdamW moments: `{name}.exp_avg`, `{name}.exp_avg_sq`
//! step-00000040/trainer.json           TrainerState: step, data cursors, config and its hash
//! step-00000040/manifest.json          sha256 and size of each file above
//! latest                               the name of the newest complete checkpoint
//! ```
//!
//! A checkpoint is written into `.tmp-…`, every file and the directory are fsynced, the directory
//! is renamed into place and only then is `latest` replaced (also by rename). A crash at any
//! point leaves the previous checkpoint named by `latest` intact.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::EngineConfig;

const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const TRAINER_FILE: &str = "trainer.json";
const MANIFEST_FILE: &str = "manifest.json";
const LATEST: &str = "latest";

/// Checkpoint failures; each names the path or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// A checkpoint is incomplete or its content does not match its manifest.
    #[error("checkpoint {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// A checkpoint belongs to a different configuration or world size.
    #[error(
        "checkpoint {path} does not match this run: {field} is {found}, this run has {expected}"
    )]
    Mismatch { path: PathBuf, field: &'static str, expected: String, found: String },
}

type Result<T, E = CheckpointError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_owned(), source }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Corrupt { path: path.to_owned(), reason: reason.into() }
}

/// Where a training run stands; enough, with weights and optimizer, to continue exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Ranks in the data-parallel group that wrote it.
    pub world_size: usize,
    /// Sequences consumed by each rank (the data streams' counters).
    pub data_cursors: Vec<u64>,
    /// AdamW's step counter (bias correction).
    pub optimizer_step: u64,
    /// Hash of the settings that determine the trajectory; see [`config_hash`].
    pub config_hash: String,
    /// The full configuration, so a checkpoint can be served on its own.
    pub config: EngineConfig,
    /// Restart attempt that wrote it (`FLOTILLA_ATTEMPT`).
    pub attempt: u64,
    /// Loss at each completed step, for reporting.
    pub losses: Vec<f32>,
}

/// Everything a checkpoint holds, in memory.
pub struct Snapshot {
    /// Model tensors by Hugging Face name.
    pub model: HashMap<String, Tensor>,
    /// Optimizer tensors by name.
    pub optimizer: HashMap<String, Tensor>,
    /// Trainer state.
    pub trainer: TrainerState,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    step: u64,
    files: BTreeMap<String, FileEntry>,
}

#[derive(Serialize, Deserialize)]
struct FileEntry {
    sha256: String,
    bytes: u64,
}

/// Hash of the model and training settings that determine the loss trajectory (the checkpoint
/// interval, timeouts, target loss and serving settings may change between attempts).
pub fn config_hash(config: &EngineConfig) -> String {
    let mut training = config.training.clone();
    training.checkpoint_interval = 0;
    training.collective_timeout_seconds = 0;
    training.target_loss = None;
    let json = serde_json::json!({ "model": config.model, "training": training });
    hex::encode(Sha256::digest(json.to_string().as_bytes()))
}

/// Name of the directory of step `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Writes a checkpoint atomically and points `latest` at it. `after_file` is called after each
/// data file is written (tests use it to simulate a crash mid-write).
pub fn save(
    dir: &Path,
    snapshot: &Snapshot,
    mut after_file: impl FnMut(&str) -> io::Result<()>,
) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let name = step_dir_name(snapshot.trainer.step);
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    let tensor_err =
        |path: &Path, e: candle_core::Error| corrupt(path, format!("cannot write tensors: {e}"));
    let mut files = BTreeMap::new();
    for (file, tensors) in [(MODEL_FILE, &snapshot.model), (OPTIMIZER_FILE, &snapshot.optimizer)] {
        let path = tmp.join(file);
        candle_core::safetensors::save(tensors, &path).map_err(|e| tensor_err(&path, e))?;
        files.insert(file.to_owned(), seal(&path)?);
        after_file(file).map_err(io_err(&path))?;
    }
    let trainer_path = tmp.join(TRAINER_FILE);
    let json = serde_json::to_vec_pretty(&snapshot.trainer)
        .map_err(|e| corrupt(&trainer_path, e.to_string()))?;
    write_synced(&trainer_path, &json)?;
    files.insert(TRAINER_FILE.to_owned(), seal(&trainer_path)?);
    after_file(TRAINER_FILE).map_err(io_err(&trainer_path))?;
    let manifest = Manifest { step: snapshot.trainer.step, files };
    let manifest_path = tmp.join(MANIFEST_FILE);
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| corrupt(&manifest_path, e.to_string()))?;
    write_synced(&manifest_path, &json)?;
    sync_dir(&tmp)?;

    let target = dir.join(&name);
    if target.exists() {
        fs::remove_dir_all(&target).map_err(io_err(&target))?;
    }
    fs::rename(&tmp, &target).map_err(io_err(&target))?;
    sync_dir(dir)?;
    let latest_tmp = dir.join(format!(".tmp-{LATEST}-{}", std::process::id()));
    write_synced(&latest_tmp, format!("{name}\n").as_bytes())?;
    fs::rename(&latest_tmp, dir.join(LATEST)).map_err(io_err(dir))?;
    sync_dir(dir)?;
    Ok(target)
}

/// Removes complete checkpoints older than the newest `keep` (never the one `latest` names).
pub fn prune(dir: &Path, keep: usize) -> Result<()> {
    let latest = read_latest(dir)?;
    let mut steps: Vec<String> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("step-"))
        .collect();
    steps.sort();
    let excess = steps.len().saturating_sub(keep);
    for name in steps.into_iter().take(excess) {
        if Some(&name) != latest.as_ref() {
            let path = dir.join(&name);
            fs::remove_dir_all(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

fn read_latest(dir: &Path) -> Result<Option<String>> {
    let path = dir.join(LATEST);
    match fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s.trim().to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// Loads the checkpoint `latest` names, verifying every checksum; `Ok(None)` when there is none.
pub fn load_latest(dir: &Path, device: &Device) -> Result<Option<(PathBuf, Snapshot)>> {
    let Some(name) = read_latest(dir)? else { return Ok(None) };
    if !name.starts_with("step-") || name.contains('/') {
        return Err(corrupt(
            &dir.join(LATEST),
            format!("names {name:?}, expected a step-NNNNNNNN directory"),
        ));
    }
    let path = dir.join(&name);
    Ok(Some((path.clone(), load(&path, device)?)))
}

/// Loads and verifies one checkpoint directory.
pub fn load(path: &Path, device: &Device) -> Result<Snapshot> {
    let manifest_path = path.join(MANIFEST_FILE);
    let raw = fs::read(&manifest_path)
        .map_err(|e| corrupt(path, format!("cannot read {MANIFEST_FILE}: {e}")))?;
    let manifest: Manifest =
        serde_json::from_slice(&raw).map_err(|e| corrupt(path, format!("{MANIFEST_FILE}: {e}")))?;
    for file in [MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE] {
        let entry = manifest
            .files
            .get(file)
            .ok_or_else(|| corrupt(path, format!("manifest lists no {file}")))?;
        let actual =
            file_digest(&path.join(file)).map_err(|e| corrupt(path, format!("{file}: {e}")))?;
        if actual.0 != entry.sha256 || actual.1 != entry.bytes {
            return Err(corrupt(
                path,
                format!(
                    "{file} has sha256 {} ({} bytes), manifest says {} ({} bytes)",
                    actual.0, actual.1, entry.sha256, entry.bytes
                ),
            ));
        }
    }
    let tensors = |file: &str| {
        candle_core::safetensors::load(path.join(file), device)
            .map_err(|e| corrupt(path, format!("{file}: {e}")))
    };
    let raw = fs::read(path.join(TRAINER_FILE)).map_err(io_err(path))?;
    let trainer: TrainerState =
        serde_json::from_slice(&raw).map_err(|e| corrupt(path, format!("{TRAINER_FILE}: {e}")))?;
    if trainer.step != manifest.step {
        return Err(corrupt(
            path,
            format!("trainer step {} differs from manifest step {}", trainer.step, manifest.step),
        ));
    }
    Ok(Snapshot { model: tensors(MODEL_FILE)?, optimizer: tensors(OPTIMIZER_FILE)?, trainer })
}

/// Refuses a checkpoint written by another configuration or world size.
pub fn check_compatible(
    path: &Path,
    state: &TrainerState,
    config: &EngineConfig,
    world: usize,
) -> Result<()> {
    let expected = config_hash(config);
    if state.config_hash != expected {
        return Err(CheckpointError::Mismatch {
            path: path.to_owned(),
            field: "config hash",
            expected,
            found: state.config_hash.clone(),
        });
    }
    if state.world_size != world || state.data_cursors.len() != world {
        return Err(CheckpointError::Mismatch {
            path: path.to_owned(),
            field: "world size",
            expected: world.to_string(),
            found: state.world_size.to_string(),
        });
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).map_err(io_err(path))?;
    file.write_all(bytes).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

/// Fsyncs a written file and returns its manifest entry.
fn seal(path: &Path) -> Result<FileEntry> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io_err(path))?;
    let (sha256, bytes) = file_digest(path).map_err(io_err(path))?;
    Ok(FileEntry { sha256, bytes })
}

fn file_digest(path: &Path) -> io::Result<(String, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), total))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}
