//! `ExpertCache`: a fixed pool of RAM slots under a byte budget that holds the routed experts, filled
//! from the slow tier ([`ExpertStore`]) by one loader thread. Decisions come from [`SlotTable`]; this
//! file moves the bytes and keeps them safe:
//! - a slot buffer is allocated once and is in exactly one place: free in the slot, with the loader
//!   (loading), or shared read-only with the forward (`Arc`) while it is resident;
//! - [`ExpertCache::ensure`] pins the chunk's experts, waits for their loads (a prefetch still in
//!   flight is awaited, not repeated), and returns their matrices; dropping the [`Resident`] unpins;
//! - a slot chosen as victim while its load is in flight waits for that load before it is refilled.

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use super::store::ExpertStore;
use super::table::{Counters, Fill, Key, Placement, Policy, SlotTable};
use crate::error::{Result, RuntimeError};
use crate::model::weights::Weight;

/// What a loader job hands back: the buffer, filled (or the error), and the seconds it took.
type Done = (std::io::Result<()>, Box<[u8]>, f64);

/// One load in flight. `finished` stays true once set, even after the result has been taken, so any
/// number of forwards may wait on the same load.
struct Ticket {
    done: Mutex<(bool, Option<Done>)>,
    cv: Condvar,
}

impl Ticket {
    fn new() -> Ticket {
        Ticket { done: Mutex::new((false, None)), cv: Condvar::new() }
    }

    fn finish(&self, d: Done) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = (true, Some(d));
        self.cv.notify_all();
    }

    /// Waits until the load is done; the guard gives access to its (possibly already taken) result.
    fn wait(&self) -> MutexGuard<'_, (bool, Option<Done>)> {
        let mut g = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while !g.0 {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g
    }

    /// The result; only the holder of the state lock that moves the slot on takes it, once.
    fn take(&self) -> Done {
        self.wait().1.take().expect("a load's result is taken once, by the one who settles its slot")
    }
}

enum Buf {
    /// Not holding valid bytes.
    Free(Box<[u8]>),
    Loading(Key, Arc<Ticket>),
    Ready(Arc<Box<[u8]>>),
    /// Only while a load error is being reported.
    Lost,
}

struct State {
    table: SlotTable,
    bufs: Vec<Buf>,
}

struct Job {
    key: Key,
    buf: Box<[u8]>,
    ticket: Arc<Ticket>,
}

/// Options of the cache (from `--expert-ram`, `--expert-policy`, `--prefetch`).
#[derive(Clone, Copy, Debug)]
pub struct CacheOptions {
    pub slots: usize,
    pub policy: Policy,
    pub prefetch: bool,
}

pub struct ExpertCache {
    store: Arc<ExpertStore>,
    state: Mutex<State>,
    unpinned: Condvar,
    /// `None` once dropped: the loader thread then finishes its queue and ends.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    loader: Option<std::thread::JoinHandle<()>>,
    opts: CacheOptions,
}

impl Drop for ExpertCache {
    /// Waits for the loads in flight, so no thread reads the file after the cache is gone.
    fn drop(&mut self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = self.loader.take() {
            let _ = h.join();
        }
    }
}

/// The pinned experts of one `ensure`: their matrices, in the order asked. Unpins when dropped.
pub struct Resident<'a> {
    cache: &'a ExpertCache,
    slots: Vec<usize>,
    pub experts: Vec<(usize, Vec<Weight>)>,
}

impl Drop for Resident<'_> {
    fn drop(&mut self) {
        self.experts.clear(); // the slot buffers' last outside references go first
        let mut st = self.cache.lock();
        st.table.unpin(&self.slots);
        drop(st);
        self.cache.unpinned.notify_all();
    }
}

