//! Weight matrices repacked into one of ggml-cpu's "extra" buffer types: the layout its fastest CPU
//! kernels read. On a CPU with AMX that is the AMX buffer (int8 tiles for prefill, a VNNI kernel for one
//! token); elsewhere ggml's interleaved repack for q4_0 / q4_K / iq4_nl where the CPU has the SIMD for it.
//! llama.cpp places every weight there at load; this module lets the runtime do the same, one matrix
//! at a time, and multiply with it through the same one-node `mul_mat` graph as [`super::gemm`].
//!
//! Dims: K = n_cols (shared), N = n_rows (weight rows / outputs). The packed tensor is ggml's
//! `[K, N]` (ne0 = K) in the buffer type's own byte layout, which only that type's kernels can read.

use std::ffi::{c_void, CStr};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};

use llama_cpp_sys_2 as sys;

use super::matmul::QMatRef;
use crate::quant::{self, QuantError, QuantType};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns repacking on or off for the process (`--no-repack`: the original bytes and ggml's generic
/// kernels, e.g. to compare or to keep only the file's pages in memory). On by default.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// One repacked weight: its own ggml context (the tensor header) and backend buffer (the bytes).
pub struct PackedMat {
    ctx: *mut sys::ggml_context,
    buffer: sys::ggml_backend_buffer_t,
    tensor: *mut sys::ggml_tensor,
    pub n_rows: usize,
    pub n_cols: usize,
    /// Rows of the packed tensor: `n_rows`, or `n_rows` rounded up to [`ROW_PAD`] with zero rows where
    /// no kernel tiles `n_rows` itself (Phi-2's 50,295-row head); the extra outputs are dropped.
    pub padded_rows: usize,
    /// Bytes of the packed copy.
    pub n_bytes: usize,
    /// ggml's name of the buffer type (e.g. "AMX", "CPU_REPACK").
    pub layout: &'static str,
    /// Block format of the packed values (q8_0 for a widened q5_0).
    pub qtype: QuantType,
}

// SAFETY: after `pack` returns, nothing writes the context, tensor header or buffer until `Drop`;
// ggml's `mul_mat` only reads its src0 (header and data), so shared reads from several threads are
// sound, and the handles are plain heap pointers not tied to the creating thread.
unsafe impl Send for PackedMat {}
// SAFETY: as above: every use after construction is a read.
unsafe impl Sync for PackedMat {}

impl Drop for PackedMat {
    fn drop(&mut self) {
        // SAFETY: both handles were made in `pack`, are non-null, and are freed exactly once here; the
        // tensor header (in `ctx`) is not used after this.
        unsafe {
            sys::ggml_backend_buffer_free(self.buffer);
            sys::ggml_free(self.ctx);
        }
    }
}

impl PackedMat {
    /// The packed tensor, as src0 of a `mul_mat` (read only).
    pub(crate) fn tensor(&self) -> *mut sys::ggml_tensor {
        self.tensor
    }

    /// The packed bytes (the buffer type's own layout), for kernels of ours that read it.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the tensor's data is the base of `buffer`, `n_bytes` long (its alloc size), written
        // once by `pack` and only read afterwards; it lives as long as `self`.
        unsafe { std::slice::from_raw_parts((*self.tensor).data as *const u8, self.n_bytes) }
    }
}

/// ggml-cpu's extra buffer types on this machine, best first (ggml's own order: AMX, then repack).
fn extra_buffer_types() -> Vec<sys::ggml_backend_buffer_type_t> {
    quant::init();
    let mut out = Vec::new();
    // SAFETY: `ggml_backend_cpu_reg` returns the static CPU registry; the proc-address lookup takes a
    // NUL-terminated name and returns either null or a function of the documented
    // `ggml_backend_dev_get_extra_bufts_t` signature, which returns a null-terminated static array.
    unsafe {
        let reg = sys::ggml_backend_cpu_reg();
        let dev = sys::ggml_backend_reg_dev_get(reg, 0);
        let f = sys::ggml_backend_reg_get_proc_address(reg, c"ggml_backend_dev_get_extra_bufts".as_ptr());
        if f.is_null() || dev.is_null() {
            return out;
        }
        let f: unsafe extern "C" fn(sys::ggml_backend_dev_t) -> *mut sys::ggml_backend_buffer_type_t = std::mem::transmute(f);
        let mut p = f(dev);
        while !p.is_null() && !(*p).is_null() {
            out.push(*p);
            p = p.add(1);
        }
    }
    out
}

/// Row multiple a matrix is padded to when no layout takes its own row count (AMX tiles 32 output
/// columns at a time, its one-token kernel 32–128; the interleaved layouts 4 or 8).
pub const ROW_PAD: usize = 64;

