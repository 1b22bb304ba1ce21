//! GGUF metadata of a converted model: llama.cpp's keys where llama.cpp has one, `moellava.*` for the
//! rest (runtime/src/gguf/keys.rs lists and explains every key).

use moellava_runtime::gguf::keys::{self, clip, llm, moellava as mk, tokenizer as tk};
use moellava_runtime::gguf::{Array, Value};

use crate::hf_config::{Family, LlmConfig, TowerConfig, TowerKind};
use crate::plan::QuantPlan;
use crate::tokenizer::Vocab;

/// MoE-LLaVA's conversation template (moellava/conversation.py: conv_phi = conv_stablelm, and "qwen"
/// maps to conv_phi; SeparatorStyle.TWO).
pub const SYSTEM_PROMPT: &str = "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";

pub type Kvs = Vec<(String, Value)>;

fn kv(out: &mut Kvs, key: impl Into<String>, v: impl Into<Value>) {
    out.push((key.into(), v.into()));
}

/// Keys common to every file: architecture, name, file type.
pub fn general(out: &mut Kvs, arch: &str, name: &str, file_type: u32) {
    kv(out, keys::ARCHITECTURE, arch);
    kv(out, keys::NAME, name);
    kv(out, keys::FILE_TYPE, file_type);
    kv(out, keys::QUANTIZATION_VERSION, 2u32);
}

/// Language-model hyper-parameters and MoE facts.
pub fn language_model(out: &mut Kvs, c: &LlmConfig) {
    let a = c.family.arch();
    let k = |s: &str| llm::key(a, s);
    kv(out, k(llm::CONTEXT_LENGTH), c.context_length as u32);
    kv(out, k(llm::EMBEDDING_LENGTH), c.n_embd as u32);
    kv(out, k(llm::FEED_FORWARD_LENGTH), c.feed_forward_length as u32);
    kv(out, k(llm::BLOCK_COUNT), c.n_layer as u32);
    kv(out, k(llm::HEAD_COUNT), c.n_head as u32);
    kv(out, k(llm::HEAD_COUNT_KV), c.n_head_kv as u32);
    kv(out, k(llm::ROPE_DIMENSION_COUNT), c.rope_dims as u32);
    kv(out, k(llm::ROPE_FREQ_BASE), c.rope_base);
    let eps_key = if c.family == Family::Qwen { llm::LAYER_NORM_RMS_EPS } else { llm::LAYER_NORM_EPS };
    kv(out, k(eps_key), c.norm_eps);
    if let Some(m) = &c.moe {
        kv(out, k(llm::EXPERT_COUNT), m.n_expert as u32);
        kv(out, k(llm::EXPERT_USED_COUNT), m.top_k as u32);
        kv(out, mk::MOE_LAYERS, Array::U32(m.layers.iter().map(|l| *l as u32).collect()));
        kv(out, mk::EVAL_CAPACITY_FACTOR, m.eval_capacity_factor);
        kv(out, mk::MIN_CAPACITY, m.min_capacity);
        kv(out, mk::GATING, "deepspeed-0.9.5-top2");
        kv(out, mk::USE_RESIDUAL, false);
    }
    kv(out, mk::SOURCE_MODEL_TYPE, c.model_type.as_str());
}

/// Tokenizer (llama.cpp keys + what reproducing the original tokenizer needs) and the chat template.
pub fn tokenizer(out: &mut Kvs, v: &Vocab) {
    kv(out, tk::MODEL, "gpt2");
    kv(out, tk::PRE, v.pre);
    kv(out, tk::TOKENS, Array::String(v.tokens.clone()));
    kv(out, tk::TOKEN_TYPE, Array::I32(v.token_types.clone()));
    kv(out, tk::MERGES, Array::String(v.merges.clone()));
    kv(out, tk::EOS_ID, v.eos);
    if let Some(b) = v.bos {
        kv(out, tk::BOS_ID, b);
    }
    if let Some(p) = v.pad {
        kv(out, tk::PAD_ID, p);
    }
    kv(out, tk::ADD_BOS, false);
    kv(out, tk::ADD_EOS, false);
    kv(out, mk::TOKENIZER_LEN, v.len() as u32);
    kv(out, mk::TOKENIZER_NORMALIZER, v.normalizer);
    kv(out, mk::TOKENIZER_IGNORE_MERGES, v.ignore_merges);
    kv(out, mk::CHAT_SYSTEM, SYSTEM_PROMPT);
    kv(out, mk::CHAT_ROLES, Array::String(vec!["USER".into(), "ASSISTANT".into()]));
    kv(out, mk::CHAT_SEP, " ");
    kv(out, mk::CHAT_SEP2, "<|endoftext|>");
    kv(out, mk::CHAT_IMAGE_TOKEN, "<image>");
}

/// Vision tower, preprocessing and projector (llama.cpp `clip.*` keys + `moellava.vision.*`).
pub fn vision(out: &mut Kvs, c: &LlmConfig, t: &TowerConfig, kept_layers: usize, tower_source: &str) {
    kv(out, clip::HAS_VISION_ENCODER, true);
    kv(out, clip::HAS_LLAVA_PROJECTOR, true);
    kv(out, clip::PROJECTOR_TYPE, "mlp");
    kv(out, clip::USE_GELU, t.hidden_act != "quick_gelu");
    kv(out, clip::IMAGE_SIZE, t.image_size as u32);
    kv(out, clip::PATCH_SIZE, t.patch_size as u32);
    kv(out, clip::EMBEDDING_LENGTH, t.hidden as u32);
    kv(out, clip::FEED_FORWARD_LENGTH, t.n_ff as u32);
    kv(out, clip::PROJECTION_DIM, c.n_embd as u32);
    kv(out, clip::BLOCK_COUNT, kept_layers as u32);
    kv(out, clip::HEAD_COUNT, t.n_head as u32);
    kv(out, clip::LAYER_NORM_EPS, t.eps);
    kv(out, clip::IMAGE_MEAN, Array::F32(t.mean.to_vec()));
    kv(out, clip::IMAGE_STD, Array::F32(t.std.to_vec()));
    kv(out, mk::VISION_TOWER, t.kind.name());
    kv(out, mk::VISION_HIDDEN_ACT, t.hidden_act.as_str());
    kv(out, mk::VISION_SELECT_LAYER, c.mm.select_layer as i32);
    kv(out, mk::VISION_SOURCE_BLOCK_COUNT, t.n_layer as u32);
    kv(out, mk::VISION_SELECT_FEATURE, c.mm.select_feature.as_str());
    let tokens = t.n_patches() + usize::from(t.kind == TowerKind::Clip) - usize::from(c.mm.select_feature == "patch");
    kv(out, mk::VISION_IMAGE_TOKENS, tokens as u32);
    // expand2square's background: tuple(int(x * 255) for x in image_mean).
    kv(out, mk::VISION_PAD_COLOR, Array::U8(t.mean.iter().map(|m| (m * 255.0) as u8).collect()));
    kv(out, mk::VISION_ASPECT, c.mm.aspect_ratio.as_str());
    kv(out, mk::VISION_PREPROCESS, t.kind.name());
    kv(out, mk::PROJECTOR_TYPE, c.mm.projector_type.as_str());
    kv(out, mk::SOURCE_TOWER, tower_source);
}

pub fn plan(out: &mut Kvs, p: &QuantPlan) {
    kv(out, mk::QUANT_PLAN, p.to_string());
}
