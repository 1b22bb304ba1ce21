//! GGUF: llama.cpp's single-file model format. A validating reader over a memory map and a
//! streaming writer. Spec: ggml's `docs/gguf.md`; behaviour mirrors llama.cpp's `gguf.cpp`.

pub mod keys;
pub mod reader;
pub mod value;
pub mod writer;

pub use reader::{GgufFile, GgufMeta, TensorInfo, ALIGNMENT_KEY, DEFAULT_ALIGNMENT};
pub use value::{Array, Value, ValueType};
pub use writer::{GgufWriter, TensorSpec};

/// Everything that can go wrong with a GGUF file, naming the file, key, tensor or byte offset.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{}byte {offset}: {what}", file_prefix(.file))]
    Format { file: Option<String>, offset: u64, what: String },
    #[error("metadata key '{key}' not found")]
    MissingKey { key: String },
    #[error("metadata key '{key}' has type {got}, expected {expected}")]
    KeyType { key: String, expected: &'static str, got: String },
    #[error("tensor '{name}' not found")]
    MissingTensor { name: String },
    #[error("{0}")]
    Write(String),
}

fn file_prefix(file: &Option<String>) -> String {
    file.as_ref().map(|f| format!("{f}: ")).unwrap_or_default()
}

impl GgufError {
    /// Attaches the file name to a format error found while parsing it.
    pub fn in_file(self, path: &std::path::Path) -> GgufError {
        match self {
            GgufError::Format { file: None, offset, what } => {
                GgufError::Format { file: Some(path.display().to_string()), offset, what }
            }
            e => e,
        }
    }
}
