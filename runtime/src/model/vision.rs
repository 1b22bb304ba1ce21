//! Vision tower (CLIP ViT or SigLIP, up to the select layer) and the mlp2x_gelu projector.
//!
//! Mirrors transformers' CLIPVisionTransformer / SiglipVisionTransformer and MoE-LLaVA's
//! `clip_encoder.py` / `siglip_encoder.py` + `multimodal_projector/builder.py`:
//! CLIP: patches (conv, no bias) → [class; patches] + positions → pre-LayerNorm → layers;
//! SigLIP: patches (conv with bias) + positions → layers. Layers are pre-LN: `x + attn(ln1(x))`,
//! `x + fc2(act(fc1(ln2(x))))`, act = quick-GELU (CLIP) or tanh-GELU (SigLIP).
//! Features = output of the last stored layer, `[:, 1:]` for select_feature "patch" (on SigLIP this
//! drops a real patch, as upstream does); projector = `mm.2(gelu_erf(mm.0(features)))`.
//! Dims: S = image side, p = patch, N = patches (+1 class token for CLIP), W = tower width, H = LLM width.

use crate::backend::{Activation, AttnShape, Backend};
use crate::error::Result;
use crate::gguf::keys::tensors as tn;
use crate::model::config::{TowerKind, VisionConfig};
use crate::model::weights::{Weight, WeightStore};

struct Linear {
    w: Weight,
    b: Vec<f32>,
}

impl Linear {
    fn load(ws: &WeightStore, name: &str, out_f: usize, in_f: usize) -> Result<Linear> {
        Ok(Linear { w: ws.matrix(&format!("{name}.weight"), out_f, in_f)?, b: ws.f32(&format!("{name}.bias"), &[out_f])? })
    }

    fn forward<B: Backend>(&self, be: &B, x: &B::Act) -> Result<B::Act> {
        let mut y = be.matmul(x, &self.w)?;
        be.add_bias(&mut y, &self.b);
        Ok(y)
    }
}

struct LayerNorm {
    w: Vec<f32>,
    b: Vec<f32>,
}

impl LayerNorm {
    fn load(ws: &WeightStore, name: &str, n: usize) -> Result<LayerNorm> {
        Ok(LayerNorm { w: ws.f32(&format!("{name}.weight"), &[n])?, b: ws.f32(&format!("{name}.bias"), &[n])? })
    }
}

struct VisionLayer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    up: Linear,
    down: Linear,
}

pub struct VisionTower {
    pub cfg: VisionConfig,
    /// v.patch_embd.weight [W, 3, p, p] viewed as [W, 3·p·p].
    patch: Weight,
    patch_bias: Option<Vec<f32>>,
    class: Option<Vec<f32>>,
    /// [n_pos, W]
    pos: Vec<f32>,
    pre_ln: Option<LayerNorm>,
    layers: Vec<VisionLayer>,
    mm0: Linear,
    mm2: Linear,
}

