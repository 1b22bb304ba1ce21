//! The name tables: Hugging Face tensor name → GGUF tensor, per family, with the tensor class, the
//! expected source shape and how sources combine. Used in both directions: [`plan`] turns a config into
//! the list of GGUF tensors with their sources (what the runtime needs → what the checkpoint must hold),
//! and [`skip_reason`] says why a checkpoint tensor that nothing consumes is left out (or that it is unknown).
//!
//! Combinations (the only transforms):
//! - `QkvPart(i)`: q, k, v (weights or biases) concatenated along rows into `attn_qkv` (llama.cpp accepts
//!   the fused form for all three architectures; the runtime does one matmul).
//! - `Expert`: the experts of one MoE layer stacked into `[n_expert, rows, cols]`, so expert e is one
//!   contiguous byte range (the unit the expert cache loads).
//! - `TruncVocab`: embedding / lm_head rows cut to len(tokenizer) (builder.py resizes to it; spec §0.5).

use moellava_runtime::tensor_class::TensorClass;

use crate::hf_config::{Family, LlmConfig, TowerConfig, TowerKind};

/// Symbolic dimensions of expected shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    VocabRows,
    Embd,
    Ff,
    KvDim,
    Qkv3,
    NExpert,
    MmHidden,
    VHidden,
    VFf,
    VPos,
    VPatch,
    Three,
    One,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Plain,
    TruncVocab,
    QkvPart(u8),
    Expert,
}

/// How a tensor may be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A weight matrix: stored at its class's quant type.
    Matrix,
    /// Norm weights and biases: always f32.
    Vector,
    /// Tables added to activations (position/class/patch embeddings of the tower): float types only.
    Table,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Global,
    Layer,
    DenseLayer,
    MoeLayer,
    /// Per MoE layer and expert (`{E}` in the template).
    Expert,
    /// Per kept vision layer.
    VisionLayer,
}

#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub hf: &'static str,
    pub gguf: &'static str,
    pub class: TensorClass,
    pub kind: Kind,
    pub scope: Scope,
    pub role: Role,
    pub shape: &'static [Dim],
}

const fn r(
    hf: &'static str,
    gguf: &'static str,
    class: TensorClass,
    kind: Kind,
    scope: Scope,
    role: Role,
    shape: &'static [Dim],
) -> Rule {
    Rule { hf, gguf, class, kind, scope, role, shape }
}

use Dim::*;
use Kind::{Matrix, Table, Vector};
use Role::{Expert as Ex, Plain, QkvPart, TruncVocab};
use Scope::{DenseLayer as DL, Expert as ES, Global as G, Layer as L, MoeLayer as ML, VisionLayer as VL};
use TensorClass as C;

