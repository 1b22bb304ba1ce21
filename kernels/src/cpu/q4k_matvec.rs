//! One token through a q4_K weight held in ggml's AMX layout ([`super::packed`]): our own AVX512-VNNI
//! matvec, used in place of ggml's for decode. Same layout, so prefill keeps ggml's AMX tiles and no
//! second copy of the weight exists.
//!
//! Why our own: decode is memory-bound only when the kernel consumes bytes well faster than DRAM
//! delivers them. ggml's one-token q4_K kernel consumes ~15 GiB/s per core even from L2 (BENCHMARKS.md,
//! `matvec_l2`): its inner loop runs one dependent accumulator chain per 32 values and builds every
//! activation broadcast with a lane permute. Here each 32-value group has two independent chains,
//! broadcasts come straight from memory (a load, not a shuffle): ~48 GB/s per core from L2 (a
//! throwaway loop; `matvec_l2` measures it with call overheads). From DRAM, each line read asks L2 for
//! the same line [`PREFETCH_AHEAD`] bytes on, so memory and compute overlap (one core streams 0.95 of
//! what a plain read of the same memory reaches: `RAYON_NUM_THREADS=1 cargo bench --bench kernels --
//! "matvec_streaming/q4_k_AMX/|memory/"`).
//!
//! The layout (ggml-cpu amx/mmq.cpp, `pack_B` for block_q4_K; pinned with llama-cpp-sys-2, and the
//! tests below compare with ggml's own kernel on it): 16 weight rows × 256 columns make a tile of
//! [`TILE_BYTES`]; tiles are stored row-tile-major (`tile(n, kb)` at `(n·KB + kb)·TILE_BYTES`).
//! Inside a tile:
//!
//! | bytes        | what                                                                      |
//! |--------------|---------------------------------------------------------------------------|
//! | 0..2048      | quants: 32 lines of 64 B; line `4g + q` holds, for rows r = 0..16, 4 bytes |
//! |              | whose low nibbles are values `32g + 8q + 0..4` and high nibbles `+4..8`   |
//! | 2048..2176   | sub-block scales, u8 `[g][r]` (g = 32-value group, 0..8)                  |
//! | 2176..2304   | sub-block mins, u8 `[g/2][r][g%2]` (pairs, for a 16-bit pair dot)          |
//! | 2304..2336   | d, f16 `[r]`                                                              |
//! | 2336..2368   | dmin, f16 `[r]`                                                           |
//!
//! Per row r and block: `y_r += d_r·d_x·Σ_g scale_gr·Σ_{j∈g} q_j·x_j − dmin_r·d_x·Σ_g min_gr·Σ_{j∈g} x_j`
//! with x in q8_K (d_x, int8 x_j) — the float steps in ggml's order, so results match its kernel.
//!
//! Dims: K = n_cols (multiple of 256), N = rows of the packed tensor (multiple of 16), KB = K / 256.

pub use super::row_tiles::TILE_ROWS;
use super::row_tiles::{checked, for_each_group, q8k_activation, vnni_available, Tiling, Q8K_BYTES};
use crate::quant::{GgmlType, QuantError};

/// Values per q4_K / q8_K block (one tile's columns).
const QK: usize = 256;
const QS_BYTES: usize = QK / 2 * TILE_ROWS;
const OFF_SCALES: usize = QS_BYTES;
const OFF_MINS: usize = OFF_SCALES + 8 * TILE_ROWS;
const OFF_D: usize = OFF_MINS + 8 * TILE_ROWS;
const OFF_DMIN: usize = OFF_D + 2 * TILE_ROWS;
/// Bytes of one 16-row × 256-column tile.
pub const TILE_BYTES: usize = OFF_DMIN + 2 * TILE_ROWS;
pub(super) const TILING: Tiling = Tiling { rows: TILE_ROWS, qk: QK, bytes: TILE_BYTES };
/// How far ahead of the line being read the kernel asks for the same line of a later tile (decode
/// reads each weight once per token, from DRAM). One prefetch per line read, into L2 (T1), spread
/// through the loop: a burst of a whole tile's prefetches at its start filled the line-fill buffers
/// that the loads of the current tile then waited for. Measured with `matvec_streaming` (BENCHMARKS.md):
/// the burst of T0s 4 tiles ahead 16.3–18.5 GiB/s, spread T0s 20.2–21.2 at 1 to 8 tiles ahead,
/// spread T1s 22.1 at 2 or 8; no prefetch 13.2.
const PREFETCH_AHEAD: usize = 2 * TILE_BYTES;

/// `out[r] = Σ_k W[r, k] · x[k]` for the first `out.len()` of the `n_rows` rows of a q4_K weight in
/// ggml's AMX layout (`packed` starts with its `n_rows / 16 · K / 256` tiles; a buffer may be longer).
pub fn matvec(packed: &[u8], n_rows: usize, x: &[f32], out: &mut [f32]) -> Result<(), QuantError> {
    let k = x.len();
    let (packed, tile_row_bytes) =
        checked(GgmlType::Q4_K, "q4_K AVX512-VNNI matvec (this CPU)", vnni_available(), packed, n_rows, k, out.len(), TILING)?;
    let (act, bsum32) = q8k_activation(x)?;
    for_each_group(packed, TILE_ROWS, tile_row_bytes, out, 1, |tile, rows| {
        let mut y = [0f32; TILE_ROWS];
        tile_dot(tile, &act, &bsum32, &mut y);
        rows.copy_from_slice(&y[..rows.len()]);
    });
    Ok(())
}

