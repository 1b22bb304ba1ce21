//! What our kernels on ggml's packed layouts share: the one-token ones ([`super::q4k_matvec`] and
//! [`super::q8_0_matvec`] on the AMX layout, [`super::q4k_x8_matvec`] and [`super::q4_0_x8_matvec`]
//! on the interleaved one) and the many-token ones ([`super::q4k_x8_gemm`],
//! [`super::q4_0_x8_gemm`]): the CPU checks, the shape checks, and the split of the weight's rows of
//! tiles over the threads (and, for many tokens, of the tokens into chunks). Each kernel brings
//! only its tile arithmetic.
//!
//! Dims: K = n_cols, N = rows of the packed tensor (a multiple of the layout's [`Tiling::rows`]); a
//! "row of tiles" is `rows` weight rows × K, stored contiguously (`tile_row_bytes`), tiles
//! row-tile-major.

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use crate::quant::{self, GgmlType, QuantError};

/// Weight rows per tile, in every AMX layout.
pub const TILE_ROWS: usize = 16;

/// How one packed layout cuts a weight into tiles, as a kernel reads them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tiling {
    /// Weight rows per tile (16 in the AMX layouts, 8 in the interleaved ones).
    pub rows: usize,
    /// Columns per tile: the block size of the type.
    pub qk: usize,
    /// Bytes of one tile.
    pub bytes: usize,
}

/// Whether this CPU has what the one-token kernels on the AMX layouts use (AVX512 F/BW and VNNI).
pub fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU has what the one-token kernels on the interleaved layouts use (AVX2, FMA, F16C).
pub fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// q8_K block (what the q4_K kernels' activations are in): d (f32), 256 int8 quants, 16 sums of 16
/// quants (i16).
pub(crate) const Q8K_BYTES: usize = 4 + 256 + 32;

/// One token's activations for the q4_K kernels: `x` in q8_K (ggml's CPU converter), and each
/// block's 8 sums of 32 quants as i16 (what the mins multiply). `x.len()` must be a multiple of 256
/// (checked by the converter).
pub(crate) fn q8k_activation(x: &[f32]) -> Result<(Vec<u8>, Vec<i16>), QuantError> {
    let mut act = vec![0u8; x.len() / 256 * Q8K_BYTES];
    quant::quantize_activation(GgmlType::Q8_K, x, &mut act)?;
    let bsum32 = act
        .chunks_exact(Q8K_BYTES)
        .flat_map(|b| {
            let s = |i: usize| i16::from_le_bytes([b[4 + 256 + 2 * i], b[4 + 256 + 2 * i + 1]]);
            (0..8).map(move |g| s(2 * g) + s(2 * g + 1))
        })
        .collect();
    Ok((act, bsum32))
}

/// The shape of one token through a packed weight of `qtype` (K = `k` columns, cut as `tiling`
/// says), checked, and the CPU too (`cpu_ok`: the kernel's feature check): the packed bytes the kernel
/// may read (`packed` may be longer) and the bytes of one row of tiles.
#[allow(clippy::too_many_arguments)]
pub(crate) fn checked<'a>(
    qtype: GgmlType,
    op: &'static str,
    cpu_ok: bool,
    packed: &'a [u8],
    n_rows: usize,
    k: usize,
    out_len: usize,
    tiling: Tiling,
) -> Result<(&'a [u8], usize), QuantError> {
    let Tiling { rows, qk, bytes } = tiling;
    if !cpu_ok {
        return Err(QuantError::Unsupported { op, qtype });
    }
    if k == 0 || !k.is_multiple_of(qk) {
        return Err(QuantError::RowLength { qtype, n_per_row: k, block_size: qk });
    }
    if !n_rows.is_multiple_of(rows) {
        let what = "packed rows (a whole number of the layout's row tiles)";
        return Err(QuantError::Length { what, expected: n_rows / rows * rows, got: n_rows });
    }
    let tile_row_bytes = k / qk * bytes;
    let want = n_rows / rows * tile_row_bytes;
    let packed =
        packed.get(..want).ok_or(QuantError::Length { what: "packed weight bytes", expected: want, got: packed.len() })?;
    if out_len > n_rows {
        return Err(QuantError::Length { what: "output values (at most the packed rows)", expected: n_rows, got: out_len });
    }
    Ok((packed, tile_row_bytes))
}