pub const PHI2: &[Rule] = &[
    r("model.embed_tokens.weight", "token_embd.weight", C::Embeddings, Matrix, G, TruncVocab, &[VocabRows, Embd]),
    r("model.layers.{L}.input_layernorm.weight", "blk.{L}.attn_norm.weight", C::Norms, Vector, L, Plain, &[Embd]),
    r("model.layers.{L}.input_layernorm.bias", "blk.{L}.attn_norm.bias", C::Norms, Vector, L, Plain, &[Embd]),
    r("model.layers.{L}.self_attn.q_proj.weight", "blk.{L}.attn_qkv.weight", C::Attention, Matrix, L, QkvPart(0), &[Embd, Embd]),
    r("model.layers.{L}.self_attn.k_proj.weight", "blk.{L}.attn_qkv.weight", C::Attention, Matrix, L, QkvPart(1), &[KvDim, Embd]),
    r("model.layers.{L}.self_attn.v_proj.weight", "blk.{L}.attn_qkv.weight", C::Attention, Matrix, L, QkvPart(2), &[KvDim, Embd]),
    r("model.layers.{L}.self_attn.q_proj.bias", "blk.{L}.attn_qkv.bias", C::Attention, Vector, L, QkvPart(0), &[Embd]),
    r("model.layers.{L}.self_attn.k_proj.bias", "blk.{L}.attn_qkv.bias", C::Attention, Vector, L, QkvPart(1), &[KvDim]),
    r("model.layers.{L}.self_attn.v_proj.bias", "blk.{L}.attn_qkv.bias", C::Attention, Vector, L, QkvPart(2), &[KvDim]),
    r("model.layers.{L}.self_attn.dense.weight", "blk.{L}.attn_output.weight", C::Attention, Matrix, L, Plain, &[Embd, Embd]),
    r("model.layers.{L}.self_attn.dense.bias", "blk.{L}.attn_output.bias", C::Attention, Vector, L, Plain, &[Embd]),
    r("model.layers.{L}.mlp.fc1.weight", "blk.{L}.ffn_up.weight", C::DenseFfn, Matrix, DL, Plain, &[Ff, Embd]),
    r("model.layers.{L}.mlp.fc1.bias", "blk.{L}.ffn_up.bias", C::DenseFfn, Vector, DL, Plain, &[Ff]),
    r("model.layers.{L}.mlp.fc2.weight", "blk.{L}.ffn_down.weight", C::DenseFfn, Matrix, DL, Plain, &[Embd, Ff]),
    r("model.layers.{L}.mlp.fc2.bias", "blk.{L}.ffn_down.bias", C::DenseFfn, Vector, DL, Plain, &[Embd]),
    r(
        "model.layers.{L}.mlp.deepspeed_moe.gate.wg.weight",
        "blk.{L}.ffn_gate_inp.weight",
        C::Router,
        Matrix,
        ML,
        Plain,
        &[NExpert, Embd],
    ),
    r(
        "model.layers.{L}.mlp.deepspeed_moe.experts.deepspeed_experts.{E}.fc1.weight",
        "blk.{L}.ffn_up_exps.weight",
        C::Experts,
        Matrix,
        ES,
        Ex,
        &[Ff, Embd],
    ),
    r(
        "model.layers.{L}.mlp.deepspeed_moe.experts.deepspeed_experts.{E}.fc1.bias",
        "blk.{L}.ffn_up_exps.bias",
        C::Experts,
        Vector,
        ES,
        Ex,
        &[Ff],
    ),
    r(
        "model.layers.{L}.mlp.deepspeed_moe.experts.deepspeed_experts.{E}.fc2.weight",
        "blk.{L}.ffn_down_exps.weight",
        C::Experts,
        Matrix,
        ES,
        Ex,
        &[Embd, Ff],
    ),
    r(
        "model.layers.{L}.mlp.deepspeed_moe.experts.deepspeed_experts.{E}.fc2.bias",
        "blk.{L}.ffn_down_exps.bias",
        C::Experts,
        Vector,
        ES,
        Ex,
        &[Embd],
    ),
    r("model.final_layernorm.weight", "output_norm.weight", C::Norms, Vector, G, Plain, &[Embd]),
    r("model.final_layernorm.bias", "output_norm.bias", C::Norms, Vector, G, Plain, &[Embd]),
    r("lm_head.weight", "output.weight", C::Embeddings, Matrix, G, TruncVocab, &[VocabRows, Embd]),
    r("model.mm_projector.image_spatial_proj.0.weight", "mm.0.weight", C::Projector, Matrix, G, Plain, &[Embd, MmHidden]),
    r("model.mm_projector.image_spatial_proj.0.bias", "mm.0.bias", C::Projector, Vector, G, Plain, &[Embd]),
    r("model.mm_projector.image_spatial_proj.2.weight", "mm.2.weight", C::Projector, Matrix, G, Plain, &[Embd, Embd]),
    r("model.mm_projector.image_spatial_proj.2.bias", "mm.2.bias", C::Projector, Vector, G, Plain, &[Embd]),
];

