//! Workers' output: copied into size-bounded log files that rotate to `<file>.1`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Copies a worker's output into its log, line by line where lines are short.
pub(super) async fn copy_to_log(mut output: impl AsyncRead + Unpin, log: BoundedLog) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match output.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => log.write(&buf[..n]).await,
        }
    }
}

/// A log file that rotates to `<file>.1` at a size limit, so a chatty worker cannot fill a disk.
#[derive(Clone, Debug)]
pub(super) struct BoundedLog(Arc<tokio::sync::Mutex<BoundedLogState>>);

#[derive(Debug)]
struct BoundedLogState {
    path: PathBuf,
    max_bytes: u64,
    written: u64,
    file: Option<tokio::fs::File>,
}

impl BoundedLog {
    pub(super) fn new(path: PathBuf, max_bytes: u64) -> Self {
        Self(Arc::new(tokio::sync::Mutex::new(BoundedLogState {
            path,
            max_bytes: max_bytes.max(1024),
            written: 0,
            file: None,
        })))
    }

    pub(super) async fn write(&self, bytes: &[u8]) {
        let mut state = self.0.lock().await;
        if state.file.is_none() || state.written + bytes.len() as u64 > state.max_bytes {
            if state.file.take().is_some() {
                let rotated = rotated_path(&state.path);
                let _ = tokio::fs::rename(&state.path, rotated).await;
            }
            match tokio::fs::File::create(&state.path).await {
                Ok(file) => {
                    state.file = Some(file);
                    state.written = 0;
                }
                Err(e) => {
                    tracing::warn!(path = %state.path.display(), error = %e, "cannot write worker log");
                    return;
                }
            }
        }
        if let Some(file) = state.file.as_mut()
            && file.write_all(bytes).await.is_ok()
        {
            let _ = file.flush().await;
            state.written += bytes.len() as u64;
        }
    }
}

/// The earlier chunk of a rotated log: `<file>.1`.
pub(crate) fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_rotate_at_the_size_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.log");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async {
            let log = BoundedLog::new(path.clone(), 1024);
            for _ in 0..5 {
                log.write(&[b'x'; 400]).await;
            }
        });
        let current = std::fs::metadata(&path).expect("current").len();
        let previous = std::fs::metadata(rotated_path(&path)).expect("rotated").len();
        assert!(current <= 1024 && previous <= 1024, "current {current}, previous {previous}");
        assert_eq!(
            current + previous,
            1200,
            "the newest 1200 bytes survive rotation (2000 written)"
        );
    }
}
