//! config.json of a MoE-LLaVA (or stage-2 dense LLaVA) checkpoint, and of its vision tower.
//!
//! Field names and defaults follow the upstream config classes (moellava-spec.md §2): HF 4.37's
//! `PhiConfig`, StableLM's `StableLMEpochConfig`, Qwen's `QWenConfig`, the `moe` dict written by
//! `initialize_moe_modules`, and transformers' `CLIPVisionConfig` / `SiglipVisionConfig`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{file_err, ConvertError, Result};

/// The three released backbones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Phi2,
    StableLm,
    Qwen,
}

impl Family {
    /// llama.cpp's architecture name (`general.architecture`).
    pub fn arch(self) -> &'static str {
        match self {
            Family::Phi2 => "phi2",
            Family::StableLm => "stablelm",
            Family::Qwen => "qwen",
        }
    }

    const MODEL_TYPES: [(&'static str, Family, bool); 6] = [
        ("moe_llava_phi", Family::Phi2, true),
        ("moe_llava_stablelm", Family::StableLm, true),
        ("moe_llava_qwen", Family::Qwen, true),
        ("llava_phi", Family::Phi2, false),
        ("llava_stablelm", Family::StableLm, false),
        ("llava_qwen", Family::Qwen, false),
    ];
}

#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub layers: Vec<usize>,
    pub n_expert: usize,
    pub top_k: usize,
    pub eval_capacity_factor: f32,
    pub min_capacity: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MmConfig {
    pub image_tower: String,
    pub mm_hidden: usize,
    pub select_layer: i64,
    pub select_feature: String,
    pub projector_type: String,
    pub aspect_ratio: String,
}

/// Everything about the language model the converter needs.
#[derive(Clone, Debug, PartialEq)]
pub struct LlmConfig {
    pub family: Family,
    pub model_type: String,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Width of each FFN matrix (Qwen: intermediate_size / 2).
    pub n_ff: usize,
    /// The value llama.cpp stores as `feed_forward_length` (Qwen: the full intermediate_size).
    pub feed_forward_length: usize,
    pub rope_dims: usize,
    pub rope_base: f32,
    pub norm_eps: f32,
    pub context_length: usize,
    /// Rows of the embedding / lm_head in the checkpoint (config vocab_size).
    pub vocab_rows: usize,
    pub qkv_bias: bool,
    pub moe: Option<MoeConfig>,
    pub mm: MmConfig,
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| file_err(path, format!("is not valid JSON: {e}")))
}

/// Typed access to a config object, with errors naming the file and key.
pub(crate) struct Fields<'a> {
    pub path: &'a Path,
    pub obj: &'a Value,
}

impl Fields<'_> {
    fn err(&self, key: &str, what: impl Into<String>) -> ConvertError {
        ConvertError::Config { path: self.path.display().to_string(), key: key.to_string(), what: what.into() }
    }

    pub fn opt(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.opt(key).ok_or_else(|| self.err(key, "is missing"))?;
        v.as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .filter(|x| *x > 0)
            .ok_or_else(|| self.err(key, format!("is {v}, expected a positive integer")))
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.opt(key).is_some() {
            self.usize(key)
        } else {
            Ok(default)
        }
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.opt(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(key, format!("is {v}, expected a number"))),
        }
    }

    pub fn str_or(&self, key: &str, default: &str) -> Result<String> {
        match self.opt(key) {
            None => Ok(default.to_string()),
            Some(v) => v.as_str().map(str::to_string).ok_or_else(|| self.err(key, format!("is {v}, expected a string"))),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.opt(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(key, format!("is {v}, expected true or false"))),
        }
    }
}

