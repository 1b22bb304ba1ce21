//! A memory-bandwidth probe: how fast all threads can stream a buffer much larger than the caches.
//! Decode is memory-bound, so `moellava bench` states decode speed as a fraction of this roofline.

use rayon::prelude::*;

/// Best of 3 passes reading `bytes` (rounded to 8) in parallel, in GB/s.
pub fn read_gb_s(bytes: usize) -> f64 {
    let buf: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    let mut best = 0f64;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let sum = sum_parallel(&buf);
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max(buf.len() as f64 * 8.0 / dt / 1e9);
    }
    best
}

/// Wrapping sum of `buf`, read once by all threads in 512 KiB chunks (the probe's inner loop).
pub fn sum_parallel(buf: &[u64]) -> u64 {
    buf.par_chunks(1 << 16).map(|c| c.iter().fold(0u64, |a, v| a.wrapping_add(*v))).reduce(|| 0, u64::wrapping_add)
}
