//! `ballast plugin docker`

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::size::parse_nonzero_size;
use crate::plugin::host::AttachMode;
use crate::plugin::{self, PluginConfig};

const DOCKER_HELP: &str = "\
Docker discovers the plugin by its socket: /run/docker/plugins/NAME.sock makes the volume
driver NAME (the default socket gives `ballast`). Run it as root, next to ballastd, and keep it
running (a systemd unit is in docs/docker.md).

Volume options (docker volume create --driver ballast -o KEY=VALUE NAME), checked at create:
  size=SIZE          volume size, e.g. 1G, 500M [default: --default-size]; thin: costs
                     nothing until written
  block-size=SIZE    a power of two from 512 to 64K [default: 4K]
  dedup=on|off       deduplicate identical blocks [default: on]
  compression=MODE   lz4 or none [default: lz4]
  replicas=N         copies of the data [default: 1]; a standalone node holds 1
  fs=ext4|xfs        filesystem made on first mount [default: ext4]

Mount attaches the volume (kernel nbd where the module is loaded, otherwise a FUSE file from
`ballast attach --fuse` under --attach-root plus a loop device), formats it if it is blank, and
mounts it at MOUNT_ROOT/NAME. The last container to leave unmounts and detaches it.

Examples:
  ballast plugin docker
  docker volume create --driver ballast -o size=20G -o fs=xfs pgdata
  docker run --rm -v pgdata:/var/lib/postgresql/data postgres
  docker volume rm pgdata            # deletes the Ballast volume too";

/// Plugin subcommands.
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Serve Ballast volumes to Docker as a volume plugin (VolumeDriver protocol on a unix socket).
    #[command(after_help = DOCKER_HELP)]
    Docker(DockerArgs),
}

#[derive(Debug, Args)]
pub struct DockerArgs {
    /// Unix socket Docker connects to; its file name without `.sock` is the driver name.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/docker/plugins/ballast.sock"
    )]
    pub socket: PathBuf,
    /// Directory under which volumes are mounted (MOUNT_ROOT/NAME).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/ballast/mounts")]
    pub mount_root: PathBuf,
    /// Directory under which FUSE attachments are made (ATTACH_ROOT/NAME).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/ballast/attach")]
    pub attach_root: PathBuf,
    /// Directory of the plugin's state (mount IDs, filesystem choices).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/ballast/plugin")]
    pub state_dir: PathBuf,
    /// Size of volumes created without `-o size=...`.
    #[arg(long, value_name = "SIZE", value_parser = parse_nonzero_size, default_value = "10G")]
    pub default_size: u64,
    /// How Mount attaches volumes.
    #[arg(long, value_enum, value_name = "MODE", default_value = "auto")]
    pub attach: AttachMode,
}

/// Run `ballast plugin ...` against the API at `api`.
pub async fn run(api: &str, cmd: PluginCommand) -> anyhow::Result<()> {
    match cmd {
        PluginCommand::Docker(a) => docker(api, a).await,
    }
}

fn absolute(p: PathBuf, flag: &str) -> anyhow::Result<PathBuf> {
    std::path::absolute(&p)
        .with_context(|| format!("{flag} {}: cannot make the path absolute", p.display()))
}

/// Create `p` and resolve symlinks: the kernel reports mountpoints by their
/// real path, and the plugin finds its mounts by comparing paths.
fn real_dir(p: PathBuf, flag: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(&p)
        .and_then(|_| p.canonicalize())
        .with_context(|| {
            format!(
                "{flag} {}: cannot create the directory (the plugin runs as root)",
                p.display()
            )
        })
}

async fn docker(api: &str, a: DockerArgs) -> anyhow::Result<()> {
    // Logs go to stderr (journald under systemd); RUST_LOG overrides.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let ballast_bin = std::env::current_exe()
        .context("cannot find the running ballast binary (needed for `ballast attach`)")?;
    let cfg = PluginConfig {
        socket: absolute(a.socket, "--socket")?,
        mount_root: real_dir(a.mount_root, "--mount-root")?,
        attach_root: real_dir(a.attach_root, "--attach-root")?,
        state_dir: real_dir(a.state_dir, "--state-dir")?,
        api: crate::api::normalize_url(api),
        default_size: a.default_size,
        attach_mode: a.attach,
        ballast_bin,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        tracing::info!(
            "stopping: the socket is removed; mounts and attachments stay for the next start"
        );
    };
    plugin::run(cfg, shutdown).await?;
    Ok(())
}
