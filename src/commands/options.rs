//! Option groups shared by the commands that run a model (`#[command(flatten)]`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use moellava_runtime::backend::cuda::CudaBackend;
use moellava_runtime::backend::vram::{GpuMem, MissPolicy};
use moellava_runtime::backend::{Backend, KvType};
use moellava_runtime::experts::{Budget, Policy};
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
    /// Element type of the KV cache: f16 (half the memory and half the bytes each decoded token
    /// reads, as llama.cpp keeps it) or f32. Default: f32 for a file whose attention weights are f32
    /// (reference precision), f16 otherwise.
    #[arg(long, value_name = "TYPE")]
    pub kv_cache: Option<String>,
    /// Where to compute: `cpu`, `cuda` (GPU 0), `cuda:N` (GPU N), or `auto`: the first GPU when a
    /// CUDA driver, a device and NVRTC (CUDA toolkit, or `pip install nvidia-cuda-nvrtc-cu12`) are
    /// found, else the CPU. Commands other than `run` and `bench` compute on the CPU.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: String,
    /// With a GPU: VRAM for experts — bytes (4GB, 512MiB), a share of all experts (50%), or `auto`
    /// (free VRAM after the dense weights, minus 1 GiB for the KV cache and scratch). Experts beyond it
    /// wait in host memory (the file's map, page-locked when the driver allows) and are copied in when
    /// routed, least recently used leaving first. Default: every routed expert stays in VRAM.
    #[arg(long, value_name = "BYTES|PERCENT|auto")]
    pub gpu_mem: Option<String>,
    /// With --gpu-mem, what a routed expert that is not in VRAM does: `copy` it in, compute it on the
    /// `cpu`, or `auto`: the CPU for decode steps when it reads memory faster than PCIe copies, else copy.
    #[arg(long, default_value = "auto", value_name = "POLICY")]
    pub miss_policy: String,
    /// On the CPU, keep every weight in the file's own layout. By default each matrix (attention,
    /// FFN, each routed expert, output head, vision tower) is repacked once, at its first use, into
    /// the layout of ggml's fastest kernels for this CPU (AMX tiles on Xeons that have them, else an
    /// interleaved layout for q4_0/q4_K where AVX2 allows; llama.cpp does the same at load), and the
    /// file's pages of it are released. q5_0 matrices are widened to q8_0 (the same values, 8.5
    /// instead of 5.5 bits each) to take q8_0's packed kernels. Experts held by --expert-ram's cache
    /// keep the file's layout (the budget counts file bytes).
    #[arg(long)]
    pub no_repack: bool,
    #[command(flatten)]
    pub experts: ExpertArgs,
}

/// The backend `--device` chose.
pub enum Device {
    Cpu,
    Cuda(Box<CudaBackend>),
}

/// Expert residency: how many experts stay in RAM, which are evicted, and what is recorded.
#[derive(Args, Clone, Debug, Default)]
pub struct ExpertArgs {
    /// Keep at most this much expert weight in RAM: bytes (1500000000, 512MiB, 2GB) or a share of all
    /// experts (25%). Experts are read from the file when routed and evicted by --expert-policy; their
    /// pages are dropped from the page cache, so a model larger than free RAM runs. Default: all
    /// experts stay mapped (no cache). At least the two experts of one token must fit.
    #[arg(long, value_name = "BYTES|PERCENT")]
    pub expert_ram: Option<String>,
    /// Which expert to evict: lru, lfu, or least-stale (the most recently completed layer's experts
    /// first: they are needed again only after every other layer has run).
    #[arg(long, default_value = "lru", value_name = "POLICY")]
    pub expert_policy: String,
    /// Guess the next MoE layer's experts (its router applied to this layer's input) and load them
    /// while this layer computes. Only with --expert-ram.
    #[arg(long)]
    pub prefetch: bool,
    /// Write every forward call's routing (experts per token and MoE layer, and the prefetch guess)
    /// to this JSON-lines file, for `moellava replay-route`.
    #[arg(long, value_name = "FILE.jsonl")]
    pub route_trace: Option<PathBuf>,
    /// Print the expert cache's counters (hits, misses, prefetches, bytes, stalls per layer) to stderr.
    #[arg(long)]
    pub verbose: bool,
}

