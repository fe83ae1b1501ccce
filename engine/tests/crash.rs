//! Power-loss recovery through many random crash points on crash-simulation
//! disks: every unsynced write is dropped, kept or torn at sector granularity.
//! Every flushed write must survive, every block must read as a value it
//! really held (never a mix, never garbage), and the metadata must agree.

mod common;

use bytes::Bytes;
use common::{block, Backend, Harness};

const BS: usize = 4096;
const BLOCKS: u64 = 96;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_random_crash_points() {
    let rounds: u64 = std::env::var("BALLAST_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500);
    let h = Harness::new(Backend::Sim);
    let mut e = h.open().await;
    e.create_volume("v", ballast_engine::VolumeOptions::new(BLOCKS * BS as u64))
        .await
        .unwrap();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    // Per block: contents it may legally hold after a crash.
    let mut allowed: Vec<Vec<Vec<u8>>> = vec![vec![vec![0u8; BS]]; BLOCKS as usize];
    let mut cur: Vec<Vec<u8>> = vec![vec![0u8; BS]; BLOCKS as usize];
    let mut gen = 0u64;
    for round in 0..rounds {
        let v = e.open_volume("v").unwrap();
        let steps = 1 + rng.below(10);
        let mut inflight_flush = None;
        for _ in 0..steps {
            match rng.below(10) {
                0..=5 => {
                    let lba = rng.below(BLOCKS);
                    let n = 1 + rng.below(6).min(BLOCKS - lba - 1);
                    let mut data = Vec::new();
                    for j in 0..n {
                        gen += 1;
                        // Some repeats so dedup references are exercised.
                        let seed = if rng.below(4) == 0 { rng.below(8) } else { gen };
                        let b = block(seed, BS, (seed % 2) as u8);
                        cur[(lba + j) as usize] = b.clone();
                        allowed[(lba + j) as usize].push(b.clone());
                        data.extend_from_slice(&b);
                    }
                    v.write(lba * BS as u64, Bytes::from(data), false)
                        .await
                        .unwrap();
                }
                6 => {
                    let lba = rng.below(BLOCKS);
                    let n = 1 + rng.below(8).min(BLOCKS - lba - 1);
                    v.trim(lba * BS as u64, n * BS as u64, false).await.unwrap();
                    for j in lba..lba + n {
                        cur[j as usize] = vec![0u8; BS];
                        allowed[j as usize].push(vec![0u8; BS]);
                    }
                }
                7 | 8 => {
                    e.flush().await.unwrap();
                    for (a, c) in allowed.iter_mut().zip(&cur) {
                        *a = vec![c.clone()];
                    }
                }
                _ => {
                    // A flush still running when the power goes.
                    let e2 = e.clone();
                    inflight_flush = Some(tokio::spawn(async move { e2.flush().await }));
                    tokio::task::yield_now().await;
                }
            }
        }
        drop(v);
        if let Some(f) = inflight_flush {
            f.abort();
            let _ = f.await;
        }
        h.crash(e, round ^ 0xdead_beef).await;
        e = h.open().await;
        let v = e.open_volume("v").unwrap();
        let got = v.read(0, (BLOCKS as usize * BS) as u32).await.unwrap().data;
        for b in 0..BLOCKS as usize {
            let g = &got[b * BS..(b + 1) * BS];
            assert!(
                allowed[b].iter().any(|a| a == g),
                "round {round}: block {b} holds content it never had (or lost a flushed write)"
            );
            cur[b] = g.to_vec();
        }
        for (a, c) in allowed.iter_mut().zip(&cur) {
            *a = vec![c.clone()];
        }
        let info = e.volume_info("v").unwrap();
        let mapped = cur.iter().filter(|c| c.iter().any(|&x| x != 0)).count() as u64;
        assert_eq!(
            info.mapped_bytes,
            mapped * BS as u64,
            "round {round}: mapped bytes disagree with content"
        );
    }
    e.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_loses_nothing_that_was_flushed() {
    let h = Harness::new(Backend::Sim);
    let e = h.open().await;
    e.create_volume("v", ballast_engine::VolumeOptions::new(1 << 20))
        .await
        .unwrap();
    let v = e.open_volume("v").unwrap();
    let a = block(1, 65536, 0);
    v.write(0, Bytes::from(a.clone()), true).await.unwrap();
    v.write(65536, Bytes::from(block(2, 65536, 0)), false)
        .await
        .unwrap();
    h.sim(0).unwrap().set_fail_writes(true);
    let err = e.flush().await.unwrap_err();
    assert!(
        err.to_string().contains("I/O error") || err.to_string().contains("writing"),
        "{err}"
    );
    // The engine refuses further writes rather than pretend.
    assert!(v
        .write(0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .is_err());
    drop(v);
    h.sim(0).unwrap().set_fail_writes(false);
    h.crash(e, 42).await;
    let e = h.open().await;
    let got = e
        .open_volume("v")
        .unwrap()
        .read(0, 65536)
        .await
        .unwrap()
        .data;
    assert_eq!(&got[..], &a[..]);
    e.shutdown().await.unwrap();
}
