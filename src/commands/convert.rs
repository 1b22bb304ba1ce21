//! `moellava convert HF_DIR -o OUT.gguf [...]`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use moellava_convert::{ConvertOptions, PlanChoice, Preset};
use moellava_kernels::QuantType;
use moellava_runtime::inspect::human_bytes;

/// Convert a Hugging Face MoE-LLaVA checkpoint (or a dense stage-2 LLaVA of the same backbones) and
/// its vision tower into one GGUF file, with 4/8-bit experts.
///
/// Reads config.json, model.safetensors or its shards (+ model.safetensors.index.json, BF16/F16/F32),
/// and the family's tokenizer files (Phi: vocab.json + merges.txt + added_tokens.json; StableLM:
/// arcade100k.tiktoken; Qwen: qwen.tiktoken), lazily through memory maps. The vision tower is
/// --vision-tower, else config.json's mm_image_tower as a path, relative to the checkpoint's parent
/// directory, or in the Hugging Face cache ($HF_HOME/hub/models--ORG--NAME/snapshots/*).
///
/// Quant plan. Types are ggml's names: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q4_k q5_k q6_k.
/// A class flag beats --type, which beats --preset; the default is --preset q4. Norms and biases are
/// always f32; the router stays f32 unless --router is given. Presets:
///
///   q4   experts q4_k  dense q8_0  embeddings q8_0  router f32  vision f16  projector f16
///   q5   experts q5_k  dense q8_0  embeddings q8_0  router f32  vision f16  projector f16
///   q8   experts q8_0  dense q8_0  embeddings q8_0  router f32  vision f16  projector f16
///   f16  everything f16 (router f32)
///
/// A tensor whose rows do not fit the chosen type's block size falls back (q4_k→q5_0, q5_k→q5_1,
/// q6_k→q8_0, else f16); each fallback is printed.
///
/// Examples:
///   moellava convert MoE-LLaVA-Phi2-2.7B-4e -o phi2-q4.gguf --preset q4
///   moellava convert ckpt/ --vision-tower clip-vit-large-patch14-336/ -o m.gguf --experts q4_k --dense q8_0
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct ConvertArgs {
    /// Checkpoint directory (config.json, *.safetensors, tokenizer files).
    pub hf_dir: PathBuf,
    /// Vision tower directory (CLIPModel, CLIPVisionModel, SiglipModel or SiglipVisionModel).
    #[arg(long, value_name = "DIR")]
    pub vision_tower: Option<PathBuf>,
    /// Output GGUF file (written to OUT.tmp and renamed when complete).
    #[arg(short, long, value_name = "OUT.gguf")]
    pub output: PathBuf,
    /// Type of every class (class flags override it).
    #[arg(long = "type", value_name = "T", value_parser = parse_type)]
    pub all: Option<QuantType>,
    /// Stacked expert FFNs of the MoE layers.
    #[arg(long, value_name = "T", value_parser = parse_type)]
    pub experts: Option<QuantType>,
    /// Attention and the FFNs of dense layers.
    #[arg(long, value_name = "T", value_parser = parse_type)]
    pub dense: Option<QuantType>,
    /// Token embedding and output head.
    #[arg(long, value_name = "T", value_parser = parse_type)]
    pub embeddings: Option<QuantType>,
    /// MoE gates (default f32: routing decisions are sensitive to gate precision).
    #[arg(long, value_name = "T", value_parser = parse_type)]
    pub router: Option<QuantType>,
    /// Vision tower weights (position/class/patch tables stay float).
    #[arg(long, value_name = "T", value_parser = parse_type)]
    pub vision: Option<QuantType>,
    /// Multimodal projector.
    #[arg(long, value_name = "T", value_parser = parse_type)]
    pub projector: Option<QuantType>,
    /// Named plan: q4, q5, q8 or f16 (see above).
    #[arg(long, value_name = "P", value_parser = parse_preset)]
    pub preset: Option<Preset>,
    /// Write the language model (OUT.gguf) and the vision tower + projector (OUT.mmproj.gguf)
    /// separately, in llama.cpp's layout, so that llama.cpp can load a converted dense model.
    #[arg(long)]
    pub split: bool,
    /// Overwrite an existing output.
    #[arg(long)]
    pub force: bool,
    /// No progress bar and no summary.
    #[arg(short, long)]
    pub quiet: bool,
}

fn parse_type(s: &str) -> Result<QuantType, String> {
    QuantType::parse(s)
}

fn parse_preset(s: &str) -> Result<Preset, String> {
    Preset::parse(s).map_err(|e| e.to_string())
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let start = Instant::now();
    let plan = PlanChoice {
        preset: a.preset,
        all: a.all,
        experts: a.experts,
        dense: a.dense,
        embeddings: a.embeddings,
        router: a.router,
        vision: a.vision,
        projector: a.projector,
    };
    let opts =
        ConvertOptions { input: a.hf_dir, vision_tower: a.vision_tower, output: a.output, plan, split: a.split, force: a.force };
    let conv = moellava_convert::prepare(opts)?;
    let quiet = a.quiet;
    if !quiet {
        let moe =
            conv.llm.moe.as_ref().map(|m| format!(", MoE layers {:?} × {} experts", m.layers, m.n_expert)).unwrap_or_default();
        eprintln!(
            "{} ({}): {} layers{moe}; tower {} ({}); len(tokenizer) {}",
            conv.llm.model_type,
            conv.llm.family.arch(),
            conv.llm.n_layer,
            conv.tower.dir.display(),
            conv.tower.kind.name(),
            conv.vocab.len()
        );
        eprintln!("plan: {}", conv.plan);
        for f in &conv.fallbacks {
            eprintln!(
                "fallback: {} {} → {} for {} tensor(s) whose rows do not fit the block size",
                f.class, f.from, f.to, f.tensors
            );
        }
    }
    let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(conv.input_bytes());
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let outputs = conv.run(&mut |p| {
        if let Some(b) = &bar {
            b.set_position(p.bytes_done);
            b.set_message(format!("[{}/{}] {}", p.tensors_done, p.tensors_total, p.tensor));
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if !quiet {
        eprintln!("{:<11} {:>8} {:>12} {:>12}", "class", "tensors", "before", "after");
        let (mut tb, mut ta) = (0, 0);
        for (class, s) in conv.class_sizes() {
            eprintln!("{:<11} {:>8} {:>12} {:>12}", class.name(), s.tensors, human_bytes(s.before), human_bytes(s.after));
            tb += s.before;
            ta += s.after;
        }
        eprintln!("{:<11} {:>8} {:>12} {:>12}", "total", conv.tensors.len(), human_bytes(tb), human_bytes(ta));
        let secs = start.elapsed().as_secs_f64();
        for o in &outputs {
            eprintln!("wrote {}", o.display());
        }
        eprintln!("{:.1} s, {:.0} MB/s of input", secs, tb as f64 / 1e6 / secs.max(1e-9));
    }
    Ok(())
}
