//! The engine's behaviour through its public API, on every backend.

mod common;

use ballast_engine::{Compression, Engine, EngineError, Volume, VolumeOptions};
use bytes::Bytes;
use common::{backends, block, corrupt_record_of, Backend, Harness};

fn opts(size: u64) -> VolumeOptions {
    VolumeOptions::new(size)
}

/// An engine with a read cache of `cache_bytes` (0: none, so a block not
/// in memory is read from the disk) and an empty volume "v" of `size` bytes.
async fn with_read_cache(h: &Harness, cache_bytes: u64, size: u64) -> (Engine, Volume) {
    let mut cfg = h.config();
    cfg.read_cache_bytes = cache_bytes;
    let e = h.open_with(cfg).await;
    e.create_volume("v", opts(size)).await.unwrap();
    let v = e.open_volume("v").unwrap();
    (e, v)
}

/// 1 MiB of distinct 4 KiB blocks, `seed` to `seed + 255`.
fn mib_of_blocks(seed: u64) -> Vec<u8> {
    (0..256).flat_map(|i| block(seed + i, 4096, 0)).collect()
}

async fn for_each_backend<F, Fut>(f: F)
where
    F: Fn(Backend) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for b in backends() {
        eprintln!("backend {b:?}");
        f(b).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_lifecycle_and_errors() {
    for_each_backend(|b| async move {
        let h = Harness::new(b);
        let e = h.open().await;
        let v = e.create_volume("a", opts(1 << 20)).await.unwrap();
        assert_eq!(
            (v.size, v.block_size, v.dedup, v.compression),
            (1 << 20, 4096, true, Compression::Lz4)
        );
        assert!(matches!(
            e.create_volume("a", opts(1 << 20)).await,
            Err(EngineError::VolumeExists(_))
        ));
        assert!(matches!(
            e.create_volume("bad name", opts(4096)).await,
            Err(EngineError::InvalidArgument(_))
        ));
        let mut o = opts(8192);
        o.block_size = 3000;
        assert!(matches!(
            e.create_volume("b", o).await,
            Err(EngineError::InvalidArgument(_))
        ));
        assert!(matches!(
            e.volume_info("nope"),
            Err(EngineError::VolumeNotFound(_))
        ));
        assert!(matches!(
            e.resize_volume("a", 4096).await,
            Err(EngineError::FailedPrecondition(_))
        ));
        assert_eq!(e.resize_volume("a", 2 << 20).await.unwrap().size, 2 << 20);
        assert_eq!(
            e.list_volumes()
                .iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        let vol = e.open_volume("a").unwrap();
        let err = vol.read((2 << 20) - 100, 4096).await.unwrap_err();
        assert!(matches!(err, EngineError::OutOfRange { .. }), "{err}");
        e.delete_volume("a").await.unwrap();
        assert!(e.list_volumes().is_empty());
        assert!(matches!(
            vol.read(0, 4096).await,
            Err(EngineError::VolumeNotFound(_))
        ));
        e.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_see_writes_holes_and_partial_blocks() {
    for_each_backend(|b| async move {
        let h = Harness::new(b);
        let e = h.open().await;
        e.create_volume("v", opts(8 << 20)).await.unwrap();
        let v = e.open_volume("v").unwrap();
        let a = block(1, 64 << 10, 0);
        v.write(4096, Bytes::from(a.clone()), false).await.unwrap();
        let r = v.read(0, 128 << 10).await.unwrap();
        assert_eq!(&r.data[..4096], &[0u8; 4096][..]);
        assert_eq!(&r.data[4096..4096 + a.len()], &a[..]);
        assert!(r.extents[0].hole && r.extents[0].len == 4096);
        assert!(!r.extents[1].hole && r.extents[1].len == a.len() as u64);
        // Unaligned write inside and across blocks.
        let p = block(2, 5000, 1);
        v.write(4096 + 100, Bytes::from(p.clone()), false)
            .await
            .unwrap();
        let r = v.read(4096, 12288).await.unwrap();
        let mut want = a[..12288].to_vec();
        want[100..100 + p.len()].copy_from_slice(&p);
        assert_eq!(&r.data[..], &want[..]);
        // All-zero blocks become holes.
        v.write(4096, Bytes::from(vec![0u8; 8192]), false)
            .await
            .unwrap();
        let st = v.block_status(0, 16384).unwrap();
        assert!(st[0].hole && st[0].len == 12288, "{st:?}");
        // Trim with partial ends zeroes exactly the range.
        v.trim(20480 + 10, 8192, false).await.unwrap();
        let r = v.read(20480, 12288).await.unwrap();
        let mut want = a[16384..16384 + 12288].to_vec();
        want[10..10 + 8192].fill(0);
        assert_eq!(&r.data[..], &want[..]);
        e.flush().await.unwrap();
        e.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_data_survives_reopen_and_stats_count_dedup_and_compression() {
    for_each_backend(|b| async move {
        let h = Harness::new(b);
        let e = h.open().await;
        e.create_volume("x", opts(4 << 20)).await.unwrap();
        e.create_volume("y", opts(4 << 20)).await.unwrap();
        let mut o = opts(4 << 20);
        o.dedup = false;
        o.compression = Compression::None;
        e.create_volume("plain", o).await.unwrap();
        let x = e.open_volume("x").unwrap();
        let y = e.open_volume("y").unwrap();
        let plain = e.open_volume("plain").unwrap();
        let data: Vec<u8> = (0..64)
            .flat_map(|i| block(i, 4096, (i % 2) as u8))
            .collect();
        x.write(0, Bytes::from(data.clone()), false).await.unwrap();
        y.write(1 << 20, Bytes::from(data.clone()), true)
            .await
            .unwrap();
        plain
            .write(0, Bytes::from(data.clone()), false)
            .await
            .unwrap();
        plain
            .write(1 << 20, Bytes::from(data.clone()), false)
            .await
            .unwrap();
        e.flush().await.unwrap();
        let s = e.node_stats();
        assert_eq!(s.logical_bytes, 4 * 64 * 4096);
        // x and y share 64 records; "plain" stores its 128 blocks separately.
        assert_eq!(s.unique_bytes, (64 + 128) * 4096);
        assert!(
            s.stored_bytes < s.unique_bytes,
            "compressible half must shrink: {s:?}"
        );
        assert!(s.dedup_ratio > 1.3 && s.compression_ratio > 1.0, "{s:?}");
        assert_eq!(e.volume_info("x").unwrap().mapped_bytes, 64 * 4096);
        let gen = x.generation();
        assert!(gen >= 1);
        drop((x, y, plain));
        e.shutdown().await.unwrap();
        drop(e);
        let e = h.open().await;
        for (name, off) in [("x", 0), ("y", 1 << 20), ("plain", 1 << 20)] {
            let v = e.open_volume(name).unwrap();
            assert_eq!(
                &v.read(off, data.len() as u32).await.unwrap().data[..],
                &data[..],
                "{name}"
            );
        }
        let s2 = e.node_stats();
        assert_eq!(
            (s2.unique_bytes, s2.stored_bytes, s2.logical_bytes),
            (s.unique_bytes, s.stored_bytes, s.logical_bytes)
        );
        assert!(s2.record_filter_bytes > 0, "{s2:?}");
        assert!(
            s2.block_filter_bytes > 0,
            "loaded from the block map: {s2:?}"
        );
        // Content stored before the reopen is still found by dedup: the
        // record filter was loaded from the index, not started empty.
        let y = e.open_volume("y").unwrap();
        y.write(0, Bytes::from(data.clone()), false).await.unwrap();
        e.flush().await.unwrap();
        let s3 = e.node_stats();
        assert_eq!(s3.unique_bytes, s.unique_bytes, "{s3:?}");
        assert_eq!(s3.logical_bytes, s.logical_bytes + 64 * 4096);
        // Blocks mapped before the reopen are overwritten, not mapped again:
        // the block filter was loaded from the block map, not started empty.
        let x = e.open_volume("x").unwrap();
        let other: Vec<u8> = (100..164).flat_map(|i| block(i, 4096, 0)).collect();
        x.write(0, Bytes::from(other), false).await.unwrap();
        e.flush().await.unwrap();
        assert_eq!(e.volume_info("x").unwrap().mapped_bytes, 64 * 4096);
        assert_eq!(e.node_stats().logical_bytes, s3.logical_bytes);
        drop((x, y));
        e.shutdown().await.unwrap();
    })
    .await;
}

/// Mapped bytes, logical and unique bytes after overwriting blocks of
/// volumes whose block filter is over budget, untracked (a snapshot) or
/// tracked: every overwrite found its old mapping and dropped its reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwrites_find_old_mappings_past_the_block_filter_budget() {
    for_each_backend(|b| async move {
        let h = Harness::new(b);
        let mut cfg = h.config();
        // Bits for two 4 MiB regions; "a" spans four.
        cfg.block_filter_bytes = Some(2 * 176);
        let e = h.open_with(cfg.clone()).await;
        e.create_volume("a", opts(16 << 20)).await.unwrap();
        e.create_volume("b", opts(16 << 20)).await.unwrap();
        let regions = [0u64, 1 << 22, 2 << 22, 3 << 22];
        let write_all = |e: Engine, seed: u64| async move {
            let (a, b) = (e.open_volume("a").unwrap(), e.open_volume("b").unwrap());
            for (i, off) in regions.iter().enumerate() {
                let data = Bytes::from(block(seed + i as u64, 4096, 0));
                a.write(*off, data, false).await.unwrap();
            }
            let data = Bytes::from(block(seed + 10, 4096, 0));
            b.write(3 << 22, data, false).await.unwrap();
            e.flush().await.unwrap();
        };
        write_all(e.clone(), 0).await;
        e.snapshot("a", "a1").await.unwrap();
        e.clone_snapshot("a1", "a2").await.unwrap();
        let check = |e: Engine, unique_blocks: u64| async move {
            for (name, blocks) in [("a", 4), ("b", 1), ("a1", 4), ("a2", 4)] {
                let mapped = e.volume_info(name).unwrap().mapped_bytes;
                assert_eq!(mapped, blocks * 4096, "{name}");
            }
            let s = e.node_stats();
            assert_eq!(s.logical_bytes, 13 * 4096, "{s:?}");
            assert_eq!(s.unique_bytes, unique_blocks * 4096, "{s:?}");
            let a1 = e.open_volume("a1").unwrap();
            let got = a1.read(regions[3], 4096).await.unwrap().data;
            assert_eq!(
                &got[..],
                &block(3, 4096, 0)[..],
                "the snapshot keeps the old block"
            );
        };
        // a's first contents (shared with a1 and a2), a's new ones, b's new one.
        write_all(e.clone(), 100).await;
        check(e.clone(), 4 + 4 + 1).await;
        e.shutdown().await.unwrap();
        drop(e);
        // Reopened: the start-up scan meets the same budget.
        let e = h.open_with(cfg).await;
        write_all(e.clone(), 200).await;
        check(e.clone(), 4 + 4 + 1).await;
        e.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_frozen_and_clones_diverge() {
    for_each_backend(|b| async move {
        let h = Harness::new(b);
        let e = h.open().await;
        e.create_volume("base", opts(1 << 20)).await.unwrap();
        let base = e.open_volume("base").unwrap();
        let one = block(10, 65536, 0);
        base.write(0, Bytes::from(one.clone()), false)
            .await
            .unwrap();
        let before = e.node_stats().unique_bytes;
        let snap = e.snapshot("base", "s1").await.unwrap();
        assert!(snap.read_only && snap.parent.as_deref() == Some("base"));
        assert_eq!(
            e.node_stats().unique_bytes,
            before,
            "a snapshot copies no data"
        );
        base.write(0, Bytes::from(block(11, 65536, 0)), false)
            .await
            .unwrap();
        let s = e.open_volume("s1").unwrap();
        assert_eq!(&s.read(0, 65536).await.unwrap().data[..], &one[..]);
        assert!(matches!(
            s.write(0, Bytes::from(vec![1u8; 4096]), false).await,
            Err(EngineError::ReadOnly(_))
        ));
        assert!(matches!(
            e.clone_snapshot("base", "c").await,
            Err(EngineError::FailedPrecondition(_))
        ));
        e.clone_snapshot("s1", "c1").await.unwrap();
        let c = e.open_volume("c1").unwrap();
        c.write(4096, Bytes::from(vec![7u8; 4096]), false)
            .await
            .unwrap();
        assert_eq!(
            &s.read(4096, 4096).await.unwrap().data[..],
            &one[4096..8192]
        );
        assert_eq!(&c.read(0, 4096).await.unwrap().data[..], &one[..4096]);
        // Deleting the origin keeps the snapshot's data.
        drop(base);
        e.delete_volume("base").await.unwrap();
        assert_eq!(&s.read(0, 65536).await.unwrap().data[..], &one[..]);
        // Deleting the snapshot keeps the clone's data and drops the link
        // (no dangling parent), and the change survives a reopen.
        drop(s);
        e.delete_volume("s1").await.unwrap();
        assert_eq!(&c.read(0, 4096).await.unwrap().data[..], &one[..4096]);
        let info = |e: &ballast_engine::Engine| {
            e.list_volumes()
                .into_iter()
                .find(|v| v.name == "c1")
                .expect("clone listed")
        };
        assert_eq!(info(&e).parent, None);
        drop(c);
        e.shutdown().await.unwrap();
        drop(e);
        let e = h.open().await;
        assert_eq!(info(&e).parent, None);
        assert_eq!(
            &e.open_volume("c1")
                .unwrap()
                .read(0, 4096)
                .await
                .unwrap()
                .data[..],
            &one[..4096]
        );
        e.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_primitives() {
    for_each_backend(|b| async move {
        let h = Harness::new(b);
        let e = h.open().await;
        e.create_volume("p", opts(4 << 20)).await.unwrap();
        e.create_volume("q", opts(4 << 20)).await.unwrap();
        let p = e.open_volume("p").unwrap();
        let q = e.open_volume("q").unwrap();
        let d = block(5, 4096, 0);
        let hash: [u8; 32] = blake3::hash(&d).into();
        assert!(!e.has_block(&hash).unwrap());
        assert!(!q.write_by_hash(3, &hash).unwrap());
        p.write(0, Bytes::from(d.clone()), false).await.unwrap();
        assert!(e.has_block(&hash).unwrap());
        assert_eq!(&e.read_by_hash(&hash).await.unwrap().unwrap()[..], &d[..]);
        assert!(q.write_by_hash(0, &hash).unwrap());
        assert_eq!(&q.read(0, 4096).await.unwrap().data[..], &d[..]);
        assert_eq!(p.block_hashes(0, 2).unwrap(), vec![Some(hash), None]);
        assert_eq!(
            p.region_digests(1 << 20).unwrap(),
            q.region_digests(1 << 20).unwrap()
        );
        q.write(3 << 20, Bytes::from(vec![1u8; 4096]), false)
            .await
            .unwrap();
        let (dp, dq) = (
            p.region_digests(1 << 20).unwrap(),
            q.region_digests(1 << 20).unwrap(),
        );
        let differ: Vec<usize> = (0..4).filter(|&i| dp[i] != dq[i]).collect();
        assert_eq!(differ, vec![3]);
        let g0 = q.generation();
        e.flush().await.unwrap();
        assert_eq!(q.generation(), g0 + 1);
        e.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_of_other_pools_are_refused_and_disks_can_be_added_live() {
    let h = Harness::new(Backend::Threads);
    let e = h.open().await;
    let before = e.node_stats().capacity_bytes;
    e.add_disk(ballast_engine::DiskSpec {
        path: h.disk_path(1),
        create_size: Some(64 << 20),
    })
    .await
    .unwrap();
    let s = e.node_stats();
    assert_eq!(s.disks.len(), 2);
    assert!(s.capacity_bytes > before);
    e.shutdown().await.unwrap();
    drop(e);
    // A second pool may not take over this pool's disk.
    let other = tempfile::tempdir().unwrap();
    let mut cfg = ballast_engine::EngineConfig::new(other.path().join("data"));
    cfg.backend = ballast_engine::io::BackendChoice::Threads;
    cfg.disks = vec![ballast_engine::DiskSpec {
        path: h.disk_path(0),
        create_size: None,
    }];
    let err = ballast_engine::Engine::open(cfg)
        .await
        .err()
        .expect("must refuse");
    let msg = err.to_string();
    assert!(
        msg.contains("disk0.img") && msg.contains("already formatted for pool"),
        "{msg}"
    );
    // The pool reopens with both disks.
    let e = h.open().await;
    assert_eq!(e.node_stats().disks.len(), 2);
    e.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_fill_free_read_cache_room_and_large_ones_only_whole() {
    let h = Harness::new(Backend::Sim);
    // Room for 2 MiB of blocks (each weighs 4 KiB plus bookkeeping).
    let (e, v) = with_read_cache(&h, 2 << 20, 8 << 20).await;
    // A 1 MiB write into a cache with room is cached...
    let first = mib_of_blocks(0);
    v.write(0, Bytes::from(first.clone()), false).await.unwrap();
    let after_first = e.node_stats().read_cache_bytes;
    assert!(
        after_first >= 256 * 4096,
        "cached while there is room: {after_first}"
    );
    // ...a second one no longer fits whole: it bypasses the cache rather
    // than evict the first.
    v.write(1 << 20, Bytes::from(mib_of_blocks(1000)), false)
        .await
        .unwrap();
    assert_eq!(e.node_stats().read_cache_bytes, after_first);
    // Small writes fit in the room left (read after write from memory).
    let small: Vec<u8> = (5000..5004).flat_map(|i| block(i, 4096, 0)).collect();
    v.write(4 << 20, Bytes::from(small.clone()), false)
        .await
        .unwrap();
    assert_eq!(v.read(4 << 20, 4 * 4096).await.unwrap().data, small);
    assert_eq!(v.read(0, 1 << 20).await.unwrap().data, first);
    e.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_reads_regroup_scattered_cached_blocks_and_read_true() {
    let h = Harness::new(Backend::Sim);
    let (e, v) = with_read_cache(&h, 16 << 20, 8 << 20).await;
    // 2 MiB written one block at a time, out of order: each block is
    // cached in a buffer of its own.
    let mut model: Vec<Vec<u8>> = (0..512u64).map(|i| block(i, 4096, 0)).collect();
    for i in (0..512u64).map(|i| (i * 167) % 512) {
        v.write(i * 4096, Bytes::from(model[i as usize].clone()), false)
            .await
            .unwrap();
    }
    let whole = |m: &Vec<Vec<u8>>| m.concat();
    let pieces = |r: &ballast_engine::ReadParts| r.parts.len();
    // Read in 1 MiB: the first read gathers each aligned 64 KiB into one
    // buffer, so it and every later read is 16 pieces per MiB.
    for _ in 0..2 {
        for mib in 0..2u64 {
            let r = v.read_parts(mib << 20, 1 << 20).await.unwrap();
            assert_eq!(pieces(&r), 16);
            assert_eq!(
                r.parts.concat(),
                whole(&model)[(mib as usize) << 20..][..1 << 20]
            );
        }
    }
    // An unaligned read across runs still reads true.
    let r = v.read(4096 * 15 + 100, 70_000).await.unwrap();
    assert_eq!(r.data, whole(&model)[4096 * 15 + 100..][..70_000]);
    // Overwrite 9 blocks of the first run and 1 of the second; once the
    // old records die, the first run is mostly gone: reading its last
    // blocks re-caches them alone, and everything reads the new data.
    for i in (0..9).chain([20]) {
        model[i] = block(10_000 + i as u64, 4096, 0);
        v.write(i as u64 * 4096, Bytes::from(model[i].clone()), false)
            .await
            .unwrap();
    }
    e.flush().await.unwrap();
    for _ in 0..2 {
        let r = v.read(0, 2 << 20).await.unwrap();
        assert_eq!(r.data, whole(&model));
    }
    let held = e.node_stats().read_cache_bytes;
    assert!(held <= 16 << 20, "within its budget: {held}");
    e.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_cache_runs_stay_within_the_budget_as_their_blocks_die() {
    let h = Harness::new(Backend::Sim);
    let budget = 4u64 << 20;
    let (e, v) = with_read_cache(&h, budget, 32 << 20).await;
    let mut seed = 0u64;
    // Rounds of: 4 MiB written in 1 MiB writes (cached as runs while there
    // is room), read back (the rest cached as runs), then 15 of every 16
    // blocks overwritten one by one, which strands most of each run.
    for round in 0..4u64 {
        let base = (round % 2) * (8 << 20);
        for mib in 0..4u64 {
            seed += 1000;
            v.write(base + (mib << 20), Bytes::from(mib_of_blocks(seed)), false)
                .await
                .unwrap();
        }
        let _ = v.read(base, 4 << 20).await.unwrap();
        for b in (0..1024u64).filter(|b| b % 16 != 0) {
            seed += 1;
            v.write(base + b * 4096, Bytes::from(block(seed, 4096, 0)), false)
                .await
                .unwrap();
        }
        e.flush().await.unwrap();
        let _ = v.read(base, 4 << 20).await.unwrap();
        let held = e.node_stats().read_cache_bytes;
        assert!(
            held <= budget + budget / 32,
            "round {round}: {held} bytes held, budget {budget}"
        );
    }
    e.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_into_a_full_read_cache_go_around_it() {
    let h = Harness::new(Backend::Sim);
    let (e, v) = with_read_cache(&h, 1 << 20, 8 << 20).await;
    let first = block(7, 4096, 0);
    v.write(0, Bytes::from(first.clone()), false).await.unwrap();
    // Three times the cache's size in single-block writes: the cache fills
    // up, then the writes pass it by instead of evicting.
    let late = |lba: u64| block(10_000 + lba, 4096, 0);
    for lba in 1..=768u64 {
        v.write(lba * 4096, Bytes::from(late(lba)), false)
            .await
            .unwrap();
    }
    // The newest single-block write: an evicting cache would hold it now.
    let newest = block(77_777, 4096, 0);
    v.write(900 * 4096, Bytes::from(newest.clone()), false)
        .await
        .unwrap();
    // Seal and write out its segment (no segment image left to read it
    // from) with large writes over mapped blocks, which never enter the
    // cache.
    for mib in 0..2u64 {
        v.write(
            4096 + (mib << 20),
            Bytes::from(mib_of_blocks(50_000 + mib * 256)),
            false,
        )
        .await
        .unwrap();
    }
    e.flush().await.unwrap();
    let held = e.node_stats().read_cache_bytes;
    assert!(held <= 1 << 20, "within its budget: {held}");
    // Rot both records on disk: only a cached block still reads.
    corrupt_record_of(&h, 0, &first).await;
    corrupt_record_of(&h, 0, &newest).await;
    assert_eq!(v.read(0, 4096).await.unwrap().data, first);
    let err = v.read(900 * 4096, 4096).await.unwrap_err();
    assert!(matches!(err, EngineError::Checksum { .. }), "{err}");
    e.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwritten_blocks_leave_the_read_cache() {
    let h = Harness::new(Backend::Sim);
    let (e, v) = with_read_cache(&h, 8 << 20, 8 << 20).await;
    let run = |seed: u64| -> Vec<u8> { (0..64).flat_map(|i| block(seed + i, 4096, 0)).collect() };
    v.write(0, Bytes::from(run(0)), false).await.unwrap();
    e.flush().await.unwrap();
    let one_run = e.node_stats().read_cache_bytes;
    assert!(
        one_run >= 64 * 4096,
        "the written blocks are cached: {one_run}"
    );
    // Overwrite the same 64 blocks ten times: the cache holds the live
    // blocks, not every version ever written.
    let mut last = Vec::new();
    for round in 1..=10u64 {
        last = run(round * 1000);
        v.write(0, Bytes::from(last.clone()), false).await.unwrap();
        e.flush().await.unwrap();
    }
    assert_eq!(e.node_stats().read_cache_bytes, one_run);
    assert_eq!(v.read(0, 64 * 4096).await.unwrap().data, last);
    e.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_overwrites_do_not_churn_the_read_cache() {
    let h = Harness::new(Backend::Sim);
    let (e, v) = with_read_cache(&h, 8 << 20, 8 << 20).await;
    // A 1 MiB write into unmapped blocks, with room: cached (a bulk load).
    v.write(0, Bytes::from(mib_of_blocks(0)), false)
        .await
        .unwrap();
    e.flush().await.unwrap();
    let loaded = e.node_stats().read_cache_bytes;
    assert!(loaded >= 256 * 4096, "a bulk load is cached: {loaded}");
    // Rewriting it kills every cached block, which frees the room; the new
    // blocks still stay out: a stream over old data is not cached.
    let last = mib_of_blocks(1000);
    v.write(0, Bytes::from(last.clone()), false).await.unwrap();
    e.flush().await.unwrap();
    let after = e.node_stats().read_cache_bytes;
    assert!(
        after < 4096,
        "the rewrite's blocks were cached ({after} bytes) and its predecessors' not dropped"
    );
    assert_eq!(v.read(0, 1 << 20).await.unwrap().data, last);
    // Small overwrites are cached as always (read after write from memory).
    let small: Vec<u8> = (5000..5004).flat_map(|i| block(i, 4096, 0)).collect();
    v.write(0, Bytes::from(small.clone()), false).await.unwrap();
    assert!(e.node_stats().read_cache_bytes >= 4 * 4096);
    e.shutdown().await.unwrap();
}

/// Disks added while writers open segments and node stats are read: the
/// three take the disk list, the segment writer and the space lock. (A
/// stats reader that took the space lock before the list, behind a pending
/// `add_disk`, could close a cycle of three; the window is too narrow for
/// this test to hit reliably, so it guards the live add under load, and
/// the lock order is argued in `Engine::node_stats`.) 64 KiB writes into
/// 1 MiB segments open one every 16 writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_added_under_writes_and_stats_do_not_deadlock() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    use std::sync::Arc;
    let h = Harness::new(Backend::Threads);
    let e = Arc::new(h.open().await);
    e.create_volume("v", opts(64 << 20)).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2u64 {
        let vol = e.open_volume("v").unwrap();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Relaxed) {
                let off = ((i * 2 + w) % 1024) * 65536;
                vol.write(off, Bytes::from(block(i * 2 + w, 65536, 0)), false)
                    .await
                    .unwrap();
                i += 1;
            }
            i
        }));
    }
    let stats = {
        let (e, stop) = (e.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                n += e.node_stats().disks.len() as u64;
            }
            n
        })
    };
    let added = tokio::time::timeout(std::time::Duration::from_secs(120), async {
        for d in 1..=12 {
            e.add_disk(ballast_engine::DiskSpec {
                path: h.disk_path(d),
                create_size: Some(8 << 20),
            })
            .await
            .unwrap();
        }
    })
    .await;
    stop.store(true, Relaxed);
    assert!(
        added.is_ok(),
        "adding disks under load did not finish: a lock cycle"
    );
    for w in writers {
        assert!(w.await.unwrap() > 0);
    }
    assert!(stats.join().unwrap() > 0);
    assert_eq!(e.node_stats().disks.len(), 13);
}

/// With the read cache off, data just written reads back before any flush:
/// from the open segment's image in memory, from sealed images whose writes
/// are in flight, and from the disk, on every backend. 64 KiB writes of
/// mixed content stream several 4 MiB segments' worth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unflushed_writes_read_back_without_the_read_cache() {
    for_each_backend(|b| async move {
        let mut h = Harness::new(b);
        h.segment_size = 4 << 20;
        const SIZE: u64 = 16 << 20;
        let (e, v) = with_read_cache(&h, 0, SIZE).await;
        let mut model = vec![0u8; SIZE as usize];
        let mut x = 7u64;
        for i in 0..(SIZE / 65536) {
            let data = block(i + 1, 65536, (i % 3 == 0) as u8);
            let off = i * 65536;
            v.write(off, Bytes::from(data.clone()), false)
                .await
                .unwrap();
            model[off as usize..off as usize + 65536].copy_from_slice(&data);
            // Read back a stretch ending at what was just written, and one
            // at random among the earlier writes.
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let back = (off + 65536).saturating_sub(3 << 19);
            let earlier = (x >> 20) % (off + 65536) / 4096 * 4096;
            for (at, len) in [(back, off + 65536 - back), (earlier, 4096)] {
                let got = v.read(at, len as u32).await.unwrap();
                assert!(
                    got.data[..] == model[at as usize..(at + len) as usize],
                    "{b:?}: {len} bytes at {at} after write {i}"
                );
            }
        }
        let all = v.read(0, SIZE as u32).await.unwrap();
        assert!(all.data[..] == model[..], "{b:?}: the whole volume");
        e.shutdown().await.unwrap();
    })
    .await;
}

/// A write covering part of a block lands late when the old block has to
/// be read from disk. Writes called after it, which take effect at once,
/// must not be undone when it lands (the NBD server relies on calls taking
/// effect in call order): the later full-block write or trim wins its
/// blocks, and a later partial write lands after it, on top of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_partial_writes_never_undo_later_writes() {
    for_each_backend(|b| async move {
        let h = Harness::new(b);
        let (e, v) = with_read_cache(&h, 0, 8 << 20).await;
        let bs = 4096usize;
        // Blocks 0..4 hold `old`; then enough data to seal their segment,
        // and a flush, so that reading them means reading the disk.
        let old = move |i: u64| block(100 + i, bs, 0);
        for i in 0..4u64 {
            v.write(i * bs as u64, Bytes::from(old(i)), false)
                .await
                .unwrap();
        }
        v.write(1 << 20, Bytes::from(block(9, 3 << 20, 0)), false)
            .await
            .unwrap();
        v.flush().await.unwrap();
        v.write(4 << 20, Bytes::from(block(10, bs, 0)), false)
            .await
            .unwrap();

        // In a task: polled from `block_on`, an I/O future may wait for its
        // completion on the spot (the io_uring backend's assist).
        let v2 = v.clone();
        tokio::spawn(async move { late_writes(b, v2, old).await })
            .await
            .unwrap();
        e.shutdown().await.unwrap();
    })
    .await;
}

/// Awaits a write future that was polled once already, with that poll's result.
async fn finish<F>(f: F, first: std::task::Poll<Result<(), EngineError>>)
where
    F: std::future::Future<Output = Result<(), EngineError>> + Unpin,
{
    match first {
        std::task::Poll::Ready(r) => r.unwrap(),
        std::task::Poll::Pending => f.await.unwrap(),
    }
}

async fn late_writes(b: Backend, v: Volume, old: impl Fn(u64) -> Vec<u8>) {
    let bs = 4096usize;
    // The simulated disk completes reads within their first poll, and so
    // may io_uring: a read the kernel can finish without waiting (a fast
    // device, or a disk file served from memory) completes inside the
    // submitting system call, which made this assertion fail now and then.
    // The thread pool never does, so it is the backend that always has a
    // later write overtake a pending one.
    let sync_io = matches!(b, Backend::Sim | Backend::Uring);
    {
        let part = Bytes::from(vec![0xAB; 512]);
        let new = Bytes::from(block(200, bs, 0));
        // Block 0: partial write, then a full-block write.
        let mut p0 = v.write(512, part.clone(), false);
        let r0 = futures::poll!(&mut p0);
        assert!(r0.is_pending() || sync_io, "{b:?}: reads the disk");
        v.write(0, new.clone(), false).await.unwrap();
        // Block 1: partial write, then a trim of the whole block.
        let mut p1 = v.write(bs as u64 + 512, part.clone(), false);
        let r1 = futures::poll!(&mut p1);
        assert!(r1.is_pending() || sync_io, "{b:?}: reads the disk");
        v.trim(bs as u64, bs as u64, false).await.unwrap();
        // Block 2: a partial write spanning into block 3, then a full write
        // of block 3 only.
        let mut p2 = v.write(2 * bs as u64 + 1024, Bytes::from(vec![0xCD; bs]), false);
        let r2 = futures::poll!(&mut p2);
        assert!(r2.is_pending() || sync_io, "{b:?}: reads the disk");
        v.write(3 * bs as u64, new.clone(), false).await.unwrap();
        // Block 0 again: a second partial write lands after the first.
        let p3 = v.write(1024, Bytes::from(vec![0xEF; 512]), false);
        finish(p0, r0).await;
        finish(p1, r1).await;
        finish(p2, r2).await;
        p3.await.unwrap();

        let got = v.read(0, 4 * bs as u32).await.unwrap().data;
        let mut want0 = new.to_vec();
        want0[1024..1536].fill(0xEF);
        assert!(got[..bs] == want0[..], "{b:?}: block 0");
        assert!(
            got[bs..2 * bs].iter().all(|&x| x == 0),
            "{b:?}: block 1 trimmed"
        );
        let mut want2 = old(2);
        want2[1024..].fill(0xCD);
        assert!(got[2 * bs..3 * bs] == want2[..], "{b:?}: block 2");
        assert!(got[3 * bs..] == new[..], "{b:?}: block 3");
    }
}

/// Reads racing overwrites of the same blocks return the old or the new
/// content, never an error: the old record may die (and its segment be
/// freed and reused) between a read's key lookup and its record lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_racing_overwrites_see_old_or_new_content() {
    fn content(blk: u64, ver: u64) -> Vec<u8> {
        let mut b = block(blk * 1_000_003 + ver, 4096, 0);
        b[..8].copy_from_slice(&blk.to_le_bytes());
        b[8..16].copy_from_slice(&ver.to_le_bytes());
        b
    }
    for_each_backend(|b| async move {
        let h = Harness::new(b);
        let (e, v) = with_read_cache(&h, 0, 1 << 20).await;
        const BLOCKS: u64 = 8;
        for blk in 0..BLOCKS {
            v.write(blk * 4096, Bytes::from(content(blk, 0)), false)
                .await
                .unwrap();
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (v, stop) = (v.clone(), stop.clone());
            tokio::spawn(async move {
                let mut ver = 1;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for blk in 0..BLOCKS {
                        v.write(blk * 4096, Bytes::from(content(blk, ver)), false)
                            .await
                            .unwrap();
                    }
                    if ver % 8 == 0 {
                        v.flush().await.unwrap();
                    }
                    ver += 1;
                }
            })
        };
        let readers: Vec<_> = (0..2)
            .map(|r| {
                let v = v.clone();
                tokio::spawn(async move {
                    for i in 0..30000u64 {
                        let blk = (i * 7 + r) % BLOCKS;
                        let got = v.read(blk * 4096, 4096).await.unwrap().data;
                        let ver = u64::from_le_bytes(got[8..16].try_into().unwrap());
                        assert!(got[..] == content(blk, ver)[..], "block {blk}");
                    }
                })
            })
            .collect();
        for r in readers {
            r.await.unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.await.unwrap();
        assert_eq!(e.node_stats().checksum_errors, 0, "{b:?}");
        e.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_hashes_are_range_checked() {
    let e = Harness::new(Backend::Threads).open().await;
    e.create_volume("v", opts(1 << 20)).await.unwrap();
    let v = e.open_volume("v").unwrap();
    assert_eq!(v.block_hashes(255, 1).unwrap(), vec![None]);
    for (lba, n) in [(256, 1), (0, 257), (u64::MAX, 1), (1, u64::MAX)] {
        assert!(
            matches!(v.block_hashes(lba, n), Err(EngineError::OutOfRange { .. })),
            "{lba} + {n}"
        );
    }
    e.shutdown().await.unwrap();
}
