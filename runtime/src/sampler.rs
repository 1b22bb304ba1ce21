//! Next-token choice: greedy at temperature 0 (argmax, first index on ties, as torch), otherwise
//! repetition penalty → temperature → top-k → top-p → a draw from a seeded generator.

use crate::rng::Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingOptions {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl SamplingOptions {
    /// The ranges every front end enforces: temperature ≥ 0, top_p in (0, 1], repetition_penalty > 0.
    pub fn validate(&self) -> Result<(), String> {
        let ok = self.temperature >= 0.0 && self.top_p > 0.0 && self.top_p <= 1.0 && self.repetition_penalty > 0.0;
        if ok {
            Ok(())
        } else {
            Err(format!(
                "temperature must be ≥ 0, top_p in (0, 1], repetition_penalty > 0 (got {}, {}, {})",
                self.temperature, self.top_p, self.repetition_penalty
            ))
        }
    }
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Chooses the next token from `logits` given the tokens generated so far.
pub fn sample(logits: &[f32], history: &[u32], o: &SamplingOptions, rng: &mut Rng) -> u32 {
    let mut l = logits.to_vec();
    if o.repetition_penalty != 1.0 {
        // CTRL / transformers' RepetitionPenaltyLogitsProcessor.
        for &t in history {
            if let Some(v) = l.get_mut(t as usize) {
                *v = if *v > 0.0 { *v / o.repetition_penalty } else { *v * o.repetition_penalty };
            }
        }
    }
    if o.temperature <= 0.0 {
        return argmax(&l);
    }
    let mut idx: Vec<usize> = (0..l.len()).collect();
    idx.sort_by(|a, b| l[*b].total_cmp(&l[*a]).then(a.cmp(b)));
    if o.top_k > 0 {
        idx.truncate(o.top_k);
    }
    let max = l[idx[0]] as f64;
    let mut probs: Vec<f64> = idx.iter().map(|i| ((l[*i] as f64 - max) / o.temperature as f64).exp()).collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if o.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|p| {
            acc += p;
            acc >= o.top_p as f64
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        idx.truncate(keep);
        probs.truncate(keep);
        let s: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= s);
    }
    let mut u = rng.uniform();
    for (i, p) in idx.iter().zip(&probs) {
        if u < *p {
            return *i as u32;
        }
        u -= p;
    }
    *idx.last().unwrap_or(&0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        let o = SamplingOptions::default();
        assert_eq!(sample(&[0.0, 1.0, 5.0], &[], &o, &mut Rng::new(0)), 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_repeat() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let o = SamplingOptions { temperature: 0.8, top_k: 1, ..Default::default() };
        assert_eq!(sample(&logits, &[], &o, &mut Rng::new(3)), argmax(&logits));
        let o = SamplingOptions { temperature: 1.0, top_p: 0.9, ..Default::default() };
        let a: Vec<u32> = {
            let mut r = Rng::new(9);
            (0..20).map(|_| sample(&logits, &[], &o, &mut r)).collect()
        };
        let b: Vec<u32> = {
            let mut r = Rng::new(9);
            (0..20).map(|_| sample(&logits, &[], &o, &mut r)).collect()
        };
        assert_eq!(a, b);
    }
}
