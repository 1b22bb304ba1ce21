//! One token through a q8_0 weight held in ggml's AMX layout ([`super::packed`]): our own AVX512-VNNI
//! matvec, used in place of ggml's for decode. Same layout and bytes, so prefill keeps ggml's AMX
//! kernel and no second copy of the weight exists.
//!
//! Why our own: from DRAM it streams no faster than ggml's kernel in isolation (`cargo bench --bench
//! kernels -- matvec_streaming/q8_0`: 23.5 vs 23.1 GiB/s), but it runs on our own threads with no
//! ggml graph around it, and in a whole model that is what counts: MoE Qwen's q8_0 expert
//! down-projections (5504 columns, which q4_K cannot hold) decode 3–8 % faster (BENCHMARKS.md). From
//! L2 it consumes 2.3× what ggml's does (`matvec_l2/q8_0`). Like ggml's, it multiplies [`GROUP`] row
//! tiles together so each activation broadcast is shared; like [`super::q4k_matvec`], each 64 bytes
//! read ask L2 for the bytes [`PREFETCH_AHEAD`] on, and the activations are converted to unsigned
//! bytes once per call instead of once per tile.
//!
//! The layout (ggml-cpu amx/mmq.cpp, `pack_B` for block_q8_0; pinned with llama-cpp-sys-2, and the
//! tests below compare with ggml's own kernel on it): 16 weight rows × 32 columns make a tile of
//! [`TILE_BYTES`]; tiles are stored row-tile-major (`tile(n, kb)` at `(n·KB + kb)·TILE_BYTES`).
//! Inside a tile:
//!
//! | bytes    | what                                                                    |
//! |----------|-------------------------------------------------------------------------|
//! | 0..512   | quants: 8 lines of 64 B; line `j` holds, for rows r = 0..16, the 4 int8  |
//! |          | values `4j..4j+4` of row r                                              |
//! | 512..544 | d, f16 `[r]`                                                            |
//! | 544..608 | compensation, i32 `[r]`: `128 · Σ_j q_rj`                               |
//!
//! VNNI multiplies unsigned by signed bytes, so the int8 activations a_j are offset to `a_j + 128`
//! (unsigned) and the compensation taken off: `Σ (a_j + 128)·q_j − 128·Σ q_j = Σ a_j·q_j`, exactly.
//! Per row r and block: `y_r += d_r·d_x·Σ_j a_j·q_rj`, the float steps in ggml's order, so results
//! match its kernel.
//!
//! Dims: K = n_cols (multiple of 32), N = rows of the packed tensor (multiple of 16), KB = K / 32.

use super::row_tiles::{checked, for_each_group, vnni_available, Tiling, TILE_ROWS};
use crate::quant::{self, GgmlType, QuantError};

/// Values per q8_0 block (one tile's columns).
const QK: usize = 32;
const OFF_D: usize = QK * TILE_ROWS;
const OFF_COMP: usize = OFF_D + 2 * TILE_ROWS;
/// Bytes of one 16-row × 32-column tile.
pub const TILE_BYTES: usize = OFF_COMP + 4 * TILE_ROWS;
const TILING: Tiling = Tiling { rows: TILE_ROWS, qk: QK, bytes: TILE_BYTES };
/// q8_0 block: d (f16), 32 int8 quants.
const Q8_0_BYTES: usize = 2 + QK;
/// How far ahead of the bytes being read, in each row of tiles, the kernel asks L2 for more.
/// `matvec_streaming/q8_0_AMX` with one row tile at a time: 4 tiles ahead 23.5 GiB/s, 8 to 32 tiles
/// 22.0–22.4, no prefetch 20.9.
const PREFETCH_AHEAD: usize = 4 * TILE_BYTES;

/// `out[r] = Σ_k W[r, k] · x[k]` for the first `out.len()` of the `n_rows` rows of a q8_0 weight in
/// ggml's AMX layout (`packed` starts with its `n_rows / 16 · K / 32` tiles; a buffer may be longer).
pub fn matvec(packed: &[u8], n_rows: usize, x: &[f32], out: &mut [f32]) -> Result<(), QuantError> {
    let k = x.len();
    let (packed, tile_row_bytes) =
        checked(GgmlType::Q8_0, "q8_0 AVX512-VNNI matvec (this CPU)", vnni_available(), packed, n_rows, k, out.len(), TILING)?;
    let kb = k / QK;
    // Activations in q8_0, then split: the quants offset by 128 (unsigned, what VNNI multiplies) and
    // each block's scale as f32.
    let mut act = vec![0u8; kb * Q8_0_BYTES];
    quant::quantize_activation(GgmlType::Q8_0, x, &mut act)?;
    let mut quants = vec![0u8; k];
    let mut scales = vec![0f32; kb];
    for ((b, q), d) in act.chunks_exact(Q8_0_BYTES).zip(quants.chunks_exact_mut(QK)).zip(&mut scales) {
        *d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        q.iter_mut().zip(&b[2..]).for_each(|(u, s)| *u = s ^ 0x80);
    }
    for_each_group(packed, TILE_ROWS, tile_row_bytes, out, GROUP, |tiles, rows| {
        let mut y = [0f32; TILE_ROWS * GROUP];
        tile_dot(tiles, rows.len().div_ceil(TILE_ROWS), &quants, &scales, &mut y);
        rows.copy_from_slice(&y[..rows.len()]);
    });
    Ok(())
}

