//! Dense backbones against llama.cpp itself: a dense checkpoint converted with `--split --type f32`
//! gives the same text-only last-position logits in llama.cpp (through llama-cpp-sys-2) and in our
//! runtime, for every family.

mod common;

use common::Ckpt;
use moellava_kernels::llama::LlamaModel;
use moellava_runtime::Model;

/// Both sides compute in f32 from the same f32 weights; only summation order differs (llama.cpp's
/// own matmuls and attention), so the normalised squared error is tiny.
const MAX_NMSE: f64 = 1e-6;

#[test]
fn dense_logits_match_llama_cpp() {
    for c in [Ckpt::dense("phi2", "clip"), Ckpt::dense("stablelm", "siglip"), Ckpt::dense("qwen", "clip")] {
        let Some(dir) = common::checkpoint(c, &[]) else { return };
        let tmp = tempfile::tempdir().unwrap();
        let lm = tmp.path().join("m.gguf");
        common::convert(&dir, &lm, &["--split", "--type", "f32"]);
        let ours = Model::load(&lm).unwrap();
        assert!(ours.vision.is_none(), "the split language-model file has no tower");
        let prompt = ours.question_prompt("What is the capital of France? Answer in one word.", false);
        let ids = ours.tokenizer.encode(&prompt).unwrap();
        let input = ours.prepare(&prompt, None).unwrap();
        let answer = ours
            .generate(input, &moellava_runtime::GenerateOptions { max_new_tokens: 1, ..Default::default() }, &mut |_| {})
            .unwrap();
        let peer = LlamaModel::load(&lm).unwrap().last_logits(&ids, 2).unwrap();
        let a = &answer.last_prompt_logits;
        assert_eq!(a.len(), peer.len(), "{}: vocabulary", c.key());
        let num: f64 = a.iter().zip(&peer).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
        let den: f64 = peer.iter().map(|y| (*y as f64).powi(2)).sum();
        let nmse = num / den;
        eprintln!("{}: NMSE vs llama.cpp {nmse:.3e} over {} prompt tokens", c.key(), ids.len());
        assert!(nmse <= MAX_NMSE, "{}: NMSE {nmse:.3e} > {MAX_NMSE:.0e}", c.key());
        assert_eq!(moellava_runtime::sampler::argmax(a), moellava_runtime::sampler::argmax(&peer), "{}: greedy token", c.key());
    }
}
