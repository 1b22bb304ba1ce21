//! What our one-token kernels on ggml's packed layouts share ([`super::q4k_matvec`] and
//! [`super::q8_0_matvec`] on the AMX layout, [`super::q4k_x8_matvec`] and [`super::q4_0_x8_matvec`]
//! on the interleaved one): the CPU checks, the shape checks, and the split of the weight's rows of
//! tiles over the threads. Each kernel brings only its tile arithmetic.
//!
//! Dims: K = n_cols, N = rows of the packed tensor (a multiple of the layout's [`Tiling::rows`]); a
//! "row of tiles" is `rows` weight rows × K, stored contiguously (`tile_row_bytes`), tiles
//! row-tile-major.

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

/// The kernels' shared test: ours against ggml's kernel and `vec_dot` on the same packed bytes.
#[cfg(test)]
pub(crate) mod testing {
    use super::super::gemm::{gemm_packed, gemm_packed_ggml, uses_own_matvec};
    use super::super::matmul::{matmul_vec_dot, QMatRef};
    use super::super::packed::pack;
    use super::Tiling;
    use crate::cpu::test_signal as signal;
    use crate::quant::QuantError;
    use crate::{quant, QuantType};

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

    /// A one-token kernel's entry point: `(packed, n_rows, x, out)`.
    pub(crate) type Matvec = fn(&[u8], usize, &[f32], &mut [f32]) -> Result<(), QuantError>;

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
