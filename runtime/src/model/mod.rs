//! MoE-LLaVA assembled from a GGUF file: vision tower + projector + language model + tokenizer, and
//! the session that runs a prompt through them (prefill, then greedy or sampled decoding).

pub mod attention;
pub mod config;
pub mod ffn;
pub mod llm;
pub mod moe;
pub mod sequence;
pub mod vision;
pub mod weights;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, KvType};
use crate::error::{Result, RuntimeError};
use crate::experts::trace::{TraceHeader, TraceWriter};
use crate::experts::{Budget, CacheOptions, CacheReport, ExpertCache, ExpertSource, ExpertStore, Policy};
use crate::gguf::GgufFile;
use crate::image::Rgb8;
use crate::prompt::{self, Piece, Turn};
use crate::rng::Rng;
use crate::sampler::SamplingOptions;
use crate::tokenizer::Tokenizer;
use attention::KvCache;
use config::ModelConfig;
use llm::{Llm, Trace};
use moe::Gating;
pub use sequence::Sequence;
use vision::VisionTower;
use weights::WeightStore;

/// Which second-expert rule the MoE layers use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatingMode {
    /// argmax of the remaining experts (moellava's default; reproducible).
    Deterministic,
    /// DeepSpeed 0.9.5's Gumbel-sampled second expert, seeded.
    Reference { seed: u64 },
}

/// Options of one generation.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingOptions,
    pub ignore_eos: bool,
    pub gating: GatingMode,
    /// Set from another thread to stop the generation at the next token with [`RuntimeError::Cancelled`]
    /// (Ctrl-C in the Python package).
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 128,
            sampling: SamplingOptions::default(),
            ignore_eos: false,
            gating: GatingMode::Deterministic,
            cancel: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    StopString,
    MaxNewTokens,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Timings {
    pub image_encode_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// The experts chosen for one position in one MoE layer.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LayerRoute {
    pub layer: usize,
    pub experts: [usize; 2],
    pub weights: [f32; 2],
}

/// The result of one question.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Answer {
    pub text: String,
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub image_tokens: usize,
    pub stop_reason: StopReason,
    pub timings: Timings,
    /// Per MoE layer, the experts of the last prompt position.
    pub routing: Vec<LayerRoute>,
    #[serde(skip)]
    pub last_prompt_logits: Vec<f32>,
}

pub struct Model<B: Backend = CpuBackend> {
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub llm: Llm,
    pub vision: Option<VisionTower>,
    pub backend: B,
    pub file: Arc<GgufFile>,
    /// The KV cache's element type (`--kv-cache`; by default [`Llm::default_kv_type`]).
    pub kv_type: KvType,
    route_trace: Option<Mutex<TraceWriter>>,
}

impl Model<CpuBackend> {
    /// Maps `path` and builds the model from its metadata alone.
    pub fn load(path: &Path) -> Result<Model<CpuBackend>> {
        Model::load_with(path, CpuBackend)
    }
}

/// What a prompt becomes before the language model: embeddings `[T, D]` and their counts.
pub struct PreparedInput<B: Backend> {
    pub embeds: B::Act,
    pub ids: Vec<i64>,
    pub image_tokens: usize,
    pub image_encode_s: f64,
}

impl<B: Backend> Model<B> {
    pub fn load_with(path: &Path, backend: B) -> Result<Model<B>> {
        // activations are freed and re-allocated per op: keep their pages (kernels::alloc)
        moellava_kernels::alloc::keep_freed_activations();
        let file = Arc::new(GgufFile::open(path)?);
        let config = ModelConfig::from_gguf(&file.meta)?;
        let tokenizer = Tokenizer::from_gguf(&file.meta)?;
        if tokenizer.len != config.llm.n_vocab {
            return Err(RuntimeError::Unsupported(format!(
                "tokenizer has {} tokens, the head {} rows",
                tokenizer.len, config.llm.n_vocab
            )));
        }
        let ws = WeightStore::new(file.clone());
        let llm = Llm::load(&config.llm, config.moe.as_ref(), &ws)?;
        let vision = match &config.vision {
            Some(v) => Some(VisionTower::load(v, &ws, config.llm.n_embd)?),
            None => None,
        };
        let kv_type = llm.default_kv_type();
        Ok(Model { config, tokenizer, llm, vision, backend, file, kv_type, route_trace: None })
    }

