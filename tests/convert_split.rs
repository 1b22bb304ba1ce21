//! `convert --split` writes llama.cpp's own layout: the language model of a dense checkpoint loads in
//! llama.cpp (through llama-cpp-sys-2) with the expected hyper-parameters, and the mmproj file holds
//! the keys and tensors llama.cpp's LLaVA projector ("mlp") path reads.

mod common;

use common::Ckpt;
use moellava_kernels::llama::LlamaModel;
use moellava_runtime::gguf::GgufFile;

#[test]
fn dense_split_files_load_in_llama_cpp() {
    for c in [Ckpt::dense("phi2", "clip"), Ckpt::dense("stablelm", "siglip"), Ckpt::dense("qwen", "clip")] {
        let Some(dir) = common::checkpoint(c, &[]) else { return };
        let tmp = tempfile::tempdir().unwrap();
        let lm = tmp.path().join("m.gguf");
        common::convert(&dir, &lm, &["--split", "--type", "f32"]);
        let mmproj = tmp.path().join("m.mmproj.gguf");
        assert!(mmproj.exists(), "{}: no mmproj file", c.key());

        let ours = GgufFile::open(&lm).unwrap();
        let arch = ours.meta.get_str("general.architecture").unwrap().to_string();
        assert!(ours.meta.tensors().iter().all(|t| !t.name.starts_with("v.") && !t.name.starts_with("mm.")));
        let model = LlamaModel::load(&lm).unwrap_or_else(|e| panic!("{}: {e}", c.key()));
        assert_eq!(model.n_embd(), ours.meta.get_usize(&format!("{arch}.embedding_length")).unwrap());
        assert_eq!(model.n_layer(), ours.meta.get_usize(&format!("{arch}.block_count")).unwrap());
        assert_eq!(model.n_vocab(), ours.meta.get_usize("moellava.tokenizer.len").unwrap());
        assert_eq!(model.meta("general.architecture").as_deref(), Some(arch.as_str()));
        let logits = model.last_logits(&[10, 20, 30, 40], 2).unwrap();
        assert_eq!(logits.len(), model.n_vocab());
        assert!(logits.iter().all(|v| v.is_finite()), "{}: non-finite logits", c.key());

        let mm = GgufFile::open(&mmproj).unwrap();
        let m = &mm.meta;
        assert_eq!(m.get_str("general.architecture").unwrap(), "clip");
        assert_eq!(m.get_str("clip.projector_type").unwrap(), "mlp");
        assert!(m.get_bool("clip.has_vision_encoder").unwrap());
        let (w, ff, n_blk) = (
            m.get_usize("clip.vision.embedding_length").unwrap(),
            m.get_usize("clip.vision.feed_forward_length").unwrap(),
            m.get_usize("clip.vision.block_count").unwrap(),
        );
        let patch = m.get_usize("clip.vision.patch_size").unwrap();
        let n_pos = (m.get_usize("clip.vision.image_size").unwrap() / patch).pow(2) + usize::from(c.tower == "clip");
        let shape = |n: &str| m.tensor_info(n).unwrap_or_else(|| panic!("{}: mmproj lacks {n}", c.key())).shape();
        assert_eq!(shape("v.patch_embd.weight"), vec![w, 3, patch, patch]);
        assert_eq!(shape("v.position_embd.weight"), vec![n_pos, w]);
        assert_eq!(m.tensor_info("v.class_embd").is_some(), c.tower == "clip");
        for i in 0..n_blk {
            for (t, s) in [
                ("attn_q", vec![w, w]),
                ("attn_k", vec![w, w]),
                ("attn_v", vec![w, w]),
                ("attn_out", vec![w, w]),
                ("ffn_up", vec![ff, w]),
                ("ffn_down", vec![w, ff]),
            ] {
                assert_eq!(shape(&format!("v.blk.{i}.{t}.weight")), s);
                assert!(m.tensor_info(&format!("v.blk.{i}.{t}.bias")).is_some());
            }
            for ln in ["ln1", "ln2"] {
                assert_eq!(shape(&format!("v.blk.{i}.{ln}.weight")), vec![w]);
            }
        }
        let n_embd = model.n_embd();
        assert_eq!(shape("mm.0.weight"), vec![n_embd, w]);
        assert_eq!(shape("mm.2.weight"), vec![n_embd, n_embd]);
        assert_eq!(m.get_usize("clip.vision.projection_dim").unwrap(), n_embd);
    }
}
