//! The compute interface the model is written against (design.md "Execution"): about a dozen ops on
//! activation matrices `[rows, cols]` (f32) that live wherever the backend keeps them. Weights are
//! views into the GGUF map ([`Weight`]); a device backend uploads them on first use.
//!
//! One implementation today: [`cpu::CpuBackend`] (ggml's quantized dot products + our own f32 ops).

pub mod cpu;

pub use moellava_kernels::cpu::attention::AttnShape;
pub use moellava_kernels::cpu::Activation;

use crate::error::Result;
use crate::model::weights::Weight;

#[allow(clippy::wrong_self_convention)] // `from_host` is a conversion *through* the backend
pub trait Backend: Send + Sync {
    /// An activation matrix `[rows, cols]` of f32.
    type Act: Send + Sync + Clone;

    fn name(&self) -> &'static str;
    fn from_host(&self, data: Vec<f32>, cols: usize) -> Self::Act;
    fn to_host(&self, x: &Self::Act) -> Vec<f32>;
    fn shape(&self, x: &Self::Act) -> (usize, usize);

    /// `x[T, K] · Wᵀ` for `W [N, K]` in any weight type → `[T, N]`.
    fn matmul(&self, x: &Self::Act, w: &Weight) -> Result<Self::Act>;
    /// Rows `ids` of an embedding table.
    fn embed(&self, table: &Weight, ids: &[u32]) -> Result<Self::Act>;

    fn add_bias(&self, x: &mut Self::Act, bias: &[f32]);
    fn layer_norm(&self, x: &mut Self::Act, w: &[f32], b: Option<&[f32]>, eps: f32);
    fn rms_norm(&self, x: &mut Self::Act, w: &[f32], eps: f32);
    fn activate(&self, x: &mut Self::Act, a: Activation);
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

    /// Column blocks of the given widths (a fused QKV projection → q, k, v).
    fn split_cols(&self, x: &Self::Act, widths: &[usize]) -> Vec<Self::Act>;
    /// The given rows, in order.
    fn gather_rows(&self, x: &Self::Act, rows: &[usize]) -> Self::Act;
    /// `dst[rows[i]] += weights[i] · src[i]`.
    fn scatter_add_rows(&self, dst: &mut Self::Act, src: &Self::Act, rows: &[usize], weights: &[f32]);
    /// Rows of `parts` one after another.
    fn concat_rows(&self, parts: &[&Self::Act]) -> Self::Act;
    /// Appends the rows of `src` to `dst` (the KV cache).
    fn append_rows(&self, dst: &mut Self::Act, src: &Self::Act);
    /// Room for `rows` more rows in `dst` without moving it (a hint; the KV cache of a known length).
    fn reserve_rows(&self, _dst: &mut Self::Act, _rows: usize) {}
    /// A matrix of zeros.
    fn zeros(&self, rows: usize, cols: usize) -> Self::Act;
}
