//! Batched quantized matmul through ggml's own CPU `mul_mat` (a one-node ggml graph over our buffers):
//! for several tokens at once (prefill, the vision tower) ggml's kernel — llamafile's tinyBLAS where the
//! type and the CPU allow it, else ggml's blocked `vec_dot` — beats calling `vec_dot` per (row, token).
//! [`gemm_packed`] runs the same one-node graph on a weight repacked into one of ggml-cpu's extra
//! buffer types ([`super::packed`]), which dispatches to that layout's kernel (AMX, interleaved GEMV).
//!
//! Dims: T = n_tokens (activation rows), K = n_cols (shared), N = n_rows (weight rows / outputs).
//! ggml's view of the same buffers: src0 = W with ne = [K, N], src1 = x with ne = [K, T],
//! dst = out with ne = [N, T] — row-major `out[T, N]`, exactly our layout, so nothing is copied.
//!
//! One persistent ggml thread pool per process (created on first use with rayon's thread count, then
//! reused, with the context memory and the scratch buffer), so no call spawns threads or allocates. Calls are serialised by a mutex: the model runs one matmul at a time.

use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::ptr;
use std::sync::Mutex;

use llama_cpp_sys_2 as sys;

use super::matmul::{token_count, QMatRef};
use super::packed::PackedMat;
use crate::quant::{self, QuantError, QuantType};

/// ggml's worker threads, the scratch buffer its plans ask for (activations converted to the weight
/// type's dot partner live there) and the memory of the per-call context (3 tensor headers + a graph),
/// all made once and reused by every call.
struct Pool {
    threadpool: *mut sys::ggml_threadpool,
    n_threads: usize,
    work: Vec<u8>,
    ctx_mem: Vec<u8>,
}

/// Nodes of the one-matmul graph (ggml's default graph holds 2,048, sized for whole models).
const GRAPH_NODES: usize = 4;

// SAFETY: the pool is only ever touched with `POOL`'s mutex held, so at most one thread uses the
// ggml thread pool handle at a time; ggml's pool itself is made to be driven from any thread.
unsafe impl Send for Pool {}

impl Pool {
    fn new(n_threads: usize) -> Result<Pool, QuantError> {
        // SAFETY: plain-data parameters from ggml's own defaults; `ggml_threadpool_new` copies them.
        let threadpool = unsafe {
            let mut params = sys::ggml_threadpool_params_default(n_threads as i32);
            params.poll = 0; // sleep between calls instead of spinning against rayon's workers
            sys::ggml_threadpool_new(&mut params)
        };
        if threadpool.is_null() {
            return Err(QuantError::Ggml { what: "thread pool", status: -1 });
        }
        // SAFETY: pure size queries.
        let ctx_bytes = unsafe { 3 * sys::ggml_tensor_overhead() + sys::ggml_graph_overhead_custom(GRAPH_NODES, false) } + 1024;
        Ok(Pool { threadpool, n_threads, work: Vec::new(), ctx_mem: vec![0u8; ctx_bytes] })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: `threadpool` came from `ggml_threadpool_new`, is non-null and is freed exactly once here.
        unsafe { sys::ggml_threadpool_free(self.threadpool) };
    }
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

/// Runs `f` with the process's pool, (re)made for `n_threads` if needed.
fn with_pool<R>(n_threads: usize, f: impl FnOnce(&mut Pool) -> Result<R, QuantError>) -> Result<R, QuantError> {
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let mut pool = match guard.take() {
        Some(p) if p.n_threads == n_threads => p,
        stale => {
            drop(stale);
            Pool::new(n_threads)?
        }
    };
    let r = f(&mut pool);
    *guard = Some(pool);
    r
}

/// Owns a ggml context that holds only tensor headers and one graph (no tensor data).
struct Ctx(*mut sys::ggml_context);

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: the context came from `ggml_init`, is non-null and is freed exactly once here.
        unsafe { sys::ggml_free(self.0) };
    }
}

