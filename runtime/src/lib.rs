//! moellava-runtime: GGUF files, the model, expert residency, generation and evaluation.
#![deny(unsafe_code)]

pub mod npy;
