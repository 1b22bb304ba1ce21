//! Every GGUF metadata key and tensor name moellava writes or reads, in one place.
//!
//! Language-model keys and tensor names are llama.cpp's (`{arch}.block_count`, `blk.N.attn_qkv.weight`,
//! …) so that llama.cpp and the `gguf` Python package read our files; vision keys are llama.cpp's
//! `clip.vision.*`; facts llama.cpp has no key for live under `moellava.*`.
//!
//! Conventions worth knowing (they mirror llama.cpp):
//! - `qwen.feed_forward_length` is Qwen's `intermediate_size`, the sum of the w1 and w2 widths; each
//!   FFN matrix is half of it wide.
//! - Tensor shapes in comments are row-major (outermost first), e.g. `[n_expert, n_ff, n_embd]`.

/// `general.*`.
pub const ARCHITECTURE: &str = "general.architecture";
pub const NAME: &str = "general.name";
pub const FILE_TYPE: &str = "general.file_type";
pub const QUANTIZATION_VERSION: &str = "general.quantization_version";

/// `{arch}.{suffix}` keys of the language model.
pub mod llm {
    pub const CONTEXT_LENGTH: &str = "context_length";
    pub const EMBEDDING_LENGTH: &str = "embedding_length";
    pub const FEED_FORWARD_LENGTH: &str = "feed_forward_length";
    pub const BLOCK_COUNT: &str = "block_count";
    pub const HEAD_COUNT: &str = "attention.head_count";
    pub const HEAD_COUNT_KV: &str = "attention.head_count_kv";
    pub const LAYER_NORM_EPS: &str = "attention.layer_norm_epsilon";
    pub const LAYER_NORM_RMS_EPS: &str = "attention.layer_norm_rms_epsilon";
    pub const ROPE_DIMENSION_COUNT: &str = "rope.dimension_count";
    pub const ROPE_FREQ_BASE: &str = "rope.freq_base";
    pub const EXPERT_COUNT: &str = "expert_count";
    pub const EXPERT_USED_COUNT: &str = "expert_used_count";
    pub const VOCAB_SIZE: &str = "vocab_size";

    /// `arch.suffix`.
    pub fn key(arch: &str, suffix: &str) -> String {
        format!("{arch}.{suffix}")
    }
}

/// Facts llama.cpp has no key for.
pub mod moellava {
    /// u32 array: indices of the MoE layers.
    pub const MOE_LAYERS: &str = "moellava.moe.layers";
    /// f32: DeepSpeed's eval_capacity_factor (capacity = ceil(T/E · 2·cf) for top-2).
    pub const EVAL_CAPACITY_FACTOR: &str = "moellava.moe.eval_capacity_factor";
    /// u32: DeepSpeed's min_capacity.
    pub const MIN_CAPACITY: &str = "moellava.moe.min_capacity";
    /// string: the reference gating ("deepspeed-0.9.5-top2": Gumbel second expert, renormalised pair).
    pub const GATING: &str = "moellava.moe.gating";
    /// bool: PR-MoE residual branch (always false in the releases; refused by the runtime if true).
    pub const USE_RESIDUAL: &str = "moellava.moe.use_residual";
    /// string: the Hugging Face `model_type` the file was converted from.
    pub const SOURCE_MODEL_TYPE: &str = "moellava.source.model_type";
    /// string: the vision tower the file was converted with (hub name or directory).
    pub const SOURCE_TOWER: &str = "moellava.source.vision_tower";
    /// string: per-class quant plan, e.g. "experts=q4_k dense=q8_0 …".
    pub const QUANT_PLAN: &str = "moellava.quant_plan";

    /// u32: len(tokenizer): logits and argmax are taken over the first this-many ids.
    pub const TOKENIZER_LEN: &str = "moellava.tokenizer.len";
    /// string: "nfc" (tiktoken families normalise input) or "none".
    pub const TOKENIZER_NORMALIZER: &str = "moellava.tokenizer.normalizer";
    /// bool: a pre-token that is itself a vocabulary entry is emitted whole (tiktoken's behaviour).
    pub const TOKENIZER_IGNORE_MERGES: &str = "moellava.tokenizer.ignore_merges";

    /// Conversation template (moellava/conversation.py, SeparatorStyle.TWO).
    pub const CHAT_SYSTEM: &str = "moellava.chat.system";
    pub const CHAT_ROLES: &str = "moellava.chat.roles";
    pub const CHAT_SEP: &str = "moellava.chat.sep";
    pub const CHAT_SEP2: &str = "moellava.chat.sep2";
    /// string: the placeholder the image features replace ("<image>").
    pub const CHAT_IMAGE_TOKEN: &str = "moellava.chat.image_token";

