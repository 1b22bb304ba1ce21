//! One token through a q8_0 weight in plain rows (the file's own layout): our own AVX2 matvec, used in
//! place of one ggml `vec_dot` call per row where no packed layout takes q8_0 (every x86 CPU without
//! AMX: ggml has no interleaved q8_0 layout there, so llama.cpp too runs `vec_dot` row by row).
//!
//! Why our own: the arithmetic per block is ggml's (`ggml_vec_dot_q8_0_q8_0`, AVX2 branch), but each
//! block read asks L2 for the bytes [`PREFETCH_AHEAD`] on in the thread's stretch of rows (`vec_dot`
//! leaves the stream to the hardware prefetcher), and there is no foreign call per row. Each row's
//! own steps are ggml's,
//! in its order: the outputs equal `vec_dot`'s bit for bit, and a token's outputs are the same
//! whatever other tokens share the call.
//!
//! Per row r and block b: `acc_r += (d_rb · d_xb) · Σ_j |q_rbj| · (x_bj · sign q_rbj)`, the integer
//! part in 16-bit pairs then 32-bit lanes (exact: `|q| ≤ 128`, `|x| ≤ 127`), `acc_r` eight f32
//! lanes summed at the end as ggml's `hsum_float_8` sums them.
//!
//! Dims: T = tokens, K = n_cols (multiple of 32), N = n_rows, KB = K / 32; a row is KB blocks of
//! [`Q8_0_BYTES`] (d f16, 32 int8 quants).

use rayon::prelude::*;

use super::matmul::{quantize_activations, token_count, QMatRef};
use super::row_tiles::avx2_available;
use crate::quant::{GgmlType, QuantError, QuantType};

/// Values per q8_0 block.
const QK: usize = 32;
/// q8_0 block: d (f16), 32 int8 quants.
const Q8_0_BYTES: usize = 2 + QK;
/// How far ahead of the block being read the kernel asks L2 (T1) for more: one prefetch per block.
/// A thread's rows are contiguous, so this runs on into its next row. Chosen among variants of this
/// kernel tried once and not kept (BENCHMARKS.md has their figures): 1 to 8 KiB ahead streamed
/// within 3 % of each other, 2 KiB best; four rows through each activation block together streamed
/// slower. The kept kernel against `vec_dot`: `cargo bench --bench kernels -- matvec_streaming/q8`.
const PREFETCH_AHEAD: usize = 2048;

/// Whether this CPU runs the kernel (AVX2, FMA, F16C).
pub fn available() -> bool {
    avx2_available()
}

/// `out[t, r] = Σ_k W[r, k] · x[t, k]` for a q8_0 `w` in plain rows, each token's outputs exactly
/// what it gets alone (so a batch of independent rows may share the call: the weight is read once).
pub fn matmul(w: QMatRef, x: &[f32], out: &mut [f32]) -> Result<(), QuantError> {
    let (n, k) = (w.n_rows, w.n_cols);
    if w.qtype != QuantType::Q8_0 || !available() {
        return Err(QuantError::Unsupported { op: "q8_0 AVX2 row matvec (this CPU and type)", qtype: w.qtype.ggml() });
    }
    if k == 0 || !k.is_multiple_of(QK) {
        return Err(QuantError::RowLength { qtype: GgmlType::Q8_0, n_per_row: k, block_size: QK });
    }
    let row_bytes = k / QK * Q8_0_BYTES;
    if w.data.len() != n * row_bytes {
        return Err(QuantError::Length { what: "weight bytes", expected: n * row_bytes, got: w.data.len() });
    }
    let t = token_count(k, n, x.len(), out.len())?;
    if n == 0 || t == 0 {
        return Ok(());
    }
    let act = quantize_activations(QuantType::Q8_0, x, k)?;
    // Outputs row-major [N, T] (one token: `out` itself), one contiguous run of rows per thread, so
    // each thread streams one region of the weight.
    let mut transposed = if t == 1 { Vec::new() } else { vec![0f32; n * t] };
    let by_row: &mut [f32] = if t == 1 { out } else { &mut transposed };
    let per_thread = n.div_ceil(rayon::current_num_threads().max(1));
    by_row.par_chunks_mut(per_thread * t).enumerate().for_each(|(c, chunk)| {
        let first = c * per_thread;
        for (r, row_out) in chunk.chunks_mut(t).enumerate() {
            let row = &w.data[(first + r) * row_bytes..(first + r + 1) * row_bytes];
            for (o, a) in row_out.iter_mut().zip(act.bytes.chunks_exact(act.row_bytes)) {
                *o = row_dot(row, a);
            }
        }
    });
    if t > 1 {
        out.par_chunks_mut(n).enumerate().for_each(|(tok, o)| {
            for (r, v) in o.iter_mut().enumerate() {
                *v = transposed[r * t + tok];
            }
        });
    }
    Ok(())
}

