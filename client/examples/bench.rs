//! Stand-alone `ballast bench` for manual runs before (and besides) the CLI
//! subcommand: `cargo run --release -p ballast-client --example bench -- --uri nbd://127.0.0.1:10809/ --json`.

use std::process::ExitCode;

use ballast_client::bench::{self, BenchArgs};
use clap::Parser;

#[derive(Parser)]
#[command(name = "bench", about = "NBD load generator (ballast bench)")]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Like the ballast CLI: a single-threaded runtime; the load runs on its own.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(bench::run(cli.args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
