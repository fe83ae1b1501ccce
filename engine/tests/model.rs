//! Property test: random sequences of write / read / trim / zero / flush /
//! snapshot / clone / crash-and-recover against an in-memory model, on every
//! backend. After a crash every block must hold its content at the last
//! completed flush or some value written to it since.

mod common;

use ballast_engine::{Compression, Engine, VolumeOptions};
use bytes::Bytes;
use common::{backends, block, Backend, Harness};
use proptest::prelude::*;

const BS: usize = 4096;
const BLOCKS: usize = 48;
const SIZE: usize = BS * BLOCKS;

#[derive(Debug, Clone)]
enum Op {
    Write {
        vol: u8,
        lba: u8,
        n: u8,
        seed: u16,
        kind: u8,
    },
    WriteUnaligned {
        vol: u8,
        off: u32,
        len: u16,
        seed: u16,
    },
    Trim {
        vol: u8,
        off: u32,
        len: u32,
    },
    Zero {
        vol: u8,
        lba: u8,
        n: u8,
    },
    Read {
        vol: u8,
    },
    Flush,
    Snapshot {
        vol: u8,
    },
    Clone {
        snap: u8,
    },
    Crash {
        seed: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<u8>(), 0..BLOCKS as u8, 1..8u8, any::<u16>(), 0..3u8)
            .prop_map(|(vol, lba, n, seed, kind)| Op::Write { vol, lba, n, seed, kind }),
        2 => (any::<u8>(), 0..(SIZE as u32 - 1), 1..9000u16, any::<u16>())
            .prop_map(|(vol, off, len, seed)| Op::WriteUnaligned { vol, off, len, seed }),
        2 => (any::<u8>(), 0..(SIZE as u32 - 1), 1..40000u32).prop_map(|(vol, off, len)| Op::Trim { vol, off, len }),
        1 => (any::<u8>(), 0..BLOCKS as u8, 1..8u8).prop_map(|(vol, lba, n)| Op::Zero { vol, lba, n }),
        2 => any::<u8>().prop_map(|vol| Op::Read { vol }),
        2 => Just(Op::Flush),
        1 => any::<u8>().prop_map(|vol| Op::Snapshot { vol }),
        1 => any::<u8>().prop_map(|snap| Op::Clone { snap }),
        1 => any::<u64>().prop_map(|seed| Op::Crash { seed }),
    ]
}

struct ModelVol {
    name: String,
    writable: bool,
    cur: Vec<u8>,
    /// Per block: every content it may hold after a crash.
    allowed: Vec<Vec<Vec<u8>>>,
}

impl ModelVol {
    fn new(name: &str, writable: bool, content: Vec<u8>) -> ModelVol {
        let allowed = content.chunks(BS).map(|c| vec![c.to_vec()]).collect();
        ModelVol {
            name: name.into(),
            writable,
            cur: content,
            allowed,
        }
    }

    fn set(&mut self, off: usize, data: &[u8]) {
        self.cur[off..off + data.len()].copy_from_slice(data);
        let first = off / BS;
        let last = (off + data.len()).div_ceil(BS);
        for b in first..last {
            self.allowed[b].push(self.cur[b * BS..(b + 1) * BS].to_vec());
        }
    }

    fn durable(&mut self) {
        for (b, a) in self.allowed.iter_mut().enumerate() {
            *a = vec![self.cur[b * BS..(b + 1) * BS].to_vec()];
        }
    }
}

async fn check_all(e: &Engine, model: &[ModelVol]) {
    for m in model {
        let v = e.open_volume(&m.name).unwrap();
        let got = v.read(0, SIZE as u32).await.unwrap().data;
        assert_eq!(
            &got[..],
            &m.cur[..],
            "volume {} differs from the model",
            m.name
        );
    }
}

