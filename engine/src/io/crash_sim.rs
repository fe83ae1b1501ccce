//! `CrashSimDisk`: an in-memory `DiskIo` that knows which writes are durable.
//!
//! The engine's crash safety rests on one contract: data written before a
//! completed `sync` survives power loss, and anything written after it may
//! survive whole, partly (torn at sector granularity) or not at all. This
//! disk keeps two images: the *visible* one that reads see, and the
//! *durable* one as of the last completed sync, plus the log of writes since
//! then. `crash` replays that log onto the durable image with seeded random
//! outcomes, so a test can crash at any point and re-open the pool on what a
//! real disk could plausibly contain, reproducibly.
//!
//! Storage is sparse (4 KiB pages, unwritten pages read as zeros) and pages
//! are shared copy-on-write between the two images, so a large simulated
//! disk costs only what is written.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{check_range, AlignedBuf, DiskIo, IoFuture, Op, IO_ALIGN, SECTOR};

// Torn writes keep or lose whole sectors, like real disks; reads are
// sector-aligned, like O_DIRECT on a 512-byte-sector device.
const PAGE: usize = IO_ALIGN;

type Page = Arc<[u8; PAGE]>;
type Image = HashMap<u64, Page>;

/// See the module documentation.
pub struct CrashSimDisk {
    len: u64,
    state: Mutex<SimState>,
}

#[derive(Default)]
struct SimState {
    visible: Image,
    durable: Image,
    /// Writes completed since the last completed sync, oldest first.
    unsynced: Vec<(u64, Vec<u8>)>,
    fail_writes: bool,
    syncs: u64,
    writes: u64,
}

impl CrashSimDisk {
    /// A zero-filled disk of `len` bytes.
    pub fn new(len: u64) -> Arc<CrashSimDisk> {
        Arc::new(CrashSimDisk {
            len,
            state: Mutex::new(SimState::default()),
        })
    }

    /// Simulate power loss and restart. Every write since the last completed
    /// sync is, independently and decided by `seed`, dropped, applied whole,
    /// or torn (each of its 512-byte sectors applied or not). Writes are
    /// replayed oldest first, so overlapping ones end in a state some real
    /// disk could reach. Afterwards reads see exactly the surviving durable
    /// image and nothing is pending.
    pub fn crash(&self, seed: u64) {
        let mut rng = SplitMix64(seed);
        let mut st = self.state.lock();
        let st = &mut *st;
        for (offset, data) in std::mem::take(&mut st.unsynced) {
            match rng.next() % 3 {
                0 => {}
                1 => write_image(&mut st.durable, offset, &data),
                _ => {
                    for (i, sector) in data.chunks(SECTOR).enumerate() {
                        if rng.next() & 1 == 1 {
                            write_image(&mut st.durable, offset + (i * SECTOR) as u64, sector);
                        }
                    }
                }
            }
        }
        st.visible = st.durable.clone();
    }

    /// Invert one byte (xor 0xff) in both the visible and the durable image,
    /// as silent media corruption would.
    ///
    /// # Panics
    /// If `offset` is past the end of the disk.
    pub fn flip_byte(&self, offset: u64) {
        assert!(
            offset < self.len,
            "flip_byte({offset}) is past the end of a {}-byte disk",
            self.len
        );
        let mut st = self.state.lock();
        let st = &mut *st;
        for image in [&mut st.visible, &mut st.durable] {
            let page = image
                .entry(offset / PAGE as u64)
                .or_insert_with(|| Arc::new([0; PAGE]));
            Arc::make_mut(page)[(offset % PAGE as u64) as usize] ^= 0xff;
        }
    }

    /// While set, writes and syncs fail with EIO and change nothing.
    pub fn set_fail_writes(&self, fail: bool) {
        self.state.lock().fail_writes = fail;
    }

    /// Completed syncs.
    pub fn syncs(&self) -> u64 {
        self.state.lock().syncs
    }

    /// Completed writes.
    pub fn writes(&self) -> u64 {
        self.state.lock().writes
    }
}

