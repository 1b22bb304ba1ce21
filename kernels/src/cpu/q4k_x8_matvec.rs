//! One token through a q4_K weight held in ggml's interleaved 8-row layout (`CPU_REPACK`,
//! `block_q4_Kx8`: what [`super::packed`] gives a q4_K weight on an AVX2 CPU without AMX): our own
//! AVX2 matvec, used in place of ggml's `gemv_q4_K_8x8_q8_K` for decode. Same bytes, so prefill keeps
//! ggml's interleaved GEMM and no second copy of the weight exists.
//!
//! Why our own: ggml's one-token kernel spends, per 32 bytes of weights, a blend and two shuffles
//! to line the interleaved rows up with the activations before each multiply; decode is memory-bound
//! only when the kernel consumes bytes well faster than DRAM delivers them. Here the activations
//! come to the weights instead: each 8-byte run of a row meets a broadcast of the 8 activation bytes
//! it multiplies (a load, no shuffle), and the rows' sums are lined up once per block, not per
//! multiply. From DRAM each line read asks L2 for the same line [`PREFETCH_AHEAD`] on.
//!
//! The layout (ggml-cpu repack.cpp, `make_block_q4_Kx8`; pinned with llama-cpp-sys-2, and the tests
//! below compare with ggml's own kernel on it): 8 weight rows × 256 columns make a tile of
//! [`TILE_BYTES`] (the 8 rows' q4_K blocks, regrouped); tiles are stored row-tile-major. Inside a tile:
//!
//! | bytes      | what                                                                          |
//! |------------|-------------------------------------------------------------------------------|
//! | 0..16      | d, f16 `[r]`                                                                  |
//! | 16..32     | dmin, f16 `[r]`                                                               |
//! | 32..128    | scales and mins, 6 bits each: 12 bytes per 32-value group `s` (see [`unpack`]) |
//! | 128..1152  | quants: for each 64 values `c` (256 B), for each 8-byte run `u` (64 B), for   |
//! |            | rows r = 0..8, 8 bytes whose low nibbles are values `64c + 8u + 0..8` and     |
//! |            | high nibbles `64c + 32 + 8u + 0..8`                                           |
//!
//! Per row r and block: `y_r += d_r·d_x·Σ_s scale_sr·Σ_{j∈s} q_j·x_j − dmin_r·d_x·Σ_s min_sr·Σ_{j∈s} x_j`
//! with x in q8_K (d_x, int8 x_j); the integer sums are exact and the float steps are ggml's, in its
//! order, so the outputs equal its kernel's.
//!
//! Dims: K = n_cols (multiple of 256), N = rows of the packed tensor (multiple of 8), KB = K / 256.

use super::row_tiles::{avx2_available, checked, for_each_group, q8k_activation, Tiling, Q8K_BYTES};
use crate::quant::{GgmlType, QuantError};

/// Weight rows per tile (ggml's interleave width).
pub const TILE_ROWS: usize = 8;
/// Values per q4_K / q8_K block (one tile's columns).
pub(super) const QK: usize = 256;
pub(super) const OFF_DMIN: usize = 2 * TILE_ROWS;
pub(super) const OFF_SCALES: usize = OFF_DMIN + 2 * TILE_ROWS;
pub(super) const OFF_QS: usize = OFF_SCALES + 12 * 8;
/// Bytes of one 8-row × 256-column tile.
pub const TILE_BYTES: usize = OFF_QS + QK / 2 * TILE_ROWS;
pub(super) const TILING: Tiling = Tiling { rows: TILE_ROWS, qk: QK, bytes: TILE_BYTES };
/// How far ahead of the line being read the kernel asks L2 (T1) for the same line of a later tile:
/// one prefetch per line read, spread through the loop, as in [`super::q4k_matvec`].
const PREFETCH_AHEAD: usize = 2 * TILE_BYTES;

/// `out[r] = Σ_k W[r, k] · x[k]` for the first `out.len()` of the `n_rows` rows of a q4_K weight in
/// ggml's interleaved 8-row layout (`packed` starts with its `n_rows / 8 · K / 256` tiles).
pub fn matvec(packed: &[u8], n_rows: usize, x: &[f32], out: &mut [f32]) -> Result<(), QuantError> {
    let k = x.len();
    let (packed, tile_row_bytes) =
        checked(GgmlType::Q4_K, "q4_K AVX2 matvec (this CPU)", avx2_available(), packed, n_rows, k, out.len(), TILING)?;
    let (act, bsum32) = q8k_activation(x)?;
    for_each_group(packed, TILE_ROWS, tile_row_bytes, out, 1, |tile, rows| {
        let mut y = [0f32; TILE_ROWS];
        tile_dot(tile, &act, &bsum32, &mut y);
        rows.copy_from_slice(&y[..rows.len()]);
    });
    Ok(())
}

