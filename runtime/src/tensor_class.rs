//! Tensor classes: the groups a quant plan and a size report talk about, from GGUF tensor names
//! (llama.cpp's naming: `blk.N.*`, `v.*`, `mm.*`, `token_embd`, `output`).

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorClass {
    /// Stacked MoE expert FFNs (`blk.N.ffn_{up,gate,down}_exps.*`).
    Experts,
    /// Attention projections and their biases (`blk.N.attn_{q,k,v,qkv,output}.*`).
    Attention,
    /// FFNs of dense layers (`blk.N.ffn_{up,gate,down}.*`).
    DenseFfn,
    /// Token embedding and output head.
    Embeddings,
    /// MoE gates (`blk.N.ffn_gate_inp.*`).
    Router,
    /// Vision tower (`v.*`).
    Vision,
    /// Multimodal projector (`mm.*`).
    Projector,
    /// Language-model norms (`*_norm.*`).
    Norms,
    Other,
}

impl TensorClass {
    pub const ALL: [TensorClass; 9] = [
        TensorClass::Experts,
        TensorClass::Attention,
        TensorClass::DenseFfn,
        TensorClass::Embeddings,
        TensorClass::Router,
        TensorClass::Vision,
        TensorClass::Projector,
        TensorClass::Norms,
        TensorClass::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TensorClass::Experts => "experts",
            TensorClass::Attention => "attention",
            TensorClass::DenseFfn => "dense_ffn",
            TensorClass::Embeddings => "embeddings",
            TensorClass::Router => "router",
            TensorClass::Vision => "vision",
            TensorClass::Projector => "projector",
            TensorClass::Norms => "norms",
            TensorClass::Other => "other",
        }
    }

    /// Classifies a GGUF tensor name.
    pub fn of(name: &str) -> TensorClass {
        if name.starts_with("v.") {
            return TensorClass::Vision;
        }
        if name.starts_with("mm.") {
            return TensorClass::Projector;
        }
        let base = name.strip_suffix(".weight").or_else(|| name.strip_suffix(".bias")).unwrap_or(name);
        if base == "token_embd" || base == "output" {
            return TensorClass::Embeddings;
        }
        if base.ends_with("_norm") || base.contains("_norm_") || base.ends_with("_layernorm") {
            return TensorClass::Norms;
        }
        let Some(rest) = base.strip_prefix("blk.") else { return TensorClass::Other };
        let part = rest.split_once('.').map(|(_, p)| p).unwrap_or("");
        if part.ends_with("_exps") || part.ends_with("_exps_b") {
            TensorClass::Experts
        } else if part == "ffn_gate_inp" {
            TensorClass::Router
        } else if part.starts_with("attn_") {
            TensorClass::Attention
        } else if part.starts_with("ffn_") {
            TensorClass::DenseFfn
        } else {
            TensorClass::Other
        }
    }

    /// The MoE layer of a stacked-expert tensor name (`blk.N.ffn_*_exps.*` → N).
    pub fn expert_layer(name: &str) -> Option<usize> {
        if TensorClass::of(name) != TensorClass::Experts {
            return None;
        }
        name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
    }
}

impl fmt::Display for TensorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::TensorClass as C;

    #[test]
    fn classifies_llama_cpp_names() {
        let cases = [
            ("token_embd.weight", C::Embeddings),
            ("output.weight", C::Embeddings),
            ("output_norm.weight", C::Norms),
            ("output_norm.bias", C::Norms),
            ("blk.3.attn_norm.weight", C::Norms),
            ("blk.3.ffn_norm.bias", C::Norms),
            ("blk.0.attn_qkv.weight", C::Attention),
            ("blk.0.attn_q.bias", C::Attention),
            ("blk.0.attn_output.weight", C::Attention),
            ("blk.1.ffn_up.weight", C::DenseFfn),
            ("blk.1.ffn_down.bias", C::DenseFfn),
            ("blk.2.ffn_gate_inp.weight", C::Router),
            ("blk.2.ffn_up_exps.weight", C::Experts),
            ("blk.2.ffn_down_exps.bias", C::Experts),
            ("v.blk.0.attn_q.weight", C::Vision),
            ("v.patch_embd.weight", C::Vision),
            ("mm.0.weight", C::Projector),
            ("rope_freqs.weight", C::Other),
        ];
        for (name, want) in cases {
            assert_eq!(C::of(name), want, "{name}");
        }
        assert_eq!(C::expert_layer("blk.14.ffn_gate_exps.weight"), Some(14));
        assert_eq!(C::expert_layer("blk.14.ffn_gate.weight"), None);
    }
}
