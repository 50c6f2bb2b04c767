//! Byte-level tokenizer and the training data: the shipped corpus or a synthetic task.
//!
//! Batches are a pure function of `(seed, rank, cursor)`, so the data position to checkpoint is
//! one counter per rank.

use crate::config::Dataset;
use crate::rng::CounterRng;

/// The small English text corpus shipped with the engine.
pub const CORPUS: &str = include_str!("../data/corpus.txt");

/// Letters of the synthetic task.
const ALPHABET: &[u8; 16] = b"abcdefghijklmnop";

/// Bytes in, bytes out: token ids are the UTF-8 bytes.
pub fn encode(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// Decodes token ids back to text, replacing invalid UTF-8 and ids above 255.
pub fn decode(tokens: &[u32]) -> String {
    let bytes: Vec<u8> = tokens.iter().map(|&t| u8::try_from(t).unwrap_or(b'?')).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The lowest mean loss reachable on the synthetic task: the stride of each sequence (one of
/// three) is unknown until the second token, everything else is determined.
pub fn synthetic_loss_floor(seq_len: usize) -> f64 {
    3f64.ln() / (seq_len - 1) as f64
}

/// Produces the sequences one rank trains on.
#[derive(Clone, Debug)]
pub struct DataStream {
    dataset: Dataset,
    seed: u64,
    rank: u64,
    /// Sequences this rank has consumed; the only state to checkpoint.
    pub cursor: u64,
}

impl DataStream {
    /// A stream for `rank`, positioned at `cursor`.
    pub fn new(dataset: Dataset, seed: u64, rank: u64, cursor: u64) -> Self {
        Self { dataset, seed, rank, cursor }
    }

    /// The next `batch` sequences of `seq_len` tokens, row-major.
    pub fn next_batch(&mut self, batch: usize, seq_len: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(batch * seq_len);
        for _ in 0..batch {
            let mut rng = CounterRng::new(self.seed, self.rank, self.cursor);
            self.cursor += 1;
            match self.dataset {
                Dataset::Synthetic => {
                    let start = rng.below(16) as usize;
                    let stride = 1 + rng.below(3) as usize;
                    out.extend(
                        (0..seq_len).map(|t| u32::from(ALPHABET[(start + t * stride) % 16])),
                    );
                }
                Dataset::Corpus => {
                    let bytes = CORPUS.as_bytes();
                    let start = rng.below((bytes.len() - seq_len) as u64) as usize;
                    out.extend(bytes[start..start + seq_len].iter().map(|&b| u32::from(b)));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_round_trips_utf8() {
        let text = "Flotilla — ships 🚢";
        assert_eq!(decode(&encode(text)), text);
        assert_eq!(encode("A"), [65]);
    }

    #[test]
    fn streams_resume_from_their_cursor_and_differ_by_rank() {
        let mut a = DataStream::new(Dataset::Corpus, 1, 0, 0);
        let first = a.next_batch(2, 16);
        let second = a.next_batch(2, 16);
        let mut resumed = DataStream::new(Dataset::Corpus, 1, 0, 2);
        assert_eq!(resumed.next_batch(2, 16), second);
        assert_ne!(DataStream::new(Dataset::Corpus, 1, 1, 0).next_batch(2, 16), first);
    }

    #[test]
    fn synthetic_sequences_are_arithmetic() {
        let seq = DataStream::new(Dataset::Synthetic, 3, 0, 0).next_batch(1, 10);
        let pos: Vec<i64> = seq.iter().map(|&t| i64::from(t) - i64::from(b'a')).collect();
        let stride = (pos[1] - pos[0]).rem_euclid(16);
        assert!((1..=3).contains(&stride));
        assert!(pos.windows(2).all(|w| (w[1] - w[0]).rem_euclid(16) == stride));
    }
}
