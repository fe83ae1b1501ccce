//! Space reclamation: move the live records out of mostly-dead segments so
//! whole segments become free after the next commit.
//!
//! A record is live iff the record index still points at this exact place;
//! it is copied verbatim (header and crc included) into the open segment and
//! the index repointed. The old segment's committed live bytes drop to zero
//! with the next commit, which is what releases it (see `commit`). The cleaner
//! yields between segments so foreground I/O keeps the disk most of the time.

use crate::engine::Inner;
use crate::error::{EngineError, Result};
use crate::io::{AlignedBuf, IO_ALIGN};
use crate::key::{RecordMeta, SegmentId};
use crate::pool::SegState;
use crate::record::{checked_header, parse_header, HEADER_LEN};
use crate::state::Txn;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Segments whose live fraction is below this are cleaned in the background.
const BACKGROUND_THRESHOLD: f64 = 0.5;
/// When the pool is nearly full, anything below this is worth cleaning.
const PRESSURE_THRESHOLD: f64 = 0.95;
/// Pause after each cleaned segment: bounds the cleaner's share of the disk.
const PAUSE_PER_SEGMENT: Duration = Duration::from_millis(20);

pub(crate) async fn run(inner: Weak<Inner>) {
    loop {
        let wake = {
            let Some(i) = inner.upgrade() else { return };
            let i2 = i.clone();
            async move {
                tokio::select! {
                    _ = i2.cleaner_wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        };
        wake.await;
        let Some(i) = inner.upgrade() else { return };
        if i.shutting_down.load(Ordering::Relaxed) || i.failed.get().is_some() {
            continue;
        }
        let pressure = under_pressure(&i);
        match clean_pass(&i, pressure).await {
            Ok(n) if n > 0 => tracing::debug!(segments = n, "cleaner pass"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cleaner pass failed; will retry"),
        }
    }
}

fn under_pressure(inner: &Inner) -> bool {
    let space = inner.space.lock();
    let total = space.free_count() + space.used.len();
    space.free_count() * 10 < total
}

/// Pick sealed, mostly-dead segments, most dead first.
fn candidates(inner: &Inner, aggressive: bool, max: usize) -> Vec<(SegmentId, u32)> {
    let held = inner.writer.lock().held_ids();
    let space = inner.space.lock();
    let seg = space.segment_size as f64;
    let limit = if aggressive {
        PRESSURE_THRESHOLD
    } else {
        BACKGROUND_THRESHOLD
    };
    let mut c: Vec<(SegmentId, u64, u32)> = space
        .used
        .iter()
        .filter(|(id, i)| i.state == SegState::Sealed && !held.contains(id) && i.written > 0)
        .filter(|(_, i)| (i.committed_live as f64) < limit * seg.min(i.written as f64).max(1.0))
        .map(|(id, i)| (*id, i.committed_live, i.written))
        .collect();
    c.sort_by_key(|(_, live, _)| *live);
    c.into_iter().take(max).map(|(id, _, w)| (id, w)).collect()
}

/// Clean up to a handful of segments; returns how many were emptied.
pub(crate) async fn clean_pass(inner: &Arc<Inner>, aggressive: bool) -> Result<usize> {
    let list = candidates(inner, aggressive, if aggressive { 64 } else { 8 });
    let mut cleaned = 0;
    for (id, written) in list {
        if inner.shutting_down.load(Ordering::Relaxed) {
            break;
        }
        match clean_segment(inner, id, written).await {
            Ok(()) => cleaned += 1,
            Err(EngineError::NoSpace) => break,
            Err(e) => return Err(e),
        }
        if !aggressive {
            tokio::time::sleep(PAUSE_PER_SEGMENT).await;
        }
    }
    if cleaned > 0 {
        // The commit makes the moves durable and releases the emptied segments.
        inner.flush().await?;
    }
    Ok(cleaned)
}

async fn clean_segment(inner: &Arc<Inner>, id: SegmentId, written: u32) -> Result<()> {
    let seg_size = {
        let space = inner.space.lock();
        match space.used.get(&id) {
            Some(i) if i.state == SegState::Sealed && i.written == written => {}
            // Freed (and perhaps reused) since it was picked.
            _ => return Ok(()),
        }
        space.segment_size
    };
    let disk = inner
        .disks
        .read()
        .iter()
        .find(|d| d.id == id.disk)
        .cloned()
        .ok_or_else(|| EngineError::CorruptMeta(format!("segment on unknown disk {}", id.disk)))?;
    let len = (written as usize).div_ceil(IO_ALIGN) * IO_ALIGN;
    let (buf, r) = disk
        .io
        .read_at(
            AlignedBuf::recycled(len.max(IO_ALIGN)),
            disk.segment_offset(id.index, seg_size),
        )
        .await;
    r.map_err(|e| EngineError::io(format!("cleaner reading {}", disk.path.display()), e))?;
    // Walk the records; padding (zeros) skips to the next page.
    let mut live: Vec<(crate::key::BlockKey, RecordMeta, usize)> = Vec::new();
    let mut pos = 0usize;
    while pos + HEADER_LEN <= written as usize {
        let Some(h) = parse_header(&buf[pos..]) else {
            pos = (pos / IO_ALIGN + 1) * IO_ALIGN;
            continue;
        };
        let total = HEADER_LEN + h.stored_len as usize;
        if pos + total > buf.len() {
            break;
        }
        live.push((
            h.key,
            RecordMeta {
                segment: id,
                offset: pos as u32,
                stored_len: h.stored_len,
                raw_len: h.raw_len,
                refs: 0,
            },
            pos,
        ));
        pos += total;
    }
    // Keep only records the index still points at here, and only intact
    // ones: the copy is made verbatim, and a record read torn (the segment
    // was freed and reused since the candidates were picked, and is being
    // written again) or rotten must not become the indexed copy. A rotten
    // one stays where it is and keeps failing its reads.
    let metas = inner.resolve_records(live.iter().map(|(k, _, _)| k))?;
    live.retain(|(k, m, pos)| {
        metas
            .get(k)
            .copied()
            .flatten()
            .is_some_and(|cur| cur.segment == id && cur.offset == m.offset)
            && checked_header(&buf[*pos..]).is_some_and(|h| h.key == *k)
    });
    let mut moved = Vec::with_capacity(live.len());
    {
        let disks = inner.disks.read();
        let mut w = inner.writer.lock();
        for (k, m, pos) in &live {
            let bytes = &buf[*pos..*pos + m.footprint() as usize];
            let p = w.append(bytes.len(), &inner.space, &disks, &inner.rt, true, |out| {
                out.copy_from_slice(bytes)
            })?;
            moved.push((*k, *m, p));
        }
    }
    let mut st = inner.state.lock();
    let mut tx = Txn {
        st: &mut st,
        meta: &inner.meta,
    };
    for (k, old, p) in &moved {
        // Only repoint what did not change meanwhile; otherwise our copy is garbage.
        if let Some(cur) = tx.record(k)? {
            if cur.segment == old.segment && cur.offset == old.offset {
                tx.relocate(*k, cur, p.segment, p.offset);
            }
        }
    }
    // The copies' segments stay held until here (see `Unpublished`).
    drop(st);
    drop(moved);
    Ok(())
}

impl Inner {
    /// On ENOSPC: release what commits can release, then clean hard.
    pub(crate) async fn make_space(self: &Arc<Self>) -> Result<()> {
        self.flush().await?;
        let reserve = self.space.lock().reserve;
        if self.space.lock().free_count() > reserve {
            return Ok(());
        }
        clean_pass(self, true).await?;
        Ok(())
    }
}
