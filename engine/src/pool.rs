//! The node's pool of disks and the allocation of their segments.
//!
//! Each disk is cut into fixed-size segments after `DATA_OFFSET`. `Space`
//! tracks which segments are free and, for the ones in use, their committed
//! live bytes. A segment only returns to the free list after a commit made its
//! emptiness durable, so a crash can never leave committed metadata pointing
//! into a segment that was reused.

use crate::error::{EngineError, Result};
use crate::io::{AlignedBuf, DiskIo};
use crate::key::SegmentId;
use crate::superblock::{Superblock, DATA_OFFSET, SUPERBLOCK_SIZE};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(crate) struct PoolDisk {
    pub id: u32,
    pub path: PathBuf,
    pub io: Arc<dyn DiskIo>,
    pub segments: u32,
}

impl PoolDisk {
    pub fn segment_offset(&self, index: u32, segment_size: u32) -> u64 {
        DATA_OFFSET + index as u64 * segment_size as u64
    }
}

pub(crate) fn segments_on(disk_len: u64, segment_size: u32) -> u32 {
    (disk_len.saturating_sub(DATA_OFFSET) / segment_size as u64).min(u32::MAX as u64) as u32
}

pub(crate) async fn read_superblock(io: &Arc<dyn DiskIo>, path: &Path) -> Result<Superblock> {
    if io.len() < DATA_OFFSET {
        return Err(EngineError::Disk {
            path: path.to_path_buf(),
            reason: format!("only {} bytes: a pool disk needs at least 2 MiB", io.len()),
        });
    }
    let (buf, r) = io.read_at(AlignedBuf::zeroed(SUPERBLOCK_SIZE), 0).await;
    r.map_err(|e| EngineError::io(format!("reading the superblock of {}", path.display()), e))?;
    Superblock::decode(&buf, path)
}

pub(crate) async fn write_superblock(
    io: &Arc<dyn DiskIo>,
    path: &Path,
    sb: &Superblock,
) -> Result<()> {
    let mut buf = AlignedBuf::zeroed(SUPERBLOCK_SIZE);
    buf.copy_from_slice(&sb.encode());
    let (_, r) = io.write_at(buf, 0).await;
    r.map_err(|e| EngineError::io(format!("writing the superblock of {}", path.display()), e))?;
    io.sync()
        .await
        .map_err(|e| EngineError::io(format!("syncing {}", path.display()), e))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SegState {
    /// Being appended to, or its last write is still in flight.
    Open,
    Sealed,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct SegInfo {
    pub committed_live: u64,
    pub written: u32,
    pub state: SegState,
}

pub(crate) struct Space {
    pub segment_size: u32,
    free: HashMap<u32, BTreeSet<u32>>,
    pub used: HashMap<SegmentId, SegInfo>,
    /// Segments freed since the last commit: their entries must be deleted.
    pub released: Vec<SegmentId>,
    /// Segments the cleaner may use when foreground writes see the pool as full.
    pub reserve: usize,
}

impl Space {
    pub fn new(segment_size: u32) -> Space {
        Space {
            segment_size,
            free: HashMap::new(),
            used: HashMap::new(),
            released: Vec::new(),
            reserve: 2,
        }
    }

    /// Register a disk; `in_use` are its segments holding committed data.
    pub fn add_disk(&mut self, disk: u32, segments: u32, in_use: &HashMap<SegmentId, (u64, u32)>) {
        let mut free = BTreeSet::new();
        for index in 0..segments {
            let id = SegmentId { disk, index };
            match in_use.get(&id) {
                Some(&(live, written)) if live > 0 => {
                    self.used.insert(
                        id,
                        SegInfo {
                            committed_live: live,
                            written,
                            state: SegState::Sealed,
                        },
                    );
                }
                Some(_) => {
                    // Empty at the last commit: free, and forget its entry.
                    self.released.push(id);
                    free.insert(index);
                }
                None => {
                    free.insert(index);
                }
            }
        }
        self.free.insert(disk, free);
    }

    pub fn free_count(&self) -> usize {
        self.free.values().map(|f| f.len()).sum()
    }

    pub fn free_on(&self, disk: u32) -> usize {
        self.free.get(&disk).map_or(0, |f| f.len())
    }

    /// Take a free segment from the disk with the most free space.
    pub fn allocate(&mut self, use_reserve: bool) -> Option<SegmentId> {
        if !use_reserve && self.free_count() <= self.reserve {
            return None;
        }
        let (&disk, set) = self
            .free
            .iter_mut()
            .filter(|(_, f)| !f.is_empty())
            .max_by_key(|(d, f)| (f.len(), std::cmp::Reverse(**d)))?;
        let index = set.pop_first()?;
        let id = SegmentId { disk, index };
        self.used.insert(
            id,
            SegInfo {
                committed_live: 0,
                written: 0,
                state: SegState::Open,
            },
        );
        Some(id)
    }

    pub fn release(&mut self, id: SegmentId) {
        if self.used.remove(&id).is_some() {
            self.free.entry(id.disk).or_default().insert(id.index);
            self.released.push(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_spreads_and_respects_reserve() {
        let mut s = Space::new(1 << 20);
        s.add_disk(0, 3, &HashMap::new());
        s.add_disk(1, 3, &HashMap::new());
        let a = s.allocate(false).unwrap();
        let b = s.allocate(false).unwrap();
        assert_ne!(a.disk, b.disk);
        assert!(s.allocate(false).is_some());
        assert!(s.allocate(false).is_some());
        assert_eq!(s.free_count(), 2);
        assert!(s.allocate(false).is_none(), "reserve is for the cleaner");
        assert!(s.allocate(true).is_some());
        s.release(a);
        assert_eq!(s.free_count(), 2);
    }

    #[test]
    fn empty_committed_segments_come_back_free() {
        let mut in_use = HashMap::new();
        in_use.insert(SegmentId { disk: 0, index: 1 }, (0u64, 4096u32));
        in_use.insert(SegmentId { disk: 0, index: 2 }, (10u64, 4096u32));
        let mut s = Space::new(1 << 20);
        s.add_disk(0, 4, &in_use);
        assert_eq!(s.free_count(), 3);
        assert_eq!(s.released, vec![SegmentId { disk: 0, index: 1 }]);
    }
}
