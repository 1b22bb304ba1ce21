//! `moellava bench`: prefill and decode speed, image encoding, TTFT, memory — side by side with
//! llama.cpp on the same machine, in the same process, repetitions interleaved.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use moellava_kernels::llama::{LlamaContext, LlamaModel};
use moellava_runtime::model::llm::Trace;
use moellava_runtime::model::moe::Gating;
use moellava_runtime::sysinfo::peak_rss_bytes;
use moellava_runtime::tensor_class::TensorClass;
use moellava_runtime::Model;
use serde_json::json;

use super::options::{Device, ModelArgs};
use moellava_runtime::backend::cuda::CudaBackend;
use moellava_runtime::backend::Backend;

/// Measure speed and memory: prefill tokens/s at each prompt length, decode tokens/s over -n tokens
/// after a 16-token prompt, image encoding time, time to first token with one image, peak RSS, the
/// bytes read per decoded token (routed experts only, for MoE) and the machine's memory bandwidth,
/// so decode can be stated as a fraction of its roofline.
///
/// With --peer llama.cpp, llama.cpp runs in the same process (llama-cpp-sys-2, same threads) on the
/// language model of --peer-model (default: M.peer.gguf beside the model if it exists, else the model
/// itself; `gen_random_model --peer` writes a dense file with the same bytes read per token for MoE
/// models). Ours and the peer's repetitions alternate, and every metric gets a ratio ours/peer.
///
/// Example: moellava bench -m phi2-4e-q4.gguf -p 128,512 -n 32 -r 3 --peer llama.cpp --json
#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt lengths of the prefill measurement.
    #[arg(short = 'p', long = "prompt-lengths", default_value = "128,512", value_delimiter = ',', value_name = "P")]
    pub prompts: Vec<usize>,
    /// Also measure the aggregate decode tok/s of this many sequences decoded together in one step
    /// (what `moellava serve` does for concurrent requests), e.g. --batch 1,4,8.
    #[arg(long, value_delimiter = ',', value_name = "B")]
    pub batch: Vec<usize>,
    /// Tokens decoded in the decode measurement.
    #[arg(short = 'n', long = "decode-tokens", default_value_t = 32, value_name = "N")]
    pub decode: usize,
    /// Repetitions (mean ± std).
    #[arg(short = 'r', long = "repetitions", default_value_t = 3, value_name = "R")]
    pub reps: usize,
    /// Image for the encode and TTFT measurements (default: a generated 640×480 picture).
    #[arg(long, value_name = "IMG")]
    pub image: Option<PathBuf>,
    /// Run a peer in the same process: `llama.cpp`.
    #[arg(long, value_name = "PEER")]
    pub peer: Option<String>,
    /// The GGUF the peer loads (language model only, llama.cpp layout).
    #[arg(long, value_name = "P.gguf")]
    pub peer_model: Option<PathBuf>,
    /// One JSON object: {model, quant, threads, kv_cache, peer, metrics: [{name, ours, ours_std, peer, peer_std, ratio}],
    /// expert_cache (counters with --expert-ram, else null)}.
    #[arg(long)]
    pub json: bool,
}

struct Series(Vec<f64>);

impl Series {
    fn mean(&self) -> f64 {
        self.0.iter().sum::<f64>() / self.0.len().max(1) as f64
    }

    fn std(&self) -> f64 {
        let m = self.mean();
        (self.0.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (self.0.len().max(2) - 1) as f64).sqrt()
    }
}

/// Deterministic ordinary token ids (no specials).
fn prompt_ids(n: usize, vocab: usize) -> Vec<u32> {
    let span = vocab.saturating_sub(512).max(1);
    (0..n).map(|i| (256 + (i * 7919 + 13) % span) as u32).collect()
}

fn ours_prefill<B: Backend>(m: &Model<B>, ids: &[u32]) -> Result<f64> {
    let be = &m.backend;
    let x = m.llm.embed(be, ids)?;
    let mut cache = m.new_kv_cache(ids.len());
    let t = Instant::now();
    m.forward(x, &mut cache, &mut Gating::Deterministic, &mut Trace::default())?;
    m.end_sequence()?;
    Ok(ids.len() as f64 / t.elapsed().as_secs_f64())
}

