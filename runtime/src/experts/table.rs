//! The expert cache's decisions, without any bytes: which slot holds which expert, what is pinned,
//! what to evict, and the counters. The real cache (`cache.rs`) and the trace simulator (`replay.rs`)
//! both drive this one table, so a replay of a run's trace takes exactly the decisions the run took.
//!
//! Events, in the order a forward call makes them for each MoE layer:
//! ```text
//! begin_layer(l, needed)    settle layer l's prefetch guesses (used → prefetch hit later, unused → wasted)
//! ensure(l, chunk)          pin the chunk's experts: hit, prefetch hit, or miss (a slot is loaded)
//! prefetch(l', guess)       after the first chunk: start loading the next MoE layer's guessed experts
//! unpin(slots)              after the chunk's experts have been computed
//! ```
//! Victims: an empty slot first; else an unpinned slot by the policy; a slot whose prefetched expert
//! has not been used yet only when nothing else is left (a prefetch is a promise of use).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

/// How many experts a layer pins at once: one token's top-k. A prefill that needs every expert of
/// the layer computes them k at a time (resident ones first, see [`SlotTable::order`]), so the later
/// chunks' loads evict the experts this layer has just computed rather than the other layers' ones.
/// The compute is the same either way: every expert runs once on its own rows.
pub fn chunk_len(n_slots: usize, top_k: usize) -> usize {
    n_slots.min(top_k).max(1)
}

/// One expert of one layer: `(layer, expert)`.
pub type Key = (usize, usize);

/// Eviction policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Least recently used.
    Lru,
    /// Least frequently used (uses counted since the cache started, across evictions; ties by LRU).
    Lfu,
    /// Most recently used first: the experts of the layers this token has just completed are needed
    /// again only after every other layer has run, so they are the furthest from their next use.
    LeastStale,
    /// Belady's MIN: evict the expert whose next request is furthest in the future. It needs the whole
    /// trace ahead of time, so only the simulator has it (`replay-route`): the ceiling that no online
    /// policy reaches on that trace, the yardstick for the others.
    Belady,
}

impl Policy {
    /// The policies a running model can use.
    pub const ALL: [Policy; 3] = [Policy::Lru, Policy::Lfu, Policy::LeastStale];

    pub fn name(self) -> &'static str {
        match self {
            Policy::Lru => "lru",
            Policy::Lfu => "lfu",
            Policy::LeastStale => "least-stale",
            Policy::Belady => "belady",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Policy, String> {
        Policy::ALL
            .into_iter()
            .chain([Policy::Belady])
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown expert policy '{s}'; expected lru, lfu, least-stale (or belady, in replay-route)"))
    }
}

/// Counters of one MoE layer (or, summed, of a run). The first six are decisions (identical in a
/// replay); the times are measured (the cache) or modelled (the simulator).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Requested and already resident (not thanks to a pending prefetch).
    pub hits: u64,
    /// Requested and not resident: loaded while the forward waited.
    pub misses: u64,
    /// Requested and resident (or loading) because a prefetch guessed it.
    pub prefetch_hits: u64,
    /// Prefetch loads started.
    pub prefetch_issued: u64,
    /// Prefetched experts that their layer did not request (or that were evicted before it ran).
    pub prefetch_wasted: u64,
    /// Bytes read from the slow tier (misses and prefetches).
    pub bytes_loaded: u64,
    /// Seconds the loader spent reading.
    pub load_s: f64,
    /// Seconds the forward waited for loads.
    pub stall_s: f64,
}

impl Counters {
    pub fn requests(&self) -> u64 {
        self.hits + self.misses + self.prefetch_hits
    }

    /// Resident when requested (hits and prefetch hits) over requests; 0 with no request.
    pub fn hit_rate(&self) -> f64 {
        let r = self.requests();
        if r == 0 {
            0.0
        } else {
            (self.hits + self.prefetch_hits) as f64 / r as f64
        }
    }

    /// Prefetch loads that were used, over prefetch loads.
    pub fn prefetch_accuracy(&self) -> f64 {
        if self.prefetch_issued == 0 {
            0.0
        } else {
            self.prefetch_hits as f64 / self.prefetch_issued as f64
        }
    }

