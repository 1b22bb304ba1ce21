//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod gguf_bytes;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `moellava` binary built for these tests.
pub fn moellava() -> Command {
    Command::new(env!("CARGO_BIN_EXE_moellava"))
}

/// Runs `moellava ARGS`, returning its output.
pub fn run_moellava(args: &[&str]) -> Output {
    moellava().args(args).output().expect("spawn moellava")
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
