//! The CUDA kernels' weight decoding (`kernels/cuda/dequant.cuh`, `dq32<TY>`), compiled for the host
//! with the system C++ compiler, gives ggml's dequantised values for every weight type we ship — so
//! the block layouts every GPU kernel depends on are checked on machines without a GPU.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use moellava_kernels::cuda::type_id;
use moellava_kernels::quant::{dequantize_rows, quantize_rows_vec};
use moellava_kernels::QuantType;

fn compile_driver(dir: &Path) -> Option<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = dir.join("dequant_host");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args(["-std=c++17", "-O1", "-ffp-contract=off", "-Wall", "-Werror"])
        .arg(format!("-I{}", root.join("cuda").display()))
        .arg(root.join("tests/cuda_host_check.cpp"))
        .arg("-o")
        .arg(&exe)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(exe),
        Ok(o) => panic!("{cxx} failed on dequant.cuh:\n{}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            println!("skipped: no C++ compiler `{cxx}` ({e})");
            None
        }
    }
}

#[test]
fn dq32_matches_ggml_for_every_type() {
    let dir = tempfile::tempdir().unwrap();
    let Some(exe) = compile_driver(dir.path()) else { return };
    let (rows, cols) = (5usize, 512usize);
    // A signal with outliers and a wide range of scales per block, so every scale bit is exercised.
    let src: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let x = i as f32;
            (x * 0.37).sin() * (1.0 + (x * 0.013).cos() * 3.0) + if i % 97 == 0 { 9.0 } else { 0.0 }
        })
        .collect();
    let mut input = Vec::new();
    let mut expected = Vec::new();
    for q in QuantType::ALL {
        let bytes = quantize_rows_vec(q, &src, cols).unwrap();
        let mut want = vec![0f32; rows * cols];
        dequantize_rows(q, &bytes, &mut want).unwrap();
        input.extend_from_slice(&type_id(q).to_le_bytes());
        input.extend_from_slice(&(rows as u32).to_le_bytes());
        input.extend_from_slice(&(cols as u32).to_le_bytes());
        input.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        input.extend_from_slice(&bytes);
        expected.push((q, want));
    }
    let (inp, outp) = (dir.path().join("in.bin"), dir.path().join("out.bin"));
    std::fs::File::create(&inp).unwrap().write_all(&input).unwrap();
    let status = Command::new(&exe).arg(&inp).arg(&outp).status().unwrap();
    assert!(status.success(), "host driver failed: {status}");
    let got: Vec<f32> =
        std::fs::read(&outp).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(got.len(), expected.len() * rows * cols);
    for (i, (q, want)) in expected.iter().enumerate() {
        let got = &got[i * rows * cols..(i + 1) * rows * cols];
        for (j, (g, w)) in got.iter().zip(want).enumerate() {
            // Both sides compute `d·q` or `d·sc·q − m` in f32 in the same order (contraction off on
            // the host): the values must agree to the last bit.
            assert!(g.to_bits() == w.to_bits(), "{q:?}: value {j} (row {}, col {}): dq32 {g}, ggml {w}", j / cols, j % cols);
        }
    }
}