pub const STABLELM: &[Rule] = &[
    r("model.embed_tokens.weight", "token_embd.weight", C::Embeddings, Matrix, G, TruncVocab, &[VocabRows, Embd]),
    r("model.layers.{L}.input_layernorm.weight", "blk.{L}.attn_norm.weight", C::Norms, Vector, L, Plain, &[Embd]),
    r("model.layers.{L}.input_layernorm.bias", "blk.{L}.attn_norm.bias", C::Norms, Vector, L, Plain, &[Embd]),
    r("model.layers.{L}.self_attn.q_proj.weight", "blk.{L}.attn_qkv.weight", C::Attention, Matrix, L, QkvPart(0), &[Embd, Embd]),
    r("model.layers.{L}.self_attn.k_proj.weight", "blk.{L}.attn_qkv.weight", C::Attention, Matrix, L, QkvPart(1), &[KvDim, Embd]),
    r("model.layers.{L}.self_attn.v_proj.weight", "blk.{L}.attn_qkv.weight", C::Attention, Matrix, L, QkvPart(2), &[KvDim, Embd]),
    r("model.layers.{L}.self_attn.q_proj.bias", "blk.{L}.attn_qkv.bias", C::Attention, Vector, L, QkvPart(0), &[Embd]),
    r("model.layers.{L}.self_attn.k_proj.bias", "blk.{L}.attn_qkv.bias", C::Attention, Vector, L, QkvPart(1), &[KvDim]),
    r("model.layers.{L}.self_attn.v_proj.bias", "blk.{L}.attn_qkv.bias", C::Attention, Vector, L, QkvPart(2), &[KvDim]),
    r("model.layers.{L}.self_attn.o_proj.weight", "blk.{L}.attn_output.weight", C::Attention, Matrix, L, Plain, &[Embd, Embd]),
    r("model.layers.{L}.post_attention_layernorm.weight", "blk.{L}.ffn_norm.weight", C::Norms, Vector, L, Plain, &[Embd]),
    r("model.layers.{L}.post_attention_layernorm.bias", "blk.{L}.ffn_norm.bias", C::Norms, Vector, L, Plain, &[Embd]),
    r("model.layers.{L}.mlp.gate_proj.weight", "blk.{L}.ffn_gate.weight", C::DenseFfn, Matrix, DL, Plain, &[Ff, Embd]),
    r("model.layers.{L}.mlp.up_proj.weight", "blk.{L}.ffn_up.weight", C::DenseFfn, Matrix, DL, Plain, &[Ff, Embd]),
    r("model.layers.{L}.mlp.down_proj.weight", "blk.{L}.ffn_down.weight", C::DenseFfn, Matrix, DL, Plain, &[Embd, Ff]),
    r(
        "model.layers.{L}.mlp.deepspeed_moe.gate.wg.weight",
        "blk.{L}.ffn_gate_inp.weight",
        C::Router,
        Matrix,
        ML,
        Plain,
        &[NExpert, Embd],
    ),
    r(
        "model.layers.{L}.mlp.deepspeed_moe.experts.deepspeed_experts.{E}.gate_proj.weight",
        "blk.{L}.ffn_gate_exps.weight",
        C::Experts,
        Matrix,
        ES,
        Ex,
        &[Ff, Embd],
    ),
    r(
        "model.layers.{L}.mlp.deepspeed_moe.experts.deepspeed_experts.{E}.up_proj.weight",
        "blk.{L}.ffn_up_exps.weight",
        C::Experts,
        Matrix,
        ES,
        Ex,
        &[Ff, Embd],
    ),
    r(
        "model.layers.{L}.mlp.deepspeed_moe.experts.deepspeed_experts.{E}.down_proj.weight",
        "blk.{L}.ffn_down_exps.weight",
        C::Experts,
        Matrix,
        ES,
        Ex,
        &[Embd, Ff],
    ),
    r("model.norm.weight", "output_norm.weight", C::Norms, Vector, G, Plain, &[Embd]),
    r("model.norm.bias", "output_norm.bias", C::Norms, Vector, G, Plain, &[Embd]),
    r("lm_head.weight", "output.weight", C::Embeddings, Matrix, G, TruncVocab, &[VocabRows, Embd]),
    r("model.mm_projector.image_spatial_proj.0.weight", "mm.0.weight", C::Projector, Matrix, G, Plain, &[Embd, MmHidden]),
    r("model.mm_projector.image_spatial_proj.0.bias", "mm.0.bias", C::Projector, Vector, G, Plain, &[Embd]),
    r("model.mm_projector.image_spatial_proj.2.weight", "mm.2.weight", C::Projector, Matrix, G, Plain, &[Embd, Embd]),
    r("model.mm_projector.image_spatial_proj.2.bias", "mm.2.bias", C::Projector, Vector, G, Plain, &[Embd]),
];