/// Repacks `w` into the first extra buffer type whose `mul_mat` takes it (type and shape), or returns
/// `None` when none does (f32 weights, a CPU without the SIMD, a shape the kernels do not tile). A
/// row count no layout tiles is padded with zero rows to a multiple of [`ROW_PAD`] (a copy of the
/// weight while packing): the output head is read every token, and ggml's generic kernel streams it
/// at about two thirds of the packed one's speed.
///
/// q5_0 — the type a q4_K plan falls back to where a row is no multiple of 256 (Qwen's 5504-wide
/// expert `ffn_down`) — has no packed layout, and ggml's generic kernels run it at a fraction of the
/// packed q8_0 speed; its values are exactly q8_0 values (same scale, quants −16..15), so it is
/// widened to q8_0 and packed as that: the same weights, 8.5 instead of 5.5 bits each in memory.
pub fn pack(w: QMatRef) -> Result<Option<PackedMat>, QuantError> {
    let (n, k) = (w.n_rows, w.n_cols);
    let want = w.qtype.bytes_for(n, k).ok_or(QuantError::Overflow)?;
    if w.data.len() != want {
        return Err(QuantError::Length { what: "weight bytes", expected: want, got: w.data.len() });
    }
    if n == 0 || k == 0 {
        return Ok(None);
    }
    if w.qtype == QuantType::Q5_0 {
        let wide = widen_q5_0_to_q8_0(w.data);
        return pack_checked(QMatRef { data: &wide, qtype: QuantType::Q8_0, n_rows: n, n_cols: k });
    }
    pack_checked(w)
}

