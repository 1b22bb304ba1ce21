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
//! whose q8_K activations fit in [`CHUNK_ACT_BYTES`] (L2), and for each of its tiles and each block,
//! unpacks the block once and runs the chunk's tokens over it.
//!
//! Dims: T = tokens, K = n_cols (multiple of 256), N = rows of the packed tensor (multiple of 8),
//! KB = K / 256, `n_out` ≤ N the rows kept (the rest pad the last tile).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::q4k_x8_matvec::{unpack, OFF_DMIN, OFF_QS, OFF_SCALES, QK, TILE_BYTES, TILE_ROWS};
use super::row_tiles::{avx2_available, q8k_activation, Q8K_BYTES};
use crate::quant::{GgmlType, QuantError};

/// Activation bytes (q8_K) of one chunk of tokens: a quarter of this CPU class's 512 KiB L2, so the
/// chunk stays there while every tile of the thread passes over it.
const CHUNK_ACT_BYTES: usize = 128 << 10;

/// Where the threads write: `out` as a raw pointer, each thread only its own rows' columns.
struct OutPtr(*mut f32);
// SAFETY: the pointer is only written through at (token, row) positions of the row tiles the
// writing thread owns; threads own disjoint row ranges, so no element is written twice or read.
unsafe impl Sync for OutPtr {}

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
    if !avx2_available() {
        return Err(QuantError::Unsupported { op: "q4_K AVX2 GEMM (this CPU)", qtype: GgmlType::Q4_K });
    }
    if k == 0 || !k.is_multiple_of(QK) {
        return Err(QuantError::RowLength { qtype: GgmlType::Q4_K, n_per_row: k, block_size: QK });
    }
    if n_rows == 0 || !n_rows.is_multiple_of(TILE_ROWS) {
        let what = "packed rows (a whole number of the layout's row tiles)";
        return Err(QuantError::Length { what, expected: n_rows.div_ceil(TILE_ROWS) * TILE_ROWS, got: n_rows });
    }
    let kb = k / QK;
    let want = n_rows / TILE_ROWS * kb * TILE_BYTES;
    let packed = packed.get(..want).ok_or(QuantError::Length { what: "packed q4_K bytes", expected: want, got: packed.len() })?;
    if x.is_empty() || !x.len().is_multiple_of(k) {
        return Err(QuantError::Length { what: "activation values (whole rows of K)", expected: x.len() / k * k, got: x.len() });
    }
    let t = x.len() / k;
    if n_out == 0 || n_out > n_rows || out.len() != t * n_out {
        return Err(QuantError::Length {
            what: "output values (T × kept rows)",
            expected: t * n_out.min(n_rows),
            got: out.len(),
        });
    }
    // q8_K activations, token rows one after another (K is whole blocks), converted on all threads
    let per_task = t.div_ceil(rayon::current_num_threads().max(1));
    let parts = x.par_chunks(per_task * k).map(q8k_activation).collect::<Result<Vec<_>, _>>()?;
    let act: Vec<u8> = parts.iter().flat_map(|p| p.0.iter().copied()).collect();
    let bsum: Vec<i16> = parts.iter().flat_map(|p| p.1.iter().copied()).collect();

    let chunk = (CHUNK_ACT_BYTES / (kb * Q8K_BYTES)).clamp(1, t);
    let tiles = n_out.div_ceil(TILE_ROWS);
    let per_thread = tiles.div_ceil(rayon::current_num_threads().max(1));
    let dst = OutPtr(out.as_mut_ptr() as *mut f32);
    let dst = &dst;
    (0..tiles.div_ceil(per_thread)).into_par_iter().for_each(|w| {
        let mut acc = vec![[0f32; TILE_ROWS]; chunk];
        for t0 in (0..t).step_by(chunk) {
            let tc = chunk.min(t - t0);
            let a = &act[t0 * kb * Q8K_BYTES..(t0 + tc) * kb * Q8K_BYTES];
            let s = &bsum[t0 * kb * 8..(t0 + tc) * kb * 8];
            for tile in w * per_thread..((w + 1) * per_thread).min(tiles) {
                let bytes = &packed[tile * kb * TILE_BYTES..(tile + 1) * kb * TILE_BYTES];
                tile_gemm(bytes, a, s, &mut acc[..tc]);
                let kept = TILE_ROWS.min(n_out - tile * TILE_ROWS);
                for (tok, y) in acc[..tc].iter().enumerate() {
                    for (r, v) in y[..kept].iter().enumerate() {
                        // SAFETY: (t0 + tok) < T and tile·8 + r < n_out, so the index is inside
                        // `out` (T × n_out); this thread alone owns the rows of `tile` (see OutPtr).
                        unsafe { dst.0.add((t0 + tok) * n_out + tile * TILE_ROWS + r).write(*v) };
                    }
                }
            }
        }
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
    use super::super::gemm::{gemm_packed, gemm_packed_ggml};
    use super::super::matmul::{matmul_vec_dot, QMatRef};
    use super::super::packed::pack;
    use super::*;
    use crate::cpu::test_signal as signal;
    use crate::quant;
    use crate::QuantType;

    /// Each (token, row) takes the one-token kernel's integer sums and float steps: equal.
    const SAME_AS_ONE_TOKEN_TOL: f32 = 0.0;
    /// Against ggml's GEMM and `vec_dot` (other summation orders, same quantised values).
    const OTHER_ORDER_REL_TOL: f32 = 1e-4;

    fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{what}: all-zero reference");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * scale, "{what} [{i}]: {x} vs {y} (scale {scale})");
        }
    }

    #[test]
    fn each_token_equals_the_one_token_kernel_and_matches_ggmls_gemm() {
        // (rows, K, tokens): 40 and 72 rows are odd numbers of row tiles (uneven thread split); 2560
        // columns with 50 tokens cross a token chunk (44 tokens of K = 2560 fill CHUNK_ACT_BYTES);
        // 2 tokens go one by one (under X8_GEMM_MIN_TOKENS), 3 are below ggml's 4-token groups
        for (n, k, t) in [(64, 512, 2), (40, 512, 3), (72, 256, 5), (32, 2560, 50), (16, 1024, 17)] {
            let mut f = signal(n * k, 0.37);
            f.iter_mut().enumerate().for_each(|(i, v)| *v = *v * (1.0 + (i / 97 % 13) as f32) + ((i / 331) % 7) as f32 * 0.3);
            let wq = quant::quantize_rows_vec(QuantType::Q4_K, &f, k).unwrap();
            let w = QMatRef::new(&wq, QuantType::Q4_K, n, k).unwrap();
            let Some(p) = pack(w).unwrap().filter(|p| p.layout == "CPU_REPACK" && avx2_available()) else {
                eprintln!("q4_K not in the interleaved layout on this CPU: kernel not run");
                return;
            };
            let x: Vec<f32> = signal(t * k, 0.11).iter().map(|v| v * 3.0 - 0.5).collect();
            let mut ours = vec![0f32; t * n];
            gemm_packed(&p, &x, &mut ours).unwrap();
            let mut one_by_one = vec![0f32; t * n];
            for (xr, or) in x.chunks(k).zip(one_by_one.chunks_mut(n)) {
                gemm_packed(&p, xr, or).unwrap();
            }
            let (mut ggml, mut rows) = (vec![0f32; t * n], vec![0f32; t * n]);
            gemm_packed_ggml(&p, &x, &mut ggml).unwrap();
            matmul_vec_dot(w, &x, &mut rows).unwrap();
            let what = |who: &str| format!("{n}x{k}, {t} tokens vs {who}");
            assert_close(&ours, &one_by_one, SAME_AS_ONE_TOKEN_TOL, &what("the one-token kernel"));
            assert_close(&ours, &ggml, OTHER_ORDER_REL_TOL, &what("ggml's GEMM"));
            assert_close(&ours, &rows, OTHER_ORDER_REL_TOL, &what("vec_dot"));
        }
    }

    #[test]
    fn wrong_shapes_are_refused() {
        if !avx2_available() {
            return;
        }
        let (n, k, t) = (8, 256, 2);
        let packed = vec![0u8; TILE_BYTES];
        let x = vec![0.5f32; t * k];
        let out = |len: usize| vec![MaybeUninit::new(0f32); len];
        assert!(matmul(&packed, n, k, n, &x, &mut out(t * n)).is_ok());
        assert!(matmul(&packed, n, 128, n, &x, &mut out(t * n)).is_err(), "K off the block size");
        assert!(matmul(&packed, 12, k, n, &x, &mut out(t * n)).is_err(), "rows off the tile");
        assert!(matmul(&packed[1..], n, k, n, &x, &mut out(t * n)).is_err(), "short packed bytes");
        assert!(matmul(&packed, n, k, n, &x[1..], &mut out(t * n)).is_err(), "activations not whole rows");
        assert!(matmul(&packed, n, k, n, &x, &mut out(t * n + 1)).is_err(), "output length");
        assert!(matmul(&packed, n, k, n + 8, &x, &mut out(t * (n + 8))).is_err(), "more kept rows than rows");
    }
}
