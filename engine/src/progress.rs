//! Progress reporting: a terminal progress bar or plain log lines, and JSON lines to the agent.
//!
//! # Agent protocol
//!
//! When `FLOTILLA_PROGRESS_SOCKET` names a Unix stream socket, the worker connects to it and
//! writes one JSON object per line after every optimizer step:
//!
//! ```json
//! {"step":12,"totalSteps":200,"loss":2.31,"tokensPerSecond":5120.5,"lastCheckpointStep":10}
//! ```
//!
//! `step` counts completed steps, `loss` is the global mean next-token loss (nats),
//! `tokensPerSecond` is the global rate of the last step, and `lastCheckpointStep` is `null`
//! until a checkpoint exists. Only rank 0 reports. A socket that is missing or closes is retried
//! on the next step; reporting never stops training.

use std::io::{IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// One progress line for the agent.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgressLine {
    /// Steps completed.
    pub step: u64,
    /// Steps in the whole run.
    pub total_steps: u64,
    /// Global mean loss of the last step.
    pub loss: f32,
    /// Global tokens per second of the last step.
    pub tokens_per_second: f64,
    /// Step of the newest checkpoint, if any.
    pub last_checkpoint_step: Option<u64>,
}

/// Where progress goes.
pub struct ProgressReporter {
    bar: Option<ProgressBar>,
    socket_path: Option<PathBuf>,
    socket: Option<UnixStream>,
    log_every: u64,
}

impl ProgressReporter {
    /// A bar when stderr is a terminal and `interactive` is allowed, log lines otherwise.
    pub fn new(
        total_steps: u64,
        start_step: u64,
        socket_path: Option<PathBuf>,
        interactive: bool,
    ) -> Self {
        let bar = (interactive && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total_steps);
            let style =
                ProgressStyle::with_template("{bar:40} {pos}/{len} steps  {msg}  eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_position(start_step);
            bar
        });
        Self { bar, socket_path, socket: None, log_every: (total_steps / 20).max(1) }
    }

    /// Reports one step.
    pub fn report(&mut self, line: &ProgressLine) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(line.step);
                bar.set_message(format!(
                    "loss {:.4}  {:.0} tok/s",
                    line.loss, line.tokens_per_second
                ));
            }
            None if line.step.is_multiple_of(self.log_every) || line.step == line.total_steps => {
                tracing::info!(
                    step = line.step,
                    total = line.total_steps,
                    loss = line.loss,
                    tokens_per_second = line.tokens_per_second.round(),
                    "training progress"
                );
            }
            None => {}
        }
        self.send(line);
    }

    fn send(&mut self, line: &ProgressLine) {
        let Some(path) = &self.socket_path else { return };
        if self.socket.is_none() {
            self.socket = UnixStream::connect(path).ok();
        }
        let Some(socket) = self.socket.as_mut() else { return };
        let mut json = serde_json::to_vec(line).unwrap_or_default();
        json.push(b'\n');
        if socket.write_all(&json).is_err() {
            self.socket = None;
        }
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
