//! The plugin's memory allocator on wasm32 (feature `allocator`, on by default).
//!
//! A rule plugin allocates a handful of small blocks per call (a title, field names, values)
//! and frees them before returning. The standard library's wasm32 allocator (dlmalloc) spends
//! a few hundred instructions on each allocation and free, which a plugin pays in fuel and
//! time on every alert. This allocator keeps one free list per power-of-two size class up to
//! [`MAX_SMALL`] bytes: an allocation pops its class's list (or carves a block from the
//! class's current chunk), a free pushes the block back. Blocks are never split or merged, so
//! memory freed in one class is reused only by that class; a plugin's footprint is its peak use
//! per class. Larger blocks go to the standard allocator.
//!
//! WebAssembly modules without the threads proposal run on one thread, which is what makes the
//! unsynchronised state below sound; the allocator is only compiled for such targets.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::ptr;

/// Largest block served from the size classes.
pub const MAX_SMALL: usize = 2048;
/// Smallest block: room for the free-list link (a wasm32 pointer) and 8-byte alignment.
const MIN_BLOCK: usize = 8;
/// Classes 8, 16, ..., 2048 bytes.
const CLASSES: usize = 9;
/// Bytes a class takes from the standard allocator at a time.
const CHUNK: usize = 16 * 1024;

struct Classes {
    /// Head of each class's free list (0 when empty); a free block's first word links to the
    /// next one.
    free: [usize; CLASSES],
    /// Next unused byte of each class's current chunk, and its end.
    next: [usize; CLASSES],
    end: [usize; CLASSES],
}

/// The allocator installed by the SDK on wasm32.
pub struct SizeClasses {
    state: UnsafeCell<Classes>,
}

// SAFETY: installed only on single-threaded wasm32 (see the module docs), so no two threads
// ever reach `state`; the native tests give each thread an allocator of its own.
unsafe impl Sync for SizeClasses {}

impl SizeClasses {
    pub const fn new() -> SizeClasses {
        SizeClasses { state: UnsafeCell::new(Classes { free: [0; CLASSES], next: [0; CLASSES], end: [0; CLASSES] }) }
    }
}

impl Default for SizeClasses {
    fn default() -> Self {
        SizeClasses::new()
    }
}

/// The class of a layout, or `None` when it is served by the standard allocator. A block of
/// class `c` is `8 << c` bytes and aligned to its size, which covers the layout's alignment.
fn class_of(layout: &Layout) -> Option<usize> {
    let size = layout.size().max(layout.align()).max(MIN_BLOCK);
    if size > MAX_SMALL {
        return None;
    }
    let block = size.next_power_of_two();
    Some((block.trailing_zeros() - MIN_BLOCK.trailing_zeros()) as usize)
}

unsafe impl GlobalAlloc for SizeClasses {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let c = match class_of(&layout) {
            Some(c) => c,
            None => return System.alloc(layout),
        };
        // SAFETY: single-threaded (see `Sync` above) and no reference to the state outlives
        // this call.
        let s = &mut *self.state.get();
        let head = s.free[c];
        if head != 0 {
            // SAFETY: `head` is a freed block of this class; its first word is the next link.
            s.free[c] = ptr::read(head as *const usize);
            return head as *mut u8;
        }
        let block = MIN_BLOCK << c;
        if s.next[c] + block > s.end[c] {
            // A chunk aligned to the block size, so every block carved from it is aligned too.
            let chunk = match Layout::from_size_align(CHUNK.max(block), block) {
                Ok(l) => l,
                Err(_) => return ptr::null_mut(),
            };
            let p = System.alloc(chunk);
            if p.is_null() {
                return p;
            }
            s.next[c] = p as usize;
            s.end[c] = p as usize + chunk.size();
        }
        let p = s.next[c];
        s.next[c] += block;
        p as *mut u8
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        let c = match class_of(&layout) {
            Some(c) => c,
            None => return System.dealloc(p, layout),
        };
        // SAFETY: as in `alloc`; `p` is a live block of class `c` that the caller gives up, so
        // its first word may hold the link.
        let s = &mut *self.state.get();
        ptr::write(p as *mut usize, s.free[c]);
        s.free[c] = p as usize;
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = class_of(&layout);
        let new_layout = match Layout::from_size_align(new_size, layout.align()) {
            Ok(l) => l,
            Err(_) => return ptr::null_mut(),
        };
        let new = class_of(&new_layout);
        match (old, new) {
            // The block already has room.
            (Some(a), Some(b)) if a == b => p,
            (None, None) => System.realloc(p, layout, new_size),
            _ => {
                let q = self.alloc(new_layout);
                if !q.is_null() {
                    ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                    self.dealloc(p, layout);
                }
                q
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_size_and_alignment() {
        let l = |size, align| Layout::from_size_align(size, align).unwrap();
        assert_eq!(class_of(&l(0, 1)), Some(0));
        assert_eq!(class_of(&l(8, 8)), Some(0));
        assert_eq!(class_of(&l(9, 1)), Some(1));
        assert_eq!(class_of(&l(3, 64)), Some(3));
        assert_eq!(class_of(&l(2048, 8)), Some(8));
        assert_eq!(class_of(&l(2049, 8)), None);
        assert_eq!(class_of(&l(8, 4096)), None);
    }

    /// Blocks are aligned, do not overlap, keep their bytes through growth and are reused
    /// after being freed.
    #[test]
    fn blocks_are_aligned_disjoint_and_reused() {
        let a = SizeClasses::new();
        unsafe {
            let mut live: Vec<(*mut u8, Layout)> = Vec::new();
            for i in 0..3000usize {
                let layout = Layout::from_size_align(1 + (i * 37) % 3000, 1 << (i % 5)).unwrap();
                let p = a.alloc(layout);
                assert!(!p.is_null());
                assert_eq!(p as usize % layout.align(), 0);
                ptr::write_bytes(p, (i % 251) as u8, layout.size());
                live.push((p, layout));
            }
            let mut spans: Vec<(usize, usize)> =
                live.iter().map(|(p, l)| (*p as usize, *p as usize + l.size())).collect();
            spans.sort();
            assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "blocks overlap");
            for (i, (p, l)) in live.iter_mut().enumerate() {
                assert!((0..l.size()).all(|j| *p.add(j) == (i % 251) as u8), "block {i} was overwritten");
                let grown = a.realloc(*p, *l, l.size() * 2 + 1);
                assert!((0..l.size()).all(|j| *grown.add(j) == (i % 251) as u8), "block {i} lost bytes growing");
                *l = Layout::from_size_align(l.size() * 2 + 1, l.align()).unwrap();
                *p = grown;
            }
            let small = live.iter().position(|(_, l)| class_of(l).is_some()).unwrap();
            let (p, l) = live.swap_remove(small);
            a.dealloc(p, l);
            assert_eq!(a.alloc(l), p, "a freed block is handed out again");
            a.dealloc(p, l);
            for (p, l) in live {
                a.dealloc(p, l);
            }
        }
    }
}
