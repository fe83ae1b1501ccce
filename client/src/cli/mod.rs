//! The `ballast` command line.
//!
//! `main.rs` calls [`parse`] and then [`run`]; every failure surfaces as one
//! `error: ...` line on stderr with a non-zero exit status.

pub mod attach;
pub mod node;
pub mod output;
pub mod plugin;
pub use ballast_proto::size;
pub mod volume;

use clap::{Args, Parser, Subcommand};

use crate::api::DEFAULT_API;

const ABOUT: &str = "Manage ballast volumes and nodes through ballastd's control API.";

const AFTER_HELP: &str = "\
Sizes are bytes or a number with a K, M, G or T suffix (powers of 1024, case-insensitive;
KiB/MiB/GiB/TiB also accepted), e.g. 4096, 4K, 512M, 10G, 1.5T.

Examples:
  ballast volume create db1 --size 100G
  ballast volume list
  ballast volume info db1 --json
  ballast --api http://storage-1:7800 node info";

/// Top-level command line.
#[derive(Debug, Parser)]
#[command(name = "ballast", version, about = ABOUT, after_help = AFTER_HELP)]
pub struct Cli {
    /// URL of ballastd's control API.
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "BALLAST_API",
        default_value = DEFAULT_API
    )]
    pub api: String,

    #[command(subcommand)]
    pub command: Command,
}

/// Top-level subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list, inspect, resize, snapshot, clone and delete volumes.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Inspect the storage node.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// Drive an NBD export with a load generator, or run a benchmark suite.
    Bench(crate::bench::BenchArgs),
    #[command(about = attach::ATTACH_ABOUT, long_about = attach::ATTACH_LONG, after_help = attach::ATTACH_AFTER)]
    Attach(attach::AttachArgs),
    /// Detach a volume: disconnect /dev/nbdX, or unmount a FUSE attachment
    /// (waiting for its final flush).
    #[command(
        after_help = "Examples:\n  ballast detach /dev/nbd0\n  ballast detach db1\n  ballast detach /mnt/ballast"
    )]
    Detach(attach::DetachArgs),
    /// The background process of `attach --fuse` (internal).
    #[command(name = "__fuse-serve", hide = true)]
    FuseServe(attach::ServeArgs),
    /// The reconnect watcher of a kernel attachment (internal).
    #[command(name = "__kernel-watch", hide = true)]
    KernelWatch(attach::WatchArgs),
    /// Serve Ballast volumes to other systems (Docker's volume plugin protocol).
    #[command(subcommand)]
    Plugin(plugin::PluginCommand),
}

impl Cli {
    /// Parse an explicit argument list, returning clap's error.
    pub fn try_parse_from_args<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Cli::try_parse_from(args)
    }

    /// The serving request when this is the hidden FUSE serving command.
    pub fn serve_request(&self) -> Option<crate::attach::ServeRequest> {
        match &self.command {
            Command::FuseServe(a) => Some(a.request(&self.api)),
            _ => None,
        }
    }

    /// The watcher request when this is the hidden kernel watcher command.
    pub fn watch_request(&self) -> Option<crate::attach::watcher::WatchRequest> {
        match &self.command {
            Command::KernelWatch(a) => Some(a.request()),
            _ => None,
        }
    }

    /// The FUSE server answers requests from many tasks at once: it wants a
    /// multi-threaded runtime; every other command is fine on one thread.
    pub fn wants_multi_thread_runtime(&self) -> bool {
        matches!(self.command, Command::FuseServe(_))
    }
}

/// `--json` flag shared by every command that prints a result.
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct JsonArg {
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parse the process arguments.
///
/// `--help` and `--version` print as usual with exit status 0. Usage errors
/// (a bad size such as `12Q`, an unknown flag, a missing argument) are
/// printed as one `error: ...` line with exit status 2.
pub fn parse() -> Cli {
    parse_from(std::env::args_os())
}

/// [`parse`] for an explicit argument list (the first item is the program name).
pub fn parse_from<I, T>(args: I) -> Cli
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::error::ErrorKind;
    match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            eprintln!("{}", usage_error_line(&e.render().to_string()));
            std::process::exit(2);
        }
    }
}

