//! moellava-kernels: the numeric core of moellava.
//!
//! - [`alloc`]: the cache-line-aligning global allocator our programs install.
//! - [`quant`]: ggml's block formats (type table, quantize, dequantize, CPU dot products).
//! - [`cpu`]: quantized matmul and the f32 activation ops on the CPU.
//! - [`cuda`]: our CUDA kernels (kernels/cuda/*.cu), NVRTC, and the device operations.
//! - [`llama`]: llama.cpp itself, as the reference and speed peer for dense backbones.
//!
//! This is the only crate of the workspace with FFI and `unsafe`; every `unsafe` block carries a
//! `// SAFETY:` note saying which checked condition makes it sound.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod alloc;
pub mod cpu;
pub mod cuda;
pub mod llama;
pub mod quant;

pub use quant::{GgmlType, QuantError, QuantType};
