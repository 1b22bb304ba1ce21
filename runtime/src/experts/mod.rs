//! Expert residency (design.md "Expert residency"): only the routed experts are in fast memory.
//!
//! ```text
//! GGUF file (slow tier) ──ExpertStore (layout + pread/fadvise source)──► ExpertCache (slots in RAM)
//!                                                                         ▲ decisions: SlotTable + Policy
//! Moe::forward: route → begin_layer → ensure(chunk) → [prefetch(next layer's guess)] → compute → unpin
//! --route-trace ─► trace.jsonl ─► replay (same SlotTable, modelled time)
//! ```
//! Without `--expert-ram` every expert is read straight from the file's map (all resident, as the
//! page cache allows); with it, experts are copied into at most `budget / slot_bytes` slots and
//! their pages are dropped from the page cache when evicted, so RSS stays within the budget.

pub mod cache;
pub mod replay;
pub mod store;
pub mod table;
pub mod trace;

/// Experts per token in every MoE-LLaVA model (DeepSpeed top-2 gating).
pub const TOP_K: usize = 2;

pub use cache::{CacheOptions, ExpertCache, Resident};
pub use store::{ExpertSource, ExpertStore, FileSource};
pub use table::{Counters, Policy, SlotTable};

/// A RAM budget for experts: bytes, or a share of all experts (`--expert-ram 2GiB` / `--expert-ram 50%`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    Bytes(u64),
    Percent(f64),
}

impl std::str::FromStr for Budget {
    type Err = String;
    fn from_str(s: &str) -> Result<Budget, String> {
        let t = s.trim();
        let bad =
            || format!("'{s}': expected bytes (e.g. 1500000000, 512MiB, 2GB, 1.5G) or a percentage of the experts (e.g. 50%)");
        if let Some(p) = t.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            return if p > 0.0 && p <= 100.0 {
                Ok(Budget::Percent(p))
            } else {
                Err(format!("'{s}': the percentage must be in (0, 100]"))
            };
        }
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num.parse().map_err(|_| bad())?;
        let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "k" | "kb" => 1e3,
            "kib" => 1024.0,
            "m" | "mb" => 1e6,
            "mib" => 1024.0 * 1024.0,
            "g" | "gb" => 1e9,
            "gib" => 1024.0 * 1024.0 * 1024.0,
            _ => return Err(bad()),
        };
        Ok(Budget::Bytes((n * mult) as u64))
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Budget::Bytes(b) => write!(f, "{b} bytes"),
            Budget::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Budget {
    /// Slots this budget buys: whole slots of `slot_bytes`, or the percentage of `n_experts` (rounded
    /// down; the same rule as `replay-route --budget P%`).
    pub fn slots(&self, slot_bytes: usize, n_experts: usize) -> usize {
        match *self {
            Budget::Bytes(b) => (b / slot_bytes.max(1) as u64) as usize,
            Budget::Percent(p) => ((p / 100.0) * n_experts as f64 + 1e-9).floor() as usize,
        }
    }
}

/// Counters of a run, as `run --json` / `bench --json` print them.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CacheReport {
    pub slots: usize,
    pub slot_bytes: usize,
    pub budget_bytes: u64,
    pub expert_bytes_total: u64,
    pub policy: Policy,
    pub prefetch: bool,
    pub hit_rate: f64,
    pub prefetch_accuracy: f64,
    pub total: Counters,
    pub layers: std::collections::BTreeMap<usize, Counters>,
}

impl ExpertCache {
    pub fn report(&self) -> CacheReport {
        let layers = self.counters();
        let mut total = Counters::default();
        layers.values().for_each(|c| total.add(c));
        let o = self.options();
        CacheReport {
            slots: o.slots,
            slot_bytes: self.store().slot_bytes(),
            budget_bytes: (o.slots * self.store().slot_bytes()) as u64,
            expert_bytes_total: self.store().total_bytes(),
            policy: o.policy,
            prefetch: o.prefetch,
            hit_rate: total.hit_rate(),
            prefetch_accuracy: total.prefetch_accuracy(),
            total,
            layers,
        }
    }
}

impl CacheReport {
    /// A few lines for `--verbose`.
    pub fn summary(&self) -> String {
        let t = &self.total;
        let mut s = format!(
            "expert cache: {} slots × {:.1} MiB ({:.0}% of {:.1} MiB of experts), policy {}, prefetch {}\n  hits {} · prefetch hits {} · misses {} · hit rate {:.1}% · prefetches {} ({} wasted, accuracy {:.1}%) · loaded {:.1} MiB in {:.2} s · stalled {:.2} s",
            self.slots,
            self.slot_bytes as f64 / 1048576.0,
            100.0 * self.budget_bytes as f64 / self.expert_bytes_total.max(1) as f64,
            self.expert_bytes_total as f64 / 1048576.0,
            self.policy,
            if self.prefetch { "on" } else { "off" },
            t.hits,
            t.prefetch_hits,
            t.misses,
            100.0 * self.hit_rate,
            t.prefetch_issued,
            t.prefetch_wasted,
            100.0 * self.prefetch_accuracy,
            t.bytes_loaded as f64 / 1048576.0,
            t.load_s,
            t.stall_s
        );
        for (l, c) in &self.layers {
            s.push_str(&format!(
                "\n  layer {l:>3}: hits {} · prefetch hits {} · misses {} · wasted {} · stall {:.3} s",
                c.hits, c.prefetch_hits, c.misses, c.prefetch_wasted, c.stall_s
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse() {
        assert_eq!("512MiB".parse::<Budget>(), Ok(Budget::Bytes(512 << 20)));
        assert_eq!("1.5G".parse::<Budget>(), Ok(Budget::Bytes(1_500_000_000)));
        assert_eq!("25%".parse::<Budget>(), Ok(Budget::Percent(25.0)));
        assert!("150%".parse::<Budget>().is_err());
        assert!("lots".parse::<Budget>().is_err());
        assert!("5 parsecs".parse::<Budget>().is_err());
        assert_eq!(Budget::Percent(25.0).slots(100, 64), 16);
        assert_eq!(Budget::Bytes(1000).slots(300, 64), 3);
    }
}
