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

pub fn activate(x: &mut [f32], a: Activation) {
    let f: fn(f32) -> f32 = match a {
        Activation::GeluErf => |v| (0.5 * v as f64 * (1.0 + erf(v as f64 / std::f64::consts::SQRT_2))) as f32,
        Activation::GeluTanh => |v| {
            let v = v as f64;
            (0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh())) as f32
        },
        Activation::QuickGelu => |v| v / (1.0 + (-1.702 * v).exp()),
        Activation::Silu => |v| v / (1.0 + (-v).exp()),
    };
    if x.len() >= 4096 {
        x.par_chunks_mut(1024).for_each(|c| c.iter_mut().for_each(|v| *v = f(*v)));
    } else {
        x.iter_mut().for_each(|v| *v = f(*v));
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
    // One f32 exp per element (as torch computes it), the normaliser summed in f64.
    let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    let mut sum = 0f64;
    for v in row.iter_mut() {
        let e = (*v - max).exp();
        *v = e;
        sum += e as f64;
    }
    let inv = (1.0 / sum) as f32;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// Scaled dot-product attention.
///
/// A value read as f32 where it is used: f32 itself, or f16 (one `vcvtph2ps` per 8 values where F16C
/// is compiled in). Widening inside a loop beats widening a short row into a buffer first, which
/// costs more in calls than the arithmetic it feeds.
pub trait Widen: Copy {
    fn widen(self) -> f32;
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
}

/// `Σ a[i]·b[i]`, `b` widened as it is read, in 16 independent f32 lanes (summed pairwise at the end),
/// so the compiler can keep them in SIMD registers; a plain sequential sum cannot be vectorised
/// without reassociation.
#[inline]
pub fn dot_widen<T: Widen>(a: &[f32], b: &[T]) -> f32 {
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

    #[test]
    fn layer_norm_normalises() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        layer_norm(&mut x, 4, &[1.0; 4], None, 0.0);
        let mean: f32 = x.iter().sum::<f32>() / 4.0;
        let var: f32 = x.iter().map(|v| v * v).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5);
    }

    #[test]
    fn dot_widen_matches_f64_reference_at_every_length() {
        for n in [0usize, 1, 15, 16, 17, 64, 80, 129] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).cos()).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let scale: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64 * *y as f64).abs()).sum::<f64>().max(1.0);
            assert!((dot_widen(&a, &b) as f64 - exact).abs() <= 1e-6 * scale, "n={n}");
            // f16 operands: the reference is the scalar sum over the same rounded values.
            let b16: Vec<half::f16> = b.iter().map(|x| half::f16::from_f32(*x)).collect();
            let exact16: f64 = a.iter().zip(&b16).map(|(x, y)| *x as f64 * y.to_f64()).sum();
            assert!((dot_widen(&a, &b16) as f64 - exact16).abs() <= 1e-6 * scale, "f16 n={n}");
        }
    }
}
