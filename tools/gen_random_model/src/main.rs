//! Real-size random-weight MoE-LLaVA GGUFs, written directly in moellava's layout (no safetensors
//! step), for speed and memory benchmarks. Not used by CI.
//!
//! The released dimensions (moellava-spec.md §1.1) of Phi2-2.7B-4e, StableLM-1.6B-4e and
//! Qwen-1.8B-4e (or their dense backbones with --dense), the CLIP-L/14-336 or SigLIP-so400m tower,
//! quantized with the converter's plans. Weights are N(0, 1/fan_in)-scaled Gaussians drawn from a
//! counter-based generator (realistic magnitudes: zeros would make some kernels unrealistically fast);
//! norms are ~1, biases small. The tokenizer is a placeholder of the real size (byte tokens + filler).
//!
//! With --peer, a second file for llama.cpp is written beside the model: the language model alone in
//! llama.cpp's layout, dense, with the same bytes read per token (MoE files: a dense FFN as wide as the
//! two routed experts of a MoE layer averaged over all layers) — the peer of `moellava bench --peer`.
//! Its FFN width falls in the same block-size class as the experts' (see [`peer_ffn_width`]), so the
//! same plan gives both files the same quant types.
//!
//!   cargo run --release -p moellava-gen-random-model -- --family phi2 --plan q4 -o phi2-4e-q4.gguf --peer

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use moellava_convert::hf_config::{Family, LlmConfig, MmConfig, MoeConfig, TowerConfig, TowerKind};
use moellava_convert::name_map::{self, Kind, OutTensor, Source};
use moellava_convert::tokenizer::Vocab;
use moellava_convert::write::{self, SourceData};
use moellava_convert::{metadata, PlanChoice, Preset, QuantPlan};
use moellava_kernels::QuantType;
use moellava_runtime::gguf::keys::tensors as tn;
use moellava_runtime::gguf::keys::tokenizer as tk;
use moellava_runtime::tensor_class::TensorClass;