impl DiskIo for CrashSimDisk {
    fn read_at(&self, mut buf: AlignedBuf, offset: u64) -> IoFuture<(AlignedBuf, io::Result<()>)> {
        let res = check_range(Op::Read, offset, buf.len(), self.len, SECTOR).map(|()| {
            let st = self.state.lock();
            let mut pos = offset;
            let mut out: &mut [u8] = &mut buf;
            while !out.is_empty() {
                let at = (pos % PAGE as u64) as usize;
                let n = (PAGE - at).min(out.len());
                let (chunk, rest) = out.split_at_mut(n);
                match st.visible.get(&(pos / PAGE as u64)) {
                    Some(page) => chunk.copy_from_slice(&page[at..at + n]),
                    None => chunk.fill(0),
                }
                pos += n as u64;
                out = rest;
            }
        });
        Box::pin(std::future::ready((buf, res)))
    }

    fn write_at(&self, buf: AlignedBuf, offset: u64) -> IoFuture<(AlignedBuf, io::Result<()>)> {
        let res = check_range(Op::Write, offset, buf.len(), self.len, SECTOR).and_then(|()| {
            let mut st = self.state.lock();
            if st.fail_writes {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            write_image(&mut st.visible, offset, &buf);
            st.unsynced.push((offset, buf.to_vec()));
            st.writes += 1;
            Ok(())
        });
        Box::pin(std::future::ready((buf, res)))
    }

    fn sync(&self) -> IoFuture<io::Result<()>> {
        let mut st = self.state.lock();
        let res = if st.fail_writes {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            // Everything written is now durable: the visible pages become
            // the durable ones (shared, not copied).
            let st = &mut *st;
            for (offset, data) in st.unsynced.drain(..) {
                let first = offset / PAGE as u64;
                for p in first..first + (data.len() / PAGE) as u64 {
                    if let Some(page) = st.visible.get(&p) {
                        st.durable.insert(p, page.clone());
                    }
                }
            }
            st.syncs += 1;
            Ok(())
        };
        Box::pin(std::future::ready(res))
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_align(&self) -> usize {
        SECTOR
    }
}

/// Copy `data` into `image` at `offset` (any sector-aligned range).
fn write_image(image: &mut Image, mut offset: u64, mut data: &[u8]) {
    while !data.is_empty() {
        let at = (offset % PAGE as u64) as usize;
        let n = (PAGE - at).min(data.len());
        let page = image
            .entry(offset / PAGE as u64)
            .or_insert_with(|| Arc::new([0; PAGE]));
        Arc::make_mut(page)[at..at + n].copy_from_slice(&data[..n]);
        offset += n as u64;
        data = &data[n..];
    }
}

/// SplitMix64: tiny, seedable, and good enough to pick crash outcomes.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(len: usize, byte: u8) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(len);
        b.fill(byte);
        b
    }

    async fn read(d: &CrashSimDisk, offset: u64, len: usize) -> Vec<u8> {
        let (buf, r) = d.read_at(AlignedBuf::zeroed(len), offset).await;
        r.unwrap();
        buf.to_vec()
    }

    async fn write(d: &CrashSimDisk, offset: u64, buf: AlignedBuf) {
        d.write_at(buf, offset).await.1.unwrap();
    }

    #[tokio::test]
    async fn sparse_reads_zero_and_sees_writes() {
        let d = CrashSimDisk::new(1 << 30);
        assert_eq!(d.len(), 1 << 30);
        assert!(read(&d, 1 << 29, 8192).await.iter().all(|&b| b == 0));
        write(&d, 4096, filled(8192, 3)).await;
        let got = read(&d, 0, 16384).await;
        assert!(got[..4096].iter().all(|&b| b == 0));
        assert!(got[4096..12288].iter().all(|&b| b == 3));
        assert!(got[12288..].iter().all(|&b| b == 0));
        assert_eq!(d.writes(), 1);
        // Out of range and misaligned I/O fail without effect.
        let (_, r) = d.read_at(AlignedBuf::zeroed(8192), (1 << 30) - 4096).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert!(d.write_at(filled(4096, 1), 100).await.1.is_err());
        assert_eq!(d.writes(), 1);
    }

    #[tokio::test]
    async fn synced_data_survives_every_crash() {
        for seed in 0..50 {
            let d = CrashSimDisk::new(1 << 20);
            write(&d, 0, filled(8192, 1)).await;
            write(&d, 65536, filled(4096, 2)).await;
            d.sync().await.unwrap();
            // Unsynced writes elsewhere must not disturb synced data.
            write(&d, 8192, filled(4096, 9)).await;
            d.crash(seed);
            let got = read(&d, 0, 8192).await;
            assert!(got.iter().all(|&b| b == 1), "seed {seed}");
            assert!(
                read(&d, 65536, 4096).await.iter().all(|&b| b == 2),
                "seed {seed}"
            );
            assert_eq!(d.syncs(), 1);
        }
    }