    /// Per MoE layer, per expert, its matrices as mapped views (empty for a dense model).
    fn expert_matrices(&self) -> Vec<(usize, Vec<Vec<&weights::Weight>>)> {
        self.llm.moe_layers().iter().map(|m| (m.layer, m.experts().iter().map(|f| f.matrices()).collect())).collect()
    }

    /// Keeps the experts in at most `budget` of RAM slots, read from `source` on demand (`--expert-ram`).
    /// Errors on a dense model, and when the budget does not hold the two experts one token needs.
    pub fn enable_expert_cache(
        &mut self,
        budget: Budget,
        policy: Policy,
        prefetch: bool,
        source: Arc<dyn ExpertSource>,
    ) -> Result<()> {
        let experts = self.expert_matrices();
        if experts.is_empty() {
            return Err(RuntimeError::Unsupported(
                "--expert-ram: this is a dense model (no MoE layers, no experts to cache)".into(),
            ));
        }
        let store = ExpertStore::new(experts, source);
        let need = crate::experts::TOP_K;
        let slots = budget.slots(store.slot_bytes(), store.n_experts()).min(store.n_experts());
        if slots < need {
            return Err(RuntimeError::Unsupported(format!(
                "--expert-ram {budget} buys {slots} slot(s) of {} bytes (one expert each); a token needs {need}, so give at least {} bytes or {:.1}%",
                store.slot_bytes(),
                need * store.slot_bytes(),
                100.0 * need as f64 / store.n_experts() as f64
            )));
        }
        let cache = ExpertCache::new(Arc::new(store), CacheOptions { slots, policy, prefetch })?;
        self.llm.experts = Some(Arc::new(cache));
        Ok(())
    }

    /// [`Model::enable_expert_cache`] with the experts read from the model file at `path` itself (what
    /// `--expert-ram` does).
    pub fn enable_expert_cache_from_file(&mut self, path: &Path, budget: Budget, policy: Policy, prefetch: bool) -> Result<()> {
        let source = crate::experts::FileSource::open(path)
            .map_err(|e| RuntimeError::Unsupported(format!("opening {} for expert reads: {e}", path.display())))?;
        self.enable_expert_cache(budget, policy, prefetch, Arc::new(source))
    }

    /// The cache's counters, when `--expert-ram` is on.
    pub fn expert_cache_report(&self) -> Option<CacheReport> {
        self.llm.experts.as_ref().map(|c| c.report())
    }

    /// Writes every forward call's routing to `path` from now on (`--route-trace`).
    pub fn record_route_trace(&mut self, path: &Path, model_name: &str) -> Result<()> {
        let moe =
            self.config.moe.as_ref().ok_or_else(|| {
                RuntimeError::Unsupported("--route-trace: this is a dense model (no MoE layers to trace)".into())
            })?;
        let (slot_bytes, expert_bytes) = ExpertStore::sizes(&self.expert_matrices());
        let header = TraceHeader {
            kind: "header".into(),
            version: 1,
            model: model_name.to_string(),
            n_expert: moe.n_expert,
            top_k: crate::experts::TOP_K,
            moe_layers: self.llm.moe_layers().iter().map(|m| m.layer).collect(),
            expert_bytes,
            slot_bytes: slot_bytes as u64,
        };
        self.route_trace = Some(Mutex::new(TraceWriter::create(path, &header)?));
        self.llm.record_guesses = true;
        Ok(())
    }

    /// An empty KV cache of [`Model::kv_type`] with room for `positions` positions up front.
    pub fn new_kv_cache(&self, positions: usize) -> KvCache<B> {
        KvCache::with_capacity(&self.backend, &self.config.llm, self.kv_type, positions)
    }

