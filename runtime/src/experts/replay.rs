//! `moellava replay-route`: a cache simulated over a route trace. The decisions come from the same
//! [`SlotTable`] as the real cache, driven in the same event order as `Moe::forward` drives it, so the
//! counters of a replay equal those of the run that wrote the trace (same slots, policy, prefetch).
//!
//! Time is modelled, not measured: one loader reads at `bw_load` bytes/s, one at a time, in issue order;
//! computing an expert reads its bytes at `bw_compute` bytes/s; a chunk starts when its loads are done
//! (the wait is the stall); a prefetch is issued after the layer's first chunk is resident, so it
//! overlaps that layer's compute. Only the MoE layers' expert work is modelled.

use std::collections::BTreeMap;

use super::table::{chunk_len, Counters, Fill, Future, Placement, Policy, SlotTable};
use super::trace::{RouteLine, TraceHeader};

#[derive(Clone, Copy, Debug)]
pub struct ReplayOptions {
    pub slots: usize,
    pub policy: Policy,
    pub prefetch: bool,
    /// Slow tier → cache, bytes/s.
    pub bw_load: f64,
    /// Expert weights read by the compute, bytes/s.
    pub bw_compute: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ReplayReport {
    pub slots: usize,
    pub policy: Policy,
    pub prefetch: bool,
    pub total: Counters,
    pub layers: BTreeMap<usize, Counters>,
    pub hit_rate: f64,
    pub prefetch_accuracy: f64,
    /// Of all guessed experts in the trace, the share their layer then used (independent of the cache).
    pub guess_precision: f64,
    /// Modelled seconds of the MoE layers' expert work with this cache, and with every expert resident.
    pub modelled_s: f64,
    pub modelled_all_resident_s: f64,
}

/// The number of slots for a budget given as a count of experts or a percentage of all of them.
pub fn slots_for(budget: &str, n_experts_total: usize) -> Result<usize, String> {
    let b = budget.trim();
    if let Some(p) = b.strip_suffix('%') {
        let p: f64 = p
            .trim()
            .parse()
            .map_err(|_| format!("--budget '{budget}': expected a number of experts or a percentage like 50%"))?;
        if !(p > 0.0 && p <= 100.0) {
            return Err(format!("--budget '{budget}': the percentage must be in (0, 100]"));
        }
        Ok(((p / 100.0) * n_experts_total as f64 + 1e-9).floor() as usize)
    } else {
        b.parse::<usize>().map_err(|_| format!("--budget '{budget}': expected a number of experts or a percentage like 50%"))
    }
}

/// The modelled clock: the forward's time, the loader's queue, when each slot's load ends.
struct Timeline {
    now: f64,
    loader_free: f64,
    ready_at: Vec<f64>,
    load_s: f64,
}

impl Timeline {
    /// Queues the loads among `placements` behind the loader's earlier work.
    fn schedule(&mut self, table: &mut SlotTable, placements: &[Placement]) {
        for p in placements.iter().filter(|p| matches!(p.fill, Fill::Load { .. })) {
            let start = self.loader_free.max(self.now).max(self.ready_at[p.slot]);
            self.loader_free = start + self.load_s;
            self.ready_at[p.slot] = self.loader_free;
            table.counters_mut(p.key.0).load_s += self.load_s;
        }
    }

