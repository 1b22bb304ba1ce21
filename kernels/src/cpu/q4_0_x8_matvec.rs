//! One token through a q4_0 weight held in ggml's interleaved 8-row layout (`CPU_REPACK`,
//! `block_q4_0x8`: what [`super::packed`] gives a q4_0 weight on an AVX2 CPU without AMX): our own
//! AVX2 matvec, used in place of ggml's `gemv_q4_0_8x8_q8_0` for decode. Same bytes, so prefill keeps
//! ggml's interleaved GEMM and no second copy of the weight exists.
//!
//! Why our own: ggml's one-token kernel widens each nibble to a signed byte with a table shuffle,
//! multiplies signed by signed bytes (sign tricks: two more operations per multiply), and lines the
//! interleaved rows up with a blend and two shuffles per multiply. Here the nibbles stay unsigned
//! (`q + 8`, the file's own values) and meet broadcasts of the 8 activation bytes they multiply (a
//! load, no shuffle); `8 · Σ x` per block, computed once per call, is taken off the integer sums, so
//! they are exact, as in [`super::q4k_x8_matvec`]. From DRAM each line read asks L2 for the same line
//! [`PREFETCH_AHEAD`] on.
//!
//! The layout (ggml-cpu repack.cpp, `make_block_q4_0x8`; pinned with llama-cpp-sys-2, and the tests
//! below compare with ggml's own kernel on it): 8 weight rows × 32 columns make a tile of
//! [`TILE_BYTES`]; tiles are stored row-tile-major. Inside a tile:
//!
//! | bytes    | what                                                                               |
//! |----------|------------------------------------------------------------------------------------|
//! | 0..16    | d, f16 `[r]`                                                                       |
//! | 16..144  | quants: for each 8-byte run `u` (64 B), for rows r = 0..8, 8 bytes whose low       |
//! |          | nibbles are values `8u + 0..8` and high nibbles `16 + 8u + 0..8`, each `q + 8` with |
//! |          | its top bit flipped (ggml XORs 0x88 so that its table reads them as signed)        |
//!
//! Per row r and block: `y_r += d_r·d_x·Σ_j q_rj·x_j` with x in q8_0 (d_x, int8 x_j); the integer
//! sums are exact and the float steps are ggml's, in its order, so the outputs equal its kernel's.
//!
//! Dims: K = n_cols (multiple of 32), N = rows of the packed tensor (multiple of 8), KB = K / 32.

use super::row_tiles::{avx2_available, checked, for_each_group, Tiling};
use crate::quant::{self, GgmlType, QuantError};

/// Weight rows per tile (ggml's interleave width).
pub const TILE_ROWS: usize = 8;
/// Values per q4_0 / q8_0 block (one tile's columns).
pub(super) const QK: usize = 32;
pub(super) const OFF_QS: usize = 2 * TILE_ROWS;
/// Bytes of one 8-row × 32-column tile.
pub const TILE_BYTES: usize = OFF_QS + QK / 2 * TILE_ROWS;
pub(super) const TILING: Tiling = Tiling { rows: TILE_ROWS, qk: QK, bytes: TILE_BYTES };
/// q8_0 block: d (f16), 32 int8 quants.
pub(super) const Q8_0_BYTES: usize = 2 + QK;
/// How far ahead of the bytes being read, in a row of tiles, the kernel asks L2 (T1) for more: one
/// prefetch per 64 bytes read, as in [`super::q4k_x8_matvec`] (about 2 KiB on).
const PREFETCH_AHEAD: usize = 16 * TILE_BYTES;

/// `out[r] = Σ_k W[r, k] · x[k]` for the first `out.len()` of the `n_rows` rows of a q4_0 weight in
/// ggml's interleaved 8-row layout (`packed` starts with its `n_rows / 8 · K / 32` tiles).
pub fn matvec(packed: &[u8], n_rows: usize, x: &[f32], out: &mut [f32]) -> Result<(), QuantError> {
    let k = x.len();
    let (packed, tile_row_bytes) =
        checked(GgmlType::Q4_0, "q4_0 AVX2 matvec (this CPU)", avx2_available(), packed, n_rows, k, out.len(), TILING)?;
    let kb = k / QK;
    // Activations in q8_0; each block's `8 · Σ x_j` (the offset the unsigned nibbles carry).
    let mut act = vec![0u8; kb * Q8_0_BYTES];
    quant::quantize_activation(GgmlType::Q8_0, x, &mut act)?;
    let offset8: Vec<i32> =
        act.chunks_exact(Q8_0_BYTES).map(|b| 8 * b[2..].iter().map(|&v| v as i8 as i32).sum::<i32>()).collect();
    for_each_group(packed, TILE_ROWS, tile_row_bytes, out, 1, |tile, rows| {
        let mut y = [0f32; TILE_ROWS];
        tile_dot(tile, &act, &offset8, &mut y);
        rows.copy_from_slice(&y[..rows.len()]);
    });
    Ok(())
}