    /// One forward call of the language model (see [`Llm::forward`]), recorded in the route trace.
    pub fn forward(&self, x: B::Act, cache: &mut KvCache<B>, gating: &mut Gating, trace: &mut Trace) -> Result<Vec<f32>> {
        let pos = cache.len;
        let (n0, g0) = (trace.moe.len(), trace.guesses.len());
        let logits = on_worker(|| self.llm.forward(&self.backend, x, cache, gating, trace))?;
        if let Some(w) = &self.route_trace {
            let layers: Vec<_> = trace.moe[n0..]
                .iter()
                .zip(&trace.guesses[g0..])
                .map(|((layer, _, r), g)| {
                    (*layer, (0..r.experts.len()).map(|t| r.computed_experts(t).collect()).collect(), g.clone())
                })
                .collect();
            w.lock().unwrap_or_else(|e| e.into_inner()).record_call(pos, &layers)?;
        }
        Ok(logits)
    }

    /// Ends one question in the route trace (flushes it).
    pub fn end_sequence(&self) -> Result<()> {
        match &self.route_trace {
            Some(w) => w.lock().unwrap_or_else(|e| e.into_inner()).end_sequence(),
            None => Ok(()),
        }
    }

    /// The full prompt for one question, as the reference builds it (`-p` without `--raw-prompt`).
    pub fn question_prompt(&self, question: &str, with_image: bool) -> String {
        let c = &self.config.chat;
        prompt::render(c, &[Turn { user: prompt::user_message(c, question, with_image), assistant: None }])
    }

    /// Pixel values `[3, S, S]` of an image for this model's tower.
    pub fn pixel_values(&self, img: &Rgb8) -> Result<Vec<f32>> {
        let v = self.config.vision.as_ref().ok_or_else(|| RuntimeError::Unsupported("this model has no vision tower".into()))?;
        Ok(crate::image::preprocess(img, v.image_size, v.pad_color, v.mean, v.std))
    }

    /// Tokenises `prompt`, encodes the image and splices it in.
    pub fn prepare(&self, prompt: &str, image: Option<&Rgb8>) -> Result<PreparedInput<B>> {
        let be = &self.backend;
        let pieces = prompt::tokenize(&self.tokenizer, prompt, &self.config.chat.image_token)?;
        let has_tag = pieces.contains(&Piece::Image);
        match (has_tag, image) {
            (true, None) => {
                return Err(RuntimeError::Prompt(format!(
                    "the prompt has an {} tag but no image was given",
                    self.config.chat.image_token
                )))
            }
            (false, Some(_)) => {
                return Err(RuntimeError::Prompt(format!(
                    "an image was given but the prompt has no {} tag",
                    self.config.chat.image_token
                )))
            }
            _ => {}
        }
        let (mut image_embeds, mut encode_s) = (None, 0.0);
        if let Some(img) = image {
            let tower = self.vision.as_ref().ok_or_else(|| RuntimeError::Unsupported("this model has no vision tower".into()))?;
            let t0 = Instant::now();
            let (_, e) = tower.encode(be, &self.pixel_values(img)?)?;
            encode_s = t0.elapsed().as_secs_f64();
            image_embeds = Some(e);
        }
        let mut parts = Vec::new();
        for p in &pieces {
            match p {
                Piece::Text(ids) => parts.push(self.llm.embed(be, ids)?),
                Piece::Image => parts.push(image_embeds.take().ok_or_else(|| RuntimeError::Prompt("two image tags".into()))?),
            }
        }
        if parts.is_empty() {
            return Err(RuntimeError::Prompt("the prompt is empty".into()));
        }
        let embeds = be.concat_rows(&parts.iter().collect::<Vec<_>>());
        let (t, _) = be.shape(&embeds);
        if t > self.config.llm.context_length {
            return Err(RuntimeError::Prompt(format!(
                "{t} prompt positions exceed the context length {}",
                self.config.llm.context_length
            )));
        }
        let image_tokens = if image.is_some() { self.config.vision.as_ref().map_or(0, |v| v.image_tokens) } else { 0 };
        Ok(PreparedInput { embeds, ids: prompt::flat_ids(&pieces), image_tokens, image_encode_s: encode_s })
    }

    /// A new sequence for `input` (its KV cache sized for the prompt and `o.max_new_tokens`), with the
    /// model's stop string and the caller's `stops`; errors when it would not fit in the context.
    pub fn new_sequence(&self, input: &PreparedInput<B>, o: &GenerateOptions, stops: &[String]) -> Result<Sequence<B>> {
        let prompt_tokens = self.backend.shape(&input.embeds).0;
        let ctx = self.config.llm.context_length;
        let cache = self.new_kv_cache((prompt_tokens + o.max_new_tokens).min(ctx));
        Sequence::new(cache, prompt_tokens, ctx, o, &self.config.chat.sep2, stops)
    }