/// The 6-bit scales and mins of one 32-value group for the 8 rows, from its 12 bytes (ggml's
/// `make_block_q4_Kx8`): bytes 0..4 hold the scales of rows 0..4 (bits 0..6) and bits 4..6 of rows
/// 4..8's (bits 6..8); bytes 4..8 the same for the mins; bytes 8..12 bits 0..4 of rows 4..8's scales
/// (low nibble) and mins (high nibble). Returns (scales, mins), one byte per row, row 0 lowest.
#[inline(always)]
pub(super) fn unpack(g: [u8; 12]) -> (u64, u64) {
    let w = |i: usize| u32::from_le_bytes([g[4 * i], g[4 * i + 1], g[4 * i + 2], g[4 * i + 3]]);
    let (w0, w1, w2) = (w(0), w(1), w(2));
    let sc_lo = w0 & 0x3f3f_3f3f;
    let sc_hi = (w2 & 0x0f0f_0f0f) | ((w0 >> 2) & 0x3030_3030);
    let mn_lo = w1 & 0x3f3f_3f3f;
    let mn_hi = ((w2 >> 4) & 0x0f0f_0f0f) | ((w1 >> 2) & 0x3030_3030);
    (sc_lo as u64 | (sc_hi as u64) << 32, mn_lo as u64 | (mn_hi as u64) << 32)
}

