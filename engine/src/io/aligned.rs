//! `AlignedBuf`: the one buffer type that crosses the `DiskIo` seam.
//!
//! O_DIRECT needs the memory address, the file offset and the length aligned
//! to the device's logical block size; 4 KiB covers every device we target.
//! The buffer is owned (not borrowed) so it can travel into a backend and stay
//! there until the kernel is done with it, whatever happens to the future.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use super::IO_ALIGN;

/// An owned, zero-initialised heap buffer whose address is aligned to
/// [`IO_ALIGN`] and whose length is a non-zero multiple of it.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
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
    /// If `len` is zero or not a multiple of [`IO_ALIGN`] (callers round up;
    /// a misaligned length is a bug, and O_DIRECT would refuse it anyway), or
    /// if the allocation fails.
    pub fn zeroed(len: usize) -> AlignedBuf {
        assert!(
            len > 0 && len.is_multiple_of(IO_ALIGN),
            "AlignedBuf length {len} must be a non-zero multiple of {IO_ALIGN}"
        );
        let layout = Self::layout(len);
        // SAFETY: `layout` has a non-zero size (checked above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, IO_ALIGN)
            .expect("a multiple of 4096 that fit in memory is a valid layout size")
    }

    /// Length in bytes (a non-zero multiple of [`IO_ALIGN`]).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a buffer holds at least one [`IO_ALIGN`] block.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised (zeroed at allocation)
        // bytes that we own; the borrow of `self` keeps them alive and
        // prevents mutation for the slice's lifetime.
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
        // SAFETY: `ptr` was allocated in `zeroed` with exactly this layout and
        // is freed only here, once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
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
    fn moving_keeps_the_address() {
        let b = AlignedBuf::zeroed(IO_ALIGN);
        let p = b.as_ptr();
        let moved = std::thread::spawn(move || b).join().unwrap();
        assert_eq!(moved.as_ptr(), p);
    }

    #[test]
    #[should_panic(expected = "multiple of 4096")]
    fn rejects_unaligned_length() {
        let _ = AlignedBuf::zeroed(100);
    }

    #[test]
    #[should_panic(expected = "multiple of 4096")]
    fn rejects_zero_length() {
        let _ = AlignedBuf::zeroed(0);
    }
}