/// The 16 outputs of one row tile (all `KB` blocks of it, contiguous in `tile`).
fn tile_dot(tile: &[u8], act: &[u8], bsum32: &[i16], y: &mut [f32; TILE_ROWS]) {
    let kb = act.len() / Q8K_BYTES;
    assert!(tile.len() == kb * TILE_BYTES && bsum32.len() == kb * 8, "tile / activation sizes");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `matvec` (the only caller) passed `vnni_available()` to `row_tiles::checked`, which
    // refuses when it is false, i.e. the CPU has every feature the function is compiled for; the
    // lengths its raw reads rely on were asserted just above.
    unsafe {
        x86::tile_dot(tile.as_ptr(), act.as_ptr(), bsum32.as_ptr(), kb, y)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// # Safety
    /// The CPU has AVX512F, AVX512BW and AVX512-VNNI; `tile` points at `kb` tiles of [`TILE_BYTES`],
    /// `act` at `kb` q8_K blocks and `bsum` at `kb · 8` i16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile_dot(tile: *const u8, act: *const u8, bsum: *const i16, kb: usize, y: &mut [f32; TILE_ROWS]) {
        // SAFETY: (whole body) every pointer offset stays inside the ranges the caller guarantees:
        // tile bytes < kb·TILE_BYTES (the quants, scales, mins, d, dmin offsets of each tile), act
        // bytes < kb·Q8K_BYTES, bsum < kb·8. Prefetch addresses may lie past the end (wrapping_add, never
        // dereferenced; a prefetch never faults).
        // Unaligned loads are used throughout.
        unsafe {
            let low = _mm512_set1_epi8(0x0F);
            let mut vc = _mm512_setzero_ps();
            for i in 0..kb {
                let b = tile.add(i * TILE_BYTES);
                let a = act.add(i * Q8K_BYTES);
                let ax = a.add(4);
                let d1 = _mm512_set1_ps((a as *const f32).read_unaligned());
                let mut acc = _mm512_setzero_si512();
                let ahead = b.wrapping_add(PREFETCH_AHEAD);
                for g in 0..8 {
                    // the tile's last 5 lines (scales, mins, d, dmin), one per group
                    if OFF_SCALES + g * 64 < TILE_BYTES {
                        _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(OFF_SCALES + g * 64) as *const i8);
                    }
                    // two chains per group: low nibbles (values +0..4 of each 8) and high (+4..8)
                    let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                    for q in 0..4 {
                        _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add((4 * g + q) * 64) as *const i8);
                        let bytes = _mm512_loadu_si512(b.add((4 * g + q) * 64) as *const _);
                        let x0 = _mm512_set1_epi32((ax.add(32 * g + 8 * q) as *const i32).read_unaligned());
                        let x1 = _mm512_set1_epi32((ax.add(32 * g + 8 * q + 4) as *const i32).read_unaligned());
                        s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(bytes, low), x0);
                        s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16::<4>(bytes), low), x1);
                    }
                    let scale = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.add(OFF_SCALES + g * TILE_ROWS) as *const _));
                    acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(_mm512_add_epi32(s0, s1), scale));
                }
                let d0 = _mm512_cvtph_ps(_mm256_loadu_si256(b.add(OFF_D) as *const _));
                vc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(d0, d1), vc);
                // mins: lane r gets Σ over group pairs of (min_2p, min_2p+1)·(bsum_2p, bsum_2p+1)
                let mut acc_m = _mm512_setzero_si512();
                for p in 0..4 {
                    let mins = _mm512_cvtepu8_epi16(_mm256_loadu_si256(b.add(OFF_MINS + p * 32) as *const _));
                    let sums = _mm512_set1_epi32((bsum.add(i * 8 + 2 * p) as *const i32).read_unaligned());
                    acc_m = _mm512_dpwssd_epi32(acc_m, sums, mins);
                }
                let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(b.add(OFF_DMIN) as *const _));
                vc = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(acc_m), _mm512_mul_ps(dmin, d1), vc);
            }
            _mm512_storeu_ps(y.as_mut_ptr(), vc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::row_tiles::testing;
    use super::*;
    use crate::QuantType;

    /// Same integer sums as ggml's kernel and the same float steps per block; only the activation
    /// quantiser may differ (ggml's AMX path uses the reference q8_K converter, we the CPU one), by
    /// at most one rounding of a quant.
    const SAME_KERNEL_REL_TOL: f32 = 1e-5;
    /// Against `vec_dot` (another summation order, same quantised values).
    const VEC_DOT_REL_TOL: f32 = 1e-4;

    #[test]
    fn matches_ggmls_kernel_and_vec_dot_on_the_same_packed_bytes() {
        // 70 rows: padded to 128 (partial last tile dropped); 2560 columns: Phi-2's hidden size
        let shapes = [(64, 512), (32, 2560), (70, 256), (160, 1024)];
        testing::against_ggml_and_vec_dot(QuantType::Q4_K, "AMX", &shapes, SAME_KERNEL_REL_TOL, VEC_DOT_REL_TOL);
    }

    #[test]
    fn wrong_shapes_are_refused() {
        testing::refuses_wrong_shapes(matvec, TILING, vnni_available());
    }
}