impl VisionTower {
    pub fn load(cfg: &VisionConfig, ws: &WeightStore, n_embd: usize) -> Result<VisionTower> {
        let (w, p) = (cfg.hidden, cfg.patch_size);
        let clip = cfg.tower == TowerKind::Clip;
        let n_pos = cfg.n_patches() + usize::from(clip);
        let layers = (0..cfg.n_layer)
            .map(|i| {
                let n = |part: &str| tn::vblk(i, part);
                Ok(VisionLayer {
                    ln1: LayerNorm::load(ws, &n("ln1"), w)?,
                    q: Linear::load(ws, &n("attn_q"), w, w)?,
                    k: Linear::load(ws, &n("attn_k"), w, w)?,
                    v: Linear::load(ws, &n("attn_v"), w, w)?,
                    out: Linear::load(ws, &n("attn_out"), w, w)?,
                    ln2: LayerNorm::load(ws, &n("ln2"), w)?,
                    up: Linear::load(ws, &n("ffn_up"), cfg.n_ff, w)?,
                    down: Linear::load(ws, &n("ffn_down"), w, cfg.n_ff)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(VisionTower {
            cfg: cfg.clone(),
            patch: ws.matrix_of(&format!("{}.weight", tn::V_PATCH_EMBD), &[w, 3, p, p], 3 * p * p)?,
            patch_bias: ws.f32_opt(&format!("{}.bias", tn::V_PATCH_EMBD), &[w])?,
            class: if clip { Some(ws.f32(tn::V_CLASS_EMBD, &[w])?) } else { None },
            pos: ws.f32(tn::V_POSITION_EMBD, &[n_pos, w])?,
            pre_ln: if clip { Some(LayerNorm::load(ws, tn::V_PRE_LN, w)?) } else { None },
            layers,
            mm0: Linear::load(ws, tn::MM_0, n_embd, w)?,
            mm2: Linear::load(ws, tn::MM_2, n_embd, n_embd)?,
        })
    }

    /// Pixel values `[3, S, S]` → patch rows `[N, 3·p·p]` in the conv weight's (c, ky, kx) order.
    fn patchify(&self, pixels: &[f32]) -> Vec<f32> {
        let (s, p) = (self.cfg.image_size, self.cfg.patch_size);
        let side = s / p;
        let mut out = Vec::with_capacity(side * side * 3 * p * p);
        for py in 0..side {
            for px in 0..side {
                for c in 0..3 {
                    for ky in 0..p {
                        let row = c * s * s + (py * p + ky) * s + px * p;
                        out.extend_from_slice(&pixels[row..row + p]);
                    }
                }
            }
        }
        out
    }

    /// `pixels [3, S, S]` → (selected features `[N', W]`, image embeddings `[N', H]`).
    pub fn encode<B: Backend>(&self, be: &B, pixels: &[f32]) -> Result<(B::Act, B::Act)> {
        let (s, w) = (self.cfg.image_size, self.cfg.hidden);
        if pixels.len() != 3 * s * s {
            return Err(crate::error::RuntimeError::Image(format!(
                "pixel values have {} floats, expected 3×{s}×{s}",
                pixels.len()
            )));
        }
        let mut x = be.matmul(&be.from_host(self.patchify(pixels), 3 * self.cfg.patch_size.pow(2)), &self.patch)?; // [N, W]
        if let Some(b) = &self.patch_bias {
            be.add_bias(&mut x, b);
        }
        if let Some(cls) = &self.class {
            x = be.concat_rows(&[&be.from_host(cls.clone(), w), &x]); // [1+N, W]
        }
        be.add(&mut x, &be.from_host(self.pos.clone(), w));
        if let Some(ln) = &self.pre_ln {
            be.layer_norm(&mut x, &ln.w, Some(&ln.b), self.cfg.eps);
        }
        let hd = w / self.cfg.n_head;
        let shape = AttnShape {
            n_head: self.cfg.n_head,
            n_kv_head: self.cfg.n_head,
            head_dim: hd,
            first_pos: 0,
            causal: false,
            scale: (hd as f32).powf(-0.5),
        };
        for l in &self.layers {
            let mut h = x.clone();
            be.layer_norm(&mut h, &l.ln1.w, Some(&l.ln1.b), self.cfg.eps);
            let (q, k, v) = (l.q.forward(be, &h)?, l.k.forward(be, &h)?, l.v.forward(be, &h)?);
            let a = be.attention(&q, &k, &v, shape);
            be.add(&mut x, &l.out.forward(be, &a)?);
            let mut h = x.clone();
            be.layer_norm(&mut h, &l.ln2.w, Some(&l.ln2.b), self.cfg.eps);
            let mut f = l.up.forward(be, &h)?;
            be.activate(&mut f, self.cfg.act);
            be.add(&mut x, &l.down.forward(be, &f)?);
        }
        let (rows, _) = be.shape(&x);
        let features = if self.cfg.drop_first { be.gather_rows(&x, &(1..rows).collect::<Vec<_>>()) } else { x };
        let mut e = self.mm0.forward(be, &features)?;
        be.activate(&mut e, Activation::GeluErf);
        let embeds = self.mm2.forward(be, &e)?;
        Ok((features, embeds))
    }
}