async fn run(backend: Backend, ops: Vec<Op>, write_back: u64) {
    let mut h = Harness::new(backend);
    h.write_back_bytes = write_back;
    if backend == Backend::Sim {
        // Bits for two volumes' chunks only: "a" and "b" stay tracked and
        // clones are untracked once their first block is committed, so the
        // block filter's exact, untracked and over-budget answers all meet
        // random sequences (the other backends run its default budget).
        h.block_filter_bytes = Some(2 * 176);
    }
    let mut e = h.open().await;
    let mut model = Vec::new();
    e.create_volume("a", VolumeOptions::new(SIZE as u64))
        .await
        .unwrap();
    let mut o = VolumeOptions::new(SIZE as u64);
    o.dedup = false;
    o.compression = Compression::None;
    e.create_volume("b", o).await.unwrap();
    model.push(ModelVol::new("a", true, vec![0; SIZE]));
    model.push(ModelVol::new("b", true, vec![0; SIZE]));
    let mut snaps: Vec<usize> = Vec::new();
    for op in ops {
        let writable: Vec<usize> = (0..model.len()).filter(|&i| model[i].writable).collect();
        let pick = |v: u8| writable[v as usize % writable.len()];
        match op {
            Op::Write {
                vol,
                lba,
                n,
                seed,
                kind,
            } => {
                let i = pick(vol);
                let n = (n as usize).min(BLOCKS - lba as usize);
                // kind 2: repeat an earlier pattern, so dedup hits happen.
                let data: Vec<u8> = (0..n)
                    .flat_map(|j| {
                        block(
                            if kind == 2 {
                                (seed % 4) as u64
                            } else {
                                seed as u64 * 64 + j as u64
                            },
                            BS,
                            kind % 2,
                        )
                    })
                    .collect();
                let v = e.open_volume(&model[i].name).unwrap();
                v.write(
                    lba as u64 * BS as u64,
                    Bytes::from(data.clone()),
                    seed % 5 == 0,
                )
                .await
                .unwrap();
                model[i].set(lba as usize * BS, &data);
                if seed % 5 == 0 {
                    // FUA: this write (and all before it) is now durable.
                    model.iter_mut().for_each(|m| m.durable());
                }
            }
            Op::WriteUnaligned {
                vol,
                off,
                len,
                seed,
            } => {
                let i = pick(vol);
                let len = (len as usize).min(SIZE - off as usize);
                let data = block(seed as u64 + 7, len, (seed % 2) as u8);
                let v = e.open_volume(&model[i].name).unwrap();
                v.write(off as u64, Bytes::from(data.clone()), false)
                    .await
                    .unwrap();
                model[i].set(off as usize, &data);
            }
            Op::Trim { vol, off, len } => {
                let i = pick(vol);
                let len = (len as usize).min(SIZE - off as usize);
                let v = e.open_volume(&model[i].name).unwrap();
                v.trim(off as u64, len as u64, false).await.unwrap();
                model[i].set(off as usize, &vec![0; len]);
            }
            Op::Zero { vol, lba, n } => {
                let i = pick(vol);
                let n = (n as usize).min(BLOCKS - lba as usize);
                let v = e.open_volume(&model[i].name).unwrap();
                v.write_zeroes(lba as u64 * BS as u64, (n * BS) as u64, false)
                    .await
                    .unwrap();
                model[i].set(lba as usize * BS, &vec![0; n * BS]);
            }
            Op::Read { vol } => {
                let m = &model[vol as usize % model.len()];
                let got = e
                    .open_volume(&m.name)
                    .unwrap()
                    .read(0, SIZE as u32)
                    .await
                    .unwrap()
                    .data;
                assert_eq!(&got[..], &m.cur[..], "read of {} differs", m.name);
            }
            Op::Flush => {
                e.flush().await.unwrap();
                model.iter_mut().for_each(|m| m.durable());
            }
            Op::Snapshot { vol } => {
                let i = pick(vol);
                let name = format!("s{}", model.len());
                e.snapshot(&model[i].name, &name).await.unwrap();
                let content = model[i].cur.clone();
                model.iter_mut().for_each(|m| m.durable());
                snaps.push(model.len());
                model.push(ModelVol::new(&name, false, content));
            }
            Op::Clone { snap } => {
                if snaps.is_empty() {
                    continue;
                }
                let s = snaps[snap as usize % snaps.len()];
                let name = format!("c{}", model.len());
                e.clone_snapshot(&model[s].name, &name).await.unwrap();
                let content = model[s].cur.clone();
                if write_back == 0 {
                    // Its commit carries every write before it; buffered
                    // writes (write-back) wait for a flush.
                    model.iter_mut().for_each(|m| m.durable());
                }
                model.push(ModelVol::new(&name, true, content));
            }
            Op::Crash { seed } => {
                h.crash(e, seed).await;
                e = h.open().await;
                for m in model.iter_mut() {
                    let got = e
                        .open_volume(&m.name)
                        .unwrap()
                        .read(0, SIZE as u32)
                        .await
                        .unwrap()
                        .data;
                    for b in 0..BLOCKS {
                        let g = &got[b * BS..(b + 1) * BS];
                        assert!(
                            m.allowed[b].iter().any(|a| a == g),
                            "after crash, volume {} block {b} holds content that was never flushed nor written",
                            m.name
                        );
                    }
                    m.cur = got.to_vec();
                    m.durable();
                }
            }
        }
    }
    check_all(&e, &model).await;
    e.flush().await.unwrap();
    // Space accounting stays exact through everything above.
    let s = e.node_stats();
    let logical: u64 = e.list_volumes().iter().map(|v| v.mapped_bytes).sum();
    assert_eq!(s.logical_bytes, logical);
    e.shutdown().await.unwrap();
    drop(e);
    let e = h.open().await;
    check_all(&e, &model).await;
    e.shutdown().await.unwrap();
}

fn run_on(backend: Backend, ops: Vec<Op>) {
    run_with(backend, ops, 0);
}

fn run_with(backend: Backend, ops: Vec<Op>, write_back: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(backend, ops, write_back));
}

proptest! {
    // MODEL_CASES=N runs more sequences than CI's 64 (for changes to metadata caching).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("MODEL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    #[test]
    fn model_sim(ops in proptest::collection::vec(op(), 1..60)) {
        run_on(Backend::Sim, ops);
    }

    #[test]
    fn model_threads(ops in proptest::collection::vec(op(), 1..60)) {
        run_on(Backend::Threads, ops);
    }

    /// With a write-back buffer of a few blocks, so that writers wait for
    /// room and the drainer lands writes while others are buffered, read
    /// and replaced; the model's crash rule is the same (only flushes and
    /// FUA promise durability).
    #[test]
    fn model_write_back_small(ops in proptest::collection::vec(op(), 1..60)) {
        run_with(Backend::Sim, ops, 6 * BS as u64);
    }

    /// With a buffer larger than the volumes: writes land only on flush,
    /// FUA, snapshot and shutdown, and crashes lose what no flush covered.
    #[test]
    fn model_write_back_large(ops in proptest::collection::vec(op(), 1..60)) {
        run_with(Backend::Sim, ops, 64 << 20);
    }

    #[test]
    fn model_uring(ops in proptest::collection::vec(op(), 1..60)) {
        if backends().contains(&Backend::Uring) {
            run_on(Backend::Uring, ops);
        }
    }
}