/// Row tiles multiplied together, sharing each activation broadcast.
const GROUP: usize = 4;

/// `nt` (1..=GROUP) consecutive rows of tiles (16 weight rows × K each) against the offset activation
/// quants and block scales.
fn tile_dot(tiles: &[u8], nt: usize, quants: &[u8], scales: &[f32], y: &mut [f32; TILE_ROWS * GROUP]) {
    let kb = scales.len();
    assert!(
        (1..=GROUP).contains(&nt) && tiles.len() == nt * kb * TILE_BYTES && quants.len() == kb * QK,
        "tile / activation sizes"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `matvec` (the only caller) passed `vnni_available()` to `row_tiles::checked`, which
    // refuses when it is false, i.e. the CPU has every feature the function is compiled for; the
    // lengths its raw reads rely on were asserted just above.
    unsafe {
        let (t, q, s) = (tiles.as_ptr(), quants.as_ptr(), scales.as_ptr());
        match nt {
            4 => x86::tile_dot::<4>(t, q, s, kb, y),
            3 => x86::tile_dot::<3>(t, q, s, kb, y),
            2 => x86::tile_dot::<2>(t, q, s, kb, y),
            _ => x86::tile_dot::<1>(t, q, s, kb, y),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// # Safety
    /// The CPU has AVX512F, AVX512BW and AVX512-VNNI; `tiles` points at `NT · kb` tiles of
    /// [`TILE_BYTES`], `quants` at `kb · 32` bytes and `scales` at `kb` f32; `NT ≤ GROUP`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile_dot<const NT: usize>(
        tiles: *const u8,
        quants: *const u8,
        scales: *const f32,
        kb: usize,
        y: &mut [f32; TILE_ROWS * GROUP],
    ) {
        // SAFETY: (whole body) every pointer offset stays inside the ranges the caller guarantees:
        // tile bytes < NT·kb·TILE_BYTES (quants, d and compensation of each tile), quants < kb·32,
        // scales < kb. Prefetch addresses may lie past the end (wrapping_add, never dereferenced; a
        // prefetch never faults). Unaligned loads are used throughout (a tile is 608 bytes).
        unsafe {
            let row_bytes = kb * TILE_BYTES;
            let mut vc = [_mm512_setzero_ps(); NT];
            for i in 0..kb {
                let a = quants.add(i * QK);
                let x: [__m512i; 8] = std::array::from_fn(|j| _mm512_set1_epi32((a.add(4 * j) as *const i32).read_unaligned()));
                let d1 = _mm512_set1_ps(scales.add(i).read());
                for (t, c) in vc.iter_mut().enumerate() {
                    let b = tiles.add(t * row_bytes + i * TILE_BYTES);
                    let ahead = b.wrapping_add(PREFETCH_AHEAD);
                    let mut sum = _mm512_setzero_si512();
                    for (j, xj) in x.iter().enumerate() {
                        _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(j * 64) as *const i8);
                        sum = _mm512_dpbusd_epi32(sum, *xj, _mm512_loadu_si512(b.add(j * 64) as *const _));
                    }
                    // d and compensation: the tile's last 96 bytes, up to two more lines
                    _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(OFF_D) as *const i8);
                    _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(TILE_BYTES - 1) as *const i8);
                    let sum = _mm512_sub_epi32(sum, _mm512_loadu_si512(b.add(OFF_COMP) as *const _));
                    let d0 = _mm512_cvtph_ps(_mm256_loadu_si256(b.add(OFF_D) as *const _));
                    *c = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(d0, d1), *c);
                }
            }
            for (t, c) in vc.iter().enumerate() {
                _mm512_storeu_ps(y.as_mut_ptr().add(t * TILE_ROWS), *c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::row_tiles::testing;
    use super::*;
    use crate::QuantType;

    /// The same integer sums as ggml's kernel, the same activation quantiser and the same float
    /// steps in the same order: the results are the same bits.
    const SAME_KERNEL_REL_TOL: f32 = 0.0;
    /// Against `vec_dot` (another summation order over the same quantised values).
    const VEC_DOT_REL_TOL: f32 = 1e-5;

    #[test]
    fn matches_ggmls_kernel_and_vec_dot_on_the_same_packed_bytes() {
        // 70 rows: padded to 80 (partial last tile dropped); 5504 columns: Qwen-1.8B-4e's expert
        // width, which q4_K cannot hold (not a multiple of 256)
        let shapes = [(64, 512), (32, 2560), (70, 96), (48, 5504)];
        testing::against_ggml_and_vec_dot(QuantType::Q8_0, "AMX", &shapes, SAME_KERNEL_REL_TOL, VEC_DOT_REL_TOL);
    }

    #[test]
    fn wrong_shapes_are_refused() {
        testing::refuses_wrong_shapes(matvec, TILING, vnni_available());
    }
}
