//! The one place in `runtime` (and `convert`, which borrows it) that maps a file into memory.
#![allow(unsafe_code)]

use std::fs::File;
use std::path::Path;

use memmap2::{Advice, Mmap, UncheckedAdvice};

/// File bytes: memory-mapped from disk, or owned (tests, fuzzing, empty files).
pub enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    /// Maps `path` read-only.
    pub fn map(path: &Path) -> std::io::Result<Bytes> {
        let file = File::open(path)?;
        if file.metadata()?.len() == 0 {
            return Ok(Bytes::Owned(Vec::new()));
        }
        // SAFETY: the map is read-only and private to this process. Its soundness rests on the file
        // not being truncated or rewritten while mapped; moellava never writes a file it has open
        // (outputs go to a temp file renamed at the end, which leaves a mapped inode untouched).
        let map = unsafe { Mmap::map(&file)? };
        Ok(Bytes::Mapped(map))
    }

    /// Tells the kernel the map will be read front to back (more readahead). A hint: errors are ignored.
    pub fn advise_sequential(&self) {
        if let Bytes::Mapped(m) = self {
            let _ = m.advise(Advice::Sequential);
        }
    }

    /// Drops this process's pages of `[offset, offset + len)` (e.g. a tensor already converted), so the
    /// resident set stays bounded while a file much larger than RAM is streamed. The data stays in the
    /// page cache and in the file; a later read maps it again. A hint: errors are ignored.
    pub fn release(&self, offset: usize, len: usize) {
        if let Bytes::Mapped(m) = self {
            if offset.checked_add(len).is_some_and(|end| end <= m.len()) && len > 0 {
                // SAFETY: the map is private and read-only, so MADV_DONTNEED discards nothing but page-table
                // entries: a later access faults the same bytes back in from the (unmodified) file. No
                // reference into the range is invalidated, since its contents cannot change.
                let _ = unsafe { m.unchecked_advise_range(UncheckedAdvice::DontNeed, offset, len) };
            }
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    pub fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}
