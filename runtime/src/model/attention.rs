//! Causal self-attention with a fused QKV projection, partial NeoX rotary and a KV cache.
//! Phi-2 / StableLM / Qwen all fit: q, k, v = split(x·Wqkvᵀ + b) into [D | kv | kv]; rotary on the
//! first `rope_dims` of each head (Phi 0.4·80, StableLM 0.25·64, Qwen all 128); scores scaled by
//! 1/√head_dim; grouped KV heads when n_head_kv < n_head; output projection (+ bias for Phi).
//! Dims: T = new tokens, P = cached + new positions, D = n_embd, kv = n_head_kv·head_dim.

use crate::backend::{AttnShape, Backend, KvType};
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

pub struct Attention {
    qkv: Weight,
    qkv_b: Option<Vec<f32>>,
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
        Ok(Attention {
            qkv: ws.matrix(&n("attn_qkv.weight"), d + 2 * kv, d)?,
            qkv_b: ws.f32_opt(&n("attn_qkv.bias"), &[d + 2 * kv])?,
            out: ws.matrix(&n("attn_output.weight"), d, d)?,
            out_b: ws.f32_opt(&n("attn_output.bias"), &[d])?,
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            rope_dims: c.rope_dims,
            rope_base: c.rope_base,
        })
    }

    /// The type of the fused QKV weight (what the KV cache's default type follows).
    pub fn qkv_type(&self) -> QuantType {
        self.qkv.qtype
    }

    /// `h [T, D]` at positions `first_pos..first_pos+T` → `[T, D]`; appends this call's K and V to `cache`.
    pub fn forward<B: Backend>(&self, be: &B, h: &B::Act, cache: &mut (B::Kv, B::Kv), first_pos: usize) -> Result<B::Act> {
        let (t, d) = be.shape(h);
        let kv = self.n_head_kv * self.head_dim;
        let mut qkv = be.matmul(h, &self.qkv)?; // [T, D + 2kv]
        if let Some(b) = &self.qkv_b {
            be.add_bias(&mut qkv, b);
        }
        let [mut q, mut k, v]: [B::Act; 3] = be
            .split_cols(&qkv, &[d, kv, kv])
            .try_into()
            .map_err(|_| crate::error::RuntimeError::Unsupported("backend split QKV into the wrong number of parts".into()))?;
        let positions: Vec<usize> = (first_pos..first_pos + t).collect();
        be.rope(&mut q, self.n_head, self.head_dim, self.rope_dims, &positions, self.rope_base);
        be.rope(&mut k, self.n_head_kv, self.head_dim, self.rope_dims, &positions, self.rope_base);
        be.kv_append(&mut cache.0, &k);
        be.kv_append(&mut cache.1, &v);
        let shape = AttnShape {
            n_head: self.n_head,
            n_kv_head: self.n_head_kv,
            head_dim: self.head_dim,
            first_pos,
            causal: true,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        };
        let a = be.attention_cached(&q, &cache.0, &cache.1, shape); // [T, D]
        let mut y = be.matmul(&a, &self.out)?;
        if let Some(b) = &self.out_b {
            be.add_bias(&mut y, b);
        }
        Ok(y)
    }
}
