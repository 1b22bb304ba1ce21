//! Sparse top-2 MoE FFN on the layers in `moellava.moe.layers`.
//!
//! Mirrors DeepSpeed 0.9.5 `MOELayer` + `TopKGate.top2gating` as MoE-LLaVA runs them (spec §4):
//! ```text
//! logits = x·wgᵀ (f32)            gates = softmax(logits)          C = max(⌈f32(T/E)·f32(2·cf)⌉, min_capacity)
//! i1 = argmax(gates)               i2 = argmax(logits [+ Gumbel noise] with i1 masked)
//! loc1 = cumsum(mask1) - 1         loc2 = cumsum(mask2) - 1 + Σ mask1     (per expert, token order)
//! keep choice k where loc_k < C    w_k = g_k / max(g1 + g2, eps)          y = Σ_k w_k · E_{i_k}(x)
//! ```
//! `Gating::Deterministic` (moellava's default) takes the second expert by plain argmax; the reference
//! mode adds seeded Gumbel(0,1) noise as DeepSpeed always does. The capacity rule spans all tokens of one
//! forward call (the whole prompt at prefill), so it is applied here, not per token.
//! Dims: T = n_tokens, E = n_expert, D = n_embd, F = n_ff.

use crate::backend::{Backend, RowMode};
use crate::error::Result;
use crate::experts::ExpertCache;
use crate::gguf::keys::tensors as tn;
use crate::model::config::{Family, LlmConfig, MoeConfig};
use crate::model::ffn::Ffn;
use crate::model::weights::{Weight, WeightStore};
use crate::rng::Rng;

/// How the second expert is chosen.
#[derive(Clone, Debug)]
pub enum Gating {
    /// argmax of the remaining logits (no noise).
    Deterministic,
    /// DeepSpeed's Gumbel-noised second choice, from a seeded generator.
    Reference(Rng),
    /// Given noise per MoE layer (`[T, E]` row-major) for the next forward call of each layer; layers
    /// without an entry, and later calls, use no noise. For checking against reference fixtures.
    Given(std::collections::HashMap<usize, Vec<f32>>),
}

impl Gating {
    pub fn name(&self) -> &'static str {
        match self {
            Gating::Deterministic => "deterministic",
            Gating::Reference(_) => "reference",
            Gating::Given(_) => "given-noise",
        }
    }

    fn noise(&mut self, layer: usize, n: usize) -> Option<Vec<f32>> {
        match self {
            Gating::Deterministic => None,
            Gating::Reference(rng) => Some((0..n).map(|_| rng.gumbel()).collect()),
            Gating::Given(map) => map.remove(&layer).filter(|v| v.len() == n),
        }
    }
}

/// The routing of one forward call.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    /// `[T]` (first, second) expert.
    pub experts: Vec<[usize; 2]>,
    /// `[T]` renormalised weights (0 for a dropped choice).
    pub weights: Vec<[f32; 2]>,
    pub kept: Vec<[bool; 2]>,
    pub capacity: usize,
    /// The first token whose experts are computed: 0, or the last token when only the last row's
    /// output is wanted ([`MoeStep::last_only`]); earlier tokens are routed (capacity) but not run.
    pub computed_from: usize,
}

