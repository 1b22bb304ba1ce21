//! Causal self-attention with a QKV projection, partial NeoX rotary and a KV cache.
//! Phi-2 / StableLM / Qwen all fit: q, k, v = split(x·Wqkvᵀ + b) into [D | kv | kv] (our converter
//! fuses them; llama.cpp's converter writes Phi-2 and StableLM as three matrices attn_q/k/v, which
//! load too, and give the same q, k, v); rotary on the
//! first `rope_dims` of each head (Phi 0.4·80, StableLM 0.25·64, Qwen all 128); scores scaled by
//! 1/√head_dim; grouped KV heads when n_head_kv < n_head; output projection (+ bias for Phi).
//! Dims: T = new tokens, P = cached + new positions, D = n_embd, kv = n_head_kv·head_dim,
//! B = sequences of a decode batch (one new token each).

use crate::backend::{AttnShape, Backend, KvType, RowMode};
use crate::error::Result;
use crate::gguf::keys::tensors as tn;
use crate::model::config::LlmConfig;
use crate::model::weights::{Weight, WeightStore};
use moellava_kernels::QuantType;

/// Keys and values of every position seen so far, one pair per layer.
pub struct KvCache<B: Backend> {
    /// Per layer, K and V `[P, n_head_kv·head_dim]`.
    pub layers: Vec<(B::Kv, B::Kv)>,
    pub len: usize,
}

impl<B: Backend> KvCache<B> {
    /// A cache of `ty` with room for `positions` positions allocated up front: growing it token by
    /// token would reallocate (and, in the heap, fragment) every layer's K and V several times. More
    /// positions than that still fit (the rows grow).
    pub fn with_capacity(be: &B, c: &LlmConfig, ty: KvType, positions: usize) -> KvCache<B> {
        let kv = c.n_head_kv * c.head_dim;
        let rows = || be.kv_with_capacity(kv, ty, positions);
        KvCache { layers: (0..c.n_layer).map(|_| (rows(), rows())).collect(), len: 0 }
    }
}

/// The QKV projection as the file holds it.
enum Qkv {
    /// `attn_qkv` `[D + 2kv, D]` (+ bias).
    Fused { w: Weight, b: Option<Vec<f32>> },
    /// `attn_q` `[D, D]`, `attn_k` and `attn_v` `[kv, D]` (+ biases).
    Split { w: Box<[Weight; 3]>, b: [Option<Vec<f32>>; 3] },
}

pub struct Attention {
    qkv: Qkv,
    out: Weight,
    out_b: Option<Vec<f32>>,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    rope_dims: usize,
    rope_base: f32,
}

impl Attention {
    pub fn load(layer: usize, c: &LlmConfig, ws: &WeightStore) -> Result<Attention> {
        let (d, kv) = (c.n_embd, c.n_head_kv * c.head_dim);
        let n = |part: &str| tn::blk(layer, part);
        let qkv = if !ws.has(&n("attn_qkv.weight")) && ws.has(&n("attn_q.weight")) {
            Qkv::Split {
                w: Box::new([
                    ws.matrix(&n("attn_q.weight"), d, d)?,
                    ws.matrix(&n("attn_k.weight"), kv, d)?,
                    ws.matrix(&n("attn_v.weight"), kv, d)?,
                ]),
                b: [
                    ws.f32_opt(&n("attn_q.bias"), &[d])?,
                    ws.f32_opt(&n("attn_k.bias"), &[kv])?,
                    ws.f32_opt(&n("attn_v.bias"), &[kv])?,
                ],
            }
        } else {
            Qkv::Fused { w: ws.matrix(&n("attn_qkv.weight"), d + 2 * kv, d)?, b: ws.f32_opt(&n("attn_qkv.bias"), &[d + 2 * kv])? }
        };
        Ok(Attention {
            qkv,
            out: ws.matrix(&n("attn_output.weight"), d, d)?,
            out_b: ws.f32_opt(&n("attn_output.bias"), &[d])?,
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            rope_dims: c.rope_dims,
            rope_base: c.rope_base,
        })
    }

    /// The type of the QKV weight (what the KV cache's default type follows).
    pub fn qkv_type(&self) -> QuantType {
        match &self.qkv {
            Qkv::Fused { w, .. } => w.qtype,
            Qkv::Split { w, .. } => w[0].qtype,
        }
    }

