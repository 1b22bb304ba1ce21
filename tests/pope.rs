//! POPE: scoring with the official semantics (against a transcription of eval_pope.py), and the
//! run mechanics — kill and resume, shards and merge, missing images, compare and its chart.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Ckpt;
use serde_json::{json, Value};

fn write_lines(path: &Path, lines: &[Value]) {
    std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

/// A tiny POPE dataset whose question ids differ from the annotation ids, with tricky answers.
fn synthetic_dataset(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ann = dir.join("coco");
    std::fs::create_dir_all(&ann).unwrap();
    let tricky = [
        "NO",
        "Not at all",
        "1. No",
        "no!",
        " No",
        "No, there is not.",
        "There is no dog",
        "Yes, no doubt",
        "No\tthere is none",
        "Yes",
        "No",
        "yes.",
    ];
    let (mut questions, mut answers) = (Vec::new(), Vec::new());
    for (ci, cat) in ["adversarial", "popular", "random"].iter().enumerate() {
        let mut labels = Vec::new();
        for k in 0..40 {
            let label = if (k * 7 + ci) % 3 == 0 { "no" } else { "yes" };
            labels.push(
                json!({"question_id": k, "image": format!("img{k}.png"), "text": "Is there a cat in the image?", "label": label}),
            );
            let qid = 1000 * (ci + 1) + k; // unlike the annotation ids: matching is positional
            questions.push(json!({"question_id": qid, "image": format!("img{k}.png"), "text": "Is there a cat in the image?\nAnswer the question using a single word or phrase.", "category": cat}));
            answers.push(json!({"question_id": qid, "prompt": "q", "text": tricky[(k + ci) % tricky.len()], "answer_id": "x", "model_id": "m", "metadata": {}}));
        }
        write_lines(&ann.join(format!("coco_pope_{cat}.json")), &labels);
    }
    // Interleave categories in the result file: grouping by category must keep file order.
    answers.sort_by_key(|a| a["question_id"].as_u64().unwrap() % 1000);
    let (q, a) = (dir.join("questions.jsonl"), dir.join("answers.jsonl"));
    write_lines(&q, &questions);
    write_lines(&a, &answers);
    (ann, q, a)
}

#[test]
fn score_matches_the_official_script() {
    let Some(py) = common::python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (ann, q, a) = synthetic_dataset(tmp.path());
    let args =
        ["--annotation-dir", ann.to_str().unwrap(), "--question-file", q.to_str().unwrap(), "--result-file", a.to_str().unwrap()];
    let o = common::run_moellava(&[&["pope", "score", "--json"][..], &args[..]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours: Value = serde_json::from_slice(&o.stdout).unwrap();
    let theirs: Value = serde_json::from_str(&common::run_python(&py, "tools/checks/eval_pope_official.py", &args)).unwrap();
    for (cat, t) in theirs["categories"].as_object().unwrap() {
        for key in ["tp", "fp", "tn", "fn"] {
            assert_eq!(ours["categories"][cat][key], t[key], "{cat}.{key}");
        }
        for key in ["accuracy", "precision", "recall", "f1", "yes_ratio"] {
            let (x, y) = (ours["categories"][cat][key].as_f64().unwrap(), t[key].as_f64().unwrap());
            assert!((x - y).abs() < 1e-12, "{cat}.{key}: {x} vs {y}");
        }
    }
    assert!((ours["mean_f1"].as_f64().unwrap() - theirs["mean_f1"].as_f64().unwrap()).abs() < 1e-12);
    // The official printout.
    let o = common::run_moellava(&[&["pope", "score"][..], &args[..]].concat());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("Category: adversarial, # samples: 40\nTP\tFP\tTN\tFN\t\n"), "{text}");
    assert!(text.contains("====================================\n"));
}

#[test]
fn undefined_metrics_are_null_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let (ann, q, a) = synthetic_dataset(tmp.path());
    let answers: Vec<Value> = std::fs::read_to_string(&a)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v["text"] = "No".into();
            v
        })
        .collect();
    write_lines(&a, &answers);
    let o = common::run_moellava(&[
        "pope",
        "score",
        "--json",
        "--annotation-dir",
        ann.to_str().unwrap(),
        "--question-file",
        q.to_str().unwrap(),
        "--result-file",
        a.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(j["categories"]["random"]["precision"].is_null() && j["mean_f1"].is_null());
    assert!(String::from_utf8_lossy(&o.stderr).contains("precision is undefined"));
}

struct Bench {
    _tmp: tempfile::TempDir,
    model: PathBuf,
    pope: PathBuf,
}

/// A random-weight model and a small shapes-world POPE set (12 pictures, 216 questions).
fn bench() -> Option<Bench> {
    let py = common::python()?;
    let ckpt = common::checkpoint(Ckpt::moe("phi2", "clip"), &[])?;
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m.gguf");
    common::convert(&ckpt, &model, &["--preset", "q8"]);
    let pope = tmp.path().join("pope");
    common::run_python(&py, "tools/shapes_world/world.py", &["pope", pope.to_str().unwrap(), "--images", "12"]);
    Some(Bench { _tmp: tmp, model, pope })
}

impl Bench {
    fn args(&self, out: &Path) -> Vec<String> {
        let mut a = common::pope_args(&self.model, &self.pope, out);
        a.extend(["--max-new-tokens".into(), "4".into()]);
        a
    }

    fn run(&self, out: &Path, extra: &[&str]) {
        let mut a = self.args(out);
        a.extend(extra.iter().map(|s| s.to_string()));
        let o = common::moellava().args(&a).output().unwrap();
        assert!(o.status.success(), "{a:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn killed_runs_resume_to_identical_results_and_shards_merge() {
    let Some(b) = bench() else { return };
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full");
    b.run(&full, &[]);
    let answers = std::fs::read_to_string(full.join("answers.jsonl")).unwrap();
    assert_eq!(answers.lines().count(), 216);
    let metrics = std::fs::read_to_string(full.join("metrics.json")).unwrap();
    let run: Value = serde_json::from_str(&std::fs::read_to_string(full.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["model"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(run["questions"]["answered"], 216);

    // Kill -9 part-way, then resume.
    let killed = dir.path().join("killed");
    let mut child = common::moellava().args(b.args(&killed)).spawn().unwrap();
    let path = killed.join("answers.jsonl");
    while std::fs::read_to_string(&path).map(|t| t.lines().count()).unwrap_or(0) < 60 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    let partial = std::fs::read_to_string(&path).unwrap().lines().count();
    assert!(partial < 216, "the run finished before it could be killed ({partial} answers)");
    // Without --resume the folder is refused; with it the run completes.
    let o = common::moellava().args(b.args(&killed)).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    b.run(&killed, &["--resume"]);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), answers, "resumed answers differ");
    assert_eq!(std::fs::read_to_string(killed.join("metrics.json")).unwrap(), metrics);

    // Three shards merged give the full run back.
    let shards: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("shard{i}"))).collect();
    for (i, s) in shards.iter().enumerate() {
        b.run(s, &["--shard", &format!("{i}/3")]);
    }
    let merged = dir.path().join("merged");
    let mut a: Vec<String> = vec!["pope".into(), "merge".into()];
    a.extend(shards.iter().map(|s| s.to_string_lossy().into_owned()));
    a.extend(["--out".into(), merged.to_string_lossy().into_owned()]);
    let o = common::moellava().args(&a).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(merged.join("answers.jsonl")).unwrap(), answers);
    assert_eq!(std::fs::read_to_string(merged.join("metrics.json")).unwrap(), metrics);

    // compare: the run against itself and against the merged copy; JSON shape and the chart.
    let png = dir.path().join("chart.png");
    let o = common::moellava()
        .args(["compare", full.to_str().unwrap(), merged.to_str().unwrap(), "--json", "--png", png.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    let second = &j["runs"][1];
    assert_eq!(second["agreement"], 1.0);
    assert_eq!(second["delta_mean_f1"], 0.0);
    assert_eq!(second["mcnemar"]["p_value"], 1.0);
    assert!(std::fs::metadata(&png).unwrap().len() > 5000, "chart too small to hold anything");
    let o = common::moellava().args(["compare", full.to_str().unwrap(), merged.to_str().unwrap()]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("verdict: merged vs full: no statistically significant difference"));
}

#[test]
fn missing_images_are_recorded_not_fatal() {
    let Some(b) = bench() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::remove_file(b.pope.join("images/shapes_test_000000000003.png")).unwrap();
    let out = dir.path().join("run");
    let o = common::moellava().args(b.args(&out)).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("18 question(s) had no usable image"));
    let run: Value = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["questions"]["errors"], 18);
    let with_error =
        std::fs::read_to_string(out.join("answers.jsonl")).unwrap().lines().filter(|l| l.contains("\"error\"")).count();
    assert_eq!(with_error, 18);
}
