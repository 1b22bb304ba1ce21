//! f32 activation ops on the CPU: norms, activations, rotary embedding, attention, softmax.
//! Plain loops the compiler vectorises; rows in parallel where there is enough work.
//!
//! Matrices are row-major `[rows, cols]` slices; attention works on `[T, n_head·head_dim]` rows.

use rayon::prelude::*;

/// Rows per rayon task below which work stays on the calling thread.
const MIN_PAR_ROWS: usize = 4;

fn for_rows(x: &mut [f32], cols: usize, f: impl Fn(&mut [f32]) + Sync + Send) {
    if x.len() / cols.max(1) >= MIN_PAR_ROWS {
        x.par_chunks_mut(cols).for_each(f);
    } else {
        x.chunks_mut(cols).for_each(f);
    }
}

/// LayerNorm over each row: `(x - mean) / sqrt(var + eps) · w + b` (biased variance, as torch).
pub fn layer_norm(x: &mut [f32], cols: usize, w: &[f32], b: Option<&[f32]>, eps: f32) {
    for_rows(x, cols, |row| {
        let n = cols as f64;
        let mean = row.iter().map(|v| *v as f64).sum::<f64>() / n;
        let var = row.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for (i, v) in row.iter_mut().enumerate() {
            let y = ((*v as f64 - mean) * inv) as f32 * w[i];
            *v = y + b.map_or(0.0, |b| b[i]);
        }
    });
}

/// RMSNorm over each row: `x · rsqrt(mean(x²) + eps) · w` (Qwen's formula, computed in f32 or better).
pub fn rms_norm(x: &mut [f32], cols: usize, w: &[f32], eps: f32) {
    for_rows(x, cols, |row| {
        let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / cols as f64;
        let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
        for (i, v) in row.iter_mut().enumerate() {
            *v = (*v * inv) * w[i];
        }
    });
}

/// Adds a bias vector to every row.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    let cols = bias.len();
    for_rows(x, cols, |row| row.iter_mut().zip(bias).for_each(|(v, b)| *v += b));
}

/// `x += y` element-wise.
pub fn add(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

/// `x *= y` element-wise.
pub fn mul(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a *= b);
}

/// `silu(g) · u` per row of `h [T, 2F]` whose rows are `[g (F values), u (F values)]` (SwiGLU's gate
/// and up multiplied as one stacked matrix) → `[T, F]`. The same f32 operations, in the same order, as
/// [`activate`] with [`Activation::Silu`] on g followed by [`mul`] by u.
pub fn silu_mul_halves(h: &[f32], f: usize) -> Vec<f32> {
    let mut out = vec![0f32; if f == 0 { 0 } else { h.len() / 2 }];
    if f == 0 {
        return out;
    }
    out.par_chunks_mut(f).zip(h.par_chunks(2 * f)).for_each(|(o, row)| {
        let (g, u) = row.split_at(f);
        for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
            *o = silu(*g) * u;
        }
    });
    out
}

/// Element-wise activations of the supported models.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU, `x·Φ(x)` (torch `nn.GELU()`): the projector.
    GeluErf,
    /// Tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`): Phi-2's FFN, SigLIP.
    GeluTanh,
    /// `x·σ(1.702x)`: CLIP.
    QuickGelu,
    /// `x·σ(x)`: StableLM, Qwen.
    Silu,
}

/// erf with |error| < 1.2e-7 (Numerical Recipes' erfc Chebyshev fit), in f64.
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        1.0 - r
    } else {
        r - 1.0
    }
}

/// `e^x` in f32 without a libm call, so that loops over it vectorise: `2^n · e^r` with
/// `n = round(x·log₂e)`, `r = x − n·ln2` (ln2 split in two for an exact product), `|r| ≤ ln2/2`, and
/// `e^r` by its Taylor polynomial to r⁷ (truncation < 6e-9 relative). Relative error a few f32 ulps
/// (test `exp_f32_is_within_a_few_ulps`); inputs are clamped to the finite, normal range of results.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // SHIFTER = 1.5·2²³: adding it to |v| < 2²² rounds v to an integer (ties to even) held in the low
    // mantissa bits, so n and 2ⁿ need no float-to-int cast (Rust's saturating `as i32` does not vectorise).
    const SHIFTER: f32 = 12_582_912.0;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75; // ln 2 rounded to 16 significant bits: n·LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6; // ln 2 − LN2_HI
    let x = x.clamp(-87.0, 88.3); // n stays in [-126, 127]: a normal power of two
    let t = x * LOG2E + SHIFTER; // bits: 0x4B40_0000 + n
    let n = t - SHIFTER; // = round_ties_even(x·log₂e), exactly
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // (n + 127) << 23, read from t's bits: the shift drops 0x4B40_0000's bits, n + 127 ∈ [1, 254]
    p * f32::from_bits(t.to_bits().wrapping_add(127) << 23)
}

