//! A worker's progress socket: the lines of `flotilla_contract::progress`, turned into updates.
//!
//! A worker may write a line per step, many per second; the operator needs far fewer. Lines are
//! forwarded at most once per [`FORWARD_INTERVAL`] per worker — the newest, carrying the longest
//! step time of those it stands for — except that a change of activity (starting, training,
//! checkpointing, waiting, peer lost) goes at once. A chatty worker therefore costs its agent's
//! stream one message a second, however fast it steps.

use crate::supervisor::{Progress, WorkerId, WorkerUpdate};
use flotilla_contract::progress::{ProgressLine, ProgressLineError};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

/// The most often one worker's progress is forwarded (changes of activity go at once).
pub const FORWARD_INTERVAL: Duration = Duration::from_secs(1);

/// Accepts the worker's progress connections (it reconnects after a failure) and forwards
/// well-formed lines as [`Coalescer`] decides; a malformed line is logged and skipped, never
/// fatal. Returns once `gone` is notified (the worker exited) and no connection is open.
pub(super) async fn read_progress(
    listener: tokio::net::UnixListener,
    id: WorkerId,
    updates: Option<UnboundedSender<WorkerUpdate>>,
    gone: Arc<tokio::sync::Notify>,
) {
    let mut coalescer = Coalescer::default();
    let forward = |p: Progress| {
        if let Some(tx) = &updates {
            let _ = tx.send(WorkerUpdate::Progress(id.clone(), p));
        }
    };
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
        loop {
            let flush_at = coalescer.flush_at();
            let line = tokio::select! {
                line = lines.next_line() => line,
                () = sleep_until(flush_at), if flush_at.is_some() => {
                    coalescer.flush(Instant::now()).into_iter().for_each(forward);
                    continue;
                }
            };
            let Ok(Some(line)) = line else { break };
            match ProgressLine::parse(&line) {
                Ok(p) => {
                    coalescer.offer(progress(&p), Instant::now()).into_iter().for_each(forward)
                }
                Err(ProgressLineError::TooLong { bytes }) => {
                    tracing::warn!(rank = id.rank, bytes, "progress line too long; skipped")
                }
                Err(e) => {
                    tracing::warn!(rank = id.rank, error = %e, "malformed progress line skipped")
                }
            }
        }
        // The connection closed (the worker exited or reconnects): nothing is held back.
        coalescer.flush(Instant::now()).into_iter().for_each(forward);
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

fn progress(p: &ProgressLine) -> Progress {
    Progress {
        step: p.step,
        total_steps: p.total_steps,
        loss: p.loss,
        tokens_per_second: p.tokens_per_second,
        last_checkpoint_step: p.last_checkpoint_step.unwrap_or(0),
        step_seconds: p.step_seconds.filter(|s| s.is_finite() && *s >= 0.0).unwrap_or(0.0),
        compute_seconds: p.compute_seconds.filter(|s| s.is_finite() && *s >= 0.0).unwrap_or(0.0),
        activity: p.activity,
        waiting_on_rank: p.waiting_on_rank,
    }
}

/// Decides which of a worker's progress reports are forwarded (pure; the clock is passed in).
#[derive(Debug, Default)]
pub struct Coalescer {
    /// When the last report was forwarded, and its activity.
    sent: Option<(Instant, flotilla_contract::progress::Activity)>,
    /// The newest report not forwarded yet.
    pending: Option<Progress>,
}

impl Coalescer {
    /// A new report: returned when it goes now, else held (merged with what is held).
    pub fn offer(&mut self, mut p: Progress, now: Instant) -> Option<Progress> {
        if let Some(held) = self.pending.take() {
            p.step_seconds = p.step_seconds.max(held.step_seconds);
        }
        let due = match self.sent {
            None => true,
            Some((at, activity)) => activity != p.activity || now >= at + FORWARD_INTERVAL,
        };
        if due {
            self.sent = Some((now, p.activity));
            Some(p)
        } else {
            self.pending = Some(p);
            None
        }
    }

    /// When the held report is due, if one is held.
    pub fn flush_at(&self) -> Option<Instant> {
        let (at, _) = self.sent?;
        self.pending.map(|_| at + FORWARD_INTERVAL)
    }

    /// The held report, now.
    pub fn flush(&mut self, now: Instant) -> Option<Progress> {
        let p = self.pending.take()?;
        self.sent = Some((now, p.activity));
        Some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_contract::progress::Activity;

    fn at(step: u64, seconds: f64, activity: Activity) -> Progress {
        Progress { step, step_seconds: seconds, activity, ..Progress::default() }
    }

    #[test]
    fn a_fast_worker_is_forwarded_once_a_second_with_its_slowest_step() {
        let t0 = Instant::now();
        let mut c = Coalescer::default();
        assert_eq!(c.offer(at(1, 0.1, Activity::Training), t0).map(|p| p.step), Some(1));
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(c.offer(at(2, 0.5, Activity::Training), ms(100)), None);
        assert_eq!(c.offer(at(3, 0.1, Activity::Training), ms(200)), None);
        assert_eq!(c.flush_at(), Some(ms(1000)));
        let held = c.flush(ms(1000)).expect("held report");
        assert_eq!((held.step, held.step_seconds), (3, 0.5));
        assert_eq!(c.flush_at(), None);
        // A change of activity goes at once, and the held report with it.
        assert_eq!(c.offer(at(4, 0.1, Activity::Training), ms(1100)), None);
        let ckpt = c.offer(at(4, 0.0, Activity::Checkpointing), ms(1200)).expect("at once");
        assert_eq!((ckpt.activity, ckpt.step_seconds), (Activity::Checkpointing, 0.1));
        assert_eq!(c.flush_at(), None);
    }
}
