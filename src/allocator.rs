//! The process's allocator: mimalloc, asked the way most allocations need.
//!
//! The `mimalloc` crate's `GlobalAlloc` passes every request to mimalloc's aligned entry
//! points, whose extra checks and indirections cost more than the allocation itself on
//! the hot path (a replay makes millions of small ones). An alignment mimalloc's plain
//! blocks already have (8 bytes for any size, 16 for sizes in multiples of 16: its size
//! classes keep those) goes to the plain entry points; anything stricter to the aligned
//! ones.

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_option_set, mi_option_t, mi_realloc,
    mi_realloc_aligned, mi_zalloc, mi_zalloc_aligned,
};
use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

pub struct Mimalloc;

/// Whether mimalloc's plain blocks of `size` bytes are aligned enough.
fn plain(align: usize, size: usize) -> bool {
    align <= 8 || (align <= 16 && size.is_multiple_of(16))
}

/// A new block for `layout`: from the plain entry point when its blocks are aligned
/// enough, else from the aligned one.
///
/// # Safety
/// `plain_entry` and `aligned_entry` are a mimalloc allocation function and its aligned
/// form (`mi_malloc` and `mi_malloc_aligned`, or the zeroing pair).
#[inline]
unsafe fn new_block(
    layout: Layout,
    plain_entry: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned_entry: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    // SAFETY: the caller passes a matching pair of mimalloc's allocation functions
    unsafe {
        if plain(layout.align(), layout.size()) {
            plain_entry(layout.size()).cast()
        } else {
            aligned_entry(layout.size(), layout.align()).cast()
        }
    }
}

// SAFETY: every call goes to mimalloc, which returns memory aligned as asked (the plain
// entry points only when `plain` holds) or null, and frees what it allocated.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's allocation pair
        unsafe { new_block(layout, mi_malloc, mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's zeroing allocation pair
        unsafe { new_block(layout, mi_zalloc, mi_zalloc_aligned) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: see the impl
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: see the impl
        unsafe {
            if plain(layout.align(), new_size) {
                mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

/// mimalloc's `mi_option_purge_delay`: its place in `mi_option_e` (the same in mimalloc 2
/// and 3; the sys crate does not name it). A test checks its default.
const PURGE_DELAY: mi_option_t = 15;

/// The process is about to exit and leaves its memory to the kernel. At exit mimalloc
/// hands every free page back first, one range at a time (300-450 `madvise` calls after
/// a replay of the bench's captures, 1-3 ms), just before the kernel takes the whole
/// address space back at once; with purging off it does not.
pub fn leave_free_pages_to_exit() {
    // SAFETY: sets one of mimalloc's options, which it reads on each use
    unsafe { mi_option_set(PURGE_DELAY, -1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `PURGE_DELAY` names the option whose default is 1,000 ms in mimalloc 3, the one
    /// built here (unless the environment sets it): a mimalloc that moved its options
    /// would fail here.
    #[test]
    fn purge_delay_is_the_option_it_names() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: reads one of mimalloc's options
            assert_eq!(unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }, 1000);
        }
    }

    /// Every size up to a few KiB, at every alignment up to a page, comes back aligned,
    /// writable and freed without complaint, through alloc, zeroed alloc and realloc.
    #[test]
    fn blocks_are_aligned_as_asked() {
        let a = Mimalloc;
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in (1..600).chain([1000, 4095, 4096, 70_000]) {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a non-zero size; each block is freed once, with its layout
                unsafe {
                    let p = a.alloc(layout);
                    assert!(
                        !p.is_null() && (p as usize).is_multiple_of(align),
                        "{size}/{align}"
                    );
                    p.write_bytes(0xab, size);
                    let q = a.realloc(p, layout, size * 3 + 5);
                    assert!(
                        !q.is_null() && (q as usize).is_multiple_of(align),
                        "realloc {size}/{align}"
                    );
                    assert_eq!(*q, 0xab);
                    a.dealloc(q, Layout::from_size_align(size * 3 + 5, align).unwrap());
                    let z = a.alloc_zeroed(layout);
                    assert!((z as usize).is_multiple_of(align) && *z.add(size - 1) == 0);
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