impl LlmConfig {
    /// Reads and validates `dir/config.json`.
    pub fn load(dir: &Path) -> Result<LlmConfig> {
        let path = dir.join("config.json");
        if !path.exists() {
            return Err(file_err(&path, "missing: not a Hugging Face checkpoint directory"));
        }
        let json = read_json(&path)?;
        if !json.is_object() {
            return Err(file_err(&path, "is not a JSON object"));
        }
        let f = Fields { path: &path, obj: &json };
        let model_type = f.str_or("model_type", "")?;
        let known: Vec<&str> = Family::MODEL_TYPES.iter().map(|t| t.0).collect();
        let &(_, family, is_moe) = Family::MODEL_TYPES.iter().find(|t| t.0 == model_type).ok_or_else(|| {
            f.err(
                "model_type",
                format!("is '{model_type}', an architecture moellava does not convert (expected one of {})", known.join(", ")),
            )
        })?;
        let n_embd = f.usize("hidden_size")?;
        let n_layer = f.usize("num_hidden_layers")?;
        let n_head = f.usize("num_attention_heads")?;
        if n_embd % n_head != 0 {
            return Err(f.err("num_attention_heads", format!("is {n_head}, which does not divide hidden_size {n_embd}")));
        }
        let mut c = LlmConfig {
            family,
            model_type: model_type.clone(),
            n_embd,
            n_layer,
            n_head,
            n_head_kv: n_head,
            head_dim: n_embd / n_head,
            n_ff: f.usize("intermediate_size")?,
            feed_forward_length: f.usize("intermediate_size")?,
            rope_dims: 0,
            rope_base: 10000.0,
            norm_eps: 1e-5,
            context_length: f.usize_or("max_position_embeddings", 2048)?,
            vocab_rows: f.usize("vocab_size")?,
            qkv_bias: true,
            moe: None,
            mm: mm_config(&f)?,
        };
        match family {
            Family::Phi2 => {
                c.n_head_kv = f.usize_or("num_key_value_heads", n_head)?;
                c.rope_dims = (f.f64_or("partial_rotary_factor", 0.5)? * c.head_dim as f64) as usize;
                c.rope_base = f.f64_or("rope_theta", 10000.0)? as f32;
                c.norm_eps = f.f64_or("layer_norm_eps", 1e-5)? as f32;
                if f.bool_or("qk_layernorm", false)? {
                    return Err(f.err("qk_layernorm", "is true; Phi-2 with QK layer norms is not supported"));
                }
            }
            Family::StableLm => {
                c.n_head_kv = f.usize_or("num_key_value_heads", n_head)?;
                c.rope_dims = (c.head_dim as f64 * f.f64_or("rope_pct", 0.25)?) as usize;
                c.rope_base = f.f64_or("rope_theta", 10000.0)? as f32;
                c.norm_eps = f.f64_or("norm_eps", 1e-5)? as f32;
                c.qkv_bias = f.bool_or("use_qkv_bias", true)?;
            }
            Family::Qwen => {
                let kv_channels = f.usize_or("kv_channels", c.head_dim)?;
                if kv_channels != c.head_dim {
                    return Err(f.err(
                        "kv_channels",
                        format!("is {kv_channels}, expected hidden_size / num_attention_heads = {}", c.head_dim),
                    ));
                }
                if !c.n_ff.is_multiple_of(2) {
                    return Err(
                        f.err("intermediate_size", format!("is {}, expected an even number (w1 and w2 are half each)", c.n_ff))
                    );
                }
                c.n_ff /= 2;
                let pct = f.f64_or("rotary_pct", 1.0)?;
                c.rope_dims = if pct == 1.0 { kv_channels } else { (c.head_dim as f64 * pct) as usize };
                c.rope_base = f.f64_or("rotary_emb_base", 10000.0)? as f32;
                c.norm_eps = f.f64_or("layer_norm_epsilon", 1e-6)? as f32;
            }
        }
        if !c.n_head.is_multiple_of(c.n_head_kv) {
            return Err(f.err(
                "num_key_value_heads",
                format!("is {}, which does not divide num_attention_heads {}", c.n_head_kv, c.n_head),
            ));
        }
        if c.rope_dims == 0 || c.rope_dims > c.head_dim || !c.rope_dims.is_multiple_of(2) {
            return Err(f.err(
                "rotary fraction",
                format!(
                    "gives {} rotary dims of a {}-dim head, expected an even number in 2..={}",
                    c.rope_dims, c.head_dim, c.head_dim
                ),
            ));
        }
        if is_moe {
            c.moe = Some(moe_config(&f, n_layer)?);
        } else if f.opt("moe").and_then(|m| m.get("moe_enable")).and_then(Value::as_bool) == Some(true) {
            return Err(f.err("moe.moe_enable", format!("is true but model_type '{model_type}' is a dense LLaVA")));
        }
        Ok(c)
    }
}

