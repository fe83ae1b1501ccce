//! The segment writer: records are packed densely into an in-memory image of
//! the open segment and streamed to disk in large aligned writes.
//!
//! Full pages go out in the background once about 1 MiB has accumulated; a
//! commit pads the open segment to the next 4 KiB page and writes the tail,
//! so no page that a commit made durable is ever written again (no torn
//! rewrite of flushed data). A segment's image stays in memory until every
//! write of it has completed, and reads of its records are served from that
//! image.
//!
//! The image is the parts already handed to the disk plus a tail buffer the
//! next records go into. A write hands its part to the disk shared
//! (`DiskIo::write_shared`): the same memory serves reads meanwhile, and no
//! byte is copied between the records' encoding and the disk (a copy of
//! every 1 MiB into a write buffer was 1-5% of the CPU of 4 KiB writes).

use crate::error::{EngineError, Result};
use crate::io::{AlignedBuf, IO_ALIGN};
use crate::key::SegmentId;
use crate::pool::{PoolDisk, Space};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::task::JoinHandle;

/// Size of a tail buffer, and so of a streamed write.
const STREAM_CHUNK: usize = 1 << 20;

/// A full tail streams once less than this is left in it: room for the
/// largest record (a 64 KiB block and its header) with the writes still
/// close to 1 MiB.
const TAIL_ROOM: usize = 128 << 10;

pub(crate) struct SegImage {
    pub id: SegmentId,
    /// The parts handed to the disk, in order: (image offset, bytes).
    parts: Vec<(usize, Arc<AlignedBuf>)>,
    /// Image bytes `[issued, fill)` are `tail[..fill - issued]`.
    tail: AlignedBuf,
    pub fill: usize,
    issued: usize,
    outstanding: Arc<AtomicUsize>,
}