    pub fn add(&mut self, o: &Counters) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.prefetch_hits += o.prefetch_hits;
        self.prefetch_issued += o.prefetch_issued;
        self.prefetch_wasted += o.prefetch_wasted;
        self.bytes_loaded += o.bytes_loaded;
        self.load_s += o.load_s;
        self.stall_s += o.stall_s;
    }
}

/// How a requested or prefetched expert got its slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Already there (possibly still loading from a prefetch).
    Resident,
    /// The slot must be (re)filled; `evicted` is the expert it held.
    Load { evicted: Option<Key> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub slot: usize,
    pub key: Key,
    pub fill: Fill,
}

#[derive(Clone, Debug, Default)]
struct Slot {
    key: Option<Key>,
    pins: u32,
    /// Clock of the last use (or of the prefetch that filled it, once settled unused).
    last_use: u64,
    /// Filled by a prefetch whose layer has not run yet.
    pending_prefetch: bool,
}

/// What [`Policy::Belady`] knows: the steps (calls of `begin_layer`, numbered from 0) at which each
/// expert is requested, and where the table is now.
#[derive(Clone, Debug)]
pub struct Future {
    steps: HashMap<Key, Vec<u64>>,
    /// The step under way (`u64::MAX` before the first) and its experts not yet pinned.
    now: u64,
    now_layer: usize,
    now_pending: Vec<usize>,
}

impl Future {
    /// `requests[i]` = (layer, experts) of step i, in the order `begin_layer` will be called.
    pub fn new<'a>(requests: impl IntoIterator<Item = (usize, &'a [usize])>) -> Future {
        let mut steps: HashMap<Key, Vec<u64>> = HashMap::new();
        for (i, (layer, experts)) in requests.into_iter().enumerate() {
            for &e in experts {
                steps.entry((layer, e)).or_default().push(i as u64);
            }
        }
        Future { steps, now: u64::MAX, now_layer: 0, now_pending: Vec::new() }
    }

    /// The step at which `key` is next requested (`u64::MAX`: never again).
    fn next_use(&self, key: Key) -> u64 {
        if key.0 == self.now_layer && self.now_pending.contains(&key.1) {
            return self.now;
        }
        let after = self.now.wrapping_add(1);
        self.steps.get(&key).and_then(|s| s.get(s.partition_point(|&x| x < after)).copied()).unwrap_or(u64::MAX)
    }
}

/// Slots, their keys and pins, the policy and the counters.
#[derive(Clone, Debug)]
pub struct SlotTable {
    slots: Vec<Slot>,
    index: HashMap<Key, usize>,
    freq: HashMap<Key, u64>,
    policy: Policy,
    clock: u64,
    expert_bytes: u64,
    counters: BTreeMap<usize, Counters>,
    /// Present exactly for [`Policy::Belady`].
    future: Option<Future>,
}

impl SlotTable {
    pub fn new(n_slots: usize, policy: Policy, expert_bytes: u64) -> SlotTable {
        SlotTable {
            slots: vec![Slot::default(); n_slots],
            index: HashMap::new(),
            freq: HashMap::new(),
            policy,
            clock: 0,
            expert_bytes,
            counters: BTreeMap::new(),
            future: None,
        }
    }

    /// A table for [`Policy::Belady`], which must know every step's requests in advance.
    pub fn with_future(n_slots: usize, expert_bytes: u64, future: Future) -> SlotTable {
        SlotTable { future: Some(future), ..SlotTable::new(n_slots, Policy::Belady, expert_bytes) }
    }

    /// Counters per MoE layer.
    pub fn counters(&self) -> &BTreeMap<usize, Counters> {
        &self.counters
    }

    pub fn counters_mut(&mut self, layer: usize) -> &mut Counters {
        self.counters.entry(layer).or_default()
    }

    /// The sum over layers.
    pub fn total(&self) -> Counters {
        let mut t = Counters::default();
        self.counters.values().for_each(|c| t.add(c));
        t
    }

    /// The slot holding `key`, if any.
    pub fn slot_of(&self, key: Key) -> Option<usize> {
        self.index.get(&key).copied()
    }

    /// Keys resident now (tests).
    pub fn resident(&self) -> Vec<Key> {
        self.slots.iter().filter_map(|s| s.key).collect()
    }