    /// string: "clip" | "siglip".
    pub const VISION_TOWER: &str = "moellava.vision.tower";
    /// string: the tower's activation ("quick_gelu" | "gelu_pytorch_tanh").
    pub const VISION_HIDDEN_ACT: &str = "moellava.vision.hidden_act";
    /// i32: mm_vision_select_layer as configured (-2); the file keeps the layers up to it, so the
    /// runtime uses the output of the last stored layer.
    pub const VISION_SELECT_LAYER: &str = "moellava.vision.select_layer";
    /// u32: layers of the source tower (before truncation at the select layer).
    pub const VISION_SOURCE_BLOCK_COUNT: &str = "moellava.vision.source_block_count";
    /// string: mm_vision_select_feature ("patch": drop the first token, "cls_patch": keep all).
    pub const VISION_SELECT_FEATURE: &str = "moellava.vision.select_feature";
    /// u32: image tokens spliced into the prompt per image.
    pub const VISION_IMAGE_TOKENS: &str = "moellava.vision.image_tokens";
    /// u8 array [3]: the pad-to-square background, int(255·mean) per channel.
    pub const VISION_PAD_COLOR: &str = "moellava.vision.pad_color";
    /// string: image_aspect_ratio ("pad").
    pub const VISION_ASPECT: &str = "moellava.vision.image_aspect_ratio";
    /// string: "clip" (resize shortest edge + centre crop) or "siglip" (resize to square).
    pub const VISION_PREPROCESS: &str = "moellava.vision.preprocess";
    /// string: image_projector_type ("mlp2x_gelu").
    pub const PROJECTOR_TYPE: &str = "moellava.projector.type";
}

/// llama.cpp's `clip.*` keys (tools/mtmd).
pub mod clip {
    pub const HAS_VISION_ENCODER: &str = "clip.has_vision_encoder";
    pub const HAS_LLAVA_PROJECTOR: &str = "clip.has_llava_projector";
    pub const PROJECTOR_TYPE: &str = "clip.projector_type";
    pub const USE_GELU: &str = "clip.use_gelu";
    pub const IMAGE_SIZE: &str = "clip.vision.image_size";
    pub const PATCH_SIZE: &str = "clip.vision.patch_size";
    pub const EMBEDDING_LENGTH: &str = "clip.vision.embedding_length";
    pub const FEED_FORWARD_LENGTH: &str = "clip.vision.feed_forward_length";
    pub const PROJECTION_DIM: &str = "clip.vision.projection_dim";
    pub const BLOCK_COUNT: &str = "clip.vision.block_count";
    pub const HEAD_COUNT: &str = "clip.vision.attention.head_count";
    pub const LAYER_NORM_EPS: &str = "clip.vision.attention.layer_norm_epsilon";
    pub const IMAGE_MEAN: &str = "clip.vision.image_mean";
    pub const IMAGE_STD: &str = "clip.vision.image_std";
}

/// llama.cpp's `tokenizer.ggml.*` keys.
pub mod tokenizer {
    pub const MODEL: &str = "tokenizer.ggml.model";
    pub const PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const MERGES: &str = "tokenizer.ggml.merges";
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    pub const PAD_ID: &str = "tokenizer.ggml.padding_token_id";
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";

    /// llama.cpp's token types.
    pub const TYPE_NORMAL: i32 = 1;
    pub const TYPE_CONTROL: i32 = 3;
    pub const TYPE_USER_DEFINED: i32 = 4;
    pub const TYPE_UNUSED: i32 = 5;
}

/// GGUF tensor names (llama.cpp's).
pub mod tensors {
    pub const TOKEN_EMBD: &str = "token_embd.weight";
    pub const OUTPUT: &str = "output.weight";
    pub const OUTPUT_BIAS: &str = "output.bias";
    pub const OUTPUT_NORM: &str = "output_norm";

    /// `blk.{layer}.{part}`, e.g. `blk(3, "attn_qkv.weight")`.
    pub fn blk(layer: usize, part: &str) -> String {
        format!("blk.{layer}.{part}")
    }

    /// `v.blk.{layer}.{part}`.
    pub fn vblk(layer: usize, part: &str) -> String {
        format!("v.blk.{layer}.{part}")
    }

    pub const V_PATCH_EMBD: &str = "v.patch_embd";
    pub const V_CLASS_EMBD: &str = "v.class_embd";
    pub const V_POSITION_EMBD: &str = "v.position_embd.weight";
    pub const V_PRE_LN: &str = "v.pre_ln";
    pub const MM_0: &str = "mm.0";
    pub const MM_2: &str = "mm.2";
}
