//! moellava-convert: a Hugging Face MoE-LLaVA (or dense stage-2 LLaVA) checkpoint and its vision
//! tower → one GGUF file with a per-class quant plan.
//!
//! ```text
//! config.json ─hf_config→ LlmConfig ─┐             tokenizer files ─tokenizer→ Vocab ─┐
//! tower dir ─hf_config→ TowerConfig ─┴─name_map::plan→ [OutTensor] ─plan→ types ─┐     │
//! *.safetensors ─checkpoint (mmap)→ rows ──────────────────────────────write (chunks)─┴─metadata→ GGUF
//! ```
//!
//! [`prepare`] validates everything — config, tower, every tensor's presence, dtype and shape, the
//! tokenizer, the output path — before any output file is created; [`Conversion::run`] then streams.
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod error;
pub mod hf_config;
pub mod metadata;
pub mod name_map;
pub mod plan;
pub mod safetensors;
pub mod tokenizer;
pub mod write;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use moellava_kernels::QuantType;
use moellava_runtime::gguf::keys::tensors as tn;
use moellava_runtime::tensor_class::TensorClass;

use checkpoint::Checkpoint;
pub use error::{ConvertError, Result};
use hf_config::{Family, LlmConfig, TowerConfig};
use name_map::{Kind, Origin, OutTensor};
pub use plan::{PlanChoice, Preset, QuantPlan};
use tokenizer::Vocab;
use write::Inputs;
pub use write::Planned;
pub use write::Progress;

/// What `moellava convert` was asked to do.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub input: PathBuf,
    pub vision_tower: Option<PathBuf>,
    pub output: PathBuf,
    pub plan: PlanChoice,
    /// Write the language model and the vision part (an "mmproj") as two llama.cpp-layout files.
    pub split: bool,
    pub force: bool,
}

/// A tensor stored in another type than its class asked for, because its rows do not fit the block size.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fallback {
    pub class: TensorClass,
    pub from: QuantType,
    pub to: QuantType,
    pub tensors: usize,
}

/// A validated conversion, ready to write.
pub struct Conversion {
    pub llm: LlmConfig,
    pub tower: TowerConfig,
    pub vocab: Vocab,
    pub plan: QuantPlan,
    pub tensors: Vec<Planned>,
    pub fallbacks: Vec<Fallback>,
    /// Source tensors left out on purpose, with the reason.
    pub skipped: Vec<(String, String)>,
    pub outputs: Vec<PathBuf>,
    checkpoint: Checkpoint,
    tower_ckpt: Checkpoint,
    vision_keep: usize,
    opts: ConvertOptions,
}

/// Bytes per class before (source dtype) and after (output type).
#[derive(Clone, Debug, Default)]
pub struct ClassSizes {
    pub tensors: usize,
    pub before: u64,
    pub after: u64,
}

/// Validates inputs and plans every output tensor; creates nothing.
pub fn prepare(opts: ConvertOptions) -> Result<Conversion> {
    let outputs = output_paths(&opts)?;
    let llm = LlmConfig::load(&opts.input)?;
    let tower_dir = hf_config::locate_tower(opts.vision_tower.as_deref(), &llm.mm.image_tower, &opts.input)?;
    let tower = TowerConfig::load(&tower_dir)?;
    if tower.hidden != llm.mm.mm_hidden {
        return Err(ConvertError::Tower(format!(
            "{}: tower width {} differs from mm_hidden_size {} in {}: wrong tower for this checkpoint?",
            tower_dir.display(),
            tower.hidden,
            llm.mm.mm_hidden,
            opts.input.join("config.json").display()
        )));
    }
    let vision_keep = name_map::vision_layers_kept(llm.mm.select_layer, tower.n_layer).ok_or_else(|| ConvertError::Config {
        path: opts.input.join("config.json").display().to_string(),
        key: "mm_vision_select_layer".into(),
        what: format!("is {}, out of range for a {}-layer tower", llm.mm.select_layer, tower.n_layer),
    })?;
    let checkpoint = Checkpoint::open(&opts.input)?;
    let tower_ckpt = Checkpoint::open(&tower_dir)?;
    let config_json = hf_config::read_json(&opts.input.join("config.json"))?;
    let vocab = Vocab::load(llm.family, &opts.input, &config_json)?;
    if vocab.len() > llm.vocab_rows {
        return Err(ConvertError::Config {
            path: opts.input.join("config.json").display().to_string(),
            key: "vocab_size".into(),
            what: format!("is {}, fewer embedding rows than len(tokenizer) = {}", llm.vocab_rows, vocab.len()),
        });
    }
    let plan = QuantPlan::resolve(&opts.plan);
    let mut tensors_out = name_map::plan(&llm, &tower, vocab.len(), vision_keep);
    let inputs = Inputs { checkpoint: &checkpoint, tower: &tower_ckpt };
    check_sources(&tensors_out, &inputs)?;
    let skipped = account(&tensors_out, &inputs, &llm, &tower, vision_keep)?;
    if opts.split && llm.family == Family::Phi2 {
        // llama.cpp's phi2 requires an output bias; MoE-LLaVA's lm_head has none (spec §0.4): zeros.
        let rows = vocab.len();
        tensors_out.push(OutTensor {
            name: tn::OUTPUT_BIAS.into(),
            class: TensorClass::Embeddings,
            kind: Kind::Vector,
            shape: vec![rows],
            sources: vec![],
            rows: None,
        });
    }
    let (tensors, fallbacks) = assign_types(tensors_out, &plan);
    Ok(Conversion { llm, tower, vocab, plan, tensors, fallbacks, skipped, outputs, checkpoint, tower_ckpt, vision_keep, opts })
}