    /// Waits until the loads of `placements` are done; returns the wait.
    fn wait_for(&mut self, placements: &[Placement]) -> f64 {
        let ready = placements.iter().map(|p| self.ready_at[p.slot]).fold(self.now, f64::max);
        let stall = ready - self.now;
        self.now = ready;
        stall
    }
}

/// Replays `routes` (one trace) with `o`.
pub fn replay(header: &TraceHeader, routes: &[RouteLine], o: &ReplayOptions) -> ReplayReport {
    let needed_per_line: Vec<Vec<usize>> = routes.iter().map(|r| r.needed()).collect();
    let mut table = match o.policy {
        Policy::Belady => {
            let future = Future::new(routes.iter().zip(&needed_per_line).map(|(r, n)| (r.layer, &n[..])));
            SlotTable::with_future(o.slots, header.expert_bytes, future)
        }
        _ => SlotTable::new(o.slots, o.policy, header.expert_bytes),
    };
    let compute_s = header.expert_bytes as f64 / o.bw_compute.max(1.0);
    let mut tl = Timeline {
        now: 0.0,
        loader_free: 0.0,
        ready_at: vec![0.0; o.slots],
        load_s: header.expert_bytes as f64 / o.bw_load.max(1.0),
    };
    let mut all_resident = 0f64;
    let (mut guessed, mut guessed_used) = (0u64, 0u64);
    for (i, (r, needed)) in routes.iter().zip(&needed_per_line).enumerate() {
        if let Some(g) = &r.guess {
            guessed += g.len() as u64;
            guessed_used += g.iter().filter(|e| needed.contains(e)).count() as u64;
        }
        // The guess for the next MoE layer of the same call, which `Moe::forward` prefetches.
        let next = routes.get(i + 1).filter(|n| n.call == r.call).and_then(|n| Some((n.layer, n.guess.as_ref()?)));
        let prefetch = |table: &mut SlotTable, tl: &mut Timeline| {
            if let (true, Some((layer, guess))) = (o.prefetch, next) {
                let p = table.prefetch(layer, guess);
                tl.schedule(table, &p);
            }
        };
        table.begin_layer(r.layer, needed);
        if needed.is_empty() {
            prefetch(&mut table, &mut tl);
        }
        for (k, chunk) in table.order(r.layer, needed).chunks(chunk_len(o.slots, header.top_k)).enumerate() {
            let placements = table.ensure(r.layer, chunk).expect("single-threaded: nothing else holds pins");
            tl.schedule(&mut table, &placements);
            let stall = tl.wait_for(&placements);
            if stall > 0.0 {
                table.counters_mut(r.layer).stall_s += stall;
            }
            if k == 0 {
                prefetch(&mut table, &mut tl);
            }
            tl.now += compute_s * chunk.len() as f64;
            all_resident += compute_s * chunk.len() as f64;
            table.unpin(&placements.iter().map(|p| p.slot).collect::<Vec<_>>());
        }
    }
    let total = table.total();
    ReplayReport {
        slots: o.slots,
        policy: o.policy,
        prefetch: o.prefetch,
        hit_rate: total.hit_rate(),
        prefetch_accuracy: total.prefetch_accuracy(),
        guess_precision: if guessed == 0 { 0.0 } else { guessed_used as f64 / guessed as f64 },
        total,
        layers: table.counters().clone(),
        modelled_s: tl.now,
        modelled_all_resident_s: all_resident,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> TraceHeader {
        TraceHeader {
            kind: "header".into(),
            version: 1,
            model: "t".into(),
            n_expert: 4,
            top_k: 2,
            moe_layers: vec![0, 1],
            expert_bytes: 100,
            slot_bytes: 128,
        }
    }

    fn line(call: u64, layer: usize, e: [usize; 2], guess: Option<Vec<usize>>) -> RouteLine {
        RouteLine { kind: "route".into(), call, seq: 0, pos: call as usize, layer, experts: vec![e.to_vec()], guess }
    }

    #[test]
    fn budget_parsing() {
        assert_eq!(slots_for("50%", 8), Ok(4));
        assert_eq!(slots_for("3", 8), Ok(3));
        assert!(slots_for("0%", 8).is_err());
        assert!(slots_for("many", 8).is_err());
    }

    #[test]
    fn everything_fits_means_only_cold_misses_and_a_perfect_guess_stalls_less() {
        let routes: Vec<RouteLine> =
            (0..10).flat_map(|c| [line(c, 0, [0, 1], None), line(c, 1, [2, 3], Some(vec![2, 3]))]).collect();
        let o = ReplayOptions { slots: 8, policy: Policy::Lru, prefetch: false, bw_load: 100.0, bw_compute: 1000.0 };
        let r = replay(&header(), &routes, &o);
        assert_eq!((r.total.misses, r.total.hits), (4, 36));
        assert_eq!(r.guess_precision, 1.0);
        // Two slots: every layer misses both experts without prefetch; with it, layer 1's are prefetched.
        let small = ReplayOptions { slots: 2, ..o };
        let plain = replay(&header(), &routes, &small);
        let pre = replay(&header(), &routes, &ReplayOptions { prefetch: true, ..small });
        assert_eq!(plain.total.misses, 40);
        assert_eq!(pre.total.prefetch_hits, 0, "the layer's own two pinned experts leave no slot to prefetch into");
        let four = replay(&header(), &routes, &ReplayOptions { slots: 4, prefetch: true, policy: Policy::LeastStale, ..o });
        assert!(four.total.prefetch_hits > 0 && four.total.stall_s < plain.total.stall_s);
    }
}