/// `out[T, N] = x[T, K] · W[N, K]ᵀ` through ggml's `mul_mat`. Same contract as [`super::matmul`].
pub fn gemm(w: QMatRef, x: &[f32], out: &mut [f32]) -> Result<(), QuantError> {
    let want = w.qtype.bytes_for(w.n_rows, w.n_cols).ok_or(QuantError::Overflow)?;
    if w.data.len() != want {
        return Err(QuantError::Length { what: "weight bytes", expected: want, got: w.data.len() });
    }
    mul_mat(Src0::Raw(w), w.n_rows, w.n_rows, w.n_cols, x, as_uninit(out))
}

/// `out` seen as possibly-uninitialised floats, for the functions of this file that only write it.
pub(crate) fn as_uninit(out: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has `f32`'s size and alignment. Everything that writes through this
    // view stores initialised floats (ggml's outputs, copies of them, zeros, our kernel's sums), so
    // `out` stays initialised for its owner.
    unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// `out` set to zeros, then seen as the floats it now holds.
fn zeroed(out: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    for v in out.iter_mut() {
        v.write(0.0);
    }
    // SAFETY: every element was just initialised, and `MaybeUninit<f32>` has `f32`'s layout.
    unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// `out[T, N] = x[T, K] · W[N, K]ᵀ` with W repacked ([`super::packed`]): the buffer type's own kernel.
/// A weight packed with padding rows ([`PackedMat::padded_rows`]) is multiplied in full; only its
/// real columns reach `out`.
///
/// A q4_K weight in the AMX layout runs our own kernels on the same bytes where they win: one or
/// two tokens [`super::q4k_matvec`], one token at a time (a q8_0 weight: one token,
/// [`super::q8_0_matvec`]); from [`AMX_BF16_MIN_ROWS`] tokens on
/// [`super::q4k_amx`] (weights dequantised to bf16 once per call, AMX bf16 tile products), 2.9×
/// ggml's q4_K AMX kernel at 128 tokens and 2.8× at 512 on an FFN-sized weight (`cargo bench
/// --bench kernels -- prefill_ffn`; BENCHMARKS.md). Between the two, and where the CPU lacks AMX-BF16, ggml's
/// kernel in whole 32-row blocks ([`own_q4k`]). A q4_K or q4_0 weight in the interleaved 8-row layout
/// (AVX2 CPUs without AMX) runs [`super::q4k_x8_matvec`] or [`super::q4_0_x8_matvec`] for one token;
/// for a few tokens the same once per token, for more our GEMMs ([`super::q4k_x8_gemm`],
/// [`super::q4_0_x8_gemm`]; from [`X8_GEMM_MIN_TOKENS_Q4K`] / [`X8_GEMM_MIN_TOKENS_Q4_0`] tokens;
/// 1.7× and 1.3× ggml's at 128 and 512 tokens on an FFN-sized weight, `cargo bench --bench kernels
/// -- prefill_ffn`).
pub fn gemm_packed(w: &PackedMat, x: &[f32], out: &mut [f32]) -> Result<(), QuantError> {
    gemm_packed_uninit(w, x, as_uninit(out))
}

/// [`gemm_packed`] into a new `[T, N]` buffer, which is not zeroed first: every path writes all of
/// it (a model's prefill otherwise spent ~1 % of its samples in `memset` on outputs about to be
/// overwritten).
pub fn gemm_packed_new(w: &PackedMat, x: &[f32]) -> Result<Vec<f32>, QuantError> {
    let k = w.n_cols;
    if k == 0 || !x.len().is_multiple_of(k) {
        let expected = x.len() / k.max(1) * k;
        return Err(QuantError::Length { what: "activation values (a whole number of rows)", expected, got: x.len() });
    }
    let len = (x.len() / k).checked_mul(w.n_rows).ok_or(QuantError::Overflow)?;
    let mut out = Vec::with_capacity(len);
    gemm_packed_uninit(w, x, &mut out.spare_capacity_mut()[..len])?;
    // SAFETY: `gemm_packed_uninit` succeeded, and on success every path has written all `len`
    // outputs: ggml's `mul_mat` computes every element of its destination, the padded-rows path
    // copies every kept column of every row, rows for our one-token kernel are zeroed before it
    // sums, and `q4k_amx::matmul` and the interleaved GEMMs (through `row_tiles::gemm_by_tiles`)
    // write every kept column of every row from their sums.
    unsafe { out.set_len(len) };
    Ok(out)
}

fn gemm_packed_uninit(w: &PackedMat, x: &[f32], out: &mut [MaybeUninit<f32>]) -> Result<(), QuantError> {
    let (k, n) = (w.n_cols, w.n_rows);
    if !uses_own_matvec(w) || k == 0 || n == 0 || !x.len().is_multiple_of(k) || out.len() != x.len() / k * n {
        return mul_mat(Src0::Packed(w), w.padded_rows, w.n_rows, w.n_cols, x, out);
    }
    if w.layout == INTERLEAVED {
        // under X8_GEMM_MIN_TOKENS_* tokens our one-token kernel per token, from there our GEMM (each
        // token's outputs the same either way)
        let (bytes, rows) = (w.bytes(), w.padded_rows);
        let q4k = w.qtype == QuantType::Q4_K;
        let (gemm, matvec, gemm_from): (Gemm, Matvec, usize) = if q4k {
            (super::q4k_x8_gemm::matmul, super::q4k_x8_matvec::matvec, X8_GEMM_MIN_TOKENS_Q4K)
        } else {
            (super::q4_0_x8_gemm::matmul, super::q4_0_x8_matvec::matvec, X8_GEMM_MIN_TOKENS_Q4_0)
        };
        if x.len() / k >= gemm_from {
            return gemm(bytes, rows, k, n, x, out);
        }
        return x.chunks(k).zip(out.chunks_mut(n)).try_for_each(|(xr, or)| matvec(bytes, rows, xr, zeroed(or)));
    }
    if w.qtype == QuantType::Q8_0 {
        return own_q8_0(w, x, out);
    }
    if x.len() / k >= AMX_BF16_MIN_ROWS && super::q4k_amx::available() {
        return super::q4k_amx::matmul(w.bytes(), w.padded_rows, k, n, x, out);
    }
    own_q4k(w, x, out, CHUNKED_MIN_ELEMS)
}

/// [`gemm_packed`] on a q8_0 AMX weight (checked by the caller): one token our kernel, more ggml's
/// in one call (it reads each weight tile once for up to 32 tokens).
fn own_q8_0(w: &PackedMat, x: &[f32], out: &mut [MaybeUninit<f32>]) -> Result<(), QuantError> {
    if x.len() != w.n_cols {
        return mul_mat(Src0::Packed(w), w.padded_rows, w.n_rows, w.n_cols, x, out);
    }
    super::q8_0_matvec::matvec(w.bytes(), w.padded_rows, x, zeroed(out))
}

/// [`gemm_packed`] on a q4_K AMX weight (checked by the caller), in [`AMX_ROWS`]-token calls from
/// `chunked_min_elems` values on.
fn own_q4k(w: &PackedMat, x: &[f32], out: &mut [MaybeUninit<f32>], chunked_min_elems: usize) -> Result<(), QuantError> {
    let (k, n) = (w.n_cols, w.n_rows);
    let t = x.len() / k;
    let ggml = |x: &[f32], out: &mut [MaybeUninit<f32>]| mul_mat(Src0::Packed(w), w.padded_rows, n, k, x, out);
    // whole 32-row blocks: one call per block on a large weight, else one call for all of them
    let full = t / AMX_ROWS * AMX_ROWS;
    let per_call = if n * k >= chunked_min_elems { AMX_ROWS } else { full.max(1) };
    for (xc, oc) in x[..full * k].chunks(per_call * k).zip(out[..full * n].chunks_mut(per_call * n)) {
        ggml(xc, oc)?;
    }
    // the rows left over: a call of their own, or our kernel for one or two
    if t - full > OWN_KERNEL_MAX_ROWS {
        return ggml(&x[full * k..], &mut out[full * n..]);
    }
    for (xr, or) in x[full * k..].chunks(k).zip(out[full * n..].chunks_mut(n)) {
        super::q4k_matvec::matvec(w.bytes(), w.padded_rows, xr, zeroed(or))?;
    }
    Ok(())
}

/// Tokens per ggml call on a large q4_K AMX weight. ggml's q4_K AMX kernel unpacks each weight tile
/// to int8 for every 32-token block it multiplies; one call per 32 tokens was 10–17 % faster than
/// one call for all at 128 and 512 tokens on 10240×2560 and 2560×10240 (`cargo bench --bench kernels
/// -- prefill_ffn`); q8_0 and q4_0 gained nothing, so they stay one call.
pub const AMX_ROWS: usize = 32;

/// Weights of at least this many values (rows × columns) are multiplied [`AMX_ROWS`] tokens per call.
/// Smaller ones lose by it: 0.92–0.99× on the vision tower's 1024×1024 to 4096×1024 and on
/// 2048×2048 at 128 and 577 tokens, 0.98–1.07× on StableLM's 5632×2048 FFN, 1.10–1.17× from
/// 10240×2560 up (a throwaway timing loop, 2 threads, not kept; BENCHMARKS.md).
pub const CHUNKED_MIN_ELEMS: usize = 16 << 20;

/// Up to this many tokens (alone, or left over after the 32-token blocks) run our one-token kernel
/// once per token rather than one ggml call: on 10240×2560, 1 token 0.34 vs 0.45 ms, 2 tokens 0.81
/// vs 0.99 ms, 3 tokens 1.20 vs 1.02 ms (the same throwaway loop).
pub const OWN_KERNEL_MAX_ROWS: usize = 2;

/// From this many tokens on, a q4_K AMX weight runs [`super::q4k_amx`] (weights dequantised once
/// per call); below, ggml's kernel. Ours costs about the same from 1 to 16 tokens (0.67–0.71 ms on
/// 2048×5632: the dequantisation and the weight's tile loads), ggml's grows per 32-row block: even
/// at 16 and 20 tokens (0.71 vs 0.70, 0.90 vs 0.87 ms), ours ahead from 24 (0.94 vs 1.05), 32
/// (1.05 vs 1.27) and 64 (1.28 vs 2.43 ms); ggml slightly ahead at 12 (0.73 vs 0.64). Same picture
/// on 10240×2560 and 11264×2048 (a throwaway timing loop, aligned buffers, 2 threads; BENCHMARKS.md).
pub const AMX_BF16_MIN_ROWS: usize = 16;

/// From this many tokens on, a q4_K weight in the interleaved layout runs our GEMM
/// ([`super::q4k_x8_gemm`]); below, our one-token kernel once per token. `cargo bench --bench kernels
/// -- few_tokens` (2048×5632, 2 threads; BENCHMARKS.md), GEMM vs per token: 2 tokens 0.55 vs 0.48
/// ms, 3 tokens 0.75 vs 0.78, 4 tokens 0.99 vs 1.04, 8 tokens 1.58 vs 1.86 (ggml's GEMM 0.66, 1.14,
/// 1.46, 2.42).
pub const X8_GEMM_MIN_TOKENS_Q4K: usize = 3;

/// The same for q4_0 ([`super::q4_0_x8_gemm`]), whose one-token kernel has less to unpack: the same
/// bench, 4 tokens 0.92 vs 0.77 ms, 6 tokens 1.24 vs 1.08, 8 tokens 1.39 vs 1.50 (ggml's GEMM 0.91,
/// 1.53, 1.70).
pub const X8_GEMM_MIN_TOKENS_Q4_0: usize = 8;

/// A one-token kernel's entry point on a packed layout: `(packed, n_rows, x, out)`.
pub type Matvec = fn(&[u8], usize, &[f32], &mut [f32]) -> Result<(), QuantError>;
/// A many-token kernel's entry point on a packed layout: `(packed, n_rows, k, n_out, x, out)`.
pub type Gemm = fn(&[u8], usize, usize, usize, &[f32], &mut [MaybeUninit<f32>]) -> Result<(), QuantError>;

/// ggml's name of its interleaved layouts' buffer type (`block_q4_Kx8` and kin, on AVX2 CPUs).
const INTERLEAVED: &str = "CPU_REPACK";

/// Whether one token through `w` runs our kernel rather than ggml's: q4_K and q8_0 in the AMX layout
/// (AVX512-VNNI), q4_K and q4_0 in the interleaved 8-row one (AVX2).
pub fn uses_own_matvec(w: &PackedMat) -> bool {
    use super::row_tiles::{avx2_available, vnni_available};
    match (w.layout, w.qtype) {
        ("AMX", QuantType::Q4_K | QuantType::Q8_0) => vnni_available(),
        (INTERLEAVED, QuantType::Q4_K | QuantType::Q4_0) => avx2_available(),
        _ => false,
    }
}

/// [`gemm_packed`] always through ggml's kernel for the layout (benches and tests compare the two).
pub fn gemm_packed_ggml(w: &PackedMat, x: &[f32], out: &mut [f32]) -> Result<(), QuantError> {
    mul_mat(Src0::Packed(w), w.padded_rows, w.n_rows, w.n_cols, x, as_uninit(out))
}

/// The weight operand of one `mul_mat`: block-format bytes, or a tensor of an extra buffer type.
enum Src0<'a> {
    Raw(QMatRef<'a>),
    Packed(&'a PackedMat),
}

/// `out[T, n_keep]` = the first `n_keep` of the `n` outputs of `x · Wᵀ`. ggml writes straight into
/// `out` when it can: all columns kept and `out` on a cache line. Otherwise it writes an aligned
/// scratch `[T, n]` whose kept columns are copied out — ggml's kernels read and write output rows in
/// 64-byte vectors, which straddle cache lines on a misaligned buffer (AMX: ~1.5× slower, see
/// `crate::alloc`).
fn mul_mat(w: Src0, n: usize, n_keep: usize, k: usize, x: &[f32], out: &mut [MaybeUninit<f32>]) -> Result<(), QuantError> {
    if n_keep == n && out.as_ptr().align_offset(crate::alloc::ALIGN) == 0 {
        return mul_mat_into(w, n, k, x, out);
    }
    let t = token_count(k, n_keep, x.len(), out.len())?;
    let mut tmp = vec![0f32; t * n + crate::alloc::ALIGN / 4];
    let off = tmp.as_ptr().align_offset(crate::alloc::ALIGN);
    let wide = &mut tmp[off..off + t * n]; // [T, n]
    mul_mat_into(w, n, k, x, as_uninit(wide))?;
    for (o, row) in out.chunks_mut(n_keep.max(1)).zip(wide.chunks(n.max(1))) {
        for (o, v) in o.iter_mut().zip(&row[..n_keep]) {
            o.write(*v);
        }
    }
    Ok(())
}

/// ggml's `mul_mat` writing every element of `out` (`[T, n]`) on success.
fn mul_mat_into(w: Src0, n: usize, k: usize, x: &[f32], out: &mut [MaybeUninit<f32>]) -> Result<(), QuantError> {
    let t = token_count(k, n, x.len(), out.len())?;
    if t == 0 || n == 0 {
        return Ok(());
    }
    quant::init();
    let n_threads = rayon::current_num_threads().max(1);
    with_pool(n_threads, |pool| {
        // SAFETY: the context lives in `pool.ctx_mem` (sized for its 3 tensor headers and a graph of
        // GRAPH_NODES nodes, and not touched by anyone else while the pool's mutex is held); `no_alloc`
        // means ggml never allocates tensor data in it, and it is freed before this closure returns.
        let ctx = Ctx(unsafe {
            sys::ggml_init(sys::ggml_init_params {
                mem_size: pool.ctx_mem.len(),
                mem_buffer: pool.ctx_mem.as_mut_ptr() as *mut c_void,
                no_alloc: true,
            })
        });
        if ctx.0.is_null() {
            return Err(QuantError::Ggml { what: "context", status: -1 });
        }
        // SAFETY: every tensor made here is created in `ctx` (alive until the end of this block) with
        // shapes whose byte sizes were checked: src0 is either [K, N] of `w.qtype` over exactly
        // `w.data` (checked by `gemm`; K is a whole number of blocks: `QMatRef` guarantees it) or the
        // packed tensor of `PackedMat` ([K, N], alive for this borrow), src1 = [K, T] f32 over `x`,
        // dst = [N, T] f32 over `out`. ggml only reads src0/src1 (the `*mut` casts never write through)
        // and writes dst (every element; `out` may start uninitialised), which we borrow mutably. The
        // plan's scratch buffer is `pool.work`, resized to the size ggml asked for, and the pool's
        // thread count matches the plan's.
        unsafe {
            let w_t = match w {
                Src0::Raw(w) => {
                    let w_t = sys::ggml_new_tensor_2d(ctx.0, w.qtype.id() as sys::ggml_type, k as i64, n as i64);
                    (*w_t).data = w.data.as_ptr() as *mut c_void;
                    w_t
                }
                Src0::Packed(p) => p.tensor(),
            };
            let x_t = sys::ggml_new_tensor_2d(ctx.0, sys::GGML_TYPE_F32 as sys::ggml_type, k as i64, t as i64);
            (*x_t).data = x.as_ptr() as *mut c_void;
            let y_t = sys::ggml_mul_mat(ctx.0, w_t, x_t);
            (*y_t).data = out.as_mut_ptr() as *mut c_void;
            let graph = sys::ggml_new_graph_custom(ctx.0, GRAPH_NODES, false);
            sys::ggml_build_forward_expand(graph, y_t);
            let mut plan = sys::ggml_graph_plan(graph, n_threads as i32, pool.threadpool);
            if pool.work.len() < plan.work_size {
                pool.work.resize(plan.work_size, 0);
            }
            plan.work_data = if plan.work_size > 0 { pool.work.as_mut_ptr() } else { ptr::null_mut() };
            let status = sys::ggml_graph_compute(graph, &mut plan);
            if status != sys::GGML_STATUS_SUCCESS {
                return Err(QuantError::Ggml { what: "mul_mat graph", status: status as i32 });
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::super::matmul::matmul_vec_dot;
    use super::*;
    use crate::cpu::test_signal as signal;
    use crate::QuantType;

    /// ggml's mul_mat and our per-row vec_dot convert the activations the same way, so they agree to
    /// float summation order.
    const SAME_MATH_REL_TOL: f32 = 1e-4;

    #[test]
    fn gemm_matches_vec_dot_matmul_for_every_type() {
        let (n, k) = (70, 512);
        for q in QuantType::ALL {
            let wq = quant::quantize_rows_vec(q, &signal(n * k, 0.37), k).unwrap();
            let w = QMatRef::new(&wq, q, n, k).unwrap();
            for t in [1usize, 2, 7, 33] {
                let x = signal(t * k, 0.11);
                let (mut a, mut b) = (vec![0f32; t * n], vec![0f32; t * n]);
                gemm(w, &x, &mut a).unwrap();
                matmul_vec_dot(w, &x, &mut b).unwrap();
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (i, (p, q_)) in a.iter().zip(&b).enumerate() {
                    assert!((p - q_).abs() <= SAME_MATH_REL_TOL * scale, "{q} t={t} [{i}]: {p} vs {q_}");
                }
            }
        }
    }

    #[test]
    fn an_output_off_the_cache_line_gets_the_same_values() {
        let (n, k, t) = (64, 256, 33);
        for q in [QuantType::Q8_0, QuantType::Q4_K, QuantType::F16] {
            let wq = quant::quantize_rows_vec(q, &signal(n * k, 0.37), k).unwrap();
            let w = QMatRef::new(&wq, q, n, k).unwrap();
            let packed = super::super::packed::pack(w).unwrap();
            let x = signal(t * k, 0.11);
            let mut buf = vec![0f32; t * n + 64];
            let at = buf.as_ptr().align_offset(crate::alloc::ALIGN);
            for shift in [0, 1, 4] {
                let out = &mut buf[at + shift..at + shift + t * n];
                gemm(w, &x, out).unwrap();
                let plain = out.to_vec();
                if let Some(p) = &packed {
                    gemm_packed(p, &x, out).unwrap();
                }
                let repacked = out.to_vec();
                let mut want = vec![0f32; t * n + 16];
                let wat = want.as_ptr().align_offset(crate::alloc::ALIGN);
                gemm(w, &x, &mut want[wat..wat + t * n]).unwrap();
                assert_eq!(plain, want[wat..wat + t * n], "{q}, output {shift} floats off the line");
                if let Some(p) = &packed {
                    gemm_packed(p, &x, &mut want[wat..wat + t * n]).unwrap();
                    assert_eq!(repacked, want[wat..wat + t * n], "{q} packed, output {shift} floats off the line");
                }
            }
        }
    }

    #[test]
    fn q4k_in_32_token_calls_with_leftovers_matches_vec_dot() {
        let (n, k) = (64, 512);
        let wq = quant::quantize_rows_vec(QuantType::Q4_K, &signal(n * k, 0.37), k).unwrap();
        let w = QMatRef::new(&wq, QuantType::Q4_K, n, k).unwrap();
        let Some(p) = super::super::packed::pack(w).unwrap().filter(|p| uses_own_matvec(p) && p.layout == "AMX") else {
            eprintln!("q4_K not in the AMX layout here: path not run");
            return;
        };
        // 64 = two full calls; 65/66 = leftovers on our kernel; 70 = leftovers in one ggml call
        for t in [64usize, 65, 66, 70] {
            let x = signal(t * k, 0.11);
            let (mut a, mut b) = (vec![0f32; t * n], vec![0f32; t * n]);
            own_q4k(&p, &x, as_uninit(&mut a), usize::MAX).unwrap(); // small-weight path: blocks in one call
            matmul_vec_dot(w, &x, &mut b).unwrap();
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (p_, q_)) in a.iter().zip(&b).enumerate() {
                assert!((p_ - q_).abs() <= SAME_MATH_REL_TOL * scale, "one call for the blocks, t={t} [{i}]: {p_} vs {q_}");
            }
        }
        for t in [64usize, 65, 66, 70] {
            let x = signal(t * k, 0.11);
            let (mut a, mut b) = (vec![0f32; t * n], vec![0f32; t * n]);
            own_q4k(&p, &x, as_uninit(&mut a), 0).unwrap();
            matmul_vec_dot(w, &x, &mut b).unwrap();
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (p_, q_)) in a.iter().zip(&b).enumerate() {
                assert!((p_ - q_).abs() <= SAME_MATH_REL_TOL * scale, "t={t} [{i}]: {p_} vs {q_}");
            }
        }
    }

    #[test]
    fn a_new_output_buffer_gets_the_same_values_as_a_zeroed_one() {
        // 70 rows: padded to whole tiles where the layout has them (the copied-columns path); 1 and 2
        // tokens take our q4_K kernel, 33 and 70 ggml's (70 also a 32-token call with leftovers when
        // the threshold is 0, which `own_q4k` is tested with above)
        let (n, k) = (70, 512);
        for q in [QuantType::Q8_0, QuantType::Q4_K, QuantType::Q4_0] {
            let wq = quant::quantize_rows_vec(q, &signal(n * k, 0.37), k).unwrap();
            let Some(p) = super::super::packed::pack(QMatRef::new(&wq, q, n, k).unwrap()).unwrap() else {
                continue;
            };
            for t in [1usize, 2, 3, 33, 70] {
                let x = signal(t * k, 0.11);
                let mut want = vec![0f32; t * n];
                gemm_packed(&p, &x, &mut want).unwrap();
                assert_eq!(gemm_packed_new(&p, &x).unwrap(), want, "{q} ({}), t={t}", p.layout);
            }
            assert!(gemm_packed_new(&p, &vec![0.5; k + 1]).is_err(), "{q}: a partial row is refused");
        }
    }

    #[test]
    fn gemm_rejects_wrong_lengths() {
        let wq = quant::quantize_rows_vec(QuantType::Q8_0, &signal(4 * 64, 0.3), 64).unwrap();
        let w = QMatRef::new(&wq, QuantType::Q8_0, 4, 64).unwrap();
        assert!(gemm(w, &[0.0; 65], &mut [0.0; 4]).is_err());
        assert!(gemm(w, &[0.0; 128], &mut [0.0; 4]).is_err());
    }
}
