//! `ballast bench`: an NBD load generator, and `ballast bench suite` to
//! compare several targets on several workloads.
//!
//! The CLI adds `Bench(ballast_client::bench::BenchArgs)` and dispatches to
//! [`run`]. The load itself runs on a runtime of its own (one thread by
//! default, `--threads N` for more), whatever runtime the caller uses, so the
//! measurement does not depend on it.

pub mod datagen;
pub mod load;
pub mod report;
pub mod rng;
pub mod suite;

#[cfg(test)]
mod load_tests;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ballast_proto::congestion::LocalCongestion;
use clap::{Args, Subcommand};

pub use load::{run_load, Live, LoadConfig, Pattern};
pub use report::{BenchReport, DirReport, Latency};

use crate::nbd::NbdUri;

const BENCH_AFTER_HELP: &str = "\
Examples:
  ballast bench --uri nbd://127.0.0.1:10809/vol1 --pattern randread --block-size 4k --queue-depth 32 --duration 10s
  ballast bench --uri nbd://127.0.0.1:10809/vol1 --pattern randrw --read-percent 70 --connections 4 --bytes 4G
  ballast bench --uri nbd://127.0.0.1:10809/vol1 --pattern randwrite --dedupe-percent 30 --compress-percent 50 --verify --json
  ballast bench suite benches/suite.toml --out bench-results";

/// Arguments of `ballast bench`.
#[derive(Debug, Clone, Args)]
#[command(after_help = BENCH_AFTER_HELP)]
pub struct BenchArgs {
    /// Run a suite of targets and workloads instead of one load.
    #[command(subcommand)]
    pub command: Option<Box<BenchCommand>>,

    /// Export to drive: nbd://HOST[:PORT]/EXPORT (port 10809 by default; the
    /// export name may be empty) or nbd+unix:///EXPORT?socket=PATH.
    #[arg(long, value_name = "URI")]
    pub uri: Option<String>,

    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Pattern::Randread)]
    pub pattern: Pattern,

    /// Bytes per request (4k, 64K, 1M, ...).
    #[arg(long, value_name = "SIZE", default_value = "4k", value_parser = parse_block_size)]
    pub block_size: u32,

    /// Requests in flight per connection.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub queue_depth: u32,

    /// Connections to open (needs NBD_FLAG_CAN_MULTI_CONN to be meaningful).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub connections: u32,

    /// How long to run (10s, 500ms, 2m, 1m30s); the default is 10s unless
    /// --bytes is given.
    #[arg(long, value_name = "TIME", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Stop after transferring this much (e.g. 4G). With --duration too,
    /// whichever comes first.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub bytes: Option<u64>,

    /// Share of reads in randrw, in percent.
    #[arg(long, value_name = "P", default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub read_percent: u8,

    /// Share of written blocks that duplicate an earlier block (like fio's
    /// dedupe_percentage).
    #[arg(long, value_name = "P", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub dedupe_percent: u8,

    /// Share of each written block that compresses away (like fio's
    /// buffer_compress_percentage).
    #[arg(long, value_name = "P", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub compress_percent: u8,

    /// Check data: reads of blocks this run wrote are compared as they
    /// complete, and every written block is read back and compared at the end.
    /// Exits non-zero on any mismatch.
    #[arg(long)]
    pub verify: bool,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,

    /// Seed of offsets and data (runs with the same seed write the same data).
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,

    /// Start of the region to use.
    #[arg(long, value_name = "SIZE", default_value = "0", value_parser = parse_size)]
    pub offset: u64,

    /// Length of the region to use (default: to the end of the export).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,

    /// Send writes with FUA.
    #[arg(long)]
    pub fua: bool,

    /// TCP congestion control of connections to a server on this host
    /// (loopback, or this host's own address): a comma-separated list, the
    /// first one the kernel accepts wins; `system` keeps the system's
    /// default. A pacing algorithm such as BBR slows large writes over
    /// loopback (a timer per burst); servers elsewhere always get the
    /// system's. Reno is always allowed; others only as listed in
    /// net.ipv4.tcp_allowed_congestion_control, or to root.
    #[arg(long, default_value_t = LocalCongestion::default(), value_name = "LIST|system")]
    pub local_congestion: LocalCongestion,

    /// Threads driving the load (1: a single-threaded runtime).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub threads: u32,

    /// Never show the progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

/// Subcommands of `ballast bench`.
#[derive(Debug, Clone, Subcommand)]
pub enum BenchCommand {
    /// Run the targets and workloads of a suite file (TOML) and write a
    /// results folder (raw JSON, Markdown table, PNG charts).
    Suite(suite::SuiteArgs),
}

fn parse_size(s: &str) -> Result<u64, String> {
    ballast_proto::size::parse_size(s).map_err(|e| e.to_string())
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    let v = parse_size(s)?;
    if v == 0 || v > (1 << 30) {
        return Err(format!("block size {s:?} must be between 1 byte and 1G"));
    }
    Ok(v as u32)
}

