//! `moellava pope` (run the benchmark), `pope score` (official scoring) and `pope merge` (join shards).

use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use moellava_runtime::eval::pope::{self, AnswerLine, Question};
use moellava_runtime::sysinfo::peak_rss_bytes;
use serde_json::{json, Value};
use sha2::Digest;

use super::options::{ExpertArgs, GenArgs, ModelArgs};

/// Run POPE (object hallucination) the way MoE-LLaVA's eval does, score it, or merge shards.
///
/// Running: every question of the question file (LLaVA's llava_pope_test.jsonl format: question_id,
/// image, text, category) is asked about its image with the model's template and greedy decoding;
/// answers are flushed line by line to RUN/answers.jsonl in the official result format; RUN/run.json
/// records the model (SHA-256, quant plan), gating, seed, timings and memory; with --annotation-dir,
/// RUN/metrics.json holds the official scores. A killed run continues with --resume, losing and
/// repeating nothing; --shard i/n runs every n-th question so n machines share a benchmark, and
/// `pope merge` joins their runs. A missing image is recorded in the answer's metadata, not fatal.
///
/// Examples:
///   moellava pope -m q4.gguf --question-file eval/pope/llava_pope_test.jsonl \
///       --image-folder eval/pope/val2014 --annotation-dir eval/pope/coco --out runs/q4
///   moellava pope score --annotation-dir eval/pope/coco --question-file eval/pope/llava_pope_test.jsonl \
///       --result-file runs/q4/answers.jsonl --json
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, verbatim_doc_comment)]
pub struct PopeArgs {
    #[command(subcommand)]
    pub sub: Option<PopeSub>,
    #[command(flatten)]
    pub run: PopeRunArgs,
}

#[derive(Subcommand)]
pub enum PopeSub {
    /// Score a result file with the official eval_pope.py semantics.
    Score(ScoreArgs),
    /// Join the runs of `--shard i/n` into one run.
    Merge(MergeArgs),
}

/// Running options. They are optional to clap so that `pope score` / `pope merge` parse; `run`
/// checks that the required ones are there.
#[derive(Args)]
pub struct PopeRunArgs {
    /// The GGUF model (required to run).
    #[arg(short = 'm', long = "model", value_name = "M.gguf")]
    pub model: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Element type of the KV cache, f16 or f32 (default: f32 for f32 attention weights, else f16).
    #[arg(long, value_name = "TYPE")]
    pub kv_cache: Option<String>,
    /// Questions (JSON lines: question_id, image, text, category; required to run).
    #[arg(long, value_name = "Q.jsonl")]
    pub question_file: Option<PathBuf>,
    /// Folder of the images the questions name (required to run).
    #[arg(long, value_name = "DIR")]
    pub image_folder: Option<PathBuf>,
    /// Folder of coco_pope_<category>.json label files: enables running accuracy and metrics.json.
    #[arg(long, value_name = "DIR")]
    pub annotation_dir: Option<PathBuf>,
    /// Run folder: answers.jsonl, run.json, metrics.json (required to run).
    #[arg(long, value_name = "RUN")]
    pub out: Option<PathBuf>,
    /// Continue an interrupted run in the same folder.
    #[arg(long)]
    pub resume: bool,
    /// Run only questions k with k mod n = i (0-based), e.g. 0/4.
    #[arg(long, value_name = "i/n")]
    pub shard: Option<String>,
    /// At most N questions (of this shard).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Append "Answer the question using a single word or phrase." to questions that lack it.
    #[arg(long)]
    pub single_pred_prompt: bool,
    #[command(flatten)]
    pub experts: ExpertArgs,
    #[command(flatten)]
    pub gen: GenArgs,
}

#[derive(Args)]
pub struct ScoreArgs {
    #[arg(long, value_name = "DIR")]
    pub annotation_dir: PathBuf,
    #[arg(long, value_name = "Q.jsonl")]
    pub question_file: PathBuf,
    #[arg(long, value_name = "A.jsonl")]
    pub result_file: PathBuf,
    /// One JSON object: {"categories": {NAME: {tp, fp, tn, fn, accuracy, precision, recall, f1,
    /// yes_ratio}}, "mean_f1"} (fractions in [0, 1]; null where undefined).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct MergeArgs {
    /// The shard runs.
    #[arg(required = true, value_name = "RUN")]
    pub runs: Vec<PathBuf>,
    #[arg(long, value_name = "RUN")]
    pub out: PathBuf,
}