    /// `h [T, D]` at positions `first_pos..first_pos+T` → `[T, D]`; appends this call's K and V to `cache`.
    ///
    /// With `last_only`, every row still goes into the cache but only the last one is attended and
    /// projected: the result is `[1, D]` (the last layer of a prefill, whose other rows nobody reads).
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        h: &B::Act,
        cache: &mut (B::Kv, B::Kv),
        first_pos: usize,
        last_only: bool,
    ) -> Result<B::Act> {
        let (t, _) = be.shape(h);
        let positions: Vec<usize> = (first_pos..first_pos + t).collect();
        let (q, k, v) = self.project(be, h, &positions, RowMode::Sequence)?;
        be.kv_append(&mut cache.0, &k);
        be.kv_append(&mut cache.1, &v);
        let a = if last_only && t > 1 {
            // the last query alone, at its own position: causally it sees the whole cache
            be.attention_cached(&be.gather_rows(&q, &[t - 1]), &cache.0, &cache.1, self.shape(first_pos + t - 1))
        } else {
            be.attention_cached(&q, &cache.0, &cache.1, self.shape(first_pos)) // [T, D]
        };
        self.output(be, &a, RowMode::Sequence)
    }

    /// One decode token per sequence: row `b` of `h [B, D]` is at position `positions[b]` of the sequence
    /// whose cache is `caches[b]` (each row attends over its own cache only) → `[B, D]`.
    pub fn forward_rows<B: Backend>(
        &self,
        be: &B,
        h: &B::Act,
        caches: &mut [&mut (B::Kv, B::Kv)],
        positions: &[usize],
    ) -> Result<B::Act> {
        let (q, k, v) = self.project(be, h, positions, RowMode::Independent)?;
        let mut rows = Vec::with_capacity(caches.len());
        for (b, cache) in caches.iter_mut().enumerate() {
            be.kv_append(&mut cache.0, &be.gather_rows(&k, &[b]));
            be.kv_append(&mut cache.1, &be.gather_rows(&v, &[b]));
            rows.push(be.attention_cached(&be.gather_rows(&q, &[b]), &cache.0, &cache.1, self.shape(positions[b])));
        }
        let a = be.concat_rows(&rows.iter().collect::<Vec<_>>()); // [B, D]
        self.output(be, &a, RowMode::Independent)
    }

    /// q `[T, D]`, k and v `[T, kv]` of `h [T, D]`, rotated for `positions` (one per row).
    fn project<B: Backend>(&self, be: &B, h: &B::Act, positions: &[usize], mode: RowMode) -> Result<(B::Act, B::Act, B::Act)> {
        let (_, d) = be.shape(h);
        let kv = self.n_head_kv * self.head_dim;
        let parts: Vec<B::Act> = match &self.qkv {
            Qkv::Fused { w, b } => {
                let mut qkv = mode.matmul(be, h, w)?; // [T, D + 2kv]
                if let Some(b) = b {
                    be.add_bias(&mut qkv, b);
                }
                be.split_cols(&qkv, &[d, kv, kv])
            }
            Qkv::Split { w, b } => {
                let mut parts = Vec::with_capacity(3);
                for (w, b) in w.iter().zip(b) {
                    let mut y = mode.matmul(be, h, w)?; // [T, D] or [T, kv]
                    if let Some(b) = b {
                        be.add_bias(&mut y, b);
                    }
                    parts.push(y);
                }
                parts
            }
        };
        let [mut q, mut k, v]: [B::Act; 3] = parts
            .try_into()
            .map_err(|_| crate::error::RuntimeError::Unsupported("backend split QKV into the wrong number of parts".into()))?;
        be.rope(&mut q, self.n_head, self.head_dim, self.rope_dims, positions, self.rope_base);
        be.rope(&mut k, self.n_head_kv, self.head_dim, self.rope_dims, positions, self.rope_base);
        Ok((q, k, v))
    }

    fn shape(&self, first_pos: usize) -> AttnShape {
        AttnShape {
            n_head: self.n_head,
            n_kv_head: self.n_head_kv,
            head_dim: self.head_dim,
            first_pos,
            causal: true,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        }
    }

    /// The output projection of the attended values `a [T, D]`.
    fn output<B: Backend>(&self, be: &B, a: &B::Act, mode: RowMode) -> Result<B::Act> {
        let mut y = mode.matmul(be, a, &self.out)?;
        if let Some(b) = &self.out_b {
            be.add_bias(&mut y, b);
        }
        Ok(y)
    }
}
