//! Dense feed-forward blocks (and one expert of a MoE layer, which is the same block).
//! Phi-2: `fc2(gelu_tanh(fc1(x) + b1)) + b2`. StableLM / Qwen: `down(silu(gate(x)) · up(x))`
//! (Qwen's `c_proj(w1(x) · silu(w2(x)))` with w2 → gate, w1 → up). Dims: T tokens, D = n_embd, F = n_ff.

use std::sync::Arc;

use crate::backend::{Activation, Backend, RowMode};
use crate::error::Result;
use crate::gguf::keys::tensors as tn;
use crate::model::config::{Family, LlmConfig};
use crate::model::weights::{StackedPair, Weight, WeightStore};

pub enum Ffn {
    Gelu {
        up: Weight,
        up_b: Arc<[f32]>,
        down: Weight,
        down_b: Arc<[f32]>,
    },
    /// `gate_up`: gate and up stacked into one matrix where both run from the file's map (none for an
    /// expert-cache slot's copies).
    SwiGlu {
        gate: Weight,
        up: Weight,
        down: Weight,
        gate_up: Option<Arc<StackedPair>>,
    },
}

impl Ffn {
    pub fn load_dense(layer: usize, c: &LlmConfig, ws: &WeightStore) -> Result<Ffn> {
        let (d, f) = (c.n_embd, c.n_ff);
        let n = |part: &str| tn::blk(layer, part);
        Ok(match c.family {
            Family::Phi2 => Ffn::Gelu {
                up: ws.matrix(&n("ffn_up.weight"), f, d)?,
                up_b: ws.f32(&n("ffn_up.bias"), &[f])?.into(),
                down: ws.matrix(&n("ffn_down.weight"), d, f)?,
                down_b: ws.f32(&n("ffn_down.bias"), &[d])?.into(),
            },
            Family::StableLm | Family::Qwen => Ffn::swiglu(
                ws.matrix(&n("ffn_gate.weight"), f, d)?,
                ws.matrix(&n("ffn_up.weight"), f, d)?,
                ws.matrix(&n("ffn_down.weight"), d, f)?,
            ),
        })
    }

    /// A SwiGLU block, with gate and up stacked where they can be ([`StackedPair::new`]).
    pub fn swiglu(gate: Weight, up: Weight, down: Weight) -> Ffn {
        let gate_up = StackedPair::new(&gate, &up);
        Ffn::SwiGlu { gate, up, down, gate_up }
    }

    /// The matrices in a fixed order (Gelu: up, down; SwiGlu: gate, up, down): the parts of one
    /// expert that the expert cache loads.
    pub fn matrices(&self) -> Vec<&Weight> {
        match self {
            Ffn::Gelu { up, down, .. } => vec![up, down],
            Ffn::SwiGlu { gate, up, down, .. } => vec![gate, up, down],
        }
    }

    /// The same block over other copies of its matrices (in [`Self::matrices`] order); biases shared.
    pub fn with_matrices(&self, m: Vec<Weight>) -> Ffn {
        let mut m = m.into_iter();
        let mut next = |w: &Weight| m.next().unwrap_or_else(|| w.clone());
        match self {
            Ffn::Gelu { up, up_b, down, down_b } => {
                Ffn::Gelu { up: next(up), up_b: up_b.clone(), down: next(down), down_b: down_b.clone() }
            }
            // copies outside the map: no stacked pair (it would be a second copy beside the slot's)
            Ffn::SwiGlu { gate, up, down, .. } => Ffn::SwiGlu { gate: next(gate), up: next(up), down: next(down), gate_up: None },
        }
    }

    /// `x [T, D]` → `[T, D]`.
    pub fn forward<B: Backend>(&self, be: &B, x: &B::Act, mode: RowMode) -> Result<B::Act> {
        let mm = |x: &B::Act, w: &Weight| mode.matmul(be, x, w);
        match self {
            Ffn::Gelu { up, up_b, down, down_b } => {
                let mut h = mm(x, up)?; // [T, F]
                be.add_bias(&mut h, up_b);
                be.activate(&mut h, Activation::GeluTanh);
                let mut y = mm(&h, down)?; // [T, D]
                be.add_bias(&mut y, down_b);
                Ok(y)
            }
            Ffn::SwiGlu { gate, up, down, gate_up } => {
                let g = be.gate_up(x, gate, up, gate_up.as_deref(), mode)?; // silu(x·gateᵀ) ⊙ x·upᵀ [T, F]
                mm(&g, down) // [T, D]
            }
        }
    }
}
