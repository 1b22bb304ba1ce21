//! `moellava compare RUN_A RUN_B …`: POPE runs side by side, with paired statistics against the first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use moellava_runtime::eval::compare::{bootstrap_delta_f1, mcnemar_exact};
use moellava_runtime::eval::pope::{self, CategoryScore, Counts, Score};
use serde_json::{json, Value};

/// Compare POPE runs (folders written by `moellava pope`): per category and overall accuracy,
/// precision, recall, F1 and yes-ratio; against the first run, ΔF1 of the headline mean F1 with a
/// stratified bootstrap 95% interval, answer agreement, and McNemar's exact test on per-question
/// correctness; file size, peak memory and speed from run.json. The verdict says whether each
/// difference is statistically real (p < 0.05).
///
/// Example: moellava compare runs/f16 runs/q8 runs/q4 --png runs/compare.png
#[derive(Args)]
pub struct CompareArgs {
    /// Run folders; the first is the baseline.
    #[arg(required = true, num_args = 2.., value_name = "RUN")]
    pub runs: Vec<PathBuf>,
    /// Write a bar chart of accuracy and F1 per category to this PNG file.
    #[arg(long, value_name = "chart.png")]
    pub png: Option<PathBuf>,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Bootstrap resamples for the ΔF1 interval.
    #[arg(long, default_value_t = 2000, value_name = "N")]
    pub bootstrap: usize,
}

pub struct Run {
    pub name: String,
    pub score: Score,
    pub info: Value,
    /// Per question id, (predicted yes, label yes).
    pub by_id: BTreeMap<String, (bool, bool)>,
}

fn load_run(dir: &Path) -> Result<Run> {
    let info: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("run.json")).with_context(|| format!("reading {}/run.json", dir.display()))?,
    )?;
    let qfile = info["question_file"].as_str().with_context(|| format!("{}/run.json lacks question_file", dir.display()))?;
    let adir = info["annotation_dir"]
        .as_str()
        .with_context(|| format!("{}/run.json has no annotation_dir: run pope with --annotation-dir", dir.display()))?;
    let questions = pope::read_questions(Path::new(qfile))?;
    let answers = pope::read_answers(&dir.join("answers.jsonl"))?;
    let score = pope::score(&questions, &answers, Path::new(adir))?;
    let mut by_id = BTreeMap::new();
    for (cat, ids) in &score.ids {
        for (id, pair) in ids.iter().zip(&score.pairs[cat]) {
            by_id.insert(id.clone(), *pair);
        }
    }
    Ok(Run { name: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), score, info, by_id })
}

/// Pooled metrics over every category.
fn overall(s: &Score) -> CategoryScore {
    let mut c = Counts::default();
    for cat in s.categories.values() {
        c.tp += cat.counts.tp;
        c.fp += cat.counts.fp;
        c.tn += cat.counts.tn;
        c.fn_ += cat.counts.fn_;
    }
    CategoryScore::from_counts(c)
}

fn pct(v: Option<f64>) -> String {
    v.map_or("  n/a".into(), |x| format!("{:5.1}", 100.0 * x))
}

