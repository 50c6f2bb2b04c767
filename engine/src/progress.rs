//! Progress reporting: a terminal progress bar or plain log lines, and JSON lines to the agent.
//!
//! # Agent protocol
//!
//! When `FLOTILLA_PROGRESS_SOCKET` names a Unix stream socket, rank 0 connects to it and writes
//! one [`ProgressLine`] per optimizer step, in the format `flotilla_contract::progress` defines
//! for the agent. A socket that is missing or closes is retried on the next step; reporting
//! never stops training.

use std::io::{IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};

pub use flotilla_contract::progress::ProgressLine;

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
        if socket.write_all(&line.encode()).is_err() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reported_loss_keeps_the_f32_decimal() {
        assert_eq!(loss_for_report(2.31), 2.31);
        assert_eq!(loss_for_report(0.1), 0.1);
        assert!(loss_for_report(f32::NAN).is_nan());
        assert_eq!(loss_for_report(f32::INFINITY), f64::INFINITY);
        let line = ProgressLine {
            step: 1,
            total_steps: 2,
            loss: loss_for_report(2.31),
            tokens_per_second: 10.0,
            last_checkpoint_step: None,
        };
        assert!(String::from_utf8(line.encode()).unwrap().contains("\"loss\":2.31,"));
    }
}
