//! Converter errors: each names the file, and the key or tensor, with what was expected and what was found.

use moellava_kernels::QuantError;
use moellava_runtime::gguf::GgufError;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// A whole-file problem: missing, unreadable, not the expected format.
    #[error("{path}: {what}")]
    File { path: String, what: String },
    /// A bad or missing config.json field.
    #[error("{path}: '{key}' {what}")]
    Config { path: String, key: String, what: String },
    /// A tensor that is missing, misshapen, of the wrong dtype or unknown.
    #[error("{path}: tensor '{tensor}' {what}")]
    Tensor { path: String, tensor: String, what: String },
    /// The vision tower could not be found or is of the wrong kind.
    #[error("{0}")]
    Tower(String),
    /// A bad command-line choice (quant types, output path).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Quant(#[from] QuantError),
}

pub type Result<T> = std::result::Result<T, ConvertError>;

pub(crate) fn file_err(path: &std::path::Path, what: impl Into<String>) -> ConvertError {
    ConvertError::File { path: path.display().to_string(), what: what.into() }
}
