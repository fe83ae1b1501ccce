//! The allocator ballastd runs on (mimalloc) and how long it keeps freed
//! memory before handing it back to the kernel.
//!
//! The write path allocates and frees small buffers per block from several
//! threads, and the engine's commits and the metadata store's memtables free
//! and rebuild megabytes every second or two; glibc's malloc spent ~15% of a
//! write's CPU in malloc, free and consolidation (+17% writes per CPU-second
//! with mimalloc). mimalloc also keeps freed memory of one thread reusable by
//! others, so resident memory does not creep up with per-thread arenas, and
//! serves 32 MiB write payloads from reused segments rather than a fresh mmap
//! per request.
//!
//! mimalloc purges memory that stayed free for 1 s (its default purge
//! delay); a memtable refilled two seconds later then took its pages back
//! through page faults and the kernel's page clearing. Ten seconds keeps
//! that memory across the store's flush cycle (write_cpu, 4 runs of 3
//! rounds in turns: 76-79 k -> 83-87 k writes per CPU-second into a fresh
//! volume, 58-63 k -> 62-66 k under overwrites; never purging did no better
//! than 10 s).
//!
//! A purge hands the pages back lazily (`MADV_FREE`), not at once
//! (`MADV_DONTNEED`, mimalloc's default): the kernel takes them when it
//! needs memory, as it drops clean page cache, and until then they are
//! reused without a fault. The write-back buffer fills in bursts (a stream
//! of 1 MiB writes holds up to a gigabyte of request buffers) and drains at
//! a flush; with `MADV_DONTNEED` every burst after a quiet 10 s faulted all
//! of its memory in again and the kernel cleared each page (6 s of 1 MiB
//! writes 12 s after the last burst, twice each in turns: 230-245 k page
//! faults -> 0-2, 3.2-3.7 -> 2.7 s of ballastd CPU, 1644-1770 -> 2249-2290
//! MB/s). The price: resident memory (RSS) shows the peak until the kernel
//! reclaims, as with the page cache.
//!
//! Transparent huge pages are off for mimalloc's memory after its first
//! arena (below). The write-back buffer keeps each 4 KiB write's own buffer
//! until a rewrite or its landing frees it, so the heap grows and shrinks
//! in scattered small pieces; with huge pages, the kernel cleared 2 MiB at
//! a fault and again after each purge split one, and page clearing took
//! 21-54% of ballastd's CPU under random 4 KiB writes (0.5% without;
//! together with in-place rewrites in the write-back buffer, 83 -> 129 k
//! writes per second through NBD: docs/benchmarks.md, session 24).
//!
//! The first arena (1 GiB) is reserved by the runtime's first allocation,
//! before `main` can call [`configure`], and keeps huge pages; later arenas
//! have none. That split measured best (nbd-ab.sh, 3 rounds in turns,
//! session 26): turning huge pages off for the whole process as well
//! (`PR_SET_THP_DISABLE`) cost random 4 KiB writes 52-57 k -> 37-54 k IOPS,
//! allowing them everywhere 52-65 k -> 30-36 k.

use std::ffi::c_long;

/// The allocator to declare as `#[global_allocator]` in each binary.
pub use mimalloc::MiMalloc as Allocator;

/// `mi_option_purge_delay`: its index in mimalloc's option enum (the same in
/// mimalloc 2 and 3), which libmimalloc-sys does not name.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory stays with the process before it is returned.
pub const PURGE_DELAY_MS: c_long = 10_000;

/// `mi_option_allow_thp` (mimalloc 3).
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// `mi_option_purge_decommits` (mimalloc 3).
const MI_OPTION_PURGE_DECOMMITS: libmimalloc_sys::mi_option_t = 5;

/// Apply ballastd's allocator settings, once per process. Call first thing
/// in `main`, before any other thread exists: mimalloc's option setter is
/// not thread safe.
pub fn configure() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: setting an option is a plain store into mimalloc's option
        // table; the first call runs before other threads exist.
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
            libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0);
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DECOMMITS, 0);
        }
    });
}

/// The value mimalloc uses now for `option`.
fn option(option: libmimalloc_sys::mi_option_t) -> c_long {
    // SAFETY: reading an option has no preconditions.
    unsafe { libmimalloc_sys::mi_option_get(option) }
}

/// The purge delay mimalloc uses now, in milliseconds.
pub fn purge_delay_ms() -> c_long {
    option(MI_OPTION_PURGE_DELAY)
}

/// Whether mimalloc's purges take the memory away at once (`MADV_DONTNEED`)
/// rather than lazily (`MADV_FREE`).
pub fn purge_decommits() -> bool {
    option(MI_OPTION_PURGE_DECOMMITS) != 0
}

/// Whether mimalloc may use transparent huge pages now.
pub fn thp_allowed() -> bool {
    option(MI_OPTION_ALLOW_THP) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hard-coded option indexes are those of the mimalloc linked in: a
    /// child process started with `MIMALLOC_PURGE_DELAY` and
    /// `MIMALLOC_ALLOW_THP` (which mimalloc reads by name) reports those
    /// values through the indexes.
    #[test]
    fn the_option_index_is_the_purge_delay() {
        if std::env::var_os("BALLAST_ALLOCATOR_CHILD").is_some() {
            println!(
                "purge_delay={} thp={} decommits={}",
                purge_delay_ms(),
                thp_allowed(),
                purge_decommits()
            );
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "allocator::tests::the_option_index_is_the_purge_delay",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("BALLAST_ALLOCATOR_CHILD", "1")
            .env("MIMALLOC_PURGE_DELAY", "4321")
            .env("MIMALLOC_ALLOW_THP", "0")
            .env("MIMALLOC_PURGE_DECOMMITS", "0")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {stdout}");
        assert!(
            stdout.contains("purge_delay=4321 thp=false decommits=false"),
            "option 15 is not mimalloc's purge delay, 43 not its THP switch, or 5 not its purge mode: {stdout}"
        );
    }

    #[test]
    fn configure_sets_the_purge_delay_and_mode_and_turns_thp_off() {
        configure();
        assert_eq!(purge_delay_ms(), PURGE_DELAY_MS);
        assert!(!thp_allowed());
        assert!(!purge_decommits());
    }
}