pub fn run(a: CompareArgs) -> Result<()> {
    let runs: Vec<Run> = a.runs.iter().map(|d| load_run(d)).collect::<Result<_>>()?;
    let base = &runs[0];
    let mut rows = Vec::new();
    for r in &runs {
        let common: Vec<&String> = base.by_id.keys().filter(|k| r.by_id.contains_key(*k)).collect();
        if common.is_empty() {
            bail!("{} and {} share no questions", base.name, r.name);
        }
        let agree = common.iter().filter(|k| base.by_id[**k].0 == r.by_id[**k].0).count();
        let (mut b, mut c) = (0, 0); // base right & run wrong, base wrong & run right
        for k in &common {
            let (pb, l) = base.by_id[*k];
            let (pr, _) = r.by_id[*k];
            match (pb == l, pr == l) {
                (true, false) => b += 1,
                (false, true) => c += 1,
                _ => {}
            }
        }
        let p = mcnemar_exact(b, c);
        let ci = bootstrap_delta_f1(&base.score.pairs, &r.score.pairs, a.bootstrap, 20261123);
        let d_f1 = match (r.score.mean_f1, base.score.mean_f1) {
            (Some(x), Some(y)) => Some(x - y),
            _ => None,
        };
        let t = &r.info["timings"];
        rows.push(json!({
            "run": r.name,
            "categories": r.score.categories,
            "overall": overall(&r.score),
            "mean_f1": r.score.mean_f1,
            "delta_mean_f1": d_f1,
            "delta_mean_f1_ci95": ci.map(|(lo, hi)| vec![lo, hi]),
            "agreement": agree as f64 / common.len() as f64,
            "mcnemar": {"base_right_run_wrong": b, "base_wrong_run_right": c, "p_value": p},
            "model_bytes": r.info["model"]["bytes"],
            "quant_plan": r.info["model"]["quant_plan"],
            "peak_rss_bytes": r.info["memory"]["peak_rss_bytes"],
            "prefill_tokens_per_s": t["prefill_tokens_per_s"],
            "decode_tokens_per_s": t["decode_tokens_per_s"],
            "questions": common.len(),
        }));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json!({ "baseline": base.name, "runs": rows }))?);
    } else {
        print_table(&runs, &rows);
    }
    if let Some(png) = &a.png {
        super::chart::render(png, &runs).with_context(|| format!("writing {}", png.display()))?;
        eprintln!("chart: {}", png.display());
    }
    Ok(())
}

fn print_table(runs: &[Run], rows: &[Value]) {
    let cats: Vec<String> = runs[0].score.categories.keys().cloned().collect();
    println!("{:<14} {:<12} {:>6} {:>6} {:>6} {:>6} {:>6}", "run", "category", "acc", "prec", "recall", "F1", "yes%");
    for r in runs {
        for cat in cats.iter().map(String::as_str).chain(["overall"]) {
            let s = if cat == "overall" { overall(&r.score) } else { r.score.categories[cat].clone() };
            println!(
                "{:<14} {:<12} {} {} {} {} {}",
                r.name,
                cat,
                pct(s.accuracy),
                pct(s.precision),
                pct(s.recall),
                pct(s.f1),
                pct(s.yes_ratio)
            );
        }
    }
    println!();
    println!(
        "{:<14} {:>8} {:>8} {:>18} {:>9} {:>9} {:>10} {:>10} {:>10}",
        "run", "POPE F1", "ΔF1", "ΔF1 95% CI", "agree", "McNemar p", "size MB", "peak MB", "prefill t/s"
    );
    for (r, row) in runs.iter().zip(rows) {
        let f = |v: &Value| v.as_f64();
        let ci = row["delta_mean_f1_ci95"]
            .as_array()
            .map(|a| format!("[{:+.2}, {:+.2}]", 100.0 * a[0].as_f64().unwrap_or(0.0), 100.0 * a[1].as_f64().unwrap_or(0.0)))
            .unwrap_or_else(|| "n/a".into());
        println!(
            "{:<14} {:>8} {:>8} {:>18} {:>8.1}% {:>9.3} {:>10.1} {:>10.1} {:>10.0}",
            r.name,
            pct(r.score.mean_f1),
            f(&row["delta_mean_f1"]).map_or("n/a".into(), |d| format!("{:+.2}", 100.0 * d)),
            ci,
            100.0 * f(&row["agreement"]).unwrap_or(0.0),
            f(&row["mcnemar"]["p_value"]).unwrap_or(1.0),
            f(&row["model_bytes"]).unwrap_or(0.0) / 1e6,
            f(&row["peak_rss_bytes"]).unwrap_or(0.0) / 1e6,
            f(&row["prefill_tokens_per_s"]).unwrap_or(0.0),
        );
    }
    println!();
    for (r, row) in runs.iter().zip(rows).skip(1) {
        let p = row["mcnemar"]["p_value"].as_f64().unwrap_or(1.0);
        let d = 100.0 * row["delta_mean_f1"].as_f64().unwrap_or(0.0);
        if p < 0.05 {
            println!(
                "verdict: {} vs {}: the difference is statistically real (McNemar p = {p:.3} < 0.05; ΔF1 {d:+.2} points)",
                r.name, runs[0].name
            );
        } else {
            println!(
                "verdict: {} vs {}: no statistically significant difference (McNemar p = {p:.3}; ΔF1 {d:+.2} points)",
                r.name, runs[0].name
            );
        }
    }
}