/// `v·σ(v)`, as `v / (1 + e^−v)` (one definition: [`activate`] and [`silu_mul_halves`] must agree bit
/// for bit).
#[inline(always)]
fn silu(v: f32) -> f32 {
    v / (1.0 + exp_f32(-v))
}

/// `f` on every element: monomorphised per activation so the loop inlines and vectorises.
fn map_all(x: &mut [f32], f: impl Fn(f32) -> f32 + Sync + Send) {
    if x.len() >= 4096 {
        x.par_chunks_mut(4096).for_each(|c| c.iter_mut().for_each(|v| *v = f(*v)));
    } else {
        x.iter_mut().for_each(|v| *v = f(*v));
    }
}

pub fn activate(x: &mut [f32], a: Activation) {
    match a {
        Activation::GeluErf => map_all(x, |v| (0.5 * v as f64 * (1.0 + erf(v as f64 / std::f64::consts::SQRT_2))) as f32),
        // 0.5·v·(1 + tanh(u)) = v·σ(2u), u = √(2/π)·(v + 0.044715·v³).
        Activation::GeluTanh => map_all(x, |v| {
            let u = 0.797_884_6 * (v + 0.044_715 * v * v * v);
            v / (1.0 + exp_f32(-2.0 * u))
        }),
        Activation::QuickGelu => map_all(x, |v| v / (1.0 + exp_f32(-1.702 * v))),
        Activation::Silu => map_all(x, silu),
    }
}

/// NeoX-style rotary embedding on the first `rot_dims` of every head: within them, the first half
/// rotates against the second half (`rotate_half`). `x`: `[T, n_head·head_dim]`, positions per row.
pub fn rope_neox(x: &mut [f32], n_head: usize, head_dim: usize, rot_dims: usize, positions: &[usize], base: f32) {
    let half = rot_dims / 2;
    // As transformers computes it, in float32 whatever the model dtype: inv_freq = 1 / base^(2i/dim),
    // angle = position · inv_freq, then cos and sin of the float32 angle.
    let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / base.powf((2 * i) as f32 / rot_dims as f32)).collect();
    x.par_chunks_mut(n_head * head_dim).zip(positions.par_iter()).for_each(|(row, &pos)| {
        for h in 0..n_head {
            let head = &mut row[h * head_dim..h * head_dim + rot_dims];
            for i in 0..half {
                let angle = pos as f32 * inv_freq[i];
                let (s, c) = (angle.sin() as f64, angle.cos() as f64);
                let (a, b) = (head[i] as f64, head[i + half] as f64);
                head[i] = (a * c - b * s) as f32;
                head[i + half] = (b * c + a * s) as f32;
            }
        }
    });
}

