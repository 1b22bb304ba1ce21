//! The model's configuration, read from GGUF metadata alone (no config files at run time).
//! Keys: runtime/src/gguf/keys.rs. Errors name the missing key and the expected type.

use moellava_kernels::cpu::Activation;

use crate::error::{Result, RuntimeError};
use crate::gguf::keys::{clip, llm, moellava as mk, tokenizer as tk};
use crate::gguf::GgufMeta;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Parallel block: `x + attn(LN(x)) + ffn(LN(x))`, GELU(tanh) MLP with biases.
    Phi2,
    /// Sequential pre-LayerNorm block, SwiGLU MLP.
    StableLm,
    /// Sequential pre-RMSNorm block, SwiGLU MLP (SiLU on w2 = ffn_gate).
    Qwen,
}

impl Family {
    pub fn from_arch(arch: &str) -> Result<Family> {
        match arch {
            "phi2" => Ok(Family::Phi2),
            "stablelm" => Ok(Family::StableLm),
            "qwen" => Ok(Family::Qwen),
            other => Err(RuntimeError::Unsupported(format!(
                "general.architecture is '{other}'; moellava runs phi2, stablelm and qwen (MoE-LLaVA's backbones)"
            ))),
        }
    }

    pub fn arch(self) -> &'static str {
        match self {
            Family::Phi2 => "phi2",
            Family::StableLm => "stablelm",
            Family::Qwen => "qwen",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct LlmConfig {
    pub family: Family,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Width of each FFN matrix (Qwen: half of `qwen.feed_forward_length`, llama.cpp's convention).
    pub n_ff: usize,
    pub rope_dims: usize,
    pub rope_base: f32,
    pub norm_eps: f32,
    pub context_length: usize,
    /// Rows of the embedding and head: len(tokenizer).
    pub n_vocab: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub layers: Vec<usize>,
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub eval_capacity_factor: f32,
    pub min_capacity: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TowerKind {
    Clip,
    Siglip,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub tower: TowerKind,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden: usize,
    pub n_ff: usize,
    pub n_head: usize,
    /// Layers stored (the converter keeps those up to the select layer).
    pub n_layer: usize,
    pub eps: f32,
    pub act: Activation,
    /// select_feature "patch": drop the first output token (CLIP's class token; SigLIP's first patch).
    pub drop_first: bool,
    pub image_tokens: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub pad_color: [u8; 3],
}

impl VisionConfig {
    pub fn n_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

/// moellava/conversation.py's template (SeparatorStyle.TWO).
#[derive(Clone, Debug, PartialEq)]
pub struct ChatTemplate {
    pub system: String,
    pub roles: [String; 2],
    pub sep: String,
    pub sep2: String,
    pub image_token: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub llm: LlmConfig,
    pub moe: Option<MoeConfig>,
    pub vision: Option<VisionConfig>,
    pub chat: ChatTemplate,
}

fn f32_or(m: &GgufMeta, key: &str, default: f32) -> Result<f32> {
    if m.get(key).is_some() {
        Ok(m.get_f32(key)?)
    } else {
        Ok(default)
    }
}

impl ModelConfig {
    pub fn from_gguf(m: &GgufMeta) -> Result<ModelConfig> {
        let family = Family::from_arch(m.get_str(crate::gguf::keys::ARCHITECTURE)?)?;
        let a = family.arch();
        let k = |s: &str| llm::key(a, s);
        let n_embd = m.get_usize(&k(llm::EMBEDDING_LENGTH))?;
        let n_head = m.get_usize(&k(llm::HEAD_COUNT))?;
        let n_head_kv = if m.get(&k(llm::HEAD_COUNT_KV)).is_some() { m.get_usize(&k(llm::HEAD_COUNT_KV))? } else { n_head };
        if n_head == 0 || n_embd % n_head != 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(RuntimeError::Unsupported(format!(
                "{n_head} heads ({n_head_kv} KV heads) do not divide the {n_embd}-wide embedding"
            )));
        }
        let head_dim = n_embd / n_head;
        let ff = m.get_usize(&k(llm::FEED_FORWARD_LENGTH))?;
        let eps_key = if family == Family::Qwen { llm::LAYER_NORM_RMS_EPS } else { llm::LAYER_NORM_EPS };
        let tokens = m.get_array(tk::TOKENS)?.len();
        let n_vocab = if m.get(mk::TOKENIZER_LEN).is_some() { m.get_usize(mk::TOKENIZER_LEN)? } else { tokens };
        let rope_dims =
            if m.get(&k(llm::ROPE_DIMENSION_COUNT)).is_some() { m.get_usize(&k(llm::ROPE_DIMENSION_COUNT))? } else { head_dim };
        if rope_dims == 0 || rope_dims > head_dim || rope_dims % 2 != 0 {
            return Err(RuntimeError::Unsupported(format!(
                "{} is {rope_dims} for {head_dim}-dim heads",
                k(llm::ROPE_DIMENSION_COUNT)
            )));
        }
        let llm = LlmConfig {
            family,
            n_embd,
            n_layer: m.get_usize(&k(llm::BLOCK_COUNT))?,
            n_head,
            n_head_kv,
            head_dim,
            n_ff: if family == Family::Qwen { ff / 2 } else { ff },
            rope_dims,
            rope_base: f32_or(m, &k(llm::ROPE_FREQ_BASE), 10000.0)?,
            norm_eps: m.get_f32(&k(eps_key))?,
            context_length: m.get_usize(&k(llm::CONTEXT_LENGTH))?,
            n_vocab,
        };
        let moe = if m.get(mk::MOE_LAYERS).is_some() {
            if m.get(mk::USE_RESIDUAL).is_some() && m.get_bool(mk::USE_RESIDUAL)? {
                return Err(RuntimeError::Unsupported(format!(
                    "{} is true: PR-MoE residual experts are not supported",
                    mk::USE_RESIDUAL
                )));
            }
            let layers = m.get_usize_array(mk::MOE_LAYERS)?;
            if let Some(bad) = layers.iter().find(|l| **l >= llm.n_layer) {
                return Err(RuntimeError::Unsupported(format!(
                    "{} names layer {bad} of a {}-layer model",
                    mk::MOE_LAYERS,
                    llm.n_layer
                )));
            }
            let n_expert_used = m.get_usize(&k(llm::EXPERT_USED_COUNT))?;
            if n_expert_used != 2 {
                return Err(RuntimeError::Unsupported(format!(
                    "{} is {n_expert_used}; only top-2 gating is supported",
                    k(llm::EXPERT_USED_COUNT)
                )));
            }
            Some(MoeConfig {
                layers,
                n_expert: m.get_usize(&k(llm::EXPERT_COUNT))?,
                n_expert_used,
                eval_capacity_factor: f32_or(m, mk::EVAL_CAPACITY_FACTOR, 2.0)?,
                min_capacity: if m.get(mk::MIN_CAPACITY).is_some() { m.get_usize(mk::MIN_CAPACITY)? } else { 0 },
            })
        } else {
            None
        };
        let vision = if m.get(clip::HAS_VISION_ENCODER).is_some() && m.get_bool(clip::HAS_VISION_ENCODER)? {
            Some(vision_config(m)?)
        } else {
            None
        };
        let s = |key: &str, default: &str| m.get_str(key).map(str::to_string).unwrap_or_else(|_| default.to_string());
        let roles = m.get_str_array(mk::CHAT_ROLES).ok().filter(|r| r.len() == 2).map(|r| [r[0].clone(), r[1].clone()]);
        let chat = ChatTemplate {
            system: s(mk::CHAT_SYSTEM, ""),
            roles: roles.unwrap_or_else(|| ["USER".into(), "ASSISTANT".into()]),
            sep: s(mk::CHAT_SEP, " "),
            sep2: s(mk::CHAT_SEP2, "<|endoftext|>"),
            image_token: s(mk::CHAT_IMAGE_TOKEN, "<image>"),
        };
        Ok(ModelConfig { llm, moe, vision, chat })
    }
}

fn vision_config(m: &GgufMeta) -> Result<VisionConfig> {
    let tower = match m.get_str(mk::VISION_TOWER)? {
        "clip" => TowerKind::Clip,
        "siglip" => TowerKind::Siglip,
        other => return Err(RuntimeError::Unsupported(format!("{} is '{other}', expected clip or siglip", mk::VISION_TOWER))),
    };
    let act = match m.get_str(mk::VISION_HIDDEN_ACT)? {
        "quick_gelu" => Activation::QuickGelu,
        "gelu_pytorch_tanh" | "gelu_new" => Activation::GeluTanh,
        "gelu" => Activation::GeluErf,
        other => return Err(RuntimeError::Unsupported(format!("{} is '{other}'", mk::VISION_HIDDEN_ACT))),
    };
    let three = |key: &str| -> Result<[f32; 3]> {
        let v = m.get_f32_array(key)?;
        v.try_into().map_err(|v: Vec<f32>| RuntimeError::Unsupported(format!("{key} has {} values, expected 3", v.len())))
    };
    let pad = m.get_usize_array(mk::VISION_PAD_COLOR)?;
    if pad.len() != 3 || pad.iter().any(|c| *c > 255) {
        return Err(RuntimeError::Unsupported(format!("{} is {pad:?}, expected 3 bytes", mk::VISION_PAD_COLOR)));
    }
    let feature = m.get_str(mk::VISION_SELECT_FEATURE)?;
    let v = VisionConfig {
        tower,
        image_size: m.get_usize(clip::IMAGE_SIZE)?,
        patch_size: m.get_usize(clip::PATCH_SIZE)?,
        hidden: m.get_usize(clip::EMBEDDING_LENGTH)?,
        n_ff: m.get_usize(clip::FEED_FORWARD_LENGTH)?,
        n_head: m.get_usize(clip::HEAD_COUNT)?,
        n_layer: m.get_usize(clip::BLOCK_COUNT)?,
        eps: m.get_f32(clip::LAYER_NORM_EPS)?,
        act,
        drop_first: feature == "patch",
        image_tokens: m.get_usize(mk::VISION_IMAGE_TOKENS)?,
        mean: three(clip::IMAGE_MEAN)?,
        std: three(clip::IMAGE_STD)?,
        pad_color: [pad[0] as u8, pad[1] as u8, pad[2] as u8],
    };
    if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) || v.n_head == 0 || !v.hidden.is_multiple_of(v.n_head) {
        return Err(RuntimeError::Unsupported(format!(
            "vision geometry: image {} / patch {}, width {} / heads {}",
            v.image_size, v.patch_size, v.hidden, v.n_head
        )));
    }
    let expected = v.n_patches() + usize::from(tower == TowerKind::Clip) - usize::from(v.drop_first);
    if expected != v.image_tokens {
        return Err(RuntimeError::Unsupported(format!(
            "{} is {}, but the tower gives {expected}",
            mk::VISION_IMAGE_TOKENS,
            v.image_tokens
        )));
    }
    Ok(v)
}
