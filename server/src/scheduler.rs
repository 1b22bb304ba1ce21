//! The one thread that runs the model: continuous batching of decode steps.
//!
//! Requests wait in a bounded queue (`--max-queue`; full → 503). Each turn of the loop admits at most
//! one waiting request (its image encode and prefill: a new request never stalls the running ones for
//! more than one prefill), then runs one decode step for every running sequence together
//! ([`Model::decode_rows`]: the weights are streamed once for up to `--max-batch` sequences, and each
//! sequence gets exactly the logits it would get alone). A client that goes away is noticed at the next
//! token: its sequence and KV cache are dropped.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use moellava_runtime::backend::Backend;
use moellava_runtime::model::attention::KvCache;
use moellava_runtime::model::llm::Trace;
use moellava_runtime::model::moe::Gating;
use moellava_runtime::model::{Sequence, StopReason};
use moellava_runtime::Model;
use tokio::sync::mpsc::UnboundedSender;

use crate::api::JobSpec;
use crate::error::ApiError;
use crate::metrics::{Metrics, Outcome};

/// New tokens when a request gives no `max_tokens` (fewer when the context has less room).
pub const DEFAULT_MAX_TOKENS: usize = 512;

/// What the scheduler tells the request's handler, in this order: `Started`, any `Text`, then `Done`
/// — or `Failed` at any point.
#[derive(Debug)]
pub enum Event {
    Started { prompt_tokens: usize },
    Text(String),
    Done { finish_reason: &'static str, completion_tokens: usize, text: String },
    Failed(ApiError),
}

pub struct Job {
    pub spec: JobSpec,
    pub arrived: Instant,
    pub events: UnboundedSender<Event>,
}

/// The handlers' side: submit a job, or be told the queue is full.
#[derive(Clone)]
pub struct Queue {
    tx: SyncSender<Job>,
    max_queue: usize,
    metrics: Arc<Metrics>,
}

impl Queue {
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        self.metrics.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
                match e {
                    TrySendError::Full(_) => Err(ApiError::queue_full(self.max_queue)),
                    TrySendError::Disconnected(_) => Err(ApiError::internal("the model's scheduler has stopped")),
                }
            }
        }
    }
}

/// Starts the scheduler thread; it ends when every [`Queue`] is dropped.
pub fn start(model: Arc<Model>, max_queue: usize, max_batch: usize, metrics: Arc<Metrics>) -> std::io::Result<Queue> {
    let (tx, rx) = mpsc::sync_channel(max_queue);
    let m = metrics.clone();
    std::thread::Builder::new().name("scheduler".into()).spawn(move || run(&model, rx, max_batch.max(1), &m))?;
    Ok(Queue { tx, max_queue, metrics })
}

type Cpu = moellava_runtime::backend::cpu::CpuBackend;

/// One running sequence.
struct Running {
    seq: Sequence<Cpu>,
    /// The logits of the last position fed.
    logits: Vec<f32>,
    events: UnboundedSender<Event>,
    arrived: Instant,
    first_token: bool,
}

fn run(model: &Model, rx: Receiver<Job>, max_batch: usize, metrics: &Metrics) {
    let mut running: Vec<Running> = Vec::new();
    loop {
        if running.len() < max_batch {
            let job = if running.is_empty() {
                match rx.recv() {
                    Ok(j) => Some(j),
                    Err(_) => return, // the server is shutting down
                }
            } else {
                match rx.try_recv() {
                    Ok(j) => Some(j),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => return,
                }
            };
            if let Some(job) = job {
                metrics.queued.fetch_sub(1, Ordering::Relaxed);
                if job.events.is_closed() {
                    metrics.count(Outcome::Cancelled);
                } else {
                    match admit(model, &job, metrics) {
                        Ok(r) => running.push(r),
                        Err(e) => {
                            metrics.count(if e.status.is_client_error() { Outcome::Invalid } else { Outcome::Failed });
                            let _ = job.events.send(Event::Failed(e));
                        }
                    }
                }
            }
        }
        running = step(model, std::mem::take(&mut running), metrics);
        metrics.active.store(running.len() as u64, Ordering::Relaxed);
    }
}

