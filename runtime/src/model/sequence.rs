//! One generation in progress: its KV cache, the tokens so far, the sampler's state and the stop rules.
//! [`super::Model::generate`] drives one sequence token by token; the server's scheduler drives many,
//! one batched decode step ([`super::Model::decode_rows`]) for all of them at once. Both go through
//! [`Sequence::accept`], so a sequence stops and streams the same way wherever it runs.

use crate::backend::Backend;
use crate::error::{Result, RuntimeError};
use crate::model::attention::KvCache;
use crate::model::{GenerateOptions, StopReason};
use crate::rng::Rng;
use crate::sampler::{self, SamplingOptions};
use crate::tokenizer::Tokenizer;

pub struct Sequence<B: Backend> {
    pub cache: KvCache<B>,
    /// The generated tokens (the prompt's are in the cache only).
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    sampling: SamplingOptions,
    max_new_tokens: usize,
    ignore_eos: bool,
    rng: Rng,
    /// The model's end-of-turn string (unless `ignore_eos`), then the caller's stop strings.
    stops: Vec<String>,
    /// The text so far, cut before the first stop string once one appears.
    text: String,
    /// Bytes of `text` handed out as final so far.
    emitted: usize,
    pub stop: Option<StopReason>,
}

impl<B: Backend> Sequence<B> {
    /// A sequence for a prompt of `prompt_tokens` positions; errors when the prompt plus
    /// `o.max_new_tokens` does not fit in `context_length`. `stops` are extra stop strings (OpenAI's `stop`).
    pub fn new(
        cache: KvCache<B>,
        prompt_tokens: usize,
        context_length: usize,
        o: &GenerateOptions,
        sep2: &str,
        stops: &[String],
    ) -> Result<Sequence<B>> {
        if prompt_tokens + o.max_new_tokens > context_length {
            return Err(RuntimeError::Prompt(format!(
                "{prompt_tokens} prompt positions + {} new tokens exceed the context length {context_length}",
                o.max_new_tokens
            )));
        }
        let mut all = Vec::new();
        if !o.ignore_eos && !sep2.is_empty() {
            all.push(sep2.to_string());
        }
        all.extend(stops.iter().filter(|s| !s.is_empty()).cloned());
        Ok(Sequence {
            cache,
            tokens: Vec::new(),
            prompt_tokens,
            sampling: o.sampling.clone(),
            max_new_tokens: o.max_new_tokens,
            ignore_eos: o.ignore_eos,
            rng: Rng::new(o.sampling.seed),
            stops: all,
            text: String::new(),
            emitted: 0,
            stop: None,
        })
    }

    /// Takes the logits of the last position fed: samples the next token and applies the stop rules.
    /// Returns the text that became final with it (possibly empty) and the token to feed next, or `None`
    /// when the sequence has ended ([`Sequence::stop`] says why; the returned text is then the rest).
    pub fn accept(&mut self, tok: &Tokenizer, logits: &[f32]) -> Result<(String, Option<u32>)> {
        if self.stop.is_some() {
            return Ok((String::new(), None));
        }
        if self.tokens.len() >= self.max_new_tokens {
            return Ok(self.finish(StopReason::MaxNewTokens));
        }
        let next = sampler::sample(logits, &self.tokens, &self.sampling, &mut self.rng);
        if next == tok.eos && !self.ignore_eos {
            return Ok(self.finish(StopReason::Eos));
        }
        self.tokens.push(next);
        self.text = tok.decode(&self.tokens, true)?;
        if let Some(cut) = self.stops.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            self.text.truncate(cut);
            return Ok(self.finish(StopReason::StopString));
        }
        if self.tokens.len() == self.max_new_tokens {
            return Ok(self.finish(StopReason::MaxNewTokens));
        }
        // Final is what no later token can change: never half of a multi-byte character, and never the
        // start of what may become a stop string.
        let held = self.stops.iter().map(|s| held_back(&self.text, s)).max().unwrap_or(0);
        let ready = if self.text.ends_with('\u{FFFD}') { self.emitted } else { self.text.len() - held };
        let piece = self.take_until(ready);
        Ok((piece, Some(next)))
    }

    /// The answer so far, as [`super::Answer::text`] gives it (trimmed).
    pub fn text(&self) -> &str {
        self.text.trim()
    }

    fn finish(&mut self, why: StopReason) -> (String, Option<u32>) {
        self.stop = Some(why);
        (self.take_until(self.text.len()), None)
    }

    fn take_until(&mut self, end: usize) -> String {
        if end > self.emitted && self.text.is_char_boundary(self.emitted) && self.text.is_char_boundary(end) {
            let piece = self.text[self.emitted..end].to_string();
            self.emitted = end;
            piece
        } else {
            String::new()
        }
    }
}

/// The length of the longest end of `text` that is a proper start of `stop` (it may still become `stop`).
fn held_back(text: &str, stop: &str) -> usize {
    (1..stop.len()).rev().find(|&n| stop.is_char_boundary(n) && text.ends_with(&stop[..n])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::held_back;

    #[test]
    fn holds_back_only_a_possible_stop_start() {
        assert_eq!(held_back("hello </", "</s>"), 2);
        assert_eq!(held_back("hello <", "</s>"), 1);
        assert_eq!(held_back("hello", "</s>"), 0);
        assert_eq!(held_back("a </s", "</s>"), 3);
        assert_eq!(held_back("é", "éa"), 2);
    }
}