impl Routing {
    /// The experts token `tok` is computed by (its choices the capacity rule kept).
    pub fn kept_experts(&self, tok: usize) -> impl Iterator<Item = usize> + '_ {
        (0..2).filter(move |k| self.kept[tok][*k]).map(move |k| self.experts[tok][k])
    }

    /// The experts token `tok` is actually run through in this call: its kept choices, or none for a
    /// token before [`Self::computed_from`] (what the route trace records and a replay loads).
    pub fn computed_experts(&self, tok: usize) -> impl Iterator<Item = usize> + '_ {
        let run = tok >= self.computed_from;
        self.kept_experts(tok).filter(move |_| run)
    }

    /// The distinct experts the layer computes in this call, ascending.
    pub fn needed(&self) -> Vec<usize> {
        let mut v: Vec<usize> = (self.computed_from..self.experts.len()).flat_map(|tok| self.kept_experts(tok)).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// DeepSpeed's `_capacity`: the token count over experts (a Python float) times the capacity factor
/// (a float32 tensor) is rounded to float32, then ceiled.
pub fn capacity(n_tokens: usize, n_expert: usize, eval_capacity_factor: f32, min_capacity: usize) -> usize {
    let c = ((n_tokens as f64 / n_expert as f64) as f32 * (2.0 * eval_capacity_factor)).ceil() as usize;
    c.max(min_capacity)
}

/// Top-2 routing of `logits [T, E]` (see the module docs). `noise`, when given, is `[T, E]`.
pub fn route(logits: &[f32], n_expert: usize, eval_capacity_factor: f32, min_capacity: usize, noise: Option<&[f32]>) -> Routing {
    let t = logits.len() / n_expert;
    let cap = capacity(t, n_expert, eval_capacity_factor, min_capacity);
    let argmax = |v: &mut dyn Iterator<Item = (usize, f32)>| {
        v.fold((usize::MAX, f32::NEG_INFINITY), |b, (i, x)| if x > b.1 || b.0 == usize::MAX { (i, x) } else { b }).0
    };
    let mut experts = Vec::with_capacity(t);
    let mut gates_pair = Vec::with_capacity(t);
    for tok in 0..t {
        let row = &logits[tok * n_expert..(tok + 1) * n_expert];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
        let exp: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
        let sum: f32 = exp.iter().sum();
        let gates: Vec<f32> = exp.iter().map(|e| e / sum).collect();
        let i1 = argmax(&mut gates.iter().copied().enumerate());
        let noisy = |j: usize| row[j] + noise.map_or(0.0, |n| n[tok * n_expert + j]);
        let i2 = argmax(&mut (0..n_expert).filter(|j| *j != i1).map(|j| (j, noisy(j))));
        experts.push([i1, i2]);
        gates_pair.push([gates[i1], gates[i2]]);
    }
    // Capacity slots: all first choices are placed (token order), then all second choices.
    let mut count = vec![0usize; n_expert];
    let mut kept = vec![[false; 2]; t];
    for k in 0..2 {
        for tok in 0..t {
            let e = experts[tok][k];
            kept[tok][k] = count[e] < cap;
            count[e] += 1;
        }
    }
    let weights = (0..t)
        .map(|tok| {
            let g1 = if kept[tok][0] { gates_pair[tok][0] } else { 0.0 };
            let g2 = if kept[tok][1] { gates_pair[tok][1] } else { 0.0 };
            let d = (g1 + g2).max(f32::EPSILON);
            [g1 / d, g2 / d]
        })
        .collect();
    Routing { experts, weights, kept, capacity: cap, computed_from: 0 }
}

/// Stacked expert weights of one MoE layer and its gate.
pub struct Moe {
    pub layer: usize,
    gate: Weight,
    experts: Vec<Ffn>,
    n_expert: usize,
    eval_capacity_factor: f32,
    min_capacity: usize,
}

impl Moe {
    pub fn load(layer: usize, c: &LlmConfig, m: &MoeConfig, ws: &WeightStore) -> Result<Moe> {
        let (d, f, e) = (c.n_embd, c.n_ff, m.n_expert);
        let n = |part: &str| tn::blk(layer, part);
        let up = ws.stacked(&n("ffn_up_exps.weight"), e, f, d)?;
        let down = ws.stacked(&n("ffn_down_exps.weight"), e, d, f)?;
        // Run from the map, an expert is repacked at its first use like every other matrix (prefill
        // then takes the AMX/interleaved kernels); an expert-cache slot's copy stays in the file's
        // layout, so `--expert-ram` runs on ggml's generic kernels.
        let own = |w: &Weight, first: usize, rows: usize| w.slice_rows(first, rows).with_own_repack();
        let experts = if c.family == Family::Phi2 {
            let up_b = ws.f32(&n("ffn_up_exps.bias"), &[e, f])?;
            let down_b = ws.f32(&n("ffn_down_exps.bias"), &[e, d])?;
            (0..e)
                .map(|x| Ffn::Gelu {
                    up: own(&up, x * f, f),
                    up_b: up_b[x * f..(x + 1) * f].into(),
                    down: own(&down, x * d, d),
                    down_b: down_b[x * d..(x + 1) * d].into(),
                })
                .collect()
        } else {
            let gate = ws.stacked(&n("ffn_gate_exps.weight"), e, f, d)?;
            (0..e).map(|x| Ffn::swiglu(own(&gate, x * f, f), own(&up, x * f, f), own(&down, x * d, d))).collect()
        };
        Ok(Moe {
            layer,
            gate: ws.matrix(&n("ffn_gate_inp.weight"), e, d)?,
            experts,
            n_expert: e,
            eval_capacity_factor: m.eval_capacity_factor,
            min_capacity: m.min_capacity,
        })
    }

    /// The expert blocks as mapped views (what the expert store describes and the mmap path computes).
    pub fn experts(&self) -> &[Ffn] {
        &self.experts
    }

    /// Router logits `[T, E]` of `h [T, D]`.
    fn router<B: Backend>(&self, be: &B, h: &B::Act, mode: RowMode) -> Result<Vec<f32>> {
        Ok(be.to_host(&mode.matmul(be, h, &self.gate)?))
    }

    /// The experts this layer's router would pick (deterministic top-2 per token, distinct, ascending)
    /// for `h`: applied to an earlier layer's input, the prefetch guess for this layer.
    pub fn guess<B: Backend>(&self, be: &B, h: &B::Act) -> Result<Vec<usize>> {
        Ok(route(&self.router(be, h, RowMode::Sequence)?, self.n_expert, f32::INFINITY, 0, None).needed())
    }

    /// `h [T, D]` → `[T, D]` (`[1, D]`, the last row, with `step.last_only`); returns the router logits `[T, E]`, the routing, and (with a `next` MoE
    /// layer) the guess for that layer. With a cache, the routed experts are made resident chunk by
    /// chunk, and the guess is prefetched once the first chunk is pinned (the order `replay` follows).
    /// With [`RowMode::Independent`] every row is routed on its own: one token alone never loses a choice
    /// to the capacity rule (C ≥ 1 and its two experts differ), so that is routing without capacity.
    pub fn forward<B: Backend>(&self, be: &B, h: &B::Act, gating: &mut Gating, step: MoeStep<'_>) -> Result<MoeOutput<B>> {
        let mode = step.mode;
        let logits = self.router(be, h, mode)?; // [T, E]
        let (t, d) = be.shape(h);
        let noise = gating.noise(self.layer, t * self.n_expert);
        let mut routing = match mode {
            RowMode::Sequence => route(&logits, self.n_expert, self.eval_capacity_factor, self.min_capacity, noise.as_deref()),
            RowMode::Independent => route(&logits, self.n_expert, f32::INFINITY, 0, noise.as_deref()),
        };
        let guess = step.next.map(|n| n.guess(be, h).map(|g| (n.layer, g))).transpose()?;
        // the rows whose output is computed: all, or (last_only) the last one, routed among all
        let first_out = if step.last_only { t.saturating_sub(1) } else { 0 };
        routing.computed_from = first_out;
        let needed = routing.needed();
        let mut out = be.zeros(t - first_out, d);
        let apply = |e: usize, expert: &Ffn, out: &mut B::Act| -> Result<()> {
            let (mut rows, mut out_rows, mut weights) = (Vec::new(), Vec::new(), Vec::new());
            for tok in first_out..t {
                for k in 0..2 {
                    if routing.experts[tok][k] == e && routing.kept[tok][k] {
                        rows.push(tok);
                        out_rows.push(tok - first_out);
                        weights.push(routing.weights[tok][k]);
                    }
                }
            }
            let y = expert.forward(be, &be.gather_rows(h, &rows), mode)?; // [rows, D]
            be.scatter_add_rows(out, &y, &out_rows, &weights);
            Ok(())
        };
        match step.cache {
            None => {
                for &e in &needed {
                    apply(e, &self.experts[e], &mut out)?;
                }
            }
            Some(cache) => {
                let prefetch = |cache: &ExpertCache| match &guess {
                    Some((layer, ids)) => cache.prefetch(*layer, ids),
                    None => Ok(()),
                };
                cache.begin_layer(self.layer, &needed);
                if needed.is_empty() {
                    prefetch(cache)?;
                }
                for (k, chunk) in cache.order(self.layer, &needed).chunks(cache.chunk_len()).enumerate() {
                    let resident = cache.ensure(self.layer, chunk)?;
                    if k == 0 {
                        prefetch(cache)?;
                    }
                    for (e, mats) in &resident.experts {
                        apply(*e, &self.experts[*e].with_matrices(mats.clone()), &mut out)?;
                    }
                }
            }
        }
        Ok(MoeOutput { y: out, logits, routing, guess_next: guess.map(|g| g.1) })
    }
}

/// What one MoE layer's forward may use besides its input.
#[derive(Clone, Copy)]
pub struct MoeStep<'a> {
    /// What the rows are (one prompt, or one decode token of each of several sequences).
    pub mode: RowMode,
    /// The expert cache (`--expert-ram`); `None` reads the experts from the file's map.
    pub cache: Option<&'a ExpertCache>,
    /// The next MoE layer of the model, whose experts are to be guessed (and prefetched with a
    /// cache); `None` when nobody wants the guess (no prefetch, no route trace).
    pub next: Option<&'a Moe>,
    /// Only the last row's output is wanted (the last layer of a prefill): every row is still routed,
    /// since the capacity rule spans them all, but only the last row's experts are computed.
    pub last_only: bool,
}

