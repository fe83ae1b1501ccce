//! Ballast benchmarks. Criterion micro-benchmarks live in `benches/`; the
//! binaries in `src/bin/` measure what criterion cannot: space efficiency on
//! real data (`space_efficiency`), memory per TiB of unique data
//! (`memory_scale`) and foreground throughput under cleaning
//! (`cleaner_throttle`). Shared helpers for those binaries are here.

use ballast_engine::{DiskSpec, Engine, EngineConfig};
use std::path::Path;

/// The configuration of an engine on a sparse disk file under `dir`.
pub fn engine_config(dir: &Path, disk_size: u64) -> EngineConfig {
    let mut cfg = EngineConfig::new(dir.join("data"));
    cfg.disks = vec![DiskSpec {
        path: dir.join("disk0.img"),
        create_size: Some(disk_size),
    }];
    cfg
}

/// Open an engine on a sparse disk file under `dir`.
pub async fn open_engine(dir: &Path, disk_size: u64) -> anyhow::Result<Engine> {
    Ok(Engine::open(engine_config(dir, disk_size)).await?)
}

/// Resident and peak resident memory of this process, in bytes.
pub fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Cap glibc's malloc arenas as ballastd does: per-thread arenas otherwise
/// keep freed metadata buffers resident and memory looks like it grows with data.
pub fn limit_malloc_arenas() {
    // SAFETY: mallopt only adjusts allocator tuning; called before threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