fn mm_config(f: &Fields) -> Result<MmConfig> {
    let image_tower = match f.opt("mm_image_tower").or_else(|| f.opt("mm_vision_tower")) {
        Some(Value::String(s)) => s.clone(),
        Some(v) => return Err(f.err("mm_image_tower", format!("is {v}, expected a string"))),
        None => return Err(f.err("mm_image_tower", "is missing: not a LLaVA checkpoint with an image tower")),
    };
    let projector_type = match f.opt("image_projector_type").or_else(|| f.opt("mm_projector_type")) {
        Some(v) => {
            v.as_str().map(str::to_string).ok_or_else(|| f.err("image_projector_type", format!("is {v}, expected a string")))?
        }
        None => "mlp2x_gelu".to_string(),
    };
    if projector_type != "mlp2x_gelu" {
        return Err(f.err("image_projector_type", format!("is '{projector_type}', only 'mlp2x_gelu' is supported")));
    }
    let select_feature = f.str_or("mm_vision_select_feature", "patch")?;
    if select_feature != "patch" && select_feature != "cls_patch" {
        return Err(f.err("mm_vision_select_feature", format!("is '{select_feature}', expected 'patch' or 'cls_patch'")));
    }
    let aspect_ratio = f.str_or("image_aspect_ratio", "pad")?;
    if aspect_ratio != "pad" {
        return Err(f.err("image_aspect_ratio", format!("is '{aspect_ratio}', only 'pad' is supported")));
    }
    let select_layer = match f.opt("mm_vision_select_layer") {
        None => -2,
        Some(v) => v.as_i64().ok_or_else(|| f.err("mm_vision_select_layer", format!("is {v}, expected an integer")))?,
    };
    Ok(MmConfig {
        image_tower,
        mm_hidden: f.usize("mm_hidden_size")?,
        select_layer,
        select_feature,
        projector_type,
        aspect_ratio,
    })
}

fn moe_config(f: &Fields, n_layer: usize) -> Result<MoeConfig> {
    let moe = f.opt("moe").ok_or_else(|| f.err("moe", "is missing from a MoE checkpoint"))?;
    let m = Fields { path: f.path, obj: moe };
    let key = |k: &str| format!("moe.{k}");
    let err = |k: &str, what: String| ConvertError::Config { path: f.path.display().to_string(), key: key(k), what };
    if !m.bool_or("moe_enable", true)? {
        return Err(err("moe_enable", "is false in a MoE checkpoint".into()));
    }
    let layers: Vec<usize> = match m.opt("moe_layers_idx") {
        Some(Value::Array(a)) => a.iter().map(|v| v.as_u64().map(|x| x as usize)).collect::<Option<_>>().ok_or_else(|| {
            err("moe_layers_idx", format!("is {moe}, expected a list of layer indices", moe = Value::Array(a.clone())))
        })?,
        Some(v) => return Err(err("moe_layers_idx", format!("is {v}, expected a list"))),
        None => match m.str_or("moe_mode", "sparse")?.as_str() {
            "sparse" => (0..n_layer).step_by(2).collect(),
            "dense" => (0..n_layer).collect(),
            "first_half" => (0..n_layer / 2).collect(),
            "second_half" => (n_layer / 2..n_layer).collect(),
            other => return Err(err("moe_mode", format!("is '{other}', expected sparse, dense, first_half or second_half"))),
        },
    };
    if layers.is_empty() {
        return Err(err("moe_layers_idx", "is empty".into()));
    }
    if let Some(bad) = layers.iter().find(|l| **l >= n_layer) {
        return Err(err("moe_layers_idx", format!("has layer {bad}, out of range for num_hidden_layers {n_layer}")));
    }
    let mut sorted = layers.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != layers.len() {
        return Err(err("moe_layers_idx", format!("{layers:?} repeats a layer")));
    }
    let experts: Vec<usize> = match m.opt("num_experts") {
        Some(Value::Array(a)) => a.iter().map(|v| v.as_u64().map(|x| x as usize)).collect::<Option<_>>().unwrap_or_default(),
        Some(Value::Number(n)) => vec![n.as_u64().unwrap_or(0) as usize; layers.len()],
        _ => return Err(err("num_experts", "is missing".into())),
    };
    if experts.len() != layers.len() {
        return Err(err("num_experts", format!("lists {} entries for {} MoE layers {layers:?}", experts.len(), layers.len())));
    }
    let n_expert = experts[0];
    if n_expert < 2 || experts.iter().any(|e| *e != n_expert) {
        return Err(err("num_experts", format!("is {experts:?}; expected the same count (at least 2) on every MoE layer")));
    }
    let top_k = m.usize_or("top_k_experts", 2)?;
    if top_k != 2 {
        return Err(err("top_k_experts", format!("is {top_k}; only top-2 gating (DeepSpeed top2gating) is supported")));
    }
    if m.bool_or("use_residual", false)? {
        return Err(err("use_residual", "is true; PR-MoE residual experts are not supported".into()));
    }
    let min_capacity = m.f64_or("min_capacity", 0.0)?;
    Ok(MoeConfig {
        layers: sorted,
        n_expert,
        top_k,
        eval_capacity_factor: m.f64_or("eval_capacity_factor", 1.0)? as f32,
        min_capacity: min_capacity.max(0.0) as u32,
    })
}