    #[tokio::test]
    async fn unsynced_writes_are_old_new_or_torn_by_sector() {
        let (mut dropped, mut applied, mut torn) = (0, 0, 0);
        for seed in 0..200 {
            let d = CrashSimDisk::new(1 << 20);
            write(&d, 0, filled(16384, 1)).await;
            d.sync().await.unwrap();
            write(&d, 0, filled(16384, 2)).await;
            d.crash(seed);
            let got = read(&d, 0, 16384).await;
            for sector in got.chunks(SECTOR) {
                assert!(
                    sector.iter().all(|&b| b == sector[0]),
                    "a sector is atomic (seed {seed})"
                );
                assert!(sector[0] == 1 || sector[0] == 2, "seed {seed}");
            }
            match (got.iter().all(|&b| b == 1), got.iter().all(|&b| b == 2)) {
                (true, _) => dropped += 1,
                (_, true) => applied += 1,
                _ => torn += 1,
            }
            // After a crash nothing is pending: a second crash changes nothing.
            d.crash(seed.wrapping_add(1));
            assert_eq!(read(&d, 0, 16384).await, got);
        }
        assert!(
            dropped > 0 && applied > 0 && torn > 0,
            "{dropped} {applied} {torn}"
        );
    }

    #[tokio::test]
    async fn crash_is_reproducible_from_the_seed() {
        let mut results = Vec::new();
        for _ in 0..2 {
            let d = CrashSimDisk::new(1 << 20);
            for i in 0..20u8 {
                write(&d, u64::from(i) * 4096, filled(4096, i + 1)).await;
            }
            d.crash(42);
            results.push(read(&d, 0, 20 * 4096).await);
        }
        assert_eq!(results[0], results[1]);
    }

    #[tokio::test]
    async fn flip_byte_changes_exactly_that_byte() {
        let d = CrashSimDisk::new(1 << 20);
        write(&d, 8192, filled(8192, 0x5a)).await;
        d.sync().await.unwrap();
        let before = read(&d, 0, 32768).await;
        d.flip_byte(8192 + 4100);
        d.flip_byte(20000); // never written: a zero byte becomes 0xff
        let after = read(&d, 0, 32768).await;
        let diff: Vec<usize> = (0..before.len())
            .filter(|&i| before[i] != after[i])
            .collect();
        assert_eq!(diff, vec![8192 + 4100, 20000]);
        assert_eq!(after[8192 + 4100], 0x5a ^ 0xff);
        assert_eq!(after[20000], 0xff);
        // The corruption is durable too.
        d.crash(7);
        assert_eq!(read(&d, 0, 32768).await, after);
    }

    #[tokio::test]
    async fn failing_writes_and_syncs_change_nothing() {
        let d = CrashSimDisk::new(1 << 20);
        write(&d, 0, filled(4096, 1)).await;
        d.set_fail_writes(true);
        let (buf, r) = d.write_at(filled(4096, 2), 0).await;
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
        assert_eq!(buf[0], 2, "the buffer comes back");
        assert_eq!(d.sync().await.unwrap_err().raw_os_error(), Some(libc::EIO));
        assert_eq!(read(&d, 0, 4096).await[0], 1, "reads still work");
        d.set_fail_writes(false);
        d.sync().await.unwrap();
        assert_eq!((d.writes(), d.syncs()), (1, 1));
        d.crash(3);
        assert_eq!(read(&d, 0, 4096).await[0], 1);
    }

    #[tokio::test]
    async fn usable_through_a_dyn_diskio_and_after_it_is_dropped() {
        let d = CrashSimDisk::new(1 << 20);
        {
            let dyn_disk: Arc<dyn DiskIo> = d.clone();
            dyn_disk.write_at(filled(4096, 4), 4096).await.1.unwrap();
            dyn_disk.sync().await.unwrap();
        }
        d.crash(1);
        let reopened: Arc<dyn DiskIo> = d.clone();
        let (buf, r) = reopened.read_at(AlignedBuf::zeroed(4096), 4096).await;
        r.unwrap();
        assert!(buf.iter().all(|&b| b == 4));
    }
}
