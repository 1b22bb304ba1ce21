//! Several tokens through a q4_K weight held in ggml's interleaved 8-row layout (`CPU_REPACK`,
//! `block_q4_Kx8`; [`super::q4k_x8_matvec`] describes it): our own AVX2 GEMM for prefill, in place of
//! ggml's `gemm_q4_K_8x8_q8_K`, on the same bytes.
//!
//! Why our own: ggml's kernel lines the interleaved rows up with shuffles and blends before every
//! multiply, and unpacks each tile's nibbles again for every 4 tokens. Here each tile's nibbles are
//! unpacked once per token chunk into unsigned bytes in an L1 scratch (`Unpacked`), its scales and
//! mins once too, and then every token of the chunk multiplies them exactly as the one-token kernel
//! does: broadcasts of its 8 activation bytes against each row's 8-byte run, 16-bit sums over a
//! 32-value group, the rows lined up once per block. The integer sums are exact and each (token,
//! row) takes the one-token kernel's float steps in its order, so **every output equals what
//! [`super::q4k_x8_matvec`] gives that token alone** (and that one equals ggml's `gemv`).
//!
//! Loop order: threads own contiguous runs of row tiles; each goes through the tokens in chunks
//! whose q8_K activations fit in a quarter of L2 (`row_tiles::gemm_by_tiles`), and for each of its tiles and each block,
//! unpacks the block once and runs the chunk's tokens over it.
//!
//! Dims: T = tokens, K = n_cols (multiple of 256), N = rows of the packed tensor (multiple of 8),
//! KB = K / 256, `n_out` ≤ N the rows kept (the rest pad the last tile).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::matmul::token_count;
use super::q4k_x8_matvec::{unpack, OFF_DMIN, OFF_QS, OFF_SCALES, QK, TILE_BYTES, TILE_ROWS, TILING};
use super::row_tiles::{avx2_available, checked, gemm_by_tiles, q8k_activation, Q8K_BYTES};
use crate::quant::{GgmlType, QuantError};

/// `out[t, r] = Σ_k W[r, k] · x[t, k]` for the first `n_out` of the `n_rows` rows of a q4_K weight
/// in ggml's interleaved 8-row layout (`packed` starts with its `n_rows / 8 · K / 256` tiles), `x`
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
        checked(GgmlType::Q4_K, "q4_K AVX2 GEMM (this CPU)", avx2_available(), packed, n_rows, k, n_out, TILING)?;
    // q8_K activations, token rows one after another (K is whole blocks), converted on all threads
    let per_task = t.div_ceil(rayon::current_num_threads().max(1)).max(1);
    let parts = x.par_chunks(per_task * k).map(q8k_activation).collect::<Result<Vec<_>, _>>()?;
    let act: Vec<u8> = parts.iter().flat_map(|p| p.0.iter().copied()).collect();
    let bsum: Vec<i16> = parts.iter().flat_map(|p| p.1.iter().copied()).collect();
    let kb = k / QK;
    gemm_by_tiles(packed, tile_row_bytes, n_out, t, kb * Q8K_BYTES, out, |tile, toks, y| {
        let a = &act[toks.start * kb * Q8K_BYTES..toks.end * kb * Q8K_BYTES];
        tile_gemm(tile, a, &bsum[toks.start * kb * 8..toks.end * kb * 8], y)
    });
    Ok(())
}

