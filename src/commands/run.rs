//! `moellava run`: answer one question about an image.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use moellava_runtime::sysinfo::{peak_rss_bytes, rss_split_bytes};
use serde_json::json;

use super::options::{Device, GenArgs, ModelArgs};
use moellava_runtime::backend::Backend;
use moellava_runtime::Model;

/// Answer a question about an image (or a text-only prompt) with a converted model.
///
/// `-p` is wrapped in the model's conversation template exactly as MoE-LLaVA's evaluation does:
/// "<system> USER: <image>\n<TEXT> ASSISTANT:" (the "<image>\n" part only with --image). Nothing is
/// appended: for POPE-style answers put "Answer the question using a single word or phrase." in TEXT.
/// The answer streams to stdout; timings go to stderr. With --json, one object is printed instead.
///
/// Examples:
///   moellava run -m phi2-q4.gguf --image cat.jpg -p "What is in the picture?"
///   moellava run -m m.gguf --image x.png -p "Is there a dog in the image?" --json
///   moellava run -m m.gguf --raw-prompt -p "USER: <image>
/// Describe it. ASSISTANT:" --image x.png --temperature 0.2 --seed 7
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The picture (JPEG, PNG, WebP, BMP, or the first frame of a GIF).
    #[arg(long, value_name = "IMG")]
    pub image: Option<PathBuf>,
    /// The question (or the whole prompt with --raw-prompt).
    #[arg(short = 'p', long = "prompt", value_name = "TEXT")]
    pub prompt: String,
    /// Use TEXT verbatim as the prompt (at most one "<image>" tag, where the picture goes).
    #[arg(long)]
    pub raw_prompt: bool,
    #[command(flatten)]
    pub gen: GenArgs,
    /// Write the float32 logits of the last prompt position (len(tokenizer) values) to this .npy file.
    #[arg(long, value_name = "F.npy")]
    pub logits_out: Option<PathBuf>,
    /// Print one JSON object: text, tokens, prompt_tokens, image_tokens, stop_reason, timings, memory,
    /// routing (per MoE layer, the experts chosen for the last prompt token), gating, kv_cache (its
    /// element type), expert_cache (counters with --expert-ram, else null).
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: RunArgs) -> Result<()> {
    match a.model.device()? {
        Device::Cpu => {
            let loaded = a.model.load_on(moellava_runtime::backend::cpu::CpuBackend)?;
            run_on(&a, loaded, "cpu".into(), |_| None)
        }
        Device::Cuda(be) => {
            let name = format!("cuda ({})", be.describe());
            let loaded = a.model.load_cuda(*be)?;
            run_on(&a, loaded, name, |m| m.backend.tier_report().map(|r| serde_json::to_value(r).unwrap_or_default()))
        }
    }
}

fn run_on<B: Backend>(
    a: &RunArgs,
    (model, load_s): (Model<B>, f64),
    device: String,
    gpu_experts: fn(&Model<B>) -> Option<serde_json::Value>,
) -> Result<()> {
    let opts = a.gen.options()?;
    let image = a.image.as_ref().map(|p| moellava_runtime::image::load(p)).transpose()?;
    let stdout = std::io::stdout();
    let answer = model.answer(image.as_ref(), &a.prompt, a.raw_prompt, &opts, &mut |piece| {
        if !a.json {
            let mut out = stdout.lock();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    })?;
    if let Some(path) = &a.logits_out {
        let n = answer.last_prompt_logits.len();
        moellava_runtime::npy::write_f32(path, &[n], &answer.last_prompt_logits)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let t = &answer.timings;
    if a.json {
        let obj = json!({
            "text": answer.text,
            "tokens": answer.tokens,
            "prompt_tokens": answer.prompt_tokens,
            "image_tokens": answer.image_tokens,
            "stop_reason": answer.stop_reason,
            "timings": {
                "load_s": load_s,
                "image_encode_s": t.image_encode_s,
                "prefill_s": t.prefill_s,
                "decode_s": t.decode_s,
                "prefill_tokens_per_s": t.prefill_tokens_per_s,
                "decode_tokens_per_s": t.decode_tokens_per_s,
            },
            "memory": {
                "peak_rss_bytes": peak_rss_bytes(),
                "end_rss_anon_bytes": rss_split_bytes().map(|r| r.0),
                "end_rss_file_bytes": rss_split_bytes().map(|r| r.1),
            },
            "routing": answer.routing,
            "gating": a.gen.gating,
            "kv_cache": model.kv_type,
            "device": device,
            "gpu_experts": gpu_experts(&model),
            "expert_cache": model.expert_cache_report(),
        });
        println!("{}", serde_json::to_string_pretty(&obj)?);
    } else {
        println!();
        eprintln!(
            "load {load_s:.2} s · image {:.2} s · prefill {} tokens {:.2} s ({:.1} tok/s) · decode {} tokens {:.2} s ({:.1} tok/s) · stop: {:?}",
            t.image_encode_s,
            answer.prompt_tokens,
            t.prefill_s,
            t.prefill_tokens_per_s,
            answer.tokens.len(),
            t.decode_s,
            t.decode_tokens_per_s,
            answer.stop_reason
        );
    }
    a.model.experts.print_report(&model);
    Ok(())
}
