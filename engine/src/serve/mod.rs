//! The OpenAI-compatible HTTP server: `/v1/completions`, `/v1/chat/completions` (SSE streaming
//! ending in `data: [DONE]`), `/v1/models`, `/health`, `/ready` (generates one token) and
//! `/metrics`.

pub mod api;
pub mod batcher;
pub mod expert_parallel;

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
use api::{ApiError, CompletionParams, Utf8Stream};
use batcher::{Batcher, GenEvent, GenRequest};

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
    let request =
        GenRequest { prompt: encode("a"), max_tokens: 1, temperature: 0.0, seed: 0, events: tx };
    if !state.batcher.submit(request) {
        return ApiError { status: 503, message: "decode thread is not running".into() }
            .into_response();
    }
    match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
        Ok(Some(GenEvent::Token(_))) => axum::Json(json!({ "status": "ready" })).into_response(),
        _ => ApiError { status: 503, message: "the model did not produce a token".into() }
            .into_response(),
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
        return ApiError { status: 404, message }.into_response();
    }
    let prompt = encode(&params.prompt);
    if prompt.is_empty() || prompt.len() >= state.max_seq_len {
        let message = format!(
            "prompt has {} tokens; expected between 1 and {}",
            prompt.len(),
            state.max_seq_len - 1
        );
        return ApiError::bad_request(message).into_response();
    }
    let max_tokens = params.max_tokens.unwrap_or(state.default_max_tokens);
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::unbounded_channel();
    let prompt_tokens = prompt.len();
    let seed = params.seed.unwrap_or(n);
    let request =
        GenRequest { prompt, max_tokens, temperature: params.temperature, seed, events: tx };
    if !state.batcher.submit(request) {
        return ApiError { status: 503, message: "decode thread is not running".into() }
            .into_response();
    }
    let id = match kind {
        Kind::Completion => format!("cmpl-{n}"),
        Kind::Chat => format!("chatcmpl-{n}"),
    };
    let meta = Meta { id, created: unix_now(), model: state.model_name.clone(), kind };
    if params.stream {
        stream_response(meta, rx)
    } else {
        full_response(meta, rx, prompt_tokens).await
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Meta {
    fn chunk(&self, text: Option<&str>, finish: Option<&str>, first: bool) -> Value {
        let choice = match self.kind {
            Kind::Completion => {
                json!({ "index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null })
            }
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!({ "index": 0, "delta": delta, "finish_reason": finish })
            }
        };
        let object =
            if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        json!({ "id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice] })
    }
}

async fn full_response(
    meta: Meta,
    mut rx: mpsc::UnboundedReceiver<GenEvent>,
    prompt_tokens: usize,
) -> Response {
    let mut text = Utf8Stream::default();
    let mut out = String::new();
    let mut generated = 0;
    let finish = loop {
        match rx.recv().await {
            Some(GenEvent::Token(t)) => {
                generated += 1;
                out.push_str(&text.push(t));
            }
            Some(GenEvent::Done(reason)) => break reason.as_str(),
            Some(GenEvent::Failed(message)) => {
                return ApiError { status: 500, message }.into_response();
            }
            None => {
                return ApiError { status: 500, message: "decode thread stopped".into() }
                    .into_response();
            }
        }
    };
    out.push_str(&text.flush());
    let usage = json!({ "prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated });
    let (object, choice) = match meta.kind {
        Kind::Completion => (
            "text_completion",
            json!({ "index": 0, "text": out, "finish_reason": finish, "logprobs": null }),
        ),
        Kind::Chat => (
            "chat.completion",
            json!({ "index": 0, "message": { "role": "assistant", "content": out }, "finish_reason": finish }),
        ),
    };
    axum::Json(json!({
        "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
        "choices": [choice], "usage": usage,
    }))
    .into_response()
}

fn stream_response(meta: Meta, mut rx: mpsc::UnboundedReceiver<GenEvent>) -> Response {
    let (tx, events) = mpsc::unbounded_channel::<Result<Event, Infallible>>();
    tokio::spawn(async move {
        let mut text = Utf8Stream::default();
        let mut first = true;
        let send = |v: Value| tx.send(Ok(Event::default().data(v.to_string()))).is_ok();
        loop {
            let keep_going = match rx.recv().await {
                Some(GenEvent::Token(t)) => {
                    let piece = text.push(t);
                    let sent = piece.is_empty() || send(meta.chunk(Some(&piece), None, first));
                    first &= piece.is_empty();
                    sent
                }
                Some(GenEvent::Done(reason)) => {
                    let rest = text.flush();
                    let piece = (!rest.is_empty()).then_some(rest.as_str());
                    send(meta.chunk(piece, Some(reason.as_str()), first));
                    false
                }
                Some(GenEvent::Failed(message)) => {
                    send(json!({ "error": { "message": message, "type": "server_error" } }));
                    false
                }
                None => false,
            };
            if !keep_going {
                break;
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]")));
    });
    Sse::new(UnboundedReceiverStream::new(events)).into_response()
}
