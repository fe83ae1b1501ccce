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

/// The runtime the benchmark binaries drive the engine with: two workers,
/// like this machine's two cores and ballastd's default.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// A scratch folder for an engine's disk and metadata, under
/// `BALLAST_BENCH_DIR` if set (pick a real disk: /tmp may be tmpfs).
pub fn scratch_dir() -> anyhow::Result<tempfile::TempDir> {
    Ok(tempfile::tempdir_in(
        std::env::var_os("BALLAST_BENCH_DIR").unwrap_or_else(|| std::env::temp_dir().into()),
    )?)
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
