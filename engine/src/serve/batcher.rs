//! Continuous batching: one thread owns the model and decodes every active request together,
//! admitting new requests between decode steps.
//!
//! There is no KV cache yet: each step runs the whole (right-padded) batch; the causal mask keeps
//! padding invisible to real tokens and logits are read at each row's last real position.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::ServeMetrics;
use crate::model::Model;
use crate::rng::CounterRng;

/// Why generation stopped (OpenAI's `finish_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` reached, or the model's context is full.
    Length,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
        }
    }
}

/// What the batcher sends back for a request.
#[derive(Clone, Debug, PartialEq)]
pub enum GenEvent {
    /// One generated token.
    Token(u32),
    /// Generation finished.
    Done(FinishReason),
    /// Generation failed.
    Failed(String),
}

/// A request for the batcher.
pub struct GenRequest {
    /// Prompt token ids (non-empty, shorter than the context).
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    pub temperature: f32,
    /// Seed of this request's sampling stream.
    pub seed: u64,
    /// Where the events go; dropping the receiver cancels the request.
    pub events: UnboundedSender<GenEvent>,
}

struct Active {
    tokens: Vec<u32>,
    generated: usize,
    request: GenRequest,
    rng: CounterRng,
    arrived: Instant,
    last_token: Instant,
}

/// Handle to the batching thread.
#[derive(Clone)]
pub struct Batcher {
    tx: Sender<GenRequest>,
}

impl Batcher {
    /// Starts the decode thread for `model`.
    pub fn spawn(model: Model, max_batch: usize, metrics: ServeMetrics) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("flotilla-decode".into())
            .spawn(move || decode_loop(&model, &rx, max_batch.max(1), &metrics))
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!("cannot start the decode thread: {e}"));
        Self { tx }
    }

    /// Queues a request; false when the decode thread is gone.
    pub fn submit(&self, request: GenRequest) -> bool {
        self.tx.send(request).is_ok()
    }
}

fn decode_loop(model: &Model, rx: &Receiver<GenRequest>, max_batch: usize, metrics: &ServeMetrics) {
    let max_len = model.config().max_seq_len as usize;
    let mut queue: Vec<GenRequest> = Vec::new();
    let mut active: Vec<Active> = Vec::new();
    loop {
        if active.is_empty() && queue.is_empty() {
            match rx.recv() {
                Ok(r) => queue.push(r),
                Err(_) => return,
            }
        }
        loop {
            match rx.recv_timeout(Duration::ZERO) {
                Ok(r) => queue.push(r),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) if active.is_empty() && queue.is_empty() => {
                    return;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        while active.len() < max_batch && !queue.is_empty() {
            let request = queue.remove(0);
            metrics.add_prompt_tokens(request.prompt.len());
            let now = Instant::now();
            active.push(Active {
                tokens: request.prompt.clone(),
                generated: 0,
                rng: CounterRng::new(request.seed, 0, 0),
                request,
                arrived: now,
                last_token: now,
            });
        }
        metrics.set_queue(active.len(), queue.len());
        if let Err(e) = decode_step(model, &mut active, metrics) {
            for a in active.drain(..) {
                let _ = a.request.events.send(GenEvent::Failed(format!("decoding failed: {e}")));
            }
            continue;
        }
        active.retain(|a| {
            let finished = a.generated >= a.request.max_tokens || a.tokens.len() >= max_len;
            if finished {
                metrics.observe_request(a.arrived.elapsed().as_secs_f64());
                let _ = a.request.events.send(GenEvent::Done(FinishReason::Length));
            }
            !finished && !a.request.events.is_closed()
        });
        metrics.set_queue(active.len(), queue.len());
    }
}

/// Generates one token for every active request.
fn decode_step(
    model: &Model,
    active: &mut [Active],
    metrics: &ServeMetrics,
) -> candle_core::Result<()> {
    if active.is_empty() {
        return Ok(());
    }
    let width = active.iter().map(|a| a.tokens.len()).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(active.len() * width);
    let mut last = Vec::with_capacity(active.len());
    for a in active.iter() {
        ids.extend_from_slice(&a.tokens);
        ids.extend(std::iter::repeat_n(0, width - a.tokens.len()));
        last.push(a.tokens.len() as u32 - 1);
    }
    let ids = Tensor::from_vec(ids, (active.len(), width), &Device::Cpu)?;
    let logits: Vec<Vec<f32>> = model.next_token_logits(&ids, &last)?.to_vec2()?;
    for (a, row) in active.iter_mut().zip(logits) {
        let token = sample(&row, a.request.temperature, &mut a.rng);
        a.tokens.push(token);
        a.generated += 1;
        metrics.observe_token(a.last_token.elapsed().as_secs_f64(), a.generated == 1);
        a.last_token = Instant::now();
        let _ = a.request.events.send(GenEvent::Token(token));
    }
    Ok(())
}

/// Greedy (lowest id on ties) at temperature 0, otherwise a draw from `softmax(logits / t)`.
pub fn sample(logits: &[f32], temperature: f32, rng: &mut CounterRng) -> u32 {
    let best = logits
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc });
    if temperature <= 0.0 {
        return best.0 as u32;
    }
    let weights: Vec<f64> =
        logits.iter().map(|&v| f64::from((v - best.1) / temperature).exp()).collect();
    let mut target = rng.next_f64() * weights.iter().sum::<f64>();
    for (i, w) in weights.iter().enumerate() {
        target -= w;
        if target <= 0.0 {
            return i as u32;
        }
    }
    best.0 as u32
}
