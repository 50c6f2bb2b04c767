//! A worker's progress socket: the lines of `flotilla_contract::progress`, turned into updates.

use crate::supervisor::{Progress, WorkerId, WorkerUpdate};
use flotilla_contract::progress::{ProgressLine, ProgressLineError};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc::UnboundedSender;

/// Accepts the worker's progress connections (it reconnects after a failure) and forwards each
/// well-formed line; a malformed line is logged and skipped, never fatal.
/// Returns once `gone` is notified (the worker exited) and no connection is open.
pub(super) async fn read_progress(
    listener: tokio::net::UnixListener,
    id: WorkerId,
    updates: Option<UnboundedSender<WorkerUpdate>>,
    gone: Arc<tokio::sync::Notify>,
) {
    loop {
        let stream = tokio::select! {
            biased;
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => return,
            },
            () = gone.notified() => return,
        };
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match ProgressLine::parse(&line) {
                Ok(p) => {
                    let progress = Progress {
                        step: p.step,
                        total_steps: p.total_steps,
                        loss: p.loss,
                        tokens_per_second: p.tokens_per_second,
                        last_checkpoint_step: p.last_checkpoint_step.unwrap_or(0),
                    };
                    if let Some(tx) = &updates {
                        let _ = tx.send(WorkerUpdate::Progress(id.clone(), progress));
                    }
                }
                Err(ProgressLineError::TooLong { bytes }) => {
                    tracing::warn!(rank = id.rank, bytes, "progress line too long; skipped")
                }
                Err(e) => {
                    tracing::warn!(rank = id.rank, error = %e, "malformed progress line skipped")
                }
            }
        }
    }
}