    /// One decode step of several sequences: `tokens[b]` is fed to `caches[b]`. Each sequence's logits
    /// are bit-identical to feeding its token alone ([`Llm::forward_rows`]).
    pub fn decode_rows(&self, tokens: &[u32], caches: &mut [&mut KvCache<B>]) -> Result<Vec<Vec<f32>>> {
        let x = self.llm.embed(&self.backend, tokens)?; // [B, D]
        on_worker(|| self.llm.forward_rows(&self.backend, x, caches))
    }

    /// Answers one prompt (already templated), streaming the text through `on_text`.
    pub fn generate(&self, input: PreparedInput<B>, o: &GenerateOptions, on_text: &mut dyn FnMut(&str)) -> Result<Answer> {
        let be = &self.backend;
        let mut gating = match o.gating {
            GatingMode::Deterministic => Gating::Deterministic,
            GatingMode::Reference { seed } => Gating::Reference(Rng::new(seed ^ 0x6D6F_656C_6C61_7661)),
        };
        let mut seq = self.new_sequence(&input, o, &[])?;
        let prompt_tokens = seq.prompt_tokens;
        let t0 = Instant::now();
        let mut trace = Trace::default();
        let mut logits = self.forward(input.embeds, &mut seq.cache, &mut gating, &mut trace)?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let routing = trace
            .moe
            .iter()
            .map(|(l, _, r)| LayerRoute {
                layer: *l,
                experts: r.experts[prompt_tokens - 1],
                weights: r.weights[prompt_tokens - 1],
            })
            .collect();
        let last_prompt_logits = logits.clone();
        let t1 = Instant::now();
        let cancelled = || o.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed));
        loop {
            if cancelled() {
                self.end_sequence()?;
                return Err(RuntimeError::Cancelled);
            }
            let (piece, next) = seq.accept(&self.tokenizer, &logits)?;
            if !piece.is_empty() {
                on_text(&piece);
            }
            let Some(next) = next else { break };
            logits = self.forward(self.llm.embed(be, &[next])?, &mut seq.cache, &mut gating, &mut Trace::default())?;
        }
        let decode_s = t1.elapsed().as_secs_f64();
        self.end_sequence()?;
        let n_decoded = seq.tokens.len().saturating_sub(1);
        Ok(Answer {
            text: seq.text().to_string(),
            prompt_tokens,
            image_tokens: input.image_tokens,
            stop_reason: seq.stop.unwrap_or(StopReason::MaxNewTokens),
            timings: Timings {
                image_encode_s: input.image_encode_s,
                prefill_s,
                decode_s,
                prefill_tokens_per_s: prompt_tokens as f64 / prefill_s.max(1e-9),
                decode_tokens_per_s: if n_decoded > 0 { n_decoded as f64 / decode_s.max(1e-9) } else { 0.0 },
            },
            tokens: seq.tokens,
            routing,
            last_prompt_logits,
        })
    }

    /// `prepare` + `generate` for a question (templated like the reference) or a raw prompt.
    pub fn answer(
        &self,
        image: Option<&Rgb8>,
        text: &str,
        raw_prompt: bool,
        o: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer> {
        if text.trim().is_empty() {
            return Err(RuntimeError::Prompt("the prompt is empty".into()));
        }
        let prompt = if raw_prompt { text.to_string() } else { self.question_prompt(text, image.is_some()) };
        let input = self.prepare(&prompt, image)?;
        self.generate(input, o, on_text)
    }
}

/// Runs `f` on one of rayon's worker threads (at once, if this is one). A forward pass issues
/// hundreds of small parallel ops per token; from a worker each one starts with the caller taking
/// its share and the other workers stealing theirs (well under a microsecond), while from any other
/// thread each is queued for the pool and the caller sleeps until it is done (~12 µs a call on the
/// 2-core machine of BENCHMARKS.md; full-depth MoE Phi-2 decode went from 8.3 to 8.7 tok/s).
fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::join(f, || ()).0
    }
}
