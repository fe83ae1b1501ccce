//! `ballast volume ...`

use clap::{Args, Subcommand, ValueEnum};

use super::output::{self, format_unix, key_values, on_off, yes_no, Align, Table};
use super::size::{format_size, parse_block_size, parse_nonzero_size};
use super::JsonArg;
use crate::api::{ApiClient, CreateVolumeSpec, Volume};

const CREATE_EXAMPLES: &str = "\
Examples:
  ballast volume create db1 --size 100G
  ballast volume create scratch --size 512MiB --block-size 64K --dedup off --compression none
  ballast volume create logs --size 1.5T --json

Sizes are bytes or a number with a K, M, G or T suffix (powers of 1024, case-insensitive;
KiB/MiB/GiB/TiB also accepted): 4096, 4K, 512M, 10G, 1.5T.";

const RESIZE_EXAMPLES: &str = "\
Examples:
  ballast volume resize db1 --size 200G
  ballast volume resize db1 --size 1TiB --json

The new size must be a multiple of the volume's block size.";

/// Volume subcommands.
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a new thin-provisioned volume.
    #[command(after_help = CREATE_EXAMPLES)]
    Create(CreateArgs),
    /// List volumes and snapshots.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show one volume or snapshot in detail.
    #[command(after_help = "Example:\n  ballast volume info db1 --json")]
    Info(InfoArgs),
    /// Delete a volume or snapshot.
    #[command(visible_alias = "rm")]
    Delete(DeleteArgs),
    /// Change the size of a volume.
    #[command(after_help = RESIZE_EXAMPLES)]
    Resize(ResizeArgs),
    /// Take a read-only, point-in-time snapshot of a volume.
    #[command(after_help = "Example:\n  ballast volume snapshot db1 db1-before-upgrade")]
    Snapshot(SnapshotArgs),
    /// Create a new writable volume from a snapshot.
    #[command(after_help = "Example:\n  ballast volume clone db1-before-upgrade db1-test")]
    Clone(CloneArgs),
}

/// `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// Compression algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressionArg {
    /// LZ4 (fast, default).
    Lz4,
    /// Store blocks uncompressed.
    None,
}

impl CompressionArg {
    fn as_str(self) -> &'static str {
        match self {
            CompressionArg::Lz4 => "lz4",
            CompressionArg::None => "none",
        }
    }
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Volume name: 1-128 characters from A-Z a-z 0-9 . _ -
    pub name: String,
    /// Volume size: bytes or K/M/G/T suffix (powers of 1024), e.g. 512M, 10G, 1.5T.
    /// Must be a multiple of the block size.
    #[arg(long, value_name = "SIZE", value_parser = parse_nonzero_size)]
    pub size: u64,
    /// Block size: a power of two from 512 to 64K, e.g. 512, 4K, 64K [default: 4K].
    #[arg(long, value_name = "SIZE", value_parser = parse_block_size)]
    pub block_size: Option<u32>,
    /// Deduplicate identical blocks [default: on].
    #[arg(long, value_name = "on|off")]
    pub dedup: Option<OnOff>,
    /// Compression for stored blocks [default: lz4].
    #[arg(long, value_name = "lz4|none")]
    pub compression: Option<CompressionArg>,
    /// Number of replicas [default: 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub replicas: Option<u32>,
    #[command(flatten)]
    pub out: JsonArg,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub out: JsonArg,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Volume or snapshot name.
    pub name: String,
    #[command(flatten)]
    pub out: JsonArg,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Volume or snapshot name.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// Volume name.
    pub name: String,
    /// New size: bytes or K/M/G/T suffix (powers of 1024), e.g. 20G, 1TiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_nonzero_size)]
    pub size: u64,
    #[command(flatten)]
    pub out: JsonArg,
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Volume to snapshot.
    pub volume: String,
    /// Name of the new snapshot.
    pub snapshot: String,
    #[command(flatten)]
    pub out: JsonArg,
}

#[derive(Debug, Args)]
pub struct CloneArgs {
    /// Snapshot to clone.
    pub snapshot: String,
    /// Name of the new volume.
    pub new_volume: String,
    #[command(flatten)]
    pub out: JsonArg,
}

