//! Ctrl-C during a conversion leaves neither the output nor its temp file behind.

mod common;

use std::time::{Duration, Instant};

use common::Ckpt;

#[test]
fn sigint_mid_conversion_leaves_nothing_behind() {
    // A medium checkpoint (~100 MB): quantizing it to q4_k takes long enough to interrupt.
    let Some(dir) = common::checkpoint(Ckpt::moe("phi2", "clip"), &["--size", "medium"]) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.gguf");
    let tmp_file = tmp.path().join("m.gguf.tmp");
    let mut child = common::moellava()
        .args(["convert", dir.join("model").to_str().unwrap(), "-o", out.to_str().unwrap(), "--type", "q4_k", "-q"])
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !tmp_file.exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "conversion never started writing");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("conversion ended ({status}) before it could be interrupted");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let killed = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    if status.success() {
        eprintln!("SKIPPED: the conversion finished before SIGINT arrived");
        return;
    }
    assert_eq!(status.code(), Some(130), "exit status after SIGINT");
    assert!(!out.exists(), "output exists after an interrupted conversion");
    assert!(!tmp_file.exists(), "temp file left after an interrupted conversion");
}