/// Qwen: `c_proj(w1(x) * silu(w2(x)))`, so w2 is the gate (SiLU side) and w1 the up projection,
/// as in llama.cpp's Qwen conversion.
pub const QWEN: &[Rule] = &[
    r("transformer.wte.weight", "token_embd.weight", C::Embeddings, Matrix, G, TruncVocab, &[VocabRows, Embd]),
    r("transformer.h.{L}.ln_1.weight", "blk.{L}.attn_norm.weight", C::Norms, Vector, L, Plain, &[Embd]),
    r("transformer.h.{L}.attn.c_attn.weight", "blk.{L}.attn_qkv.weight", C::Attention, Matrix, L, Plain, &[Qkv3, Embd]),
    r("transformer.h.{L}.attn.c_attn.bias", "blk.{L}.attn_qkv.bias", C::Attention, Vector, L, Plain, &[Qkv3]),
    r("transformer.h.{L}.attn.c_proj.weight", "blk.{L}.attn_output.weight", C::Attention, Matrix, L, Plain, &[Embd, Embd]),
    r("transformer.h.{L}.ln_2.weight", "blk.{L}.ffn_norm.weight", C::Norms, Vector, L, Plain, &[Embd]),
    r("transformer.h.{L}.mlp.w2.weight", "blk.{L}.ffn_gate.weight", C::DenseFfn, Matrix, DL, Plain, &[Ff, Embd]),
    r("transformer.h.{L}.mlp.w1.weight", "blk.{L}.ffn_up.weight", C::DenseFfn, Matrix, DL, Plain, &[Ff, Embd]),
    r("transformer.h.{L}.mlp.c_proj.weight", "blk.{L}.ffn_down.weight", C::DenseFfn, Matrix, DL, Plain, &[Embd, Ff]),
    r(
        "transformer.h.{L}.mlp.deepspeed_moe.gate.wg.weight",
        "blk.{L}.ffn_gate_inp.weight",
        C::Router,
        Matrix,
        ML,
        Plain,
        &[NExpert, Embd],
    ),
    r(
        "transformer.h.{L}.mlp.deepspeed_moe.experts.deepspeed_experts.{E}.w2.weight",
        "blk.{L}.ffn_gate_exps.weight",
        C::Experts,
        Matrix,
        ES,
        Ex,
        &[Ff, Embd],
    ),
    r(
        "transformer.h.{L}.mlp.deepspeed_moe.experts.deepspeed_experts.{E}.w1.weight",
        "blk.{L}.ffn_up_exps.weight",
        C::Experts,
        Matrix,
        ES,
        Ex,
        &[Ff, Embd],
    ),
    r(
        "transformer.h.{L}.mlp.deepspeed_moe.experts.deepspeed_experts.{E}.c_proj.weight",
        "blk.{L}.ffn_down_exps.weight",
        C::Experts,
        Matrix,
        ES,
        Ex,
        &[Embd, Ff],
    ),
    r("transformer.ln_f.weight", "output_norm.weight", C::Norms, Vector, G, Plain, &[Embd]),
    r("lm_head.weight", "output.weight", C::Embeddings, Matrix, G, TruncVocab, &[VocabRows, Embd]),
    r("transformer.mm_projector.image_spatial_proj.0.weight", "mm.0.weight", C::Projector, Matrix, G, Plain, &[Embd, MmHidden]),
    r("transformer.mm_projector.image_spatial_proj.0.bias", "mm.0.bias", C::Projector, Vector, G, Plain, &[Embd]),
    r("transformer.mm_projector.image_spatial_proj.2.weight", "mm.2.weight", C::Projector, Matrix, G, Plain, &[Embd, Embd]),
    r("transformer.mm_projector.image_spatial_proj.2.bias", "mm.2.bias", C::Projector, Vector, G, Plain, &[Embd]),
];

