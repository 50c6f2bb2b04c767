//! OpenAI request parsing and the few response shapes the server writes.
//!
//! Parsing is by hand over `serde_json::Value` so that every malformed request gets a precise
//! 4xx reason (field, expectation, what came) instead of a generic extractor rejection. Unknown
//! fields are ignored, as OpenAI clients send many optional ones; known parameters that would
//! change the output and that this server cannot honour are refused with a 400 naming them
//! ([`refuse_unsupported`]), so a client never gets an answer that silently ignored them.

use serde_json::{Map, Value, json};

/// A request error: HTTP status and a reason for the client.
#[derive(Debug, PartialEq)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// What was wrong.
    pub message: String,
    /// The request parameter at fault (OpenAI's `param`), when one is.
    pub param: Option<String>,
}

impl ApiError {
    /// An error with `status` and `message`, naming no parameter.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), param: None }
    }

    /// A 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// A 400 about parameter `name`: "field `name`: {message}".
    pub fn field(name: &str, message: impl std::fmt::Display) -> Self {
        Self {
            status: 400,
            message: format!("field `{name}`: {message}"),
            param: Some(name.to_owned()),
        }
    }

    /// OpenAI's error body.
    pub fn body(&self) -> Value {
        let kind = if self.status < 500 { "invalid_request_error" } else { "server_error" };
        json!({ "error": { "message": self.message, "type": kind, "param": self.param, "code": self.status } })
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
    /// Nucleus sampling mass, in `(0, 1]`.
    pub top_p: f32,
    /// Stream as server-sent events.
    pub stream: bool,
    /// Streaming ends with a chunk carrying `usage` (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// Model the client asked for.
    pub model: Option<String>,
    /// Generation ends before the first of these texts (none is included in the output).
    pub stop: Vec<String>,
    /// Report each token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
}

/// Most stop sequences a request may give (OpenAI's limit).
pub const MAX_STOP_SEQUENCES: usize = 4;
/// Most alternatives `logprobs` may ask for in `/v1/completions` (OpenAI's limit).
pub const MAX_COMPLETION_LOGPROBS: u64 = 5;
/// Most alternatives `top_logprobs` may ask for in `/v1/chat/completions` (OpenAI's limit).
pub const MAX_CHAT_TOP_LOGPROBS: u64 = 20;

/// Parses a body as a JSON object.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => {
            Err(ApiError::bad_request(format!("expected a JSON object, got {}", describe(&other))))
        }
        Err(e) => Err(ApiError::bad_request(format!("body is not valid JSON: {e}"))),
    }
}

/// What a value is, for error messages: scalars as written, containers by kind.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if s.chars().count() <= 40 => format!("{s:?}"),
        Value::String(_) => "a long string".into(),
        Value::Array(a) => format!("an array of {}", a.len()),
        Value::Object(_) => "an object".into(),
    }
}

fn expected(name: &str, what: &str, v: &Value) -> ApiError {
    ApiError::field(name, format!("expected {what}, got {}", describe(v)))
}

/// The value of `name`, treating an explicit `null` as absent (as OpenAI does).
fn get<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    map.get(name).filter(|v| !v.is_null())
}

fn number_in(
    map: &Map<String, Value>,
    name: &str,
    what: &str,
    ok: impl Fn(f64) -> bool,
) -> Result<Option<f64>, ApiError> {
    match get(map, name) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if ok(x) => Ok(Some(x)),
            _ => Err(expected(name, what, v)),
        },
    }
}

fn integer_in(
    map: &Map<String, Value>,
    name: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, ApiError> {
    match get(map, name) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if range.contains(&n) => Ok(Some(n)),
            _ => {
                let what = if *range.end() == u64::MAX {
                    format!("an integer of at least {}", range.start())
                } else {
                    format!("an integer from {} to {}", range.start(), range.end())
                };
                Err(expected(name, &what, v))
            }
        },
    }
}