/// Decode tok/s, and the experts each MoE layer used per token (for bytes per token).
fn ours_decode<B: Backend>(m: &Model<B>, n: usize) -> Result<(f64, Vec<Vec<[usize; 2]>>)> {
    let be = &m.backend;
    let mut cache = m.new_kv_cache(16 + n);
    let vocab = m.config.llm.n_vocab;
    let mut logits =
        m.forward(m.llm.embed(be, &prompt_ids(16, vocab))?, &mut cache, &mut Gating::Deterministic, &mut Trace::default())?;
    let mut routes = Vec::new();
    let t = Instant::now();
    for _ in 0..n {
        let next = moellava_runtime::sampler::argmax(&logits);
        let mut trace = Trace::default();
        logits = m.forward(m.llm.embed(be, &[next])?, &mut cache, &mut Gating::Deterministic, &mut trace)?;
        routes.push(trace.moe.iter().map(|(_, _, r)| r.experts[0]).collect());
    }
    m.end_sequence()?;
    Ok((n as f64 / t.elapsed().as_secs_f64(), routes))
}

/// Aggregate decode tok/s of `b` sequences decoded together (`Model::decode_rows`, what `serve` runs
/// per step): each prefilled with its own 16-token prompt, then `n` steps of `b` tokens.
fn ours_decode_batch<B: Backend>(m: &Model<B>, b: usize, n: usize) -> Result<f64> {
    let be = &m.backend;
    let vocab = m.config.llm.n_vocab;
    let mut caches = Vec::new();
    let mut next = Vec::new();
    for s in 0..b {
        let ids: Vec<u32> = prompt_ids(16 + s, vocab).into_iter().skip(s).collect();
        let mut cache = m.new_kv_cache(16 + n);
        let logits = m.forward(m.llm.embed(be, &ids)?, &mut cache, &mut Gating::Deterministic, &mut Trace::default())?;
        next.push(moellava_runtime::sampler::argmax(&logits));
        caches.push(cache);
    }
    let t = Instant::now();
    for _ in 0..n {
        let mut refs: Vec<_> = caches.iter_mut().collect();
        let all = m.decode_rows(&next, &mut refs)?;
        next = all.iter().map(|l| moellava_runtime::sampler::argmax(l)).collect();
    }
    m.end_sequence()?;
    Ok((b * n) as f64 / t.elapsed().as_secs_f64())
}

fn peer_prefill(p: &LlamaModel, ids: &[u32], threads: usize) -> Result<f64> {
    let mut ctx = LlamaContext::new(p, ids.len() + 8, ids.len(), threads)?;
    let t = Instant::now();
    ctx.decode(ids)?;
    Ok(ids.len() as f64 / t.elapsed().as_secs_f64())
}

