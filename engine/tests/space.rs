//! ENOSPC on a small pool, space reclamation, and the cleaner under
//! concurrent writes.

mod common;

use ballast_engine::{Compression, EngineError, VolumeOptions};
use bytes::Bytes;
use common::{backends, block, Backend, Harness};

fn incompressible(size: u64) -> VolumeOptions {
    let mut o = VolumeOptions::new(size);
    o.compression = Compression::None;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_pool_says_enospc_stays_consistent_and_recovers() {
    let mut h = Harness::new(Backend::Sim);
    h.disk_size = (1 << 20) + 12 * (1 << 20);
    let e = h.open().await;
    e.create_volume("v", incompressible(64 << 20))
        .await
        .unwrap();
    let v = e.open_volume("v").unwrap();
    let chunk = 64 << 10;
    let mut written = 0u64;
    let err = loop {
        let data = block(written, chunk, 0);
        match v.write(written, Bytes::from(data), false).await {
            Ok(()) => written += chunk as u64,
            Err(e) => break e,
        }
        assert!(
            written < 32 << 20,
            "a 12 MiB pool accepted 32 MiB of unique data"
        );
    };
    assert!(matches!(err, EngineError::NoSpace), "{err}");
    assert!(written >= 6 << 20, "only {written} bytes fit");
    e.flush().await.unwrap();
    // Everything acknowledged still reads back.
    for off in (0..written).step_by(chunk) {
        assert_eq!(
            &v.read(off, chunk as u32).await.unwrap().data[..],
            &block(off, chunk, 0)[..]
        );
    }
    // Freeing space makes writes work again.
    v.trim(0, written / 2, false).await.unwrap();
    let data = block(1 << 40, chunk, 0);
    v.write(written, Bytes::from(data.clone()), true)
        .await
        .unwrap();
    assert_eq!(
        &v.read(written, chunk as u32).await.unwrap().data[..],
        &data[..]
    );
    drop(v);
    e.shutdown().await.unwrap();
    drop(e);
    let e = h.open().await;
    let v = e.open_volume("v").unwrap();
    assert_eq!(
        &v.read(written, chunk as u32).await.unwrap().data[..],
        &data[..]
    );
    assert_eq!(
        &v.read(written - chunk as u64, chunk as u32)
            .await
            .unwrap()
            .data[..],
        &block(written - chunk as u64, chunk, 0)[..]
    );
    e.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_data_lowers_physical_usage() {
    for b in backends() {
        let h = Harness::new(b);
        let e = h.open().await;
        e.create_volume("big", incompressible(32 << 20))
            .await
            .unwrap();
        let v = e.open_volume("big").unwrap();
        for i in 0..16u64 {
            v.write(i << 20, Bytes::from(block(i + 1000, 1 << 20, 0)), false)
                .await
                .unwrap();
        }
        e.flush().await.unwrap();
        let full = e.node_stats();
        drop(v);
        e.delete_volume("big").await.unwrap();
        e.clean_now(false).await.unwrap();
        e.flush().await.unwrap();
        let after = e.node_stats();
        assert_eq!(after.unique_bytes, 0);
        assert!(
            after.used_bytes + (12 << 20) < full.used_bytes,
            "{b:?}: used {} -> {} after deleting 16 MiB",
            full.used_bytes,
            after.used_bytes
        );
        e.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleaner_moves_live_data_under_concurrent_writes() {
    for b in backends() {
        let h = Harness::new(b);
        let e = h.open().await;
        e.create_volume("v", incompressible(8 << 20)).await.unwrap();
        let blocks = 2048u64;
        let mut tasks = Vec::new();
        for t in 0..2u64 {
            let v = e.open_volume("v").unwrap();
            tasks.push(tokio::spawn(async move {
                // Each task owns the blocks with lba % 2 == t.
                let mut last = std::collections::HashMap::new();
                for round in 0..6u64 {
                    for i in 0..blocks / 2 {
                        let lba = i * 2 + t;
                        if (lba + round) % 3 == 0 {
                            continue;
                        }
                        let seed = round << 32 | lba;
                        v.write(lba * 4096, Bytes::from(block(seed, 4096, 0)), false)
                            .await
                            .unwrap();
                        last.insert(lba, seed);
                    }
                }
                last
            }));
        }
        let cleaner = {
            let e = e.clone();
            tokio::spawn(async move {
                let mut cleaned = 0;
                for _ in 0..40 {
                    cleaned += e.clean_now(true).await.unwrap();
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                cleaned
            })
        };
        let mut expect = std::collections::HashMap::new();
        for t in tasks {
            expect.extend(t.await.unwrap());
        }
        let cleaned = cleaner.await.unwrap() + e.clean_now(true).await.unwrap();
        assert!(cleaned > 0, "{b:?}: the cleaner found nothing to move");
        let v = e.open_volume("v").unwrap();
        let check = |data: &[u8]| {
            for lba in 0..blocks {
                let want = expect
                    .get(&lba)
                    .map_or(vec![0u8; 4096], |s| block(*s, 4096, 0));
                assert_eq!(
                    &data[(lba * 4096) as usize..((lba + 1) * 4096) as usize],
                    &want[..],
                    "{b:?}: block {lba}"
                );
            }
        };
        check(&v.read(0, (blocks * 4096) as u32).await.unwrap().data);
        drop(v);
        e.shutdown().await.unwrap();
        drop(e);
        let e = h.open().await;
        check(
            &e.open_volume("v")
                .unwrap()
                .read(0, (blocks * 4096) as u32)
                .await
                .unwrap()
                .data,
        );
        e.shutdown().await.unwrap();
    }
}