pub struct MoeOutput<B: Backend> {
    pub y: B::Act,
    /// `[T, E]`.
    pub logits: Vec<f32>,
    pub routing: Routing,
    /// The guess for the next MoE layer, when there is one.
    pub guess_next: Option<Vec<usize>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn capacity_follows_deepspeed() {
        assert_eq!(capacity(117, 4, 2.0, 0), 117);
        assert_eq!(capacity(117, 4, 0.5, 0), 30);
        assert_eq!(capacity(1, 4, 0.5, 0), 1);
        assert_eq!(capacity(3, 4, 0.25, 4), 4);
    }

    #[test]
    fn dropped_choices_renormalise_and_both_dropped_is_zero() {
        // Four tokens all preferring expert 0, then 1; capacity ⌈4/4 · 2·0.5⌉ = 1. Token 0 takes expert 0's
        // slot; second choices are placed after all first choices *of the same expert* (none for expert 1),
        // so token 0 also takes expert 1's slot; tokens 1-3 lose both choices and get a zero output.
        let logits = [3.0, 2.0, 0.0, 0.0].repeat(4);
        let r = route(&logits, 4, 0.5, 0, None);
        assert_eq!(r.capacity, 1);
        assert_eq!(r.kept[0], [true, true]);
        assert!((r.weights[0][0] - 1.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-6);
        assert_eq!(r.kept[1], [false, false]);
        assert_eq!(r.weights[1], [0.0, 0.0]);
    }

    proptest! {
        #[test]
        fn routing_invariants(logits in prop::collection::vec(-5.0f32..5.0, 4..160), cf in 0.25f32..2.5) {
            let t = logits.len() / 4;
            let r = route(&logits[..t * 4], 4, cf, 0, None);
            for tok in 0..t {
                let [a, b] = r.experts[tok];
                prop_assert!(a != b && a < 4 && b < 4);
                let [w1, w2] = r.weights[tok];
                if r.kept[tok][0] || r.kept[tok][1] {
                    prop_assert!((w1 + w2 - 1.0).abs() < 1e-5);
                } else {
                    prop_assert!(w1 == 0.0 && w2 == 0.0);
                }
            }
            for e in 0..4 {
                let used = (0..t).flat_map(|tok| (0..2).map(move |k| (tok, k))).filter(|(tok, k)| r.experts[*tok][*k] == e && r.kept[*tok][*k]).count();
                prop_assert!(used <= r.capacity);
            }
        }
    }
}
