//! Runtime errors: each names the key, tensor, file or option, with what was expected and what was found.

use crate::gguf::GgufError;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("tensor '{name}' is missing from the model file")]
    MissingTensor { name: String },
    #[error("tensor '{name}' has shape {got:?}, expected {expected:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("tensor '{name}' has type {got}, which moellava cannot compute with")]
    BadType { name: String, got: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("image: {0}")]
    Image(String),
    #[error("prompt: {0}")]
    Prompt(String),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error("kernel: {0}")]
    Kernel(#[from] moellava_kernels::QuantError),
    #[error("GPU: {0}")]
    Gpu(String),
    #[error("generation cancelled")]
    Cancelled,
}

pub type Result<T> = std::result::Result<T, RuntimeError>;
