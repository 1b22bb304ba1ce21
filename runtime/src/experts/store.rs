//! `ExpertStore`: where every expert's bytes live in the slow tier, and how one is read into a slot.
//!
//! An expert is the unit the cache moves: its 2 (Phi-2: up, down) or 3 (gate, up, down) matrices,
//! each one contiguous byte range of the layer's stacked `[E, rows, cols]` tensor in the GGUF file.
//! In a slot the parts lie one after another, each at a 64-byte aligned offset.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::model::weights::Weight;

use super::table::Key;

const PART_ALIGN: usize = 64;

/// One matrix of one expert: where it is in the file and where it goes in a slot.
#[derive(Clone)]
pub struct Part {
    /// The mapped view (name, type, shape, file range).
    pub weight: Weight,
    pub file_offset: u64,
    pub slot_offset: usize,
}

/// The slow tier: reads an expert's parts into a slot buffer, and releases them from memory.
pub trait ExpertSource: Send + Sync {
    /// Fills `dst` (a slot) with the parts of `key` at their slot offsets.
    fn read(&self, key: Key, parts: &[Part], dst: &mut [u8]) -> io::Result<()>;
    /// The expert was evicted: drop whatever this tier keeps of it (the page cache). A hint.
    fn release(&self, key: Key, parts: &[Part]);
}

/// Reads experts from the GGUF file with `pread`, and drops their pages from the page cache on release
/// (`posix_fadvise(DONTNEED)`), so that neither this process nor the cache holds idle experts.
pub struct FileSource {
    file: File,
}

impl FileSource {
    pub fn open(path: &Path) -> io::Result<FileSource> {
        Ok(FileSource { file: File::open(path)? })
    }
}

impl ExpertSource for FileSource {
    fn read(&self, _key: Key, parts: &[Part], dst: &mut [u8]) -> io::Result<()> {
        for p in parts {
            let n = p.weight.n_bytes();
            self.file.read_exact_at(&mut dst[p.slot_offset..p.slot_offset + n], p.file_offset)?;
        }
        Ok(())
    }

    fn release(&self, _key: Key, parts: &[Part]) {
        for p in parts {
            let len = std::num::NonZeroU64::new(p.weight.n_bytes() as u64);
            let _ = rustix::fs::fadvise(&self.file, p.file_offset, len, rustix::fs::Advice::DontNeed);
        }
    }
}

/// Where each part of an expert starts in a slot: one after another, each 64-byte aligned.
fn slot_offsets(mats: &[&Weight]) -> Vec<usize> {
    let mut off = 0;
    mats.iter()
        .map(|w| {
            let here = off;
            off = (off + w.n_bytes()).div_ceil(PART_ALIGN) * PART_ALIGN;
            here
        })
        .collect()
}

/// The layout of every expert of every MoE layer, and the source that reads them.
pub struct ExpertStore {
    /// `(layer, expert)` → parts, in `Ffn::matrices` order.
    parts: std::collections::BTreeMap<Key, Vec<Part>>,
    slot_bytes: usize,
    expert_bytes: u64,
    source: Arc<dyn ExpertSource>,
}

impl ExpertStore {
    /// `experts`: per MoE layer, per expert, its matrices as mapped views.
    pub fn new(experts: Vec<(usize, Vec<Vec<&Weight>>)>, source: Arc<dyn ExpertSource>) -> ExpertStore {
        let (slot_bytes, expert_bytes) = Self::sizes(&experts);
        let mut parts = std::collections::BTreeMap::new();
        for (layer, per_expert) in experts {
            for (e, mats) in per_expert.into_iter().enumerate() {
                let offsets = slot_offsets(&mats);
                let v = mats
                    .into_iter()
                    .zip(offsets)
                    .map(|(w, slot_offset)| {
                        let (file_offset, _) = w.file_range().expect("experts are described by their mapped views");
                        Part { weight: w.clone(), file_offset: file_offset as u64, slot_offset }
                    })
                    .collect();
                parts.insert((layer, e), v);
            }
        }
        ExpertStore { parts, slot_bytes, expert_bytes, source }
    }

    /// `(slot bytes, expert bytes)` of a layout: the largest expert, with and without part alignment.
    pub fn sizes(experts: &[(usize, Vec<Vec<&Weight>>)]) -> (usize, u64) {
        let all = experts.iter().flat_map(|(_, per_expert)| per_expert);
        all.map(|mats| {
            let slot = slot_offsets(mats).last().zip(mats.last()).map_or(0, |(o, w)| o + w.n_bytes());
            (slot.div_ceil(PART_ALIGN) * PART_ALIGN, mats.iter().map(|w| w.n_bytes() as u64).sum::<u64>())
        })
        .fold((0, 0), |(s, b), (s2, b2)| (s.max(s2), b.max(b2)))
    }

    /// Bytes of one slot (the largest expert, parts aligned).
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Bytes of one expert's matrices (the largest).
    pub fn expert_bytes(&self) -> u64 {
        self.expert_bytes
    }

    /// Number of experts over all MoE layers.
    pub fn n_experts(&self) -> usize {
        self.parts.len()
    }

    /// Bytes of all experts.
    pub fn total_bytes(&self) -> u64 {
        self.parts.values().map(|p| p.iter().map(|p| p.weight.n_bytes() as u64).sum::<u64>()).sum()
    }

    pub fn parts(&self, key: Key) -> &[Part] {
        self.parts.get(&key).map_or(&[], |v| v.as_slice())
    }

    pub fn read(&self, key: Key, dst: &mut [u8]) -> io::Result<()> {
        self.source.read(key, self.parts(key), dst)
    }

    pub fn release(&self, key: Key) {
        self.source.release(key, self.parts(key))
    }

    /// The expert's matrices as views into a filled slot buffer.
    pub fn views(&self, key: Key, buf: &Arc<Box<[u8]>>) -> Vec<Weight> {
        self.parts(key).iter().map(|p| p.weight.resident_copy(buf.clone(), p.slot_offset)).collect()
    }
}
