//! ggml block formats: type table ([`GgmlType`], [`QuantType`]) and the safe quantize / dequantize /
//! dot-product entry points over ggml.

mod ggml;
mod types;

pub use ggml::{
    activation_bytes, dequantize_rows, ggml_reported_dot_type, ggml_reported_geometry, init, quantize_activation, quantize_rows,
    quantize_rows_par, quantize_rows_vec, vec_dot,
};
pub use types::{GgmlType, QuantType};

/// Errors of the block-format functions: a caller mistake caught before ggml sees it, or (`Ggml`) a
/// failure ggml itself reported (it cannot start its threads, say).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantError {
    #[error("{what}: expected {expected}, got {got}")]
    Length { what: &'static str, expected: usize, got: usize },
    #[error("row length {n_per_row} is not a positive multiple of the {qtype} block size {block_size}")]
    RowLength { qtype: GgmlType, n_per_row: usize, block_size: usize },
    #[error("{op} is not available for {qtype}")]
    Unsupported { op: &'static str, qtype: GgmlType },
    #[error("tensor size overflows")]
    Overflow,
    #[error("ggml {what} failed with status {status}")]
    Ggml { what: &'static str, status: i32 },
}
