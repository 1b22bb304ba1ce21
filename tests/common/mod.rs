//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod gguf_bytes;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root (`MOELLAVA_ROOT` overrides it: a test binary carried to another machine, as
/// `make gpu-bundle` does, runs in a checkout at another path).
pub fn root() -> PathBuf {
    std::env::var_os("MOELLAVA_ROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The `moellava` binary built for these tests (`MOELLAVA_BIN` overrides it, as for [`root`]).
pub fn moellava() -> Command {
    Command::new(std::env::var_os("MOELLAVA_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_moellava").into()))
}

/// Runs `moellava ARGS`, returning its output.
pub fn run_moellava(args: &[&str]) -> Output {
    moellava().args(args).output().expect("spawn moellava")
}

/// Runs `moellava ARGS` and asserts the contract for bad input: exit code 1 and one line on stderr,
/// `error: …`, containing every `needle`. Returns that line.
pub fn expect_one_line_error(args: &[&str], needles: &[&str]) -> String {
    let o = run_moellava(args);
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{args:?}: status {:?}, stderr: {stderr}", o.status);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "{args:?}: error lacks {n:?}: {stderr}");
    }
    lines[0].to_string()
}

/// The Python interpreter with the project's checks installed (numpy, gguf, safetensors, …):
/// `$MOELLAVA_PYTHON`, else `.venv/bin/python` at the workspace root. `None` (and a printed reason)
/// when neither exists — unless `MOELLAVA_REQUIRE_PYTHON=1` (set by `make test`), which makes a missing
/// interpreter a failure, so CI can never skip the Python-backed checks silently.
pub fn python() -> Option<PathBuf> {
    let candidate = std::env::var_os("MOELLAVA_PYTHON").map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin/python"));
    if candidate.exists() {
        return Some(candidate);
    }
    if std::env::var("MOELLAVA_REQUIRE_PYTHON").as_deref() == Ok("1") {
        panic!("MOELLAVA_REQUIRE_PYTHON=1 but no interpreter at {}; run `make setup`", candidate.display());
    }
    eprintln!("SKIPPED: no Python venv at {} (run `make setup`, or `make test` which runs it)", candidate.display());
    None
}

/// Runs a Python script from `tools/` with arguments; panics with its output when it fails.
pub fn run_python(py: &Path, script: &str, args: &[&str]) -> String {
    let out = Command::new(py).arg(root().join(script)).args(args).output().expect("spawn python");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{script} {args:?} failed:\n{text}");
    text
}

/// SHA-256 of bytes, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Options of `tools/gen_checkpoint.py`.
#[derive(Clone, Copy, Debug)]
pub struct Ckpt {
    pub backbone: &'static str,
    pub tower: &'static str,
    pub dense: bool,
}

impl Ckpt {
    pub const fn moe(backbone: &'static str, tower: &'static str) -> Ckpt {
        Ckpt { backbone, tower, dense: false }
    }
    pub const fn dense(backbone: &'static str, tower: &'static str) -> Ckpt {
        Ckpt { backbone, tower, dense: true }
    }
    pub fn key(&self) -> String {
        format!("{}-{}{}", self.backbone, self.tower, if self.dense { "-dense" } else { "" })
    }
}

pub const ALL_MOE: [Ckpt; 6] = [
    Ckpt::moe("phi2", "clip"),
    Ckpt::moe("phi2", "siglip"),
    Ckpt::moe("stablelm", "clip"),
    Ckpt::moe("stablelm", "siglip"),
    Ckpt::moe("qwen", "clip"),
    Ckpt::moe("qwen", "siglip"),
];

/// A generated test checkpoint, made once per generator version and reused by every test:
/// `target/test-checkpoints/<generator hash>/<key>/` holding `model/` and the tower directory.
/// `None` (with a printed reason) when no Python venv is available.
pub fn checkpoint(c: Ckpt, extra: &[&str]) -> Option<PathBuf> {
    let mut args = vec!["--backbone", c.backbone, "--tower", c.tower];
    if c.dense {
        args.push("--dense");
    }
    args.extend_from_slice(extra);
    checkpoint_args(&args)
}

/// A generated checkpoint for raw `tools/gen_checkpoint.py` arguments (without `--out`).
pub fn checkpoint_args(gen_args: &[&str]) -> Option<PathBuf> {
    let py = python()?;
    let gen = root().join("tools/gen_checkpoint.py");
    let hash = &sha256_hex(&std::fs::read(&gen).expect("read gen_checkpoint.py"))[..12];
    let key: String = gen_args.iter().map(|a| a.trim_start_matches('-').replace([',', '.'], "-")).collect::<Vec<_>>().join("_");
    let dir = root().join("target/test-checkpoints").join(hash).join(&key);
    if dir.join("model/config.json").exists() {
        return Some(dir);
    }
    // Generate into a private directory and rename: concurrent tests never see a partial checkpoint.
    let tmp = dir.with_file_name(format!("{key}.tmp-{}-{:?}", std::process::id(), std::thread::current().id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut args = gen_args.to_vec();
    args.extend_from_slice(&["--out", tmp.to_str().unwrap()]);
    run_python(&py, "tools/gen_checkpoint.py", &args);
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp); // another test won the race
    }
    Some(dir)
}

/// The header of a safetensors file: name → (dtype, shape), in file order.
pub fn safetensors_header(path: &Path) -> Vec<(String, String, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut v: Vec<(u64, String, String, Vec<usize>)> = h
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, t)| {
            let shape = t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            (t["data_offsets"][0].as_u64().unwrap(), k.clone(), t["dtype"].as_str().unwrap().to_string(), shape)
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, k, d, s)| (k, d, s)).collect()
}

/// Runs `moellava convert CKPT/model -o OUT ARGS…` and panics with its stderr on failure.
pub fn convert(ckpt: &Path, out: &Path, args: &[&str]) {
    let model = ckpt.join("model");
    let mut all = vec!["convert", model.to_str().unwrap(), "-o", out.to_str().unwrap(), "--quiet", "--force"];
    all.extend_from_slice(args);
    let o = run_moellava(&all);
    assert!(o.status.success(), "convert {all:?} failed: {}", String::from_utf8_lossy(&o.stderr));
}

/// `moellava pope` arguments for a shapes-world POPE folder (world.py's layout: llava_pope_test.jsonl,
/// images/, coco/), one worker: tests check answers, not speed, and several runs may share the machine,
/// where ggml's spinning barrier would wait on descheduled threads.
pub fn pope_args(model: &Path, pope_dir: &Path, out: &Path) -> Vec<String> {
    let p = |s: &str| pope_dir.join(s).to_string_lossy().into_owned();
    vec![
        "pope".into(),
        "-m".into(),
        model.to_string_lossy().into(),
        "--question-file".into(),
        p("llava_pope_test.jsonl"),
        "--image-folder".into(),
        p("images"),
        "--annotation-dir".into(),
        p("coco"),
        "--out".into(),
        out.to_string_lossy().into(),
        "--threads".into(),
        "1".into(),
    ]
}
