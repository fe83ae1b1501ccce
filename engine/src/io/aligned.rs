//! `AlignedBuf`: the one buffer type that crosses the `DiskIo` seam, and
//! `SharedBuf`, a buffer filled at its end while ranges frozen below go to
//! disk as views of it (the segment image, see `segment`).
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
use std::ops::Range;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Arc;

use super::{IO_ALIGN, SECTOR};

/// An owned, zero-initialised heap buffer whose address is aligned to
/// [`IO_ALIGN`] and whose length is a non-zero multiple of [`SECTOR`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Bytes allocated (the layout's size); `len <= cap`.
    cap: usize,
    /// Set for a frozen view of a [`SharedBuf`]: the allocation the view
    /// lies in, kept alive by it. A view owns no memory of its own (its drop
    /// frees nothing) and is never written through.
    owner: Option<Arc<AlignedBuf>>,
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
            Some(ptr) => AlignedBuf {
                ptr,
                len,
                cap,
                owner: None,
            },
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
        AlignedBuf {
            ptr,
            len,
            cap,
            owner: None,
        }
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

    /// # Panics
    /// On a frozen view of a [`SharedBuf`] (which the engine only writes to
    /// disk, never reads into).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.assert_owned();
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Start of the buffer, for handing to the kernel. Stable for the
    /// buffer's whole life, even when the `AlignedBuf` value itself moves.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Mutable start of the buffer; stable like [`AlignedBuf::as_ptr`].
    ///
    /// # Panics
    /// On a frozen view, as [`AlignedBuf::as_mut_slice`].
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.assert_owned();
        self.ptr.as_ptr()
    }

    fn assert_owned(&self) {
        assert!(
            self.owner.is_none(),
            "a frozen view of a shared buffer is written to disk, never into"
        );
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.owner.is_some() {
            // A view: the owner (dropped after this) holds the allocation.
            return;
        }
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

/// One allocation shared by a single writer, which fills it from the front,
/// and frozen views of ranges it has finished with, which travel into the
/// I/O backend as ordinary [`AlignedBuf`]s and keep the allocation alive
/// until the kernel is done with them.
///
/// This is how the segment image goes to disk without a copy: a 1 MiB write
/// chunk copied out of the image was 4-5% of the engine's CPU under 4 KiB
/// random writes (write_cpu profile), and held the writer's lock meanwhile.
/// Which ranges are frozen is the caller's bookkeeping, hence the unsafe
/// accessors; the rule is that no byte is written while a view or a shared
/// slice of it lives.
pub struct SharedBuf(Arc<AlignedBuf>);

impl SharedBuf {
    pub fn new(buf: AlignedBuf) -> SharedBuf {
        buf.assert_owned();
        SharedBuf(Arc::new(buf))
    }

    pub fn len(&self) -> usize {
        self.0.len
    }

    /// Always false, as for [`AlignedBuf`].
    pub fn is_empty(&self) -> bool {
        false
    }

    fn check(&self, range: &Range<usize>) {
        assert!(
            range.start <= range.end && range.end <= self.0.len,
            "range {range:?} outside a shared buffer of {} bytes",
            self.0.len
        );
    }

    /// The bytes of `range`, for reading.
    ///
    /// # Safety
    /// Nothing writes `range` (through [`SharedBuf::slice_mut`]) while the
    /// returned slice lives.
    pub unsafe fn slice(&self, range: Range<usize>) -> &[u8] {
        self.check(&range);
        // SAFETY: in bounds (checked above) of an allocation the Arc keeps
        // alive for `&self`'s lifetime; no writer, by the caller's promise.
        unsafe { std::slice::from_raw_parts(self.0.ptr.as_ptr().add(range.start), range.len()) }
    }

    /// The bytes of `range`, for writing.
    ///
    /// # Safety
    /// No frozen view (see [`SharedBuf::frozen`]) overlaps `range` while the
    /// returned slice lives. (Other slices cannot: this borrows `self`
    /// mutably.)
    pub unsafe fn slice_mut(&mut self, range: Range<usize>) -> &mut [u8] {
        self.check(&range);
        // SAFETY: in bounds, alive as in `slice`; the only access, by
        // `&mut self` and the caller's promise about views. The slice is made
        // from the raw pointer, never from a reference to the whole buffer,
        // so it asserts nothing about the ranges views are reading.
        unsafe { std::slice::from_raw_parts_mut(self.0.ptr.as_ptr().add(range.start), range.len()) }
    }

    /// A view of `range` that a backend can write to disk while the writer
    /// goes on filling the rest. `range.start` is a multiple of [`IO_ALIGN`]
    /// (so the view's address is aligned) and its length a non-zero multiple
    /// of [`SECTOR`].
    ///
    /// # Safety
    /// `range` is never written again while the view lives.
    pub unsafe fn frozen(&self, range: Range<usize>) -> AlignedBuf {
        self.check(&range);
        assert!(
            range.start.is_multiple_of(IO_ALIGN)
                && !range.is_empty()
                && range.len().is_multiple_of(SECTOR),
            "frozen range {range:?} is not sector-sized and page-aligned"
        );
        // SAFETY: in bounds (checked), so the pointer stays in the allocation.
        let start = unsafe { self.0.ptr.add(range.start) };
        AlignedBuf {
            ptr: start,
            len: range.len(),
            cap: 0,
            owner: Some(self.0.clone()),
        }
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

    #[test]
    fn frozen_views_keep_the_bytes_and_the_allocation() {
        let mut s = SharedBuf::new(AlignedBuf::zeroed(4 * IO_ALIGN));
        // SAFETY: no view exists yet.
        unsafe { s.slice_mut(0..2 * IO_ALIGN) }.fill(5);
        // SAFETY: the first two pages are not written again below.
        let view = unsafe { s.frozen(0..2 * IO_ALIGN) };
        // SAFETY: no view covers the last two pages.
        unsafe { s.slice_mut(2 * IO_ALIGN..4 * IO_ALIGN) }.fill(6);
        let base = s.0.as_ptr();
        drop(s);
        // The view outlives the writer's handle and still reads its bytes.
        assert_eq!(view.as_ptr(), base);
        assert_eq!(view.len(), 2 * IO_ALIGN);
        assert!(view.iter().all(|&b| b == 5));
        let other = std::thread::spawn(move || view).join().unwrap();
        assert!(other.iter().all(|&b| b == 5));
    }

    #[test]
    #[should_panic(expected = "never into")]
    fn frozen_views_refuse_writes() {
        let s = SharedBuf::new(AlignedBuf::zeroed(IO_ALIGN));
        // SAFETY: nothing writes the range (the write below panics first).
        let mut view = unsafe { s.frozen(0..IO_ALIGN) };
        view[0] = 1;
    }

    #[test]
    #[should_panic(expected = "page-aligned")]
    fn frozen_views_start_on_a_page() {
        let s = SharedBuf::new(AlignedBuf::zeroed(2 * IO_ALIGN));
        // SAFETY: nothing writes the range.
        let _ = unsafe { s.frozen(SECTOR..IO_ALIGN) };
    }
}
