//! `tools/gen_checkpoint.py` writes the real Hugging Face layouts: checked here so that every later
//! test that reads a generated checkpoint reads the right thing.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{Ckpt, ALL_MOE};

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// All tensors of a checkpoint directory, through its index (or the single file).
fn model_tensors(model: &Path) -> BTreeMap<String, (String, Vec<usize>, String)> {
    let mut out = BTreeMap::new();
    let index = model.join("model.safetensors.index.json");
    let shards: Vec<String> = if index.exists() {
        let idx = read_json(&index);
        let mut s: Vec<String> =
            idx["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap().to_string()).collect();
        s.sort();
        s.dedup();
        s
    } else {
        vec!["model.safetensors".into()]
    };
    for shard in shards {
        for (name, dtype, shape) in common::safetensors_header(&model.join(&shard)) {
            assert!(out.insert(name.clone(), (dtype, shape, shard.clone())).is_none(), "{name} in two shards");
        }
    }
    if index.exists() {
        let idx = read_json(&index);
        let map = idx["weight_map"].as_object().unwrap();
        assert_eq!(map.len(), out.len(), "index lists every tensor once");
        for (name, shard) in map {
            assert_eq!(out[name].2, shard.as_str().unwrap(), "index names the shard holding {name}");
        }
    }
    out
}

#[test]
fn every_family_has_the_release_layout() {
    for c in ALL_MOE.iter().copied().chain([Ckpt::dense("phi2", "clip"), Ckpt::dense("qwen", "siglip")]) {
        let Some(dir) = common::checkpoint(c, &[]) else { return };
        let model = dir.join("model");
        let cfg = read_json(&model.join("config.json"));
        let tensors = model_tensors(&model);
        let (emb, prefix) = match c.backbone {
            "qwen" => ("transformer.wte.weight", "transformer"),
            _ => ("model.embed_tokens.weight", "model"),
        };
        let vocab_rows = cfg["vocab_size"].as_u64().unwrap() as usize;
        assert_eq!(tensors[emb].1, vec![vocab_rows, 256], "{}: embedding", c.key());
        assert_eq!(tensors["lm_head.weight"].1, vec![vocab_rows, 256]);
        assert!(!tensors.contains_key("lm_head.bias"), "MoE-LLaVA's lm_head has no bias");
        assert!(tensors.values().all(|t| t.0 == "BF16"), "{}: all BF16", c.key());
        let mm = cfg["mm_hidden_size"].as_u64().unwrap() as usize;
        assert_eq!(tensors[&format!("{prefix}.mm_projector.image_spatial_proj.0.weight")].1, vec![256, mm]);
        let n_layers = cfg["num_hidden_layers"].as_u64().unwrap() as usize;
        let moe_layers: Vec<usize> = if c.dense {
            assert!(cfg.get("moe").is_none(), "dense checkpoints carry no moe config");
            vec![]
        } else {
            let moe = &cfg["moe"];
            let idx: Vec<usize> =
                moe["moe_layers_idx"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            assert_eq!(moe["num_experts"].as_array().unwrap().len(), idx.len());
            assert_eq!(moe["top_k_experts"], 2);
            idx
        };
        let layer = |i: usize| if c.backbone == "qwen" { format!("transformer.h.{i}") } else { format!("model.layers.{i}") };
        for i in 0..n_layers {
            let gate = format!("{}.mlp.deepspeed_moe.gate.wg.weight", layer(i));
            assert_eq!(tensors.contains_key(&gate), moe_layers.contains(&i), "{}: router of layer {i}", c.key());
            if moe_layers.contains(&i) {
                assert_eq!(tensors[&gate].1, vec![4, 256]);
                for e in 0..4 {
                    let p = format!("{}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.", layer(i));
                    assert!(tensors.keys().any(|k| k.starts_with(&p)), "{}: expert {e} of layer {i}", c.key());
                }
            }
        }
        // A MoE layer is split across the two shards (the converter must follow the index).
        if let Some(last) = moe_layers.last() {
            let p = format!("{}.mlp.deepspeed_moe.", layer(*last));
            let shards: std::collections::BTreeSet<_> =
                tensors.iter().filter(|(k, _)| k.starts_with(&p)).map(|(_, v)| v.2.clone()).collect();
            assert_eq!(shards.len(), 2, "{}: MoE layer {last} spans both shards", c.key());
        }
        // The tower sits where mm_image_tower resolves relative to the checkpoint's parent.
        let tower = dir.join(cfg["mm_image_tower"].as_str().unwrap());
        let tcfg = read_json(&tower.join("config.json"));
        assert_eq!(tcfg["vision_config"]["hidden_size"].as_u64().unwrap() as usize, mm);
        let tt = common::safetensors_header(&tower.join("model.safetensors"));
        assert!(tt.iter().any(|t| t.0.starts_with("text_model.")), "tower keeps its text half");
        assert!(tt.iter().any(|t| t.0 == "vision_model.encoder.layers.0.self_attn.q_proj.weight"));
        let has_class = tt.iter().any(|t| t.0 == "vision_model.embeddings.class_embedding");
        assert_eq!(has_class, c.tower == "clip");
    }
}

#[test]
fn tokenizer_files_are_the_family_formats_and_fit_the_embedding() {
    for c in [Ckpt::moe("phi2", "clip"), Ckpt::moe("stablelm", "clip"), Ckpt::moe("qwen", "clip")] {
        let Some(dir) = common::checkpoint(c, &[]) else { return };
        let model = dir.join("model");
        let rows = read_json(&model.join("config.json"))["vocab_size"].as_u64().unwrap() as usize;
        let (n_tokens, files): (usize, &[&str]) = match c.backbone {
            "phi2" => {
                let vocab = read_json(&model.join("vocab.json")).as_object().unwrap().len();
                let added = read_json(&model.join("added_tokens.json")).as_object().unwrap().len();
                (vocab + added, &["vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json"])
            }
            "stablelm" => (
                std::fs::read_to_string(model.join("arcade100k.tiktoken")).unwrap().lines().count() + 1 + 32,
                &["arcade100k.tiktoken", "tokenizer_config.json"],
            ),
            _ => (
                std::fs::read_to_string(model.join("qwen.tiktoken")).unwrap().lines().count() + 208,
                &["qwen.tiktoken", "tokenizer_config.json"],
            ),
        };
        for f in files {
            assert!(model.join(f).exists(), "{}: {f}", c.key());
        }
        assert!(
            rows > n_tokens && rows.is_multiple_of(64),
            "{}: {rows} embedding rows padded above len(tokenizer) {n_tokens}",
            c.key()
        );
    }
}

#[test]
fn generation_is_deterministic() {
    let Some(py) = common::python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut digests = Vec::new();
    for run in ["a", "b"] {
        let out = dir.path().join(run);
        common::run_python(
            &py,
            "tools/gen_checkpoint.py",
            &["--backbone", "stablelm", "--tower", "siglip", "--out", out.to_str().unwrap()],
        );
        let mut files: Vec<_> = walk(&out);
        files.sort();
        digests.push(
            files
                .iter()
                .map(|p| (p.strip_prefix(&out).unwrap().to_path_buf(), common::sha256_hex(&std::fs::read(p).unwrap())))
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(digests[0], digests[1]);
}

fn walk(d: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
