//! POPE exactly as MoE-LLaVA scores it (`moellava/eval/eval_pope.py`, spec §6).
//!
//! Files: a question file (JSON lines `{question_id, image, text, category}`, LLaVA's
//! `llava_pope_test.jsonl`), annotation files `coco_pope_<category>.json` (JSON lines with `label`),
//! and a result file (JSON lines `{question_id, prompt, text, answer_id, model_id, metadata}`).
//! Scoring, as the official script does it:
//! - an answer's first sentence (text before the first '.'), commas removed, split on single spaces;
//!   "no" if one of the words is exactly `No`, `not` or `no`, else "yes";
//! - for each annotation file, the answers whose question has that category, in result-file order, are
//!   zipped **positionally** with the file's labels (question ids are not matched);
//! - positive = "yes"; precision TP/(TP+FP), recall TP/(TP+FN), F1, accuracy, yes-ratio.
//!
//! Where the official script would divide by zero (and crash), the value is `null` with a warning.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, RuntimeError};

pub const SINGLE_PRED_PROMPT: &str = "Answer the question using a single word or phrase.";

fn err(path: &Path, what: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Prompt(format!("{}: {what}", path.display()))
}

/// A question id as written in the file (number or string); compared by its JSON text.
pub fn id_key(v: &Value) -> String {
    v.to_string()
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Question {
    pub question_id: Value,
    pub image: String,
    pub text: String,
    #[serde(default)]
    pub category: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct AnswerLine {
    pub question_id: Value,
    #[serde(default)]
    pub prompt: String,
    pub text: String,
    #[serde(default)]
    pub answer_id: String,
    #[serde(default)]
    pub model_id: String,
    #[serde(default)]
    pub metadata: Value,
}

fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| err(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| err(path, format!("line {}: {e}", i + 1))))
        .collect()
}

pub fn read_questions(path: &Path) -> Result<Vec<Question>> {
    read_jsonl(path)
}

pub fn read_answers(path: &Path) -> Result<Vec<AnswerLine>> {
    read_jsonl(path)
}

/// `coco_pope_<category>.json` files of a directory, by name: (category, path).
pub fn annotation_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut files: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| err(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_string();
            let cat = name.strip_prefix("coco_pope_")?.strip_suffix(".json")?.to_string();
            Some((cat, p))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(err(dir, "holds no coco_pope_<category>.json annotation files"));
    }
    Ok(files)
}

/// The labels of one annotation file ("no" → false, anything else → true), in file order.
pub fn read_labels(path: &Path) -> Result<Vec<bool>> {
    let lines: Vec<Value> = read_jsonl(path)?;
    lines
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.get("label")
                .and_then(Value::as_str)
                .map(|l| l != "no")
                .ok_or_else(|| err(path, format!("line {}: no \"label\"", i + 1)))
        })
        .collect()
}

/// eval_pope.py's answer parsing: `true` for yes.
pub fn parse_answer(text: &str) -> bool {
    let first = match text.find('.') {
        Some(i) => &text[..i],
        None => text,
    };
    let cleaned = first.replace(',', "");
    !cleaned.split(' ').any(|w| w == "No" || w == "not" || w == "no")
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    #[serde(rename = "fn")]
    pub fn_: usize,
}

impl Counts {
    pub fn add(&mut self, pred_yes: bool, label_yes: bool) {
        match (pred_yes, label_yes) {
            (true, true) => self.tp += 1,
            (true, false) => self.fp += 1,
            (false, false) => self.tn += 1,
            (false, true) => self.fn_ += 1,
        }
    }

    pub fn n(&self) -> usize {
        self.tp + self.fp + self.tn + self.fn_
    }
}

fn ratio(a: usize, b: usize) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

/// Metrics of one category (fractions in [0, 1]; `None` where a denominator is zero).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CategoryScore {
    #[serde(flatten)]
    pub counts: Counts,
    pub accuracy: Option<f64>,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub f1: Option<f64>,
    pub yes_ratio: Option<f64>,
}

