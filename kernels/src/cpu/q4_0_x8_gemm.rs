//! Several tokens through a q4_0 weight held in ggml's interleaved 8-row layout (`CPU_REPACK`,
//! `block_q4_0x8`; [`super::q4_0_x8_matvec`] describes it): our own AVX2 GEMM for prefill, in place
//! of ggml's `gemm_q4_0_8x8_q8_0`, on the same bytes.
//!
//! As [`super::q4k_x8_gemm`] does for q4_K: each tile's nibbles are unpacked once per token chunk
//! (here into registers: a tile is 8 rows × 32 values), and every token of the chunk multiplies
//! them exactly as the one-token kernel does — unsigned nibbles against broadcasts of its 8
//! activation bytes, `8 · Σ x` per block taken off the exact integer sums, the float steps in the
//! same order. So **every output equals what [`super::q4_0_x8_matvec`] gives that token alone**
//! (which equals ggml's `gemv`).
//!
//! Dims: T = tokens, K = n_cols (multiple of 32), N = rows of the packed tensor (multiple of 8),
//! KB = K / 32, `n_out` ≤ N the rows kept.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::matmul::token_count;
use super::q4_0_x8_matvec::{OFF_QS, Q8_0_BYTES, QK, TILE_BYTES, TILE_ROWS, TILING};
use super::row_tiles::{avx2_available, checked, gemm_by_tiles};
use crate::quant::{self, GgmlType, QuantError};

/// `out[t, r] = Σ_k W[r, k] · x[t, k]` for the first `n_out` of the `n_rows` rows of a q4_0 weight
/// in ggml's interleaved 8-row layout (`packed` starts with its `n_rows / 8 · K / 32` tiles), `x`
/// T rows of K, `out` T rows of `n_out`.
pub fn matmul(
    packed: &[u8],
    n_rows: usize,
    k: usize,
    n_out: usize,
    x: &[f32],
    out: &mut [MaybeUninit<f32>],
) -> Result<(), QuantError> {
    let t = token_count(k, n_out, x.len(), out.len())?;
    let (packed, tile_row_bytes) =
        checked(GgmlType::Q4_0, "q4_0 AVX2 GEMM (this CPU)", avx2_available(), packed, n_rows, k, n_out, TILING)?;
    let kb = k / QK;
    // q8_0 activations of all tokens (K is whole blocks), and each block's `8 · Σ x_j`
    let mut act = vec![0u8; t * kb * Q8_0_BYTES];
    act.par_chunks_mut(kb * Q8_0_BYTES)
        .zip(x.par_chunks(k))
        .try_for_each(|(a, xr)| quant::quantize_activation(GgmlType::Q8_0, xr, a))?;
    let offset8: Vec<i32> =
        act.chunks_exact(Q8_0_BYTES).map(|b| 8 * b[2..].iter().map(|&v| v as i8 as i32).sum::<i32>()).collect();
    gemm_by_tiles(packed, tile_row_bytes, n_out, t, kb * Q8_0_BYTES, out, |tile, toks, y| {
        let a = &act[toks.start * kb * Q8_0_BYTES..toks.end * kb * Q8_0_BYTES];
        tile_gemm(tile, a, &offset8[toks.start * kb..toks.end * kb], y)
    });
    Ok(())
}