fn boolean(map: &Map<String, Value>, name: &str) -> Result<bool, ApiError> {
    match get(map, name) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(expected(name, "a boolean", v)),
    }
}

/// `stop`: a string, or an array of up to [`MAX_STOP_SEQUENCES`] non-empty strings.
fn stop_sequences(map: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    const WHAT: &str = "a non-empty string or an array of up to 4 non-empty strings";
    let stops = match get(map, "stop") {
        None => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(v @ Value::Array(items)) => {
            if items.len() > MAX_STOP_SEQUENCES {
                return Err(expected("stop", WHAT, v));
            }
            let strings: Option<Vec<String>> =
                items.iter().map(|i| i.as_str().map(str::to_owned)).collect();
            strings.ok_or_else(|| expected("stop", WHAT, v))?
        }
        Some(v) => return Err(expected("stop", WHAT, v)),
    };
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::field("stop", format!("expected {WHAT}, got an empty string")));
    }
    Ok(stops)
}

/// Whether a parameter's value leaves the answer as if it were absent.
type IsNeutral = dyn Fn(&Value) -> bool;

/// Refuses the OpenAI parameters that would change the answer and that this server does not
/// implement. Their neutral values (`n: 1`, `echo: false`, an empty `logit_bias`, zero
/// penalties, `response_format: {"type": "text"}`, …) are accepted, as SDKs send them.
pub fn refuse_unsupported(map: &Map<String, Value>) -> Result<(), ApiError> {
    let is_zero = |v: &Value| v.as_f64() == Some(0.0);
    let is_one = |v: &Value| v.as_u64() == Some(1);
    let is_empty = |v: &Value| {
        v.as_array().is_some_and(Vec::is_empty) || v.as_object().is_some_and(Map::is_empty)
    };
    let checks: [(&str, &str, &IsNeutral); 14] = [
        ("n", "only one choice per request is supported; expected 1", &is_one),
        ("best_of", "only one candidate per request is supported; expected 1", &is_one),
        ("echo", "echoing the prompt is not supported; expected false", &|v| v == &json!(false)),
        ("suffix", "insertion (a suffix) is not supported; expected none", &|v| v == &json!("")),
        ("logit_bias", "logit bias is not supported; expected none", &is_empty),
        ("presence_penalty", "penalties are not supported; expected 0", &is_zero),
        ("frequency_penalty", "penalties are not supported; expected 0", &is_zero),
        ("tools", "tool calling is not supported; expected none", &is_empty),
        ("tool_choice", "tool calling is not supported; expected \"none\"", &|v| v == "none"),
        ("functions", "function calling is not supported; expected none", &is_empty),
        ("function_call", "function calling is not supported; expected \"none\"", &|v| v == "none"),
        (
            "response_format",
            "only plain text output is supported; expected {\"type\": \"text\"}",
            &|v| v.get("type").and_then(Value::as_str) == Some("text"),
        ),
        ("modalities", "only text output is supported; expected [\"text\"]", &|v| {
            v == &json!(["text"])
        }),
        ("audio", "audio output is not supported; expected none", &|_| false),
    ];
    for (name, why, neutral) in checks {
        if let Some(v) = get(map, name).filter(|v| !neutral(v)) {
            return Err(ApiError::field(name, format!("{why}, got {}", describe(v))));
        }
    }
    Ok(())
}