    pub fn pinned_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.pins > 0).count()
    }

    /// Layer `layer` is about to request `needed`: its pending prefetches that are not needed are wasted.
    pub fn begin_layer(&mut self, layer: usize, needed: &[usize]) {
        if let Some(f) = &mut self.future {
            (f.now, f.now_layer, f.now_pending) = (f.now.wrapping_add(1), layer, needed.to_vec());
        }
        let mut wasted = 0;
        for s in self.slots.iter_mut().filter(|s| s.pending_prefetch && s.key.is_some_and(|k| k.0 == layer)) {
            if !s.key.is_some_and(|k| needed.contains(&k.1)) {
                s.pending_prefetch = false;
                wasted += 1;
            }
        }
        self.counters_mut(layer).prefetch_wasted += wasted;
    }

    /// The order in which a layer computes `needed` (ascending ids): resident experts first, so that
    /// when the layer needs more experts than there are slots, the later chunks' loads evict experts
    /// already computed rather than ones still to come. (Each token adds at most two expert outputs to
    /// zero, and two-term float sums commute, so the order never changes the result.)
    pub fn order(&self, layer: usize, needed: &[usize]) -> Vec<usize> {
        let (mut here, away): (Vec<usize>, Vec<usize>) = needed.iter().partition(|e| self.index.contains_key(&(layer, **e)));
        here.extend(away);
        here
    }

    /// Pins the experts `ids` of `layer` (distinct), choosing slots for those not resident. `None` when
    /// fewer slots are unpinned than misses need (nothing changed: the caller waits for an unpin).
    pub fn ensure(&mut self, layer: usize, ids: &[usize]) -> Option<Vec<Placement>> {
        let misses = ids.iter().filter(|e| !self.index.contains_key(&(layer, **e))).count();
        let evictable =
            self.slots.iter().filter(|s| s.pins == 0 && !s.key.is_some_and(|k| k.0 == layer && ids.contains(&k.1))).count();
        if misses > evictable {
            return None;
        }
        self.clock += 1;
        let now = self.clock;
        let mut out = Vec::with_capacity(ids.len());
        // Hits first, pinned at once, so that no miss of this chunk evicts them.
        for &e in ids {
            if let Some(slot) = self.slot_of((layer, e)) {
                let s = &mut self.slots[slot];
                let c = self.counters.entry(layer).or_default();
                if std::mem::take(&mut s.pending_prefetch) {
                    c.prefetch_hits += 1;
                } else {
                    c.hits += 1;
                }
                s.pins += 1;
                s.last_use = now;
                out.push(Placement { slot, key: (layer, e), fill: Fill::Resident });
            }
        }
        for &e in ids {
            if self.index.contains_key(&(layer, e)) {
                continue;
            }
            let slot = self.victim(&[]).expect("counted above: an evictable slot exists");
            let evicted = self.assign(slot, (layer, e));
            let s = &mut self.slots[slot];
            s.pins = 1;
            s.last_use = now;
            let c = self.counters.entry(layer).or_default();
            c.misses += 1;
            c.bytes_loaded += self.expert_bytes;
            out.push(Placement { slot, key: (layer, e), fill: Fill::Load { evicted } });
        }
        for &e in ids {
            *self.freq.entry((layer, e)).or_default() += 1;
        }
        if let Some(f) = self.future.as_mut().filter(|f| f.now_layer == layer) {
            f.now_pending.retain(|e| !ids.contains(e));
        }
        Some(out)
    }

    /// Starts loads for the guessed experts `ids` of `layer` that are not resident, as far as unpinned
    /// slots allow (never evicting this call's own guesses). Loads only: nothing is pinned.
    pub fn prefetch(&mut self, layer: usize, ids: &[usize]) -> Vec<Placement> {
        let now = self.clock;
        let mut out: Vec<Placement> = Vec::new();
        // Guessed experts already resident are kept, as are the ones this call places.
        let mut keep: Vec<usize> = ids.iter().filter_map(|e| self.slot_of((layer, *e))).collect();
        for &e in ids {
            if self.index.contains_key(&(layer, e)) {
                continue;
            }
            let Some(slot) = self.victim(&keep) else { break };
            keep.push(slot);
            let evicted = self.assign(slot, (layer, e));
            let s = &mut self.slots[slot];
            s.pending_prefetch = true;
            s.last_use = now;
            let c = self.counters.entry(layer).or_default();
            c.prefetch_issued += 1;
            c.bytes_loaded += self.expert_bytes;
            out.push(Placement { slot, key: (layer, e), fill: Fill::Load { evicted } });
        }
        out
    }

    pub fn unpin(&mut self, slots: &[usize]) {
        for &s in slots {
            let slot = &mut self.slots[s];
            assert!(slot.pins > 0, "unpinning slot {s}, which is not pinned");
            slot.pins -= 1;
        }
    }

    /// Forgets what `slot` holds (its load failed).
    pub fn clear(&mut self, slot: usize) {
        if let Some(k) = self.slots[slot].key.take() {
            self.index.remove(&k);
        }
        self.slots[slot].pending_prefetch = false;
    }

    /// Puts `key` into `slot`; returns the key it held. An evicted pending prefetch is wasted.
    fn assign(&mut self, slot: usize, key: Key) -> Option<Key> {
        let s = &mut self.slots[slot];
        let old = s.key.replace(key);
        if let Some(k) = old {
            self.index.remove(&k);
            if std::mem::take(&mut s.pending_prefetch) {
                self.counters.entry(k.0).or_default().prefetch_wasted += 1;
            }
        }
        self.index.insert(key, slot);
        old
    }

    /// The slot to fill next (not pinned, not in `exclude`), or `None` if every slot is taken.
    fn victim(&self, exclude: &[usize]) -> Option<usize> {
        let free = |i: &usize| self.slots[*i].pins == 0 && !exclude.contains(i);
        let all = 0..self.slots.len();
        if let Some(i) = all.clone().filter(free).find(|i| self.slots[*i].key.is_none()) {
            return Some(i);
        }
        let settled = all.clone().filter(free).filter(|i| !self.slots[*i].pending_prefetch);
        let freq = |i: usize| self.slots[i].key.map_or(0, |k| self.freq.get(&k).copied().unwrap_or(0));
        let last = |i: usize| self.slots[i].last_use;
        // Ties always go to the lowest slot index (min_by_key keeps the first minimum).
        let chosen = match self.policy {
            Policy::Lru => settled.min_by_key(|&i| (last(i), i)),
            Policy::Lfu => settled.min_by_key(|&i| (freq(i), last(i), i)),
            Policy::LeastStale => settled.min_by_key(|&i| (u64::MAX - last(i), freq(i), i)),
            Policy::Belady => {
                let next_use = |i: usize| match (&self.future, self.slots[i].key) {
                    (Some(f), Some(k)) => f.next_use(k),
                    _ => u64::MAX,
                };
                settled.min_by_key(|&i| (u64::MAX - next_use(i), i))
            }
        };
        chosen.or_else(|| all.filter(free).min_by_key(|&i| (last(i), i)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys(p: &[Placement]) -> Vec<Key> {
        p.iter().map(|p| p.key).collect()
    }

    #[test]
    fn lru_evicts_the_oldest_and_least_stale_the_newest() {
        for (policy, evicted) in [(Policy::Lru, (0, 0)), (Policy::LeastStale, (1, 1))] {
            let mut t = SlotTable::new(2, policy, 10);
            for (l, e) in [(0, 0), (1, 1)] {
                let p = t.ensure(l, &[e]).unwrap();
                t.unpin(&[p[0].slot]);
            }
            let p = t.ensure(2, &[3]).unwrap();
            assert_eq!(p[0].fill, Fill::Load { evicted: Some(evicted) }, "{policy}");
        }
    }

    #[test]
    fn belady_keeps_what_comes_back_soonest_where_lru_thrashes() {
        // One layer cycling through experts 0, 1, 2 with 2 slots: LRU always evicts the next one needed.
        let steps: Vec<[usize; 1]> = (0..12).map(|i| [i % 3]).collect();
        let run = |mut t: SlotTable| {
            for s in &steps {
                t.begin_layer(0, s);
                let p = t.ensure(0, s).unwrap();
                t.unpin(&[p[0].slot]);
            }
            t.total()
        };
        assert_eq!(run(SlotTable::new(2, Policy::Lru, 1)).hits, 0);
        let future = Future::new(steps.iter().map(|s| (0, &s[..])));
        let b = run(SlotTable::with_future(2, 1, future));
        // MIN on a 3-cycle with 2 slots: 2 cold misses, then every other request hits.
        assert_eq!((b.hits, b.misses), (5, 7));
    }

    #[test]
    fn lfu_keeps_the_frequent_one() {
        let mut t = SlotTable::new(2, Policy::Lfu, 10);
        for (l, e) in [(0, 0), (0, 0), (0, 1)] {
            let p = t.ensure(l, &[e]).unwrap();
            t.unpin(&[p[0].slot]);
        }
        let p = t.ensure(0, &[2]).unwrap();
        assert_eq!(p[0].fill, Fill::Load { evicted: Some((0, 1)) });
        let c = t.total();
        assert_eq!(
            [c.hits, c.misses, c.prefetch_hits, c.prefetch_issued, c.prefetch_wasted, c.bytes_loaded],
            [1, 3, 0, 0, 0, 30]
        );
    }

    #[test]
    fn prefetch_hit_and_waste_are_counted() {
        let mut t = SlotTable::new(4, Policy::Lru, 1);
        let p = t.ensure(0, &[0, 1]).unwrap();
        assert_eq!(keys(&t.prefetch(1, &[2, 3])), vec![(1, 2), (1, 3)]);
        t.unpin(&p.iter().map(|p| p.slot).collect::<Vec<_>>());
        t.begin_layer(1, &[2, 0]);
        let q = t.ensure(1, &[2, 0]).unwrap();
        let c = &t.counters()[&1];
        assert_eq!((c.prefetch_hits, c.prefetch_issued, c.prefetch_wasted, c.misses), (1, 2, 1, 1));
        // The miss took the slot of layer 0's expert (LRU), not a pinned one.
        assert_eq!(q[1].fill, Fill::Load { evicted: Some((0, 0)) });
    }

    #[test]
    fn a_full_pinned_table_refuses_and_changes_nothing() {
        let mut t = SlotTable::new(2, Policy::Lru, 1);
        t.ensure(0, &[0, 1]).unwrap();
        let before = t.total();
        assert!(t.ensure(1, &[0]).is_none());
        assert!(t.prefetch(1, &[0]).is_empty());
        assert_eq!(t.total(), before);
    }

    proptest! {
        /// Random traces: never more keys than slots, pinned slots are never evicted, a key is in at
        /// most one slot, and every request is counted once.
        #[test]
        fn invariants_over_random_traces(
            n_slots in 2usize..9,
            steps in prop::collection::vec((0usize..6, prop::collection::btree_set(0usize..4, 1..4), prop::collection::btree_set(0usize..4, 0..3)), 1..200),
            policy in 0usize..3,
        ) {
            let mut t = SlotTable::new(n_slots, Policy::ALL[policy], 7);
            let mut requests = 0u64;
            for (layer, ids, guess) in steps {
                let ids: Vec<usize> = ids.into_iter().take(n_slots).collect();
                t.begin_layer(layer, &ids);
                let p = t.ensure(layer, &ids).expect("nothing is pinned between steps");
                requests += ids.len() as u64;
                let pinned: Vec<usize> = p.iter().map(|p| p.slot).collect();
                let pre = t.prefetch((layer + 1) % 6, &guess.into_iter().collect::<Vec<_>>());
                for q in &pre {
                    prop_assert!(!pinned.contains(&q.slot), "a prefetch evicted a pinned slot");
                }
                for e in &ids {
                    prop_assert!(t.slot_of((layer, *e)).is_some_and(|s| pinned.contains(&s)));
                }
                let res = t.resident();
                let mut uniq = res.clone();
                uniq.sort();
                uniq.dedup();
                prop_assert_eq!(uniq.len(), res.len());
                prop_assert!(res.len() <= n_slots);
                t.unpin(&pinned);
                prop_assert_eq!(t.pinned_slots(), 0);
            }
            prop_assert_eq!(t.total().requests(), requests);
        }
    }
}
