//! The family's tokenizer files → llama.cpp's `tokenizer.ggml.*` (a byte-level BPE: tokens, merges,
//! token types) plus the moellava facts the runtime needs to reproduce the original tokenizer exactly.
//!
//! - Phi (CodeGen/GPT-2 files): vocab.json + merges.txt + added_tokens.json + tokenizer_config.json.
//! - StableLM (arcade100k.tiktoken) and Qwen (qwen.tiktoken): tiktoken rank files. Tokens become GPT-2
//!   byte-level strings; merges are recovered from the ranks (for each token, BPE of its bytes with
//!   every rank below its own must end in exactly two parts — those are its merge); special tokens are
//!   the families' code-defined lists: Arcade100k's 32 from id len(ranks)+1 (100257 in the release,
//!   id 100256 being an unused gap), Qwen's 208 from id len(ranks) (151643). Both tokenizers NFC-normalise
//!   input and, like tiktoken, emit a pre-token that is itself a vocabulary entry whole.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use moellava_runtime::gguf::keys::tokenizer as tk;
use serde_json::Value;

use crate::error::{file_err, ConvertError, Result};
use crate::hf_config::{read_json, Family};

/// What the GGUF tokenizer keys hold.
#[derive(Clone, Debug, PartialEq)]
pub struct Vocab {
    /// Byte-level (GPT-2 unicode) token strings, index = id.
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    /// "left right" pairs in priority order.
    pub merges: Vec<String>,
    /// llama.cpp's pre-tokenizer name: "phi-2" (GPT-2 regex), "stablelm2" / "qwen2" (the Qwen regex).
    pub pre: &'static str,
    pub eos: u32,
    pub bos: Option<u32>,
    pub pad: Option<u32>,
    /// "nfc" for the tiktoken families, "none" for Phi.
    pub normalizer: &'static str,
    pub ignore_merges: bool,
}

impl Vocab {
    /// len(tokenizer): logits are taken over this many ids.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn load(family: Family, dir: &Path, config: &Value) -> Result<Vocab> {
        match family {
            Family::Phi2 => load_gpt2(dir),
            Family::StableLm => load_tiktoken(dir, "arcade100k.tiktoken", family, config),
            Family::Qwen => load_tiktoken(dir, "qwen.tiktoken", family, config),
        }
    }
}

/// GPT-2's reversible byte → printable character map.
pub fn byte_to_unicode() -> [char; 256] {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut map = ['\0'; 256];
    for &b in &printable {
        map[b as usize] = char::from_u32(b).expect("latin-1");
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            map[b as usize] = char::from_u32(256 + n).expect("valid code point");
            n += 1;
            printable.push(b);
        }
    }
    map
}

fn unicode_string(bytes: &[u8], map: &[char; 256]) -> String {
    bytes.iter().map(|b| map[*b as usize]).collect()
}

fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn load_gpt2(dir: &Path) -> Result<Vocab> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    for p in [&vocab_path, &merges_path] {
        if !p.is_file() {
            return Err(file_err(p, "missing: a Phi checkpoint ships vocab.json and merges.txt"));
        }
    }
    let mut by_id: HashMap<u32, String> = HashMap::new();
    let add = |by_id: &mut HashMap<u32, String>, path: &Path, map: &Value| -> Result<()> {
        let obj = map.as_object().ok_or_else(|| file_err(path, "is not a JSON object of token → id"))?;
        for (tok, id) in obj {
            let id = id
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| file_err(path, format!("token {tok:?} has id {id}, expected an integer")))?;
            if let Some(prev) = by_id.insert(id, tok.clone()) {
                if prev != *tok {
                    return Err(file_err(path, format!("id {id} is given to both {prev:?} and {tok:?}")));
                }
            }
        }
        Ok(())
    };
    add(&mut by_id, &vocab_path, &read_json(&vocab_path)?)?;
    let base_len = by_id.len();
    let added_path = dir.join("added_tokens.json");
    let added: Value = if added_path.is_file() { read_json(&added_path)? } else { Value::Object(Default::default()) };
    add(&mut by_id, &added_path, &added)?;
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg = if cfg_path.is_file() { read_json(&cfg_path)? } else { Value::Null };
    let mut special: Vec<String> = Vec::new();
    if let Some(dec) = cfg.get("added_tokens_decoder").and_then(Value::as_object) {
        for (id, t) in dec {
            let content = token_content(t).unwrap_or_default();
            let id: u32 = id.parse().map_err(|_| file_err(&cfg_path, format!("added_tokens_decoder key '{id}' is not an id")))?;
            by_id.entry(id).or_insert_with(|| content.clone());
            if t.get("special").and_then(Value::as_bool).unwrap_or(false) {
                special.push(content);
            }
        }
    }
    let eos_str = cfg.get("eos_token").and_then(token_content).unwrap_or_else(|| "<|endoftext|>".to_string());
    special.push(eos_str.clone());
    if let Some(b) = cfg.get("bos_token").and_then(token_content) {
        special.push(b);
    }
    let n = by_id.keys().max().map(|m| *m as usize + 1).unwrap_or(0);
    let added_names: Vec<&String> = added.as_object().map(|o| o.keys().collect()).unwrap_or_default();
    let mut tokens = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for id in 0..n as u32 {
        match by_id.get(&id) {
            Some(t) => {
                tokens.push(t.clone());
                types.push(if special.contains(t) {
                    tk::TYPE_CONTROL
                } else if id as usize >= base_len || added_names.contains(&t) {
                    tk::TYPE_USER_DEFINED
                } else {
                    tk::TYPE_NORMAL
                });
            }
            None => {
                tokens.push(format!("[PAD{id}]"));
                types.push(tk::TYPE_UNUSED);
            }
        }
    }
    let text = std::fs::read_to_string(&merges_path).map_err(|e| file_err(&merges_path, format!("cannot read: {e}")))?;
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.is_empty() {
            continue;
        }
        let (a, b) = line
            .split_once(' ')
            .ok_or_else(|| file_err(&merges_path, format!("line {}: {line:?} is not 'left right'", i + 1)))?;
        if !index.contains_key(a) || !index.contains_key(b) || !index.contains_key(format!("{a}{b}").as_str()) {
            return Err(file_err(
                &merges_path,
                format!("line {}: merge {line:?} uses or makes a token missing from vocab.json", i + 1),
            ));
        }
        merges.push(line.to_string());
    }
    let eos = *index
        .get(eos_str.as_str())
        .ok_or_else(|| file_err(&cfg_path, format!("eos_token {eos_str:?} is not in the vocabulary")))? as u32;
    let bos = cfg.get("bos_token").and_then(token_content).and_then(|b| index.get(b.as_str()).map(|i| *i as u32));
    let pad = cfg.get("pad_token").and_then(token_content).and_then(|b| index.get(b.as_str()).map(|i| *i as u32));
    Ok(Vocab { tokens, token_types: types, merges, pre: "phi-2", eos, bos, pad, normalizer: "none", ignore_merges: false })
}

const ARCADE_SPECIALS: [&str; 32] = [
    "<|endoftext|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<gh_stars>",
    "<filename>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<empty_output>",
    "<commit_before>",
    "<commit_msg>",
    "<commit_after>",
    "<reponame>",
    "<|endofprompt|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|pause|>",
    "<|reg0|>",
    "<|reg1|>",
    "<|reg2|>",
    "<|reg3|>",
    "<|reg4|>",
    "<|reg5|>",
    "<|reg6|>",
    "<|reg7|>",
    "<|extra0|>",
];

fn qwen_specials() -> Vec<String> {
    let mut v: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].iter().map(|s| s.to_string()).collect();
    v.extend((0..205).map(|i| format!("<|extra_{i}|>")));
    v
}

