//! Several tokens through a q4_K weight held in ggml's AMX layout ([`super::q4k_matvec`] documents
//! the layout): our own AMX kernel, used for prefill in place of ggml's.
//!
//! ggml's q4_K AMX kernel works in int8: for every 32 tokens × 32 weight rows it unpacks each
//! 32-value group of nibbles to int8 again, multiplies one group at a time (K = 32 per tile
//! product), stores the product tile and applies the group's scale with AVX-512 — per token block,
//! so a weight is unpacked once for every 32 tokens. Here the weight is dequantised once per call to
//! bf16 (`d·scale·q − dmin·min`, rounded to nearest even), a few hundred columns at a time into a
//! buffer that stays in L1, and every token block multiplies it with `TDPBF16PS`: the scales are in
//! the weights, so a tile product covers a whole 32-value step and the four accumulator tiles stay
//! in tile registers across the chunk. Activations are rounded to bf16 once per call (8 significant
//! bits per value, where ggml's q8_K keeps 8 bits per 256-value block); with the weights rounded
//! too, results differ from exact products about as much as ggml's do (tests; BENCHMARKS.md).
//!
//! The AMX instructions are written as inline assembly (Rust has no stable AMX intrinsics). Tile
//! registers are per thread; ggml configures them once per thread and assumes they stay so, so each
//! worker saves the tile configuration it finds and loads it back when done.
//!
//! Dims: T = tokens (activation rows), K = n_cols (multiple of 256), N = packed weight rows
//! (multiple of 16), N_out ≤ N = outputs kept; KB = K / 256. Tiles: A = 16 tokens × 32 bf16,
//! B = 32 k (as 16 pairs) × 16 weight rows in VNNI order, C = 16 tokens × 16 rows f32.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::matmul::token_count;
use super::q4k_matvec::{TILE_ROWS, TILING};
use super::row_tiles::checked;
use crate::quant::{GgmlType, QuantError};

/// Values per q4_K block (one packed tile's columns).
const QK: usize = 256;
/// k values per tile product step (one 32-value scale group of q4_K).
const STEP_K: usize = 32;
/// q4_K blocks dequantised per chunk: 2 × 2 tiles × 8 steps × 1 KiB = 32 KiB of bf16 weights,
/// inside a core's 48 KiB L1 while every token block reads them.
const CHUNK_BLOCKS: usize = 2;
/// u16 values of one B tile (16 pairs × 16 rows × 2).
const B_TILE: usize = 512;
/// Steps in a chunk at most.
const CHUNK_STEPS: usize = CHUNK_BLOCKS * QK / STEP_K;
/// Tokens per A tile.
const TILE_M: usize = 16;
/// Weight rows per block of two C tiles (the output columns one worker writes at a time).
const BLOCK_N: usize = 2 * TILE_ROWS;

/// Whether this CPU (and OS) runs the kernel: AVX512 F/BW/BF16, AMX tiles with bf16, and the
/// kernel's permission to use the tile data state (Linux asks programs to request it).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
                && x86::has_amx_bf16()
                && x86::request_tile_data()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        false
    })
}

