//! The product's headline measurement on the model the project trained (models/moellava-toy): POPE on
//! the held-out shapes-world split (60 pictures, 1,080 questions over random / popular / adversarial),
//! at F16, with Q8_0 experts and with the q4 preset (Q4_K experts), against issue 9's goals.
//! Converts from the committed Hugging Face-layout checkpoint every time, so convert is part of the path.

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Issue 9: the F16 model must be a real yes/no answerer on every POPE category.
const F16_MIN_ACCURACY: f64 = 0.90;
/// Issue 9: 8-bit experts may move mean F1 by at most half a point and change at most 1% of answers.
const Q8_MAX_ABS_DELTA_F1: f64 = 0.005;
const Q8_MIN_AGREEMENT: f64 = 0.99;
/// Issue 9: 4-bit experts (q4 preset) may move mean F1 by at most 1.5 points and change at most 3% of answers.
const Q4_MAX_ABS_DELTA_F1: f64 = 0.015;
const Q4_MIN_AGREEMENT: f64 = 0.97;

fn toy() -> PathBuf {
    common::root().join("models/moellava-toy")
}

fn run_pope(model: &Path, out: &Path) {
    let args = common::pope_args(model, &toy().join("pope"), out);
    let o = common::moellava().args(&args).output().unwrap();
    assert!(o.status.success(), "pope on {}: {}", model.display(), String::from_utf8_lossy(&o.stderr));
}

#[test]
fn trained_toy_model_meets_the_pope_goals() {
    let dir = tempfile::tempdir().unwrap();
    let plans: [(&str, &[&str]); 3] =
        [("f16", &["--type", "f16"]), ("q8_0", &["--type", "f16", "--experts", "q8_0"]), ("q4", &["--preset", "q4"])];
    let mut runs = Vec::new();
    for (name, args) in plans {
        let model = dir.path().join(format!("toy-{name}.gguf"));
        common::convert(&toy(), &model, args);
        let run = dir.path().join(name);
        run_pope(&model, &run);
        runs.push(run);
    }

    let metrics: Value = serde_json::from_str(&std::fs::read_to_string(runs[0].join("metrics.json")).unwrap()).unwrap();
    for cat in ["random", "popular", "adversarial"] {
        let acc = metrics["categories"][cat]["accuracy"].as_f64().unwrap();
        eprintln!("f16 {cat}: accuracy {:.2}%", 100.0 * acc);
        assert!(acc >= F16_MIN_ACCURACY, "F16 accuracy on {cat}: {acc:.4} < {F16_MIN_ACCURACY}");
    }

    let mut args: Vec<String> = vec!["compare".into()];
    args.extend(runs.iter().map(|r| r.to_string_lossy().into_owned()));
    args.push("--json".into());
    let o = common::moellava().args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    for (i, (name, max_df1, min_agree)) in
        [(1, ("q8_0", Q8_MAX_ABS_DELTA_F1, Q8_MIN_AGREEMENT)), (2, ("q4", Q4_MAX_ABS_DELTA_F1, Q4_MIN_AGREEMENT))]
    {
        let r = &j["runs"][i];
        let df1 = r["delta_mean_f1"].as_f64().unwrap();
        let agree = r["agreement"].as_f64().unwrap();
        eprintln!("{name} vs f16: ΔF1 {:+.2} points, agreement {:.2}%", 100.0 * df1, 100.0 * agree);
        assert!(df1.abs() <= max_df1, "{name}: |ΔF1| = {:.4} > {max_df1}", df1.abs());
        assert!(agree >= min_agree, "{name}: agreement {agree:.4} < {min_agree}");
    }
}
