//! Load generator tests against the in-process loopback server.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::nbd::loopback::{Loopback, LoopbackConfig};

async fn cfg_for(srv: &Loopback, pattern: Pattern) -> LoadConfig {
    let mut c = LoadConfig::new(NbdUri::parse(&srv.uri()).unwrap(), pattern);
    c.duration = Some(Duration::from_millis(300));
    c.queue_depth = 8;
    c
}

#[tokio::test]
async fn verify_passes_on_a_correct_server() {
    let srv = Loopback::start(LoopbackConfig {
        size: 4 << 20,
        reverse_batches: true,
        ..LoopbackConfig::default()
    })
    .await
    .unwrap();
    for pattern in [Pattern::Randwrite, Pattern::Randrw, Pattern::Write] {
        let mut cfg = cfg_for(&srv, pattern).await;
        cfg.verify = true;
        cfg.connections = 2;
        cfg.dedupe_percent = 30;
        cfg.compress_percent = 40;
        let r = run_load(&cfg, Arc::new(Live::default())).await.unwrap();
        assert_eq!(r.verify_errors, 0, "{pattern}: {:?}", r.first_mismatch);
        assert!(r.verified_blocks > 0, "{pattern}");
        assert!(r.ops > 0 && r.iops > 0.0);
        assert_eq!(r.connections, 2);
    }
}

#[tokio::test]
async fn verify_catches_corruption() {
    let srv = Loopback::start(LoopbackConfig {
        size: 1 << 20,
        corrupt_reads: true,
        ..LoopbackConfig::default()
    })
    .await
    .unwrap();
    let mut cfg = cfg_for(&srv, Pattern::Randwrite).await;
    cfg.verify = true;
    let r = run_load(&cfg, Arc::new(Live::default())).await.unwrap();
    assert!(r.verified_blocks > 0);
    assert_eq!(r.verify_errors, r.verified_blocks);
    assert!(r
        .first_mismatch
        .unwrap()
        .contains("first difference at byte 0"));
}

#[tokio::test]
async fn byte_budget_and_region() {
    let srv = Loopback::start(LoopbackConfig {
        size: 8 << 20,
        ..LoopbackConfig::default()
    })
    .await
    .unwrap();
    let mut cfg = cfg_for(&srv, Pattern::Read).await;
    cfg.duration = None;
    cfg.bytes = Some(1 << 20);
    cfg.block_size = 64 * 1024;
    cfg.offset = 1 << 20;
    cfg.size = Some(2 << 20);
    let r = run_load(&cfg, Arc::new(Live::default())).await.unwrap();
    assert_eq!(r.ops, 16);
    assert_eq!(r.bytes, 1 << 20);
    assert_eq!(r.block_size, 65536);
    assert!(r.write.is_none());
    // A block larger than the region is refused.
    cfg.size = Some(1000);
    assert!(run_load(&cfg, Arc::new(Live::default())).await.is_err());
}

#[tokio::test]
async fn io_errors_stop_the_run() {
    let srv = Loopback::start(LoopbackConfig {
        size: 1 << 20,
        fail_at: Some(4096),
        ..LoopbackConfig::default()
    })
    .await
    .unwrap();
    let mut cfg = cfg_for(&srv, Pattern::Read).await;
    cfg.duration = Some(Duration::from_secs(10));
    let e = run_load(&cfg, Arc::new(Live::default())).await.unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("NBD_EIO") && msg.contains("offset 4096"),
        "{msg}"
    );
}

#[tokio::test]
async fn json_has_the_documented_keys() {
    let srv = Loopback::start(LoopbackConfig::default()).await.unwrap();
    let cfg = cfg_for(&srv, Pattern::Randrw).await;
    let r = run_load(&cfg, Arc::new(Live::default())).await.unwrap();
    let v: serde_json::Value = serde_json::to_value(&r).unwrap();
    for k in [
        "iops",
        "mbps",
        "latency_us",
        "ops",
        "bytes",
        "seconds",
        "pattern",
        "block_size",
        "queue_depth",
        "connections",
        "verify_errors",
    ] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    for k in ["p50", "p90", "p99", "p999", "max"] {
        assert!(v["latency_us"][k].as_f64().unwrap() > 0.0, "latency {k}");
    }
    assert_eq!(v["pattern"], "randrw");
    assert!(r.read.is_some() && r.write.is_some());
}
