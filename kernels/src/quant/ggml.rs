//! Safe wrappers over ggml's block-format functions (through `llama-cpp-sys-2`'s bindings).
//!
//! - `quantize_rows`: `ggml_quantize_chunk`, i.e. ggml's reference quantizers (`quantize_row_*_ref`),
//!   the bytes llama.cpp's `llama-quantize` writes (no importance matrix).
//! - `dequantize_rows`: `ggml_get_type_traits(t)->to_float`.
//! - `quantize_activation` + `vec_dot`: the CPU backend's pair (`ggml_get_type_traits_cpu`): the
//!   activation row is converted to the weight type's `vec_dot_type` (Q8_0 for Q4_0, Q8_K for Q4_K, …)
//!   and the dot product runs ggml's SIMD kernel for this machine.
//!
//! Every function checks lengths and block alignment before the FFI call, so ggml's internal
//! `GGML_ASSERT`s (which abort the process) can never fire from here.

use std::sync::Once;

use llama_cpp_sys_2 as sys;

use super::types::{GgmlType, QuantType};
use super::QuantError;

static CPU_INIT: Once = Once::new();

/// Initialises ggml's CPU tables (fp16 conversion, GELU) once per process.
pub fn init() {
    CPU_INIT.call_once(|| {
        // SAFETY: `ggml_cpu_init` takes no arguments and only fills process-global lookup tables;
        // `Once` serialises it, and every other function in this module calls `init` first. The log
        // callback is a `'static` fn that tolerates any thread and a null text.
        unsafe {
            sys::ggml_log_set(Some(crate::llama::quiet_log), std::ptr::null_mut());
            sys::ggml_cpu_init();
        }
    });
}

fn cpu_traits(t: GgmlType) -> sys::ggml_type_traits_cpu {
    init();
    // SAFETY: `t.id()` is a type id of the linked ggml (test `types_match_ggml_traits`), for which
    // `ggml_get_type_traits_cpu` returns a pointer into a static table that lives for the whole process.
    unsafe { *sys::ggml_get_type_traits_cpu(t.id()) }
}

fn base_traits(t: GgmlType) -> sys::ggml_type_traits {
    // SAFETY: as in `cpu_traits`: a valid id indexes ggml's static, immutable `type_traits` table.
    unsafe { *sys::ggml_get_type_traits(t.id()) }
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), QuantError> {
    if expected == got {
        Ok(())
    } else {
        Err(QuantError::Length { what, expected, got })
    }
}

fn check_row(t: GgmlType, n_per_row: usize) -> Result<(), QuantError> {
    if n_per_row == 0 || !n_per_row.is_multiple_of(t.block_size()) {
        return Err(QuantError::RowLength { qtype: t, n_per_row, block_size: t.block_size() });
    }
    Ok(())
}

/// Quantizes `src` (rows of `n_per_row` f32 values) into `dst` with ggml's reference quantizer.
/// `dst.len()` must be exactly the quantized size of those rows.
pub fn quantize_rows(qtype: QuantType, src: &[f32], n_per_row: usize, dst: &mut [u8]) -> Result<(), QuantError> {
    check_row(qtype.ggml(), n_per_row)?;
    if !src.len().is_multiple_of(n_per_row) {
        return Err(QuantError::Length {
            what: "source values (a whole number of rows)",
            expected: src.len() / n_per_row * n_per_row,
            got: src.len(),
        });
    }
    let n_rows = src.len() / n_per_row;
    let expected = qtype.bytes_for(n_rows, n_per_row).ok_or(QuantError::Overflow)?;
    check_len("quantized bytes", expected, dst.len())?;
    if n_rows == 0 {
        return Ok(());
    }
    // SAFETY: `src` holds n_rows*n_per_row f32 and `dst` exactly the bytes ggml writes for them
    // (checked above); n_per_row is a multiple of the block size and start = 0, so ggml's asserts hold;
    // no importance matrix is needed for the types in `QuantType`.
    let written = unsafe {
        sys::ggml_quantize_chunk(
            qtype.id(),
            src.as_ptr(),
            dst.as_mut_ptr().cast(),
            0,
            n_rows as i64,
            n_per_row as i64,
            std::ptr::null(),
        )
    };
    check_len("bytes written by ggml_quantize_chunk", expected, written)
}

/// [`quantize_rows`] split over rayon's threads (whole rows per task).
pub fn quantize_rows_par(qtype: QuantType, src: &[f32], n_per_row: usize, dst: &mut [u8]) -> Result<(), QuantError> {
    use rayon::prelude::*;
    check_row(qtype.ggml(), n_per_row)?;
    let n_rows = src.len() / n_per_row;
    let row_bytes = qtype.bytes_for(1, n_per_row).ok_or(QuantError::Overflow)?;
    check_len("quantized bytes", n_rows * row_bytes, dst.len())?;
    if !src.len().is_multiple_of(n_per_row) {
        return Err(QuantError::Length {
            what: "source values (a whole number of rows)",
            expected: n_rows * n_per_row,
            got: src.len(),
        });
    }
    let rows_per_task = (n_rows / (rayon::current_num_threads() * 4)).max(1);
    dst.par_chunks_mut(rows_per_task * row_bytes)
        .zip(src.par_chunks(rows_per_task * n_per_row))
        .try_for_each(|(d, s)| quantize_rows(qtype, s, n_per_row, d))
}

