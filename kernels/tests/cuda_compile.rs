//! Every CUDA kernel file compiles with NVRTC to PTX and to a CUBIN (what the runtime loads), and every
//! kernel the Rust side launches is defined in both. Needs libnvrtc (no GPU): `make cuda-check` points it at the
//! `nvidia-cuda-nvrtc-cu12` wheel of the venv and sets `MOELLAVA_REQUIRE_NVRTC=1`, so CI fails rather
//! than skips; elsewhere a missing libnvrtc skips with the reason printed.

use moellava_kernels::cuda::{kernel_names, nvrtc, SOURCES};

/// Ampere (A100) and Hopper (H100/H200): the oldest and newest architectures we tune for.
const ARCHS: [u32; 2] = [80, 90];

#[test]
fn every_kernel_file_compiles_and_defines_its_kernels() {
    if let Err(why) = nvrtc::load() {
        assert!(std::env::var_os("MOELLAVA_REQUIRE_NVRTC").is_none(), "MOELLAVA_REQUIRE_NVRTC is set but {why}");
        println!("skipped: {why}");
        return;
    }
    let (major, minor) = nvrtc::version().unwrap();
    let wanted = kernel_names();
    for arch in ARCHS {
        for (file, source) in SOURCES {
            let ptx = nvrtc::compile(file, source, arch).unwrap_or_else(|e| panic!("{e}"));
            let entries = nvrtc::entries(&ptx);
            for (f, name) in wanted.iter().filter(|(f, _)| *f == file) {
                assert!(entries.contains(name), "{f}: kernel `{name}` not in the PTX for compute_{arch} (entries: {entries:?})");
            }
            // What the runtime loads: machine code for the real architecture.
            let cubin = nvrtc::compile_cubin(file, source, arch).unwrap_or_else(|e| panic!("{e}"));
            for (_, name) in wanted.iter().filter(|(f, _)| *f == file) {
                assert!(nvrtc::cubin_defines(&cubin, name), "{file}: kernel `{name}` not in the CUBIN for sm_{arch}");
            }
            assert!(!nvrtc::cubin_defines(&cubin, "no_such_kernel") && !nvrtc::cubin_defines(&cubin, "matvec_q4"));
            println!(
                "NVRTC {major}.{minor}: {file} → compute_{arch}: {} kernels, {} bytes of PTX; sm_{arch} CUBIN {} bytes",
                entries.len(),
                ptx.len(),
                cubin.len()
            );
        }
    }
}

#[test]
fn a_broken_kernel_is_reported_with_nvrtc_log() {
    if nvrtc::load().is_err() {
        println!("skipped: no libnvrtc");
        return;
    }
    let err = nvrtc::compile("broken.cu", "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }", 90).unwrap_err();
    assert!(err.contains("broken.cu") && err.contains("undefined_name"), "{err}");
    let err =
        nvrtc::compile_cubin("broken.cu", "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }", 90).unwrap_err();
    assert!(err.contains("broken.cu") && err.contains("undefined_name"), "{err}");
}