fn common(
    map: &Map<String, Value>,
    prompt: String,
    logprobs: Option<usize>,
) -> Result<CompletionParams, ApiError> {
    refuse_unsupported(map)?;
    let max_tokens = match get(map, "max_tokens") {
        Some(_) => integer_in(map, "max_tokens", 1..=u64::MAX)?,
        None => integer_in(map, "max_completion_tokens", 1..=u64::MAX)?,
    };
    let temperature =
        number_in(map, "temperature", "a number from 0 to 2", |t| (0.0..=2.0).contains(&t))?;
    let top_p =
        number_in(map, "top_p", "a number greater than 0 and at most 1", |p| p > 0.0 && p <= 1.0)?;
    let stream = boolean(map, "stream")?;
    let include_usage = match get(map, "stream_options") {
        None => false,
        Some(Value::Object(o)) => boolean(o, "include_usage").map_err(|_| {
            expected("stream_options.include_usage", "a boolean", &o["include_usage"])
        })?,
        Some(v) => return Err(expected("stream_options", "an object", v)),
    };
    if include_usage && !stream {
        return Err(ApiError::field("stream_options", "only allowed when `stream` is true"));
    }
    let seed = integer_in(map, "seed", 0..=u64::MAX)?;
    let model = match get(map, "model") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => return Err(expected("model", "a string", v)),
    };
    Ok(CompletionParams {
        prompt,
        max_tokens: max_tokens.map(|n| n as usize),
        temperature: temperature.unwrap_or(1.0) as f32,
        top_p: top_p.unwrap_or(1.0) as f32,
        stream,
        include_usage,
        seed,
        model,
        stop: stop_sequences(map)?,
        logprobs,
    })
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
            return Err(ApiError::field("prompt", "only a single prompt is supported"));
        }
        Some(v) => return Err(expected("prompt", "a string", v)),
        None => return Err(ApiError::field("prompt", "required")),
    };
    let logprobs = integer_in(&map, "logprobs", 0..=MAX_COMPLETION_LOGPROBS)?;
    common(&map, prompt, logprobs.map(|n| n as usize))
}