impl CategoryScore {
    pub fn from_counts(c: Counts) -> CategoryScore {
        let precision = ratio(c.tp, c.tp + c.fp);
        let recall = ratio(c.tp, c.tp + c.fn_);
        let f1 = match (precision, recall) {
            (Some(p), Some(r)) if p + r > 0.0 => Some(2.0 * p * r / (p + r)),
            _ => None,
        };
        CategoryScore {
            counts: c,
            accuracy: ratio(c.tp + c.tn, c.n()),
            precision,
            recall,
            f1,
            yes_ratio: ratio(c.tp + c.fp, c.n()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Score {
    pub categories: BTreeMap<String, CategoryScore>,
    /// Mean F1 over the categories (the headline "POPE" figure), `None` if any F1 is undefined.
    pub mean_f1: Option<f64>,
    #[serde(skip)]
    pub warnings: Vec<String>,
    /// Per category, the (prediction, label) pairs in scoring order: what `compare` tests on.
    #[serde(skip)]
    pub pairs: BTreeMap<String, Vec<(bool, bool)>>,
    /// Per category, the question ids in scoring order.
    #[serde(skip)]
    pub ids: BTreeMap<String, Vec<String>>,
}

/// Scores answers against the annotation files, with the official script's grouping and zipping.
pub fn score(questions: &[Question], answers: &[AnswerLine], annotation_dir: &Path) -> Result<Score> {
    let by_id: HashMap<String, &Question> = questions.iter().map(|q| (id_key(&q.question_id), q)).collect();
    let mut categories = BTreeMap::new();
    let mut pairs = BTreeMap::new();
    let mut ids = BTreeMap::new();
    let mut warnings = Vec::new();
    for a in answers {
        if !by_id.contains_key(&id_key(&a.question_id)) {
            return Err(RuntimeError::Prompt(format!("answer for question_id {} is not in the question file", a.question_id)));
        }
    }
    for (cat, file) in annotation_files(annotation_dir)? {
        let labels = read_labels(&file)?;
        let cur: Vec<&AnswerLine> = answers.iter().filter(|a| by_id[&id_key(&a.question_id)].category == cat).collect();
        if cur.len() != labels.len() {
            warnings.push(format!(
                "category {cat}: {} answers for {} labels; only the first {} are paired",
                cur.len(),
                labels.len(),
                cur.len().min(labels.len())
            ));
        }
        let mut c = Counts::default();
        let mut p = Vec::new();
        for (a, l) in cur.iter().zip(&labels) {
            let pred = parse_answer(&a.text);
            c.add(pred, *l);
            p.push((pred, *l));
        }
        let s = CategoryScore::from_counts(c);
        for (name, v) in [("precision", s.precision), ("recall", s.recall), ("f1", s.f1)] {
            if v.is_none() {
                warnings
                    .push(format!("category {cat}: {name} is undefined (division by zero); the official script would stop here"));
            }
        }
        ids.insert(cat.clone(), cur.iter().map(|a| id_key(&a.question_id)).collect());
        pairs.insert(cat.clone(), p);
        categories.insert(cat, s);
    }
    let f1s: Option<Vec<f64>> = categories.values().map(|s| s.f1).collect();
    let mean_f1 = f1s.filter(|v| !v.is_empty()).map(|v| v.iter().sum::<f64>() / v.len() as f64);
    Ok(Score { categories, mean_f1, warnings, pairs, ids })
}

/// A float as Python's `print` shows it (`0.5`, `1.0`).
fn py(v: f64) -> String {
    let s = format!("{v}");
    if s.contains('.') || s.contains('e') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}

/// The official printout, category by category.
pub fn official_report(s: &Score) -> String {
    let mut out = String::new();
    for (cat, c) in &s.categories {
        let k = c.counts;
        out.push_str(&format!("Category: {cat}, # samples: {}\n", k.n()));
        out.push_str("TP\tFP\tTN\tFN\t\n");
        out.push_str(&format!("{}\t{}\t{}\t{}\n", k.tp, k.fp, k.tn, k.fn_));
        let f = |v: Option<f64>| v.map_or("null".to_string(), py);
        out.push_str(&format!(
            "Accuracy: {}\nPrecision: {}\nRecall: {}\nF1 score: {}\nYes ratio: {}\n",
            f(c.accuracy),
            f(c.precision),
            f(c.recall),
            f(c.f1),
            f(c.yes_ratio)
        ));
        let g = |v: Option<f64>| v.map_or("null".to_string(), |x| format!("{x:.3}"));
        out.push_str(&format!("{}, {}, {}, {}, {}\n", g(c.f1), g(c.accuracy), g(c.precision), g(c.recall), g(c.yes_ratio)));
        out.push_str("====================================\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tricky_answers_parse_like_the_official_script() {
        let cases = [
            ("NO", true),
            ("Not at all", true),
            ("1. No", true),
            ("no!", true),
            (" No", false),
            ("No, there is not.", false),
            ("There is no dog", false),
            ("Yes, no doubt", false),
            ("No\tthere is none", true),
            ("No", false),
            ("Yes", true),
            ("", true),
            ("It is not there.", false),
            ("Yes. No.", true),
        ];
        for (text, yes) in cases {
            assert_eq!(parse_answer(text), yes, "{text:?}");
        }
    }

    #[test]
    fn metrics_and_undefined_values() {
        let mut c = Counts::default();
        for (p, l) in [(true, true), (true, false), (false, false), (false, true), (true, true)] {
            c.add(p, l);
        }
        let s = CategoryScore::from_counts(c);
        assert_eq!(s.precision, Some(2.0 / 3.0));
        assert_eq!(s.recall, Some(2.0 / 3.0));
        assert_eq!(s.accuracy, Some(0.6));
        assert_eq!(s.yes_ratio, Some(0.6));
        let none = CategoryScore::from_counts(Counts { tp: 0, fp: 0, tn: 3, fn_: 0 });
        assert_eq!((none.precision, none.recall, none.f1), (None, None, None));
        assert_eq!(py(1.0), "1.0");
        assert_eq!(py(0.5), "0.5");
    }
}