/// `row · a`: one weight row and one token's q8_0 activation row, both `KB` blocks.
fn row_dot(row: &[u8], a: &[u8]) -> f32 {
    assert!(row.len() == a.len() && a.len().is_multiple_of(Q8_0_BYTES), "row / activation sizes");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `matmul` (the only caller) returned early unless `available()`, i.e. the CPU has every
    // feature the function is compiled for; the lengths its raw reads rely on were asserted just above.
    unsafe {
        x86::row_dot(row.as_ptr(), a.as_ptr(), a.len() / Q8_0_BYTES)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("matmul refuses without AVX2");
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `w` and `a` point at `kb` q8_0 blocks each.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn row_dot(w: *const u8, a: *const u8, kb: usize) -> f32 {
        // SAFETY: (whole body) reads stay inside the `kb` blocks the caller guarantees; prefetch
        // addresses may lie past the end (wrapping_add, never dereferenced; a prefetch never
        // faults). Unaligned loads throughout.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let f16 = |p: *const u8| _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128((p as *const u16).read_unaligned() as i32)));
            let mut acc = _mm256_setzero_ps();
            for i in 0..kb {
                let (b, ab) = (w.add(i * Q8_0_BYTES), a.add(i * Q8_0_BYTES));
                _mm_prefetch::<_MM_HINT_T1>(b.wrapping_add(PREFETCH_AHEAD) as *const i8);
                let qx = _mm256_loadu_si256(b.add(2) as *const _);
                let qy = _mm256_loadu_si256(ab.add(2) as *const _);
                // ggml's mul_sum_i8_pairs_float: |q| (unsigned) times x with q's sign
                let dot = _mm256_maddubs_epi16(_mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx));
                let q = _mm256_cvtepi32_ps(_mm256_madd_epi16(dot, ones));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(f16(b) * f16(ab)), q, acc);
            }
            // ggml's hsum_float_8
            let mut s = _mm_add_ps(_mm256_extractf128_ps::<1>(acc), _mm256_castps256_ps128(acc));
            s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::matmul::matmul_vec_dot;
    use super::*;
    use crate::cpu::test_signal as signal;
    use crate::quant;

    /// Each row's integer sums, float steps and final sum are `vec_dot`'s, in its order: equal.
    const SAME_AS_VEC_DOT_TOL: f32 = 0.0;

    fn weights(n: usize, k: usize) -> Vec<u8> {
        // rows of very different magnitude and offset: block scales over their whole range
        let mut f = signal(n * k, 0.37);
        f.iter_mut().enumerate().for_each(|(i, v)| *v = *v * (1.0 + (i / 97 % 13) as f32) + ((i / 331) % 7) as f32 * 0.3);
        quant::quantize_rows_vec(QuantType::Q8_0, &f, k).unwrap()
    }

    #[test]
    fn equals_vec_dot_for_one_token_and_for_each_token_of_several() {
        if !available() {
            eprintln!("q8_0 AVX2 row kernel not run on this CPU");
            return;
        }
        // 37 rows: an odd split over the threads; 2560 columns: Phi-2's hidden size
        for (n, k, t) in [(37, 512, 1), (64, 2560, 1), (5, 32, 1), (37, 512, 3), (64, 2560, 2)] {
            let wq = weights(n, k);
            let w = QMatRef::new(&wq, QuantType::Q8_0, n, k).unwrap();
            let x: Vec<f32> = signal(t * k, 0.11).iter().map(|v| v * 3.0 - 0.5).collect();
            let (mut ours, mut theirs) = (vec![0f32; t * n], vec![0f32; t * n]);
            matmul(w, &x, &mut ours).unwrap();
            matmul_vec_dot(w, &x, &mut theirs).unwrap();
            let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "all-zero reference");
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!((a - b).abs() <= SAME_AS_VEC_DOT_TOL * scale, "{n}x{k} t={t} [{i}]: {a} vs {b}");
            }
        }
    }

    #[test]
    fn a_quant_of_minus_128_multiplies_as_minus_128() {
        // ggml's quantiser never writes -128, a file may: |q| is taken as an unsigned byte
        if !available() {
            return;
        }
        let k = 64;
        let mut wq = weights(4, k);
        for row in wq.chunks_mut(k / QK * Q8_0_BYTES) {
            row[2] = 0x80;
        }
        let w = QMatRef::new(&wq, QuantType::Q8_0, 4, k).unwrap();
        // all negative: -128 meets a negative activation, where an x-side sign trick would wrap
        let x: Vec<f32> = signal(k, 0.23).iter().map(|v| v - 1.5).collect();
        let (mut ours, mut theirs) = (vec![0f32; 4], vec![0f32; 4]);
        matmul(w, &x, &mut ours).unwrap();
        matmul_vec_dot(w, &x, &mut theirs).unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn wrong_shapes_and_types_are_refused() {
        if !available() {
            return;
        }
        let (n, k) = (8, 64);
        let wq = weights(n, k);
        let w = QMatRef::new(&wq, QuantType::Q8_0, n, k).unwrap();
        let x = vec![0.5f32; k];
        assert!(matmul(w, &x, &mut vec![0f32; n]).is_ok());
        assert!(matmul(w, &x[..k - 8], &mut vec![0f32; n]).is_err(), "activations not a whole row");
        assert!(matmul(w, &x, &mut vec![0f32; n + 1]).is_err(), "output length");
        let short = QMatRef { data: &wq[1..], ..w };
        assert!(matmul(short, &x, &mut vec![0f32; n]).is_err(), "short weight bytes");
        let odd = QMatRef { n_cols: 48, ..w };
        assert!(matmul(odd, &x[..48], &mut vec![0f32; n]).is_err(), "K off the block size");
        let q4 = quant::quantize_rows_vec(QuantType::Q4_0, &signal(n * k, 0.3), k).unwrap();
        let other = QMatRef::new(&q4, QuantType::Q4_0, n, k).unwrap();
        assert!(matmul(other, &x, &mut vec![0f32; n]).is_err(), "not q8_0");
    }
}