#[derive(Parser)]
#[command(about = "Write a real-size random-weight MoE-LLaVA GGUF (benchmarks only)")]
struct Args {
    /// phi2 | stablelm | qwen
    #[arg(long)]
    family: String,
    /// The stage-2 dense backbone instead of the MoE model.
    #[arg(long)]
    dense: bool,
    /// clip | siglip
    #[arg(long, default_value = "clip")]
    tower: String,
    /// f16 | q8_0 | q4_0 | q4_k (every class of that type, router f32) or the converter's presets q4 | q5 | q8.
    #[arg(long)]
    plan: String,
    #[arg(short, long)]
    output: PathBuf,
    /// Also write OUT.peer.gguf: dense, same bytes per token, language model only (llama.cpp layout).
    #[arg(long)]
    peer: bool,
    /// Fewer layers than the release (quick experiments).
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn llm_config(family: Family, moe: bool, layers: Option<usize>) -> LlmConfig {
    let (n_embd, n_layer, n_head, n_ff, rope_dims, vocab, eps) = match family {
        Family::Phi2 => (2560, 32, 32, 10240, 32, 51200, 1e-5),
        Family::StableLm => (2048, 24, 32, 5632, 16, 100352, 1e-5),
        Family::Qwen => (2048, 24, 16, 5504, 128, 151936, 1e-6),
    };
    let n_layer = layers.unwrap_or(n_layer);
    LlmConfig {
        family,
        model_type: format!("{}{}", if moe { "moe_llava_" } else { "llava_" }, family.arch()),
        n_embd,
        n_layer,
        n_head,
        n_head_kv: n_head,
        head_dim: n_embd / n_head,
        n_ff,
        feed_forward_length: if family == Family::Qwen { 2 * n_ff } else { n_ff },
        rope_dims,
        rope_base: 10000.0,
        norm_eps: eps,
        context_length: if family == Family::Phi2 { 2048 } else { 4096 },
        vocab_rows: vocab,
        qkv_bias: true,
        moe: moe.then(|| MoeConfig {
            layers: (0..n_layer).step_by(2).collect(),
            n_expert: 4,
            top_k: 2,
            eval_capacity_factor: 2.0,
            min_capacity: 0,
        }),
        mm: MmConfig {
            image_tower: "random".into(),
            mm_hidden: 0,
            select_layer: -2,
            select_feature: "patch".into(),
            projector_type: "mlp2x_gelu".into(),
            aspect_ratio: "pad".into(),
        },
    }
}

fn tower_config(kind: TowerKind) -> TowerConfig {
    let clip = kind == TowerKind::Clip;
    TowerConfig {
        dir: PathBuf::from("random"),
        kind,
        hidden: if clip { 1024 } else { 1152 },
        n_ff: if clip { 4096 } else { 4304 },
        n_head: 16,
        n_layer: if clip { 24 } else { 27 },
        image_size: if clip { 336 } else { 384 },
        patch_size: 14,
        eps: if clip { 1e-5 } else { 1e-6 },
        hidden_act: if clip { "quick_gelu".into() } else { "gelu_pytorch_tanh".into() },
        mean: if clip { [0.481_454_66, 0.457_827_5, 0.408_210_73] } else { [0.5; 3] },
        // CLIP's constants as its preprocessor config writes them (f32 rounds them as the reader does).
        #[allow(clippy::excessive_precision)]
        std: if clip { [0.268_629_54, 0.261_302_58, 0.275_777_11] } else { [0.5; 3] },
    }
}

/// The dense peer's FFN width for experts `n_ff` wide read `per_layer` times per layer on average: the
/// nearest multiple of 32 (every block size but the k-quants'), divisible by 256 exactly when `n_ff`
/// is. A k-quant plan then falls back on the same matrices in both files (Qwen's 5504-wide experts
/// have their `ffn_down` in q5_0 under q4_k; a 256-multiple peer would keep q4_k there and compare
/// different kernels).
fn peer_ffn_width(n_ff: usize, per_layer: f64) -> usize {
    let unit = if n_ff.is_multiple_of(256) { 256 } else { 32 };
    let w = ((n_ff as f64 * per_layer / unit as f64).round() as usize).max(1) * unit;
    if unit == 32 && w.is_multiple_of(256) {
        w + 32
    } else {
        w
    }
}

/// A vocabulary of the real size: the 256 byte tokens, filler tokens, `<|endoftext|>` last. No merges:
/// benchmarks feed token ids, and text still tokenises (byte by byte).
fn placeholder_vocab(len: usize) -> Vocab {
    let map = moellava_convert::tokenizer::byte_to_unicode();
    let mut tokens: Vec<String> = map.iter().map(|c| c.to_string()).collect();
    tokens.extend((256..len - 1).map(|i| format!("<filler_{i}>")));
    tokens.push("<|endoftext|>".into());
    let mut types = vec![tk::TYPE_NORMAL; len];
    types[len - 1] = tk::TYPE_CONTROL;
    Vocab {
        tokens,
        token_types: types,
        merges: vec![],
        pre: "phi-2",
        eos: (len - 1) as u32,
        bos: None,
        pad: None,
        normalizer: "none",
        ignore_merges: false,
    }
}

/// Deterministic Gaussian weights from (seed, tensor name, element index): any chunk order gives the
/// same bytes, and nothing is held in memory.
struct RandomWeights {
    seed: u64,
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SourceData for RandomWeights {
    fn read(&self, s: &Source, first: usize, out: &mut [f32]) -> moellava_convert::Result<()> {
        let key = s.name.bytes().fold(self.seed ^ 0x9E37_79B9_7F4A_7C15, |h, b| mix(h ^ b as u64));
        let fan_in = *s.shape.last().unwrap_or(&1) as f32;
        let (scale, offset) = if s.shape.len() == 1 {
            if s.name.contains("norm") || s.name.contains("ln") {
                (0.1, 1.0)
            } else {
                (0.05, 0.0)
            }
        } else {
            (1.0 / fan_in.sqrt(), 0.0)
        };
        use rayon::prelude::*;
        out.par_chunks_mut(4096).enumerate().for_each(|(c, chunk)| {
            for (j, v) in chunk.iter_mut().enumerate() {
                let i = (first + c * 4096 + j) as u64;
                let (a, b) = (mix(key.wrapping_add(2 * i)), mix(key.wrapping_add(2 * i + 1)));
                let u1 = ((a >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                let u2 = (b >> 11) as f64 / (1u64 << 53) as f64;
                let g = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                *v = offset + scale * g as f32;
            }
        });
        Ok(())
    }

    fn element_bytes(&self, _: &Source) -> u64 {
        4
    }
}

fn plan_choice(s: &str) -> Result<PlanChoice> {
    Ok(match s {
        "q4" | "q5" | "q8" => PlanChoice { preset: Some(Preset::parse(s)?), ..Default::default() },
        t => PlanChoice { all: Some(QuantType::parse(t).map_err(anyhow::Error::msg)?), ..Default::default() },
    })
}

fn write(
    path: &PathBuf,
    llm: &LlmConfig,
    tower: Option<&TowerConfig>,
    qplan: &QuantPlan,
    vocab: &Vocab,
    seed: u64,
    llama_layout: bool,
) -> Result<()> {
    let t = tower.cloned().unwrap_or_else(|| tower_config(TowerKind::Clip));
    let keep = name_map::vision_layers_kept(llm.mm.select_layer, t.n_layer).context("select layer")?;
    let mut tensors: Vec<OutTensor> = name_map::plan(llm, &t, vocab.len(), keep);
    if tower.is_none() {
        tensors.retain(|x| !matches!(x.class, TensorClass::Vision | TensorClass::Projector));
    }
    if llama_layout && llm.family == Family::Phi2 {
        tensors.push(OutTensor {
            name: tn::OUTPUT_BIAS.into(),
            class: TensorClass::Embeddings,
            kind: Kind::Vector,
            shape: vec![vocab.len()],
            sources: vec![],
            rows: None,
        });
    }
    let (planned, _) = moellava_convert::assign_types(tensors, qplan);
    let mut kvs = Vec::new();
    metadata::general(&mut kvs, llm.family.arch(), &format!("random {}", llm.model_type), qplan.file_type(llm.moe.is_some()));
    metadata::language_model(&mut kvs, llm);
    metadata::tokenizer(&mut kvs, vocab);
    if let Some(tc) = tower {
        metadata::vision(&mut kvs, llm, tc, keep, "random");
    }
    metadata::plan(&mut kvs, qplan);
    let data = RandomWeights { seed };
    let total: u64 = planned.iter().map(|p| write::source_bytes(&data, &p.tensor)).sum();
    let (mut done, start) = (0u64, std::time::Instant::now());
    let mut last = 0u64;
    write::write_gguf(
        path,
        &kvs,
        &planned,
        &data,
        &mut |p| {
            if p.bytes_done - last > total / 20 {
                last = p.bytes_done;
                eprintln!(
                    "  {:>3.0}% {:>6.0} s {}",
                    100.0 * p.bytes_done as f64 / total as f64,
                    start.elapsed().as_secs_f64(),
                    p.tensor
                );
            }
        },
        &mut done,
        total,
    )?;
    let bytes = std::fs::metadata(path)?.len();
    eprintln!("wrote {} ({:.2} GB) in {:.0} s", path.display(), bytes as f64 / 1e9, start.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    let family = match a.family.as_str() {
        "phi2" => Family::Phi2,
        "stablelm" => Family::StableLm,
        "qwen" => Family::Qwen,
        f => bail!("--family {f}: expected phi2, stablelm or qwen"),
    };
    let kind = match a.tower.as_str() {
        "clip" => TowerKind::Clip,
        "siglip" => TowerKind::Siglip,
        t => bail!("--tower {t}: expected clip or siglip"),
    };
    let qplan = QuantPlan::resolve(&plan_choice(&a.plan)?);
    let mut llm = llm_config(family, !a.dense, a.layers);
    let tower = tower_config(kind);
    llm.mm.mm_hidden = tower.hidden;
    let vocab = placeholder_vocab(match family {
        Family::Phi2 => 50295,
        Family::StableLm => 100289,
        Family::Qwen => 151851,
    });
    write(&a.output, &llm, Some(&tower), &qplan, &vocab, a.seed, false)?;
    if a.peer {
        let mut dense = llm.clone();
        if let Some(m) = dense.moe.take() {
            // Same bytes per token: MoE layers read two experts, dense layers one FFN.
            let per_layer = (m.layers.len() * 2 + (llm.n_layer - m.layers.len())) as f64 / llm.n_layer as f64;
            dense.n_ff = peer_ffn_width(llm.n_ff, per_layer);
            dense.feed_forward_length = if family == Family::Qwen { 2 * dense.n_ff } else { dense.n_ff };
        }
        dense.model_type = format!("llava_{}", family.arch());
        let stem = a.output.to_string_lossy();
        let peer = PathBuf::from(format!("{}.peer.gguf", stem.strip_suffix(".gguf").unwrap_or(&stem)));
        write(&peer, &dense, None, &qplan, &vocab, a.seed ^ 1, true)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::peer_ffn_width;

    #[test]
    fn peer_width_keeps_the_block_size_class() {
        // Phi-2 and StableLM experts are 256-multiples: the peer stays one, at the exact width.
        assert_eq!(peer_ffn_width(10240, 1.5), 15360);
        assert_eq!(peer_ffn_width(5632, 1.5), 8448);
        // Qwen's 5504 is not: 8256 is not either (q5_0 ffn_down in both files under q4_k) ...
        assert_eq!(peer_ffn_width(5504, 1.5), 8256);
        // ... and a width that would round onto a 256-multiple is moved off it.
        assert_eq!(peer_ffn_width(5504, 256.0 * 43.0 / 5504.0), 11008 + 32);
    }
}