/// Calls `f(tiles, rows)` for consecutive groups of up to `group` rows of tiles (`tile_rows` weight
/// rows each), `tiles` holding the group's bytes and `rows` its outputs (the last group may be
/// short, its last tile partly kept). Contiguous runs of groups, one per thread: each thread streams
/// one region of the weight.
pub(crate) fn for_each_group(
    packed: &[u8],
    tile_rows: usize,
    tile_row_bytes: usize,
    out: &mut [f32],
    group: usize,
    f: impl Fn(&[u8], &mut [f32]) + Sync,
) {
    let group_rows = tile_rows * group;
    let n_groups = out.len().div_ceil(group_rows);
    let per_thread = n_groups.div_ceil(rayon::current_num_threads().max(1)).max(1) * group_rows;
    out.par_chunks_mut(per_thread).enumerate().for_each(|(c, chunk)| {
        for (g, rows) in chunk.chunks_mut(group_rows).enumerate() {
            let first = (c * per_thread + g * group_rows) / tile_rows;
            let n_tiles = rows.len().div_ceil(tile_rows);
            f(&packed[first * tile_row_bytes..(first + n_tiles) * tile_row_bytes], rows);
        }
    });
}

/// Activation bytes of one chunk of tokens in [`gemm_by_tiles`]: a quarter of this CPU class's
/// 512 KiB L2, so the chunk stays there while every tile of the thread passes over it.
const CHUNK_ACT_BYTES: usize = 128 << 10;

/// Where [`gemm_by_tiles`]'s threads write: `out` as a raw pointer, each thread only the columns of
/// its own row tiles.
struct OutPtr(*mut f32);
// SAFETY: written only at (token, row) positions of the row tiles the writing thread owns; threads
// own disjoint runs of tiles, so no element is written twice, and none is read.
unsafe impl Sync for OutPtr {}

/// The threads' share of a many-token kernel on a tiled layout: one contiguous run of row tiles per
/// thread (each thread streams one region of the weight); for each chunk of tokens (as many as
/// [`CHUNK_ACT_BYTES`] of their activations, `act_bytes` each, hold) and each of its tiles, `f(tile, tokens, y)` gives `y[tok][r]` for the tile's `R` rows (`tile`: its
/// bytes, one row of tiles), which go to `out` (`[T, n_out]`, the kept rows only: the padding rows
/// of the last tile are dropped). The caller has checked the shapes: `packed` holds at least
/// `n_out.div_ceil(R)` rows of tiles of `tile_row_bytes`, and `out.len() == t · n_out`.
pub(crate) fn gemm_by_tiles<const R: usize>(
    packed: &[u8],
    tile_row_bytes: usize,
    n_out: usize,
    t: usize,
    act_bytes: usize,
    out: &mut [MaybeUninit<f32>],
    f: impl Fn(&[u8], Range<usize>, &mut [[f32; R]]) + Sync,
) {
    let tiles = n_out.div_ceil(R);
    assert!(out.len() == t * n_out && packed.len() >= tiles * tile_row_bytes, "gemm_by_tiles shapes");
    let chunk = (CHUNK_ACT_BYTES / act_bytes.max(1)).max(1);
    if tiles == 0 || t == 0 {
        return;
    }
    let per_thread = tiles.div_ceil(rayon::current_num_threads().max(1));
    let dst = OutPtr(out.as_mut_ptr() as *mut f32);
    let dst = &dst;
    (0..tiles.div_ceil(per_thread)).into_par_iter().for_each(|w| {
        let mut y = vec![[0f32; R]; chunk.min(t)];
        for t0 in (0..t).step_by(chunk) {
            let tc = chunk.min(t - t0);
            for tile in w * per_thread..((w + 1) * per_thread).min(tiles) {
                f(&packed[tile * tile_row_bytes..(tile + 1) * tile_row_bytes], t0..t0 + tc, &mut y[..tc]);
                let kept = R.min(n_out - tile * R);
                for (tok, y) in y[..tc].iter().enumerate() {
                    for (r, v) in y[..kept].iter().enumerate() {
                        // SAFETY: t0 + tok < t and tile·R + r < n_out, so the index is inside `out`
                        // (asserted t × n_out long); this thread alone owns the rows of `tile`.
                        unsafe { dst.0.add((t0 + tok) * n_out + tile * R + r).write(*v) };
                    }
                }
            }
        }
    });
}