/// The 8 outputs of one row tile (all `KB` blocks of it, contiguous in `tile`).
fn tile_dot(tile: &[u8], act: &[u8], bsum32: &[i16], y: &mut [f32; TILE_ROWS]) {
    let kb = act.len() / Q8K_BYTES;
    assert!(tile.len() == kb * TILE_BYTES && bsum32.len() == kb * 8, "tile / activation sizes");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `matvec` (the only caller) passed `avx2_available()` to `row_tiles::checked`, which
    // refuses when it is false, i.e. the CPU has every feature the function is compiled for; the
    // lengths its raw reads rely on were asserted just above.
    unsafe {
        x86::tile_dot(tile.as_ptr(), act.as_ptr(), bsum32.as_ptr(), kb, y)
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
    /// q8_K blocks and `bsum` at `kb · 8` i16.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_dot(tile: *const u8, act: *const u8, bsum: *const i16, kb: usize, y: &mut [f32; TILE_ROWS]) {
        // SAFETY: (whole body) every pointer offset stays inside the ranges the caller guarantees:
        // tile bytes < kb·TILE_BYTES, act bytes < kb·Q8K_BYTES, bsum < kb·8. Prefetch addresses may
        // lie past the end (wrapping_add, never dereferenced; a prefetch never faults). Unaligned
        // loads throughout.
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            // Each row's scale byte spread over the 4 i16 of its 8-byte run: rows 0..4 (from bytes
            // 0..4) and rows 4..8 (bytes 4..8) of a group's scales.
            let spread03 = _mm_set_epi8(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
            let spread47 = _mm_set_epi8(7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4);
            // `hadd` of (rows 0..4, rows 4..8) leaves rows in the order 0 1 4 5 2 3 6 7.
            let to_hadd_order = _mm256_set_epi32(7, 6, 3, 2, 5, 4, 1, 0);
            let from_hadd_order = to_hadd_order; // the swap of rows 2 3 with 4 5 undoes itself
            let mut acc = _mm256_setzero_ps(); // rows in hadd order
            let mut acc_min = _mm256_setzero_ps(); // rows in order
            for i in 0..kb {
                let b = tile.add(i * TILE_BYTES);
                let a = act.add(i * Q8K_BYTES);
                let ax = a.add(4);
                let dx = _mm256_set1_ps((a as *const f32).read_unaligned());
                let ahead = b.wrapping_add(PREFETCH_AHEAD);
                // the head (d, dmin, scales: 128 B) of the tile two on
                _mm_prefetch::<_MM_HINT_T1>(ahead as *const i8);
                _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(64) as *const i8);
                let mut sc = [0u64; 8];
                let mut mn = [0u64; 8];
                for (s, (sc, mn)) in sc.iter_mut().zip(mn.iter_mut()).enumerate() {
                    (*sc, *mn) = unpack((b.add(OFF_SCALES + 12 * s) as *const [u8; 12]).read_unaligned());
                }
                // i32 sums, two per row: lanes (r0 r0 r1 r1 r2 r2 r3 r3) and (r4 r4 … r7 r7)
                let (mut i03, mut i47) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                for c in 0..4 {
                    // i16 sums of groups 2c (low nibbles) and 2c + 1 (high), four per row
                    let (mut lo03, mut lo47) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    let (mut hi03, mut hi47) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    for u in 0..4 {
                        let q = b.add(OFF_QS + c * 256 + u * 64);
                        _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(OFF_QS + c * 256 + u * 64) as *const i8);
                        let v03 = _mm256_loadu_si256(q as *const _);
                        let v47 = _mm256_loadu_si256(q.add(32) as *const _);
                        let xlo = _mm256_set1_epi64x((ax.add(64 * c + 8 * u) as *const i64).read_unaligned());
                        let xhi = _mm256_set1_epi64x((ax.add(64 * c + 32 + 8 * u) as *const i64).read_unaligned());
                        lo03 = _mm256_add_epi16(lo03, _mm256_maddubs_epi16(_mm256_and_si256(v03, low), xlo));
                        lo47 = _mm256_add_epi16(lo47, _mm256_maddubs_epi16(_mm256_and_si256(v47, low), xlo));
                        let h03 = _mm256_and_si256(_mm256_srli_epi16::<4>(v03), low);
                        let h47 = _mm256_and_si256(_mm256_srli_epi16::<4>(v47), low);
                        hi03 = _mm256_add_epi16(hi03, _mm256_maddubs_epi16(h03, xhi));
                        hi47 = _mm256_add_epi16(hi47, _mm256_maddubs_epi16(h47, xhi));
                    }
                    let s_lo = _mm_cvtsi64_si128(sc[2 * c] as i64);
                    let s_hi = _mm_cvtsi64_si128(sc[2 * c + 1] as i64);
                    let spread = |s, m| _mm256_cvtepu8_epi16(_mm_shuffle_epi8(s, m));
                    i03 = _mm256_add_epi32(i03, _mm256_madd_epi16(lo03, spread(s_lo, spread03)));
                    i03 = _mm256_add_epi32(i03, _mm256_madd_epi16(hi03, spread(s_hi, spread03)));
                    i47 = _mm256_add_epi32(i47, _mm256_madd_epi16(lo47, spread(s_lo, spread47)));
                    i47 = _mm256_add_epi32(i47, _mm256_madd_epi16(hi47, spread(s_hi, spread47)));
                }
                let sums = _mm256_hadd_epi32(i03, i47);
                let d = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_loadu_si128(b as *const _)), to_hadd_order);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(d, dx), acc);
                // mins: lane r gets Σ over group pairs of (min_2p, min_2p+1)·(bsum_2p, bsum_2p+1)
                let mut imin = _mm256_setzero_si256();
                for p in 0..4 {
                    let pair = _mm_unpacklo_epi8(_mm_cvtsi64_si128(mn[2 * p] as i64), _mm_cvtsi64_si128(mn[2 * p + 1] as i64));
                    let s = _mm256_set1_epi32((bsum.add(i * 8 + 2 * p) as *const i32).read_unaligned());
                    imin = _mm256_add_epi32(imin, _mm256_madd_epi16(_mm256_cvtepu8_epi16(pair), s));
                }
                let dmin = _mm256_cvtph_ps(_mm_loadu_si128(b.add(OFF_DMIN) as *const _));
                acc_min = _mm256_fmadd_ps(_mm256_cvtepi32_ps(imin), _mm256_mul_ps(dmin, dx), acc_min);
            }
            let acc = _mm256_permutevar8x32_ps(acc, from_hadd_order);
            _mm256_storeu_ps(y.as_mut_ptr(), _mm256_sub_ps(acc, acc_min));
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
        let shapes = [(64, 512), (32, 2560), (72, 256), (160, 1024)];
        testing::against_ggml_and_vec_dot(QuantType::Q4_K, "CPU_REPACK", &shapes, SAME_KERNEL_REL_TOL, VEC_DOT_REL_TOL);
    }

    #[test]
    fn the_scales_unpack_as_ggml_packed_them() {
        // ggml's packing (make_block_q4_Kx8) of known 6-bit scales s[r] and mins m[r], then unpack
        let s: [u8; 8] = [0, 1, 17, 63, 32, 47, 48, 62];
        let m: [u8; 8] = [63, 5, 16, 33, 15, 49, 31, 60];
        let mut g = [0u8; 12];
        for r in 0..4 {
            g[r] = s[r] + ((s[r + 4] & 48) << 2);
            g[r + 4] = m[r] + ((m[r + 4] & 48) << 2);
            g[r + 8] = (s[r + 4] & 15) + ((m[r + 4] & 15) << 4);
        }
        let (sc, mn) = unpack(g);
        assert_eq!(sc.to_le_bytes(), s);
        assert_eq!(mn.to_le_bytes(), m);
    }

    #[test]
    fn wrong_shapes_are_refused() {
        testing::refuses_wrong_shapes(matvec, TILING, avx2_available());
    }
}
