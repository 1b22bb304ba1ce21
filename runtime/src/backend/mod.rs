//! The compute interface the model is written against (design.md "Execution"): about a dozen ops on
//! activation matrices `[rows, cols]` (f32) that live wherever the backend keeps them. Weights are
//! views into the GGUF map ([`Weight`]); a device backend uploads them on first use.
//!
//! Two implementations: [`cpu::CpuBackend`] (ggml's quantized dot products + our own f32 ops) and
//! [`cuda::CudaBackend`] (our CUDA kernels; needs a GPU at run time, nothing at build time).

pub mod cpu;
pub mod cuda;
pub mod vram;

pub use moellava_kernels::cpu::attention::AttnShape;
pub use moellava_kernels::cpu::Activation;
use moellava_kernels::QuantType;

use crate::error::Result;
use crate::model::weights::{StackedPair, Weight};

/// What the rows of one forward call are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowMode {
    /// Consecutive positions of one sequence (a prompt): batched matmuls, MoE capacity over the call.
    Sequence,
    /// One row per sequence (a decode step of several sequences): per-row matmuls and per-row routing,
    /// so each row's result equals that sequence run alone.
    Independent,
}

impl RowMode {
    /// `x · Wᵀ` in this mode.
    pub fn matmul<B: Backend>(self, be: &B, x: &B::Act, w: &Weight) -> Result<B::Act> {
        match self {
            RowMode::Sequence => be.matmul(x, w),
            RowMode::Independent => be.matmul_per_row(x, w),
        }
    }
}

/// [`Backend::gate_up`] as two matmuls, the activation and a product.
pub fn gate_up_apart<B: Backend>(be: &B, x: &B::Act, gate: &Weight, up: &Weight, mode: RowMode) -> Result<B::Act> {
    let mut g = mode.matmul(be, x, gate)?;
    be.activate(&mut g, Activation::Silu);
    be.mul(&mut g, &mode.matmul(be, x, up)?);
    Ok(g)
}

/// The element type of the KV cache (`--kv-cache`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvType {
    F32,
    /// Half the memory and half the bytes decode reads; each key and value rounded to f16 (as llama.cpp does).
    F16,
}

impl KvType {
    pub const NAMES: &'static str = "f16, f32";

    /// f32 for a language model whose attention weights are f32 (a reference-precision file, where the
    /// cache must not be the coarsest step), f16 for everything else.
    pub fn for_weights(attn_qkv: QuantType) -> KvType {
        if attn_qkv == QuantType::F32 {
            KvType::F32
        } else {
            KvType::F16
        }
    }
}

impl std::str::FromStr for KvType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<KvType, String> {
        match s {
            "f32" => Ok(KvType::F32),
            "f16" => Ok(KvType::F16),
            _ => Err(format!("unknown KV cache type `{s}` (expected one of: {})", KvType::NAMES)),
        }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
        })
    }
}

/// The `&[f32]` parameters of `add_bias`, `layer_norm` and `rms_norm` are model parameters: a device
/// backend keeps its copy keyed by their address, so callers pass only slices that stay alive and
/// unchanged for the backend's life (the model's own fields), never temporaries.
#[allow(clippy::wrong_self_convention)] // `from_host` is a conversion *through* the backend
pub trait Backend: Send + Sync {
    /// An activation matrix `[rows, cols]` of f32.
    type Act: Send + Sync + Clone;
    /// Rows of keys or values kept across calls (one layer's K or V of the KV cache), `[P, cols]`.
    type Kv: Send + Sync;

    fn name(&self) -> &'static str;
    fn from_host(&self, data: Vec<f32>, cols: usize) -> Self::Act;
    fn to_host(&self, x: &Self::Act) -> Vec<f32>;
    fn shape(&self, x: &Self::Act) -> (usize, usize);

    /// `x[T, K] · Wᵀ` for `W [N, K]` in any weight type → `[T, N]`.
    fn matmul(&self, x: &Self::Act, w: &Weight) -> Result<Self::Act>;
    /// [`Backend::matmul`] where every output row is bit-identical to that row multiplied on its own
    /// (rows from different sequences in one decode step: a batch must not change any answer).
    fn matmul_per_row(&self, x: &Self::Act, w: &Weight) -> Result<Self::Act>;
    /// Rows `ids` of an embedding table.
    fn embed(&self, table: &Weight, ids: &[u32]) -> Result<Self::Act>;

    fn add_bias(&self, x: &mut Self::Act, bias: &[f32]);
    fn layer_norm(&self, x: &mut Self::Act, w: &[f32], b: Option<&[f32]>, eps: f32);
    fn rms_norm(&self, x: &mut Self::Act, w: &[f32], eps: f32);
    fn activate(&self, x: &mut Self::Act, a: Activation);
    /// SwiGLU's first half, `silu(x·gateᵀ) ⊙ (x·upᵀ)` `[T, F]`, matmuls in `mode`. `stacked`: the
    /// two as one matrix, for a backend that can multiply it in one call; by default two matmuls.
    fn gate_up(
        &self,
        x: &Self::Act,
        gate: &Weight,
        up: &Weight,
        stacked: Option<&StackedPair>,
        mode: RowMode,
    ) -> Result<Self::Act>
    where
        Self: Sized,
    {
        let _ = stacked;
        gate_up_apart(self, x, gate, up, mode)
    }
    /// `x *= y` element-wise.
    fn mul(&self, x: &mut Self::Act, y: &Self::Act);
    /// `x += y` element-wise.
    fn add(&self, x: &mut Self::Act, y: &Self::Act);
    /// NeoX rotary embedding on the first `rot_dims` of each head; one position per row.
    #[allow(clippy::too_many_arguments)]
    fn rope(&self, x: &mut Self::Act, n_head: usize, head_dim: usize, rot_dims: usize, positions: &[usize], base: f32);
    /// Softmax attention of q `[T, n_head·hd]` over k, v `[P, n_kv_head·hd]`; query t is at position
    /// `first_pos + t` and, when causal, sees keys up to its own position (`shape` holds the sizes).
    fn attention(&self, q: &Self::Act, k: &Self::Act, v: &Self::Act, shape: AttnShape) -> Self::Act;
    /// [`Backend::attention`] over cached keys and values.
    fn attention_cached(&self, q: &Self::Act, k: &Self::Kv, v: &Self::Kv, shape: AttnShape) -> Self::Act;

    /// Column blocks of the given widths (a fused QKV projection → q, k, v).
    fn split_cols(&self, x: &Self::Act, widths: &[usize]) -> Vec<Self::Act>;
    /// The given rows, in order.
    fn gather_rows(&self, x: &Self::Act, rows: &[usize]) -> Self::Act;
    /// `dst[rows[i]] += weights[i] · src[i]`.
    fn scatter_add_rows(&self, dst: &mut Self::Act, src: &Self::Act, rows: &[usize], weights: &[f32]);
    /// Rows of `parts` one after another.
    fn concat_rows(&self, parts: &[&Self::Act]) -> Self::Act;
    /// Empty cached rows of width `cols` in `ty`, with room for `rows` rows allocated up front.
    fn kv_with_capacity(&self, cols: usize, ty: KvType, rows: usize) -> Self::Kv;
    /// Appends the rows of `src` to `dst`, converted to the cache's type.
    fn kv_append(&self, dst: &mut Self::Kv, src: &Self::Act);
    /// A matrix of zeros.
    fn zeros(&self, rows: usize, cols: usize) -> Self::Act;
}
