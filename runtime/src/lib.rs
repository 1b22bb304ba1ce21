//! moellava-runtime: GGUF files, the model, expert residency, generation and evaluation.
#![deny(unsafe_code)]

pub mod gguf;
pub mod inspect;
pub mod mmap;
pub mod npy;
pub mod tensor_class;
pub mod tokenizer;