fn peer_decode(p: &LlamaModel, n: usize, threads: usize) -> Result<f64> {
    let vocab = p.n_vocab();
    let mut ctx = LlamaContext::new(p, 16 + n + 8, 16, threads)?;
    ctx.decode(&prompt_ids(16, vocab))?;
    let t = Instant::now();
    for _ in 0..n {
        let next = moellava_runtime::sampler::argmax(&ctx.last_logits()?);
        ctx.decode(&[next])?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Bytes of weights a decoded token reads: every language-model tensor once (one embedding row),
/// plus, per MoE layer, the experts it routed to (mean over the measured tokens).
fn bytes_per_token<B: Backend>(m: &Model<B>, routes: &[Vec<[usize; 2]>]) -> f64 {
    let meta = &m.file.meta;
    let mut dense = 0u64;
    let mut expert_layer_bytes = Vec::new();
    for t in meta.tensors() {
        match TensorClass::of(&t.name) {
            TensorClass::Vision | TensorClass::Projector => {}
            TensorClass::Experts => expert_layer_bytes.push(t.n_bytes as f64 / *t.dims.last().unwrap_or(&1) as f64),
            _ if t.name == "token_embd.weight" => dense += t.n_bytes / t.n_rows().max(1) as u64,
            _ => dense += t.n_bytes,
        }
    }
    let n_moe = m.config.moe.as_ref().map_or(0, |c| c.layers.len()).max(1);
    let per_expert_all_layers: f64 = expert_layer_bytes.iter().sum::<f64>() / n_moe as f64; // one expert of one layer, all projections
    let experts_per_token = routes.iter().map(|r| r.len() * 2).sum::<usize>() as f64 / routes.len().max(1) as f64;
    dense as f64 + experts_per_token * per_expert_all_layers
}

fn test_image() -> moellava_runtime::image::Rgb8 {
    let (w, h) = (640, 480);
    let data = (0..w * h).flat_map(|i| {
        let (x, y) = (i % w, i / w);
        [(x * 255 / w) as u8, (y * 255 / h) as u8, ((x ^ y) & 0xff) as u8]
    });
    moellava_runtime::image::Rgb8 { width: w, height: h, data: data.collect() }
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.reps == 0 || a.prompts.is_empty() || a.prompts.contains(&0) || a.batch.contains(&0) {
        bail!("-r must be ≥ 1, -p a list of positive prompt lengths and --batch of positive sequence counts");
    }
    match a.model.device()? {
        Device::Cpu => {
            let loaded = a.model.load_on(moellava_runtime::backend::cpu::CpuBackend)?;
            bench_on(&a, loaded, |_| Vec::new())
        }
        Device::Cuda(be) => {
            let loaded = a.model.load_cuda(*be)?;
            bench_on(&a, loaded, gpu_metrics)
        }
    }
}

/// What only a GPU run reports: device memory in use (driver's count, after the runs), weights
/// uploaded, and device-to-device copy bandwidth (the HBM roofline).
fn gpu_metrics(m: &Model<CudaBackend>) -> Vec<(String, f64)> {
    let be = &m.backend;
    let mut out = vec![("gpu_weight_bytes".to_string(), be.resident_weight_bytes() as f64)];
    if let Ok((free, total)) = be.mem_info() {
        out.push(("gpu_mem_used_bytes".into(), (total - free) as f64));
    }
    if let Ok(bw) = be.copy_bandwidth_gb_s(1 << 30) {
        out.push(("gpu_bandwidth_gb_s".into(), bw));
    }
    if let Some(t) = be.tier_report() {
        let c = t.counters;
        out.push(("gpu_expert_budget_bytes".into(), t.budget_bytes as f64));
        out.push(("gpu_expert_hit_rate".into(), c.hits as f64 / (c.hits + c.misses).max(1) as f64));
        out.push(("gpu_expert_copied_bytes".into(), c.copied_bytes as f64));
        out.push(("gpu_expert_cpu_computed".into(), c.cpu_computed as f64));
    }
    out
}

fn bench_on<B: Backend>(
    a: &BenchArgs,
    (model, load_s): (Model<B>, f64),
    device_metrics: fn(&Model<B>) -> Vec<(String, f64)>,
) -> Result<()> {
    let device = model.backend.name();
    let threads = rayon::current_num_threads();
    let vocab = model.config.llm.n_vocab;
    let peer = match a.peer.as_deref() {
        None => None,
        Some("llama.cpp") => {
            let default_peer = a.model.model.with_extension("peer.gguf");
            let path =
                a.peer_model.clone().unwrap_or_else(|| if default_peer.exists() { default_peer } else { a.model.model.clone() });
            let t = Instant::now();
            let p = LlamaModel::load(&path).with_context(|| format!("peer llama.cpp on {}", path.display()))?;
            Some((path, p, t.elapsed().as_secs_f64()))
        }
        Some(other) => bail!("--peer '{other}': the only peer is llama.cpp"),
    };
    let max_ctx = model.config.llm.context_length;
    if let Some(&p) = a.prompts.iter().find(|p| **p + 8 > max_ctx) {
        bail!("prompt length {p} exceeds the model's context length {max_ctx}");
    }
    let image = a.image.as_ref().map(|p| moellava_runtime::image::load(p)).transpose()?.unwrap_or_else(test_image);
    let mut ours: Vec<(String, Series)> = Vec::new();
    let mut theirs: Vec<(String, Series)> = Vec::new();
    let push = |v: &mut Vec<(String, Series)>, name: String, x: f64| match v.iter_mut().find(|(n, _)| *n == name) {
        Some((_, s)) => s.0.push(x),
        None => v.push((name, Series(vec![x]))),
    };
    // One untimed pass first, as llama-bench does: first-use work (the CPU's weight repacking, a
    // GPU's uploads and kernel loads) is load time, which the peer also spends before its first call.
    let t = Instant::now();
    ours_prefill(&model, &prompt_ids(16, vocab))?;
    if let Some(v) = &model.vision {
        drop(model.backend.to_host(&v.encode(&model.backend, &model.pixel_values(&image)?)?.1));
    }
    let warmup_s = t.elapsed().as_secs_f64();
    let mut bytes_tok = 0.0;
    for _rep in 0..a.reps {
        for &p in &a.prompts {
            let ids = prompt_ids(p, vocab);
            push(&mut ours, format!("prefill_{p}_tok_s"), ours_prefill(&model, &ids)?);
            if let Some((_, pm, _)) = &peer {
                push(&mut theirs, format!("prefill_{p}_tok_s"), peer_prefill(pm, &ids, threads)?);
            }
        }
        let (d, routes) = ours_decode(&model, a.decode)?;
        bytes_tok = bytes_per_token(&model, &routes);
        push(&mut ours, "decode_tok_s".into(), d);
        if let Some((_, pm, _)) = &peer {
            push(&mut theirs, "decode_tok_s".into(), peer_decode(pm, a.decode, threads)?);
        }
        for &b in &a.batch {
            push(&mut ours, format!("decode_batch_{b}_tok_s"), ours_decode_batch(&model, b, a.decode)?);
        }
        if model.vision.is_some() {
            let be = &model.backend;
            let t = Instant::now();
            let px = model.pixel_values(&image)?;
            let (_, e) = model.vision.as_ref().map(|v| v.encode(be, &px)).transpose()?.context("tower")?;
            drop(be.to_host(&e)); // waits for a device's queued work
            push(&mut ours, "image_encode_s".into(), t.elapsed().as_secs_f64());
            let t = Instant::now();
            let input = model.prepare(&model.question_prompt("What is in the picture?", true), Some(&image))?;
            let mut cache = model.new_kv_cache(be.shape(&input.embeds).0);
            model.forward(input.embeds, &mut cache, &mut Gating::Deterministic, &mut Trace::default())?;
            model.end_sequence()?;
            push(&mut ours, "ttft_image_s".into(), t.elapsed().as_secs_f64());
        }
        push(&mut ours, "bandwidth_gb_s".into(), moellava_kernels::cpu::bandwidth::read_gb_s(1 << 29));
        for (name, v) in device_metrics(&model) {
            push(&mut ours, name, v);
        }
    }
    // The roofline is the memory the weights stream from: HBM on a GPU, RAM on the CPU.
    let bw_metric = if device == "cuda" { "gpu_bandwidth_gb_s" } else { "bandwidth_gb_s" };
    let bw = ours.iter().find(|(n, _)| n == bw_metric).map_or(0.0, |(_, s)| s.mean());
    let dec = ours.iter().find(|(n, _)| n == "decode_tok_s").map_or(0.0, |(_, s)| s.mean());
    let mut metrics = Vec::new();
    for (name, s) in &ours {
        let peer_s = theirs.iter().find(|(n, _)| n == name).map(|(_, s)| s);
        metrics.push(json!({
            "name": name, "ours": s.mean(), "ours_std": s.std(),
            "peer": peer_s.map(Series::mean), "peer_std": peer_s.map(Series::std),
            "ratio": peer_s.map(|p| s.mean() / p.mean()),
        }));
    }
    metrics.push(json!({"name": "bytes_per_decoded_token", "ours": bytes_tok}));
    metrics.push(json!({"name": "decode_roofline_fraction", "ours": if bw > 0.0 { dec * bytes_tok / (bw * 1e9) } else { 0.0 }}));
    metrics.push(json!({"name": "load_s", "ours": load_s, "peer": peer.as_ref().map(|p| p.2)}));
    // The untimed first pass (16 tokens, and the image through the tower): includes first-use repacking.
    metrics.push(json!({"name": "warmup_s", "ours": warmup_s, "peer": null}));
    metrics.push(json!({"name": "peak_rss_bytes", "ours": peak_rss_bytes()}));
    let plan = model.file.meta.get_str(moellava_runtime::gguf::keys::moellava::QUANT_PLAN).unwrap_or("").to_string();
    let out = json!({
        "model": a.model.model,
        "architecture": model.config.llm.family.arch(),
        "moe": model.config.moe.is_some(),
        "quant": plan,
        "threads": threads,
        "device": device,
        "kv_cache": model.kv_type,
        "cpu_repack": device == "cpu" && moellava_kernels::cpu::packed::enabled(),
        "repetitions": a.reps,
        "peer": peer.as_ref().map(|(p, _, _)| json!({"name": "llama.cpp", "model": p, "same_file": *p == a.model.model})),
        "metrics": metrics,
        "expert_cache": model.expert_cache_report(),
    });
    a.model.experts.print_report(&model);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{} ({}, {}), {threads} threads, {} repetitions",
        a.model.model.display(),
        out["architecture"].as_str().unwrap_or(""),
        plan,
        a.reps
    );
    if let Some((p, _, _)) = &peer {
        println!(
            "peer: llama.cpp on {}{}",
            p.display(),
            if *p == a.model.model { "" } else { " (a dense file with the same bytes read per token)" }
        );
    }
    println!("{:<28} {:>18} {:>18} {:>8}", "metric", "ours", "peer", "ratio");
    for m in out["metrics"].as_array().into_iter().flatten() {
        let f = |k: &str| m[k].as_f64();
        let cell = |v: Option<f64>, s: Option<f64>| {
            v.map_or("".into(), |v| match s {
                Some(s) if s > 0.0 => format!("{v:.3} ± {s:.3}"),
                _ => format!("{v:.3}"),
            })
        };
        println!(
            "{:<28} {:>18} {:>18} {:>8}",
            m["name"].as_str().unwrap_or(""),
            cell(f("ours"), f("ours_std")),
            cell(f("peer"), f("peer_std")),
            f("ratio").map_or("".into(), |r| format!("{r:.2}"))
        );
    }
    Ok(())
}
