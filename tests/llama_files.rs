//! Text-only GGUFs laid out and written by llama.cpp's tools load and run in our runtime (issue 6,
//! item 5): a dense checkpoint is converted by us (`--split --type f32`), rewritten in the layout of
//! llama.cpp's own converter (`tools/checks/llama_layout.py`: separate attn_q/k/v for Phi-2 and
//! StableLM, no `moellava.*` keys), then quantized by llama.cpp's own quantizer (`llama_model_quantize`,
//! what `llama-quantize` runs) to q8_0, q4_0 and its q4_K_M mix. On every file our last-position
//! logits are compared with llama.cpp's on the same file, and `moellava run` / `bench --peer` work on it.

mod common;

use common::Ckpt;
use moellava_kernels::llama::{quantize, LlamaFtype, LlamaModel};
use moellava_runtime::Model;

/// f32 weights on both sides: only summation order differs (as tests/llama_parity.rs).
const F32_NMSE: f64 = 1e-6;
/// Quantized weights, the same bytes on both sides, and both round activations to 8 bits for the dot
/// products; but with quantized weights both keep an f16 KV cache, and llama.cpp also rounds Q to f16
/// for Q·Kᵀ where we keep f32 (measured 1.5e-4 to 5.5e-4 over the three families and three types),
/// so a looser bound than f32's.
const QUANT_NMSE: f64 = 1e-3;

fn nmse(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    num / den
}

fn compare(path: &std::path::Path, label: &str, bound: f64) {
    let ours = Model::load(path).unwrap_or_else(|e| panic!("{label}: our runtime cannot load it: {e}"));
    assert!(ours.vision.is_none());
    let prompt = ours.question_prompt("What is the capital of France? Answer in one word.", false);
    let ids = ours.tokenizer.encode(&prompt).unwrap();
    let input = ours.prepare(&prompt, None).unwrap();
    let o = moellava_runtime::GenerateOptions { max_new_tokens: 1, ..Default::default() };
    let a = ours.generate(input, &o, &mut |_| {}).unwrap().last_prompt_logits;
    let peer = LlamaModel::load(path).unwrap().last_logits(&ids, 2).unwrap();
    assert_eq!(a.len(), peer.len(), "{label}: vocabulary");
    let e = nmse(&a, &peer);
    eprintln!("{label}: NMSE vs llama.cpp {e:.3e} over {} prompt tokens", ids.len());
    assert!(e <= bound, "{label}: NMSE {e:.3e} > {bound:.0e}");
}

#[test]
fn llama_cpp_written_files_load_and_agree_with_llama_cpp() {
    for c in [Ckpt::dense("phi2", "clip"), Ckpt::dense("stablelm", "siglip"), Ckpt::dense("qwen", "clip")] {
        let Some(dir) = common::checkpoint(c, &[]) else { return };
        let py = common::python().expect("checkpoint() found it");
        let tmp = tempfile::tempdir().unwrap();
        let ours = tmp.path().join("ours.gguf");
        common::convert(&dir, &ours, &["--split", "--type", "f32"]);
        let ll = tmp.path().join("llama-layout.gguf");
        common::run_python(&py, "tools/checks/llama_layout.py", &[ours.to_str().unwrap(), ll.to_str().unwrap()]);
        compare(&ll, &format!("{} llama layout f32", c.key()), F32_NMSE);
        for ftype in [LlamaFtype::Q8_0, LlamaFtype::Q4_0, LlamaFtype::Q4KM] {
            let q = tmp.path().join(format!("{ftype:?}.gguf"));
            quantize(&ll, &q, ftype, 2).unwrap();
            compare(&q, &format!("{} llama-quantize {ftype:?}", c.key()), QUANT_NMSE);
        }
        // The commands users run on such a file.
        let q = tmp.path().join("Q4KM.gguf");
        let out = common::run_moellava(&["run", "-m", q.to_str().unwrap(), "-p", "Hello", "--max-new-tokens", "3", "--json"]);
        assert!(out.status.success(), "{}: run: {}", c.key(), String::from_utf8_lossy(&out.stderr));
        let bench = [
            "bench",
            "-m",
            q.to_str().unwrap(),
            "-p",
            "8",
            "-n",
            "2",
            "-r",
            "1",
            "--threads",
            "1",
            "--peer",
            "llama.cpp",
            "--json",
        ];
        let out = common::run_moellava(&bench);
        assert!(out.status.success(), "{}: bench: {}", c.key(), String::from_utf8_lossy(&out.stderr));
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["peer"]["same_file"], true, "{}: the peer runs on the very file", c.key());
    }
}
