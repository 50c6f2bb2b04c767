//! The progress line a training worker sends its agent.
//!
//! When [`crate::worker_env::PROGRESS_SOCKET`] names a Unix stream socket, every worker (each
//! rank has its own socket) connects to it and writes one JSON object per line after every
//! optimizer step:
//!
//! ```json
//! {"step":12,"totalSteps":200,"loss":2.31,"tokensPerSecond":5120.5,"lastCheckpointStep":10}
//! ```
//!
//! `step` counts completed steps, `loss` is the global mean next-token loss (nats),
//! `tokensPerSecond` is the global rate of the last step, and `lastCheckpointStep` is `null` (or
//! absent) until a checkpoint exists. A line longer than [`MAX_LINE_BYTES`] or not of this shape
//! is skipped by the agent, never fatal. Any program the agent runs may speak this protocol.
//!
//! Optional fields feed hang and straggler detection (absent means unknown):
//!
//! - `stepSeconds`: wall time of the step just completed; `computeSeconds`: the part of it this
//!   rank spent computing (not waiting for its peers in a collective);
//! - `activity`: what the worker does now — `training` (the default), `starting` (loading,
//!   resuming, meeting its peers), `checkpointing` (writing a checkpoint), `waiting` (blocked in a
//!   collective for more than a second, repeated about every second while it lasts, with
//!   `waitingOnRank` naming the peer whose data it waits for) or `peerLost` (the collective gave
//!   up on `waitingOnRank`; the worker exits next).
//!
//! A line that only changes `activity` repeats the last completed `step`.

use serde::{Deserialize, Serialize};

/// The longest line the agent accepts, in bytes (without the newline).
pub const MAX_LINE_BYTES: usize = 4096;

/// One progress report of a training worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgressLine {
    /// Steps completed.
    pub step: u64,
    /// Steps in the whole run.
    pub total_steps: u64,
    /// Global mean loss of the last step (nats).
    pub loss: f64,
    /// Global tokens per second of the last step.
    pub tokens_per_second: f64,
    /// Step of the newest checkpoint, if any.
    #[serde(default)]
    pub last_checkpoint_step: Option<u64>,
    /// Wall time of the step just completed, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_seconds: Option<f64>,
    /// The part of `step_seconds` spent computing rather than waiting for peers, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_seconds: Option<f64>,
    /// What the worker does now.
    #[serde(default, skip_serializing_if = "Activity::is_training")]
    pub activity: Activity,
    /// The peer rank a `waiting` or `peerLost` worker waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_on_rank: Option<u32>,
}

/// What a worker is doing, as its progress line says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Activity {
    /// Computing steps (the default when a line names no activity).
    #[default]
    Training,
    /// Loading, resuming from a checkpoint or meeting its peers; no step done yet.
    Starting,
    /// Writing a checkpoint.
    Checkpointing,
    /// Blocked in a collective on `waiting_on_rank` for more than a second.
    Waiting,
    /// The collective gave up on `waiting_on_rank`; the worker is about to exit.
    PeerLost,
}

impl Activity {
    /// True for [`Activity::Training`] (the value a line may leave out).
    pub fn is_training(&self) -> bool {
        *self == Activity::Training
    }
}

/// Why a line is not a progress report.
#[derive(Debug, thiserror::Error)]
pub enum ProgressLineError {
    /// The line is longer than [`MAX_LINE_BYTES`].
    #[error("progress line of {bytes} bytes, expected at most {MAX_LINE_BYTES}")]
    TooLong {
        /// Its length.
        bytes: usize,
    },
    /// The line is not a JSON object of the expected shape.
    #[error(
        "progress line: expected {{step, totalSteps, loss, tokensPerSecond, lastCheckpointStep}}: {0}"
    )]
    Malformed(#[from] serde_json::Error),
}

impl ProgressLine {
    /// A line with the step fields only (no timing, activity `training`).
    pub fn at_step(
        step: u64,
        total_steps: u64,
        loss: f64,
        tokens_per_second: f64,
        last_checkpoint_step: Option<u64>,
    ) -> Self {
        Self {
            step,
            total_steps,
            loss,
            tokens_per_second,
            last_checkpoint_step,
            step_seconds: None,
            compute_seconds: None,
            activity: Activity::Training,
            waiting_on_rank: None,
        }
    }

    /// The line as written to the socket: compact JSON followed by `\n`.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of numbers always serialises (a non-finite float becomes `null`).
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// Parses one line (without or with its trailing newline).
    pub fn parse(line: &str) -> Result<Self, ProgressLineError> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        if line.len() > MAX_LINE_BYTES {
            return Err(ProgressLineError::TooLong { bytes: line.len() });
        }
        Ok(serde_json::from_str(line)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_documented_line_and_parses_it_back() {
        let line = ProgressLine::at_step(12, 200, 2.31, 5120.5, Some(10));
        let text = String::from_utf8(line.encode()).unwrap();
        assert_eq!(
            text,
            "{\"step\":12,\"totalSteps\":200,\"loss\":2.31,\"tokensPerSecond\":5120.5,\"lastCheckpointStep\":10}\n"
        );
        assert_eq!(ProgressLine::parse(&text).unwrap(), line);
    }

    #[test]
    fn no_checkpoint_yet_is_null_or_absent() {
        let none = ProgressLine::at_step(1, 2, 1.0, 3.0, None);
        let text = String::from_utf8(none.encode()).unwrap();
        assert!(text.contains("\"lastCheckpointStep\":null"), "{text}");
        let absent = r#"{"step":1,"totalSteps":2,"loss":1.0,"tokensPerSecond":3.0}"#;
        assert_eq!(ProgressLine::parse(absent).unwrap(), none);
    }

    #[test]
    fn timing_and_activity_are_optional_and_round_trip() {
        let waiting = ProgressLine {
            step_seconds: Some(0.25),
            compute_seconds: Some(0.2),
            activity: Activity::Waiting,
            waiting_on_rank: Some(2),
            ..ProgressLine::at_step(7, 9, 1.5, 10.0, Some(5))
        };
        let text = String::from_utf8(waiting.encode()).unwrap();
        assert!(text.contains("\"activity\":\"waiting\",\"waitingOnRank\":2"), "{text}");
        assert_eq!(ProgressLine::parse(&text).unwrap(), waiting);
        let peer_lost = r#"{"step":1,"totalSteps":2,"loss":1.0,"tokensPerSecond":3.0,"activity":"peerLost","waitingOnRank":0}"#;
        assert_eq!(ProgressLine::parse(peer_lost).unwrap().activity, Activity::PeerLost);
        let unknown =
            r#"{"step":1,"totalSteps":2,"loss":1.0,"tokensPerSecond":3.0,"activity":"dancing"}"#;
        assert!(ProgressLine::parse(unknown).is_err());
    }

    #[test]
    fn garbage_and_long_lines_are_refused() {
        assert!(matches!(ProgressLine::parse("not json"), Err(ProgressLineError::Malformed(_))));
        // A non-finite loss is written as null, which is not a report.
        let nan = ProgressLine::at_step(1, 2, f64::NAN, 3.0, None);
        let text = String::from_utf8(nan.encode()).unwrap();
        assert!(ProgressLine::parse(&text).is_err(), "{text}");
        let long = format!("{{\"pad\":\"{}\"}}", "x".repeat(MAX_LINE_BYTES));
        assert!(matches!(
            ProgressLine::parse(&long),
            Err(ProgressLineError::TooLong { bytes }) if bytes == long.len()
        ));
    }
}
