//! CPU kernels: quantized matmul over ggml's `vec_dot`, and the f32 activation ops.

pub mod attention;
pub mod bandwidth;
pub mod gemm;
pub mod matmul;
pub mod ops;

pub use matmul::{get_rows, matmul, matmul_vec_dot, QMatRef};
pub use ops::Activation;
