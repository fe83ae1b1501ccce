use clap::Parser;

fn main() -> std::process::ExitCode {
    // Few malloc arenas: with one per thread, freed metadata buffers stay
    // resident and the daemon's memory creeps up with the data written.
    // Write payloads (up to 32 MiB each) come from the heap, not from a fresh
    // mmap per request: page faults and the kernel zeroing new pages were a
    // sixth of the daemon's CPU under 1 MiB writes. Up to 64 MiB of freed
    // heap stays mapped for the next requests.
    // SAFETY: allocator tuning only, before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
    let args = ballast_server::daemon::Args::parse();
    ballast_server::daemon::init_logging(args.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ballastd")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(ballast_server::daemon::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
