use clap::Parser;

fn main() -> std::process::ExitCode {
    // Few malloc arenas: with one per thread, freed metadata buffers stay
    // resident and the daemon's memory creeps up with the data written.
    // SAFETY: allocator tuning only, before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
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
