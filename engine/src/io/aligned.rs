//! `AlignedBuf`: the one buffer type that crosses the `DiskIo` seam.
//!
//! O_DIRECT needs the memory address, the file offset and the length aligned
//! to the device's logical block size; 4 KiB covers every device we target.
//! Addresses are always 4 KiB-aligned; lengths are multiples of 512 bytes
//! (a read of a small record), and writes check for whole 4 KiB pages.
//! The buffer is owned (not borrowed) so it can travel into a backend and stay
//! there until the kernel is done with it, whatever happens to the future.
//!
//! Buffers of power-of-two capacity go back to a small process-wide free list
//! when dropped, and [`AlignedBuf::recycled`] takes from it. Segment images
//! (4 MiB) and their 1 MiB write chunks were freshly allocated and zeroed per
//! use: the page faults, the kernel's page clearing and the memset were 15%
//! of ballastd's CPU under 1 MiB sequential writes.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use super::{IO_ALIGN, SECTOR};

/// An owned, zero-initialised heap buffer whose address is aligned to
/// [`IO_ALIGN`] and whose length is a non-zero multiple of [`SECTOR`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Bytes allocated (the layout's size); `len <= cap`.
    cap: usize,
}

/// Size classes of the free list: 4 KiB .. 8 MiB, powers of two.
const MIN_CLASS: u32 = 12;
const MAX_CLASS: u32 = 23;
const CLASSES: usize = (MAX_CLASS - MIN_CLASS + 1) as usize;
/// Bytes each class may keep idle (at least one buffer): bounds the memory
/// the free list holds to about 12 x 16 MiB in the worst case, and far less
/// in practice (only the sizes in use fill up).
const CLASS_BYTES: usize = 16 << 20;

/// Idle allocations by class. Raw pointers: each was allocated with the
/// layout of its class (size `1 << class`, alignment `IO_ALIGN`) and is owned
/// by the list until taken.
struct FreeList {
    classes: [parking_lot::Mutex<Vec<NonNull<u8>>>; CLASSES],
}

// SAFETY: the pointers are owned allocations nobody else references; moving
// them between threads is moving ownership of plain memory.
unsafe impl Send for FreeList {}
// SAFETY: every access goes through the per-class mutex.
unsafe impl Sync for FreeList {}

static FREE: FreeList = FreeList {
    classes: [const { parking_lot::Mutex::new(Vec::new()) }; CLASSES],
};

/// The class whose capacity holds `len`, if the free list serves that size.
fn class_of(len: usize) -> Option<u32> {
    let c = len.next_power_of_two().trailing_zeros().max(MIN_CLASS);
    (c <= MAX_CLASS).then_some(c)
}

// SAFETY: `AlignedBuf` owns its allocation exclusively (like `Box<[u8]>`); the
// raw pointer is never shared, so moving it to another thread is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out `&[u8]`, which is `Sync`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocate `len` zeroed bytes.
    ///
    /// # Panics
    /// If `len` is zero or not a multiple of [`SECTOR`] (callers round up;
    /// a misaligned length is a bug, and O_DIRECT would refuse it anyway), or
    /// if the allocation fails.
    pub fn zeroed(len: usize) -> AlignedBuf {
        assert!(
            len > 0 && len.is_multiple_of(SECTOR),
            "AlignedBuf length {len} must be a non-zero multiple of {SECTOR}"
        );
        Self::alloc_zeroed(len, len)
    }

    /// A buffer of `len` bytes whose contents are unspecified (initialised,
    /// but possibly an earlier user's data): for reads that fill it and
    /// writes that overwrite it whole. Reuses an idle allocation if any.
    pub fn recycled(len: usize) -> AlignedBuf {
        assert!(
            len > 0 && len.is_multiple_of(SECTOR),
            "AlignedBuf length {len} must be a non-zero multiple of {SECTOR}"
        );
        let Some(class) = class_of(len) else {
            return Self::zeroed(len);
        };
        let cap = 1usize << class;
        match FREE.classes[(class - MIN_CLASS) as usize].lock().pop() {
            Some(ptr) => AlignedBuf { ptr, len, cap },
            None => Self::alloc_zeroed(len, cap),
        }
    }

    fn alloc_zeroed(len: usize, cap: usize) -> AlignedBuf {
        let layout = Self::layout(cap);
        // SAFETY: `layout` has a non-zero size (callers check `len > 0`, and
        // `cap >= len`).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, cap }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, IO_ALIGN)
            .expect("a size that fit in memory is a valid layout size")
    }

    /// Length in bytes (a non-zero multiple of [`SECTOR`]).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a buffer holds at least one sector.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `cap >= len` initialised bytes (zeroed at
        // allocation, written only through safe slices since) that we own;
        // the borrow of `self` keeps them alive and prevents mutation for the
        // slice's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Start of the buffer, for handing to the kernel. Stable for the
    /// buffer's whole life, even when the `AlignedBuf` value itself moves.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Mutable start of the buffer; stable like [`AlignedBuf::as_ptr`].
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.cap.is_power_of_two() {
            if let Some(class) = class_of(self.cap) {
                let mut list = FREE.classes[(class - MIN_CLASS) as usize].lock();
                if list.is_empty() || (list.len() + 1) * self.cap <= CLASS_BYTES {
                    // The allocation has exactly its class's layout, so a
                    // later `recycled` may adopt it.
                    list.push(self.ptr);
                    return;
                }
            }
        }
        // SAFETY: `ptr` was allocated in `alloc_zeroed` with the layout of
        // `cap` and is freed only here, once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_aligned_and_writable() {
        for len in [IO_ALIGN, 3 * IO_ALIGN, 1 << 20] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
            b[len - 1] = 7;
            b.as_mut_slice()[0] = 9;
            assert_eq!((b.as_slice()[0], b[len - 1]), (9, 7));
        }
    }

    #[test]
    fn size_classes() {
        assert_eq!(class_of(4096), Some(12));
        assert_eq!(class_of(8192), Some(13));
        assert_eq!(class_of(3 * 4096), Some(14));
        assert_eq!(class_of(4 << 20), Some(22));
        assert_eq!(class_of(8 << 20), Some(23));
        assert_eq!(class_of((8 << 20) + 4096), None);
    }

    #[test]
    fn recycled_buffers_are_sized_aligned_and_reusable() {
        // Other tests share the free list, so only what holds whatever they
        // do is asserted: length, alignment, and writable to the end.
        for len in [IO_ALIGN, 5 * IO_ALIGN, (1 << 20) + IO_ALIGN, 16 << 20] {
            for _ in 0..3 {
                let mut b = AlignedBuf::recycled(len);
                assert_eq!(b.len(), len);
                assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
                b[len - 1] = 7;
                assert_eq!(b.as_slice()[len - 1], 7);
            }
        }
    }

    #[test]
    fn moving_keeps_the_address() {
        let b = AlignedBuf::zeroed(IO_ALIGN);
        let p = b.as_ptr();
        let moved = std::thread::spawn(move || b).join().unwrap();
        assert_eq!(moved.as_ptr(), p);
    }

    #[test]
    #[should_panic(expected = "multiple of 512")]
    fn rejects_unaligned_length() {
        let _ = AlignedBuf::zeroed(100);
    }

    #[test]
    fn sector_lengths_keep_page_alignment() {
        for len in [512, 2560, 4608] {
            let b = AlignedBuf::recycled(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
        }
    }

    #[test]
    #[should_panic(expected = "multiple of 512")]
    fn rejects_zero_length() {
        let _ = AlignedBuf::zeroed(0);
    }
}
