//! Scaled dot-product attention on the CPU: f32 queries and arithmetic, keys and values in f32 or f16
//! (the KV cache's element type, [`KvElem`]; f16 halves the cache and the bytes decode reads).
//!
//! Dims: T = query tokens, P = key positions (cache included), H = query heads, Hkv = key/value heads
//! (heads share KV heads in groups of H / Hkv), D = head_dim.
//! q `[T, H·D]`; k, v `[P, Hkv·D]`; query t sits at absolute position `first_pos + t` and, when
//! `causal`, sees keys at positions ≤ its own. Output `[T, H·D]`.
//!
//! Two ways, same math:
//! - [`attention_batched`] (prefill, the vision tower): per head, scores `S[T, P] = Q_h · K_hᵀ` and
//!   output `O[T, D] = softmax(S) · V_h` as two f32 matmuls through ggml's `mul_mat` ([`super::gemm`]),
//!   on head-contiguous copies of Q_h, K_h and V_hᵀ.
//! - [`attention_per_query`] (decode, few queries): one rayon task per (token, head), scores by
//!   [`super::ops::dot_widen`], no copies.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::gemm::gemm;
use super::matmul::QMatRef;
use super::ops::{dot_widen, softmax, Widen};
use crate::QuantType;

/// Queries from which the batched (matmul) path pays for its copies and ggml hand-offs.
pub const BATCHED_MIN_QUERIES: usize = 8;

/// An element type keys and values may be stored in; arithmetic is always f32. The per-query
/// (decode) path widens element by element inside its dot product and weighted sum ([`Widen`]);
/// the batched path widens each row once into its head-contiguous copy ([`KvElem::as_f32`]).
pub trait KvElem: Widen + Send + Sync + 'static {
    /// Whether [`KvElem::as_f32`] needs a scratch row (f32 is read in place).
    const WIDENS: bool;
    /// A scratch row for [`KvElem::as_f32`]: `head_dim` floats, or none (no allocation) for f32.
    fn scratch(head_dim: usize) -> Vec<f32> {
        vec![0f32; if Self::WIDENS { head_dim } else { 0 }]
    }
    /// `src` as f32: `src` itself when it already is, else widened into `buf` (same length).
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
}

impl KvElem for f32 {
    const WIDENS: bool = false;
    fn as_f32<'a>(src: &'a [f32], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl KvElem for f16 {
    const WIDENS: bool = true;
    fn as_f32<'a>(src: &'a [f16], buf: &'a mut [f32]) -> &'a [f32] {
        src.convert_to_f32_slice(buf);
        buf
    }
}

/// Shape of one attention call (see the module's dimension legend).
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub first_pos: usize,
    pub causal: bool,
    pub scale: f32,
}

/// Sizes of one call's buffers, derived from the shape and the lengths of q and k.
struct Dims {
    t: usize,
    p: usize,
    qw: usize,
    kw: usize,
    group: usize,
}

impl AttnShape {
    fn dims(&self, q_len: usize, k_len: usize) -> Dims {
        let (qw, kw) = (self.n_head * self.head_dim, self.n_kv_head * self.head_dim);
        Dims { t: q_len / qw, p: k_len / kw, qw, kw, group: self.n_head / self.n_kv_head }
    }

    /// Keys visible to query `tok` among `p` positions.
    fn visible(&self, tok: usize, p: usize) -> usize {
        if self.causal {
            (self.first_pos + tok + 1).min(p)
        } else {
            p
        }
    }
}

/// Attention of `q` over `k`, `v` (see the module's dimension legend); picks the batched path for
/// [`BATCHED_MIN_QUERIES`] queries or more.
pub fn attention<T: KvElem>(q: &[f32], k: &[T], v: &[T], s: AttnShape) -> Vec<f32> {
    if q.len() / (s.n_head * s.head_dim).max(1) >= BATCHED_MIN_QUERIES {
        attention_batched(q, k, v, s)
    } else {
        attention_per_query(q, k, v, s)
    }
}