/// The kernels' shared test: ours against ggml's kernel and `vec_dot` on the same packed bytes.
#[cfg(test)]
pub(crate) mod testing {
    use super::super::gemm::{gemm_packed, gemm_packed_ggml, uses_own_matvec, Gemm, Matvec};
    use super::super::matmul::{matmul_vec_dot, QMatRef};
    use super::super::packed::pack;
    use super::Tiling;
    use crate::cpu::test_signal as signal;
    use crate::{quant, QuantType};
    use std::mem::MaybeUninit;

    /// Rows of very different magnitude and offset: block scales (and q4_K's mins) over their
    /// whole range, q8_0's compensation ≠ 0.
    fn weights(q: QuantType, n: usize, k: usize) -> Vec<u8> {
        let mut f = signal(n * k, 0.37);
        f.iter_mut().enumerate().for_each(|(i, v)| *v = *v * (1.0 + (i / 97 % 13) as f32) + ((i / 331) % 7) as f32 * 0.3);
        quant::quantize_rows_vec(q, &f, k).unwrap()
    }

    fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{what}: all-zero reference");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * scale, "{what} [{i}]: {x} vs {y} (scale {scale})");
        }
    }

    /// `matvec` takes one row of two tiles, and refuses, with an error rather than a panic, K off
    /// the block size, rows off the tile rows, short packed bytes and more outputs than rows. Skips
    /// where the CPU lacks the kernel's features (`cpu_ok`).
    pub(crate) fn refuses_wrong_shapes(matvec: Matvec, t: Tiling, cpu_ok: bool) {
        if !cpu_ok {
            eprintln!("kernel not run on this CPU");
            return;
        }
        let packed = vec![0u8; 2 * t.bytes];
        let x = vec![0.5f32; 2 * t.qk];
        let out = |n: usize| vec![0f32; n];
        assert!(matvec(&packed, t.rows, &x, &mut out(t.rows)).is_ok());
        assert!(matvec(&packed, t.rows, &x[..t.qk + t.qk / 4], &mut out(t.rows)).is_err(), "K not a multiple of the block");
        assert!(matvec(&packed, t.rows + 4, &x, &mut out(t.rows)).is_err(), "rows not a multiple of the tile's");
        assert!(matvec(&packed[1..], t.rows, &x, &mut out(t.rows)).is_err(), "short packed bytes");
        assert!(matvec(&packed, t.rows, &x, &mut out(t.rows + 1)).is_err(), "more outputs than rows");
    }

    /// `gemm` takes two tokens through one row of two tiles, and refuses, with an error rather than
    /// a panic, K off the block size, rows off the tile rows, short packed bytes, activations that are
    /// not whole rows, a wrong output length and more kept rows than rows. Skips without AVX2.
    pub(crate) fn gemm_refuses_wrong_shapes(gemm: Gemm, t: Tiling) {
        if !super::avx2_available() {
            eprintln!("kernel not run on this CPU");
            return;
        }
        let (n, k, tok) = (t.rows, 2 * t.qk, 2);
        let packed = vec![0u8; 2 * t.bytes];
        let x = vec![0.5f32; tok * k];
        let out = |len: usize| vec![MaybeUninit::new(0f32); len];
        assert!(gemm(&packed, n, k, n, &x, &mut out(tok * n)).is_ok());
        let odd_k = t.qk + t.qk / 2;
        assert!(gemm(&packed, n, odd_k, n, &x[..tok * odd_k], &mut out(tok * n)).is_err(), "K off the block size");
        assert!(gemm(&packed, n + 4, k, n, &x, &mut out(tok * n)).is_err(), "rows off the tile");
        assert!(gemm(&packed[1..], n, k, n, &x, &mut out(tok * n)).is_err(), "short packed bytes");
        assert!(gemm(&packed, n, k, n, &x[1..], &mut out(tok * n)).is_err(), "activations not whole rows");
        assert!(gemm(&packed, n, k, n, &x, &mut out(tok * n + 1)).is_err(), "output length");
        assert!(gemm(&packed, n, k, n + 8, &x, &mut out(tok * (n + 8))).is_err(), "more kept rows than rows");
    }

    /// `(rows, K, tokens)` through `gemm_packed` on a `q` weight in the interleaved layout: each
    /// token's outputs equal what it gets alone (the one-token kernel; tolerance 0), and match ggml's
    /// GEMM on the same bytes and `vec_dot` within [`OTHER_ORDER_REL_TOL`]. Skips, saying why, where
    /// the CPU does not pack `q` that way.
    pub(crate) fn each_token_as_alone_and_near_ggml(q: QuantType, cases: &[(usize, usize, usize)]) {
        /// Against ggml's GEMM and `vec_dot`: other summation orders, same quantised values.
        const OTHER_ORDER_REL_TOL: f32 = 1e-4;
        for &(n, k, t) in cases {
            let wq = weights(q, n, k);
            let w = QMatRef::new(&wq, q, n, k).unwrap();
            let Some(p) = pack(w).unwrap().filter(|p| p.layout == "CPU_REPACK" && super::avx2_available()) else {
                eprintln!("{q} not in the interleaved layout on this CPU: kernel not run");
                return;
            };
            let x: Vec<f32> = signal(t * k, 0.11).iter().map(|v| v * 3.0 - 0.5).collect();
            let mut ours = vec![0f32; t * n];
            gemm_packed(&p, &x, &mut ours).unwrap();
            let mut alone = vec![0f32; t * n];
            for (xr, or) in x.chunks(k).zip(alone.chunks_mut(n)) {
                gemm_packed(&p, xr, or).unwrap();
            }
            let (mut ggml, mut rows) = (vec![0f32; t * n], vec![0f32; t * n]);
            gemm_packed_ggml(&p, &x, &mut ggml).unwrap();
            matmul_vec_dot(w, &x, &mut rows).unwrap();
            let what = |who: &str| format!("{q} {n}x{k}, {t} tokens vs {who}");
            assert_eq!(ours, alone, "{}", what("each token alone"));
            assert_close(&ours, &ggml, OTHER_ORDER_REL_TOL, &what("ggml's GEMM"));
            assert_close(&ours, &rows, OTHER_ORDER_REL_TOL, &what("vec_dot"));
        }
    }

    /// One token through `gemm_packed` (which picks our kernel) against ggml's kernel within
    /// `ggml_tol` and against `vec_dot` within `vec_dot_tol`, both relative to the largest output,
    /// for each `(n, k)`. Skips, saying why, where the CPU does not pack `q` into `layout` or does not
    /// run our kernel on it.
    pub(crate) fn against_ggml_and_vec_dot(
        q: QuantType,
        layout: &str,
        shapes: &[(usize, usize)],
        ggml_tol: f32,
        vec_dot_tol: f32,
    ) {
        for &(n, k) in shapes {
            let wq = weights(q, n, k);
            let w = QMatRef::new(&wq, q, n, k).unwrap();
            let Some(p) = pack(w).unwrap() else {
                eprintln!("{q}: no packed layout on this CPU");
                return;
            };
            if p.layout != layout || !uses_own_matvec(&p) {
                eprintln!("{q} packed as {} on this CPU, our kernel for {layout} not run", p.layout);
                return;
            }
            let x = signal(k, 0.11).iter().map(|v| v * 3.0 - 0.5).collect::<Vec<f32>>();
            let (mut ours, mut theirs, mut rows) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            gemm_packed(&p, &x, &mut ours).unwrap();
            gemm_packed_ggml(&p, &x, &mut theirs).unwrap();
            matmul_vec_dot(w, &x, &mut rows).unwrap();
            assert_close(&ours, &theirs, ggml_tol, &format!("{q} {n}x{k} vs ggml's {layout} kernel"));
            assert_close(&ours, &rows, vec_dot_tol, &format!("{q} {n}x{k} vs vec_dot"));
        }
    }
}
