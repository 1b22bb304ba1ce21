//! Counters for `GET /metrics`, in Prometheus' text format: requests by outcome, queue depth, active
//! sequences, generated tokens, decode speed, the time-to-first-token histogram and the expert cache.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use moellava_runtime::experts::CacheReport;

/// Upper bounds (seconds) of the TTFT histogram's buckets.
const TTFT_BUCKETS: [f64; 12] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// How a request ended.
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    Completed,
    /// The client went away before the answer was finished.
    Cancelled,
    /// Refused before it was queued (bad request, auth).
    Invalid,
    /// Refused because the queue was full (503).
    Rejected,
    /// Failed while running.
    Failed,
}

const OUTCOMES: [(Outcome, &str); 5] = [
    (Outcome::Completed, "completed"),
    (Outcome::Cancelled, "cancelled"),
    (Outcome::Invalid, "invalid"),
    (Outcome::Rejected, "rejected"),
    (Outcome::Failed, "failed"),
];

#[derive(Default)]
pub struct Metrics {
    outcomes: [AtomicU64; 5],
    pub queued: AtomicU64,
    pub active: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Tokens per second of the latest decode step (all sequences together), as f64 bits.
    decode_tps_bits: AtomicU64,
    ttft: Mutex<Histogram>,
}

#[derive(Default)]
struct Histogram {
    counts: [u64; TTFT_BUCKETS.len()],
    sum: f64,
    n: u64,
}

impl Metrics {
    pub fn count(&self, o: Outcome) {
        self.outcomes[o as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn observe_ttft(&self, seconds: f64) {
        let mut h = self.ttft.lock().unwrap_or_else(|e| e.into_inner());
        for (b, c) in TTFT_BUCKETS.iter().zip(h.counts.iter_mut()) {
            if seconds <= *b {
                *c += 1;
            }
        }
        h.sum += seconds;
        h.n += 1;
    }

    pub fn set_decode_tps(&self, tps: f64) {
        self.decode_tps_bits.store(tps.to_bits(), Ordering::Relaxed);
    }

    /// The text format, with the expert cache's counters when `--expert-ram` is on.
    pub fn render(&self, model: &str, cache: Option<CacheReport>) -> String {
        let mut s = String::new();
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let _ = writeln!(s, "# HELP moellava_requests_total Chat completion requests by outcome.");
        let _ = writeln!(s, "# TYPE moellava_requests_total counter");
        for (o, name) in OUTCOMES {
            let _ =
                writeln!(s, "moellava_requests_total{{model=\"{model}\",outcome=\"{name}\"}} {}", g(&self.outcomes[o as usize]));
        }
        for (name, help, kind, v) in [
            ("moellava_queue_depth", "Requests waiting for a batch slot.", "gauge", g(&self.queued) as f64),
            ("moellava_active_sequences", "Sequences in the running batch.", "gauge", g(&self.active) as f64),
            ("moellava_prompt_tokens_total", "Prompt positions prefilled.", "counter", g(&self.prompt_tokens) as f64),
            ("moellava_generated_tokens_total", "Tokens generated.", "counter", g(&self.generated_tokens) as f64),
            (
                "moellava_decode_tokens_per_second",
                "Tokens per second of the latest decode step, all sequences together.",
                "gauge",
                f64::from_bits(g(&self.decode_tps_bits)),
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{model=\"{model}\"}} {v}");
        }
        let h = self.ttft.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(s, "# HELP moellava_ttft_seconds Time from a request's arrival to its first token.");
        let _ = writeln!(s, "# TYPE moellava_ttft_seconds histogram");
        for (b, c) in TTFT_BUCKETS.iter().zip(h.counts) {
            let _ = writeln!(s, "moellava_ttft_seconds_bucket{{model=\"{model}\",le=\"{b}\"}} {c}");
        }
        let _ = writeln!(s, "moellava_ttft_seconds_bucket{{model=\"{model}\",le=\"+Inf\"}} {}", h.n);
        let _ = writeln!(s, "moellava_ttft_seconds_sum{{model=\"{model}\"}} {}", h.sum);
        let _ = writeln!(s, "moellava_ttft_seconds_count{{model=\"{model}\"}} {}", h.n);
        if let Some(r) = cache {
            for (name, help, v) in [
                (
                    "moellava_expert_cache_hits_total",
                    "Routed experts found resident (or loading by prefetch).",
                    r.total.hits + r.total.prefetch_hits,
                ),
                (
                    "moellava_expert_cache_misses_total",
                    "Routed experts read from the file while the forward waited.",
                    r.total.misses,
                ),
            ] {
                let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{model=\"{model}\"}} {v}");
            }
        }
        s
    }
}