const V_LAYER: &[Rule] = &[
    r(
        "vision_model.encoder.layers.{L}.self_attn.q_proj.weight",
        "v.blk.{L}.attn_q.weight",
        C::Vision,
        Matrix,
        VL,
        Plain,
        &[VHidden, VHidden],
    ),
    r("vision_model.encoder.layers.{L}.self_attn.q_proj.bias", "v.blk.{L}.attn_q.bias", C::Vision, Vector, VL, Plain, &[VHidden]),
    r(
        "vision_model.encoder.layers.{L}.self_attn.k_proj.weight",
        "v.blk.{L}.attn_k.weight",
        C::Vision,
        Matrix,
        VL,
        Plain,
        &[VHidden, VHidden],
    ),
    r("vision_model.encoder.layers.{L}.self_attn.k_proj.bias", "v.blk.{L}.attn_k.bias", C::Vision, Vector, VL, Plain, &[VHidden]),
    r(
        "vision_model.encoder.layers.{L}.self_attn.v_proj.weight",
        "v.blk.{L}.attn_v.weight",
        C::Vision,
        Matrix,
        VL,
        Plain,
        &[VHidden, VHidden],
    ),
    r("vision_model.encoder.layers.{L}.self_attn.v_proj.bias", "v.blk.{L}.attn_v.bias", C::Vision, Vector, VL, Plain, &[VHidden]),
    r(
        "vision_model.encoder.layers.{L}.self_attn.out_proj.weight",
        "v.blk.{L}.attn_out.weight",
        C::Vision,
        Matrix,
        VL,
        Plain,
        &[VHidden, VHidden],
    ),
    r(
        "vision_model.encoder.layers.{L}.self_attn.out_proj.bias",
        "v.blk.{L}.attn_out.bias",
        C::Vision,
        Vector,
        VL,
        Plain,
        &[VHidden],
    ),
    r("vision_model.encoder.layers.{L}.layer_norm1.weight", "v.blk.{L}.ln1.weight", C::Vision, Vector, VL, Plain, &[VHidden]),
    r("vision_model.encoder.layers.{L}.layer_norm1.bias", "v.blk.{L}.ln1.bias", C::Vision, Vector, VL, Plain, &[VHidden]),
    r("vision_model.encoder.layers.{L}.mlp.fc1.weight", "v.blk.{L}.ffn_up.weight", C::Vision, Matrix, VL, Plain, &[VFf, VHidden]),
    r("vision_model.encoder.layers.{L}.mlp.fc1.bias", "v.blk.{L}.ffn_up.bias", C::Vision, Vector, VL, Plain, &[VFf]),
    r(
        "vision_model.encoder.layers.{L}.mlp.fc2.weight",
        "v.blk.{L}.ffn_down.weight",
        C::Vision,
        Matrix,
        VL,
        Plain,
        &[VHidden, VFf],
    ),
    r("vision_model.encoder.layers.{L}.mlp.fc2.bias", "v.blk.{L}.ffn_down.bias", C::Vision, Vector, VL, Plain, &[VHidden]),
    r("vision_model.encoder.layers.{L}.layer_norm2.weight", "v.blk.{L}.ln2.weight", C::Vision, Vector, VL, Plain, &[VHidden]),
    r("vision_model.encoder.layers.{L}.layer_norm2.bias", "v.blk.{L}.ln2.bias", C::Vision, Vector, VL, Plain, &[VHidden]),
];

pub const CLIP: &[Rule] = &[
    r("vision_model.embeddings.class_embedding", "v.class_embd", C::Vision, Table, G, Plain, &[VHidden]),
    r(
        "vision_model.embeddings.patch_embedding.weight",
        "v.patch_embd.weight",
        C::Vision,
        Table,
        G,
        Plain,
        &[VHidden, Three, VPatch, VPatch],
    ),
    r(
        "vision_model.embeddings.position_embedding.weight",
        "v.position_embd.weight",
        C::Vision,
        Table,
        G,
        Plain,
        &[VPos, VHidden],
    ),
    r("vision_model.pre_layrnorm.weight", "v.pre_ln.weight", C::Vision, Vector, G, Plain, &[VHidden]),
    r("vision_model.pre_layrnorm.bias", "v.pre_ln.bias", C::Vision, Vector, G, Plain, &[VHidden]),
];

