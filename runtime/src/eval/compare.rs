//! Is a difference between two POPE runs real? Paired statistics on the same questions:
//! answer agreement, McNemar's exact test on per-question correctness, and a stratified bootstrap
//! interval for the difference of the headline mean F1.

use std::collections::BTreeMap;

use crate::eval::pope::{CategoryScore, Counts};
use crate::rng::Rng;

/// Two-sided exact McNemar p-value for `b` and `c` discordant pairs (binomial, p = ½).
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // P(X ≤ k) for X ~ Bin(n, ½), in log space to stay exact-ish for large n.
    let ln_half_n = -(n as f64) * std::f64::consts::LN_2;
    let mut ln_choose = 0.0f64; // ln C(n, 0)
    let mut cdf = 0.0f64;
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        cdf += (ln_choose + ln_half_n).exp();
    }
    (2.0 * cdf).min(1.0)
}

/// Mean F1 over categories of (prediction, label) pairs; `None` if a category's F1 is undefined.
pub fn mean_f1(pairs: &BTreeMap<String, Vec<(bool, bool)>>) -> Option<f64> {
    let mut f1s = Vec::new();
    for p in pairs.values() {
        let mut c = Counts::default();
        p.iter().for_each(|(pred, label)| c.add(*pred, *label));
        f1s.push(CategoryScore::from_counts(c).f1?);
    }
    (!f1s.is_empty()).then(|| f1s.iter().sum::<f64>() / f1s.len() as f64)
}

/// 95 % interval of mean-F1(B) − mean-F1(A) from `n` bootstrap resamples of the questions, stratified by
/// category (the two runs' pairs are indexed by the same questions). Seeded: the same every time.
pub fn bootstrap_delta_f1(
    a: &BTreeMap<String, Vec<(bool, bool)>>,
    b: &BTreeMap<String, Vec<(bool, bool)>>,
    n: usize,
    seed: u64,
) -> Option<(f64, f64)> {
    let mut rng = Rng::new(seed);
    let mut deltas = Vec::with_capacity(n);
    for _ in 0..n {
        let (mut ra, mut rb) = (BTreeMap::new(), BTreeMap::new());
        for (cat, pa) in a {
            let pb = b.get(cat)?;
            let len = pa.len().min(pb.len());
            if len == 0 {
                continue;
            }
            let idx: Vec<usize> = (0..len).map(|_| (rng.next_u64() % len as u64) as usize).collect();
            ra.insert(cat.clone(), idx.iter().map(|i| pa[*i]).collect::<Vec<_>>());
            rb.insert(cat.clone(), idx.iter().map(|i| pb[*i]).collect::<Vec<_>>());
        }
        if let (Some(fa), Some(fb)) = (mean_f1(&ra), mean_f1(&rb)) {
            deltas.push(fb - fa);
        }
    }
    if deltas.len() < n / 2 {
        return None;
    }
    deltas.sort_by(f64::total_cmp);
    let q = |p: f64| deltas[((p * (deltas.len() - 1) as f64).round() as usize).min(deltas.len() - 1)];
    Some((q(0.025), q(0.975)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcnemar_matches_binomial_tables() {
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // b = 0, c = 6: 2 · 0.5^6 = 0.03125.
        assert!((mcnemar_exact(0, 6) - 0.031_25).abs() < 1e-12);
        // b = 3, c = 5: 2 · P(X ≤ 3 | n = 8) = 2 · 93/256.
        assert!((mcnemar_exact(3, 5) - 2.0 * 93.0 / 256.0).abs() < 1e-12);
        assert_eq!(mcnemar_exact(10, 10), 1.0);
    }

    #[test]
    fn bootstrap_of_identical_runs_is_zero() {
        let mut p = BTreeMap::new();
        p.insert("random".to_string(), (0..100).map(|i| (i % 3 != 0, i % 2 == 0)).collect::<Vec<_>>());
        let (lo, hi) = bootstrap_delta_f1(&p, &p, 200, 1).unwrap();
        assert_eq!((lo, hi), (0.0, 0.0));
    }
}