pub fn run(a: PopeArgs) -> Result<()> {
    match a.sub {
        Some(PopeSub::Score(s)) => score(s),
        Some(PopeSub::Merge(m)) => merge(m),
        None => run_benchmark(a.run),
    }
}

fn score(s: ScoreArgs) -> Result<()> {
    let questions = pope::read_questions(&s.question_file)?;
    let answers = pope::read_answers(&s.result_file)?;
    let sc = pope::score(&questions, &answers, &s.annotation_dir)?;
    for w in &sc.warnings {
        eprintln!("warning: {w}");
    }
    if s.json {
        println!("{}", serde_json::to_string_pretty(&sc)?);
    } else {
        print!("{}", pope::official_report(&sc));
        if let Some(f) = sc.mean_f1 {
            println!("mean F1 over {} categories: {:.2}", sc.categories.len(), 100.0 * f);
        }
    }
    Ok(())
}

fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let parsed = s.split_once('/').and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
    match parsed {
        Some((i, n)) if n > 0 && i < n => Ok((i, n)),
        _ => bail!("--shard '{s}': expected i/n with 0 ≤ i < n, e.g. 0/4"),
    }
}

/// Answers already in `path`, with a partial last line (a kill mid-write) cut off.
fn resume_answers(path: &Path) -> Result<Vec<AnswerLine>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut good = 0;
    let mut out = Vec::new();
    for line in text.split_inclusive('\n') {
        if !line.ends_with('\n') {
            break;
        }
        match serde_json::from_str::<AnswerLine>(line) {
            Ok(a) => out.push(a),
            Err(_) => break,
        }
        good += line.len();
    }
    if good < text.len() {
        let f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.set_len(good as u64)?;
    }
    Ok(out)
}