pub const SIGLIP: &[Rule] = &[
    r(
        "vision_model.embeddings.patch_embedding.weight",
        "v.patch_embd.weight",
        C::Vision,
        Table,
        G,
        Plain,
        &[VHidden, Three, VPatch, VPatch],
    ),
    r("vision_model.embeddings.patch_embedding.bias", "v.patch_embd.bias", C::Vision, Vector, G, Plain, &[VHidden]),
    r(
        "vision_model.embeddings.position_embedding.weight",
        "v.position_embd.weight",
        C::Vision,
        Table,
        G,
        Plain,
        &[VPos, VHidden],
    ),
];

/// Tensors present in real checkpoints and towers that moellava deliberately does not convert.
pub const SKIPPED: &[(&str, &str)] = &[
    ("model.image_tower.", "the checkpoint's copy of the tower (the hub tower is used, spec §0.6)"),
    ("transformer.image_tower.", "the checkpoint's copy of the tower (the hub tower is used, spec §0.6)"),
    ("text_model.", "the tower's text encoder"),
    ("visual_projection.", "the tower's contrastive head"),
    ("text_projection.", "the tower's contrastive head"),
    ("logit_scale", "the tower's contrastive head"),
    ("logit_bias", "the tower's contrastive head"),
    ("vision_model.head.", "SigLIP's attention-pooling head (unused by LLaVA)"),
    ("vision_model.post_layernorm.", "unused: features come from an inner layer"),
    ("vision_model.embeddings.position_ids", "a buffer of integers, not a weight"),
];

pub fn llm_rules(family: Family) -> &'static [Rule] {
    match family {
        Family::Phi2 => PHI2,
        Family::StableLm => STABLELM,
        Family::Qwen => QWEN,
    }
}

pub fn tower_rules(kind: TowerKind) -> impl Iterator<Item = &'static Rule> {
    let embed = match kind {
        TowerKind::Clip => CLIP,
        TowerKind::Siglip => SIGLIP,
    };
    embed.iter().chain(V_LAYER.iter())
}

/// Where a source tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    Checkpoint,
    Tower,
}

/// One source tensor of a GGUF tensor, with its expected row-major shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    pub origin: Origin,
    pub name: String,
    pub shape: Vec<usize>,
}

/// A GGUF tensor to write: its sources are concatenated along the outermost dimension.
#[derive(Clone, Debug, PartialEq)]
pub struct OutTensor {
    pub name: String,
    pub class: TensorClass,
    pub kind: Kind,
    /// Row-major output shape.
    pub shape: Vec<usize>,
    pub sources: Vec<Source>,
    /// Only the first this-many rows of the (single) source are used.
    pub rows: Option<usize>,
}

impl OutTensor {
    /// Elements per row (innermost dimension).
    pub fn row_len(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }

    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The sizes symbolic dimensions stand for.
pub struct Dims<'a> {
    pub llm: &'a LlmConfig,
    pub tower: &'a TowerConfig,
}

impl Dims<'_> {
    pub fn size(&self, d: Dim) -> usize {
        let (l, t) = (self.llm, self.tower);
        match d {
            VocabRows => l.vocab_rows,
            Embd => l.n_embd,
            Ff => l.n_ff,
            KvDim => l.n_head_kv * l.head_dim,
            Qkv3 => l.n_embd + 2 * l.n_head_kv * l.head_dim,
            NExpert => l.moe.as_ref().map(|m| m.n_expert).unwrap_or(0),
            MmHidden => l.mm.mm_hidden,
            VHidden => t.hidden,
            VFf => t.n_ff,
            VPos => t.n_patches() + usize::from(t.kind == TowerKind::Clip),
            VPatch => t.patch_size,
            Three => 3,
            One => 1,
        }
    }

    fn shape(&self, dims: &[Dim]) -> Vec<usize> {
        dims.iter().map(|d| self.size(*d)).collect()
    }
}

