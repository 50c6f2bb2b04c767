//! OpenAI request parsing and the few response shapes the server writes.
//!
//! Parsing is by hand over `serde_json::Value` so that every malformed request gets a precise
//! 4xx reason (field and expectation) instead of a generic extractor rejection. Unknown fields
//! are ignored, as OpenAI clients send many optional ones.

use serde_json::{Value, json};

/// A request error: HTTP status and a reason for the client.
#[derive(Debug, PartialEq)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// What was wrong.
    pub message: String,
}

impl ApiError {
    /// A 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self { status: 400, message: message.into() }
    }

    /// OpenAI's error body.
    pub fn body(&self) -> Value {
        let kind = if self.status < 500 { "invalid_request_error" } else { "server_error" };
        json!({ "error": { "message": self.message, "type": kind, "code": self.status } })
    }
}

/// The parts of a completion request the engine uses.
#[derive(Debug, PartialEq)]
pub struct CompletionParams {
    /// The text to continue.
    pub prompt: String,
    /// Most tokens to generate.
    pub max_tokens: Option<usize>,
    /// Sampling temperature.
    pub temperature: f32,
    /// Stream as server-sent events.
    pub stream: bool,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// Model the client asked for.
    pub model: Option<String>,
}

/// Parses a body as a JSON object.
pub fn parse_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => {
            Err(ApiError::bad_request(format!("expected a JSON object, got {}", kind_of(&other))))
        }
        Err(e) => Err(ApiError::bad_request(format!("body is not valid JSON: {e}"))),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn common(
    map: &serde_json::Map<String, Value>,
    prompt: String,
) -> Result<CompletionParams, ApiError> {
    let field_err = |name: &str, expected: &str, v: &Value| {
        ApiError::bad_request(format!("field `{name}`: expected {expected}, got {}", kind_of(v)))
    };
    let max_tokens = match map.get("max_tokens").or_else(|| map.get("max_completion_tokens")) {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Some(n as usize),
            _ => return Err(field_err("max_tokens", "an integer of at least 1", v)),
        },
    };
    let temperature = match map.get("temperature") {
        None | Some(Value::Null) => 1.0,
        Some(v) => match v.as_f64() {
            Some(t) if (0.0..=2.0).contains(&t) => t as f32,
            _ => return Err(field_err("temperature", "a number between 0 and 2", v)),
        },
    };
    let stream = match map.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(field_err("stream", "a boolean", v)),
    };
    let seed = match map.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| field_err("seed", "a non-negative integer", v))?),
    };
    let model = match map.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => return Err(field_err("model", "a string", v)),
    };
    Ok(CompletionParams { prompt, max_tokens, temperature, stream, seed, model })
}

/// Parses `POST /v1/completions`.
pub fn parse_completion(body: &[u8]) -> Result<CompletionParams, ApiError> {
    let map = parse_object(body)?;
    let prompt = match map.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            items[0].as_str().unwrap_or_default().to_owned()
        }
        Some(Value::Array(_)) => {
            return Err(ApiError::bad_request("field `prompt`: only a single prompt is supported"));
        }
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "field `prompt`: expected a string, got {}",
                kind_of(v)
            )));
        }
        None => return Err(ApiError::bad_request("field `prompt` is required")),
    };
    common(&map, prompt)
}

/// Parses `POST /v1/chat/completions`, rendering the messages with a plain-text chat template.
pub fn parse_chat(body: &[u8]) -> Result<CompletionParams, ApiError> {
    let map = parse_object(body)?;
    let Some(Value::Array(messages)) = map.get("messages") else {
        return Err(ApiError::bad_request(
            "field `messages`: expected a non-empty array of messages",
        ));
    };
    if messages.is_empty() {
        return Err(ApiError::bad_request(
            "field `messages`: expected a non-empty array of messages",
        ));
    }
    let mut prompt = String::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str);
        let content = m.get("content").and_then(Value::as_str);
        let (Some(role), Some(content)) = (role, content) else {
            return Err(ApiError::bad_request(format!(
                "field `messages[{i}]`: expected string `role` and `content`"
            )));
        };
        prompt.push_str(&format!("<|{role}|>\n{content}\n"));
    }
    prompt.push_str("<|assistant|>\n");
    common(&map, prompt)
}

/// Turns generated bytes into text, holding back an incomplete UTF-8 sequence until it completes.
#[derive(Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds a token's byte and returns the text that is now complete.
    pub fn push(&mut self, token: u32) -> String {
        self.pending.push(u8::try_from(token).unwrap_or(b'?'));
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let out = s.to_owned();
                self.pending.clear();
                out
            }
            Err(e) if e.error_len().is_none() && self.pending.len() < 4 => String::new(),
            Err(_) => self.flush(),
        }
    }

    /// Whatever is left, with invalid bytes replaced.
    pub fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_requests_get_precise_reasons() {
        assert!(parse_completion(b"{").unwrap_err().message.contains("not valid JSON"));
        assert!(parse_completion(b"[1]").unwrap_err().message.contains("got an array"));
        assert_eq!(parse_completion(b"{}").unwrap_err().message, "field `prompt` is required");
        let err = parse_completion(br#"{"prompt":"a","max_tokens":-1}"#).unwrap_err();
        assert_eq!(
            err.message,
            "field `max_tokens`: expected an integer of at least 1, got a number"
        );
        assert!(
            parse_chat(br#"{"messages":[{"role":"user"}]}"#)
                .unwrap_err()
                .message
                .contains("messages[0]")
        );
    }

    #[test]
    fn chat_messages_render_into_the_template() {
        let p =
            parse_chat(br#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#).unwrap();
        assert_eq!(p.prompt, "<|user|>\nhi\n<|assistant|>\n");
        assert!(p.stream);
    }

    #[test]
    fn utf8_stream_waits_for_whole_characters() {
        let mut s = Utf8Stream::default();
        let bytes = "é".as_bytes();
        assert_eq!(s.push(u32::from(bytes[0])), "");
        assert_eq!(s.push(u32::from(bytes[1])), "é");
        assert_eq!(s.push(0xFF), "\u{FFFD}");
    }
}
