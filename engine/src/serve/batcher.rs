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
    /// The text reached one of the request's stop sequences (the server decides this, as stop
    /// sequences are text, not tokens).
    Stop,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Stop => "stop",
        }
    }
}

/// The log-probabilities of one generated token under the model's distribution (the raw
/// logits, before temperature and `top_p`), as OpenAI's `logprobs` report them.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    /// Log-probability of the generated token.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first (lowest id on ties).
    pub top: Vec<(u32, f32)>,
}

/// One generated token.
#[derive(Clone, Debug, PartialEq)]
pub struct GeneratedToken {
    /// Token id.
    pub id: u32,
    /// Its log-probabilities, when the request asked for them.
    pub logprobs: Option<TokenLogprobs>,
}

/// What the batcher sends back for a request.
#[derive(Clone, Debug, PartialEq)]
pub enum GenEvent {
    /// One generated token.
    Token(GeneratedToken),
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
    /// How tokens are drawn.
    pub sampling: Sampling,
    /// Report each token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// Where the events go; dropping the receiver cancels the request.
    pub events: UnboundedSender<GenEvent>,
}

/// How a request's tokens are drawn from the logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// Temperature; 0 is greedy.
    pub temperature: f32,
    /// Nucleus: draw only among the most likely tokens whose probabilities add up to `top_p`
    /// (`0 < top_p <= 1`; 1 keeps every token).
    pub top_p: f32,
    /// Seed of the request's sampling stream: the same seed draws the same tokens.
    pub seed: u64,
}

impl Sampling {
    /// Greedy decoding.
    pub const GREEDY: Sampling = Sampling { temperature: 0.0, top_p: 1.0, seed: 0 };
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
                rng: CounterRng::new(request.sampling.seed, 0, 0),
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
        let token = sample(&row, a.request.sampling, &mut a.rng);
        a.tokens.push(token);
        a.generated += 1;
        metrics.observe_token(a.last_token.elapsed().as_secs_f64(), a.generated == 1);
        a.last_token = Instant::now();
        let logprobs = a.request.logprobs.map(|top| token_logprobs(&row, token, top));
        let _ = a.request.events.send(GenEvent::Token(GeneratedToken { id: token, logprobs }));
    }
    Ok(())
}

/// Greedy (lowest id on ties) at temperature 0, otherwise a draw from `softmax(logits / t)`
/// restricted to the nucleus of `top_p` (the most likely tokens, lowest id first on ties, until
/// their probabilities add up to `top_p`). One uniform draw per token either way.
pub fn sample(logits: &[f32], sampling: Sampling, rng: &mut CounterRng) -> u32 {
    let best = logits
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc });
    if sampling.temperature <= 0.0 {
        return best.0 as u32;
    }
    let weights: Vec<f64> =
        logits.iter().map(|&v| f64::from((v - best.1) / sampling.temperature).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    let mut mass = total;
    if sampling.top_p < 1.0 {
        order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
        let wanted = f64::from(sampling.top_p) * total;
        let mut kept = 0.0;
        let mut len = 0;
        for &i in &order {
            kept += weights[i];
            len += 1;
            if kept >= wanted {
                break;
            }
        }
        order.truncate(len);
        mass = kept;
    }
    let mut target = rng.next_f64() * mass;
    for &i in &order {
        target -= weights[i];
        if target <= 0.0 {
            return i as u32;
        }
    }
    // Rounding left a sliver: the most likely token is in every nucleus.
    best.0 as u32
}

/// The log-probability of `token` under `log_softmax(logits)` and the `top` most likely tokens.
pub fn token_logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&v| f64::from(v - max).exp()).sum();
    let norm = max + sum.ln() as f32;
    let logprob = logits.get(token as usize).map_or(f32::NEG_INFINITY, |&v| v - norm);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let top = order.into_iter().take(top).map(|i| (i as u32, logits[i] - norm)).collect();
    TokenLogprobs { logprob, top }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(logits: &[f32], sampling: Sampling, n: usize) -> Vec<u32> {
        let mut rng = CounterRng::new(sampling.seed, 0, 0);
        (0..n).map(|_| sample(logits, sampling, &mut rng)).collect()
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities 0.5, 0.3, 0.2 (and a negligible fourth token).
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln(), -50.0];
        let all = Sampling { temperature: 1.0, top_p: 1.0, seed: 7 };
        let seen = draws(&logits, all, 400);
        assert!(seen.contains(&2), "without top_p every likely token is drawn");
        let nucleus = draws(&logits, Sampling { top_p: 0.75, ..all }, 400);
        assert!(nucleus.iter().all(|&t| t < 2), "0.5 + 0.3 passes 0.75: {nucleus:?}");
        assert!(nucleus.contains(&0) && nucleus.contains(&1));
        let tiny = draws(&logits, Sampling { top_p: 0.01, ..all }, 50);
        assert!(tiny.iter().all(|&t| t == 0), "a tiny nucleus is the most likely token");
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let logits = [0.1, 0.2, 0.3, 0.4, 0.0, -0.1];
        let s = Sampling { temperature: 1.0, top_p: 0.9, seed: 42 };
        assert_eq!(draws(&logits, s, 64), draws(&logits, s, 64));
        assert_ne!(draws(&logits, s, 64), draws(&logits, Sampling { seed: 43, ..s }, 64));
        assert_eq!(draws(&logits, Sampling::GREEDY, 3), vec![3, 3, 3]);
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_the_top_alternatives() {
        let logits = [1.0f32, 3.0, 3.0, 0.0];
        let lp = token_logprobs(&logits, 0, 2);
        let total: f32 = logits.iter().map(|v| v.exp()).sum();
        assert!((lp.logprob - (1.0f32.exp() / total).ln()).abs() < 1e-5);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((lp.top[0].1 - (3.0f32.exp() / total).ln()).abs() < 1e-5);
        assert!(token_logprobs(&logits, 1, 0).top.is_empty());
    }
}
