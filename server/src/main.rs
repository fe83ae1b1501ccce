use clap::Parser;

// mimalloc, tuned: see `ballast_server::allocator`.
#[global_allocator]
static GLOBAL: ballast_server::allocator::Allocator = ballast_server::allocator::Allocator;

fn main() -> std::process::ExitCode {
    ballast_server::allocator::configure();
    let args = ballast_server::daemon::Args::parse();
    ballast_server::daemon::init_logging(args.log_format);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.workers.count() {
        builder.worker_threads(n);
    }
    let rt = match builder.enable_all().thread_name("ballastd").build() {
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
