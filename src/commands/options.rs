//! Option groups shared by the commands that run a model (`#[command(flatten)]`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use moellava_runtime::sampler::SamplingOptions;
use moellava_runtime::{GatingMode, GenerateOptions, Model};

#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// The GGUF model (from `moellava convert`).
    #[arg(short = 'm', long = "model", value_name = "M.gguf")]
    pub model: PathBuf,
    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

impl ModelArgs {
    /// Sets up the thread pool and loads the model; returns it with the load time in seconds.
    pub fn load(&self) -> Result<(Model, f64)> {
        if let Some(n) = self.threads {
            if n == 0 {
                bail!("--threads must be at least 1");
            }
            rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("setting up the thread pool")?;
        }
        let t0 = std::time::Instant::now();
        let model = Model::load(&self.model).with_context(|| format!("loading {}", self.model.display()))?;
        Ok((model, t0.elapsed().as_secs_f64()))
    }
}

#[derive(Args, Clone, Debug)]
pub struct GenArgs {
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub max_new_tokens: usize,
    /// 0 = greedy (what MoE-LLaVA's evaluation uses); above 0, sample.
    #[arg(long, default_value_t = 0.0, value_name = "T")]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub top_k: usize,
    /// Penalise tokens already generated (1 = off).
    #[arg(long, default_value_t = 1.0, value_name = "R")]
    pub repetition_penalty: f32,
    /// Seed of sampling and of `--gating reference`.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// Do not stop at the end-of-text token (benchmarks, tests).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Second-expert rule of the MoE layers: `deterministic` (argmax; the default, reproducible) or
    /// `reference` (DeepSpeed's Gumbel-sampled choice, as the upstream runtime does, seeded by --seed).
    #[arg(long, default_value = "deterministic", value_name = "MODE")]
    pub gating: String,
}

impl GenArgs {
    pub fn options(&self) -> Result<GenerateOptions> {
        let gating = match self.gating.as_str() {
            "deterministic" => GatingMode::Deterministic,
            "reference" => GatingMode::Reference { seed: self.seed },
            other => bail!("unknown --gating '{other}'; expected deterministic or reference"),
        };
        let valid = self.temperature >= 0.0 && self.top_p > 0.0 && self.top_p <= 1.0 && self.repetition_penalty > 0.0;
        if !valid {
            bail!("--temperature must be ≥ 0, --top-p in (0, 1], --repetition-penalty > 0");
        }
        Ok(GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            sampling: SamplingOptions {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            },
            ignore_eos: self.ignore_eos,
            gating,
        })
    }
}
