//! Bad input to `moellava run`: a one-line error and exit code 1, never a panic.

mod common;

use std::path::{Path, PathBuf};

use common::expect_one_line_error as expect_error;
use common::Ckpt;
use moellava_runtime::gguf::{GgufFile, GgufWriter, TensorSpec, Value};

fn model(tmp: &Path) -> Option<PathBuf> {
    let dir = common::checkpoint(Ckpt::moe("phi2", "clip"), &[])?;
    let out = tmp.join("m.gguf");
    common::convert(&dir, &out, &["--preset", "q8"]);
    Some(out)
}

/// Copies a GGUF, dropping tensor `skip` and replacing metadata keys.
fn rewrite(src: &Path, dst: &Path, skip: Option<&str>, set: &[(&str, Value)]) {
    let f = GgufFile::open(src).unwrap();
    let kvs: Vec<(String, Value)> = f
        .meta
        .kvs()
        .iter()
        .map(|(k, v)| (k.clone(), set.iter().find(|(s, _)| s == k).map(|(_, n)| n.clone()).unwrap_or_else(|| v.clone())))
        .collect();
    let keep: Vec<_> = f.meta.tensors().iter().filter(|t| Some(t.name.as_str()) != skip).collect();
    let mut w = GgufWriter::create(
        dst,
        &kvs,
        keep.iter().map(|t| TensorSpec { name: t.name.clone(), ggml_type: t.ggml_type, dims: t.dims.clone() }).collect(),
    )
    .unwrap();
    for t in keep {
        w.write_tensor(&t.name, f.tensor_data(t)).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn bad_runs_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(m) = model(tmp.path()) else { return };
    let m = m.to_str().unwrap();
    let img = common::root().join("tests/fixtures/images/wide.png");
    let img = img.to_str().unwrap();

    expect_error(&["run", "-m", m, "--image", "/nonexistent/x.png", "-p", "hi"], &["/nonexistent/x.png"]);
    let bad = tmp.path().join("bad.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\n garbage").unwrap();
    expect_error(&["run", "-m", m, "--image", bad.to_str().unwrap(), "-p", "hi"], &["bad.png"]);
    let txt = tmp.path().join("notes.txt");
    std::fs::write(&txt, b"hello, not a picture").unwrap();
    expect_error(&["run", "-m", m, "--image", txt.to_str().unwrap(), "-p", "hi"], &["notes.txt", "not a JPEG"]);
    expect_error(&["run", "-m", m, "-p", "   "], &["prompt", "empty"]);
    let long = "word ".repeat(3000);
    expect_error(&["run", "-m", m, "-p", &long], &["exceed the context length 2048"]);
    expect_error(&["run", "-m", m, "--image", img, "--raw-prompt", "-p", "<image> and <image>"], &["2 '<image>' tags"]);
    expect_error(&["run", "-m", m, "--raw-prompt", "-p", "USER: <image> ASSISTANT:"], &["no image was given"]);
    expect_error(&["run", "-m", m, "-p", "hi", "--gating", "random"], &["unknown --gating 'random'"]);
    expect_error(&["run", "-m", m, "-p", "hi", "--max-new-tokens", "many"], &["invalid value 'many'"]);
    expect_error(&["run", "-m", "/nonexistent.gguf", "-p", "hi"], &["/nonexistent.gguf"]);

    let llama = tmp.path().join("llama.gguf");
    rewrite(Path::new(m), &llama, None, &[("general.architecture", Value::from("llama"))]);
    expect_error(&["run", "-m", llama.to_str().unwrap(), "-p", "hi"], &["architecture is 'llama'"]);
    let holed = tmp.path().join("holed.gguf");
    rewrite(Path::new(m), &holed, Some("blk.1.attn_qkv.weight"), &[]);
    expect_error(&["run", "-m", holed.to_str().unwrap(), "-p", "hi"], &["tensor 'blk.1.attn_qkv.weight' is missing"]);
}

#[test]
fn run_json_and_logits_out_have_the_documented_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(m) = model(tmp.path()) else { return };
    let img = common::root().join("tests/fixtures/images/square.png");
    let npy = tmp.path().join("logits.npy");
    let o = common::run_moellava(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "-p",
        "What is in the picture?",
        "--max-new-tokens",
        "5",
        "--ignore-eos",
        "--json",
        "--logits-out",
        npy.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in ["text", "tokens", "prompt_tokens", "image_tokens", "stop_reason", "timings", "memory", "routing"] {
        assert!(j.get(key).is_some(), "--json lacks {key}");
    }
    assert_eq!(j["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(j["image_tokens"], 16);
    assert_eq!(j["stop_reason"], "max_new_tokens");
    assert_eq!(j["routing"].as_array().unwrap().len(), 2, "two MoE layers");
    for k in ["load_s", "image_encode_s", "prefill_s", "decode_s", "prefill_tokens_per_s", "decode_tokens_per_s"] {
        assert!(j["timings"][k].is_number(), "timings.{k}");
    }
    let logits = moellava_runtime::npy::read(&npy).unwrap();
    assert_eq!(logits.shape, vec![968], "len(tokenizer) logits");
    // Greedy runs repeat exactly; the streamed text equals the final text.
    let plain = common::run_moellava(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "-p",
        "What is in the picture?",
        "--max-new-tokens",
        "5",
        "--ignore-eos",
    ]);
    assert_eq!(String::from_utf8_lossy(&plain.stdout).trim(), j["text"].as_str().unwrap());
}

#[test]
fn chat_reads_turns_from_a_pipe() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(m) = model(tmp.path()) else { return };
    let img = common::root().join("tests/fixtures/images/tall.png");
    let mut child = common::moellava()
        .args(["chat", "-m", m.to_str().unwrap(), "--image", img.to_str().unwrap(), "--max-new-tokens", "3", "--ignore-eos"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"Is there a dog?\nAnd a cat?\n/reset\n/image /nonexistent.png\nWhat now?\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 3, "one answer line per turn: {stdout:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("conversation reset") && stderr.contains("/nonexistent.png"), "{stderr}");
}
