//! The VRAM expert tier's decisions, apart from the device (so they are tested without a GPU):
//! which experts hold VRAM slots under a byte budget (least recently used leaves first), what a miss
//! does (`--miss-policy`), and how `--gpu-mem` becomes a byte budget.
//!
//! ```text
//! matmul(x, expert W) ─ plan(W) ─► Hit                → matvec on the resident copy
//!                                 Load { evict }      → free `evict`, copy W host→VRAM, matvec
//!                                 Cpu                 → x to host, ggml on the mapped W, result back
//!                                 Stream              → W larger than the whole budget: copy, use, free
//! ```

use std::collections::HashMap;

use crate::experts::Budget;

/// What to do when a routed expert is not in VRAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MissPolicy {
    /// Copy the expert into a VRAM slot (evicting the least recently used) and compute there.
    Copy,
    /// Compute the expert on the CPU from host memory; VRAM is left as it is.
    Cpu,
    /// Per miss, the faster of the two by the measured PCIe and CPU-memory speeds (as Fiddler does):
    /// the CPU for a call of at most [`AUTO_CPU_MAX_ROWS`] rows when it reads the expert faster than
    /// PCIe copies it, else copy.
    Auto,
}

/// Above this many rows (a prompt, not a decode step) a miss is always copied: the CPU's compute,
/// not its memory, would bound it.
pub const AUTO_CPU_MAX_ROWS: usize = 4;

impl std::str::FromStr for MissPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<MissPolicy, String> {
        match s {
            "copy" => Ok(MissPolicy::Copy),
            "cpu" => Ok(MissPolicy::Cpu),
            "auto" => Ok(MissPolicy::Auto),
            _ => Err(format!("unknown miss policy `{s}` (expected copy, cpu or auto)")),
        }
    }
}

/// `--gpu-mem`: VRAM for experts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GpuMem {
    /// Free VRAM after the dense weights, minus [`AUTO_MARGIN_BYTES`] for the KV cache and scratch.
    Auto,
    /// Bytes, or a share of all experts' bytes.
    Budget(Budget),
}

/// What `--gpu-mem auto` leaves free for the KV cache, activations and the prefill scratch.
pub const AUTO_MARGIN_BYTES: u64 = 1 << 30;

impl std::str::FromStr for GpuMem {
    type Err = String;
    fn from_str(s: &str) -> Result<GpuMem, String> {
        if s.trim() == "auto" {
            Ok(GpuMem::Auto)
        } else {
            s.parse().map(GpuMem::Budget)
        }
    }
}

impl GpuMem {
    /// The expert budget in bytes: `free_vram` is what the device has free before any weight is
    /// uploaded; `dense_bytes` the weights that always stay in VRAM; `expert_bytes` all experts.
    pub fn bytes(&self, free_vram: u64, dense_bytes: u64, expert_bytes: u64) -> u64 {
        match self {
            GpuMem::Auto => free_vram.saturating_sub(dense_bytes).saturating_sub(AUTO_MARGIN_BYTES),
            GpuMem::Budget(Budget::Bytes(b)) => *b,
            GpuMem::Budget(Budget::Percent(p)) => (expert_bytes as f64 * p / 100.0) as u64,
        }
    }
}

/// The outcome of asking for an expert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan<K> {
    Hit,
    /// Evict these (least recently used first), then copy the expert in.
    Load {
        evict: Vec<K>,
    },
    /// Compute on the CPU (miss policy).
    Cpu,
    /// Larger than the whole budget: copy for this call only.
    Stream,
}

/// Counters of the VRAM tier (reported by `bench` and `run --json`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VramCounters {
    pub hits: u64,
    pub misses: u64,
    pub copied_bytes: u64,
    pub cpu_computed: u64,
    pub evictions: u64,
}

/// Which experts hold VRAM, under a byte budget, least recently used evicted first.
pub struct VramPlan<K> {
    budget: u64,
    used: u64,
    tick: u64,
    resident: HashMap<K, (u64, u64)>, // key → (bytes, last use)
    pub counters: VramCounters,
}