/// `y[tok][r]` for the 8 rows of one row tile (`tile`: its KB blocks) and each token of a chunk
/// (`act`: their q8_0 rows, `offset8`: their blocks' `8 · Σ x`).
fn tile_gemm(tile: &[u8], act: &[u8], offset8: &[i32], y: &mut [[f32; TILE_ROWS]]) {
    let kb = tile.len() / TILE_BYTES;
    let tc = y.len();
    assert!(
        tile.len() == kb * TILE_BYTES && act.len() == tc * kb * Q8_0_BYTES && offset8.len() == tc * kb,
        "tile / activation sizes"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `matmul` (the only caller) passed `avx2_available()` to `row_tiles::checked`, which
    // refuses when it is false, i.e. the CPU has every feature the function is compiled for; the
    // lengths its raw reads rely on were asserted just above.
    unsafe {
        x86::tile_gemm(tile.as_ptr(), kb, act.as_ptr(), offset8.as_ptr(), y)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("checked() refuses without AVX2");
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// # Safety
    /// AVX2, FMA and F16C; `tile` points at `kb` tiles of [`TILE_BYTES`], `act` at `y.len() · kb`
    /// q8_0 blocks and `offset8` at `y.len() · kb` i32 (token-major).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_gemm(tile: *const u8, kb: usize, act: *const u8, offset8: *const i32, y: &mut [[f32; TILE_ROWS]]) {
        // SAFETY: (whole body) block i of the tile at i·TILE_BYTES (< kb·TILE_BYTES); token j's
        // block i at (j·kb + i)·Q8_0_BYTES and its offset at j·kb + i (< the lengths above).
        // Unaligned loads throughout.
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            let flip = _mm256_set1_epi8(0x88u8 as i8);
            let ones = _mm256_set1_epi16(1);
            // `hadd` of (rows 0..4, rows 4..8) leaves rows in the order 0 1 4 5 2 3 6 7; the same
            // permutation puts them back
            let hadd_order = _mm256_set_epi32(7, 6, 3, 2, 5, 4, 1, 0);
            let tc = y.len();
            let mut acc = vec![_mm256_setzero_ps(); tc]; // per token, rows in hadd order
            for i in 0..kb {
                let b = tile.add(i * TILE_BYTES);
                // the block's nibbles, unsigned: per 8-byte run u, (rows 0..4, rows 4..8) × (low, high)
                let mut q = [[_mm256_setzero_si256(); 4]; 2];
                for (u, q) in q.iter_mut().enumerate() {
                    let p = b.add(OFF_QS + 64 * u);
                    let v03 = _mm256_xor_si256(_mm256_loadu_si256(p as *const _), flip);
                    let v47 = _mm256_xor_si256(_mm256_loadu_si256(p.add(32) as *const _), flip);
                    *q = [
                        _mm256_and_si256(v03, low),
                        _mm256_and_si256(v47, low),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(v03), low),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(v47), low),
                    ];
                }
                let d = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_loadu_si128(b as *const _)), hadd_order);
                for (j, acc) in acc.iter_mut().enumerate() {
                    let a = act.add((j * kb + i) * Q8_0_BYTES);
                    let ax = a.add(2);
                    let (mut s03, mut s47) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    for (u, q) in q.iter().enumerate() {
                        let xlo = _mm256_set1_epi64x((ax.add(8 * u) as *const i64).read_unaligned());
                        let xhi = _mm256_set1_epi64x((ax.add(16 + 8 * u) as *const i64).read_unaligned());
                        s03 = _mm256_add_epi16(s03, _mm256_maddubs_epi16(q[0], xlo));
                        s47 = _mm256_add_epi16(s47, _mm256_maddubs_epi16(q[1], xlo));
                        s03 = _mm256_add_epi16(s03, _mm256_maddubs_epi16(q[2], xhi));
                        s47 = _mm256_add_epi16(s47, _mm256_maddubs_epi16(q[3], xhi));
                    }
                    let sums = _mm256_hadd_epi32(_mm256_madd_epi16(s03, ones), _mm256_madd_epi16(s47, ones));
                    let sums = _mm256_sub_epi32(sums, _mm256_set1_epi32(*offset8.add(j * kb + i)));
                    let dx = _mm256_cvtph_ps(_mm_set1_epi16((a as *const i16).read_unaligned()));
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(d, dx), *acc);
                }
            }
            for (y, acc) in y.iter_mut().zip(&acc) {
                _mm256_storeu_ps(y.as_mut_ptr(), _mm256_permutevar8x32_ps(*acc, hadd_order));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::row_tiles::testing;
    use crate::QuantType;

    #[test]
    fn each_token_equals_the_one_token_kernel_and_matches_ggmls_gemm() {
        // 40 and 72 rows: odd numbers of row tiles; 2560 columns with 200 tokens cross a token chunk
        // (48 tokens of K = 2560 fill row_tiles' CHUNK_ACT_BYTES); under 8 tokens they go one by one
        // (X8_GEMM_MIN_TOKENS_Q4_0)
        let cases = [(64, 512, 2), (40, 512, 9), (72, 32, 5), (32, 2560, 200), (16, 1056, 17)];
        testing::each_token_as_alone_and_near_ggml(QuantType::Q4_0, &cases);
    }

    #[test]
    fn wrong_shapes_are_refused() {
        testing::gemm_refuses_wrong_shapes(super::matmul, super::TILING);
    }
}
