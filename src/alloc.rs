//! The bridge's global allocator: the system's (glibc's `malloc`), with small blocks grown
//! ahead of need.
//!
//! A vector that grows one small write at a time reallocates at every doubling: the NATS
//! client writes each message's header block into a vector that starts empty, about four and
//! a half reallocations per message, each a round trip through glibc's `realloc`, which takes
//! its new chunk past the thread's cache of free chunks. [`SmallGrowth`] answers the growth of
//! a small block from the room the block already has (`malloc_usable_size`), and otherwise
//! moves it to a block twice the size asked for (`malloc`, a copy, `free`), so the next
//! doubling finds room. Only blocks that grow and stay within [`SMALL`] bytes get the extra
//! room, at most twice what they asked for; every other request goes to the system allocator
//! unchanged. Four times the size saved a little more CPU but cost twice the memory.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks up to this size grow ahead of need.
pub const SMALL: usize = 512;
/// How much more than asked a small block gets when it must move.
const AHEAD: usize = 2;
/// `malloc`'s own alignment: blocks with a stricter one are left to [`System`].
const MALLOC_ALIGN: usize = 16;

/// The system allocator, with small reallocations answered ahead (see the module).
pub struct SmallGrowth;

// SAFETY: every block comes from glibc's allocator (through `System`, or `malloc` here) and
// goes back to it: `free` takes blocks of `malloc`, `calloc` and `posix_memalign` alike. A
// block is kept by `realloc` only when `malloc_usable_size` says it holds `new_size` bytes,
// which glibc lets the caller use; a moved one is `malloc`'s, aligned to 16, and only
// alignments up to 16 are handled here.
unsafe impl GlobalAlloc for SmallGrowth {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        System.alloc(layout)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        System.alloc_zeroed(layout)
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size <= layout.size() || new_size > SMALL || layout.align() > MALLOC_ALIGN {
            return System.realloc(ptr, layout, new_size);
        }
        if new_size <= libc::malloc_usable_size(ptr.cast()) {
            return ptr;
        }
        // A new block and a copy: glibc's `realloc` takes its new chunk past the thread's
        // cache of free chunks, `malloc` from it.
        let ahead = new_size * AHEAD;
        let new = libc::malloc(ahead).cast::<u8>();
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size());
            libc::free(ptr.cast());
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_block_moves_ahead_of_need_and_keeps_its_bytes() {
        let a = SmallGrowth;
        unsafe {
            let layout = Layout::from_size_align(10, 1).unwrap();
            let p = a.alloc(layout);
            assert!(!p.is_null());
            for i in 0..10 {
                *p.add(i) = i as u8;
            }
            // The first growth past the block's room moves it to twice the size asked.
            let q = a.realloc(p, layout, 40);
            assert_ne!(q, p);
            assert!(libc::malloc_usable_size(q.cast()) >= 80);
            for i in 0..10 {
                assert_eq!(*q.add(i), i as u8);
            }
            for i in 10..40 {
                *q.add(i) = i as u8;
            }
            // The next doubling fits; the one after moves it again, bytes and all.
            let r = a.realloc(q, Layout::from_size_align(40, 1).unwrap(), 80);
            assert_eq!(r, q);
            let s = a.realloc(r, Layout::from_size_align(80, 1).unwrap(), 160);
            assert!(libc::malloc_usable_size(s.cast()) >= 320);
            for i in 0..40 {
                assert_eq!(*s.add(i), i as u8);
            }
            a.dealloc(s, Layout::from_size_align(160, 1).unwrap());
        }
    }

    #[test]
    fn large_shrinking_and_overaligned_blocks_are_the_system_allocators() {
        let a = SmallGrowth;
        unsafe {
            // Large: moved to exactly what is asked (glibc may round up a little).
            let layout = Layout::from_size_align(400, 8).unwrap();
            let p = a.alloc(layout);
            let q = a.realloc(p, layout, 4096);
            assert!(libc::malloc_usable_size(q.cast()) < 2 * 4096);
            // Shrinking keeps the bytes asked for.
            *q = 7;
            let r = a.realloc(q, Layout::from_size_align(4096, 8).unwrap(), 8);
            assert_eq!(*r, 7);
            a.dealloc(r, Layout::from_size_align(8, 8).unwrap());
            // Over-aligned: alignment kept.
            let layout = Layout::from_size_align(64, 64).unwrap();
            let p = a.alloc(layout);
            let q = a.realloc(p, layout, 128);
            assert_eq!(q as usize % 64, 0);
            a.dealloc(q, Layout::from_size_align(128, 64).unwrap());
        }
    }
}