fn output_paths(opts: &ConvertOptions) -> Result<Vec<PathBuf>> {
    let out = &opts.output;
    let mut paths = vec![out.clone()];
    if opts.split {
        let stem = out.to_string_lossy();
        let stem = stem.strip_suffix(".gguf").unwrap_or(&stem);
        paths.push(PathBuf::from(format!("{stem}.mmproj.gguf")));
    }
    for p in &paths {
        let parent = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(ConvertError::Usage(format!("output directory {} does not exist", parent.display())));
        }
        if p.is_dir() {
            return Err(ConvertError::Usage(format!("output {} is a directory", p.display())));
        }
        if p.exists() && !opts.force {
            return Err(ConvertError::Usage(format!("output {} exists; pass --force to overwrite it", p.display())));
        }
    }
    Ok(paths)
}

/// Every source is present, a float tensor, and of the shape the config implies.
fn check_sources(tensors: &[OutTensor], inputs: &Inputs) -> Result<()> {
    for t in tensors {
        for s in &t.sources {
            let ck = match s.origin {
                Origin::Checkpoint => inputs.checkpoint,
                Origin::Tower => inputs.tower,
            };
            let err = |what: String| ConvertError::Tensor { path: ck.dir.display().to_string(), tensor: s.name.clone(), what };
            let (_, e) = ck.get(&s.name).ok_or_else(|| err(format!("is missing (needed for GGUF tensor '{}')", t.name)))?;
            if !e.dtype.is_weight_float() {
                return Err(err(format!("has dtype {:?}, expected F32, F16 or BF16", e.dtype)));
            }
            if e.shape != s.shape {
                return Err(err(format!("has shape {:?}, expected {:?} from the config", e.shape, s.shape)));
            }
        }
    }
    Ok(())
}

/// Name-table totality: every tensor of both inputs is either consumed or skipped for a stated reason.
fn account(
    tensors: &[OutTensor],
    inputs: &Inputs,
    llm: &LlmConfig,
    tower: &TowerConfig,
    keep: usize,
) -> Result<Vec<(String, String)>> {
    let used: BTreeSet<(Origin, &str)> =
        tensors.iter().flat_map(|t| t.sources.iter().map(|s| (s.origin, s.name.as_str()))).collect();
    let mut skipped = Vec::new();
    for (origin, ck) in [(Origin::Checkpoint, inputs.checkpoint), (Origin::Tower, inputs.tower)] {
        for name in ck.names() {
            if used.contains(&(origin, name)) {
                continue;
            }
            match name_map::skip_reason(name, origin, tower, keep) {
                Some(why) => skipped.push((name.to_string(), why)),
                None => {
                    return Err(ConvertError::Tensor {
                        path: ck.dir.display().to_string(),
                        tensor: name.to_string(),
                        what: format!(
                            "is not in the {} name table for this config (an unexpected layer, expert or module?)",
                            if origin == Origin::Tower { tower.kind.name() } else { llm.family.arch() }
                        ),
                    })
                }
            }
        }
    }
    Ok(skipped)
}

