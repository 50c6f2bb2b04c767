//! The progress line a training worker sends its agent.
//!
//! When [`crate::worker_env::PROGRESS_SOCKET`] names a Unix stream socket, the worker (rank 0
//! only) connects to it and writes one JSON object per line after every optimizer step:
//!
//! ```json
//! {"step":12,"totalSteps":200,"loss":2.31,"tokensPerSecond":5120.5,"lastCheckpointStep":10}
//! ```
//!
//! `step` counts completed steps, `loss` is the global mean next-token loss (nats),
//! `tokensPerSecond` is the global rate of the last step, and `lastCheckpointStep` is `null` (or
//! absent) until a checkpoint exists. A line longer than [`MAX_LINE_BYTES`] or not of this shape
//! is skipped by the agent, never fatal. Any program the agent runs may speak this protocol.

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
        let line = ProgressLine {
            step: 12,
            total_steps: 200,
            loss: 2.31,
            tokens_per_second: 5120.5,
            last_checkpoint_step: Some(10),
        };
        let text = String::from_utf8(line.encode()).unwrap();
        assert_eq!(
            text,
            "{\"step\":12,\"totalSteps\":200,\"loss\":2.31,\"tokensPerSecond\":5120.5,\"lastCheckpointStep\":10}\n"
        );
        assert_eq!(ProgressLine::parse(&text).unwrap(), line);
    }

    #[test]
    fn no_checkpoint_yet_is_null_or_absent() {
        let none = ProgressLine {
            step: 1,
            total_steps: 2,
            loss: 1.0,
            tokens_per_second: 3.0,
            last_checkpoint_step: None,
        };
        let text = String::from_utf8(none.encode()).unwrap();
        assert!(text.contains("\"lastCheckpointStep\":null"), "{text}");
        let absent = r#"{"step":1,"totalSteps":2,"loss":1.0,"tokensPerSecond":3.0}"#;
        assert_eq!(ProgressLine::parse(absent).unwrap(), none);
    }

    #[test]
    fn garbage_and_long_lines_are_refused() {
        assert!(matches!(ProgressLine::parse("not json"), Err(ProgressLineError::Malformed(_))));
        // A non-finite loss is written as null, which is not a report.
        let nan = ProgressLine {
            step: 1,
            total_steps: 2,
            loss: f64::NAN,
            tokens_per_second: 3.0,
            last_checkpoint_step: None,
        };
        let text = String::from_utf8(nan.encode()).unwrap();
        assert!(ProgressLine::parse(&text).is_err(), "{text}");
        let long = format!("{{\"pad\":\"{}\"}}", "x".repeat(MAX_LINE_BYTES));
        assert!(matches!(
            ProgressLine::parse(&long),
            Err(ProgressLineError::TooLong { bytes }) if bytes == long.len()
        ));
    }
}
