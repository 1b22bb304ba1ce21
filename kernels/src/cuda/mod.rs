//! CUDA: our kernel sources (`kernels/cuda/*.cu`), their run-time compilation with NVRTC, and the
//! device operations the runtime's `cuda` backend is built from.
//!
//! Nothing here links against CUDA: `cudarc` opens `libcuda` and `libnvrtc` when first asked
//! ([`nvrtc::load`], [`device::Gpu::open`]), so the program builds and every CPU path runs on a
//! machine without CUDA. Each `.cu` file is compiled with `common.cuh` and `dequant.cuh` in front
//! (NVRTC gets one self-contained source: no include paths, no CUDA headers), for the device's own
//! architecture (a CUBIN), cached on disk ([`nvrtc::cached_cubin`]).

pub mod device;
pub mod nvrtc;

use crate::QuantType;

/// Shared definitions put in front of every kernel file.
pub const COMMON: &str = include_str!("../../cuda/common.cuh");
/// ggml's block formats, 32 values at a time (also compiled on the host by the dequant check).
pub const DEQUANT: &str = include_str!("../../cuda/dequant.cuh");

/// The kernel files: (file name, source).
pub const SOURCES: [(&str, &str); 3] = [
    ("matmul.cu", include_str!("../../cuda/matmul.cu")),
    ("attention.cu", include_str!("../../cuda/attention.cu")),
    ("ops.cu", include_str!("../../cuda/ops.cu")),
];

/// The complete program NVRTC compiles for one kernel file.
pub fn program(source: &str) -> String {
    format!("{COMMON}\n{DEQUANT}\n{source}")
}

/// The suffix of a weight type's kernels (`matvec_q4_k`) — the `name` of `MATMUL_KERNELS(name, TY)`
/// in matmul.cu.
pub fn type_suffix(q: QuantType) -> &'static str {
    match q {
        QuantType::F32 => "f32",
        QuantType::F16 => "f16",
        QuantType::BF16 => "bf16",
        QuantType::Q8_0 => "q8_0",
        QuantType::Q4_0 => "q4_0",
        QuantType::Q4_1 => "q4_1",
        QuantType::Q5_0 => "q5_0",
        QuantType::Q5_1 => "q5_1",
        QuantType::Q4_K => "q4_k",
        QuantType::Q5_K => "q5_k",
        QuantType::Q6_K => "q6_k",
    }
}

/// The type id `dq32<TY>` dispatches on (dequant.cuh's `TY_*`).
pub fn type_id(q: QuantType) -> u32 {
    match q {
        QuantType::F32 => 0,
        QuantType::F16 => 1,
        QuantType::BF16 => 2,
        QuantType::Q8_0 => 3,
        QuantType::Q4_0 => 4,
        QuantType::Q4_1 => 5,
        QuantType::Q5_0 => 6,
        QuantType::Q5_1 => 7,
        QuantType::Q4_K => 8,
        QuantType::Q5_K => 9,
        QuantType::Q6_K => 10,
    }
}

/// Every kernel the Rust side launches, by file: CI checks each is an entry of that file's PTX.
pub fn kernel_names() -> Vec<(&'static str, String)> {
    let mut names = Vec::new();
    for q in QuantType::ALL {
        for kind in ["matvec_ref", "matvec", "matvec_experts", "dequant"] {
            names.push(("matmul.cu", format!("{kind}_{}", type_suffix(q))));
        }
    }
    names.push(("matmul.cu", "sgemm_nt".to_string()));
    names.extend(["attention_f32", "attention_f16"].map(|n| ("attention.cu", n.to_string())));
    let ops = [
        "add_bias",
        "add",
        "mul",
        "activate",
        "layer_norm",
        "rms_norm",
        "rope_neox",
        "copy_cols",
        "gather_rows",
        "scatter_add_rows",
        "f32_to_f16",
    ];
    names.extend(ops.map(|n| ("ops.cu", n.to_string())));
    names
}