/// Fold clap's multi-line usage error into one line:
/// `error: <what>; <details> (usage: <usage>)`.
pub fn usage_error_line(rendered: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let mut usage = None;
    for line in rendered.lines().map(str::trim) {
        if line.is_empty() || line.starts_with("For more information") {
            continue;
        }
        match line.strip_prefix("Usage: ") {
            Some(u) => usage = Some(u),
            None => parts.push(line),
        }
    }
    let mut out = if parts.is_empty() {
        "error: invalid command line".to_string()
    } else {
        parts.join(" ")
    };
    if !out.starts_with("error:") {
        out.insert_str(0, "error: ");
    }
    if let Some(u) = usage {
        out.push_str(&format!(" (usage: {u})"));
    }
    out
}

/// Run a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Volume(cmd) => volume::run(&cli.api, cmd).await,
        Command::Node(cmd) => node::run(&cli.api, cmd).await,
        Command::Bench(args) => crate::bench::run(args).await,
        Command::Attach(args) => attach::run_attach(&cli.api, args).await,
        Command::Detach(args) => attach::run_detach(args).await,
        Command::FuseServe(args) => Ok(crate::attach::serve::serve(args.request(&cli.api)).await?),
        Command::KernelWatch(args) => Ok(crate::attach::watcher::run(args.request()).await?),
        Command::Plugin(cmd) => plugin::run(&cli.api, cmd).await,
    }
}

/// Format an error as the single line printed after `error: `.
pub fn error_line(err: &anyhow::Error) -> String {
    format!("{err:#}")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_create_with_sizes() {
        let cli = Cli::try_parse_from([
            "ballast",
            "volume",
            "create",
            "v1",
            "--size",
            "10G",
            "--block-size",
            "64K",
            "--dedup",
            "off",
            "--compression",
            "none",
            "--replicas",
            "2",
            "--api",
            "http://h:1",
        ])
        .unwrap();
        assert_eq!(cli.api, "http://h:1");
        match cli.command {
            Command::Volume(volume::VolumeCommand::Create(a)) => {
                assert_eq!(a.size, 10 << 30);
                assert_eq!(a.block_size, Some(65536));
                assert_eq!(a.dedup, Some(volume::OnOff::Off));
                assert_eq!(a.compression, Some(volume::CompressionArg::None));
                assert_eq!(a.replicas, Some(2));
                assert!(!a.out.json);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn parses_plugin_docker() {
        let cli = Cli::try_parse_from([
            "ballast",
            "plugin",
            "docker",
            "--socket",
            "/run/docker/plugins/b2.sock",
            "--default-size",
            "1G",
            "--attach",
            "fuse",
        ])
        .unwrap();
        match cli.command {
            Command::Plugin(plugin::PluginCommand::Docker(a)) => {
                assert_eq!(
                    a.socket,
                    std::path::Path::new("/run/docker/plugins/b2.sock")
                );
                assert_eq!(a.default_size, 1 << 30);
                assert_eq!(a.attach, crate::plugin::host::AttachMode::Fuse);
                assert_eq!(
                    a.mount_root,
                    std::path::Path::new("/var/lib/ballast/mounts")
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(Cli::try_parse_from(["ballast", "plugin", "docker", "--attach", "magic"]).is_err());
    }

    #[test]
    fn rejects_bad_size_and_zero_replicas() {
        let e =
            Cli::try_parse_from(["ballast", "volume", "create", "v", "--size", "12Q"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(e.to_string().contains("unknown unit \"Q\""));
        assert!(Cli::try_parse_from([
            "ballast",
            "volume",
            "create",
            "v",
            "--size",
            "1G",
            "--replicas",
            "0"
        ])
        .is_err());
    }

    #[test]
    fn usage_errors_fold_to_one_line() {
        let err = |args: &[&str]| {
            let e = Cli::try_parse_from(args).unwrap_err();
            usage_error_line(&e.render().to_string())
        };
        let l = err(&["ballast", "volume", "create", "v", "--size", "12Q"]);
        assert!(
            l.starts_with("error: invalid value '12Q' for '--size <SIZE>'"),
            "{l}"
        );
        assert!(!l.contains('\n'));
        let l = err(&[
            "ballast", "volume", "create", "v", "--size", "1G", "--dedup", "x",
        ]);
        assert!(l.contains("[possible values: on, off]"), "{l}");
        let l = err(&["ballast", "volume", "create", "v"]);
        assert!(l.contains("--size <SIZE>"), "{l}");
        assert!(l.contains("(usage: ballast volume create"), "{l}");
        assert!(!l.contains('\n'));
    }

    #[test]
    fn error_line_is_single_line() {
        let e = anyhow::anyhow!("inner\nmore").context("outer");
        assert_eq!(error_line(&e), "outer: inner more");
    }
}