/// `y[tok][r]` for the 8 rows of one row tile (`tile`: its KB blocks) and each token of a chunk
/// (`act`: their q8_K rows, `bsum`: their 32-value sums).
fn tile_gemm(tile: &[u8], act: &[u8], bsum: &[i16], y: &mut [[f32; TILE_ROWS]]) {
    let kb = tile.len() / TILE_BYTES;
    let tc = y.len();
    assert!(
        tile.len() == kb * TILE_BYTES && act.len() == tc * kb * Q8K_BYTES && bsum.len() == tc * kb * 8,
        "tile / activation sizes"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `matmul` (the only caller) returned early unless `avx2_available()`, i.e. the CPU has
    // every feature the function is compiled for; the lengths its raw reads rely on were asserted
    // just above.
    unsafe {
        x86::tile_gemm(tile.as_ptr(), kb, act.as_ptr(), bsum.as_ptr(), y)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("matmul refuses without AVX2");
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// One block of a tile, unpacked: `q[4c + u]` the 8-byte runs `u` of the rows for values
    /// `64c + 8u..` (low nibbles) and `64c + 32 + 8u..` (high), as (rows 0..4 low, rows 4..8 low,
    /// rows 0..4 high, rows 4..8 high); `scale[c]` each row's group scale spread over its 4 i16
    /// lanes, in the same order; `min_pair[p]` rows' mins of groups 2p, 2p + 1 as i16 pairs.
    struct Unpacked {
        q: [[__m256i; 4]; 16],
        scale: [[__m256i; 4]; 4],
        min_pair: [__m256i; 4],
        d: __m256,
        dmin: __m256,
    }

    /// # Safety
    /// AVX2, FMA and F16C; `b` points at one block of a tile ([`TILE_BYTES`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack_block(b: *const u8, u: &mut Unpacked) {
        // SAFETY: reads inside the block's TILE_BYTES (offsets below OFF_QS + 1024).
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            let spread03 = _mm_set_epi8(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
            let spread47 = _mm_set_epi8(7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4);
            let to_hadd_order = _mm256_set_epi32(7, 6, 3, 2, 5, 4, 1, 0);
            let mut sc = [0u64; 8];
            let mut mn = [0u64; 8];
            for (s, (sc, mn)) in sc.iter_mut().zip(mn.iter_mut()).enumerate() {
                (*sc, *mn) = unpack((b.add(OFF_SCALES + 12 * s) as *const [u8; 12]).read_unaligned());
            }
            let spread = |s: u64, m| _mm256_cvtepu8_epi16(_mm_shuffle_epi8(_mm_cvtsi64_si128(s as i64), m));
            for c in 0..4 {
                u.scale[c] = [
                    spread(sc[2 * c], spread03),
                    spread(sc[2 * c], spread47),
                    spread(sc[2 * c + 1], spread03),
                    spread(sc[2 * c + 1], spread47),
                ];
                for v in 0..4 {
                    let q = b.add(OFF_QS + c * 256 + v * 64);
                    let v03 = _mm256_loadu_si256(q as *const _);
                    let v47 = _mm256_loadu_si256(q.add(32) as *const _);
                    u.q[4 * c + v] = [
                        _mm256_and_si256(v03, low),
                        _mm256_and_si256(v47, low),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(v03), low),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(v47), low),
                    ];
                }
            }
            for p in 0..4 {
                let pair = _mm_unpacklo_epi8(_mm_cvtsi64_si128(mn[2 * p] as i64), _mm_cvtsi64_si128(mn[2 * p + 1] as i64));
                u.min_pair[p] = _mm256_cvtepu8_epi16(pair);
            }
            u.d = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_loadu_si128(b as *const _)), to_hadd_order);
            u.dmin = _mm256_cvtph_ps(_mm_loadu_si128(b.add(OFF_DMIN) as *const _));
        }
    }

    /// # Safety
    /// AVX2, FMA and F16C; `tile` points at `kb` tiles of [`TILE_BYTES`], `act` at `y.len() · kb`
    /// q8_K blocks and `bsum` at `y.len() · kb · 8` i16 (token-major).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_gemm(tile: *const u8, kb: usize, act: *const u8, bsum: *const i16, y: &mut [[f32; TILE_ROWS]]) {
        // SAFETY: (whole body) block i of the tile at i·TILE_BYTES (< kb·TILE_BYTES); token j's
        // block i at (j·kb + i)·Q8K_BYTES and its sums at (j·kb + i)·8 (< the lengths above).
        // Unaligned loads throughout.
        unsafe {
            let to_hadd_order = _mm256_set_epi32(7, 6, 3, 2, 5, 4, 1, 0);
            let from_hadd_order = to_hadd_order; // the swap of rows 2 3 with 4 5 undoes itself
            let tc = y.len();
            // per token: (acc in hadd order, acc of the mins in row order), as the one-token kernel
            let mut acc = vec![(_mm256_setzero_ps(), _mm256_setzero_ps()); tc];
            let mut u: Unpacked = std::mem::zeroed();
            for i in 0..kb {
                unpack_block(tile.add(i * TILE_BYTES), &mut u);
                for (j, (acc, acc_min)) in acc.iter_mut().enumerate() {
                    let a = act.add((j * kb + i) * Q8K_BYTES);
                    let ax = a.add(4);
                    let dx = _mm256_set1_ps((a as *const f32).read_unaligned());
                    let (mut i03, mut i47) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    for c in 0..4 {
                        let (mut lo03, mut lo47) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                        let (mut hi03, mut hi47) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                        for v in 0..4 {
                            let q = &u.q[4 * c + v];
                            let xlo = _mm256_set1_epi64x((ax.add(64 * c + 8 * v) as *const i64).read_unaligned());
                            let xhi = _mm256_set1_epi64x((ax.add(64 * c + 32 + 8 * v) as *const i64).read_unaligned());
                            lo03 = _mm256_add_epi16(lo03, _mm256_maddubs_epi16(q[0], xlo));
                            lo47 = _mm256_add_epi16(lo47, _mm256_maddubs_epi16(q[1], xlo));
                            hi03 = _mm256_add_epi16(hi03, _mm256_maddubs_epi16(q[2], xhi));
                            hi47 = _mm256_add_epi16(hi47, _mm256_maddubs_epi16(q[3], xhi));
                        }
                        let s = &u.scale[c];
                        i03 = _mm256_add_epi32(i03, _mm256_madd_epi16(lo03, s[0]));
                        i03 = _mm256_add_epi32(i03, _mm256_madd_epi16(hi03, s[2]));
                        i47 = _mm256_add_epi32(i47, _mm256_madd_epi16(lo47, s[1]));
                        i47 = _mm256_add_epi32(i47, _mm256_madd_epi16(hi47, s[3]));
                    }
                    let sums = _mm256_hadd_epi32(i03, i47);
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(u.d, dx), *acc);
                    let bs = bsum.add((j * kb + i) * 8);
                    let mut imin = _mm256_setzero_si256();
                    for p in 0..4 {
                        let s = _mm256_set1_epi32((bs.add(2 * p) as *const i32).read_unaligned());
                        imin = _mm256_add_epi32(imin, _mm256_madd_epi16(u.min_pair[p], s));
                    }
                    *acc_min = _mm256_fmadd_ps(_mm256_cvtepi32_ps(imin), _mm256_mul_ps(u.dmin, dx), *acc_min);
                }
            }
            for (y, (acc, acc_min)) in y.iter_mut().zip(&acc) {
                let acc = _mm256_permutevar8x32_ps(*acc, from_hadd_order);
                _mm256_storeu_ps(y.as_mut_ptr(), _mm256_sub_ps(acc, *acc_min));
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
        // (rows, K, tokens): 40 and 72 rows are odd numbers of row tiles (uneven thread split); 2560
        // columns with 50 tokens cross a token chunk (44 tokens of K = 2560 fill row_tiles' CHUNK_ACT_BYTES);
        // 2 tokens go one by one (under X8_GEMM_MIN_TOKENS_Q4K), 3 are below ggml's 4-token groups
        let cases = [(64, 512, 2), (40, 512, 3), (72, 256, 5), (32, 2560, 50), (16, 1024, 17)];
        testing::each_token_as_alone_and_near_ggml(QuantType::Q4_K, &cases);
    }

    #[test]
    fn wrong_shapes_are_refused() {
        testing::gemm_refuses_wrong_shapes(super::matmul, super::TILING);
    }
}