/// One rayon task per (token, head): scores, softmax, weighted sum of values.
pub fn attention_per_query<T: KvElem>(q: &[f32], k: &[T], v: &[T], s: AttnShape) -> Vec<f32> {
    let hd = s.head_dim;
    let Dims { t, p, qw, kw, group } = s.dims(q.len(), k.len());
    let mut out = vec![0f32; t * qw];
    out.par_chunks_mut(hd).enumerate().for_each(|(idx, o)| {
        let (tok, h) = (idx / s.n_head, idx % s.n_head);
        let kvh = h / group;
        let qv = &q[tok * qw + h * hd..tok * qw + (h + 1) * hd];
        let mut scores: Vec<f32> =
            (0..s.visible(tok, p)).map(|j| dot_widen(qv, &k[j * kw + kvh * hd..j * kw + (kvh + 1) * hd]) * s.scale).collect();
        softmax(&mut scores);
        for (j, w) in scores.iter().enumerate() {
            let vv = &v[j * kw + kvh * hd..j * kw + (kvh + 1) * hd];
            o.iter_mut().zip(vv).for_each(|(a, b)| *a += w * b.widen());
        }
    });
    out
}

/// Per head: `S = Q_h·K_hᵀ`, masked row softmax, `O = S·V_h`, both products through ggml's `mul_mat`.
/// The shared (inner) dimension of each product, D for the first and P for the second, is padded with
/// zeros to a multiple of [`GEMM_K_ALIGN`]: ggml's tiled f32 kernel needs it (else it falls back to one
/// f32 dot product per output, 2–3× slower), and zero terms change no sum.
pub fn attention_batched<T: KvElem>(q: &[f32], k: &[T], v: &[T], s: AttnShape) -> Vec<f32> {
    let hd = s.head_dim;
    let Dims { t, p, qw, kw, group } = s.dims(q.len(), k.len());
    let (dp, pp) = (hd.next_multiple_of(GEMM_K_ALIGN), p.next_multiple_of(GEMM_K_ALIGN));
    let mut out = vec![0f32; t * qw];
    let mut q_h = vec![0f32; t * dp]; // [T, Dp]
    let mut k_h = vec![0f32; pp * dp]; // [Pp, Dp]: rows beyond P give scores that the mask zeroes
    let mut v_ht = vec![0f32; hd * pp]; // [D, Pp]: V_h transposed, the "weight" of the second product
    let mut scores = vec![0f32; t * pp]; // [T, Pp]
    let mut o_h = vec![0f32; t * hd]; // [T, D]
    let mut row = T::scratch(hd); // one key or value row widened to f32
    for kvh in 0..s.n_kv_head {
        for j in 0..p {
            k_h[j * dp..j * dp + hd].copy_from_slice(T::as_f32(&k[j * kw + kvh * hd..j * kw + (kvh + 1) * hd], &mut row));
            let vv = T::as_f32(&v[j * kw + kvh * hd..j * kw + (kvh + 1) * hd], &mut row);
            for (d, x) in vv.iter().enumerate() {
                v_ht[d * pp + j] = *x;
            }
        }
        let k_mat = QMatRef { data: bytes_of(&k_h), qtype: QuantType::F32, n_rows: pp, n_cols: dp };
        let v_mat = QMatRef { data: bytes_of(&v_ht), qtype: QuantType::F32, n_rows: hd, n_cols: pp };
        for h in kvh * group..(kvh + 1) * group {
            for tok in 0..t {
                q_h[tok * dp..tok * dp + hd].copy_from_slice(&q[tok * qw + h * hd..tok * qw + (h + 1) * hd]);
            }
            gemm(k_mat, &q_h, &mut scores).expect("attention shapes are consistent by construction");
            scores.par_chunks_mut(pp).enumerate().for_each(|(tok, row)| {
                let vis = s.visible(tok, p);
                row[..vis].iter_mut().for_each(|x| *x *= s.scale);
                softmax(&mut row[..vis]);
                row[vis..].iter_mut().for_each(|x| *x = 0.0);
            });
            gemm(v_mat, &scores, &mut o_h).expect("attention shapes are consistent by construction");
            for tok in 0..t {
                out[tok * qw + h * hd..tok * qw + (h + 1) * hd].copy_from_slice(&o_h[tok * hd..(tok + 1) * hd]);
            }
        }
    }
    out
}

/// The inner-dimension multiple of ggml's tiled f32 matmul (llamafile's tinyBLAS: one 512-bit register
/// of f32; a multiple of the AVX2 and NEON widths too).
const GEMM_K_ALIGN: usize = 16;

