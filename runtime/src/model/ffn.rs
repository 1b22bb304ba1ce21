//! Dense feed-forward blocks (and one expert of a MoE layer, which is the same block).
//! Phi-2: `fc2(gelu_tanh(fc1(x) + b1)) + b2`. StableLM / Qwen: `down(silu(gate(x)) · up(x))`
//! (Qwen's `c_proj(w1(x) · silu(w2(x)))` with w2 → gate, w1 → up). Dims: T tokens, D = n_embd, F = n_ff.

use crate::backend::{Activation, Backend};
use crate::error::Result;
use crate::gguf::keys::tensors as tn;
use crate::model::config::{Family, LlmConfig};
use crate::model::weights::{Weight, WeightStore};

pub enum Ffn {
    Gelu { up: Weight, up_b: Vec<f32>, down: Weight, down_b: Vec<f32> },
    SwiGlu { gate: Weight, up: Weight, down: Weight },
}

impl Ffn {
    pub fn load_dense(layer: usize, c: &LlmConfig, ws: &WeightStore) -> Result<Ffn> {
        let (d, f) = (c.n_embd, c.n_ff);
        let n = |part: &str| tn::blk(layer, part);
        Ok(match c.family {
            Family::Phi2 => Ffn::Gelu {
                up: ws.matrix(&n("ffn_up.weight"), f, d)?,
                up_b: ws.f32(&n("ffn_up.bias"), &[f])?,
                down: ws.matrix(&n("ffn_down.weight"), d, f)?,
                down_b: ws.f32(&n("ffn_down.bias"), &[d])?,
            },
            Family::StableLm | Family::Qwen => Ffn::SwiGlu {
                gate: ws.matrix(&n("ffn_gate.weight"), f, d)?,
                up: ws.matrix(&n("ffn_up.weight"), f, d)?,
                down: ws.matrix(&n("ffn_down.weight"), d, f)?,
            },
        })
    }

    /// `x [T, D]` → `[T, D]`.
    pub fn forward<B: Backend>(&self, be: &B, x: &B::Act) -> Result<B::Act> {
        match self {
            Ffn::Gelu { up, up_b, down, down_b } => {
                let mut h = be.matmul(x, up)?; // [T, F]
                be.add_bias(&mut h, up_b);
                be.activate(&mut h, Activation::GeluTanh);
                let mut y = be.matmul(&h, down)?; // [T, D]
                be.add_bias(&mut y, down_b);
                Ok(y)
            }
            Ffn::SwiGlu { gate, up, down } => {
                let mut g = be.matmul(x, gate)?; // [T, F]
                be.activate(&mut g, Activation::Silu);
                be.mul(&mut g, &be.matmul(x, up)?);
                be.matmul(&g, down) // [T, D]
            }
        }
    }
}