/// Softmax of a row, in place.
pub fn softmax(row: &mut [f32]) {
    // One f32 exp per element (as torch computes it), vectorised; the normaliser summed in f64. Both
    // reductions keep independent lanes (max: 16 f32, sum: 8 f64): a single running max or sum is a
    // chain the compiler may not reorder, one latency per element (lanes: 18.4 → 17.2 ms on
    // `cargo bench --bench kernels -- attention/batched_prefill_512_phi2`).
    const MAX_LANES: usize = 16;
    const SUM_LANES: usize = 8;
    let mut lanes = [f32::NEG_INFINITY; MAX_LANES];
    let chunks = row.chunks_exact(MAX_LANES);
    let rest = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    for c in chunks {
        lanes.iter_mut().zip(c).for_each(|(m, v)| *m = m.max(*v));
    }
    let max = lanes.iter().fold(rest, |m, v| m.max(*v));
    row.iter_mut().for_each(|v| *v = exp_f32(*v - max));
    let mut sums = [0f64; SUM_LANES];
    let chunks = row.chunks_exact(SUM_LANES);
    let rest: f64 = chunks.remainder().iter().map(|&e| e as f64).sum();
    for c in chunks {
        sums.iter_mut().zip(c).for_each(|(s, e)| *s += *e as f64);
    }
    let sum = sums.iter().sum::<f64>() + rest;
    let inv = (1.0 / sum) as f32;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// A value read as f32 where it is used: f32 itself, or f16 (converted 16 at a time with AVX-512,
/// else one by one). Widening inside a loop beats widening a short row into a buffer first, which
/// costs more in calls than the arithmetic it feeds.
pub trait Widen: Copy {
    fn widen(self) -> f32;

    /// `Σ a[i]·b[i]` over the shorter of the two ([`dot_widen`]).
    #[inline]
    fn dot(a: &[f32], b: &[Self]) -> f32 {
        dot_lanes(a, b)
    }

    /// `o[i] += w·b[i]` over the shorter of the two.
    #[inline]
    fn axpy(o: &mut [f32], w: f32, b: &[Self]) {
        o.iter_mut().zip(b).for_each(|(a, v)| *a += w * v.widen());
    }
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for half::f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }

    /// With AVX-512 16 values per conversion and fused multiply-add, with AVX2 + F16C 8
    /// ([`f16_simd`]): the one-token attention reads the f16 KV cache through these two, and the
    /// generic loop converted 4 values at a time.
    #[inline]
    fn dot(a: &[f32], b: &[Self]) -> f32 {
        if let Some(width) = f16_simd::best() {
            return f16_simd::dot(width, a, b);
        }
        dot_lanes(a, b)
    }

    #[inline]
    fn axpy(o: &mut [f32], w: f32, b: &[Self]) {
        if let Some(width) = f16_simd::best() {
            return f16_simd::axpy(width, o, w, b);
        }
        o.iter_mut().zip(b).for_each(|(a, v)| *a += w * v.to_f32());
    }
}

/// f16 dot product and axpy in SIMD registers (AVX-512, or AVX2 + F16C).
mod f16_simd;

/// `Σ a[i]·b[i]`, `b` widened as it is read ([`Widen::dot`]).
#[inline]
pub fn dot_widen<T: Widen>(a: &[f32], b: &[T]) -> f32 {
    T::dot(a, b)
}

