//! From generated tokens to the text and `logprobs` of one choice: UTF-8 assembly, stop
//! sequences (text held back while it could still become one), and the log-probabilities of
//! exactly the tokens whose text was released.
//!
//! Tokens are bytes, so a released piece of `k` bytes carries the next `k` tokens' logprobs.

use std::collections::VecDeque;

use serde_json::{Value, json};

use super::api::Utf8Stream;
use super::batcher::{GeneratedToken, TokenLogprobs};

/// Holds text back while it could be the start of a stop sequence; stops at the first one.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (none: every text passes at once).
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops, held: String::new(), stopped: false }
    }

    /// Adds `text`; returns what can be released: everything before a stop sequence that
    /// completed (after which nothing more is released), or everything except the longest tail
    /// that begins a stop sequence.
    pub fn push(&mut self, text: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            self.stopped = true;
            let out = self.held[..at].to_owned();
            self.held.clear();
            return out;
        }
        let keep = self.stops.iter().map(|s| tail_starting(&self.held, s)).max().unwrap_or(0);
        self.held.drain(..self.held.len() - keep).collect()
    }

    /// Whether a stop sequence was reached.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The text held back, at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest tail of `text` that is a proper prefix of `stop`.
fn tail_starting(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .find(|&n| stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

/// Text released for a choice, with the logprobs of the tokens it came from.
#[derive(Debug, Default, PartialEq)]
pub struct Piece {
    /// The released text.
    pub text: String,
    /// Logprobs of the released tokens (empty when the request asked for none).
    pub tokens: Vec<(u32, TokenLogprobs)>,
    /// Byte offset of the first released token within the choice's text.
    pub offset: usize,
}

/// One choice's text as tokens arrive.
#[derive(Default)]
pub struct ChoiceText {
    utf8: Utf8Stream,
    stop: StopMatcher,
    pending: VecDeque<(u32, TokenLogprobs)>,
    released: usize,
}

impl ChoiceText {
    /// A choice that ends at the first of `stops`.
    pub fn new(stops: Vec<String>) -> Self {
        Self { stop: StopMatcher::new(stops), ..Self::default() }
    }

    /// Adds a generated token; returns what can be released now.
    pub fn push(&mut self, token: GeneratedToken) -> Piece {
        if let Some(lp) = token.logprobs {
            self.pending.push_back((token.id, lp));
        }
        let text = self.utf8.push(token.id);
        let out = self.stop.push(&text);
        if self.stop.stopped() {
            // Tokens past the stop sequence's start are not part of the answer.
            let piece = self.release(out);
            self.pending.clear();
            return piece;
        }
        self.release(out)
    }

    /// Whether a stop sequence ended the choice.
    pub fn stopped(&self) -> bool {
        self.stop.stopped()
    }

    /// Everything still held, when generation ended for another reason.
    pub fn finish(&mut self) -> Piece {
        let rest = self.utf8.flush();
        let mut text = self.stop.push(&rest);
        if !self.stop.stopped() {
            text.push_str(&self.stop.finish());
        }
        let mut piece = self.release(text);
        if !self.stop.stopped() {
            piece.tokens.extend(self.pending.drain(..));
        }
        self.pending.clear();
        piece
    }

    fn release(&mut self, text: String) -> Piece {
        let n = text.len().min(self.pending.len());
        let offset = self.released;
        self.released += text.len();
        Piece { text, tokens: self.pending.drain(..n).collect(), offset }
    }
}

/// How a token is spelled in `logprobs`: its character when it is ASCII, `bytes:\xNN` for a
/// byte that is only part of a character (the `bytes` field carries the raw value).
pub fn token_text(id: u32) -> String {
    match u8::try_from(id) {
        Ok(b) if b.is_ascii() => char::from(b).to_string(),
        _ => format!("bytes:\\x{id:02x}"),
    }
}

/// `/v1/completions`' `logprobs` object for `piece`.
pub fn completion_logprobs(piece: &Piece) -> Value {
    let tokens: Vec<String> = piece.tokens.iter().map(|(id, _)| token_text(*id)).collect();
    let logprobs: Vec<f32> = piece.tokens.iter().map(|(_, lp)| lp.logprob).collect();
    let top: Vec<Value> = piece
        .tokens
        .iter()
        .map(|(_, lp)| {
            let map: serde_json::Map<String, Value> =
                lp.top.iter().map(|(id, p)| (token_text(*id), json!(p))).collect();
            Value::Object(map)
        })
        .collect();
    let offsets: Vec<usize> = (0..piece.tokens.len()).map(|i| piece.offset + i).collect();
    json!({ "tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets })
}

/// `/v1/chat/completions`' `logprobs` object for `piece`.
pub fn chat_logprobs(piece: &Piece) -> Value {
    let entry = |id: u32, logprob: f32| json!({ "token": token_text(id), "logprob": logprob, "bytes": [id] });
    let content: Vec<Value> = piece
        .tokens
        .iter()
        .map(|(id, lp)| {
            let mut e = entry(*id, lp.logprob);
            e["top_logprobs"] = lp.top.iter().map(|(t, p)| entry(*t, *p)).collect();
            e
        })
        .collect();
    json!({ "content": content, "refusal": null })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stops: &[&str], chunks: &[&str]) -> (Vec<String>, bool, String) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let out: Vec<String> = chunks.iter().map(|c| m.push(c)).collect();
        let stopped = m.stopped();
        (out, stopped, m.finish())
    }

    #[test]
    fn stop_sequences_end_the_text_before_them() {
        let (out, stopped, _) = feed(&["END"], &["ab", "cE", "N", "Dxyz"]);
        assert_eq!(out, vec!["ab", "c", "", ""]);
        assert!(stopped);
        // A false start is released once it cannot be a stop sequence any more.
        let (out, stopped, rest) = feed(&["END"], &["aE", "Nx", "y"]);
        assert_eq!(out, vec!["a", "ENx", "y"]);
        assert!(!stopped);
        assert_eq!(rest, "");
        // The earliest of several stop sequences wins; text held at the end is released.
        let (out, _, _) = feed(&["yz", "x"], &["wxyz"]);
        assert_eq!(out, vec!["w"]);
        let (out, stopped, rest) = feed(&["\n\n"], &["a\n"]);
        assert_eq!((out, stopped, rest), (vec!["a".to_owned()], false, "\n".to_owned()));
    }

    fn token(id: u8, logprob: f32) -> GeneratedToken {
        GeneratedToken {
            id: u32::from(id),
            logprobs: Some(TokenLogprobs { logprob, top: vec![(u32::from(id), logprob)] }),
        }
    }

    #[test]
    fn released_text_carries_the_logprobs_of_its_tokens() {
        let mut c = ChoiceText::new(vec!["c".into()]);
        let a = c.push(token(b'a', -0.1));
        assert_eq!((a.text.as_str(), a.tokens.len(), a.offset), ("a", 1, 0));
        let b = c.push(token(b'b', -0.2));
        assert_eq!((b.text.as_str(), b.offset), ("b", 1));
        let stop = c.push(token(b'c', -0.3));
        assert!(c.stopped());
        assert_eq!(stop, Piece { text: String::new(), tokens: Vec::new(), offset: 2 });
        assert_eq!(c.finish().tokens, Vec::new());

        let e = "é".as_bytes();
        let mut c = ChoiceText::new(Vec::new());
        assert_eq!(c.push(token(e[0], -1.0)).text, "");
        let whole = c.push(token(e[1], -2.0));
        assert_eq!(whole.text, "é");
        assert_eq!(whole.tokens.iter().map(|t| t.0).collect::<Vec<_>>(), vec![0xC3, 0xA9]);
        let json = completion_logprobs(&whole);
        assert_eq!(json["tokens"], json!(["bytes:\\xc3", "bytes:\\xa9"]));
        assert_eq!(json["text_offset"], json!([0, 1]));
        let chat = chat_logprobs(&whole);
        assert_eq!(chat["content"][1]["bytes"], json!([0xA9]));
        assert_eq!(chat["content"][0]["top_logprobs"][0]["logprob"], json!(-1.0));
    }
}
