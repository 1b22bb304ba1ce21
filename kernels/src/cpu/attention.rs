//! Scaled dot-product attention on the CPU: f32 queries and arithmetic, keys and values in f32 or f16
//! (the KV cache's element type, [`KvElem`]; f16 halves the cache and the bytes decode reads).
//!
//! Dims: T = query tokens, P = key positions (cache included), H = query heads, Hkv = key/value heads
//! (heads share KV heads in groups of H / Hkv), D = head_dim.
//! q `[T, H·D]`; k, v `[P, Hkv·D]`; query t sits at absolute position `first_pos + t` and, when
//! `causal`, sees keys at positions ≤ its own. Output `[T, H·D]`.
//!
//! Two ways, same math:
//! - [`attention_batched`] (prefill, the vision tower): per head and block of queries, scores
//!   `S = Q_h · K_hᵀ` and output `O = softmax(S) · V_h` by two register-tiled f32 kernels, on copies
//!   of K_hᵀ and V_h.
//! - [`attention_per_query`] (decode, few queries): one rayon task per (token, head), scores by
//!   [`super::ops::dot_widen`], no copies.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::ops::{dot_widen, softmax, Widen};

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
            T::axpy(o, *w, vv);
        }
    });
    out
}

/// Per head: `S = Q_h·K_hᵀ`, masked row softmax, `O = S·V_h`, by two register-tiled f32 kernels
/// ([`scores_tile`], [`values_tile`]) over blocks of [`QB`] queries. Heads run in parallel, one task
/// per query head: each copies its K_hᵀ and V_h (widened, tile-padded; a task per KV head would leave
/// threads idle when a model has fewer KV heads than the machine has cores), runs all its query blocks
/// against them while they sit in L2, and writes its `[T, D]` output; one parallel pass then
/// interleaves the heads into `[T, H·D]`. (Before, the copies ran on one thread and each head was its
/// own parallel op over query blocks: 32 fork/joins and 32 serial copies per layer.)
/// Both kernels multiply-add along contiguous rows (keys of `K_hᵀ`, dimensions of `V_h`) with the
/// query's values broadcast, so no sum is reduced across a vector: a head dimension of 64–128 is too
/// short for a dot-product GEMM (ggml's tiled f32 `mul_mat`, used here before, spent much of its time
/// in its final reductions; figures in BENCHMARKS.md, `cargo bench --bench kernels -- attention`).
pub fn attention_batched<T: KvElem>(q: &[f32], k: &[T], v: &[T], s: AttnShape) -> Vec<f32> {
    let hd = s.head_dim;
    let Dims { t, p, qw, kw, group } = s.dims(q.len(), k.len());
    if t == 0 || hd == 0 {
        return vec![0f32; t * qw];
    }
    let (pp, dp) = (p.next_multiple_of(KEYS_PER_TILE), hd.next_multiple_of(DIMS_PER_TILE));
    // Scratch per worker thread, not per head: k_t [D, Pp] (K_h transposed, keys contiguous), v_h [P, Dp] (rows
    // zero-padded to whole tiles), a widened row [D], q_b [QB, D], s_b [QB, Pp], o_b [QB, Dp]. In a last,
    // partial block the rows past its queries keep an earlier block's values; their score rows are zeroed below
    // and their outputs never copied out.
    let mut per_head = vec![0f32; s.n_head * t * hd]; // [H, T, D]
    let scratch = || {
        (vec![0f32; hd * pp], vec![0f32; p * dp], T::scratch(hd), vec![0f32; QB * hd], vec![0f32; QB * pp], vec![0f32; QB * dp])
    };
    per_head.par_chunks_mut(t * hd).enumerate().for_each_init(scratch, |(k_t, v_h, row, q_b, s_b, o_b), (h, o_h)| {
        let kvh = h / group;
        for j in 0..p {
            let kr = T::as_f32(&k[j * kw + kvh * hd..j * kw + (kvh + 1) * hd], row);
            for (d, x) in kr.iter().enumerate() {
                k_t[d * pp + j] = *x;
            }
            v_h[j * dp..j * dp + hd].copy_from_slice(T::as_f32(&v[j * kw + kvh * hd..j * kw + (kvh + 1) * hd], row));
        }
        for t0 in (0..t).step_by(QB) {
            let nq = QB.min(t - t0);
            let seen = s.visible(t0 + nq - 1, p); // the block's last query sees the most keys
            for r in 0..nq {
                q_b[r * hd..(r + 1) * hd].copy_from_slice(&q[(t0 + r) * qw + h * hd..(t0 + r) * qw + (h + 1) * hd]);
            }
            scores_tile(q_b, hd, k_t, pp, seen.next_multiple_of(KEYS_PER_TILE), s_b);
            for r in 0..QB {
                let row = &mut s_b[r * pp..(r + 1) * pp];
                let vis = if r < nq { s.visible(t0 + r, p) } else { 0 };
                row[..vis].iter_mut().for_each(|x| *x *= s.scale);
                softmax(&mut row[..vis]);
                row[vis..].iter_mut().for_each(|x| *x = 0.0);
            }
            values_tile(s_b, pp, v_h, dp, seen, o_b);
            for r in 0..nq {
                o_h[(t0 + r) * hd..(t0 + r + 1) * hd].copy_from_slice(&o_b[r * dp..r * dp + hd]);
            }
        }
    });
    let mut out = vec![0f32; t * qw];
    out.par_chunks_mut(qw).enumerate().for_each(|(tok, o)| {
        for (h, oh) in o.chunks_mut(hd).enumerate() {
            oh.copy_from_slice(&per_head[(h * t + tok) * hd..(h * t + tok + 1) * hd]);
        }
    });
    out
}

