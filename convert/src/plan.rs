//! The quant plan: one tensor type per class, from a preset, `--type` and the class flags; and the
//! fallback for tensors whose rows do not fit the chosen type's block size.

use std::fmt;

use moellava_kernels::QuantType;
use moellava_runtime::tensor_class::TensorClass;

use crate::error::{ConvertError, Result};
use crate::name_map::{Kind, OutTensor};

/// Named plans (`--preset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    Q4,
    Q5,
    Q8,
    F16,
}

impl Preset {
    pub fn parse(s: &str) -> Result<Preset> {
        Ok(match s {
            "q4" => Preset::Q4,
            "q5" => Preset::Q5,
            "q8" => Preset::Q8,
            "f16" => Preset::F16,
            _ => return Err(ConvertError::Usage(format!("unknown --preset '{s}'; expected one of: q4 q5 q8 f16"))),
        })
    }

    pub fn plan(self) -> QuantPlan {
        use QuantType::*;
        let (experts, dense, embeddings) = match self {
            Preset::Q4 => (Q4_K, Q8_0, Q8_0),
            Preset::Q5 => (Q5_K, Q8_0, Q8_0),
            Preset::Q8 => (Q8_0, Q8_0, Q8_0),
            Preset::F16 => (F16, F16, F16),
        };
        QuantPlan { experts, dense, embeddings, router: F32, vision: F16, projector: F16 }
    }
}

/// Tensor type per class. Norms and biases are always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantPlan {
    pub experts: QuantType,
    pub dense: QuantType,
    pub embeddings: QuantType,
    pub router: QuantType,
    pub vision: QuantType,
    pub projector: QuantType,
}

/// The plan-related command-line choices, before resolution.
#[derive(Clone, Debug, Default)]
pub struct PlanChoice {
    pub preset: Option<Preset>,
    pub all: Option<QuantType>,
    pub experts: Option<QuantType>,
    pub dense: Option<QuantType>,
    pub embeddings: Option<QuantType>,
    pub router: Option<QuantType>,
    pub vision: Option<QuantType>,
    pub projector: Option<QuantType>,
}

impl QuantPlan {
    /// Precedence: a class flag, else `--type`, else `--preset`, else the q4 preset. The router stays
    /// f32 unless `--router` is given (routing decisions are sensitive to gate precision).
    pub fn resolve(c: &PlanChoice) -> QuantPlan {
        let base = match (c.all, c.preset) {
            (Some(t), _) => QuantPlan { experts: t, dense: t, embeddings: t, router: QuantType::F32, vision: t, projector: t },
            (None, Some(p)) => p.plan(),
            (None, None) => Preset::Q4.plan(),
        };
        QuantPlan {
            experts: c.experts.unwrap_or(base.experts),
            dense: c.dense.unwrap_or(base.dense),
            embeddings: c.embeddings.unwrap_or(base.embeddings),
            router: c.router.unwrap_or(base.router),
            vision: c.vision.unwrap_or(base.vision),
            projector: c.projector.unwrap_or(base.projector),
        }
    }

    /// The type a class asks for.
    pub fn for_class(&self, class: TensorClass) -> QuantType {
        match class {
            TensorClass::Experts => self.experts,
            TensorClass::Attention | TensorClass::DenseFfn | TensorClass::Other => self.dense,
            TensorClass::Embeddings => self.embeddings,
            TensorClass::Router => self.router,
            TensorClass::Vision => self.vision,
            TensorClass::Projector => self.projector,
            TensorClass::Norms => QuantType::F32,
        }
    }

    /// The type requested for a tensor, before any block-size fallback: vectors are f32; tables of the
    /// tower (added to activations) take the class type only when it is a float type, else f16.
    pub fn requested(&self, t: &OutTensor) -> QuantType {
        match t.kind {
            Kind::Vector => QuantType::F32,
            Kind::Table => match self.for_class(t.class) {
                q if q.is_quantized() => QuantType::F16,
                q => q,
            },
            Kind::Matrix => self.for_class(t.class),
        }
    }

    /// llama.cpp's `general.file_type` for the dominant class.
    pub fn file_type(&self, has_experts: bool) -> u32 {
        match if has_experts { self.experts } else { self.dense } {
            QuantType::F32 => 0,
            QuantType::F16 => 1,
            QuantType::Q4_0 => 2,
            QuantType::Q4_1 => 3,
            QuantType::Q8_0 => 7,
            QuantType::Q5_0 => 8,
            QuantType::Q5_1 => 9,
            QuantType::Q4_K => 15,
            QuantType::Q5_K => 17,
            QuantType::Q6_K => 18,
            QuantType::BF16 => 32,
        }
    }
}

impl fmt::Display for QuantPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "experts={} dense={} embeddings={} router={} vision={} projector={} norms=f32",
            self.experts, self.dense, self.embeddings, self.router, self.vision, self.projector
        )
    }
}

/// The type a tensor with rows of `row_len` elements can take instead of `q` when `row_len` is not a
/// multiple of `q`'s block size: K-quants step to the 32-block type of at least the same quality
/// (llama.cpp's choice: q4_k→q5_0, q5_k→q5_1, q6_k→q8_0), anything else to f16.
pub fn fit(q: QuantType, row_len: usize) -> QuantType {
    if row_len.is_multiple_of(q.block_size()) {
        return q;
    }
    let next = match q {
        QuantType::Q4_K => QuantType::Q5_0,
        QuantType::Q5_K => QuantType::Q5_1,
        QuantType::Q6_K => QuantType::Q8_0,
        _ => QuantType::F16,
    };
    fit(next, row_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_is_flag_then_type_then_preset() {
        let p = QuantPlan::resolve(&PlanChoice::default());
        assert_eq!(p, Preset::Q4.plan());
        let p =
            QuantPlan::resolve(&PlanChoice { all: Some(QuantType::Q8_0), experts: Some(QuantType::Q4_0), ..Default::default() });
        assert_eq!((p.experts, p.dense, p.vision, p.router), (QuantType::Q4_0, QuantType::Q8_0, QuantType::Q8_0, QuantType::F32));
        let p = QuantPlan::resolve(&PlanChoice { preset: Some(Preset::F16), router: Some(QuantType::F16), ..Default::default() });
        assert_eq!((p.experts, p.router), (QuantType::F16, QuantType::F16));
    }

    #[test]
    fn fallback_keeps_quality_and_ends_at_f16() {
        assert_eq!(fit(QuantType::Q4_K, 512), QuantType::Q4_K);
        assert_eq!(fit(QuantType::Q4_K, 160), QuantType::Q5_0);
        assert_eq!(fit(QuantType::Q6_K, 96), QuantType::Q8_0);
        assert_eq!(fit(QuantType::Q8_0, 14), QuantType::F16);
        assert_eq!(fit(QuantType::Q5_K, 1), QuantType::F16);
        assert_eq!(fit(QuantType::F32, 7), QuantType::F32);
    }
}