fn file_sha256(path: &Path) -> Result<String> {
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Per question id, its label (categories' questions matched positionally to their files' labels).
fn labels_by_question(questions: &[Question], dir: &Path) -> Result<HashMap<String, bool>> {
    let mut out = HashMap::new();
    for (cat, file) in pope::annotation_files(dir)? {
        let labels = pope::read_labels(&file)?;
        for (q, l) in questions.iter().filter(|q| q.category == cat).zip(labels) {
            out.insert(pope::id_key(&q.question_id), l);
        }
    }
    Ok(out)
}

/// The required running options, checked.
struct RunPaths {
    model: ModelArgs,
    question_file: PathBuf,
    image_folder: PathBuf,
    out: PathBuf,
}

fn required(r: &PopeRunArgs) -> Result<RunPaths> {
    let missing: Vec<&str> = [
        ("-m", r.model.is_none()),
        ("--question-file", r.question_file.is_none()),
        ("--image-folder", r.image_folder.is_none()),
        ("--out", r.out.is_none()),
    ]
    .iter()
    .filter(|(_, m)| *m)
    .map(|(n, _)| *n)
    .collect();
    if !missing.is_empty() {
        bail!("pope needs {} (or the score / merge subcommand); see `moellava pope --help`", missing.join(", "));
    }
    Ok(RunPaths {
        model: ModelArgs {
            model: r.model.clone().unwrap_or_default(),
            threads: r.threads,
            kv_cache: r.kv_cache.clone(),
            device: "cpu".into(),
            gpu_mem: None,
            miss_policy: "auto".into(),
            no_repack: false,
            experts: r.experts.clone(),
        },
        question_file: r.question_file.clone().unwrap_or_default(),
        image_folder: r.image_folder.clone().unwrap_or_default(),
        out: r.out.clone().unwrap_or_default(),
    })
}

fn run_benchmark(r: PopeRunArgs) -> Result<()> {
    let paths = required(&r)?;
    let opts = r.gen.options()?;
    let all = pope::read_questions(&paths.question_file)?;
    let (shard_i, shard_n) = r.shard.as_deref().map(parse_shard).transpose()?.unwrap_or((0, 1));
    let mut todo: Vec<&Question> = all.iter().enumerate().filter(|(k, _)| k % shard_n == shard_i).map(|(_, q)| q).collect();
    if let Some(n) = r.limit {
        todo.truncate(n);
    }
    let labels = r.annotation_dir.as_deref().map(|d| labels_by_question(&all, d)).transpose()?;
    std::fs::create_dir_all(&paths.out).with_context(|| format!("creating {}", paths.out.display()))?;
    let answers_path = paths.out.join("answers.jsonl");
    let mut done: Vec<AnswerLine> = Vec::new();
    if answers_path.exists() && std::fs::metadata(&answers_path)?.len() > 0 {
        if !r.resume {
            bail!(
                "{} already holds answers; pass --resume to continue that run, or choose another --out",
                answers_path.display()
            );
        }
        done = resume_answers(&answers_path)?;
    }
    let answered: HashSet<String> = done.iter().map(|a| pope::id_key(&a.question_id)).collect();
    let (model, load_s) = paths.model.load()?;
    let model_id = paths.model.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&answers_path)
        .with_context(|| format!("opening {}", answers_path.display()))?;
    let remaining: Vec<&Question> = todo.iter().copied().filter(|q| !answered.contains(&pope::id_key(&q.question_id))).collect();
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(todo.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} eta {eta} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_position((todo.len() - remaining.len()) as u64);
        b
    });
    let (mut correct, mut scored) = (0usize, 0usize);
    for a in &done {
        if let Some(l) = labels.as_ref().and_then(|m| m.get(&pope::id_key(&a.question_id))) {
            scored += 1;
            correct += usize::from(pope::parse_answer(&a.text) == *l);
        }
    }
    let (mut errors, mut timings, mut newly) = (0usize, [0f64; 3], 0usize);
    let (mut prompt_tokens, mut gen_tokens) = (0usize, 0usize);
    let mut image_cache: Option<(String, moellava_runtime::image::Rgb8)> = None;
    let t0 = Instant::now();
    for q in remaining {
        let mut text = q.text.clone();
        if r.single_pred_prompt && !text.contains(pope::SINGLE_PRED_PROMPT) {
            text = format!("{text}\n{}", pope::SINGLE_PRED_PROMPT);
        }
        let image = match &image_cache {
            Some((name, img)) if *name == q.image => Ok(img.clone()),
            _ => moellava_runtime::image::load(&paths.image_folder.join(&q.image)),
        };
        let (answer_text, metadata) = match image {
            Err(e) => {
                errors += 1;
                (String::new(), json!({ "error": e.to_string() }))
            }
            Ok(img) => {
                image_cache = Some((q.image.clone(), img.clone()));
                let ans = model.answer(Some(&img), &text, false, &opts, &mut |_| {})?;
                timings[0] += ans.timings.image_encode_s;
                timings[1] += ans.timings.prefill_s;
                timings[2] += ans.timings.decode_s;
                prompt_tokens += ans.prompt_tokens;
                gen_tokens += ans.tokens.len();
                (ans.text, json!({}))
            }
        };
        let answer_id = hex::encode(&sha2::Sha256::digest(format!("{}/{}", model_id, q.question_id))[..11]);
        let line = json!({"question_id": q.question_id, "prompt": q.text, "text": answer_text, "answer_id": answer_id, "model_id": model_id, "metadata": metadata});
        writeln!(out, "{line}")?;
        out.flush()?;
        newly += 1;
        if let Some(l) = labels.as_ref().and_then(|m| m.get(&pope::id_key(&q.question_id))) {
            scored += 1;
            correct += usize::from(pope::parse_answer(&answer_text) == *l);
        }
        if let Some(b) = &bar {
            b.inc(1);
            if scored > 0 {
                b.set_message(format!("accuracy {:.1}%", 100.0 * correct as f64 / scored as f64));
            }
        }
    }
    out.sync_all()?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let wall = t0.elapsed().as_secs_f64();
    let f = model.file.meta.get_str(moellava_runtime::gguf::keys::moellava::QUANT_PLAN).unwrap_or("").to_string();
    let run_json = json!({
        "model": {
            "path": paths.model.model,
            "sha256": file_sha256(&paths.model.model)?,
            "bytes": std::fs::metadata(&paths.model.model)?.len(),
            "architecture": model.config.llm.family.arch(),
            "quant_plan": f,
        },
        "question_file": paths.question_file,
        "image_folder": paths.image_folder,
        "annotation_dir": r.annotation_dir,
        "shard": [shard_i, shard_n],
        "gating": r.gen.gating,
        "kv_cache": model.kv_type,
        "seed": r.gen.seed,
        "temperature": r.gen.temperature,
        "program": format!("moellava {}", env!("CARGO_PKG_VERSION")),
        "threads": rayon::current_num_threads(),
        "questions": {"in_shard": todo.len(), "answered": done.len() + newly, "errors": errors},
        "timings": {
            "load_s": load_s, "wall_s": wall, "image_encode_s": timings[0], "prefill_s": timings[1], "decode_s": timings[2],
            "prefill_tokens_per_s": prompt_tokens as f64 / timings[1].max(1e-9),
            "decode_tokens_per_s": gen_tokens as f64 / timings[2].max(1e-9),
        },
        "memory": {"peak_rss_bytes": peak_rss_bytes()},
        "expert_cache": model.expert_cache_report(),
    });
    std::fs::write(paths.out.join("run.json"), serde_json::to_string_pretty(&run_json)? + "\n")?;
    paths.model.experts.print_report(&model);
    if errors > 0 {
        eprintln!("warning: {errors} question(s) had no usable image; see \"metadata\".\"error\" in {}", answers_path.display());
    }
    if let (Some(dir), 1) = (&r.annotation_dir, shard_n) {
        let answers = pope::read_answers(&answers_path)?;
        let sc = pope::score(&all, &answers, dir)?;
        std::fs::write(paths.out.join("metrics.json"), serde_json::to_string_pretty(&sc)? + "\n")?;
        eprint!("{}", pope::official_report(&sc));
        if let Some(f1) = sc.mean_f1 {
            eprintln!("mean F1 {:.2} · {} answers in {:.1} s", 100.0 * f1, answers.len(), wall);
        }
    }
    Ok(())
}

