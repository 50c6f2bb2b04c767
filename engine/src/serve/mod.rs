//! The OpenAI-compatible HTTP server: `/v1/completions`, `/v1/chat/completions` (SSE streaming
//! ending in `data: [DONE]`), `/v1/models`, `/health`, `/ready` (generates one token) and
//! `/metrics`.
//!
//! Honoured request parameters: `max_tokens`, `temperature`, `top_p`, `seed`, `stop`, `stream`,
//! `stream_options.include_usage`, `logprobs` (and chat's `top_logprobs`); `n` and `best_of`
//! only as 1. Others that would change the answer are refused by name ([`api::refuse_unsupported`]).

pub mod api;
pub mod batcher;
pub mod expert_parallel;
pub mod output;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::data::encode;
use crate::metrics::Metrics;
use api::{ApiError, CompletionParams};
use batcher::{Batcher, FinishReason, GenEvent, GenRequest, Sampling};
use output::{ChoiceText, Piece};

/// Shared state of the HTTP handlers.
pub struct ServeState {
    /// The decode thread.
    pub batcher: Batcher,
    /// Name of the served model.
    pub model_name: String,
    /// Longest prompt plus generation.
    pub max_seq_len: usize,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// The process registry.
    pub metrics: Metrics,
    next_id: AtomicU64,
}

impl ServeState {
    /// State for the handlers.
    pub fn new(
        batcher: Batcher,
        model_name: String,
        max_seq_len: usize,
        default_max_tokens: usize,
        metrics: Metrics,
    ) -> Self {
        Self {
            batcher,
            model_name,
            max_seq_len,
            default_max_tokens,
            metrics,
            next_id: AtomicU64::new(0),
        }
    }
}

type Shared = Arc<ServeState>;

/// The router with every endpoint.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { axum::Json(json!({ "status": "ok" })) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        (status, axum::Json(self.body())).into_response()
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn models(State(state): State<Shared>) -> impl IntoResponse {
    axum::Json(json!({
        "object": "list",
        "data": [{ "id": state.model_name, "object": "model", "created": 0, "owned_by": "flotilla" }],
    }))
}

async fn metrics(State(state): State<Shared>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], state.metrics.render())
}