/// q5_0 blocks (f16 scale `d`, 32 high bits `qh`, 16 bytes of low nibbles: element j's low nibble
/// in byte j % 16, low half for j < 16) → q8_0 blocks (the same `d`, 32 int8 quants `q − 16`).
fn widen_q5_0_to_q8_0(src: &[u8]) -> Vec<u8> {
    let (q5, q8) = (QuantType::Q5_0.type_size(), QuantType::Q8_0.type_size()); // 2 + 4 + 16, 2 + 32
    let mut out = vec![0u8; src.len() / q5 * q8];
    for (b5, b8) in src.chunks_exact(q5).zip(out.chunks_exact_mut(q8)) {
        b8[..2].copy_from_slice(&b5[..2]);
        let qh = u32::from_le_bytes([b5[2], b5[3], b5[4], b5[5]]);
        for j in 0..16 {
            let lo = (b5[6 + j] & 0x0F) | (((qh >> j) & 1) << 4) as u8;
            let hi = (b5[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4) as u8;
            b8[2 + j] = (lo as i8 - 16) as u8;
            b8[2 + 16 + j] = (hi as i8 - 16) as u8;
        }
    }
    out
}

/// [`pack`] for a weight whose length was checked.
fn pack_checked(w: QMatRef) -> Result<Option<PackedMat>, QuantError> {
    let (n, k) = (w.n_rows, w.n_cols);
    let bufts = extra_buffer_types();
    for &buft in &bufts {
        if let Some(p) = pack_into(buft, w, n)? {
            return Ok(Some(p));
        }
    }
    let padded_rows = n.div_ceil(ROW_PAD) * ROW_PAD;
    if padded_rows != n && !bufts.is_empty() {
        // all-zero blocks are zero weights in every block format (scale 0, quants 0)
        let mut data = w.data.to_vec();
        data.resize(w.qtype.bytes_for(padded_rows, k).ok_or(QuantError::Overflow)?, 0);
        let padded = QMatRef { data: &data, qtype: w.qtype, n_rows: padded_rows, n_cols: k };
        for &buft in &bufts {
            if let Some(p) = pack_into(buft, padded, n)? {
                return Ok(Some(p));
            }
        }
    }
    Ok(None)
}

/// Packs all of `w` into `buft`; the first `n_rows` of its rows are the real ones.
fn pack_into(buft: sys::ggml_backend_buffer_type_t, w: QMatRef, n_rows: usize) -> Result<Option<PackedMat>, QuantError> {
    let (n, k) = (w.n_rows, w.n_cols);
    // SAFETY: (whole block) the context is made here with room for 2 headers and no data (no_alloc);
    // `w_t` gets its data from a buffer of exactly the size the buffer type asks for it, through
    // `ggml_backend_tensor_alloc` (which also runs the type's init_tensor). The probe op reads only
    // shapes, types and buffers. The copy in (`ggml_backend_tensor_set`, which repacks) gets exactly
    // `ggml_nbytes(w_t)` bytes, which equals `w.data.len()` (checked by the caller), and is only made
    // after the device said the type takes this op, so the repack's own shape asserts hold. Every
    // early return frees what was made. Buffer-type names are static strings in ggml-cpu.
    unsafe {
        let ctx = sys::ggml_init(sys::ggml_init_params {
            mem_size: 2 * sys::ggml_tensor_overhead() + 256,
            mem_buffer: ptr::null_mut(),
            no_alloc: true,
        });
        if ctx.is_null() {
            return Err(QuantError::Ggml { what: "context", status: -1 });
        }
        let w_t = sys::ggml_new_tensor_2d(ctx, w.qtype.id() as sys::ggml_type, k as i64, n as i64);
        let size = sys::ggml_backend_buft_get_alloc_size(buft, w_t);
        let buffer = sys::ggml_backend_buft_alloc_buffer(buft, size);
        if buffer.is_null() {
            sys::ggml_free(ctx);
            return Err(QuantError::Ggml { what: "packed weight buffer", status: -1 });
        }
        sys::ggml_backend_buffer_set_usage(buffer, sys::GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        let status = sys::ggml_backend_tensor_alloc(buffer, w_t, sys::ggml_backend_buffer_get_base(buffer));
        let free = |ctx, buffer| {
            sys::ggml_backend_buffer_free(buffer);
            sys::ggml_free(ctx);
        };
        if status != sys::GGML_STATUS_SUCCESS {
            free(ctx, buffer);
            return Err(QuantError::Ggml { what: "packed weight placement", status: status as i32 });
        }
        // Would the CPU device run `mul_mat(w_t, x)` (x f32, 2 tokens) with this buffer type's kernel?
        let probe_ctx = sys::ggml_init(sys::ggml_init_params {
            mem_size: 3 * sys::ggml_tensor_overhead() + 256,
            mem_buffer: ptr::null_mut(),
            no_alloc: true,
        });
        if probe_ctx.is_null() {
            free(ctx, buffer);
            return Err(QuantError::Ggml { what: "context", status: -1 });
        }
        let x_t = sys::ggml_new_tensor_2d(probe_ctx, sys::GGML_TYPE_F32 as sys::ggml_type, k as i64, 2);
        let op = sys::ggml_mul_mat(probe_ctx, w_t, x_t);
        let dev = sys::ggml_backend_reg_dev_get(sys::ggml_backend_cpu_reg(), 0);
        let takes = sys::ggml_backend_dev_supports_op(dev, op);
        sys::ggml_free(probe_ctx);
        if !takes {
            free(ctx, buffer);
            return Ok(None);
        }
        sys::ggml_backend_tensor_set(w_t, w.data.as_ptr() as *const c_void, 0, w.data.len());
        let name = CStr::from_ptr(sys::ggml_backend_buft_name(buft)).to_str().unwrap_or("extra");
        Ok(Some(PackedMat {
            ctx,
            buffer,
            tensor: w_t,
            n_rows,
            n_cols: k,
            padded_rows: n,
            n_bytes: size,
            layout: name,
            qtype: w.qtype,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::gemm::gemm_packed;
    use super::super::matmul::matmul_vec_dot;
    use super::*;
    use crate::cpu::test_signal as signal;
    use crate::QuantType;

    /// A packed kernel quantises the activations to the same partner type as `vec_dot` (q8_0 / q8_K),
    /// but may sum in another order (int32 tiles): products agree to float rounding of the sums.
    const PACKED_REL_TOL: f32 = 1e-4;
    /// f16 weights: the packed kernel multiplies f32 activations, `vec_dot` rounds them to f16 first
    /// (2⁻¹¹ relative per value, a few 1e-3 of the largest output over 512 products).
    const PACKED_F16_REL_TOL: f32 = 5e-3;
    /// q4_K in the AMX layout from `gemm::AMX_BF16_MIN_ROWS` tokens rounds weights and activations
    /// to bf16 (2⁻⁹ relative each) where `vec_dot` rounds activations to q8_K (1/254 of each
    /// block's largest): its largest error against the exact product may exceed `vec_dot`'s by this
    /// factor (measured 0.6–1.6× on sinusoid signals with heavy cancellation, K = 512 and 2560).
    const BF16_ERR_FACTOR: f64 = 2.5;

    #[test]
    fn packed_matmul_matches_vec_dot_where_a_layout_takes_the_type() {
        let (n, k) = (64, 512);
        for q in QuantType::ALL {
            let wq = quant::quantize_rows_vec(q, &signal(n * k, 0.37), k).unwrap();
            let w = QMatRef::new(&wq, q, n, k).unwrap();
            let Some(p) = pack(w).unwrap() else {
                eprintln!("{q}: no packed layout on this CPU");
                continue;
            };
            eprintln!("{q}: packed as {}", p.layout);
            assert!(p.n_bytes >= wq.len() / 2, "{q}: {} packed bytes for {}", p.n_bytes, wq.len());
            for t in [1usize, 2, 7, 33] {
                let x = signal(t * k, 0.11);
                let (mut a, mut b) = (vec![0f32; t * n], vec![0f32; t * n]);
                gemm_packed(&p, &x, &mut a).unwrap();
                matmul_vec_dot(w, &x, &mut b).unwrap();
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let bf16_path = p.layout == "AMX" && crate::cpu::q4k_amx::available();
                if bf16_path && q == QuantType::Q4_K && t >= crate::cpu::gemm::AMX_BF16_MIN_ROWS {
                    let mut deq = vec![0f32; n * k];
                    quant::dequantize_rows(q, &wq, &mut deq).unwrap();
                    let exact = |i: usize| (0..k).map(|j| deq[i % n * k + j] as f64 * x[i / n * k + j] as f64).sum::<f64>();
                    let worst = |v: &[f32]| (0..t * n).map(|i| (v[i] as f64 - exact(i)).abs()).fold(0f64, f64::max);
                    let (ours, theirs) = (worst(&a), worst(&b));
                    assert!(
                        ours <= BF16_ERR_FACTOR * theirs,
                        "{q} ({}) t={t}: bf16 error {ours:.3e}, vec_dot's {theirs:.3e}",
                        p.layout
                    );
                    continue;
                }
                let tol = if q == QuantType::F16 { PACKED_F16_REL_TOL } else { PACKED_REL_TOL };
                for (i, (p_, q_)) in a.iter().zip(&b).enumerate() {
                    assert!((p_ - q_).abs() <= tol * scale, "{q} ({}) t={t} [{i}]: {p_} vs {q_}", p.layout);
                }
            }
        }
    }

    #[test]
    fn a_row_count_no_layout_tiles_is_padded_and_the_padding_dropped() {
        let (n, k) = (70, 256); // 70 = no multiple of any layout's tile
        for q in [QuantType::Q4_0, QuantType::Q8_0, QuantType::Q4_K] {
            let wq = quant::quantize_rows_vec(q, &signal(n * k, 0.37), k).unwrap();
            let w = QMatRef::new(&wq, q, n, k).unwrap();
            let Some(p) = pack(w).unwrap() else {
                eprintln!("{q}: no packed layout on this CPU");
                continue;
            };
            assert_eq!((p.n_rows, p.padded_rows), (n, ROW_PAD * 2), "{q}");
            for t in [1usize, 5] {
                let x = signal(t * k, 0.11);
                let (mut a, mut b) = (vec![0f32; t * n], vec![0f32; t * n]);
                gemm_packed(&p, &x, &mut a).unwrap();
                matmul_vec_dot(w, &x, &mut b).unwrap();
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (i, (p_, q_)) in a.iter().zip(&b).enumerate() {
                    assert!((p_ - q_).abs() <= PACKED_REL_TOL * scale, "{q} t={t} [{i}]: {p_} vs {q_}");
                }
                assert!(gemm_packed(&p, &x, &mut vec![0f32; t * p.padded_rows]).is_err(), "{q}: padded length refused");
            }
        }
    }

    #[test]
    fn q5_0_widened_to_q8_0_keeps_every_value() {
        // ggml's own dequantisers of both types are the reference: bit-equal values, every quant
        // level and sign (the signal spans the full range of each block, scales of both signs).
        let k = 32 * 64;
        let mut f: Vec<f32> = signal(8 * k, 0.37);
        f.iter_mut().enumerate().for_each(|(i, v)| *v *= if i % 96 < 48 { 40.0 } else { -0.003 });
        let q5 = quant::quantize_rows_vec(QuantType::Q5_0, &f, k).unwrap();
        let q8 = widen_q5_0_to_q8_0(&q5);
        assert_eq!(q8.len(), QuantType::Q8_0.bytes_for(8, k).unwrap());
        let (mut a, mut b) = (vec![0f32; 8 * k], vec![0f32; 8 * k]);
        quant::dequantize_rows(QuantType::Q5_0, &q5, &mut a).unwrap();
        quant::dequantize_rows(QuantType::Q8_0, &q8, &mut b).unwrap();
        assert_eq!(a, b);
        let levels: std::collections::BTreeSet<i8> = q8.chunks(34).flat_map(|c| c[2..].iter().map(|v| *v as i8)).collect();
        assert_eq!(levels.len(), 32, "every q5_0 level -16..15 appears: {levels:?}");
    }

    #[test]
    fn f32_weights_are_not_packed_and_bad_lengths_are_refused() {
        let k = 64;
        let wq = quant::quantize_rows_vec(QuantType::F32, &signal(32 * k, 0.3), k).unwrap();
        assert!(pack(QMatRef::new(&wq, QuantType::F32, 32, k).unwrap()).unwrap().is_none());
        let bad = QMatRef { data: &wq[..10], qtype: QuantType::F32, n_rows: 32, n_cols: k };
        assert!(pack(bad).is_err());
    }
}
