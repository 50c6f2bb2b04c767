//! Health verdicts and unacknowledged events survive an agent restart.
//!
//! Without this, a restarted agent would report a Failed GPU as Healthy (NVML does not replay
//! XIDs) and drop events the operator never acknowledged. The file is small and changes only on
//! critical events and acknowledgements; it is written to a temporary name, fsynced and renamed.

use crate::health::HealthStatus;
use crate::outbox::Outbox;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// Errors reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// I/O on the file.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not what this agent wrote.
    #[error(
        "state file {path}: expected the agent's JSON state, got unparsable content ({source})"
    )]
    Parse {
        /// The file.
        path: String,
        /// The parse error.
        source: serde_json::Error,
    },
}

/// What is kept across restarts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PersistedState {
    /// Node the state belongs to (a file from another node is ignored).
    pub node: String,
    /// Agent instance id: kept, so sequence numbers continue and the operator dedups resends.
    pub instance_id: String,
    /// Health by GPU UUID.
    pub health: BTreeMap<String, HealthStatus>,
    /// Unacknowledged critical events.
    pub outbox: Outbox,
}

/// Reads the state; `Ok(None)` when there is no file yet.
pub fn load(path: &Path) -> Result<Option<PersistedState>, PersistError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PersistError::Io { path: path.display().to_string(), source }),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| PersistError::Parse { path: path.display().to_string(), source })
}

/// Writes the state atomically (temporary file, fsync, rename).
pub fn save(path: &Path, state: &PersistedState) -> Result<(), PersistError> {
    let io = |source| PersistError::Io { path: path.display().to_string(), source };
    let tmp = path.with_extension("tmp");
    let json = serde_json::to_vec(state)
        .map_err(|source| PersistError::Parse { path: path.display().to_string(), source })?;
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(&json).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Fault;
    use crate::outbox::CriticalKind;

    #[test]
    fn round_trips_and_reports_a_missing_file_as_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        assert_eq!(load(&path).expect("load"), None);
        let mut state = PersistedState {
            node: "node-a".into(),
            instance_id: "i-1".into(),
            ..Default::default()
        };
        state.health.insert("GPU-1".into(), HealthStatus::healthy());
        state.outbox.push("GPU-1", CriticalKind::Fault(Fault::Xid(79)), HealthStatus::healthy(), 5);
        save(&path, &state).expect("save");
        assert_eq!(load(&path).expect("load"), Some(state));
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        std::fs::write(&path, "not json").expect("write");
        let err = load(&path).expect_err("garbage").to_string();
        assert!(
            err.contains("state.json") && err.contains("expected the agent's JSON state"),
            "{err}"
        );
    }
}