/// Run a volume subcommand against the API at `api`.
pub async fn run(api: &str, cmd: VolumeCommand) -> anyhow::Result<()> {
    let mut client = ApiClient::connect(api).await?;
    match cmd {
        VolumeCommand::Create(a) => {
            let spec = CreateVolumeSpec {
                name: a.name,
                size_bytes: a.size,
                block_size: a.block_size,
                dedup: a.dedup.map(|d| d == OnOff::On),
                compression: a.compression.map(|c| c.as_str().to_string()),
                replicas: a.replicas,
            };
            let v = client.create_volume(spec).await?;
            if a.out.json {
                return output::print_json(&v);
            }
            println!(
                "Created volume {:?}: {}, block size {}, dedup {}, compression {}, {} replica{}.",
                v.name,
                format_size(v.size_bytes),
                format_size(u64::from(v.block_size)),
                on_off(v.dedup),
                v.compression,
                v.replicas.len(),
                if v.replicas.len() == 1 { "" } else { "s" }
            );
        }
        VolumeCommand::List(a) => {
            let vols = client.list_volumes().await?;
            if a.out.json {
                return output::print_json(&vols);
            }
            print!("{}", list_table(&vols));
        }
        VolumeCommand::Info(a) => {
            let v = client.get_volume(&a.name).await?;
            if a.out.json {
                return output::print_json(&v);
            }
            print!("{}", info_text(&v));
        }
        VolumeCommand::Delete(a) => {
            client.delete_volume(&a.name).await?;
            println!("Deleted {:?}.", a.name);
        }
        VolumeCommand::Resize(a) => {
            let v = client.resize_volume(&a.name, a.size).await?;
            if a.out.json {
                return output::print_json(&v);
            }
            println!(
                "Resized volume {:?} to {} ({} bytes).",
                v.name,
                format_size(v.size_bytes),
                v.size_bytes
            );
        }
        VolumeCommand::Snapshot(a) => {
            let v = client.snapshot(&a.volume, &a.snapshot).await?;
            if a.out.json {
                return output::print_json(&v);
            }
            println!(
                "Created snapshot {:?} of volume {:?} ({}).",
                v.name,
                a.volume,
                format_size(v.size_bytes)
            );
        }
        VolumeCommand::Clone(a) => {
            let v = client.clone_snapshot(&a.snapshot, &a.new_volume).await?;
            if a.out.json {
                return output::print_json(&v);
            }
            println!(
                "Created volume {:?} from snapshot {:?} ({}).",
                v.name,
                a.snapshot,
                format_size(v.size_bytes)
            );
        }
    }
    Ok(())
}

fn kind(v: &Volume) -> &'static str {
    if v.read_only {
        "snapshot"
    } else {
        "volume"
    }
}

fn replica_summary(v: &Volume) -> String {
    let healthy = v.replicas.iter().filter(|r| r.state == "healthy").count();
    format!("{healthy}/{}", v.replicas.len())
}

/// The `volume list` table.
pub fn list_table(vols: &[Volume]) -> String {
    if vols.is_empty() {
        return "No volumes.\n".to_string();
    }
    let mut t = Table::new(&[
        ("NAME", Align::Left),
        ("TYPE", Align::Left),
        ("SIZE", Align::Right),
        ("MAPPED", Align::Right),
        ("BLOCK", Align::Right),
        ("DEDUP", Align::Left),
        ("COMPRESSION", Align::Left),
        ("REPLICAS", Align::Right),
        ("PARENT", Align::Left),
    ]);
    for v in vols {
        t.row(vec![
            v.name.clone(),
            kind(v).to_string(),
            format_size(v.size_bytes),
            format_size(v.mapped_bytes),
            format_size(u64::from(v.block_size)),
            on_off(v.dedup).to_string(),
            v.compression.clone(),
            replica_summary(v),
            v.parent_snapshot.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    t.render()
}

/// The `volume info` text.
pub fn info_text(v: &Volume) -> String {
    let mapped_pct = if v.size_bytes == 0 {
        0.0
    } else {
        v.mapped_bytes as f64 * 100.0 / v.size_bytes as f64
    };
    let mut out = key_values(&[
        ("Name", v.name.clone()),
        ("Type", kind(v).to_string()),
        (
            "Size",
            format!("{} ({} bytes)", format_size(v.size_bytes), v.size_bytes),
        ),
        ("Block size", format_size(u64::from(v.block_size))),
        (
            "Mapped",
            format!("{} ({mapped_pct:.1}%)", format_size(v.mapped_bytes)),
        ),
        ("Dedup", on_off(v.dedup).to_string()),
        ("Compression", v.compression.clone()),
        ("Read-only", yes_no(v.read_only).to_string()),
        (
            "Parent",
            v.parent_snapshot.clone().unwrap_or_else(|| "-".into()),
        ),
        ("Generation", v.generation.to_string()),
        ("Created", format_unix(v.created_unix)),
        ("Replicas", replica_summary(v)),
    ]);
    if !v.replicas.is_empty() {
        let mut t = Table::new(&[("NODE", Align::Left), ("STATE", Align::Left)]);
        for r in &v.replicas {
            t.row(vec![r.node.clone(), r.state.clone()]);
        }
        out.push_str(&output::indent(&t.render(), 2));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Replica;

    fn vol() -> Volume {
        Volume {
            name: "db1".into(),
            size_bytes: 1 << 30,
            block_size: 4096,
            mapped_bytes: 256 << 20,
            dedup: true,
            compression: "lz4".into(),
            read_only: false,
            parent_snapshot: None,
            replicas: vec![Replica {
                node: "n1".into(),
                state: "healthy".into(),
            }],
            generation: 3,
            created_unix: 1_700_000_000,
        }
    }

    #[test]
    fn list_renders_aligned() {
        let mut snap = vol();
        snap.name = "db1-snap".into();
        snap.read_only = true;
        let text = list_table(&[vol(), snap]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NAME      TYPE"), "{text}");
        assert!(lines[1].contains("1.0 GiB"), "{text}");
        assert!(lines[1].contains("256.0 MiB"), "{text}");
        assert!(lines[2].contains("snapshot"), "{text}");
        assert_eq!(list_table(&[]), "No volumes.\n");
    }

    #[test]
    fn info_renders_fields() {
        let text = info_text(&vol());
        assert!(
            text.contains("Size:         1.0 GiB (1073741824 bytes)"),
            "{text}"
        );
        assert!(text.contains("Mapped:       256.0 MiB (25.0%)"), "{text}");
        assert!(
            text.contains("Created:      2023-11-14 22:13:20 UTC"),
            "{text}"
        );
        assert!(text.contains("  n1    healthy"), "{text}");
    }
}