impl ExpertArgs {
    /// Sets up the cache and the route trace on a loaded model.
    pub fn apply<B: Backend>(&self, model: &mut Model<B>, path: &std::path::Path) -> Result<()> {
        let policy: Policy = self.expert_policy.parse().map_err(|e: String| anyhow::anyhow!("--expert-policy: {e}"))?;
        match &self.expert_ram {
            Some(b) => {
                let budget: Budget = b.parse().map_err(|e: String| anyhow::anyhow!("--expert-ram {e}"))?;
                model.enable_expert_cache_from_file(path, budget, policy, self.prefetch)?;
            }
            None if self.prefetch => bail!("--prefetch needs --expert-ram (without a budget every expert is resident)"),
            None => {}
        }
        if let Some(t) = &self.route_trace {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            model.record_route_trace(t, &name).with_context(|| format!("--route-trace {}", t.display()))?;
        }
        Ok(())
    }

    /// `--verbose`: the cache's counters on stderr.
    pub fn print_report<B: Backend>(&self, model: &Model<B>) {
        if self.verbose {
            match model.expert_cache_report() {
                Some(r) => eprintln!("{}", r.summary()),
                None => eprintln!("expert cache: off (every expert is read from the file's map; --expert-ram enables it)"),
            }
        }
    }
}

impl ModelArgs {
    /// Opens the device `--device` names; `auto` falls back to the CPU (saying why on stderr when a
    /// CUDA driver is present but the GPU cannot be used).
    pub fn device(&self) -> Result<Device> {
        let (want, ordinal) = match self.device.as_str() {
            "cpu" => return Ok(Device::Cpu),
            "auto" => (false, 0),
            "cuda" => (true, 0),
            other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
                Some(n) => (true, n),
                None => bail!("--device: unknown device `{other}` (expected cpu, cuda, cuda:N or auto)"),
            },
        };
        if !want && !moellava_kernels::cuda::device::driver_present() {
            return Ok(Device::Cpu);
        }
        match CudaBackend::open(ordinal) {
            Ok(b) => Ok(Device::Cuda(Box::new(b))),
            Err(e) if want => Err(anyhow::anyhow!("--device {}: {e}", self.device)),
            Err(e) => {
                eprintln!("--device auto: not using the GPU ({e}); computing on the CPU");
                Ok(Device::Cpu)
            }
        }
    }

    /// Sets up the thread pool and loads the model on the CPU (commands without a GPU path); an
    /// explicit `--device cuda` is refused with the reason.
    pub fn load(&self) -> Result<(Model, f64)> {
        if self.device != "cpu" && self.device != "auto" {
            bail!("--device {}: this command computes on the CPU only so far (use --device cpu or auto)", self.device);
        }
        self.load_on(moellava_runtime::backend::cpu::CpuBackend)
    }

    /// [`Self::load_on`] a GPU, with the VRAM expert tier when `--gpu-mem` asks for it.
    pub fn load_cuda(&self, be: CudaBackend) -> Result<(Model<CudaBackend>, f64)> {
        let policy: MissPolicy = self.miss_policy.parse().map_err(|e: String| anyhow::anyhow!("--miss-policy: {e}"))?;
        let gpu_mem: Option<GpuMem> =
            self.gpu_mem.as_deref().map(str::parse).transpose().map_err(|e: String| anyhow::anyhow!("--gpu-mem {e}"))?;
        let (model, load_s) = self.load_on(be)?;
        if let Some(m) = gpu_mem {
            model.backend.enable_expert_tier(&model.file, m, policy).context("--gpu-mem")?;
        }
        Ok((model, load_s))
    }

    /// [`Self::load`] on a given backend.
    pub fn load_on<B: Backend>(&self, backend: B) -> Result<(Model<B>, f64)> {
        if self.gpu_mem.is_some() && backend.name() != "cuda" {
            bail!("--gpu-mem keeps experts in GPU memory: it needs --device cuda (computing on {})", backend.name());
        }
        if let Some(n) = self.threads {
            if n == 0 {
                bail!("--threads must be at least 1");
            }
            rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("setting up the thread pool")?;
        }
        moellava_kernels::cpu::packed::set_enabled(!self.no_repack);
        let t0 = std::time::Instant::now();
        let kv_type: Option<KvType> =
            self.kv_cache.as_deref().map(str::parse).transpose().map_err(|e: String| anyhow::anyhow!("--kv-cache: {e}"))?;
        let mut model = Model::load_with(&self.model, backend).with_context(|| format!("loading {}", self.model.display()))?;
        if let Some(t) = kv_type {
            model.kv_type = t;
        }
        self.experts.apply(&mut model, &self.model)?;
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
        let sampling = SamplingOptions {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        };
        sampling.validate().map_err(|e| anyhow::anyhow!("--temperature / --top-p / --repetition-penalty: {e}"))?;
        Ok(GenerateOptions { max_new_tokens: self.max_new_tokens, sampling, ignore_eos: self.ignore_eos, gating, cancel: None })
    }
}
