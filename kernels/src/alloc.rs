//! A global allocator that gives every large allocation a 64-byte (cache-line) aligned start.
//!
//! Why: glibc serves a large `malloc` from its own `mmap` with a 16-byte header, so a big `Vec<f32>`
//! starts 16 bytes past a cache line. ggml's AMX kernel accumulates into its output rows with 64-byte
//! vector loads and stores; on such a buffer every one of them straddles two cache lines, and the same
//! prefill matmul runs at ~195 GFLOP/s instead of ~305 (2 threads, 512×2560 · 2560×{7680,2560,10240},
//! q8_0, measured by alternating both in one process). llama.cpp never sees this: its outputs live
//! in ggml's own aligned compute buffers. Our activations are plain `Vec<f32>`s, so the programs
//! install this allocator:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: moellava_kernels::alloc::CacheAligned = moellava_kernels::alloc::CacheAligned;
//! ```
//!
//! The library is correct without it: [`crate::cpu::gemm`] computes into an aligned scratch buffer and
//! copies when the output it is given is not aligned (a copy that costs about 3 % of the matmul).
//!
//! [`keep_freed_activations`] tunes glibc's malloc for the other half of the same problem: a forward
//! pass frees and re-allocates megabytes of activations per op, and glibc's defaults hand that memory
//! back to the kernel between ops, so every op pays page faults to get it again.
//!
//! The rule depends on the size alone ([`LARGE`] bytes and up get [`ALIGN`]), so `dealloc` and
//! `realloc` always see the same layout the block was made with.

use std::alloc::{GlobalAlloc, Layout, System};

/// Alignment given to large allocations: one cache line, one AVX-512 vector.
pub const ALIGN: usize = 64;

/// Allocations of at least this many bytes are aligned to [`ALIGN`]; smaller ones keep their own
/// alignment (no padding on the many small allocations, which no kernel streams through).
pub const LARGE: usize = 4096;

/// [`System`] with [`ALIGN`] for every allocation of [`LARGE`] bytes or more.
pub struct CacheAligned;

fn widened(layout: Layout) -> Layout {
    if layout.size() >= LARGE && layout.align() < ALIGN {
        // same size, a larger power of two; a size too close to `isize::MAX` to round up to `ALIGN`
        // is refused by `from_size_align`, and that block keeps its own layout
        Layout::from_size_align(layout.size(), ALIGN).unwrap_or(layout)
    } else {
        layout
    }
}

// SAFETY: every method forwards to `System` with the layout `widened` makes, which is a valid layout
// (same size, a larger power-of-two alignment) and a function of the original layout alone, so a block
// is always freed or resized with exactly the layout it was allocated with. `realloc` across the
// `LARGE` boundary changes the widened alignment, so it allocates, copies and frees itself.
unsafe impl GlobalAlloc for CacheAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: `widened` keeps the non-zero size the caller guarantees.
        unsafe { System.alloc(widened(layout)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(widened(layout)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator with `layout`, hence by `System` with
        // `widened(layout)`.
        unsafe { System.dealloc(ptr, widened(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = widened(layout);
        // SAFETY: the caller guarantees `new_size` is non-zero and valid with `layout.align()`.
        let new = widened(unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) });
        if old.align() == new.align() {
            // SAFETY: `ptr` came from `System` with `old`; the new layout keeps its alignment.
            return unsafe { System.realloc(ptr, old, new_size) };
        }
        // SAFETY: `new` is a valid non-zero layout; the copy covers the bytes both blocks hold, and
        // `ptr` is freed with the layout `System` allocated it with.
        unsafe {
            let fresh = System.alloc(new);
            if !fresh.is_null() {
                std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size));
                System.dealloc(ptr, old);
            }
            fresh
        }
    }
}

/// Blocks up to this size come from malloc's heaps (and are reused after a free), larger ones from
/// their own `mmap`. 32 MiB is the most glibc accepts (half its 64 MiB per-thread heap) and holds a
/// 512-token prefill's activations (the largest, Phi-2's FFN `[512, 10240]` f32, is 21 MB).
pub const MALLOC_MMAP_THRESHOLD: usize = 32 << 20;

/// Free memory at the top of a heap that malloc keeps instead of returning it to the kernel (glibc's
/// default is 128 KiB). A few layers' worth of activations, so a prefill reuses its own pages.
pub const MALLOC_TRIM_THRESHOLD: usize = 128 << 20;

/// Tells glibc's malloc to keep freed activation memory for the next op instead of returning it
/// ([`MALLOC_MMAP_THRESHOLD`], [`MALLOC_TRIM_THRESHOLD`]): by default each of a forward pass's
/// megabyte-sized `Vec`s is unmapped or trimmed when dropped and faulted in again, page by page, by
/// the next op. On StableLM-1.6B's dense q4_K file, a 512-token prefill took ~490k page faults with
/// the defaults and ~45k with these (`perf stat -e page-faults`; BENCHMARKS.md has the speed). Costs
/// at most `MALLOC_TRIM_THRESHOLD` of RSS per heap. Returns whether malloc took both settings; a no-op
/// returning `true` where the C library is not glibc. Idempotent; the model loader calls it.
pub fn keep_freed_activations() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only changes malloc's parameters (under malloc's own lock); any thread may
        // call it at any time, and both values are within the ranges glibc documents.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD as libc::c_int) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD as libc::c_int) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malloc_takes_the_settings() {
        assert!(keep_freed_activations(), "glibc refused M_MMAP_THRESHOLD or M_TRIM_THRESHOLD");
        assert!(keep_freed_activations(), "a second call must succeed too");
    }

    #[test]
    fn large_blocks_are_aligned_and_survive_growth_across_the_boundary() {
        let a = CacheAligned;
        for size in [LARGE, LARGE + 4, 1 << 20, 24 << 20] {
            let l = Layout::from_size_align(size, 4).unwrap();
            // SAFETY: non-zero layout; the block is freed with the same layout.
            unsafe {
                let p = a.alloc(l);
                assert!(!p.is_null());
                assert_eq!(p as usize % ALIGN, 0, "{size} bytes");
                a.dealloc(p, l);
            }
        }
        // grow a small block past LARGE and back: contents kept, alignment right each time
        let small = Layout::from_size_align(100, 4).unwrap();
        // SAFETY: each pointer is used with the layout it currently has.
        unsafe {
            let p = a.alloc(small);
            for i in 0..100 {
                *p.add(i) = i as u8;
            }
            let p = a.realloc(p, small, 1 << 16);
            assert_eq!(p as usize % ALIGN, 0);
            assert!((0..100).all(|i| *p.add(i) == i as u8));
            let big = Layout::from_size_align(1 << 16, 4).unwrap();
            let p = a.realloc(p, big, 50);
            assert!((0..50).all(|i| *p.add(i) == i as u8));
            a.dealloc(p, Layout::from_size_align(50, 4).unwrap());
        }
    }
}
