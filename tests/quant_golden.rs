//! ggml's block formats, through moellava's wrappers, bit for bit against the `gguf` Python
//! package's independent numpy implementation (golden files from `tools/gen_quant_golden.py`).

use std::path::PathBuf;

use moellava_kernels::quant::{self, QuantType};
use moellava_runtime::npy;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quant").join(name)
}

const CASES: [&str; 5] = ["normal", "zeros", "huge", "tiny", "edge"];
const QUANTIZABLE: [QuantType; 7] =
    [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1, QuantType::Q5_0, QuantType::Q5_1, QuantType::F16, QuantType::BF16];
const DEQUANT_ONLY: [QuantType; 3] = [QuantType::Q4_K, QuantType::Q5_K, QuantType::Q6_K];

/// Compares f32 bit patterns (so -0.0 ≠ 0.0) and reports the first differences.
fn assert_bits_equal(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<_> = got.iter().zip(want).enumerate().filter(|(_, (g, w))| g.to_bits() != w.to_bits()).take(5).collect();
    assert!(bad.is_empty(), "{what}: first differences (index, (ours, gguf-py)): {bad:?}");
}

/// The one place where ggml and gguf-py disagree: a Q4_0/Q5_0 block whose values are all -0.0.
/// ggml starts its running `max` at +0.0 and never replaces it (|-0| is not > 0), so d = +0/-8 = -0.0;
/// gguf-py takes the arg-max element itself (-0.0), so d = -0/-8 = +0.0. Only the sign bit of the
/// fp16 scale differs (byte 1 of the block); the quantized values are identical. This returns the
/// golden bytes with that bit set the ggml way, so every other byte must still match exactly.
fn ggml_signed_zero_scales(q: QuantType, input: &[f32], golden: &[u8]) -> Vec<u8> {
    let mut want = golden.to_vec();
    if matches!(q, QuantType::Q4_0 | QuantType::Q5_0) {
        for (b, block) in input.chunks_exact(q.block_size()).enumerate() {
            if block.iter().all(|v| v.to_bits() == (-0.0f32).to_bits()) {
                want[b * q.type_size() + 1] |= 0x80;
            }
        }
    }
    want
}

#[test]
fn quantize_is_bit_identical_to_gguf_py() {
    for q in QUANTIZABLE {
        for case in CASES {
            let input = npy::read(fixture(&format!("input_{case}.npy"))).unwrap();
            let cols = input.shape[1];
            let want = npy::read(fixture(&format!("{}_{case}.npy", q.name()))).unwrap();
            let x = input.to_f32().unwrap();
            let got = quant::quantize_rows_vec(q, &x, cols).unwrap();
            let want = ggml_signed_zero_scales(q, &x, want.bytes().unwrap());
            assert_eq!(got.len(), want.len(), "{q} {case}: byte length");
            if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
                let block = i / q.type_size();
                panic!("{q} {case}: first differing byte {i} (block {block}): ours {} gguf-py {}", got[i], want[i]);
            }
        }
    }
}

#[test]
fn dequantize_is_bit_identical_to_gguf_py() {
    for q in QUANTIZABLE {
        for case in CASES {
            let bytes = npy::read(fixture(&format!("{}_{case}.npy", q.name()))).unwrap();
            let want = npy::read(fixture(&format!("{}_{case}_dequant.npy", q.name()))).unwrap().to_f32().unwrap();
            let mut got = vec![0f32; want.len()];
            quant::dequantize_rows(q, bytes.bytes().unwrap(), &mut got).unwrap();
            assert_bits_equal(&format!("{q} {case}"), &got, &want);
        }
    }
}

#[test]
fn k_quant_dequantize_is_bit_identical_to_gguf_py() {
    for q in DEQUANT_ONLY {
        let blocks = npy::read(fixture(&format!("{}_blocks.npy", q.name()))).unwrap();
        let want = npy::read(fixture(&format!("{}_blocks_dequant.npy", q.name()))).unwrap().to_f32().unwrap();
        let mut got = vec![0f32; want.len()];
        quant::dequantize_rows(q, blocks.bytes().unwrap(), &mut got).unwrap();
        assert_bits_equal(q.name(), &got, &want);
    }
}

#[test]
fn golden_manifest_lists_every_case() {
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("manifest.json")).unwrap()).unwrap();
    for q in QUANTIZABLE {
        let cases = m["quantized"][q.name()].as_array().unwrap_or_else(|| panic!("{q} missing from manifest"));
        assert_eq!(cases.len(), CASES.len(), "{q}");
    }
    for q in DEQUANT_ONLY {
        assert!(m["dequant_only"][q.name()].as_u64().unwrap() > 0, "{q}");
    }
}
