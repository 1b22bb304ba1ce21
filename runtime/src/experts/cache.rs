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

/// One load in flight.
struct Ticket {
    done: Mutex<Option<Done>>,
    cv: Condvar,
}

impl Ticket {
    fn wait(&self) -> MutexGuard<'_, Option<Done>> {
        let mut g = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while g.is_none() {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g
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
    jobs: Mutex<mpsc::Sender<Job>>,
    opts: CacheOptions,
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
        let (tx, rx) = mpsc::channel::<Job>();
        let loader_store = store.clone();
        std::thread::Builder::new()
            .name("moellava-expert-loader".into())
            .spawn(move || {
                for mut job in rx {
                    let t0 = Instant::now();
                    let r = loader_store.read(job.key, &mut job.buf);
                    let mut g = job.ticket.done.lock().unwrap_or_else(|e| e.into_inner());
                    *g = Some((r, job.buf, t0.elapsed().as_secs_f64()));
                    drop(g);
                    job.ticket.cv.notify_all();
                }
            })
            .map_err(|e| RuntimeError::Unsupported(format!("cannot start the expert loader thread: {e}")))?;
        let slot_bytes = store.slot_bytes();
        // Zeroed allocations: the pages are not resident until a load writes them.
        let bufs = (0..opts.slots).map(|_| Buf::Free(vec![0u8; slot_bytes].into_boxed_slice())).collect();
        let table = SlotTable::new(opts.slots, opts.policy, store.expert_bytes());
        Ok(ExpertCache { store, state: Mutex::new(State { table, bufs }), unpinned: Condvar::new(), jobs: Mutex::new(tx), opts })
    }

    pub fn options(&self) -> CacheOptions {
        self.opts
    }

    pub fn store(&self) -> &ExpertStore {
        &self.store
    }

    /// The most experts one `ensure` may ask for.
    pub fn max_chunk(&self) -> usize {
        self.opts.slots
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

    /// Makes the experts `ids` of `layer` resident and pinned (at most [`Self::max_chunk`] of them).
    pub fn ensure(&self, layer: usize, ids: &[usize]) -> Result<Resident<'_>> {
        assert!(ids.len() <= self.max_chunk(), "ensure asks for {} experts, the cache has {} slots", ids.len(), self.max_chunk());
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
                Buf::Ready(arc) => Arc::try_unwrap(arc).unwrap_or_else(|a| vec![0u8; a.len()].into_boxed_slice()),
                Buf::Loading(key, t) => {
                    let mut g = t.wait();
                    let (_, b, secs) = g.take().expect("waited");
                    st.table.counters_mut(key.0).load_s += secs;
                    b
                }
                Buf::Lost => vec![0u8; self.store.slot_bytes()].into_boxed_slice(),
            };
            if let Some(k) = evicted {
                self.store.release(k);
            }
            let ticket = Arc::new(Ticket { done: Mutex::new(None), cv: Condvar::new() });
            let job = Job { key: p.key, buf, ticket: ticket.clone() };
            self.jobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(job)
                .map_err(|_| RuntimeError::Unsupported("the expert loader thread has stopped".into()))?;
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
                let (r, b, secs) = t.wait().take().expect("waited before settling");
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