/// Ready when the model produces a token within a few seconds.
async fn ready(State(state): State<Shared>) -> Response {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let request = GenRequest {
        prompt: encode("a"),
        max_tokens: 1,
        sampling: Sampling::GREEDY,
        logprobs: None,
        events: tx,
    };
    if !state.batcher.submit(request) {
        return ApiError::new(503, "decode thread is not running").into_response();
    }
    match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
        Ok(Some(GenEvent::Token(_))) => axum::Json(json!({ "status": "ready" })).into_response(),
        _ => ApiError::new(503, "the model did not produce a token").into_response(),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(State(state): State<Shared>, body: Bytes) -> Response {
    match api::parse_completion(&body) {
        Ok(params) => generate(state, params, Kind::Completion).await,
        Err(e) => e.into_response(),
    }
}

async fn chat_completions(State(state): State<Shared>, body: Bytes) -> Response {
    match api::parse_chat(&body) {
        Ok(params) => generate(state, params, Kind::Chat).await,
        Err(e) => e.into_response(),
    }
}

async fn generate(state: Shared, params: CompletionParams, kind: Kind) -> Response {
    if let Some(model) = params.model.as_ref().filter(|m| **m != state.model_name) {
        let message =
            format!("model `{model}` does not exist; this server serves `{}`", state.model_name);
        return ApiError { param: Some("model".into()), ..ApiError::new(404, message) }
            .into_response();
    }
    let prompt = encode(&params.prompt);
    if prompt.is_empty() || prompt.len() >= state.max_seq_len {
        let message = format!(
            "expected a prompt of 1 to {} tokens, got {}",
            state.max_seq_len - 1,
            prompt.len()
        );
        let field = if kind == Kind::Chat { "messages" } else { "prompt" };
        return ApiError::field(field, message).into_response();
    }
    let max_tokens = params.max_tokens.unwrap_or(state.default_max_tokens);
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::unbounded_channel();
    let prompt_tokens = prompt.len();
    let sampling = Sampling {
        temperature: params.temperature,
        top_p: params.top_p,
        seed: params.seed.unwrap_or(n),
    };
    let request =
        GenRequest { prompt, max_tokens, sampling, logprobs: params.logprobs, events: tx };
    if !state.batcher.submit(request) {
        return ApiError::new(503, "decode thread is not running").into_response();
    }
    let id = match kind {
        Kind::Completion => format!("cmpl-{n}"),
        Kind::Chat => format!("chatcmpl-{n}"),
    };
    let meta = Meta {
        id,
        created: unix_now(),
        model: state.model_name.clone(),
        kind,
        logprobs: params.logprobs.is_some(),
        prompt_tokens,
    };
    let choice = ChoiceText::new(params.stop);
    if params.stream {
        stream_response(meta, rx, choice, params.include_usage)
    } else {
        full_response(meta, rx, choice).await
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    /// The request asked for logprobs: choices carry a `logprobs` object, else `null`.
    logprobs: bool,
    prompt_tokens: usize,
}

impl Meta {
    fn logprobs(&self, piece: &Piece) -> Value {
        match (self.logprobs, self.kind) {
            (false, _) => Value::Null,
            (true, Kind::Completion) => output::completion_logprobs(piece),
            (true, Kind::Chat) => output::chat_logprobs(piece),
        }
    }

    fn usage(&self, generated: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": generated,
            "total_tokens": self.prompt_tokens + generated,
        })
    }

    fn chunk(&self, piece: &Piece, finish: Option<FinishReason>, first: bool) -> Value {
        let finish = finish.map(FinishReason::as_str);
        let choice = match self.kind {
            Kind::Completion => {
                json!({ "index": 0, "text": piece.text, "finish_reason": finish, "logprobs": self.logprobs(piece) })
            }
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if !piece.text.is_empty() {
                    delta.insert("content".into(), piece.text.as_str().into());
                }
                json!({ "index": 0, "delta": delta, "finish_reason": finish, "logprobs": self.logprobs(piece) })
            }
        };
        self.envelope(vec![choice])
    }

    fn envelope(&self, choices: Vec<Value>) -> Value {
        let object =
            if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        json!({ "id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices })
    }
}

/// Collects one choice until generation ends or a stop sequence is reached (dropping `rx` then
/// cancels the request in the batcher).
async fn full_response(
    meta: Meta,
    mut rx: mpsc::UnboundedReceiver<GenEvent>,
    mut choice: ChoiceText,
) -> Response {
    let mut all = Piece::default();
    let mut generated = 0;
    let mut take = |piece: Piece| {
        all.text.push_str(&piece.text);
        all.tokens.extend(piece.tokens);
    };
    let finish = loop {
        match rx.recv().await {
            Some(GenEvent::Token(t)) => {
                generated += 1;
                take(choice.push(t));
                if choice.stopped() {
                    break FinishReason::Stop;
                }
            }
            Some(GenEvent::Done(reason)) => {
                take(choice.finish());
                break reason;
            }
            Some(GenEvent::Failed(message)) => {
                return ApiError::new(500, message).into_response();
            }
            None => return ApiError::new(500, "decode thread stopped").into_response(),
        }
    };
    let logprobs = meta.logprobs(&all);
    let (object, choice) = match meta.kind {
        Kind::Completion => (
            "text_completion",
            json!({ "index": 0, "text": all.text, "finish_reason": finish.as_str(), "logprobs": logprobs }),
        ),
        Kind::Chat => (
            "chat.completion",
            json!({ "index": 0, "message": { "role": "assistant", "content": all.text }, "finish_reason": finish.as_str(), "logprobs": logprobs }),
        ),
    };
    axum::Json(json!({
        "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
        "choices": [choice], "usage": meta.usage(generated),
    }))
    .into_response()
}

fn stream_response(
    meta: Meta,
    mut rx: mpsc::UnboundedReceiver<GenEvent>,
    mut choice: ChoiceText,
    include_usage: bool,
) -> Response {
    let (tx, events) = mpsc::unbounded_channel::<Result<Event, Infallible>>();
    tokio::spawn(async move {
        let mut first = true;
        let mut generated = 0;
        let send = |v: Value| tx.send(Ok(Event::default().data(v.to_string()))).is_ok();
        let finished = loop {
            match rx.recv().await {
                Some(GenEvent::Token(t)) => {
                    generated += 1;
                    let piece = choice.push(t);
                    if choice.stopped() {
                        break send(meta.chunk(&piece, Some(FinishReason::Stop), first));
                    }
                    if !piece.text.is_empty() {
                        if !send(meta.chunk(&piece, None, first)) {
                            break false;
                        }
                        first = false;
                    }
                }
                Some(GenEvent::Done(reason)) => {
                    break send(meta.chunk(&choice.finish(), Some(reason), first));
                }
                Some(GenEvent::Failed(message)) => {
                    send(json!({ "error": { "message": message, "type": "server_error" } }));
                    break false;
                }
                None => break false,
            }
        };
        // Dropping `rx` here cancels a request that a stop sequence ended.
        drop(rx);
        if finished && include_usage {
            let mut last = meta.envelope(Vec::new());
            last["usage"] = meta.usage(generated);
            send(last);
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]")));
    });
    Sse::new(UnboundedReceiverStream::new(events)).into_response()
}
