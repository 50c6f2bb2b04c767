//! Continuous batching: one thread owns the model and decodes every active request together,
//! admitting new requests between decode steps.
//!
//! There is no KV cache yet: each step runs the whole (right-padded) batch; the causal mask keeps
//! padding invisible to real tokens and logits are read at each row's last real position.
//!
//! The thread drives a [`Decoder`]: a whole [`Model`], or rank 0 of an expert-parallel group
//! ([`super::expert_parallel::GroupLeader`]). A decoder whose group broke reports a fatal error:
//! the thread fails every request it holds, publishes the reason ([`Batcher::failure`]) and ends,
//! so the server can exit and the replica be replaced.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

use crate::metrics::ServeMetrics;
use crate::model::Model;
use crate::rng::CounterRng;

/// Why a decode step failed.
#[derive(Debug)]
pub struct DecodeError {
    /// The decoder cannot go on (an expert-parallel peer is lost): the thread ends.
    pub fatal: bool,
    /// What happened.
    pub message: String,
}

impl From<candle_core::Error> for DecodeError {
    fn from(e: candle_core::Error) -> Self {
        Self { fatal: false, message: e.to_string() }
    }
}

/// What the decode thread runs.
pub trait Decoder: Send + 'static {
    /// Longest prompt plus generation.
    fn max_seq_len(&self) -> usize;
    /// Logits `[batch, vocab]` at position `last[b]` of each right-padded row of `ids`.
    fn logits(&mut self, ids: &Tensor, last: &[u32]) -> Result<Tensor, DecodeError>;
    /// How long the thread may wait for requests before calling [`Decoder::idle`].
    fn idle_interval(&self) -> Option<Duration> {
        None
    }
    /// Called after [`Decoder::idle_interval`] without work (keeps a group's peers waiting).
    fn idle(&mut self) -> Result<(), DecodeError> {
        Ok(())
    }
    /// Called once when the server shuts down cleanly.
    fn finish(&mut self) {}
}

impl Decoder for Model {
    fn max_seq_len(&self) -> usize {
        self.config().max_seq_len as usize
    }

    fn logits(&mut self, ids: &Tensor, last: &[u32]) -> Result<Tensor, DecodeError> {
        Ok(self.next_token_logits(ids, last)?)
    }
}

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

enum Msg {
    Request(GenRequest),
    /// Finish the decoder and acknowledge.
    Shutdown(Sender<()>),
}

/// Handle to the batching thread.
#[derive(Clone)]
pub struct Batcher {
    tx: Sender<Msg>,
    failure: watch::Receiver<Option<String>>,
}

impl Batcher {
    /// Starts the decode thread for `decoder`.
    pub fn spawn(decoder: impl Decoder, max_batch: usize, metrics: ServeMetrics) -> Self {
        let (tx, rx) = mpsc::channel();
        let (failed, failure) = watch::channel(None);
        std::thread::Builder::new()
            .name("flotilla-decode".into())
            .spawn(move || {
                let mut decoder = decoder;
                if let Err(message) = decode_loop(&mut decoder, &rx, max_batch.max(1), &metrics) {
                    tracing::error!(error = %message, "the decode thread stopped");
                    let _ = failed.send(Some(message));
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!("cannot start the decode thread: {e}"));
        Self { tx, failure }
    }

    /// Queues a request; false when the decode thread is gone.
    pub fn submit(&self, request: GenRequest) -> bool {
        self.tx.send(Msg::Request(request)).is_ok()
    }

    /// Holds `Some(reason)` once the decode thread stopped for good on a fatal error.
    pub fn failure(&self) -> watch::Receiver<Option<String>> {
        self.failure.clone()
    }

    /// Asks the decode thread to finish its decoder (an expert-parallel leader tells its peers
    /// to exit) and waits up to `timeout` for it; false if it did not answer.
    pub fn shutdown(&self, timeout: Duration) -> bool {
        let (ack, done) = mpsc::channel();
        self.tx.send(Msg::Shutdown(ack)).is_ok() && done.recv_timeout(timeout).is_ok()
    }
}

/// Runs until every handle is dropped or a shutdown is asked (`Ok`), or the decoder fails
/// fatally (`Err` with the reason, after failing every request held).
fn decode_loop(
    decoder: &mut dyn Decoder,
    rx: &Receiver<Msg>,
    max_batch: usize,
    metrics: &ServeMetrics,
) -> Result<(), String> {
    let max_len = decoder.max_seq_len();
    let mut queue: Vec<GenRequest> = Vec::new();
    let mut active: Vec<Active> = Vec::new();
    let mut shutdown = None;
    loop {
        if active.is_empty() && queue.is_empty() {
            let next = match decoder.idle_interval() {
                Some(wait) => match rx.recv_timeout(wait) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => {
                        if let Err(e) = decoder.idle() {
                            return Err(e.message);
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => None,
                },
                None => rx.recv().ok(),
            };
            match next {
                Some(Msg::Request(r)) => queue.push(r),
                Some(Msg::Shutdown(ack)) => shutdown = Some(ack),
                None => {
                    decoder.finish();
                    return Ok(());
                }
            }
        }
        loop {
            match rx.recv_timeout(Duration::ZERO) {
                Ok(Msg::Request(r)) => queue.push(r),
                Ok(Msg::Shutdown(ack)) => shutdown = Some(ack),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) if active.is_empty() && queue.is_empty() => {
                    decoder.finish();
                    return Ok(());
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        if let Some(ack) = shutdown.take() {
            for r in queue.drain(..).chain(active.drain(..).map(|a| a.request)) {
                let _ = r.events.send(GenEvent::Failed("the server is shutting down".into()));
            }
            decoder.finish();
            let _ = ack.send(());
            return Ok(());
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
        if let Err(e) = decode_step(decoder, &mut active, metrics) {
            let failed = format!("decoding failed: {}", e.message);
            for a in active.drain(..) {
                let _ = a.request.events.send(GenEvent::Failed(failed.clone()));
            }
            if e.fatal {
                for r in queue.drain(..) {
                    let _ = r.events.send(GenEvent::Failed(failed.clone()));
                }
                return Err(e.message);
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
    decoder: &mut dyn Decoder,
    active: &mut [Active],
    metrics: &ServeMetrics,
) -> Result<(), DecodeError> {
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
    let logits: Vec<Vec<f32>> = decoder.logits(&ids, &last)?.to_vec2()?;
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