/// Parse `10s`, `500ms`, `2m`, `1h`, `1m30s`, `1.5s` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || format!("invalid duration {s:?}: use e.g. 10s, 500ms, 2m, 1m30s");
    if t.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = t.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|_| bad());
    }
    let mut total = 0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let unit_end = rest[num_end..]
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .map_or(rest.len(), |i| num_end + i);
        let n: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        let mult = match &rest[num_end..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += n * mult;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

impl BenchArgs {
    /// The load described by these arguments.
    pub fn load_config(&self) -> anyhow::Result<LoadConfig> {
        let Some(uri) = &self.uri else {
            bail!("ballast bench needs --uri nbd://HOST[:PORT]/EXPORT (or the `suite FILE` subcommand)");
        };
        let uri = NbdUri::parse(uri)?;
        let mut cfg = LoadConfig::new(uri, self.pattern);
        cfg.block_size = self.block_size;
        cfg.queue_depth = self.queue_depth as usize;
        cfg.connections = self.connections as usize;
        cfg.duration = match (self.duration, self.bytes) {
            (None, None) => Some(Duration::from_secs(10)),
            (d, _) => d,
        };
        if cfg.duration == Some(Duration::ZERO) {
            bail!("--duration must be more than zero");
        }
        cfg.bytes = self.bytes;
        cfg.read_percent = self.read_percent;
        cfg.dedupe_percent = self.dedupe_percent;
        cfg.compress_percent = self.compress_percent;
        cfg.verify = self.verify;
        if let Some(s) = self.seed {
            cfg.seed = s;
        }
        cfg.offset = self.offset;
        cfg.size = self.size;
        cfg.fua = self.fua;
        cfg.local_congestion = self.local_congestion.clone();
        Ok(cfg)
    }
}

/// Run `ballast bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(cmd) = args.command {
        let BenchCommand::Suite(s) = *cmd;
        return suite::run(s).await;
    }
    let cfg = args.load_config()?;
    if cfg.verify && !cfg.pattern.writes() {
        eprintln!(
            "note: --verify checks data this run writes; {} writes nothing, so nothing will be compared",
            cfg.pattern
        );
    }
    let show_progress =
        !args.no_progress && std::io::stderr().is_terminal() && std::io::stdout().is_terminal();
    let report = run_with_progress(cfg.clone(), args.threads as usize, show_progress).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.to_text(cfg.verify));
    }
    if report.verify_errors > 0 {
        bail!(
            "verification failed: {} of {} blocks read back differ from what was written{}",
            report.verify_errors,
            report.verified_blocks,
            report
                .first_mismatch
                .as_deref()
                .map(|m| format!(" (first: {m})"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// Set by the first Ctrl-C during a run; a suite stops after the current run.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Run a load on its own runtime (`threads` == 1: single-threaded) in a new
/// OS thread, optionally drawing a progress bar on stderr meanwhile.
pub async fn run_with_progress(
    cfg: LoadConfig,
    threads: usize,
    show_progress: bool,
) -> anyhow::Result<BenchReport> {
    let live = Arc::new(Live::default());
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let thread_live = live.clone();
    let thread_cfg = cfg.clone();
    std::thread::Builder::new()
        .name("ballast-bench".into())
        .spawn(move || {
            let rt = if threads <= 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    .enable_all()
                    .build()
            };
            let res = match rt {
                Ok(rt) => rt.block_on(run_load(&thread_cfg, thread_live)),
                Err(e) => Err(anyhow::Error::new(e).context("cannot start the bench runtime")),
            };
            let _ = tx.send(res);
        })
        .context("cannot start the bench thread")?;
    let bar = show_progress.then(|| progress_bar(&cfg));
    let mut bar_state = BarState {
        run_started: None,
        last: (std::time::Instant::now(), 0, 0),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut ctrl_c = Box::pin(tokio::signal::ctrl_c());
    let result = loop {
        tokio::select! {
            r = &mut rx => break r.context("the bench thread died")?,
            _ = tick.tick() => {
                if let Some(bar) = &bar {
                    update_bar(bar, &cfg, &live, &mut bar_state);
                }
            }
            _ = &mut ctrl_c => {
                // First Ctrl-C: finish the requests in flight and report what
                // ran; a second one exits at once.
                if INTERRUPTED.swap(true, Ordering::Relaxed) {
                    eprintln!("interrupted again: exiting");
                    std::process::exit(130);
                }
                live.stop.store(true, Ordering::Relaxed);
                eprintln!("interrupted: stopping (press Ctrl-C again to exit at once)");
                ctrl_c = Box::pin(tokio::signal::ctrl_c());
            }
        }
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    result
}

fn progress_bar(cfg: &LoadConfig) -> indicatif::ProgressBar {
    let len = match (cfg.duration, cfg.bytes) {
        (Some(d), _) => d.as_millis() as u64,
        (None, Some(b)) => b,
        (None, None) => 0,
    };
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(len),
        indicatif::ProgressDrawTarget::stderr_with_hz(5),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {percent:>3}% {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(format!(
        "{} {}",
        cfg.pattern,
        report::fmt_bytes(cfg.block_size as u64)
    ));
    bar
}

/// What the progress bar remembers between ticks.
struct BarState {
    run_started: Option<std::time::Instant>,
    last: (std::time::Instant, u64, u64),
}

fn update_bar(bar: &indicatif::ProgressBar, cfg: &LoadConfig, live: &Live, st: &mut BarState) {
    let now = std::time::Instant::now();
    let ops = live.ops.load(Ordering::Relaxed);
    let bytes = live.bytes.load(Ordering::Relaxed);
    match live.phase.load(Ordering::Relaxed) {
        load::phase::CONNECTING => bar.set_message("connecting"),
        load::phase::VERIFYING => {
            let done = live.verified.load(Ordering::Relaxed);
            let all = live.to_verify.load(Ordering::Relaxed).max(1);
            bar.set_length(all);
            bar.set_position(done);
            bar.set_prefix("verify");
            bar.set_message(format!("{done}/{all} blocks"));
        }
        _ => {
            let started = *st.run_started.get_or_insert(now);
            match cfg.duration {
                Some(_) => bar.set_position(now.duration_since(started).as_millis() as u64),
                None => bar.set_position(bytes),
            }
            let (t, o, b) = st.last;
            let dt = now.duration_since(t).as_secs_f64();
            if dt >= 0.1 {
                bar.set_message(format!(
                    "{:.0} IOPS {:.1} MB/s",
                    (ops - o) as f64 / dt,
                    (bytes - b) as f64 / dt / 1e6
                ));
                st.last = (now, ops, bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    /// The shape the `ballast` CLI uses: `Bench(BenchArgs)` in its subcommand
    /// enum next to a global `--api`.
    #[derive(Parser)]
    struct Top {
        #[arg(long, global = true, default_value = "http://127.0.0.1:7800")]
        api: String,
        #[command(subcommand)]
        cmd: TopCmd,
    }

    #[derive(clap::Subcommand)]
    enum TopCmd {
        /// Benchmark an NBD export.
        Bench(BenchArgs),
    }

    #[test]
    fn stays_small_enough_for_a_subcommand_enum() {
        // clippy::large_enum_variant fires past ~200 bytes of difference.
        assert!(
            std::mem::size_of::<BenchArgs>() <= 160,
            "{}",
            std::mem::size_of::<BenchArgs>()
        );
    }

    #[test]
    fn embeds_in_a_cli() {
        use clap::CommandFactory;
        Top::command().debug_assert();
        let t = Top::try_parse_from(["ballast", "bench", "--uri", "nbd://h/", "--json"]).unwrap();
        let TopCmd::Bench(b) = t.cmd;
        assert!(b.json && b.command.is_none());
        let t = Top::try_parse_from([
            "ballast",
            "--api",
            "http://x:1",
            "bench",
            "suite",
            "s.toml",
            "--out",
            "d",
            "--repeats",
            "1",
        ])
        .unwrap();
        let TopCmd::Bench(b) = t.cmd;
        match b.command.as_deref() {
            Some(BenchCommand::Suite(s)) => {
                assert_eq!(s.file, std::path::PathBuf::from("s.toml"));
                assert_eq!(s.repeats, Some(1));
            }
            None => panic!("suite not parsed"),
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("8s").unwrap(), Duration::from_secs(8));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        for bad in ["", "s", "10x", "-1s", "1s2"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn acceptance_command_line_parses() {
        let cli = Cli::try_parse_from([
            "bench",
            "--uri",
            "nbd://127.0.0.1:10900/",
            "--pattern",
            "randread",
            "--block-size",
            "4k",
            "--queue-depth",
            "32",
            "--duration",
            "8s",
            "--json",
        ])
        .unwrap();
        let cfg = cli.args.load_config().unwrap();
        assert_eq!(cfg.block_size, 4096);
        assert_eq!(cfg.queue_depth, 32);
        assert_eq!(cfg.duration, Some(Duration::from_secs(8)));
        assert!(cli.args.json);
        let cli = Cli::try_parse_from([
            "bench",
            "--uri",
            "nbd://h/",
            "--pattern",
            "randrw",
            "--bytes",
            "1G",
        ])
        .unwrap();
        let cfg = cli.args.load_config().unwrap();
        assert_eq!((cfg.duration, cfg.bytes), (None, Some(1 << 30)));
        assert!(Cli::try_parse_from(["bench", "--dedupe-percent", "101"]).is_err());
        assert!(Cli::try_parse_from(["bench", "--block-size", "0"]).is_err());
        let cli = Cli::try_parse_from(["bench"]).unwrap();
        assert!(cli.args.load_config().is_err());
        let cli = Cli::try_parse_from(["bench", "suite", "x.toml"]).unwrap();
        assert!(matches!(
            cli.args.command.as_deref(),
            Some(BenchCommand::Suite(_))
        ));
    }
}
