use clap::Parser;

// mimalloc rather than glibc's malloc: the write path allocates and frees
// small buffers per block (hashes, records, metadata keys) from several
// threads, and the engine's commits free large maps; glibc spent ~15% of a
// write's CPU in malloc, free and consolidation (write_cpu, interleaved A/B:
// +17% writes per CPU-second with mimalloc). It also keeps freed memory of
// one thread reusable by others, so resident memory does not creep up with
// per-thread arenas, and it serves 32 MiB write payloads from reused
// segments rather than a fresh mmap (and kernel page zeroing) per request.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
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