/// Queries per block: the rows of both kernels' register tiles.
const QB: usize = 4;
/// Keys per tile of [`scores_tile`] (4 vectors of 16 f32 per query).
const KEYS_PER_TILE: usize = 64;
/// Head dimensions per tile of [`values_tile`] (one vector of 16 f32 per query: head dims 64, 80 and
/// 128 are whole tiles, SigLIP's 72 pads to 80).
const DIMS_PER_TILE: usize = 16;

/// `a·b + c`, fused where the CPU has FMA (one rounding), else a multiply and an add.
#[inline(always)]
fn fma(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(target_feature = "fma") {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `s_b[r, j] = Σ_d q_b[r, d] · k_t[d, j]` for r < QB, j < `n_keys` (a multiple of KEYS_PER_TILE).
/// q_b `[QB, hd]`, k_t `[hd, pp]`, s_b `[QB, pp]`.
fn scores_tile(q_b: &[f32], hd: usize, k_t: &[f32], pp: usize, n_keys: usize, s_b: &mut [f32]) {
    for j0 in (0..n_keys).step_by(KEYS_PER_TILE) {
        mac_tile::<KEYS_PER_TILE>(q_b, hd, k_t, pp, hd, j0, s_b);
    }
}

/// `o_b[r, c] = Σ_{j < n_keys} s_b[r, j] · v_h[j, c]` for r < QB, c < dp (a multiple of
/// DIMS_PER_TILE). s_b `[QB, pp]`, v_h `[P, dp]`, o_b `[QB, dp]`. Columns go in strips of up to
/// [`MAX_VALUE_VECTORS`] vectors, so each key's row of V feeds QB × (vectors) independent
/// accumulators: with one vector per strip (4 chains) the loop waited on FMA latency and on loads.
fn values_tile(s_b: &[f32], pp: usize, v_h: &[f32], dp: usize, n_keys: usize, o_b: &mut [f32]) {
    let mut c0 = 0;
    while c0 < dp {
        let nv = ((dp - c0) / DIMS_PER_TILE).min(MAX_VALUE_VECTORS);
        match nv {
            5 => mac_tile::<80>(s_b, pp, v_h, dp, n_keys, c0, o_b),
            4 => mac_tile::<64>(s_b, pp, v_h, dp, n_keys, c0, o_b),
            3 => mac_tile::<48>(s_b, pp, v_h, dp, n_keys, c0, o_b),
            2 => mac_tile::<32>(s_b, pp, v_h, dp, n_keys, c0, o_b),
            _ => mac_tile::<16>(s_b, pp, v_h, dp, n_keys, c0, o_b),
        }
        c0 += nv.max(1) * DIMS_PER_TILE;
    }
}

/// Widest column strip of [`values_tile`], in vectors of DIMS_PER_TILE: QB × 5 = 20 accumulators
/// plus 5 rows of V stay within AVX-512's 32 registers; head dims 64 and 80 are one strip.
const MAX_VALUE_VECTORS: usize = 5;

/// The register tile both kernels are made of: `c[r, c0..c0 + W] = Σ_{i < n} a[r, i] · b[i, c0..c0 + W]`
/// for r < QB, with `a` `[QB, lda]`, `b` `[n, ldb]` and `c` `[QB, ldb]` row-major. Each `b` row is
/// multiply-added into QB·W/16 accumulator vectors with `a`'s value broadcast: no sum is reduced
/// across a vector.
#[inline(always)]
fn mac_tile<const W: usize>(a: &[f32], lda: usize, b: &[f32], ldb: usize, n: usize, c0: usize, c: &mut [f32]) {
    let mut acc = [[0f32; W]; QB];
    for i in 0..n {
        let br: &[f32; W] = b[i * ldb + c0..i * ldb + c0 + W].try_into().expect("tile");
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = a[r * lda + i];
            for (acc, y) in acc.iter_mut().zip(br) {
                *acc = fma(x, *y, *acc);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        c[r * ldb + c0..r * ldb + c0 + W].copy_from_slice(acc);
    }
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