/// Number of tower layers whose output the select layer reads (HF `hidden_states[select_layer]`:
/// index 0 is the embeddings, index k the output of layer k-1).
pub fn vision_layers_kept(select_layer: i64, n_layer: usize) -> Option<usize> {
    let idx = if select_layer < 0 { n_layer as i64 + 1 + select_layer } else { select_layer };
    (0..=n_layer as i64).contains(&idx).then_some(idx as usize)
}

fn fill(template: &str, layer: usize, expert: usize) -> String {
    template.replace("{L}", &layer.to_string()).replace("{E}", &expert.to_string())
}

/// Every GGUF tensor of a conversion, in file order (language model, tower, projector), with its sources.
pub fn plan(llm: &LlmConfig, tower: &TowerConfig, tokenizer_len: usize, vision_keep: usize) -> Vec<OutTensor> {
    let dims = Dims { llm, tower };
    let moe_layers: &[usize] = llm.moe.as_ref().map(|m| m.layers.as_slice()).unwrap_or(&[]);
    let n_expert = dims.size(NExpert);
    let mut out: Vec<OutTensor> = Vec::new();
    let mut push = |rule: &Rule, origin: Origin, layer: usize, expert: usize| {
        let name = fill(rule.gguf, layer, expert);
        let src = Source { origin, name: fill(rule.hf, layer, expert), shape: dims.shape(rule.shape) };
        if let Some(t) = out.iter_mut().find(|t| t.name == name) {
            // QKV parts and experts arrive in order; the outermost dimension grows.
            t.shape[0] += if rule.role == Ex { 0 } else { src.shape[0] };
            t.sources.push(src);
            return;
        }
        let (shape, rows) = match rule.role {
            TruncVocab => {
                let mut s = src.shape.clone();
                s[0] = tokenizer_len;
                (s, Some(tokenizer_len))
            }
            Ex => ([vec![n_expert], src.shape.clone()].concat(), None),
            _ => (src.shape.clone(), None),
        };
        out.push(OutTensor { name, class: rule.class, kind: rule.kind, shape, sources: vec![src], rows });
    };
    let rules = llm_rules(llm.family);
    for rule in rules.iter().filter(|r| r.scope == G && !r.gguf.starts_with("output") && !r.gguf.starts_with("mm.")) {
        push(rule, Origin::Checkpoint, 0, 0);
    }
    for layer in 0..llm.n_layer {
        let is_moe = moe_layers.contains(&layer);
        for rule in rules {
            match rule.scope {
                L => push(rule, Origin::Checkpoint, layer, 0),
                DL if !is_moe => push(rule, Origin::Checkpoint, layer, 0),
                ML if is_moe => push(rule, Origin::Checkpoint, layer, 0),
                ES if is_moe => (0..n_expert).for_each(|e| push(rule, Origin::Checkpoint, layer, e)),
                _ => {}
            }
        }
    }
    for rule in rules.iter().filter(|r| r.scope == G && r.gguf.starts_with("output")) {
        push(rule, Origin::Checkpoint, 0, 0);
    }
    for rule in tower_rules(tower.kind).filter(|r| r.scope == G) {
        push(rule, Origin::Tower, 0, 0);
    }
    for layer in 0..vision_keep {
        for rule in tower_rules(tower.kind).filter(|r| r.scope == VL) {
            push(rule, Origin::Tower, layer, 0);
        }
    }
    for rule in rules.iter().filter(|r| r.scope == G && r.gguf.starts_with("mm.")) {
        push(rule, Origin::Checkpoint, 0, 0);
    }
    out
}

/// Why a source tensor that no GGUF tensor consumes is not converted, or `None` when nothing
/// explains it (then the conversion stops: the table is not total for this checkpoint).
pub fn skip_reason(name: &str, origin: Origin, tower: &TowerConfig, vision_keep: usize) -> Option<String> {
    if let Some((_, why)) = SKIPPED.iter().find(|(p, _)| name.starts_with(p)) {
        return Some((*why).to_string());
    }
    if origin == Origin::Tower {
        let layer = name.strip_prefix("vision_model.encoder.layers.")?.split('.').next()?.parse::<usize>().ok()?;
        if layer >= vision_keep && layer < tower.n_layer {
            return Some(format!("tower layer {layer} comes after the select layer"));
        }
    }
    None
}