impl<K: Clone + Eq + std::hash::Hash> VramPlan<K> {
    pub fn new(budget: u64) -> VramPlan<K> {
        VramPlan { budget, used: 0, tick: 0, resident: HashMap::new(), counters: VramCounters::default() }
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes of experts resident now (never above the budget).
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Decides for expert `key` of `bytes`; `cpu_wins` says whether the miss policy prefers the CPU
    /// for this call. A `Load` is recorded as done (the caller performs it).
    pub fn plan(&mut self, key: &K, bytes: u64, cpu_wins: bool) -> Plan<K> {
        self.tick += 1;
        if let Some(e) = self.resident.get_mut(key) {
            e.1 = self.tick;
            self.counters.hits += 1;
            return Plan::Hit;
        }
        self.counters.misses += 1;
        if cpu_wins {
            self.counters.cpu_computed += 1;
            return Plan::Cpu;
        }
        self.counters.copied_bytes += bytes;
        if bytes > self.budget {
            return Plan::Stream;
        }
        let mut evict = Vec::new();
        while self.used + bytes > self.budget {
            let (k, (b, _)) = self
                .resident
                .iter()
                .min_by_key(|(_, (_, last))| *last)
                .map(|(k, v)| (k.clone(), *v))
                .expect("used > 0 means something is resident");
            self.resident.remove(&k);
            self.used -= b;
            self.counters.evictions += 1;
            evict.push(k);
        }
        self.resident.insert(key.clone(), (bytes, self.tick));
        self.used += bytes;
        Plan::Load { evict }
    }
}

/// The miss rule of [`MissPolicy::Auto`] (and the fixed ones): whether this call computes on the CPU.
pub fn cpu_wins(policy: MissPolicy, rows: usize, pcie_gb_s: f64, cpu_gb_s: f64) -> bool {
    match policy {
        MissPolicy::Copy => false,
        MissPolicy::Cpu => true,
        MissPolicy::Auto => rows <= AUTO_CPU_MAX_ROWS && cpu_gb_s > pcie_gb_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_expert_leaves_first_and_budget_holds() {
        let mut p = VramPlan::new(300);
        assert_eq!(p.plan(&"a", 100, false), Plan::Load { evict: vec![] });
        assert_eq!(p.plan(&"b", 100, false), Plan::Load { evict: vec![] });
        assert_eq!(p.plan(&"c", 100, false), Plan::Load { evict: vec![] });
        assert_eq!(p.plan(&"a", 100, false), Plan::Hit); // a is now the most recent
        assert_eq!(p.plan(&"d", 100, false), Plan::Load { evict: vec!["b"] });
        assert_eq!(p.plan(&"e", 200, false), Plan::Load { evict: vec!["c", "a"] });
        assert!(p.used() <= p.budget());
        assert_eq!(p.plan(&"huge", 400, false), Plan::Stream);
        assert_eq!(p.plan(&"x", 100, true), Plan::Cpu);
        let c = p.counters;
        assert_eq!((c.hits, c.misses, c.evictions, c.cpu_computed), (1, 7, 3, 1));
        assert_eq!(c.copied_bytes, 100 * 4 + 200 + 400);
    }

    #[test]
    fn gpu_mem_parses_and_resolves() {
        let gib = 1u64 << 30;
        assert_eq!("auto".parse::<GpuMem>().unwrap().bytes(10 * gib, 3 * gib, 40 * gib), 6 * gib);
        assert_eq!("auto".parse::<GpuMem>().unwrap().bytes(gib, 3 * gib, 40 * gib), 0);
        assert_eq!("50%".parse::<GpuMem>().unwrap().bytes(0, 0, 1000), 500);
        assert_eq!("2GiB".parse::<GpuMem>().unwrap().bytes(0, 0, 0), 2 * gib);
        assert!("lots".parse::<GpuMem>().unwrap_err().contains("lots"));
        assert!("fast".parse::<MissPolicy>().unwrap_err().contains("copy, cpu or auto"));
    }

    #[test]
    fn auto_policy_uses_the_cpu_only_for_decode_when_it_reads_faster() {
        assert!(cpu_wins(MissPolicy::Auto, 1, 25.0, 40.0));
        assert!(!cpu_wins(MissPolicy::Auto, 1, 25.0, 10.0));
        assert!(!cpu_wins(MissPolicy::Auto, 64, 25.0, 40.0));
        assert!(cpu_wins(MissPolicy::Cpu, 64, 25.0, 1.0));
        assert!(!cpu_wins(MissPolicy::Copy, 1, 1.0, 100.0));
    }
}