/// [`dot_widen`]'s portable form: 16 independent f32 lanes (summed pairwise at the end), so the
/// compiler can keep them in SIMD registers; a plain sequential sum cannot be vectorised without
/// reassociation.
#[inline]
fn dot_lanes<T: Widen>(a: &[f32], b: &[T]) -> f32 {
    const LANES: usize = 16;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l].widen();
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y.widen();
    }
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0] + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_gelu_is_accurate() {
        // Reference values of x·Φ(x).
        for (x, want) in [(-3.0f32, -0.004_049_694), (-1.0, -0.158_655_25), (0.5, 0.345_731_38), (2.0, 1.954_499_7)] {
            let mut v = [x];
            activate(&mut v, Activation::GeluErf);
            assert!((v[0] - want).abs() < 1e-6, "gelu({x}) = {} want {want}", v[0]);
        }
    }

    /// A few f32 ulps (2⁻²³ ≈ 1.2e-7 each): range reduction and a 7th-degree polynomial.
    const EXP_REL_TOL: f64 = 4e-7;

    /// `exp_f32` before it took n from the shifter's bits: `round_ties_even` and a saturating cast.
    fn exp_f32_by_cast(x: f32) -> f32 {
        let x = x.clamp(-87.0, 88.3);
        let n = (x * std::f32::consts::LOG2_E).round_ties_even();
        let r = (x - n * 0.693_145_75) - n * 1.428_606_8e-6;
        let p = 1.0
            + r * (1.0
                + r * (1.0 / 2.0
                    + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
        p * f32::from_bits(((n as i32 + 127) as u32) << 23)
    }

    #[test]
    fn exp_f32_equals_the_cast_version_bit_for_bit() {
        for i in -1_000_000..=1_000_000 {
            let x = i as f32 * 1e-4;
            assert_eq!(exp_f32(x).to_bits(), exp_f32_by_cast(x).to_bits(), "x = {x}");
        }
        for x in [-1e4, -87.5, 88.5, 1e4, 0.5 * std::f32::consts::LN_2, -0.5 * std::f32::consts::LN_2] {
            assert_eq!(exp_f32(x).to_bits(), exp_f32_by_cast(x).to_bits(), "x = {x}");
        }
    }

    #[test]
    fn exp_f32_is_within_a_few_ulps() {
        let mut worst = 0f64;
        for i in -870_000..=883_000 {
            let x = i as f32 * 1e-4;
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst <= EXP_REL_TOL, "worst relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1e4) >= 0.0 && exp_f32(-1e4) < 1e-37 && exp_f32(1e4).is_finite());
    }

    /// f32 evaluation of the tanh-GELU against its f64 formula: a few ulps of max(1, |x|).
    const GELU_TANH_TOL: f64 = 1e-6;

    #[test]
    fn tanh_gelu_silu_and_quick_gelu_match_f64_formulas() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.005;
            let xd = x as f64;
            let cases = [
                (
                    Activation::GeluTanh,
                    0.5 * xd * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd.powi(3))).tanh()),
                ),
                (Activation::Silu, xd / (1.0 + (-xd).exp())),
                (Activation::QuickGelu, xd / (1.0 + (-1.702 * xd).exp())),
            ];
            for (a, want) in cases {
                let mut v = [x];
                activate(&mut v, a);
                assert!((v[0] as f64 - want).abs() <= GELU_TANH_TOL * xd.abs().max(1.0), "{a:?}({x}) = {} want {want}", v[0]);
            }
        }
    }

    #[test]
    fn layer_norm_normalises() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        layer_norm(&mut x, 4, &[1.0; 4], None, 0.0);
        let mean: f32 = x.iter().sum::<f32>() / 4.0;
        let var: f32 = x.iter().map(|v| v * v).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5);
    }

    /// One f32 rounding (a fused multiply-add may skip one of the scalar form's two).
    const AXPY_TOL: f32 = 2.0 * f32::EPSILON;

    #[test]
    fn dot_widen_matches_f64_reference_at_every_length() {
        for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 64, 80, 129] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).cos()).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let scale: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64 * *y as f64).abs()).sum::<f64>().max(1.0);
            assert!((dot_widen(&a, &b) as f64 - exact).abs() <= 1e-6 * scale, "n={n}");
            // f16 operands: the reference is the scalar sum over the same rounded values.
            let b16: Vec<half::f16> = b.iter().map(|x| half::f16::from_f32(*x)).collect();
            let exact16: f64 = a.iter().zip(&b16).map(|(x, y)| *x as f64 * y.to_f64()).sum();
            assert!((dot_widen(&a, &b16) as f64 - exact16).abs() <= 1e-6 * scale, "f16 n={n}");
            for width in f16_simd::supported() {
                let got = f16_simd::dot(width, &a, &b16) as f64;
                assert!((got - exact16).abs() <= 1e-6 * scale, "f16 {width:?} n={n}");
            }
        }
    }

    #[test]
    fn axpy_matches_the_scalar_form_at_every_length() {
        for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 64, 80, 129] {
            let b: Vec<half::f16> = (0..n).map(|i| half::f16::from_f32((i as f32 * 0.3).cos())).collect();
            let o0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin()).collect();
            let mut outs = vec![("dispatch".to_string(), o0.clone())];
            half::f16::axpy(&mut outs[0].1, 0.37, &b);
            for width in f16_simd::supported() {
                let mut o = o0.clone();
                f16_simd::axpy(width, &mut o, 0.37, &b);
                outs.push((format!("{width:?}"), o));
            }
            for (what, o) in &outs {
                for i in 0..n {
                    // one fused multiply-add against a multiply then an add: at most one rounding apart
                    let want = o0[i] + 0.37 * b[i].to_f32();
                    assert!((o[i] - want).abs() <= AXPY_TOL * want.abs().max(1.0), "{what} n={n} [{i}]: {} vs {want}", o[i]);
                }
            }
        }
    }
}