/// Parses `POST /v1/chat/completions`, rendering the messages with a plain-text chat template.
pub fn parse_chat(body: &[u8]) -> Result<CompletionParams, ApiError> {
    let map = parse_object(body)?;
    let Some(Value::Array(messages)) = map.get("messages") else {
        return Err(ApiError::field("messages", "expected a non-empty array of messages"));
    };
    if messages.is_empty() {
        return Err(ApiError::field("messages", "expected a non-empty array of messages"));
    }
    let mut prompt = String::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str);
        let content = m.get("content").and_then(Value::as_str);
        let (Some(role), Some(content)) = (role, content) else {
            return Err(ApiError::field(
                &format!("messages[{i}]"),
                "expected string `role` and `content`",
            ));
        };
        prompt.push_str(&format!("<|{role}|>\n{content}\n"));
    }
    prompt.push_str("<|assistant|>\n");
    let top = integer_in(&map, "top_logprobs", 0..=MAX_CHAT_TOP_LOGPROBS)?;
    let logprobs = match (boolean(&map, "logprobs")?, top) {
        (true, top) => Some(top.unwrap_or(0) as usize),
        (false, None) => None,
        (false, Some(_)) => {
            return Err(ApiError::field("top_logprobs", "only allowed when `logprobs` is true"));
        }
    };
    common(&map, prompt, logprobs)
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
        assert_eq!(parse_completion(b"{}").unwrap_err().message, "field `prompt`: required");
        let err = parse_completion(br#"{"prompt":"a","max_tokens":-1}"#).unwrap_err();
        assert_eq!(err.message, "field `max_tokens`: expected an integer of at least 1, got -1");
        assert_eq!(err.param.as_deref(), Some("max_tokens"));
        assert_eq!(err.body()["error"]["param"], "max_tokens");
        assert!(
            parse_chat(br#"{"messages":[{"role":"user"}]}"#)
                .unwrap_err()
                .message
                .contains("messages[0]")
        );
    }

    #[test]
    fn sampling_parameters_are_read_and_range_checked() {
        let p = parse_completion(
            br#"{"prompt":"a","top_p":0.5,"seed":3,"stop":["\n","END"],"logprobs":2,"n":1}"#,
        )
        .unwrap();
        assert_eq!((p.top_p, p.seed, p.logprobs), (0.5, Some(3), Some(2)));
        assert_eq!(p.stop, vec!["\n".to_owned(), "END".to_owned()]);
        let p = parse_completion(br#"{"prompt":"a","stop":"x","top_p":null}"#).unwrap();
        assert_eq!((p.stop, p.top_p, p.logprobs), (vec!["x".to_owned()], 1.0, None));
        for (body, param, message) in [
            (
                r#"{"prompt":"a","top_p":0}"#,
                "top_p",
                "field `top_p`: expected a number greater than 0 and at most 1, got 0",
            ),
            (
                r#"{"prompt":"a","stop":["a","b","c","d","e"]}"#,
                "stop",
                "field `stop`: expected a non-empty string or an array of up to 4 non-empty strings, got an array of 5",
            ),
            (
                r#"{"prompt":"a","stop":""}"#,
                "stop",
                "field `stop`: expected a non-empty string or an array of up to 4 non-empty strings, got an empty string",
            ),
            (
                r#"{"prompt":"a","logprobs":6}"#,
                "logprobs",
                "field `logprobs`: expected an integer from 0 to 5, got 6",
            ),
            (
                r#"{"prompt":"a","seed":-2}"#,
                "seed",
                "field `seed`: expected an integer of at least 0, got -2",
            ),
            (
                r#"{"prompt":"a","stream_options":{"include_usage":true}}"#,
                "stream_options",
                "field `stream_options`: only allowed when `stream` is true",
            ),
        ] {
            let err = parse_completion(body.as_bytes()).unwrap_err();
            assert_eq!((err.param.as_deref(), err.message.as_str()), (Some(param), message));
        }
    }

    #[test]
    fn chat_logprobs_take_a_flag_and_a_count() {
        let chat = |extra: &str| {
            parse_chat(
                format!(r#"{{"messages":[{{"role":"user","content":"hi"}}]{extra}}}"#).as_bytes(),
            )
        };
        assert_eq!(chat("").unwrap().logprobs, None);
        assert_eq!(chat(r#","logprobs":true"#).unwrap().logprobs, Some(0));
        assert_eq!(chat(r#","logprobs":true,"top_logprobs":3"#).unwrap().logprobs, Some(3));
        let err = chat(r#","top_logprobs":3"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("top_logprobs"));
        let err = chat(r#","logprobs":1"#).unwrap_err();
        assert_eq!(err.message, "field `logprobs`: expected a boolean, got 1");
    }

    #[test]
    fn unsupported_parameters_are_refused_by_name_and_neutral_values_pass() {
        let neutral = br#"{"prompt":"a","n":1,"best_of":1,"echo":false,"suffix":"","logit_bias":{},
            "presence_penalty":0,"frequency_penalty":0.0,"tools":[],"tool_choice":"none",
            "response_format":{"type":"text"},"user":"u","metadata":{"k":"v"}}"#;
        assert!(parse_completion(neutral).is_ok());
        for (field, value) in [
            ("n", "2"),
            ("best_of", "3"),
            ("echo", "true"),
            ("suffix", r#""tail""#),
            ("logit_bias", r#"{"50256":-100}"#),
            ("presence_penalty", "0.5"),
            ("frequency_penalty", "-1"),
            ("tools", r#"[{"type":"function","function":{"name":"f"}}]"#),
            ("tool_choice", r#""auto""#),
            ("functions", r#"[{"name":"f"}]"#),
            ("function_call", r#""auto""#),
            ("response_format", r#"{"type":"json_object"}"#),
            ("modalities", r#"["text","audio"]"#),
            ("audio", r#"{"voice":"alloy"}"#),
        ] {
            let body =
                format!(r#"{{"messages":[{{"role":"user","content":"hi"}}],"{field}":{value}}}"#);
            let err = parse_chat(body.as_bytes()).unwrap_err();
            assert_eq!(err.status, 400);
            assert_eq!(err.param.as_deref(), Some(field), "{body}");
            assert!(err.message.starts_with(&format!("field `{field}`: ")), "{}", err.message);
            assert!(
                err.message.contains("expected") && err.message.contains(", got "),
                "{}",
                err.message
            );
        }
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
