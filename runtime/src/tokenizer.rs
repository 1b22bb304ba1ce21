//! The model's tokenizer, rebuilt from GGUF metadata alone with the `tokenizers` crate.
//!
//! A byte-level BPE (`tokenizer.ggml.tokens` / `merges`), a pre-tokenizer chosen by
//! `tokenizer.ggml.pre`, added tokens from `tokenizer.ggml.token_type` (control tokens are special,
//! user-defined ones ordinary added tokens, split out before BPE like the original slow tokenizers do),
//! NFC normalisation and whole-piece lookup when `moellava.tokenizer.*` say so (the tiktoken families).
//! The converter's tokenizer test checks it against the original files and reference libraries.

use std::collections::HashMap;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use crate::gguf::keys::{moellava as mk, tokenizer as tk};
use crate::gguf::{GgufError, GgufMeta};

/// The split pattern of Qwen-1's and Arcade100k's tiktoken encodings (llama.cpp: "qwen2", "stablelm2").
const QWEN_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("tokenizer: {0}")]
    Build(String),
}

/// Encoder/decoder with the ids of the original tokenizer.
pub struct Tokenizer {
    inner: HfTokenizer,
    /// len(tokenizer): ids below this are real tokens.
    pub len: usize,
    pub eos: u32,
    pub bos: Option<u32>,
    special: Vec<bool>,
}

fn build_err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Build(e.to_string())
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF's `tokenizer.ggml.*` and `moellava.tokenizer.*` keys.
    pub fn from_gguf(meta: &GgufMeta) -> Result<Tokenizer, TokenizerError> {
        let model = meta.get_str(tk::MODEL)?;
        if model != "gpt2" {
            return Err(TokenizerError::Build(format!(
                "'{}' is '{model}', only byte-level BPE ('gpt2') is supported",
                tk::MODEL
            )));
        }
        let tokens = meta.get_str_array(tk::TOKENS)?;
        let types = meta.get_i32_array(tk::TOKEN_TYPE)?;
        if types.len() != tokens.len() {
            return Err(TokenizerError::Build(format!(
                "{} has {} entries for {} tokens",
                tk::TOKEN_TYPE,
                types.len(),
                tokens.len()
            )));
        }
        let merges: Vec<(String, String)> = meta
            .get_str_array(tk::MERGES)?
            .iter()
            .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect::<Option<_>>()
            .ok_or_else(|| TokenizerError::Build(format!("{} holds an entry that is not 'left right'", tk::MERGES)))?;
        let vocab: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let ignore_merges = meta.get_bool(mk::TOKENIZER_IGNORE_MERGES).unwrap_or(false);
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(build_err)?;
        let mut inner = HfTokenizer::new(bpe);
        let pre = meta.get_str(tk::PRE).unwrap_or("gpt-2");
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "gpt-2" | "phi-2" => ByteLevel::new(false, true, true).into(),
            "qwen2" | "stablelm2" => {
                let split = Split::new(SplitPattern::Regex(QWEN_PATTERN.into()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(build_err)?;
                Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
            }
            other => {
                return Err(TokenizerError::Build(format!(
                    "pre-tokenizer '{other}' is not supported (phi-2, gpt-2, qwen2, stablelm2)"
                )))
            }
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        if meta.get_str(mk::TOKENIZER_NORMALIZER).unwrap_or("none") == "nfc" {
            inner.with_normalizer(Some(NFC));
        }
        let special: Vec<bool> = types.iter().map(|t| *t == tk::TYPE_CONTROL).collect();
        let control: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == tk::TYPE_CONTROL)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == tk::TYPE_USER_DEFINED)
            .map(|(s, _)| AddedToken::from(s.clone(), false).normalized(false))
            .collect();
        inner.add_special_tokens(&control);
        inner.add_tokens(&user);
        let len = meta.get_usize(mk::TOKENIZER_LEN).unwrap_or(tokens.len());
        let eos = meta.get_u32(tk::EOS_ID)?;
        let bos = meta.get_u32(tk::BOS_ID).ok();
        Ok(Tokenizer { inner, len, eos, bos, special })
    }

    /// Token ids of `text`, with no BOS/EOS added (MoE-LLaVA adds none), special tokens recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        Ok(self.inner.encode(text, false).map_err(build_err)?.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens are skipped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        let kept: Vec<u32> = ids.iter().copied().filter(|i| !(skip_special && self.is_special(*i))).collect();
        self.inner.decode(&kept, false).map_err(build_err)
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The id of an exact token string (e.g. "<|endoftext|>").
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
