//! Bad input to `moellava convert`: each case gives a one-line error naming the file, tensor or key,
//! exit code 1, and leaves no output file (nor its temp file). Accepted variations convert.

mod common;

use std::path::{Path, PathBuf};

use common::Ckpt;

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let to = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &to);
        } else {
            std::fs::copy(&p, &to).unwrap();
        }
    }
}

/// A private, mutable copy of a generated checkpoint (model/ + tower).
struct Case {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Case {
    fn new(c: Ckpt) -> Option<Case> {
        let src = common::checkpoint(c, &[])?;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("ckpt");
        copy_dir(&src, &root);
        Some(Case { _tmp: tmp, root })
    }

    fn model(&self) -> PathBuf {
        self.root.join("model")
    }

    fn out(&self) -> PathBuf {
        self.root.join("out.gguf")
    }

    fn edit_json(&self, file: &str, f: impl FnOnce(&mut serde_json::Value)) {
        let p = self.model().join(file);
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
    }

    fn edit_bytes(&self, file: &str, f: impl FnOnce(&mut Vec<u8>)) {
        let p = self.model().join(file);
        let mut b = std::fs::read(&p).unwrap();
        f(&mut b);
        std::fs::write(&p, b).unwrap();
    }

    /// Runs convert with extra args; asserts exit 1, a one-line error containing every `needle`, and no output.
    fn expect_error(&self, extra: &[&str], needles: &[&str]) {
        let model = self.model();
        let out = self.out();
        let mut args = vec!["convert", model.to_str().unwrap(), "-o", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        common::expect_one_line_error(&args, needles);
        assert!(!out.exists() && !self.root.join("out.gguf.tmp").exists(), "{args:?}: output left behind");
    }
}

const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";

#[test]
fn bad_configs_are_rejected() {
    let Some(c) = Case::new(Ckpt::moe("phi2", "clip")) else { return };
    std::fs::rename(c.model().join("config.json"), c.root.join("config.bak")).unwrap();
    c.expect_error(&[], &["config.json", "missing"]);
    std::fs::rename(c.root.join("config.bak"), c.model().join("config.json")).unwrap();

    let orig = std::fs::read_to_string(c.model().join("config.json")).unwrap();
    std::fs::write(c.model().join("config.json"), "{\"model_type\": ").unwrap();
    c.expect_error(&[], &["config.json", "not valid JSON"]);
    let restore = || std::fs::write(c.model().join("config.json"), &orig).unwrap();

    restore();
    c.edit_json("config.json", |v| v["model_type"] = "llama".into());
    c.expect_error(&[], &["config.json", "'model_type'", "llama", "moe_llava_phi"]);

    restore();
    c.edit_json("config.json", |v| v["moe"]["moe_layers_idx"] = serde_json::json!([0, 9]));
    c.expect_error(&[], &["'moe.moe_layers_idx'", "layer 9", "out of range", "num_hidden_layers 4"]);

    restore();
    c.edit_json("config.json", |v| v["moe"]["num_experts"] = serde_json::json!([4]));
    c.expect_error(&[], &["'moe.num_experts'", "1 entries for 2 MoE layers"]);

    restore();
    c.edit_json("config.json", |v| v["intermediate_size"] = 384.into());
    c.expect_error(
        &[],
        &[
            "tensor 'model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight'",
            "[512, 256]",
            "expected [384, 256]",
        ],
    );

    restore();
    c.edit_json("config.json", |v| v["vocab_size"] = 512.into());
    c.expect_error(&[], &["'vocab_size'", "512", "len(tokenizer) = 968"]);
}

#[test]
fn bad_safetensors_are_rejected() {
    let Some(c) = Case::new(Ckpt::moe("phi2", "clip")) else { return };
    let orig1 = std::fs::read(c.model().join(SHARD1)).unwrap();
    let restore = || std::fs::write(c.model().join(SHARD1), &orig1).unwrap();

    c.edit_bytes(SHARD1, |b| b.truncate(5));
    c.expect_error(&[], &[SHARD1, "header truncated"]);

    restore();
    c.edit_bytes(SHARD1, |b| b[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes()));
    c.expect_error(&[], &[SHARD1, "header length", "exceeds"]);

    restore();
    c.edit_bytes(SHARD1, |b| b[8..20].copy_from_slice(b"not json!!!!"));
    c.expect_error(&[], &[SHARD1, "not valid JSON"]);

    restore();
    c.edit_bytes(SHARD1, |b| b.truncate(b.len() - 100));
    c.expect_error(&[], &[SHARD1, "truncated"]);

    restore();
    // The first tensor's dtype BF16 → I16 (same width, header length kept).
    c.edit_bytes(SHARD1, |b| {
        let i = b.windows(14).position(|w| w == b"\"dtype\":\"BF16\"").unwrap();
        b[i..i + 14].copy_from_slice(b"\"dtype\":\"I16\" ");
    });
    c.expect_error(&[], &["tensor 'model.embed_tokens.weight'", "dtype I16", "expected F32, F16 or BF16"]);
}

#[test]
fn bad_indexes_and_missing_tensors_are_rejected() {
    let Some(c) = Case::new(Ckpt::moe("phi2", "clip")) else { return };
    let idx = "model.safetensors.index.json";
    let orig = std::fs::read_to_string(c.model().join(idx)).unwrap();
    let restore = || std::fs::write(c.model().join(idx), &orig).unwrap();
    let expert = "model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.3.fc2.weight";

    c.edit_json(idx, |v| v["weight_map"][expert] = "model-00003-of-00002.safetensors".into());
    c.expect_error(&[], &[idx, "model-00003-of-00002.safetensors", "does not exist"]);

    restore();
    c.edit_json(idx, |v| v["weight_map"][expert] = SHARD1.into());
    c.expect_error(&[], &[&format!("tensor '{expert}'"), SHARD1, "does not hold it"]);

    restore();
    c.edit_json(idx, |v| {
        v["weight_map"].as_object_mut().unwrap().remove(expert);
    });
    c.expect_error(&[], &[&format!("tensor '{expert}' is missing"), "blk.2.ffn_down_exps.weight"]);

    restore();
    c.edit_json(idx, |v| {
        v["weight_map"].as_object_mut().unwrap().remove("lm_head.weight");
    });
    c.expect_error(&[], &["tensor 'lm_head.weight' is missing", "output.weight"]);

    restore();
    std::fs::rename(c.model().join(SHARD2), c.root.join("shard2.bak")).unwrap();
    c.expect_error(&[], &[SHARD2, "does not exist"]);
}

#[test]
fn missing_tokenizers_and_towers_are_rejected() {
    let Some(c) = Case::new(Ckpt::moe("phi2", "clip")) else { return };
    std::fs::remove_file(c.model().join("merges.txt")).unwrap();
    c.expect_error(&[], &["merges.txt", "missing"]);

    let Some(q) = Case::new(Ckpt::moe("qwen", "siglip")) else { return };
    std::fs::remove_file(q.model().join("qwen.tiktoken")).unwrap();
    q.expect_error(&[], &["qwen.tiktoken", "missing"]);

    let Some(t) = Case::new(Ckpt::moe("stablelm", "clip")) else { return };
    let tower = t.root.join("openai/clip-vit-large-patch14-336");
    std::fs::rename(&tower, t.root.join("tower.bak")).unwrap();
    t.expect_error(&[], &["vision tower 'openai/clip-vit-large-patch14-336'", "not found; tried:", "--vision-tower"]);
    t.expect_error(&["--vision-tower", "/nonexistent/tower"], &["--vision-tower /nonexistent/tower", "no config.json"]);
    std::fs::rename(t.root.join("tower.bak"), &tower).unwrap();
    let cfg = tower.join("config.json");
    let orig = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, orig.replace("\"model_type\": \"clip\"", "\"model_type\": \"bert\"")).unwrap();
    t.expect_error(&[], &["model_type 'bert' is not a vision tower", "CLIPModel"]);
    // A SigLIP tower where the checkpoint expects CLIP's width.
    let Some(s) = Case::new(Ckpt::moe("stablelm", "siglip")) else { return };
    let siglip = s.root.join("google/siglip-so400m-patch14-384");
    t.expect_error(&["--vision-tower", siglip.to_str().unwrap()], &["tower width 160 differs from mm_hidden_size 192"]);
}

#[test]
fn bad_outputs_are_rejected() {
    let Some(c) = Case::new(Ckpt::moe("qwen", "clip")) else { return };
    let model = c.model();
    // Existing output without --force.
    std::fs::write(c.out(), b"keep me").unwrap();
    let o = common::run_moellava(&["convert", model.to_str().unwrap(), "-o", c.out().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("exists; pass --force"));
    assert_eq!(std::fs::read(c.out()).unwrap(), b"keep me");
    std::fs::remove_file(c.out()).unwrap();
    // Output directory missing, or a place nobody can write (procfs refuses even root).
    for (out, needle) in [
        ("/nonexistent-dir/m.gguf", "/nonexistent-dir does not exist"),
        ("/proc/moellava-test.gguf", "/proc/moellava-test.gguf.tmp"),
    ] {
        let o = common::run_moellava(&["convert", model.to_str().unwrap(), "-o", out]);
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{out}: {e}");
        let errors: Vec<&str> = e.lines().filter(|l| l.starts_with("error: ")).collect();
        assert!(errors.len() == 1 && errors[0].contains(needle) && e.trim_end().ends_with(errors[0]), "{out}: {e}");
    }
    // Disk full, simulated by a file-size limit (writes then fail with EFBIG, as with ENOSPC).
    let script = format!(
        "trap '' XFSZ; ulimit -f 64; exec {} convert {} -o {} --type f32",
        env!("CARGO_BIN_EXE_moellava"),
        model.display(),
        c.out().display()
    );
    let o = std::process::Command::new("bash").arg("-c").arg(&script).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("out.gguf.tmp") && e.contains("too large"), "{e}");
    assert!(!c.out().exists() && !c.root.join("out.gguf.tmp").exists(), "partial output left after a failed write");
}

#[test]
fn pytorch_bin_checkpoints_are_refused_clearly() {
    let Some(c) = Case::new(Ckpt::dense("phi2", "clip")) else { return };
    for f in [SHARD1, SHARD2, "model.safetensors.index.json"] {
        std::fs::remove_file(c.model().join(f)).unwrap();
    }
    std::fs::write(c.model().join("pytorch_model.bin"), b"PK").unwrap();
    c.expect_error(&[], &["PyTorch .bin weights", "only safetensors"]);
}

#[test]
fn accepted_variations_convert() {
    let Some(py) = common::python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    // Single file, with the tower copy inside the checkpoint (skipped: the hub tower is used).
    let single = common::checkpoint(Ckpt::moe("phi2", "siglip"), &["--single-file", "--tower-copy"]).unwrap();
    assert!(single.join("model/model.safetensors").exists());
    common::convert(&single, &tmp.path().join("a.gguf"), &[]);
    // Tower found in a Hugging Face cache through $HF_HOME.
    let dir = tmp.path().join("hfcache-ckpt");
    let cache = tmp.path().join("hf");
    common::run_python(
        &py,
        "tools/gen_checkpoint.py",
        &["--backbone", "qwen", "--tower", "clip", "--out", dir.to_str().unwrap(), "--hf-cache", cache.to_str().unwrap()],
    );
    let o = common::moellava()
        .args(["convert", dir.join("model").to_str().unwrap(), "-o", tmp.path().join("b.gguf").to_str().unwrap(), "-q"])
        .env("HF_HOME", &cache)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The same without HF_HOME fails and says where it looked.
    let o = common::moellava()
        .args(["convert", dir.join("model").to_str().unwrap(), "-o", tmp.path().join("c.gguf").to_str().unwrap()])
        .env_remove("HF_HOME")
        .env("HOME", tmp.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("models--openai--clip-vit-large-patch14-336"));
}
