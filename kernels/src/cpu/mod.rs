//! CPU kernels: quantized matmul over ggml's `vec_dot` and `mul_mat`, weights repacked into ggml-cpu's
//! fastest layouts ([`packed`]), attention, and the f32 activation ops.

pub mod attention;
pub mod bandwidth;
pub mod gemm;
pub mod matmul;
pub mod ops;
pub mod packed;
pub mod q4_0_x8_gemm;
pub mod q4_0_x8_matvec;
pub mod q4k_amx;
pub mod q4k_matvec;
pub mod q4k_x8_gemm;
pub mod q4k_x8_matvec;
pub mod q8_0_matvec;
pub mod q8_0_rows_matvec;
pub mod row_tiles;

pub use matmul::{get_rows, matmul, matmul_per_token, matmul_vec_dot, QMatRef};
pub use ops::Activation;

/// A deterministic test signal: `sin(i·k)` for i in 0..n.
#[cfg(test)]
pub(crate) fn test_signal(n: usize, k: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32) * k).sin()).collect()
}
