//! The one place in `runtime` (and `convert`, which borrows it) that maps a file into memory.
#![allow(unsafe_code)]

use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

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
