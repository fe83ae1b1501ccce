//! The segment writer: records are packed densely into an in-memory image of
//! the open segment and streamed to disk in large aligned writes.
//!
//! Full pages go out in the background once 1 MiB has accumulated, as views
//! of the image rather than copies (see `SharedBuf`); a commit
//! pads the open segment to the next 4 KiB page and writes the tail, so no
//! page that a commit made durable is ever written again (no torn rewrite of
//! flushed data). A segment's image stays in memory until every write of it
//! has completed, and reads of its records are served from that image.

use crate::error::{EngineError, Result};
use crate::io::{AlignedBuf, SharedBuf, IO_ALIGN};
use crate::key::SegmentId;
use crate::pool::{PoolDisk, Space};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::task::JoinHandle;

const STREAM_CHUNK: usize = 1 << 20;

pub(crate) struct SegImage {
    pub id: SegmentId,
    /// Written only at and after `issued` (records from `fill` on, and the
    /// padding `pad` adds): everything before it is frozen, part of a write
    /// in flight or done. While the segment is open, `issued <= fill`.
    buf: SharedBuf,
    pub fill: usize,
    issued: usize,
    outstanding: Arc<AtomicUsize>,
    /// Records appended whose index entries are not yet in the overlay
    /// (see [`Unpublished`]).
    unpublished: Arc<AtomicUsize>,
}

/// A record appended but not yet installed in the overlay. Until it is, the
/// overlay has no live bytes in its segment and the store may have none
/// either, so a commit would see an empty sealed segment and free it under
/// the writer about to point into it. The segment's image (and with it the
/// segment, see `Writer::held_ids`) stays held while any of these lives;
/// drop it once the install (or the decision not to) is made under the
/// state lock.
pub(crate) struct Unpublished(Arc<AtomicUsize>);

impl Drop for Unpublished {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
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

/// Where a record landed; holds its segment until dropped (see
/// [`Unpublished`]).
pub(crate) struct Placed {
    pub segment: SegmentId,
    pub offset: u32,
    pub hold: Unpublished,
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
            self.open = Some(SegImage {
                id,
                // Recycled: records overwrite what they use, and the padding
                // up to a page is zeroed before it is written (`pad`).
                buf: SharedBuf::new(AlignedBuf::recycled(self.segment_size)),
                fill: 0,
                issued: 0,
                outstanding: Arc::new(AtomicUsize::new(0)),
                unpublished: Arc::new(AtomicUsize::new(0)),
            });
        }
        let open = self
            .open
            .as_mut()
            .expect("open segment exists after allocation");
        let offset = open.fill;
        // SAFETY: `offset` is the open segment's fill, at or after `issued`,
        // so no frozen view covers these bytes.
        fill(unsafe { open.buf.slice_mut(offset..offset + len) });
        open.fill += len;
        open.unpublished.fetch_add(1, Ordering::Relaxed);
        let placed = Placed {
            segment: open.id,
            offset: offset as u32,
            hold: Unpublished(open.unpublished.clone()),
        };
        if open.fill - open.issued >= STREAM_CHUNK {
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

    /// Drop images whose writes have all completed and whose records are
    /// all installed (or abandoned).
    fn prune(&mut self) {
        self.sealed.retain(|s| {
            s.outstanding.load(Ordering::Acquire) > 0 || s.unpublished.load(Ordering::Acquire) > 0
        });
    }

    /// Copy `out.len()` bytes at `offset` of `segment` if its image is in memory.
    pub fn copy_out(&self, segment: SegmentId, offset: usize, out: &mut [u8]) -> bool {
        let img = self
            .open
            .iter()
            .chain(self.sealed.iter())
            .find(|i| i.id == segment);
        match img {
            Some(i) if offset + out.len() <= i.buf.len() => {
                // SAFETY: images are written only through `&mut self`, so
                // not while this shared borrow lives.
                out.copy_from_slice(unsafe { i.buf.slice(offset..offset + out.len()) });
                true
            }
            _ => false,
        }
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
    let upto = align_up(img.fill).min(img.buf.len());
    // SAFETY: `pad` runs on the open segment (or the one being sealed),
    // whose fill is at or after `issued`: no frozen view covers the padding.
    unsafe { img.buf.slice_mut(img.fill..upto) }.fill(0);
    upto
}

fn issue_range(
    img: &mut SegImage,
    upto: usize,
    disks: &[Arc<PoolDisk>],
    rt: &tokio::runtime::Handle,
    segment_size: u32,
) -> Option<JoinHandle<std::io::Result<()>>> {
    if upto <= img.issued {
        return None;
    }
    let Some(disk) = disks.iter().find(|d| d.id == img.id.disk).cloned() else {
        // Cannot happen: a disk joins the list before its segments can be
        // allocated (`Engine::add_disk`). Say so loudly rather than lose
        // the range quietly.
        tracing::error!(segment = ?img.id, "segment write skipped: its disk is not in the pool's disk list");
        return None;
    };
    let start = img.issued;
    // SAFETY: `start` is `issued` and moves past `upto` here: nothing
    // before `issued` is ever written again (see `SegImage::buf`).
    let chunk = unsafe { img.buf.frozen(start..upto) };
    img.issued = upto;
    let at = disk.segment_offset(img.id.index, segment_size) + start as u64;
    let outstanding = img.outstanding.clone();
    outstanding.fetch_add(1, Ordering::AcqRel);
    Some(rt.spawn(async move {
        let (_, r) = disk.io.write_at(chunk, at).await;
        outstanding.fetch_sub(1, Ordering::AcqRel);
        r
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{BackendChoice, IoEngine};

    /// A sealed segment whose writes are done stays held while a record
    /// appended to it is not yet installed, and only then.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sealed_segments_stay_held_until_their_records_are_installed() {
        const SEG: u32 = 64 << 10;
        let dir = tempfile::tempdir().unwrap();
        let io = IoEngine::new(BackendChoice::Threads).unwrap();
        let dio = io.open_disk(&dir.path().join("d"), Some(4 << 20)).unwrap();
        let disks = vec![Arc::new(PoolDisk {
            id: 0,
            path: dir.path().join("d"),
            io: dio,
            segments: 8,
        })];
        let space = parking_lot::Mutex::new(Space::new(SEG));
        space.lock().add_disk(0, 8, &HashMap::new());
        let rt = tokio::runtime::Handle::current();
        let mut w = Writer::new(SEG);
        let append = |w: &mut Writer| {
            w.append(4096, &space, &disks, &rt, false, |out| out.fill(7))
                .unwrap()
        };
        let first = append(&mut w);
        let mut rest = Vec::new();
        // Fill the first segment, then one record into the next: the first
        // is sealed and its writes issued.
        while rest.len() < (SEG / 4096) as usize {
            rest.push(append(&mut w));
        }
        assert_ne!(rest.last().unwrap().segment, first.segment);
        for h in std::mem::take(&mut w.pending) {
            h.await.unwrap().unwrap();
        }
        assert!(
            w.held_ids().contains(&first.segment),
            "a record is not installed"
        );
        drop(first);
        rest.retain(|p| p.segment != w.open.as_ref().unwrap().id);
        assert!(
            w.held_ids().contains(&rest[0].segment),
            "still not installed"
        );
        let sealed = rest[0].segment;
        drop(rest);
        assert!(
            !w.held_ids().contains(&sealed),
            "all installed, writes done"
        );
    }
}
