//! The model fixtures were made from checkpoints that tools/gen_checkpoint.py must still produce byte
//! for byte: otherwise the runtime would be compared against a reference run on other weights.

mod common;

#[test]
fn generator_still_produces_the_fixture_checkpoints() {
    let dir = common::root().join("tests/fixtures/model");
    let mut combos: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    combos.sort();
    assert!(combos.len() >= 8, "expected 8 fixture combinations in {}", dir.display());
    for combo in combos {
        let rec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(combo.join("checkpoint.json")).unwrap()).unwrap();
        let args: Vec<&str> = rec["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        let Some(ckpt) = common::checkpoint_args(&args) else { return };
        for (file, want) in rec["sha256"].as_object().unwrap() {
            let got = common::sha256_hex(&std::fs::read(ckpt.join(file)).unwrap_or_else(|e| panic!("{file}: {e}")));
            assert_eq!(
                got,
                want.as_str().unwrap(),
                "{}: tools/gen_checkpoint.py {} now writes a different {file}; regenerate the fixtures with `make fixtures`",
                combo.display(),
                args.join(" ")
            );
        }
    }
}
