//! The language model: embeddings, decoder layers (dense or MoE FFN), final norm and head.
//!
//! Block structure per family (spec §2): Phi-2 is parallel, `x + attn(LN(x)) + ffn(LN(x))` with one
//! LayerNorm; StableLM-2 `x + attn(LN1(x))` then `x + ffn(LN2(x))`; Qwen-1 the same with RMSNorm.
//! Logits are computed for the last position only, over the len(tokenizer) rows the head keeps.
//! Dims: T = tokens of this call, B = sequences of a decode step, D = n_embd, V = n_vocab.

use crate::backend::{Backend, KvType, RowMode};
use crate::error::{Result, RuntimeError};
use crate::experts::ExpertCache;
use crate::gguf::keys::tensors as tn;
use crate::model::attention::{Attention, KvCache};
use crate::model::config::{Family, LlmConfig, MoeConfig};
use crate::model::ffn::Ffn;
use crate::model::moe::{Gating, Moe, MoeStep, Routing};
use crate::model::weights::{Weight, WeightStore};
use std::sync::Arc;

struct Norm {
    w: Vec<f32>,
    b: Option<Vec<f32>>,
    rms: bool,
    eps: f32,
}

impl Norm {
    fn load(ws: &WeightStore, name: &str, c: &LlmConfig) -> Result<Norm> {
        let rms = c.family == Family::Qwen;
        let b = if rms { None } else { Some(ws.f32(&format!("{name}.bias"), &[c.n_embd])?) };
        Ok(Norm { w: ws.f32(&format!("{name}.weight"), &[c.n_embd])?, b, rms, eps: c.norm_eps })
    }

    fn apply<B: Backend>(&self, be: &B, x: &B::Act) -> B::Act {
        let mut y = x.clone();
        if self.rms {
            be.rms_norm(&mut y, &self.w, self.eps);
        } else {
            be.layer_norm(&mut y, &self.w, self.b.as_deref(), self.eps);
        }
        y
    }
}

pub enum LayerFfn {
    Dense(Ffn),
    Moe(Moe),
}

struct Layer {
    attn_norm: Norm,
    ffn_norm: Option<Norm>,
    attn: Attention,
    ffn: LayerFfn,
}

/// What a forward call can record for tests, traces and `--json` (named like llama.cpp's callbacks).
#[derive(Default, Debug, Clone)]
pub struct Trace {
    /// Output of every decoder layer, `[T, D]` each (only when `keep_layers`).
    pub layer_outputs: Vec<Vec<f32>>,
    /// Per MoE layer: router logits `[T, E]` and the routing.
    pub moe: Vec<(usize, Vec<f32>, Routing)>,
    /// Per entry of `moe`: the experts the previous MoE layer guessed for this one (`None` for the first).
    pub guesses: Vec<Option<Vec<usize>>>,
    pub keep_layers: bool,
}

pub struct Llm {
    pub cfg: LlmConfig,
    embd: Weight,
    layers: Vec<Layer>,
    out_norm: Norm,
    output: Weight,
    /// With `--expert-ram`: the cache the MoE layers read their experts from.
    pub experts: Option<Arc<ExpertCache>>,
    /// Per layer, the index of the next MoE layer after it (fixed at load).
    next_moe: Vec<Option<usize>>,
    /// Compute every MoE layer's guess for the next one even without prefetch (`--route-trace`).
    pub record_guesses: bool,
}