/// `out[T, N_out] = x[T, K] · W[N_out, K]ᵀ` for the first `n_out` of the `n_rows` rows of a q4_K
/// weight in ggml's AMX layout (`packed` starts with its `n_rows / 16 · K / 256` tiles; a buffer may
/// be longer). Every element of `out` is written.
pub fn matmul(
    packed: &[u8],
    n_rows: usize,
    k: usize,
    n_out: usize,
    x: &[f32],
    out: &mut [MaybeUninit<f32>],
) -> Result<(), QuantError> {
    let t = token_count(k, n_out, x.len(), out.len())?;
    let (packed, _) = checked(GgmlType::Q4_K, "q4_K AMX-BF16 matmul (this CPU)", available(), packed, n_rows, k, n_out, TILING)?;
    if t == 0 || n_out == 0 {
        return Ok(());
    }
    let t_pad = t.div_ceil(TILE_M) * TILE_M;
    // activations in bf16 as A tiles, each 1 KiB contiguous: `[T/16][K/32][16 tokens][32 values]`,
    // padded with zero rows (a tile product streams them from L2 in order)
    let mut a_buf = CacheLines::<u16>::zeroed(t_pad * k);
    let a = a_buf.as_mut_slice();
    a.par_chunks_mut(TILE_M * k).zip(x.par_chunks(TILE_M * k)).for_each(|(tiles, rows)| {
        for (r, row) in rows.chunks_exact(k).enumerate() {
            to_bf16(row, &mut tiles[r * STEP_K..], B_TILE);
        }
    });

    let n_blocks = n_out.div_ceil(BLOCK_N);
    let threads = rayon::current_num_threads().max(1);
    let per_thread = n_blocks.div_ceil(threads);
    let job = Job { packed, k, t, t_pad, a, n_out, out: OutPtr(out.as_mut_ptr() as *mut f32) };
    (0..n_blocks.div_ceil(per_thread)).into_par_iter().for_each(|w| {
        let blocks = w * per_thread..((w + 1) * per_thread).min(n_blocks);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available()` held above; each worker writes only the output columns of its own
        // blocks (disjoint ranges of `blocks`), so no two write the same element.
        unsafe {
            x86::run_blocks(&job, blocks)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("available() is false off x86_64 ({blocks:?}, {})", job.k);
    });
    Ok(())
}

/// One call's shared inputs, read by every worker.
struct Job<'a> {
    packed: &'a [u8],
    k: usize,
    t: usize,
    t_pad: usize,
    /// bf16 activations in A tiles: `[t_pad / 16][K / 32][16][32]`.
    a: &'a [u16],
    n_out: usize,
    /// `[T, N_out]` output, written by column blocks.
    out: OutPtr,
}

/// A zeroed buffer whose first element starts a cache line whatever the global allocator: tile
/// rows are 64-byte loads and stores, and one that straddles two lines costs about twice as much.
struct CacheLines<T> {
    buf: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Copy + Default> CacheLines<T> {
    fn zeroed(len: usize) -> CacheLines<T> {
        let spare = 64 / std::mem::size_of::<T>();
        let buf = vec![T::default(); len + spare];
        let start = buf.as_ptr().align_offset(64).min(spare);
        CacheLines { buf, start, len }
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

struct OutPtr(*mut f32);
// SAFETY: workers write disjoint column ranges of the output through this pointer (see `matmul`).
unsafe impl Sync for OutPtr {}

/// f32 → bf16, round to nearest even (the same rounding as `VCVTNE2PS2BF16`; no NaNs in
/// activations): each run of 32 values of `src` (a multiple of 32 long) to `dst` at `stride` steps.
fn to_bf16(src: &[f32], dst: &mut [u16], stride: usize) {
    assert!(src.len().is_multiple_of(STEP_K) && stride >= STEP_K, "bf16 runs of 32 values");
    assert!(src.is_empty() || dst.len() >= (src.len() / STEP_K - 1) * stride + STEP_K, "bf16 destination length");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: `available()` checked the CPU features; the lengths were asserted just above.
        unsafe { x86::to_bf16(src, dst.as_mut_ptr(), stride) };
        return;
    }
    for (run, s) in src.chunks_exact(STEP_K).enumerate() {
        for (d, v) in dst[run * stride..][..STEP_K].iter_mut().zip(s) {
            *d = bf16_scalar(*v);
        }
    }
}

/// Round-to-nearest-even f32 → bf16 (finite values), the scalar reference of the tests.
pub(crate) fn bf16_scalar(v: f32) -> u16 {
    let b = v.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::super::q4k_matvec::TILE_BYTES;
    use super::*;

    /// Byte offsets inside a packed tile (see `q4k_matvec`).
    const OFF_SCALES: usize = 2048;
    const OFF_MINS: usize = OFF_SCALES + 8 * TILE_ROWS;
    const OFF_D: usize = OFF_MINS + 8 * TILE_ROWS;
    const OFF_DMIN: usize = OFF_D + 2 * TILE_ROWS;

    /// CPUID leaf 7: AMX-TILE (EDX bit 24) and AMX-BF16 (EDX bit 22).
    pub(super) fn has_amx_bf16() -> bool {
        // leaf 7 read only where the CPU has it (CPUID itself exists on every x86_64 CPU)
        let (max, edx) = (__cpuid(0).eax, __cpuid_count(7, 0).edx);
        max >= 7 && edx & (1 << 24) != 0 && edx & (1 << 22) != 0
    }

    /// Linux: ask for the AMX tile data state (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); process-wide,
    /// idempotent, and refused when the kernel does not support AMX.
    #[cfg(target_os = "linux")]
    pub(super) fn request_tile_data() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments; it touches no memory of ours.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }

    /// The 64-byte tile configuration (palette 1): all eight tiles 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    impl TileConfig {
        fn ours() -> TileConfig {
            let mut c = [0u8; 64];
            c[0] = 1;
            for t in 0..8 {
                c[16 + 2 * t] = 64; // colsb (u16 little-endian)
                c[48 + t] = 16; // rows
            }
            TileConfig(c)
        }
    }

    /// # Safety
    /// `available()` is true; `blocks` are this worker's own 32-row blocks (< N_out / 32 rounded up),
    /// and no other thread writes their output columns.
    pub(super) unsafe fn run_blocks(job: &Job, blocks: std::ops::Range<usize>) {
        let kb = job.k / QK;
        let steps_total = job.k / STEP_K;
        let mut saved = TileConfig([0; 64]);
        // B: [2 n-tiles][CHUNK_STEPS][512] bf16 weights of one chunk; C: [t_pad, 32] f32 sums
        let (mut b_buf, mut c_buf) =
            (CacheLines::<u16>::zeroed(2 * CHUNK_STEPS * B_TILE), CacheLines::<f32>::zeroed(job.t_pad * BLOCK_N));
        let (b, c) = (b_buf.as_mut_slice(), c_buf.as_mut_slice());
        let n_tiles = job.n_out.div_ceil(TILE_ROWS);
        // SAFETY: the configuration buffers are 64 bytes and 64-aligned; the saved one is loaded
        // back below, so ggml finds on this thread the tiles it configured (or none).
        unsafe {
            asm!("sttilecfg [{}]", in(reg) saved.0.as_mut_ptr(), options(nostack));
            asm!("ldtilecfg [{}]", in(reg) TileConfig::ours().0.as_ptr(), options(nostack));
        }
        for nb in blocks {
            let nt = (n_tiles - 2 * nb).min(2);
            let n0 = nb * BLOCK_N;
            // token block m's sums go straight to the output on the last chunk when its tiles lie
            // wholly inside it; the others (partial tiles) through `c` and a copy of their real part
            let direct = |m: usize| {
                let rows = (job.t_pad - m).min(2 * TILE_M);
                m + rows <= job.t && n0 + nt * TILE_ROWS <= job.n_out
            };
            for kb0 in (0..kb).step_by(CHUNK_BLOCKS) {
                let cb = CHUNK_BLOCKS.min(kb - kb0);
                for j in 0..nt {
                    for i in 0..cb {
                        let tile = &job.packed[((2 * nb + j) * kb + kb0 + i) * TILE_BYTES..][..TILE_BYTES];
                        let dst = &mut b[(j * CHUNK_STEPS + i * 8) * B_TILE..][..8 * B_TILE];
                        // SAFETY: AVX512 F/BW/BF16 present (`available()`); sizes are exact slices.
                        unsafe { dequant_tile(tile, dst) };
                    }
                }
                let steps = cb * QK / STEP_K;
                for m in (0..job.t_pad).step_by(2 * TILE_M) {
                    let a = job.a[(m / TILE_M * steps_total + kb0 * QK / STEP_K) * B_TILE..].as_ptr();
                    let cp = c[m * BLOCK_N..].as_mut_ptr();
                    let two_m = job.t_pad - m >= 2 * TILE_M;
                    let first = kb0 == 0;
                    let store = if kb0 + cb == kb && direct(m) {
                        // SAFETY: rows m.. (16 or 32 of them, all < T) and columns n0..n0 + 16·nt
                        // (≤ N_out) of the `[T, N_out]` output, which only this worker writes.
                        (unsafe { job.out.0.add(m * job.n_out + n0) }, job.n_out)
                    } else {
                        (cp, BLOCK_N)
                    };
                    // SAFETY: A tiles of token tiles m/16 (and m/16 + 1) < t_pad/16, steps < K/32; B
                    // reads `steps` tiles per n-tile of `b`; C rows m..m+32 < t_pad of `c` (stride
                    // 32 f32); `store` as above.
                    unsafe {
                        match (two_m, nt == 2) {
                            (true, true) => tile_block::<2, 2>(a, steps_total, b.as_ptr(), steps, cp, first, store),
                            (true, false) => tile_block::<2, 1>(a, steps_total, b.as_ptr(), steps, cp, first, store),
                            (false, true) => tile_block::<1, 2>(a, steps_total, b.as_ptr(), steps, cp, first, store),
                            (false, false) => tile_block::<1, 1>(a, steps_total, b.as_ptr(), steps, cp, first, store),
                        }
                    }
                }
            }
            let width = BLOCK_N.min(job.n_out - n0);
            for (row, sums) in c.chunks_exact(BLOCK_N).take(job.t).enumerate() {
                if direct(row / (2 * TILE_M) * 2 * TILE_M) {
                    continue;
                }
                // SAFETY: row < T and columns n0..n0+width < N_out lie inside the `[T, N_out]`
                // output; only this worker writes columns of block `nb`.
                unsafe { std::ptr::copy_nonoverlapping(sums.as_ptr(), job.out.0.add(row * job.n_out + n0), width) };
            }
        }
        // SAFETY: `saved` holds what `sttilecfg` stored (all zeros when tiles were unconfigured,
        // which loads as "no tiles").
        unsafe { asm!("ldtilecfg [{}]", in(reg) saved.0.as_ptr(), options(nostack)) };
    }

    /// `C[MT·16, NT·16] (+)= A[MT·16, steps·32] · B` with tiles: tmm0/1 = A token tiles 0/1,
    /// tmm2/3 = B n-tiles 0/1, tmm4..7 = C (m, n) = (0,0), (0,1), (1,0), (1,1).
    ///
    /// # Safety
    /// Our tile configuration is loaded; `a` points at `steps` consecutive A tiles of a token tile,
    /// and (MT = 2) the next token tile's start `a_steps` tiles further; `b` holds 2 × CHUNK_STEPS B
    /// tiles; `c` has MT·16 rows of 32 f32 (the sums so far, read unless `first`); the sums are
    /// stored at `store.0`, MT·16 rows of NT·16 f32 `store.1` floats apart.
    unsafe fn tile_block<const MT: usize, const NT: usize>(
        a: *const u16,
        a_steps: usize,
        b: *const u16,
        steps: usize,
        c: *mut f32,
        first: bool,
        store: (*mut f32, usize),
    ) {
        let (sa, sc, sb) = (64usize, BLOCK_N * 4, 64usize);
        let (d, sd) = (store.0, store.1 * 4);
        let (d01, d10, d11) =
            (d.wrapping_add(TILE_ROWS), d.wrapping_add(TILE_M * store.1), d.wrapping_add(TILE_M * store.1 + TILE_ROWS));
        let a1 = a.wrapping_add(a_steps * B_TILE);
        let b1 = b.wrapping_add(CHUNK_STEPS * B_TILE);
        let (c01, c10, c11) =
            (c.wrapping_add(TILE_ROWS), c.wrapping_add(TILE_M * BLOCK_N), c.wrapping_add(TILE_M * BLOCK_N + TILE_ROWS));
        // SAFETY: (whole body) the caller's ranges; every tile access is 16 rows × 64 bytes with the
        // stride given, inside the buffers described above. Tiles that MT/NT leave out are untouched.
        unsafe {
            if first {
                asm!("tilezero tmm4", "tilezero tmm5", "tilezero tmm6", "tilezero tmm7", options(nostack));
            } else {
                asm!("tileloadd tmm4, [{p} + {s}*1]", p = in(reg) c, s = in(reg) sc, options(nostack));
                if NT == 2 {
                    asm!("tileloadd tmm5, [{p} + {s}*1]", p = in(reg) c01, s = in(reg) sc, options(nostack));
                }
                if MT == 2 {
                    asm!("tileloadd tmm6, [{p} + {s}*1]", p = in(reg) c10, s = in(reg) sc, options(nostack));
                }
                if MT == 2 && NT == 2 {
                    asm!("tileloadd tmm7, [{p} + {s}*1]", p = in(reg) c11, s = in(reg) sc, options(nostack));
                }
            }
            for s in 0..steps {
                let (pa0, pa1) = (a.add(s * B_TILE), a1.wrapping_add(s * B_TILE));
                let (pb0, pb1) = (b.add(s * B_TILE), b1.wrapping_add(s * B_TILE));
                asm!("tileloadd tmm0, [{p} + {s}*1]", "tileloadd tmm2, [{q} + {t}*1]", "tdpbf16ps tmm4, tmm0, tmm2",
                    p = in(reg) pa0, s = in(reg) sa, q = in(reg) pb0, t = in(reg) sb, options(nostack));
                if NT == 2 {
                    asm!("tileloadd tmm3, [{q} + {t}*1]", "tdpbf16ps tmm5, tmm0, tmm3", q = in(reg) pb1, t = in(reg) sb, options(nostack));
                }
                if MT == 2 {
                    asm!("tileloadd tmm1, [{p} + {s}*1]", "tdpbf16ps tmm6, tmm1, tmm2", p = in(reg) pa1, s = in(reg) sa, options(nostack));
                }
                if MT == 2 && NT == 2 {
                    asm!("tdpbf16ps tmm7, tmm1, tmm3", options(nostack));
                }
            }
            asm!("tilestored [{p} + {s}*1], tmm4", p = in(reg) d, s = in(reg) sd, options(nostack));
            if NT == 2 {
                asm!("tilestored [{p} + {s}*1], tmm5", p = in(reg) d01, s = in(reg) sd, options(nostack));
            }
            if MT == 2 {
                asm!("tilestored [{p} + {s}*1], tmm6", p = in(reg) d10, s = in(reg) sd, options(nostack));
            }
            if MT == 2 && NT == 2 {
                asm!("tilestored [{p} + {s}*1], tmm7", p = in(reg) d11, s = in(reg) sd, options(nostack));
            }
        }
    }

    /// One packed 16-row × 256-column tile → 8 B tiles (one per 32-value group) of bf16 weights
    /// `d·scale_g·q − dmin·min_g` in VNNI order: row p of step g holds, for weight rows r = 0..16,
    /// the values 2p and 2p + 1 of group g.
    ///
    /// A 64-byte quant line seen as 16 dwords has weight row r in dword r, so each of its 8 values
    /// per row is a shift and a mask away, already in the lane of its row: one row's scale and min
    /// per lane, no shuffles but the final pairing of two values per dword.
    ///
    /// # Safety
    /// AVX512 F/BW/BF16 present.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn dequant_tile(tile: &[u8], dst: &mut [u16]) {
        assert!(tile.len() == TILE_BYTES && dst.len() == 8 * B_TILE, "tile / B buffer sizes");
        let (p, o) = (tile.as_ptr(), dst.as_mut_ptr());
        // SAFETY: (whole body) reads stay within the tile's 2368 bytes at the layout's offsets,
        // writes within the 8 × 512 u16 of `dst`; all loads and stores are unaligned ones.
        unsafe {
            let nib = _mm512_set1_epi32(0x0F);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(OFF_D) as *const _));
            let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(OFF_DMIN) as *const _));
            // words 0..16 = the first value of rows 0..16, 16..32 the second: row r's pair to dword r
            let pair_up = _mm512_set_epi16(
                31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                16, 0,
            );
            for g in 0..8 {
                let sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(OFF_SCALES + g * TILE_ROWS) as *const _)));
                // mins are stored in pairs [g/2][r][g%2]: 16 u16 of which this group is one byte
                let pairs = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.add(OFF_MINS + g / 2 * 32) as *const _));
                let mn =
                    if g % 2 == 0 { _mm512_and_si512(pairs, _mm512_set1_epi32(0xFF)) } else { _mm512_srli_epi32::<8>(pairs) };
                let ds = _mm512_mul_ps(d, sc);
                let dm = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(mn));
                let value = |q: __m512i| _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, nib)), ds, dm);
                let out = o.add(g * B_TILE);
                for q in 0..4 {
                    let line = _mm512_loadu_si512(p.add((4 * g + q) * 64) as *const _);
                    // byte j's low nibble is value 8q + j, its high nibble 8q + 4 + j (j = 0..4)
                    let v: [__m512; 8] = [
                        value(line),
                        value(_mm512_srli_epi32::<8>(line)),
                        value(_mm512_srli_epi32::<16>(line)),
                        value(_mm512_srli_epi32::<24>(line)),
                        value(_mm512_srli_epi32::<4>(line)),
                        value(_mm512_srli_epi32::<12>(line)),
                        value(_mm512_srli_epi32::<20>(line)),
                        value(_mm512_srli_epi32::<28>(line)),
                    ];
                    for h in 0..4 {
                        // pair 4q + h holds values 8q + 2h and 8q + 2h + 1
                        let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(v[2 * h + 1], v[2 * h]));
                        _mm512_storeu_si512(out.add((4 * q + h) * 32) as *mut _, _mm512_permutexvar_epi16(pair_up, both));
                    }
                }
            }
        }
    }

    /// # Safety
    /// AVX512 F/BF16 present; `src` is a multiple of 32 long and `dst` holds a run of 32 u16 at
    /// every multiple of `stride` below `src.len() / 32 · stride`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn to_bf16(src: &[f32], dst: *mut u16, stride: usize) {
        // SAFETY: 32 values read and written per run, within the lengths the caller guarantees.
        unsafe {
            for (run, i) in (0..src.len()).step_by(STEP_K).enumerate() {
                let lo = _mm512_loadu_ps(src.as_ptr().add(i));
                let hi = _mm512_loadu_ps(src.as_ptr().add(i + 16));
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst.add(run * stride) as *mut _, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::gemm::{as_uninit, gemm_packed, gemm_packed_ggml};
    use super::super::matmul::QMatRef;
    use super::super::packed::{pack, PackedMat};
    use super::super::q4k_matvec::TILE_BYTES;
    use super::*;
    use crate::cpu::test_signal as signal;
    use crate::quant;
    use crate::QuantType;

    /// Against the same bf16 operands summed in f64: the kernel sums in f32 in another order, and
    /// its fused `q·d·scale − dmin·min` may round a weight to the neighbouring bf16 now and then.
    const SAME_OPERANDS_REL_TOL: f32 = 1e-4;
    /// Against ggml's kernel (q8_K activations, exact weights): bf16 keeps 8 significant bits of
    /// each weight and activation, q8_K 8 bits per 256-value block; both errors average out over K.
    const GGML_REL_TOL: f32 = 1e-2;

    fn weights(n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
        // rows of very different magnitude and offset: scales and mins over their whole range
        let mut f = signal(n * k, 0.37);
        f.iter_mut().enumerate().for_each(|(i, v)| *v = *v * (1.0 + (i / 97 % 13) as f32) + ((i / 331) % 7) as f32 * 0.3);
        let q = quant::quantize_rows_vec(QuantType::Q4_K, &f, k).unwrap();
        let mut deq = vec![0f32; n * k];
        quant::dequantize_rows(QuantType::Q4_K, &q, &mut deq).unwrap();
        (q, deq)
    }

    fn bf(v: f32) -> f64 {
        f32::from_bits((bf16_scalar(v) as u32) << 16) as f64
    }

    fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{what}: all-zero reference");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * scale, "{what} [{i}]: {x} vs {y} (scale {scale})");
        }
    }

    fn packed_amx(q: &[u8], n: usize, k: usize) -> Option<PackedMat> {
        let p = pack(QMatRef::new(q, QuantType::Q4_K, n, k).unwrap()).unwrap()?;
        (p.layout == "AMX").then_some(p)
    }

    #[test]
    fn matches_the_same_bf16_operands_summed_in_f64() {
        if !available() {
            eprintln!("no AMX-BF16: kernel not run on this CPU");
            return;
        }
        // K = 768: an odd block count (a one-block chunk last); 70 rows: a partial 16-row tile kept
        // and a partial 32-row block; 17 and 33 tokens: partial token tiles
        for (n, k) in [(64, 512), (70, 768), (48, 2560), (160, 256)] {
            let (q, deq) = weights(n, k);
            let Some(p) = packed_amx(&q, n, k) else {
                eprintln!("q4_K not packed in the AMX layout here: kernel not run");
                return;
            };
            for t in [1usize, 3, 16, 17, 33, 70] {
                let x = signal(t * k, 0.11).iter().map(|v| v * 3.0 - 0.5).collect::<Vec<f32>>();
                let mut ours = vec![0f32; t * n];
                matmul(p.bytes(), p.padded_rows, k, n, &x, as_uninit(&mut ours)).unwrap();
                let want: Vec<f32> = (0..t * n)
                    .map(|i| {
                        let (tt, r) = (i / n, i % n);
                        (0..k).map(|j| bf(deq[r * k + j]) * bf(x[tt * k + j])).sum::<f64>() as f32
                    })
                    .collect();
                assert_close(&ours, &want, SAME_OPERANDS_REL_TOL, &format!("{t}x{k} · {n}x{k}"));
            }
        }
    }

    #[test]
    fn agrees_with_ggmls_kernel_and_leaves_its_tiles_as_they_were() {
        if !available() {
            eprintln!("no AMX-BF16: kernel not run on this CPU");
            return;
        }
        let (n, k, t) = (96, 1024, 40);
        let (q, _) = weights(n, k);
        let Some(p) = packed_amx(&q, n, k) else {
            eprintln!("q4_K not packed in the AMX layout here: kernel not run");
            return;
        };
        let x = signal(t * k, 0.23).iter().map(|v| v * 2.0 + 0.25).collect::<Vec<f32>>();
        // one thread: ggml's kernel and ours run on the same thread, which keeps ggml's tile setup
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let (before, ours, after) = pool.install(|| {
            let mut before = vec![0f32; t * n];
            gemm_packed_ggml(&p, &x, &mut before).unwrap();
            let mut ours = vec![0f32; t * n];
            matmul(p.bytes(), p.padded_rows, k, n, &x, as_uninit(&mut ours)).unwrap();
            let mut after = vec![0f32; t * n];
            gemm_packed_ggml(&p, &x, &mut after).unwrap();
            (before, ours, after)
        });
        assert_eq!(before, after, "ggml's kernel after ours: same bits as before");
        assert_close(&ours, &before, GGML_REL_TOL, "ours vs ggml's AMX kernel");
        // and the dispatcher's result for these many tokens is ours
        let mut via = vec![0f32; t * n];
        gemm_packed(&p, &x, &mut via).unwrap();
        assert_eq!(via, ours, "gemm_packed takes this kernel");
    }

    #[test]
    fn wrong_shapes_are_refused() {
        if !available() {
            return;
        }
        let packed = vec![0u8; 2 * TILE_BYTES];
        let x = vec![0.5f32; 2 * 512];
        let mut out = vec![MaybeUninit::new(0f32); 2 * 16];
        assert!(matmul(&packed, 16, 512, 16, &x, &mut out).is_ok());
        assert!(matmul(&packed, 16, 300, 16, &x[..600], &mut out).is_err(), "K not a multiple of 256");
        assert!(matmul(&packed, 16, 512, 16, &x[..700], &mut out).is_err(), "not whole rows of K");
        assert!(matmul(&packed, 20, 512, 16, &x, &mut out).is_err(), "rows not a multiple of 16");
        assert!(matmul(&packed[1..], 16, 512, 16, &x, &mut out).is_err(), "short packed bytes");
        assert!(matmul(&packed, 16, 512, 17, &x, &mut out).is_err(), "more outputs than rows");
        assert!(matmul(&packed, 16, 512, 16, &x, &mut out[1..]).is_err(), "output length");
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        assert_eq!(bf16_scalar(1.0), 0x3F80);
        // halfway cases: ties go to the even neighbour
        assert_eq!(bf16_scalar(f32::from_bits(0x3F80_8000)), 0x3F80);
        assert_eq!(bf16_scalar(f32::from_bits(0x3F81_8000)), 0x3F82);
        assert_eq!(bf16_scalar(f32::from_bits(0x3F80_8001)), 0x3F81);
        if available() {
            let src = signal(64, 0.7).iter().map(|v| v * 1e3).collect::<Vec<f32>>();
            let mut dst = vec![0u16; 64];
            to_bf16(&src, &mut dst, STEP_K);
            assert!(src.iter().zip(&dst).all(|(s, d)| bf16_scalar(*s) == *d), "vector and scalar rounding agree");
        }
    }
}