/// The type of every tensor under `plan`, with block-size fallbacks (and a summary of them).
pub fn assign_types(tensors: Vec<OutTensor>, plan: &QuantPlan) -> (Vec<Planned>, Vec<Fallback>) {
    let mut fb: BTreeMap<(TensorClass, QuantType, QuantType), usize> = BTreeMap::new();
    let planned = tensors
        .into_iter()
        .map(|t| {
            let want = plan.requested(&t);
            let got = plan::fit(want, t.row_len());
            if got != want {
                *fb.entry((t.class, want, got)).or_default() += 1;
            }
            Planned { tensor: t, qtype: got }
        })
        .collect();
    let fallbacks = fb.into_iter().map(|((class, from, to), tensors)| Fallback { class, from, to, tensors }).collect();
    (planned, fallbacks)
}

impl Conversion {
    fn inputs(&self) -> Inputs<'_> {
        Inputs { checkpoint: &self.checkpoint, tower: &self.tower_ckpt }
    }

    /// The safetensors file a source tensor is read from.
    pub fn source_file(&self, s: &name_map::Source) -> Option<&Path> {
        self.inputs().of(s.origin).get(&s.name).map(|(f, _)| f.path())
    }

    /// Bytes per tensor class, in the source and in the output.
    pub fn class_sizes(&self) -> BTreeMap<TensorClass, ClassSizes> {
        let inputs = self.inputs();
        let mut m: BTreeMap<TensorClass, ClassSizes> = BTreeMap::new();
        for p in &self.tensors {
            let c = m.entry(p.tensor.class).or_default();
            c.tensors += 1;
            c.before += write::source_bytes(&inputs, &p.tensor);
            c.after += p.out_bytes();
        }
        m
    }

    /// Total source bytes the conversion reads.
    pub fn input_bytes(&self) -> u64 {
        let inputs = self.inputs();
        self.tensors.iter().map(|p| write::source_bytes(&inputs, &p.tensor)).sum()
    }

    fn name(&self) -> String {
        let base = self.opts.input.canonicalize().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        base.unwrap_or_else(|| self.llm.model_type.clone())
    }

    fn metadata(&self, lm: bool, vision: bool) -> metadata::Kvs {
        let mut kvs = Vec::new();
        let arch = if lm { self.llm.family.arch() } else { "clip" };
        metadata::general(&mut kvs, arch, &self.name(), self.plan.file_type(self.llm.moe.is_some()));
        if lm {
            metadata::language_model(&mut kvs, &self.llm);
            metadata::tokenizer(&mut kvs, &self.vocab);
        }
        if vision {
            metadata::vision(&mut kvs, &self.llm, &self.tower, self.vision_keep, &self.tower.dir.display().to_string());
        }
        metadata::plan(&mut kvs, &self.plan);
        kvs
    }

    /// Writes the output file(s). On any error no output exists.
    pub fn run(&self, progress: &mut dyn FnMut(Progress)) -> Result<Vec<PathBuf>> {
        let inputs = self.inputs();
        let total = self.input_bytes();
        let mut done = 0u64;
        let is_vision = |p: &&Planned| matches!(p.tensor.class, TensorClass::Vision | TensorClass::Projector);
        if !self.opts.split {
            let all: Vec<Planned> = self.tensors.clone();
            write::write_gguf(&self.outputs[0], &self.metadata(true, true), &all, &inputs, progress, &mut done, total)?;
        } else {
            let lm: Vec<Planned> = self.tensors.iter().filter(|p| !is_vision(p)).cloned().collect();
            let mm: Vec<Planned> = self.tensors.iter().filter(is_vision).cloned().collect();
            write::write_gguf(&self.outputs[0], &self.metadata(true, false), &lm, &inputs, progress, &mut done, total)?;
            if let Err(e) =
                write::write_gguf(&self.outputs[1], &self.metadata(false, true), &mm, &inputs, progress, &mut done, total)
            {
                let _ = std::fs::remove_file(&self.outputs[0]);
                return Err(e);
            }
        }
        Ok(self.outputs.clone())
    }
}