impl Llm {
    pub fn load(c: &LlmConfig, moe: Option<&MoeConfig>, ws: &WeightStore) -> Result<Llm> {
        let layers = (0..c.n_layer)
            .map(|i| {
                let is_moe = moe.is_some_and(|m| m.layers.contains(&i));
                Ok(Layer {
                    attn_norm: Norm::load(ws, &tn::blk(i, "attn_norm"), c)?,
                    ffn_norm: if c.family == Family::Phi2 { None } else { Some(Norm::load(ws, &tn::blk(i, "ffn_norm"), c)?) },
                    attn: Attention::load(i, c, ws)?,
                    ffn: match moe {
                        Some(m) if is_moe => LayerFfn::Moe(Moe::load(i, c, m, ws)?),
                        _ => LayerFfn::Dense(Ffn::load_dense(i, c, ws)?),
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Llm {
            cfg: c.clone(),
            embd: ws.matrix(tn::TOKEN_EMBD, c.n_vocab, c.n_embd)?,
            layers,
            out_norm: Norm::load(ws, tn::OUTPUT_NORM, c)?,
            output: ws.matrix(tn::OUTPUT, c.n_vocab, c.n_embd)?,
            experts: None,
            next_moe: (0..c.n_layer)
                .map(|i| moe.and_then(|m| m.layers.iter().copied().filter(|l| *l > i && *l < c.n_layer).min()))
                .collect(),
            record_guesses: false,
        })
    }

    /// The KV cache type this model runs with unless told otherwise ([`KvType::for_weights`]).
    pub fn default_kv_type(&self) -> KvType {
        self.layers.first().map_or(KvType::F16, |l| KvType::for_weights(l.attn.qkv_type()))
    }

    /// The MoE layers, in order.
    pub fn moe_layers(&self) -> Vec<&Moe> {
        self.layers.iter().filter_map(|l| if let LayerFfn::Moe(m) = &l.ffn { Some(m) } else { None }).collect()
    }

    /// Embeddings of token ids `[T, D]`.
    pub fn embed<B: Backend>(&self, be: &B, ids: &[u32]) -> Result<B::Act> {
        be.embed(&self.embd, ids)
    }

    /// Runs `x [T, D]` (positions `cache.len..`) through every layer, appending to the cache; returns
    /// the logits `[V]` of the last position.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        x: B::Act,
        cache: &mut KvCache<B>,
        gating: &mut Gating,
        trace: &mut Trace,
    ) -> Result<Vec<f32>> {
        let first_pos = cache.len;
        let (t, _) = be.shape(&x);
        // nobody reads the other rows of the last layer unless the test trace keeps every layer
        let last_only = !trace.keep_layers;
        let x = self.layers(be, x, RowMode::Sequence, gating, trace, last_only, |i, attn, h, last| {
            attn.forward(be, h, &mut cache.layers[i], first_pos, last)
        })?;
        cache.len += t;
        let (rows, _) = be.shape(&x);
        let last = be.gather_rows(&x, &[rows - 1]);
        let h = self.out_norm.apply(be, &last);
        Ok(be.to_host(&be.matmul(&h, &self.output)?))
    }

    /// One decode step of several sequences: row `b` of `x [B, D]` is the next token of the sequence
    /// whose cache is `caches[b]`. Returns each row's logits `[V]`, bit-identical to what [`Llm::forward`]
    /// gives that token alone (per-row matmuls and routing, deterministic gating); the weights are read
    /// once for all B rows, which is what makes batching pay on a memory-bound decode.
    pub fn forward_rows<B: Backend>(&self, be: &B, x: B::Act, caches: &mut [&mut KvCache<B>]) -> Result<Vec<Vec<f32>>> {
        let (b, _) = be.shape(&x);
        if b != caches.len() {
            return Err(RuntimeError::Unsupported(format!("{b} rows for {} sequences", caches.len())));
        }
        let positions: Vec<usize> = caches.iter().map(|c| c.len).collect();
        let mut trace = Trace::default();
        let x = self.layers(be, x, RowMode::Independent, &mut Gating::Deterministic, &mut trace, false, |i, attn, h, _| {
            let mut layer: Vec<_> = caches.iter_mut().map(|c| &mut c.layers[i]).collect();
            attn.forward_rows(be, h, &mut layer, &positions)
        })?;
        for c in caches.iter_mut() {
            c.len += 1;
        }
        let h = self.out_norm.apply(be, &x);
        let logits = be.to_host(&be.matmul_per_row(&h, &self.output)?); // [B, V]
        Ok(logits.chunks(self.output.rows).map(|r| r.to_vec()).collect())
    }

    /// Every decoder layer over `x [T, D]`; `attend(layer, attention, normed x, last row only)` runs
    /// the attention (and owns the KV cache), the rest is shared by both kinds of call.
    ///
    /// With `last_only` the result is the last row alone, `[1, D]`, and the last layer computes no
    /// more than that row needs (as llama.cpp does): its attention attends and projects the last query
    /// only (every row still enters the cache), its FFN runs on that row. A MoE router still sees every
    /// row, because the capacity rule spans them: in a sequential block that means the attention of all
    /// rows; only the experts are cut to the last row.
    #[allow(clippy::too_many_arguments)]
    fn layers<B: Backend>(
        &self,
        be: &B,
        mut x: B::Act,
        mode: RowMode,
        gating: &mut Gating,
        trace: &mut Trace,
        last_only: bool,
        mut attend: impl FnMut(usize, &Attention, &B::Act, bool) -> Result<B::Act>,
    ) -> Result<B::Act> {
        let experts = self.experts.as_deref();
        let want_guess = self.record_guesses || experts.is_some_and(|c| c.options().prefetch);
        let mut guess: Option<Vec<usize>> = None;
        let n_layer = self.layers.len();
        for (i, l) in self.layers.iter().enumerate() {
            let (t, _) = be.shape(&x);
            let prune = last_only && i + 1 == n_layer && t > 1;
            let is_moe = matches!(l.ffn, LayerFfn::Moe(_));
            // the attention may stop at the last row unless a router after it has to see every row
            let attn_last = prune && (l.ffn_norm.is_none() || !is_moe);
            let h = l.attn_norm.apply(be, &x);
            let a = attend(i, &l.attn, &h, attn_last)?;
            if attn_last {
                x = be.gather_rows(&x, &[t - 1]);
            }
            let h = match &l.ffn_norm {
                // Phi-2: the FFN reads the same normed input (parallel block); a router reads all rows
                None if prune && !is_moe => be.gather_rows(&h, &[t - 1]),
                None => h,
                Some(n) => {
                    be.add(&mut x, &a);
                    n.apply(be, &x)
                }
            };
            let f = match &l.ffn {
                LayerFfn::Dense(ffn) => ffn.forward(be, &h, mode)?,
                LayerFfn::Moe(moe) => {
                    let next = match self.next_moe[i].map(|j| &self.layers[j].ffn) {
                        Some(LayerFfn::Moe(m)) if want_guess => Some(m),
                        _ => None,
                    };
                    let o = moe.forward(be, &h, gating, MoeStep { mode, cache: experts, next, last_only: prune })?;
                    trace.moe.push((i, o.logits, o.routing));
                    trace.guesses.push(std::mem::replace(&mut guess, o.guess_next));
                    o.y
                }
            };
            if prune && !attn_last {
                x = be.gather_rows(&x, &[t - 1]); // sequential MoE block: the attention kept every row
            }
            if l.ffn_norm.is_none() {
                be.add(&mut x, &a);
            }
            be.add(&mut x, &f);
            if trace.keep_layers {
                trace.layer_outputs.push(be.to_host(&x));
            }
        }
        Ok(x)
    }
}