fn merge(m: MergeArgs) -> Result<()> {
    let first: Value = serde_json::from_str(
        &std::fs::read_to_string(m.runs[0].join("run.json"))
            .with_context(|| format!("reading {}/run.json", m.runs[0].display()))?,
    )?;
    let qfile = PathBuf::from(first["question_file"].as_str().context("run.json lacks question_file")?);
    let questions = pope::read_questions(&qfile)?;
    let order: HashMap<String, usize> = questions.iter().enumerate().map(|(i, q)| (pope::id_key(&q.question_id), i)).collect();
    let mut answers: Vec<AnswerLine> = Vec::new();
    let mut seen = HashSet::new();
    for run in &m.runs {
        for a in pope::read_answers(&run.join("answers.jsonl"))? {
            let k = pope::id_key(&a.question_id);
            if !order.contains_key(&k) {
                bail!("{}: question_id {k} is not in {}", run.display(), qfile.display());
            }
            if !seen.insert(k.clone()) {
                bail!("question_id {k} is answered by two runs");
            }
            answers.push(a);
        }
    }
    answers.sort_by_key(|a| order[&pope::id_key(&a.question_id)]);
    std::fs::create_dir_all(&m.out)?;
    let mut text = String::new();
    for a in &answers {
        text.push_str(&serde_json::to_string(a)?);
        text.push('\n');
    }
    std::fs::write(m.out.join("answers.jsonl"), text)?;
    let mut merged = first.clone();
    merged["shard"] = json!([0, 1]);
    merged["merged_from"] = json!(m.runs);
    merged["questions"] = json!({"in_shard": answers.len(), "answered": answers.len(), "errors": answers.iter().filter(|a| a.metadata.get("error").is_some()).count()});
    std::fs::write(m.out.join("run.json"), serde_json::to_string_pretty(&merged)? + "\n")?;
    if let Some(dir) = first["annotation_dir"].as_str() {
        let sc = pope::score(&questions, &answers, Path::new(dir))?;
        std::fs::write(m.out.join("metrics.json"), serde_json::to_string_pretty(&sc)? + "\n")?;
    }
    eprintln!("merged {} answers from {} runs into {}", answers.len(), m.runs.len(), m.out.display());
    Ok(())
}