/// Reads a tiktoken rank file: `base64(token bytes) rank` per line; ranks must be 0..n-1.
fn read_ranks(path: &Path) -> Result<Vec<Vec<u8>>> {
    if !path.is_file() {
        return Err(file_err(path, "missing: the family's tokenizer file"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let mut by_rank: Vec<Option<Vec<u8>>> = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let mut it = line.split_whitespace();
        let (Some(b64), Some(rank), None) = (it.next(), it.next(), it.next()) else {
            return Err(file_err(path, format!("line {}: expected 'base64 rank'", i + 1)));
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| file_err(path, format!("line {}: bad base64: {e}", i + 1)))?;
        let rank: usize = rank.parse().map_err(|_| file_err(path, format!("line {}: rank '{rank}' is not a number", i + 1)))?;
        if rank >= 10_000_000 {
            return Err(file_err(path, format!("line {}: rank {rank} is implausibly large", i + 1)));
        }
        if by_rank.len() <= rank {
            by_rank.resize(rank + 1, None);
        }
        if by_rank[rank].replace(bytes).is_some() {
            return Err(file_err(path, format!("line {}: rank {rank} appears twice", i + 1)));
        }
    }
    by_rank
        .into_iter()
        .enumerate()
        .map(|(r, t)| t.ok_or_else(|| file_err(path, format!("rank {r} is missing: ranks must be 0..n-1"))))
        .collect()
}

/// The two parts BPE with ranks below `max_rank` splits `token` into (llama.cpp's merge recovery).
fn recover_merge<'a>(token: &'a [u8], max_rank: usize, ranks: &HashMap<&[u8], usize>) -> Option<(&'a [u8], &'a [u8])> {
    let mut parts: Vec<&[u8]> = (0..token.len()).map(|i| &token[i..i + 1]).collect();
    loop {
        let mut best: Option<(usize, usize)> = None;
        let mut start = 0;
        for i in 0..parts.len() - 1 {
            let len = parts[i].len() + parts[i + 1].len();
            if let Some(&r) = ranks.get(&token[start..start + len]) {
                if r < max_rank && best.is_none_or(|(_, br)| r < br) {
                    best = Some((i, r));
                }
            }
            start += parts[i].len();
        }
        let Some((i, _)) = best else { break };
        let offset: usize = parts[..i].iter().map(|p| p.len()).sum();
        let len = parts[i].len() + parts[i + 1].len();
        parts[i] = &token[offset..offset + len];
        parts.remove(i + 1);
        if parts.len() == 1 {
            break;
        }
    }
    (parts.len() == 2).then(|| (parts[0], parts[1]))
}

fn load_tiktoken(dir: &Path, file: &str, family: Family, config: &Value) -> Result<Vocab> {
    let path = dir.join(file);
    let ranked = read_ranks(&path)?;
    let map = byte_to_unicode();
    let ranks: HashMap<&[u8], usize> = ranked.iter().enumerate().map(|(r, t)| (t.as_slice(), r)).collect();
    if ranks.len() != ranked.len() {
        return Err(file_err(&path, "the same token bytes appear under two ranks"));
    }
    let mut merges = Vec::new();
    for (rank, token) in ranked.iter().enumerate().filter(|(_, t)| t.len() > 1) {
        let (a, b) = recover_merge(token, rank, &ranks).ok_or_else(|| {
            file_err(
                &path,
                format!(
                    "token of rank {rank} ({:?}) cannot be built by merging two lower-ranked tokens",
                    String::from_utf8_lossy(token)
                ),
            )
        })?;
        merges.push(format!("{} {}", unicode_string(a, &map), unicode_string(b, &map)));
    }
    let mut tokens: Vec<String> = ranked.iter().map(|t| unicode_string(t, &map)).collect();
    let mut types = vec![tk::TYPE_NORMAL; tokens.len()];
    let (specials, pre): (Vec<String>, &str) = match family {
        Family::StableLm => {
            // Arcade100k leaves one unused id between the ranks and the specials.
            tokens.push(format!("[PAD{}]", tokens.len()));
            types.push(tk::TYPE_UNUSED);
            (ARCADE_SPECIALS.iter().map(|s| s.to_string()).collect(), "stablelm2")
        }
        _ => (qwen_specials(), "qwen2"),
    };
    let first_special = tokens.len() as u32;
    for s in specials {
        tokens.push(s);
        types.push(tk::TYPE_CONTROL);
    }
    let pad = config.get("pad_token_id").and_then(Value::as_u64).map(|p| p as u32).filter(|p| (*p as usize) < tokens.len());
    let (eos, bos) = match family {
        Family::StableLm => (first_special, Some(first_special)),
        _ => (first_special, None),
    };
    if let Some(id) = config.get("eos_token_id").and_then(Value::as_u64) {
        if id as u32 != eos {
            return Err(ConvertError::Config {
                path: dir.join("config.json").display().to_string(),
                key: "eos_token_id".into(),
                what: format!("is {id}, but {file} puts <|endoftext|> at {eos}"),
            });
        }
    }
    Ok(Vocab { tokens, token_types: types, merges, pre, eos, bos, pad, normalizer: "nfc", ignore_merges: true })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_gpt2s() {
        let m = byte_to_unicode();
        assert_eq!(m[b'A' as usize], 'A');
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
        let mut all: Vec<char> = m.to_vec();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 256);
    }

    #[test]
    fn merge_recovery_follows_ranks() {
        let toks: Vec<&[u8]> = vec![b"a", b"b", b"c", b"ab", b"abc", b"bc"];
        let ranks: HashMap<&[u8], usize> = toks.iter().enumerate().map(|(i, t)| (*t, i)).collect();
        assert_eq!(recover_merge(b"ab", 3, &ranks), Some((&b"a"[..], &b"b"[..])));
        assert_eq!(recover_merge(b"abc", 4, &ranks), Some((&b"ab"[..], &b"c"[..])));
        // "bc" (rank 5) needs nothing below it but single bytes.
        assert_eq!(recover_merge(b"bc", 5, &ranks), Some((&b"b"[..], &b"c"[..])));
    }
}