/// The 8 outputs of one row tile (all `KB` blocks of it, contiguous in `tile`).
fn tile_dot(tile: &[u8], act: &[u8], offset8: &[i32], y: &mut [f32; TILE_ROWS]) {
    let kb = act.len() / Q8_0_BYTES;
    assert!(tile.len() == kb * TILE_BYTES && offset8.len() == kb, "tile / activation sizes");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `matvec` (the only caller) passed `avx2_available()` to `row_tiles::checked`, which
    // refuses when it is false, i.e. the CPU has every feature the function is compiled for; the
    // lengths its raw reads rely on were asserted just above.
    unsafe {
        x86::tile_dot(tile.as_ptr(), act.as_ptr(), offset8.as_ptr(), kb, y)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("checked() refuses without AVX2");
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `tile` points at `kb` tiles of [`TILE_BYTES`], `act` at `kb`
    /// q8_0 blocks and `offset8` at `kb` i32.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_dot(tile: *const u8, act: *const u8, offset8: *const i32, kb: usize, y: &mut [f32; TILE_ROWS]) {
        // SAFETY: (whole body) every pointer offset stays inside the ranges the caller guarantees:
        // tile bytes < kb·TILE_BYTES, act bytes < kb·Q8_0_BYTES, offset8 < kb. Prefetch addresses
        // may lie past the end (wrapping_add, never dereferenced; a prefetch never faults).
        // Unaligned loads throughout.
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            let flip = _mm256_set1_epi8(0x88u8 as i8);
            let ones = _mm256_set1_epi16(1);
            // `hadd` of (rows 0..4, rows 4..8) leaves rows in the order 0 1 4 5 2 3 6 7; the same
            // permutation puts them back.
            let hadd_order = _mm256_set_epi32(7, 6, 3, 2, 5, 4, 1, 0);
            let mut acc = _mm256_setzero_ps(); // rows in hadd order
            for i in 0..kb {
                let b = tile.add(i * TILE_BYTES);
                let a = act.add(i * Q8_0_BYTES);
                let ax = a.add(2);
                let ahead = b.wrapping_add(PREFETCH_AHEAD);
                // a tile is 144 bytes: ask for the lines of the tile PREFETCH_AHEAD on, each line once
                // over the tiles that start in it (a tile's first byte and the line after its start)
                _mm_prefetch::<_MM_HINT_T1>(ahead as *const i8);
                _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(64) as *const i8);
                _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(128) as *const i8);
                // i16 sums, four per row: rows 0..4 and rows 4..8
                let (mut s03, mut s47) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                for u in 0..2 {
                    let q = b.add(OFF_QS + 64 * u);
                    let v03 = _mm256_xor_si256(_mm256_loadu_si256(q as *const _), flip);
                    let v47 = _mm256_xor_si256(_mm256_loadu_si256(q.add(32) as *const _), flip);
                    let xlo = _mm256_set1_epi64x((ax.add(8 * u) as *const i64).read_unaligned());
                    let xhi = _mm256_set1_epi64x((ax.add(16 + 8 * u) as *const i64).read_unaligned());
                    s03 = _mm256_add_epi16(s03, _mm256_maddubs_epi16(_mm256_and_si256(v03, low), xlo));
                    s47 = _mm256_add_epi16(s47, _mm256_maddubs_epi16(_mm256_and_si256(v47, low), xlo));
                    let h03 = _mm256_and_si256(_mm256_srli_epi16::<4>(v03), low);
                    let h47 = _mm256_and_si256(_mm256_srli_epi16::<4>(v47), low);
                    s03 = _mm256_add_epi16(s03, _mm256_maddubs_epi16(h03, xhi));
                    s47 = _mm256_add_epi16(s47, _mm256_maddubs_epi16(h47, xhi));
                }
                let sums = _mm256_hadd_epi32(_mm256_madd_epi16(s03, ones), _mm256_madd_epi16(s47, ones));
                let sums = _mm256_sub_epi32(sums, _mm256_set1_epi32(*offset8.add(i)));
                let d = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_loadu_si128(b as *const _)), hadd_order);
                let dx = _mm256_cvtph_ps(_mm_set1_epi16((a as *const i16).read_unaligned()));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(d, dx), acc);
            }
            _mm256_storeu_ps(y.as_mut_ptr(), _mm256_permutevar8x32_ps(acc, hadd_order));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::row_tiles::testing;
    use super::*;
    use crate::QuantType;

    /// Same integer sums and float steps as ggml's kernel, same activation quantiser: equal.
    const SAME_KERNEL_REL_TOL: f32 = 0.0;
    /// Against `vec_dot` (another summation order, same quantised values).
    const VEC_DOT_REL_TOL: f32 = 1e-4;

    #[test]
    fn matches_ggmls_kernel_and_vec_dot_on_the_same_packed_bytes() {
        // 72 rows: 9 row tiles (one thread gets an odd count); 2560 columns: Phi-2's hidden size
        let shapes = [(64, 512), (32, 2560), (72, 32), (160, 1056)];
        testing::against_ggml_and_vec_dot(QuantType::Q4_0, "CPU_REPACK", &shapes, SAME_KERNEL_REL_TOL, VEC_DOT_REL_TOL);
    }

    #[test]
    fn wrong_shapes_are_refused() {
        testing::refuses_wrong_shapes(matvec, TILING, avx2_available());
    }
}