impl SegImage {
    fn new(id: SegmentId, segment_size: usize) -> SegImage {
        SegImage {
            id,
            parts: Vec::new(),
            // Recycled: records overwrite what they use, and the padding up
            // to a page is zeroed before it is written (`pad`).
            tail: AlignedBuf::recycled(tail_len(segment_size)),
            fill: 0,
            issued: 0,
            outstanding: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Room for `len` more bytes at `fill` in the tail (a record larger
    /// than the tail's room grows it; none does at block sizes up to 64 KiB).
    fn reserve(&mut self, len: usize) -> &mut [u8] {
        let at = self.fill - self.issued;
        if at + len > self.tail.len() {
            let mut bigger = AlignedBuf::recycled(align_up(at + len));
            bigger[..at].copy_from_slice(&self.tail[..at]);
            self.tail = bigger;
        }
        &mut self.tail[at..at + len]
    }

    /// Hand image bytes `[issued, upto)` over as a part of their own (`upto`
    /// page aligned, at most one page past `fill`): the bytes filled past
    /// `upto` (less than a page) start the next tail.
    fn freeze(&mut self, upto: usize) -> Option<Arc<AlignedBuf>> {
        if upto <= self.issued {
            return None;
        }
        let n = upto - self.issued;
        let carry = self.fill.saturating_sub(upto);
        let mut next = AlignedBuf::recycled(self.tail.len());
        next[..carry].copy_from_slice(&self.tail[n..n + carry]);
        let mut part = std::mem::replace(&mut self.tail, next);
        part.truncate(n);
        let part = Arc::new(part);
        self.parts.push((self.issued, part.clone()));
        self.issued = upto;
        Some(part)
    }

    /// Copy image bytes `[offset, offset + out.len())` if they were filled.
    fn read(&self, offset: usize, out: &mut [u8]) -> bool {
        let end = offset + out.len();
        if end > self.fill {
            return false;
        }
        let mut pos = offset;
        let parts = self.parts.iter().map(|(s, p)| (*s, &p[..]));
        let tail = std::iter::once((self.issued, &self.tail[..self.fill - self.issued]));
        for (start, bytes) in parts.chain(tail) {
            let stop = start + bytes.len();
            if pos >= start && pos < stop {
                let n = (stop - pos).min(end - pos);
                out[pos - offset..pos - offset + n]
                    .copy_from_slice(&bytes[pos - start..pos - start + n]);
                pos += n;
                if pos == end {
                    return true;
                }
            }
        }
        pos == end
    }
}

/// The tail buffer's size: a stream chunk, or the whole of a smaller segment.
fn tail_len(segment_size: usize) -> usize {
    align_up(segment_size).min(STREAM_CHUNK)
}

pub(crate) struct Writer {
    pub open: Option<SegImage>,
    sealed: Vec<SegImage>,
    pending: Vec<JoinHandle<std::io::Result<()>>>,
    dirty_disks: BTreeSet<u32>,
    /// Segments whose written length changed since the last commit.
    pub written: HashMap<SegmentId, u32>,
    segment_size: usize,
}

fn align_up(v: usize) -> usize {
    v.div_ceil(IO_ALIGN) * IO_ALIGN
}

fn align_down(v: usize) -> usize {
    v / IO_ALIGN * IO_ALIGN
}

/// Where a record landed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Placed {
    pub segment: SegmentId,
    pub offset: u32,
}

impl Writer {
    pub fn new(segment_size: u32) -> Writer {
        Writer {
            open: None,
            sealed: Vec::new(),
            pending: Vec::new(),
            dirty_disks: BTreeSet::new(),
            written: HashMap::new(),
            segment_size: segment_size as usize,
        }
    }

    /// Images still held in memory (open + sealed with writes in flight).
    pub fn images_in_memory(&self) -> usize {
        self.sealed.len() + usize::from(self.open.is_some())
    }

    /// Reserve `len` bytes in the open segment (opening a new one when it does
    /// not fit) and let `fill` write the record there.
    pub fn append(
        &mut self,
        len: usize,
        space: &parking_lot::Mutex<Space>,
        disks: &[Arc<PoolDisk>],
        rt: &tokio::runtime::Handle,
        use_reserve: bool,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<Placed> {
        if len > self.segment_size {
            return Err(EngineError::InvalidArgument(format!(
                "record of {len} bytes does not fit a segment of {} bytes",
                self.segment_size
            )));
        }
        self.prune();
        let fits = self
            .open
            .as_ref()
            .is_some_and(|o| o.fill + len <= self.segment_size);
        if !fits {
            let id = space
                .lock()
                .allocate(use_reserve)
                .ok_or(EngineError::NoSpace)?;
            if let Some(old) = self.open.take() {
                self.seal(old, disks, rt, space);
            }
            self.open = Some(SegImage::new(id, self.segment_size));
        }
        let open = self
            .open
            .as_mut()
            .expect("open segment exists after allocation");
        let offset = open.fill;
        fill(open.reserve(len));
        open.fill += len;
        let placed = Placed {
            segment: open.id,
            offset: offset as u32,
        };
        // Only a full stream chunk goes out here (a segment smaller than one
        // is written whole by commits and sealing).
        if open.tail.len() == STREAM_CHUNK && open.fill - open.issued + TAIL_ROOM > STREAM_CHUNK {
            let upto = align_down(open.fill);
            self.issue(upto, disks, rt);
        }
        Ok(placed)
    }

    /// Write `[issued, upto)` of the open segment.
    fn issue(&mut self, upto: usize, disks: &[Arc<PoolDisk>], rt: &tokio::runtime::Handle) {
        let Some(open) = self.open.as_mut() else {
            return;
        };
        if let Some(h) = issue_range(open, upto, disks, rt, self.segment_size as u32) {
            self.pending.push(h);
            self.dirty_disks.insert(open.id.disk);
            self.written.insert(open.id, open.issued as u32);
        }
    }

    fn seal(
        &mut self,
        mut img: SegImage,
        disks: &[Arc<PoolDisk>],
        rt: &tokio::runtime::Handle,
        space: &parking_lot::Mutex<Space>,
    ) {
        let upto = pad(&mut img);
        img.fill = upto;
        if let Some(h) = issue_range(&mut img, upto, disks, rt, self.segment_size as u32) {
            self.pending.push(h);
            self.dirty_disks.insert(img.id.disk);
        }
        self.written.insert(img.id, img.issued as u32);
        if let Some(info) = space.lock().used.get_mut(&img.id) {
            info.state = crate::pool::SegState::Sealed;
            info.written = img.issued as u32;
        }
        self.sealed.push(img);
    }

    /// Drop images whose writes have all completed.
    fn prune(&mut self) {
        self.sealed
            .retain(|s| s.outstanding.load(Ordering::Acquire) > 0);
    }

    /// Copy `out.len()` bytes at `offset` of `segment` if its image is in memory.
    pub fn copy_out(&self, segment: SegmentId, offset: usize, out: &mut [u8]) -> bool {
        let img = self
            .open
            .iter()
            .chain(self.sealed.iter())
            .find(|i| i.id == segment);
        img.is_some_and(|i| i.read(offset, out))
    }

    /// Segments whose image is still in memory.
    pub fn held_ids(&mut self) -> std::collections::HashSet<SegmentId> {
        // Sealed images whose writes completed are on disk: they hold nothing.
        self.prune();
        self.open
            .iter()
            .chain(self.sealed.iter())
            .map(|i| i.id)
            .collect()
    }

    /// Start a commit: pad the open segment to a page boundary and write its
    /// tail. Returns the writes to await and the disks to sync.
    pub fn prepare_commit(
        &mut self,
        disks: &[Arc<PoolDisk>],
        rt: &tokio::runtime::Handle,
    ) -> (Vec<JoinHandle<std::io::Result<()>>>, BTreeSet<u32>) {
        if let Some(open) = self.open.as_mut() {
            let padded = pad(open);
            open.fill = padded;
            self.issue(padded, disks, rt);
        }
        (
            std::mem::take(&mut self.pending),
            std::mem::take(&mut self.dirty_disks),
        )
    }
}

/// Zero the image from its fill to the next page boundary and return that
/// boundary: on disk, a record is followed by another record or by zeros up
/// to a page boundary (the cleaner's walk relies on it).
fn pad(img: &mut SegImage) -> usize {
    let upto = align_up(img.fill);
    let (from, to) = (img.fill - img.issued, upto - img.issued);
    img.tail[from..to].fill(0);
    upto
}

fn issue_range(
    img: &mut SegImage,
    upto: usize,
    disks: &[Arc<PoolDisk>],
    rt: &tokio::runtime::Handle,
    segment_size: u32,
) -> Option<JoinHandle<std::io::Result<()>>> {
    let disk = disks.iter().find(|d| d.id == img.id.disk)?.clone();
    let start = img.issued;
    let part = img.freeze(upto)?;
    let at = disk.segment_offset(img.id.index, segment_size) + start as u64;
    let outstanding = img.outstanding.clone();
    outstanding.fetch_add(1, Ordering::AcqRel);
    Some(rt.spawn(async move {
        let r = disk.io.write_shared(part, at).await;
        outstanding.fetch_sub(1, Ordering::AcqRel);
        r
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i * 31 + j * 7) as u8).collect()
    }

    /// Records appended across streamed parts (frozen mid-page, so a record
    /// straddles a part and the tail) and a commit's padding read back whole
    /// from the image, and the parts are what the disk is handed.
    #[test]
    fn image_reads_span_parts_and_tail() {
        let id = SegmentId { disk: 0, index: 3 };
        let mut img = SegImage::new(id, 4 << 20);
        let mut placed = Vec::new();
        let mut written: Vec<(usize, Vec<u8>)> = Vec::new();
        for i in 0..600 {
            let len = 1000 + (i * 97) % 5000;
            let rec = record(i, len);
            let at = img.fill;
            img.reserve(len).copy_from_slice(&rec);
            img.fill += len;
            placed.push((at, rec));
            if img.fill - img.issued + TAIL_ROOM > STREAM_CHUNK {
                let start = img.issued;
                let part = img.freeze(align_down(img.fill)).expect("a full chunk");
                written.push((start, part.to_vec()));
            }
            if i == 300 {
                let start = img.issued;
                let upto = pad(&mut img);
                img.fill = upto;
                let part = img.freeze(upto).expect("a padded tail");
                written.push((start, part.to_vec()));
            }
        }
        assert!(img.parts.len() >= 2, "the test must cross parts");
        for (at, rec) in &placed {
            let mut out = vec![0u8; rec.len()];
            assert!(img.read(*at, &mut out), "record at {at}");
            assert_eq!(&out, rec, "record at {at}");
        }
        // Past the fill nothing is read.
        assert!(!img.read(img.fill - 10, &mut [0u8; 20]));
        // The parts are contiguous, page aligned, and hold the records.
        let mut disk = vec![0u8; img.issued];
        let mut next = 0;
        for (start, bytes) in &written {
            assert_eq!(*start, next);
            assert_eq!(bytes.len() % IO_ALIGN, 0);
            disk[*start..*start + bytes.len()].copy_from_slice(bytes);
            next = start + bytes.len();
        }
        for (at, rec) in placed.iter().filter(|(at, r)| at + r.len() <= next) {
            assert_eq!(&disk[*at..*at + rec.len()], &rec[..], "on disk at {at}");
        }
    }

    #[test]
    fn small_segments_keep_one_tail() {
        let mut img = SegImage::new(SegmentId { disk: 0, index: 0 }, 64 << 10);
        assert_eq!(img.tail.len(), 64 << 10);
        img.reserve(60 << 10).fill(9);
        img.fill += 60 << 10;
        let mut out = vec![0u8; 60 << 10];
        assert!(img.read(0, &mut out));
        assert!(out.iter().all(|&b| b == 9));
    }
}
