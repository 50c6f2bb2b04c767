//! Progress reporting: a terminal progress bar or plain log lines, and JSON lines to the agent.
//!
//! # Agent protocol
//!
//! When `FLOTILLA_PROGRESS_SOCKET` names a Unix stream socket, every rank connects to its own
//! and writes one [`ProgressLine`] per optimizer step, in the format `flotilla_contract::progress`
//! defines for the agent, plus a heartbeat about every second while it is not stepping
//! ([`ProgressReporter::heartbeats`]). A socket that is missing or closes is retried on the next
//! line; reporting never stops training.

use std::io::{IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

pub use flotilla_contract::progress::{Activity, ProgressLine};

use crate::whereabouts::Whereabouts;

/// How often a worker that is not stepping says what it does instead.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// A training loss as the progress line carries it: the `f64` with the shortest decimal of the
/// `f32` (2.31, not 2.309999942779541), which is what the line carried when it held an `f32`.
pub fn loss_for_report(loss: f32) -> f64 {
    if !loss.is_finite() {
        return f64::from(loss);
    }
    loss.to_string().parse().unwrap_or_else(|_| f64::from(loss))
}

/// Where progress goes.
pub struct ProgressReporter {
    bar: Option<ProgressBar>,
    socket: Arc<Mutex<AgentSocket>>,
    /// Every `log_every` steps a log line, when `log` and there is no bar.
    log: bool,
    log_every: u64,
}

/// The connection to the agent and the last line sent (heartbeats repeat its step fields).
struct AgentSocket {
    path: Option<PathBuf>,
    stream: Option<UnixStream>,
    last: Option<ProgressLine>,
}

impl AgentSocket {
    fn send(&mut self, line: &ProgressLine) {
        let Some(path) = &self.path else { return };
        if self.stream.is_none() {
            self.stream = UnixStream::connect(path).ok();
        }
        if let Some(stream) = self.stream.as_mut()
            && stream.write_all(&line.encode()).is_err()
        {
            self.stream = None;
        }
    }
}

impl ProgressReporter {
    /// A bar when stderr is a terminal and `interactive` is allowed, log lines otherwise (when
    /// `log`: one rank of a group logs for all).
    pub fn new(
        total_steps: u64,
        start_step: u64,
        socket_path: Option<PathBuf>,
        interactive: bool,
        log: bool,
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
        let socket = AgentSocket { path: socket_path, stream: None, last: None };
        Self {
            bar,
            socket: Arc::new(Mutex::new(socket)),
            log,
            log_every: (total_steps / 20).max(1),
        }
    }

    fn socket(&self) -> std::sync::MutexGuard<'_, AgentSocket> {
        self.socket.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends `line` to the agent at once (no bar or log line): a change of activity.
    pub fn send(&self, line: &ProgressLine) {
        let mut socket = self.socket();
        socket.send(line);
        socket.last = Some(line.clone());
    }

    /// Starts a thread that, about every [`HEARTBEAT`], tells the agent what the worker does
    /// while it is not stepping: starting, checkpointing, or waiting for a peer for more than a
    /// heartbeat. Silence while training means it is computing a step. Ends with the process.
    pub fn heartbeats(&self, whereabouts: Arc<Whereabouts>, total_steps: u64) {
        let socket = self.socket.clone();
        let spawned =
            std::thread::Builder::new().name("progress-heartbeat".into()).spawn(move || {
                loop {
                    std::thread::sleep(HEARTBEAT);
                    let now = whereabouts.now();
                    let quiet = match now.activity {
                        Activity::Training => true,
                        Activity::Waiting => now.since.elapsed() < HEARTBEAT,
                        _ => false,
                    };
                    if quiet {
                        continue;
                    }
                    let mut socket =
                        socket.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let base = socket.last.clone().unwrap_or_else(|| {
                        ProgressLine::at_step(now.step, total_steps, 0.0, 0.0, None)
                    });
                    let line = ProgressLine {
                        step: now.step.max(base.step),
                        activity: now.activity,
                        waiting_on_rank: now.waiting_on_rank,
                        step_seconds: None,
                        compute_seconds: None,
                        ..base
                    };
                    socket.send(&line);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no progress heartbeat thread; hangs are seen later");
        }
    }

    /// Moves the bar to `step` (where a resumed run starts).
    pub fn set_position(&self, step: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
        }
    }

    /// Reports one step.
    pub fn report(&self, line: &ProgressLine) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(line.step);
                bar.set_message(format!(
                    "loss {:.4}  {:.0} tok/s",
                    line.loss, line.tokens_per_second
                ));
            }
            None if self.log
                && (line.step.is_multiple_of(self.log_every) || line.step == line.total_steps) =>
            {
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

    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reported_loss_keeps_the_f32_decimal() {
        assert_eq!(loss_for_report(2.31), 2.31);
        assert_eq!(loss_for_report(0.1), 0.1);
        assert!(loss_for_report(f32::NAN).is_nan());
        assert_eq!(loss_for_report(f32::INFINITY), f64::INFINITY);
        let line = ProgressLine::at_step(1, 2, loss_for_report(2.31), 10.0, None);
        assert!(String::from_utf8(line.encode()).unwrap().contains("\"loss\":2.31,"));
    }
}