/// f32 values as their native-endian bytes (what ggml's F32 type reads).
fn bytes_of(x: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern of it is valid to read as u8; the slice covers
    // exactly the same memory (len · 4 bytes) with u8's weaker alignment, borrowed for the same lifetime.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_signal as signal;

    /// The two paths differ only in f32 summation order.
    const SAME_MATH_TOL: f32 = 1e-5;

    #[test]
    fn batched_matches_per_query_for_causal_cached_grouped_and_full_attention() {
        // (T, P, H, Hkv, D, first_pos, causal): prefill, prefill after a cache, grouped KV heads, vision,
        // and a SigLIP-like head (D = 72) over a cache whose length no tile divides (padded paths).
        for (t, p, h, hkv, d, first, causal) in [
            (12, 12, 4, 4, 16, 0, true),
            (9, 20, 4, 2, 32, 11, true),
            (10, 10, 6, 2, 8, 0, true),
            (17, 17, 2, 2, 64, 0, false),
            (9, 45, 2, 1, 72, 36, true),
        ] {
            let (q, k, v) = (signal(t * h * d, 0.37), signal(p * hkv * d, 0.21), signal(p * hkv * d, 0.13));
            let s = AttnShape { n_head: h, n_kv_head: hkv, head_dim: d, first_pos: first, causal, scale: 0.3 };
            let (a, b) = (attention_batched(&q, &k, &v, s), attention_per_query(&q, &k, &v, s));
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!((x - y).abs() <= SAME_MATH_TOL, "T={t} P={p} H={h}: [{i}] {x} vs {y}");
            }
        }
    }

    /// An f16 cache rounds each key and value to 11 significant bits (relative 2⁻¹¹ ≈ 4.9e-4); the
    /// softmax-weighted sums of these unit-scale signals stay within a few of those steps.
    const F16_KV_TOL: f32 = 4e-3;

    #[test]
    fn f16_keys_and_values_match_the_f32_path_on_their_rounded_values() {
        for (t, p, h, hkv, d, first) in [(1, 30, 4, 2, 16, 29), (12, 12, 4, 4, 32, 0)] {
            let (q, k, v) = (signal(t * h * d, 0.37), signal(p * hkv * d, 0.21), signal(p * hkv * d, 0.13));
            let s = AttnShape { n_head: h, n_kv_head: hkv, head_dim: d, first_pos: first, causal: true, scale: 0.3 };
            let (k16, v16): (Vec<f16>, Vec<f16>) =
                (k.iter().map(|x| f16::from_f32(*x)).collect(), v.iter().map(|x| f16::from_f32(*x)).collect());
            let (k_r, v_r): (Vec<f32>, Vec<f32>) =
                (k16.iter().map(|x| x.to_f32()).collect(), v16.iter().map(|x| x.to_f32()).collect());
            // Same rounded values, f32 storage: only summation order may differ.
            let (a, b) = (attention(&q, &k16, &v16, s), attention(&q, &k_r, &v_r, s));
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!((x - y).abs() <= SAME_MATH_TOL, "T={t}: [{i}] {x} vs {y}");
            }
            // Against the unrounded f32 cache: the f16 rounding itself.
            let exact = attention(&q, &k, &v, s);
            let worst = a.iter().zip(&exact).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst <= F16_KV_TOL && worst > 0.0, "T={t}: f16 cache off by {worst}");
        }
    }

    #[test]
    fn causal_attention_of_one_key_returns_its_value() {
        let (hd, h) = (4, 2);
        let q = vec![1.0; h * hd];
        let k = vec![0.5; h * hd];
        let v: Vec<f32> = (0..h * hd).map(|i| i as f32).collect();
        let s = AttnShape { n_head: h, n_kv_head: h, head_dim: hd, first_pos: 0, causal: true, scale: 0.5 };
        assert_eq!(attention(&q, &k, &v, s), v);
        let (k16, v16): (Vec<f16>, Vec<f16>) =
            (k.iter().map(|x| f16::from_f32(*x)).collect(), v.iter().map(|x| f16::from_f32(*x)).collect());
        assert_eq!(attention(&q, &k16, &v16, s), v, "small integers are exact in f16");
    }
}
