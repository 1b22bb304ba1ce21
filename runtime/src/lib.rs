//! moellava-runtime: GGUF files, the model, generation and evaluation.
//!
//! ```text
//! model.gguf ─gguf (mmap)→ WeightStore ─→ Model { VisionTower, Llm } over a Backend (cpu)
//! image ─image::preprocess→ pixels ─VisionTower→ image embeds ─┐
//! prompt ─prompt::render/tokenize→ ids ─embed────────────────────┴→ splice → Llm (MoE layers) → logits
//! logits ─sampler→ tokens ─tokenizer→ text
//! ```
#![deny(unsafe_code)]

pub mod backend;
pub mod error;
pub mod eval;
pub mod experts;
pub mod gguf;
pub mod image;
pub mod inspect;
pub mod mmap;
pub mod model;
pub mod npy;
pub mod prompt;
pub mod rng;
pub mod sampler;
pub mod sysinfo;
pub mod tensor_class;
pub mod tokenizer;

pub use error::{Result, RuntimeError};
pub use model::{Answer, GatingMode, GenerateOptions, Model};