/// CLIP or SigLIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TowerKind {
    Clip,
    Siglip,
}

impl TowerKind {
    pub fn name(self) -> &'static str {
        match self {
            TowerKind::Clip => "clip",
            TowerKind::Siglip => "siglip",
        }
    }
}

/// The vision tower's architecture and preprocessing.
#[derive(Clone, Debug, PartialEq)]
pub struct TowerConfig {
    pub dir: PathBuf,
    pub kind: TowerKind,
    pub hidden: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_layer: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub eps: f32,
    pub hidden_act: String,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl TowerConfig {
    pub fn n_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Reads `dir/config.json` (+ `preprocessor_config.json`) of a CLIPModel, CLIPVisionModel,
    /// SiglipModel or SiglipVisionModel.
    pub fn load(dir: &Path) -> Result<TowerConfig> {
        let path = dir.join("config.json");
        let json = read_json(&path)?;
        let top = Fields { path: &path, obj: &json };
        let model_type = top.str_or("model_type", "")?;
        let (kind, vision) = match model_type.as_str() {
            "clip" => (TowerKind::Clip, json.get("vision_config").cloned().unwrap_or(Value::Null)),
            "clip_vision_model" => (TowerKind::Clip, json.clone()),
            "siglip" => (TowerKind::Siglip, json.get("vision_config").cloned().unwrap_or(Value::Null)),
            "siglip_vision_model" => (TowerKind::Siglip, json.clone()),
            other => {
                return Err(ConvertError::Tower(format!(
                    "{}: model_type '{other}' is not a vision tower (expected a CLIPModel, CLIPVisionModel, SiglipModel or SiglipVisionModel)",
                    path.display()
                )))
            }
        };
        let v = Fields { path: &path, obj: &vision };
        // transformers' CLIPVisionConfig / SiglipVisionConfig defaults.
        let (d_hidden, d_ff, d_layers, d_heads, d_image, d_patch, d_act, d_eps) = match kind {
            TowerKind::Clip => (768, 3072, 12, 12, 224, 32, "quick_gelu", 1e-5),
            TowerKind::Siglip => (768, 3072, 12, 12, 224, 16, "gelu_pytorch_tanh", 1e-6),
        };
        let mut t = TowerConfig {
            dir: dir.to_path_buf(),
            kind,
            hidden: v.usize_or("hidden_size", d_hidden)?,
            n_ff: v.usize_or("intermediate_size", d_ff)?,
            n_head: v.usize_or("num_attention_heads", d_heads)?,
            n_layer: v.usize_or("num_hidden_layers", d_layers)?,
            image_size: v.usize_or("image_size", d_image)?,
            patch_size: v.usize_or("patch_size", d_patch)?,
            eps: v.f64_or("layer_norm_eps", d_eps)? as f32,
            hidden_act: v.str_or("hidden_act", d_act)?,
            mean: match kind {
                TowerKind::Clip => [0.481_454_66, 0.457_827_5, 0.408_210_73],
                TowerKind::Siglip => [0.5; 3],
            },
            std: match kind {
                TowerKind::Clip => [0.268_629_54, 0.261_302_6, 0.275_777_1],
                TowerKind::Siglip => [0.5; 3],
            },
        };
        if !t.image_size.is_multiple_of(t.patch_size) || !t.hidden.is_multiple_of(t.n_head) {
            return Err(ConvertError::Tower(format!(
                "{}: image_size {} / patch_size {} or hidden_size {} / heads {} do not divide",
                path.display(),
                t.image_size,
                t.patch_size,
                t.hidden,
                t.n_head
            )));
        }
        let pre_path = dir.join("preprocessor_config.json");
        if pre_path.exists() {
            let pre = read_json(&pre_path)?;
            let p = Fields { path: &pre_path, obj: &pre };
            for (key, dst) in [("image_mean", &mut t.mean), ("image_std", &mut t.std)] {
                if let Some(v) = p.opt(key) {
                    let vals: Option<Vec<f32>> =
                        v.as_array().map(|a| a.iter().filter_map(|x| x.as_f64().map(|x| x as f32)).collect());
                    match vals {
                        Some(vals) if vals.len() == 3 => dst.copy_from_slice(&vals),
                        _ => return Err(p.err(key, format!("is {v}, expected 3 numbers"))),
                    }
                }
            }
        }
        Ok(t)
    }
}

/// Finds the tower directory: `--vision-tower`, else `mm_image_tower` as a path, relative to the
/// checkpoint's parent, or in the Hugging Face cache. The error lists every place tried.
pub fn locate_tower(explicit: Option<&Path>, mm_image_tower: &str, checkpoint: &Path) -> Result<PathBuf> {
    if let Some(dir) = explicit {
        if dir.join("config.json").is_file() {
            return Ok(dir.to_path_buf());
        }
        return Err(ConvertError::Tower(format!(
            "--vision-tower {}: no config.json there (is it a CLIP/SigLIP model directory?)",
            dir.display()
        )));
    }
    let mut tried: Vec<PathBuf> = vec![PathBuf::from(mm_image_tower)];
    if let Some(parent) = checkpoint.canonicalize().ok().and_then(|c| c.parent().map(Path::to_path_buf)) {
        tried.push(parent.join(mm_image_tower));
    }
    if let Some((org, name)) = mm_image_tower.split_once('/') {
        for hub in hf_hub_dirs() {
            let repo = hub.join(format!("models--{org}--{name}"));
            let snapshots = repo.join("snapshots");
            let from_ref = std::fs::read_to_string(repo.join("refs/main")).ok().map(|r| snapshots.join(r.trim()));
            let mut listed: Vec<PathBuf> =
                std::fs::read_dir(&snapshots).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
            listed.sort();
            let found = from_ref.iter().chain(listed.iter().rev()).find(|p| p.join("config.json").is_file()).cloned();
            tried.push(found.unwrap_or(snapshots.join("*")));
        }
    }
    if let Some(hit) = tried.iter().find(|p| p.join("config.json").is_file()) {
        return Ok(hit.clone());
    }
    let list: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    Err(ConvertError::Tower(format!(
        "vision tower '{mm_image_tower}' (config.json mm_image_tower) not found; tried: {}; pass --vision-tower DIR",
        list.join(", ")
    )))
}

/// `$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub` (huggingface_hub's order).
fn hf_hub_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(c) = std::env::var_os("HF_HUB_CACHE").or_else(|| std::env::var_os("HUGGINGFACE_HUB_CACHE")) {
        v.push(PathBuf::from(c));
    }
    if let Some(h) = std::env::var_os("HF_HOME") {
        v.push(PathBuf::from(h).join("hub"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        v.push(PathBuf::from(home).join(".cache/huggingface/hub"));
    }
    v
}