impl ExpertCache {
    /// A cache of `opts.slots` slots over `store`, with its loader thread. At least one slot; the model
    /// checks that a layer's top-k fits.
    pub fn new(store: Arc<ExpertStore>, opts: CacheOptions) -> Result<ExpertCache> {
        if opts.slots == 0 {
            return Err(RuntimeError::Unsupported("the expert cache needs at least one slot".into()));
        }
        if opts.policy == Policy::Belady {
            return Err(RuntimeError::Unsupported(
                "--expert-policy belady needs the future requests, which only a trace has: use it with `moellava replay-route`; a run takes lru, lfu or least-stale".into(),
            ));
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let loader_store = store.clone();
        let loader = std::thread::Builder::new()
            .name("moellava-expert-loader".into())
            .spawn(move || {
                for mut job in rx {
                    let t0 = Instant::now();
                    let r = loader_store.read(job.key, &mut job.buf);
                    job.ticket.finish((r, job.buf, t0.elapsed().as_secs_f64()));
                }
            })
            .map_err(|e| RuntimeError::Unsupported(format!("cannot start the expert loader thread: {e}")))?;
        let slot_bytes = store.slot_bytes();
        // Zeroed allocations: the pages are not resident until a load writes them.
        let bufs = (0..opts.slots).map(|_| Buf::Free(vec![0u8; slot_bytes].into_boxed_slice())).collect();
        let table = SlotTable::new(opts.slots, opts.policy, store.expert_bytes());
        Ok(ExpertCache {
            store,
            state: Mutex::new(State { table, bufs }),
            unpinned: Condvar::new(),
            jobs: Mutex::new(Some(tx)),
            loader: Some(loader),
            opts,
        })
    }

    pub fn options(&self) -> CacheOptions {
        self.opts
    }

    pub fn store(&self) -> &ExpertStore {
        &self.store
    }

    /// How many experts a layer's forward asks for at once (see [`super::table::chunk_len`]).
    pub fn chunk_len(&self) -> usize {
        super::table::chunk_len(self.opts.slots, super::TOP_K)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counters per MoE layer, and the slot count.
    pub fn counters(&self) -> std::collections::BTreeMap<usize, Counters> {
        self.lock().table.counters().clone()
    }

    /// See [`SlotTable::begin_layer`].
    pub fn begin_layer(&self, layer: usize, needed: &[usize]) {
        self.lock().table.begin_layer(layer, needed);
    }

    /// See [`SlotTable::order`].
    pub fn order(&self, layer: usize, needed: &[usize]) -> Vec<usize> {
        self.lock().table.order(layer, needed)
    }

    /// Makes the experts `ids` of `layer` resident and pinned (at most one per slot).
    pub fn ensure(&self, layer: usize, ids: &[usize]) -> Result<Resident<'_>> {
        assert!(ids.len() <= self.opts.slots, "ensure asks for {} experts, the cache has {} slots", ids.len(), self.opts.slots);
        let t_wait = Instant::now();
        let mut st = self.lock();
        let placements = loop {
            if let Some(p) = st.table.ensure(layer, ids) {
                break p;
            }
            // Other forwards hold the slots: wait for an unpin (never while holding pins ourselves).
            st = self.unpinned.wait(st).unwrap_or_else(|e| e.into_inner());
        };
        self.start_loads(&mut st, &placements)?;
        let tickets: Vec<(usize, Arc<Ticket>)> = placements
            .iter()
            .filter_map(|p| match &st.bufs[p.slot] {
                Buf::Loading(_, t) => Some((p.slot, t.clone())),
                _ => None,
            })
            .collect();
        drop(st);
        for (_, t) in &tickets {
            drop(t.wait());
        }
        let mut st = self.lock();
        if !tickets.is_empty() {
            st.table.counters_mut(layer).stall_s += t_wait.elapsed().as_secs_f64();
        }
        let mut experts = Vec::with_capacity(ids.len());
        let mut failed = None;
        for &e in ids {
            let slot = placements.iter().find(|p| p.key == (layer, e)).map(|p| p.slot).expect("placed above");
            match self.settle(&mut st, slot) {
                Ok(buf) => experts.push((e, self.store.views((layer, e), &buf))),
                Err(err) => failed = Some(err),
            }
        }
        let slots: Vec<usize> = placements.iter().map(|p| p.slot).collect();
        if let Some(err) = failed {
            experts.clear();
            st.table.unpin(&slots);
            drop(st);
            self.unpinned.notify_all();
            return Err(err);
        }
        drop(st);
        Ok(Resident { cache: self, slots, experts })
    }

    /// Starts loading the guessed experts `ids` of `layer` (no-op without `--prefetch`).
    pub fn prefetch(&self, layer: usize, ids: &[usize]) -> Result<()> {
        if !self.opts.prefetch {
            return Ok(());
        }
        let mut st = self.lock();
        let placements = st.table.prefetch(layer, ids);
        self.start_loads(&mut st, &placements)
    }

    /// For each placement that needs a load: take the slot's buffer back (waiting for a load in flight
    /// there), release the evicted expert, and hand the buffer to the loader.
    fn start_loads(&self, st: &mut State, placements: &[Placement]) -> Result<()> {
        for p in placements {
            let Fill::Load { evicted } = p.fill else { continue };
            let buf = match std::mem::replace(&mut st.bufs[p.slot], Buf::Lost) {
                Buf::Free(b) => b,
                // Unpinned, so the forward dropped its views: this is the last reference.
                Buf::Ready(arc) => {
                    debug_assert_eq!(Arc::strong_count(&arc), 1, "an unpinned slot's bytes are still referenced");
                    Arc::try_unwrap(arc).unwrap_or_else(|a| vec![0u8; a.len()].into_boxed_slice())
                }
                Buf::Loading(key, t) => {
                    let (_, b, secs) = t.take();
                    st.table.counters_mut(key.0).load_s += secs;
                    b
                }
                Buf::Lost => vec![0u8; self.store.slot_bytes()].into_boxed_slice(),
            };
            if let Some(k) = evicted {
                self.store.release(k);
            }
            let ticket = Arc::new(Ticket::new());
            let job = Job { key: p.key, buf, ticket: ticket.clone() };
            let stopped = || RuntimeError::Unsupported("the expert loader thread has stopped".into());
            let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            jobs.as_ref().ok_or_else(stopped)?.send(job).map_err(|_| stopped())?;
            st.bufs[p.slot] = Buf::Loading(p.key, ticket);
        }
        Ok(())
    }

    /// The slot's bytes, once its load (if any) is done; a failed load clears the slot.
    fn settle(&self, st: &mut State, slot: usize) -> Result<Arc<Box<[u8]>>> {
        match std::mem::replace(&mut st.bufs[slot], Buf::Lost) {
            Buf::Ready(a) => {
                st.bufs[slot] = Buf::Ready(a.clone());
                Ok(a)
            }
            Buf::Loading(key, t) => {
                let (r, b, secs) = t.take();
                st.table.counters_mut(key.0).load_s += secs;
                match r {
                    Ok(()) => {
                        let a = Arc::new(b);
                        st.bufs[slot] = Buf::Ready(a.clone());
                        Ok(a)
                    }
                    Err(e) => {
                        st.bufs[slot] = Buf::Free(b);
                        st.table.clear(slot);
                        Err(RuntimeError::Unsupported(format!(
                            "reading expert {} of layer {} from the model file: {e}",
                            key.1, key.0
                        )))
                    }
                }
            }
            other => {
                st.bufs[slot] = other;
                Err(RuntimeError::Unsupported(format!("expert cache slot {slot} holds no expert (internal error)")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experts::store::{FileSource, Part};
    use crate::experts::ExpertSource;
    use crate::gguf::{GgufFile, GgufWriter, TensorSpec};
    use crate::model::weights::WeightStore;
    use moellava_kernels::quant::GgmlType;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const LAYERS: [usize; 3] = [0, 1, 2];
    const E: usize = 4;
    const ROWS: usize = 8;
    const COLS: usize = 32;

    /// A slow tier that counts loads, sleeps in each, and tracks how many slots hold bytes.
    struct SlowSource {
        inner: FileSource,
        loads: AtomicUsize,
        releases: AtomicUsize,
    }

    impl ExpertSource for SlowSource {
        fn read(&self, key: Key, parts: &[Part], dst: &mut [u8]) -> std::io::Result<()> {
            self.loads.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(1));
            self.inner.read(key, parts, dst)
        }
        fn release(&self, key: Key, parts: &[Part]) {
            self.releases.fetch_add(1, Ordering::SeqCst);
            self.inner.release(key, parts)
        }
    }

    /// Per layer, per expert, its mapped matrices.
    type Experts = Vec<(usize, Vec<Vec<Weight>>)>;

    /// A GGUF with two stacked `[E, ROWS, COLS]` f32 tensors per layer, every value distinct.
    fn model(dir: &std::path::Path) -> (Arc<GgufFile>, Experts) {
        let path = dir.join("experts.gguf");
        let names: Vec<String> = LAYERS
            .iter()
            .flat_map(|l| [format!("blk.{l}.ffn_up_exps.weight"), format!("blk.{l}.ffn_down_exps.weight")])
            .collect();
        let specs = names.iter().map(|n| TensorSpec::from_shape(n.clone(), GgmlType::F32, &[E, ROWS, COLS])).collect();
        let mut w = GgufWriter::create(&path, &[], specs).unwrap();
        for (k, n) in names.iter().enumerate() {
            let vals: Vec<u8> = (0..E * ROWS * COLS).flat_map(|i| ((k * 100_000 + i) as f32).to_le_bytes()).collect();
            w.write_tensor(n, &vals).unwrap();
        }
        w.finish().unwrap();
        let file = Arc::new(GgufFile::open(&path).unwrap());
        let ws = WeightStore::new(file.clone());
        let experts = LAYERS
            .iter()
            .map(|&l| {
                let up = ws.stacked(&format!("blk.{l}.ffn_up_exps.weight"), E, ROWS, COLS).unwrap();
                let down = ws.stacked(&format!("blk.{l}.ffn_down_exps.weight"), E, ROWS, COLS).unwrap();
                (l, (0..E).map(|e| vec![up.slice_rows(e * ROWS, ROWS), down.slice_rows(e * ROWS, ROWS)]).collect())
            })
            .collect();
        (file, experts)
    }

    fn cache(dir: &std::path::Path, slots: usize, policy: Policy, prefetch: bool) -> (ExpertCache, Arc<SlowSource>, Experts) {
        let (file, experts) = model(dir);
        let src = Arc::new(SlowSource {
            inner: FileSource::open(file.path()).unwrap(),
            loads: AtomicUsize::new(0),
            releases: AtomicUsize::new(0),
        });
        let layout = experts.iter().map(|(l, v)| (*l, v.iter().map(|m| m.iter().collect()).collect())).collect();
        let store = Arc::new(ExpertStore::new(layout, src.clone()));
        (ExpertCache::new(store, CacheOptions { slots, policy, prefetch }).unwrap(), src, experts)
    }

    /// Every returned matrix holds exactly the file's bytes of that expert.
    fn check(r: &Resident<'_>, layer: usize, experts: &[(usize, Vec<Vec<Weight>>)]) {
        let mapped = &experts.iter().find(|(l, _)| *l == layer).unwrap().1;
        for (e, mats) in &r.experts {
            for (m, w) in mats.iter().zip(&mapped[*e]) {
                assert_eq!(m.bytes(), w.bytes(), "layer {layer} expert {e}");
            }
        }
    }

    #[test]
    fn loads_what_the_file_holds_and_counts_every_load() {
        let tmp = tempfile::tempdir().unwrap();
        for policy in Policy::ALL {
            for prefetch in [false, true] {
                let (c, src, experts) = cache(tmp.path(), 3, policy, prefetch);
                let mut rng = crate::rng::Rng::new(7);
                for step in 0..300 {
                    let layer = LAYERS[step % 3];
                    let a = (rng.next_u64() % E as u64) as usize;
                    let b = (a + 1 + (rng.next_u64() % 3) as usize) % E;
                    let mut ids = vec![a, b];
                    ids.sort();
                    c.begin_layer(layer, &ids);
                    let r = c.ensure(layer, &ids).unwrap();
                    c.prefetch(LAYERS[(step + 1) % 3], &[a]).unwrap();
                    check(&r, layer, &experts);
                }
                let t = c.report().total;
                drop(c); // waits for the last prefetch
                assert_eq!(src.loads.load(Ordering::SeqCst) as u64, t.misses + t.prefetch_issued, "{policy} {prefetch}");
                assert_eq!(t.requests(), 600);
                assert_eq!(t.bytes_loaded, (t.misses + t.prefetch_issued) * (2 * ROWS * COLS * 4) as u64);
                assert!(src.releases.load(Ordering::SeqCst) as u64 >= t.misses + t.prefetch_issued - 3);
            }
        }
    }

    /// Threads sharing a cache that fits only one token's two experts: no deadlock, and what a thread
    /// holds pinned is never overwritten while it reads.
    #[test]
    fn concurrent_forwards_at_the_smallest_budget() {
        let tmp = tempfile::tempdir().unwrap();
        let (c, _src, experts) = cache(tmp.path(), 2, Policy::LeastStale, true);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (c, experts) = (&c, &experts);
                s.spawn(move || {
                    let mut rng = crate::rng::Rng::new(t);
                    for _ in 0..100 {
                        let layer = LAYERS[(rng.next_u64() % 3) as usize];
                        let a = (rng.next_u64() % E as u64) as usize;
                        let ids =
                            if rng.next_u64().is_multiple_of(2) { vec![a] } else { vec![a.min((a + 1) % E), a.max((a + 1) % E)] };
                        let r = c.ensure(layer, &ids).unwrap();
                        c.prefetch(LAYERS[(layer + 1) % 3], &[(a + 2) % E]).unwrap();
                        std::thread::yield_now();
                        check(&r, layer, experts);
                    }
                });
            }
        });
        assert_eq!(
            c.report().total.requests() as usize,
            c.report().layers.values().map(|l| l.requests() as usize).sum::<usize>()
        );
        assert_eq!(c.lock().table.pinned_slots(), 0);
    }

    #[test]
    fn a_failed_read_is_an_error_that_names_the_expert() {
        struct Broken;
        impl ExpertSource for Broken {
            fn read(&self, _: Key, _: &[Part], _: &mut [u8]) -> std::io::Result<()> {
                Err(std::io::Error::other("disk on fire"))
            }
            fn release(&self, _: Key, _: &[Part]) {}
        }
        let tmp = tempfile::tempdir().unwrap();
        let (_, experts) = model(tmp.path());
        let layout = experts.iter().map(|(l, v)| (*l, v.iter().map(|m| m.iter().collect()).collect())).collect();
        let c = ExpertCache::new(
            Arc::new(ExpertStore::new(layout, Arc::new(Broken))),
            CacheOptions { slots: 2, policy: Policy::Lru, prefetch: false },
        )
        .unwrap();
        let e = c.ensure(1, &[2]).err().expect("the read fails").to_string();
        assert!(e.contains("expert 2 of layer 1") && e.contains("disk on fire"), "{e}");
        // The slot was cleared: the next request tries again rather than using garbage.
        assert!(c.ensure(1, &[2]).is_err());
        assert_eq!(c.lock().table.pinned_slots(), 0);
    }
}