/// Encodes the image, prefills the prompt and tells the handler the prompt's size.
fn admit(model: &Model, job: &Job, metrics: &Metrics) -> Result<Running, ApiError> {
    let spec = &job.spec;
    let err = |e: moellava_runtime::RuntimeError| ApiError::from_runtime(&e);
    let input = model.prepare(&spec.prompt, spec.image.as_ref()).map_err(err)?;
    let prompt_tokens = model.backend.shape(&input.embeds).0;
    let ctx = model.config.llm.context_length;
    if prompt_tokens >= ctx {
        return Err(ApiError::invalid(
            Some("messages".into()),
            format!("the prompt is {prompt_tokens} positions; the model's context is {ctx}, which leaves no room to answer"),
        )
        .with_code("context_length_exceeded"));
    }
    let mut options = spec.options.clone();
    options.max_new_tokens = spec.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS.min(ctx - prompt_tokens));
    let mut seq = model.new_sequence(&input, &options, &spec.stops).map_err(err)?;
    let logits = model.forward(input.embeds, &mut seq.cache, &mut Gating::Deterministic, &mut Trace::default()).map_err(err)?;
    metrics.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
    let _ = job.events.send(Event::Started { prompt_tokens });
    Ok(Running { seq, logits, events: job.events.clone(), arrived: job.arrived, first_token: true })
}

/// Samples every running sequence's next token, streams the text, finishes the ended ones and feeds
/// the rest through one batched decode step; returns the sequences still running.
fn step(model: &Model, running: Vec<Running>, metrics: &Metrics) -> Vec<Running> {
    let (mut feed, mut keep) = (Vec::new(), Vec::new());
    for mut r in running {
        if r.events.is_closed() {
            metrics.count(Outcome::Cancelled);
            continue;
        }
        let before = r.seq.tokens.len();
        let (piece, next) = match r.seq.accept(&model.tokenizer, &r.logits) {
            Ok(x) => x,
            Err(e) => {
                metrics.count(Outcome::Failed);
                let _ = r.events.send(Event::Failed(ApiError::from_runtime(&e)));
                continue;
            }
        };
        metrics.generated_tokens.fetch_add((r.seq.tokens.len() - before) as u64, Ordering::Relaxed);
        if r.first_token {
            r.first_token = false;
            metrics.observe_ttft(r.arrived.elapsed().as_secs_f64());
        }
        if !piece.is_empty() && r.events.send(Event::Text(piece)).is_err() {
            metrics.count(Outcome::Cancelled);
            continue;
        }
        match next {
            Some(t) => {
                feed.push(t);
                keep.push(r);
            }
            None => {
                let finish_reason = match r.seq.stop {
                    Some(StopReason::MaxNewTokens) | None => "length",
                    Some(StopReason::Eos | StopReason::StopString) => "stop",
                };
                let done = Event::Done { finish_reason, completion_tokens: r.seq.tokens.len(), text: r.seq.text().to_string() };
                metrics.count(if r.events.send(done).is_ok() { Outcome::Completed } else { Outcome::Cancelled });
            }
        }
    }
    if keep.is_empty() {
        return keep;
    }
    let t0 = Instant::now();
    let mut caches: Vec<&mut KvCache<Cpu>> = keep.iter_mut().map(|r| &mut r.seq.cache).collect();
    match model.decode_rows(&feed, &mut caches) {
        Ok(all) => {
            metrics.set_decode_tps(feed.len() as f64 / t0.elapsed().as_secs_f64().max(1e-9));
            for (r, logits) in keep.iter_mut().zip(all) {
                r.logits = logits;
            }
            keep
        }
        Err(e) => {
            for r in keep {
                metrics.count(Outcome::Failed);
                let _ = r.events.send(Event::Failed(ApiError::from_runtime(&e)));
            }
            Vec::new()
        }
    }
}