/// Quantizes rows into a new buffer.
pub fn quantize_rows_vec(qtype: QuantType, src: &[f32], n_per_row: usize) -> Result<Vec<u8>, QuantError> {
    check_row(qtype.ggml(), n_per_row)?;
    let n_rows = src.len() / n_per_row;
    let mut out = vec![0u8; qtype.bytes_for(n_rows, n_per_row).ok_or(QuantError::Overflow)?];
    quantize_rows(qtype, src, n_per_row, &mut out)?;
    Ok(out)
}

/// Dequantizes whole blocks of `qtype` in `src` into `dst` (`dst.len()` elements).
pub fn dequantize_rows(qtype: QuantType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    let t = qtype.ggml();
    if !dst.len().is_multiple_of(t.block_size()) {
        return Err(QuantError::RowLength { qtype: t, n_per_row: dst.len(), block_size: t.block_size() });
    }
    check_len("quantized bytes", dst.len() / t.block_size() * t.type_size(), src.len())?;
    if qtype == QuantType::F32 {
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
            *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        }
        return Ok(());
    }
    let to_float = base_traits(t).to_float.ok_or(QuantError::Unsupported { op: "dequantize", qtype: t })?;
    if dst.is_empty() {
        return Ok(());
    }
    // SAFETY: `src` holds exactly dst.len()/block_size whole blocks of `t` and `dst` has room for
    // dst.len() f32 (checked above); ggml's to_float reads and writes exactly those ranges.
    unsafe { to_float(src.as_ptr().cast(), dst.as_mut_ptr(), dst.len() as i64) };
    Ok(())
}

/// Converts an f32 activation row into `dot_type` (one of F32, F16, BF16, Q8_0, Q8_1, Q8_K) with
/// the CPU backend's converter, ready for [`vec_dot`].
pub fn quantize_activation(dot_type: GgmlType, x: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    check_row(dot_type, x.len())?;
    check_len("activation bytes", x.len() / dot_type.block_size() * dot_type.type_size(), dst.len())?;
    if dot_type == GgmlType::F32 {
        for (d, v) in dst.chunks_exact_mut(4).zip(x) {
            d.copy_from_slice(&v.to_le_bytes());
        }
        return Ok(());
    }
    let from_float =
        cpu_traits(dot_type).from_float.ok_or(QuantError::Unsupported { op: "quantize_activation", qtype: dot_type })?;
    // SAFETY: `x` has a whole number of blocks of `dot_type` and `dst` exactly their byte size
    // (checked above); the CPU converter touches only those ranges.
    unsafe { from_float(x.as_ptr(), dst.as_mut_ptr().cast(), x.len() as i64) };
    Ok(())
}

/// Bytes of an activation row of `n` values in `dot_type`.
pub fn activation_bytes(dot_type: GgmlType, n: usize) -> Option<usize> {
    usize::try_from(dot_type.row_bytes(n as u64)?).ok()
}

/// ggml's CPU dot product of one weight row (`qtype`, `n` values) with one activation row already in
/// `qtype.dot_type()` (see [`quantize_activation`]).
pub fn vec_dot(qtype: QuantType, n: usize, w_row: &[u8], act_row: &[u8]) -> Result<f32, QuantError> {
    check_row(qtype.ggml(), n)?;
    check_row(qtype.dot_type(), n)?;
    check_len("weight row bytes", qtype.bytes_for(1, n).ok_or(QuantError::Overflow)?, w_row.len())?;
    check_len("activation row bytes", activation_bytes(qtype.dot_type(), n).ok_or(QuantError::Overflow)?, act_row.len())?;
    let traits = cpu_traits(qtype.ggml());
    let dot = traits.vec_dot.ok_or(QuantError::Unsupported { op: "vec_dot", qtype: qtype.ggml() })?;
    let mut s = 0f32;
    // SAFETY: both rows hold exactly n values in their formats (checked above), `s` is one writable
    // f32, and nrc = 1 makes ggml read one row of each with no strides.
    unsafe { dot(n as i32, &mut s, 0, w_row.as_ptr().cast(), 0, act_row.as_ptr().cast(), 0, 1) };
    Ok(s)
}

/// What the linked ggml reports for a type: (blck_size, type_size, name), for cross-checks.
pub fn ggml_reported_geometry(t: GgmlType) -> (usize, usize, String) {
    let traits = base_traits(t);
    // SAFETY: `type_name` points to a static NUL-terminated string in ggml's type table.
    let name = unsafe { std::ffi::CStr::from_ptr(traits.type_name) }.to_string_lossy().into_owned();
    (traits.blck_size as usize, traits.type_size, name)
}

/// The activation type ggml's CPU backend pairs with `t` (for cross-checking [`QuantType::dot_type`]).
pub fn ggml_reported_dot_type(t: QuantType) -> Option<GgmlType> {
    GgmlType::from_id(cpu_traits(t.ggml()).vec_dot_type)
}
