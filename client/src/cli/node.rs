//! `ballast node ...`

use clap::{Args, Subcommand};

use super::output::{self, key_values, Align, Table};
use super::size::{format_ratio, format_size};
use super::JsonArg;
use crate::api::{ApiClient, NodeInfo};

/// Node subcommands.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Show node identity, capacity, dedup/compression ratios and disks.
    #[command(after_help = "Example:\n  ballast node info --json")]
    Info(NodeInfoArgs),
}

#[derive(Debug, Args)]
pub struct NodeInfoArgs {
    #[command(flatten)]
    pub out: JsonArg,
}

/// Run a node subcommand against the API at `api`.
pub async fn run(api: &str, cmd: NodeCommand) -> anyhow::Result<()> {
    let mut client = ApiClient::connect(api).await?;
    match cmd {
        NodeCommand::Info(a) => {
            let info = client.node_info().await?;
            if a.out.json {
                return output::print_json(&info);
            }
            print!("{}", info_text(&info));
        }
    }
    Ok(())
}

fn pct(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / whole as f64)
    }
}

/// The `node info` text.
pub fn info_text(n: &NodeInfo) -> String {
    let mut out = key_values(&[
        ("Node", n.node_id.clone()),
        ("Version", n.version.clone()),
        ("IO backend", n.io_backend.clone()),
        (
            "NBD address",
            if n.nbd_address.is_empty() {
                "-".into()
            } else {
                n.nbd_address.clone()
            },
        ),
        ("Capacity", format_size(n.capacity_bytes)),
        (
            "Used",
            format!(
                "{} ({})",
                format_size(n.used_bytes),
                pct(n.used_bytes, n.capacity_bytes)
            ),
        ),
        ("Logical", format_size(n.logical_bytes)),
        ("Unique", format_size(n.unique_bytes)),
        ("Stored", format_size(n.stored_bytes)),
        ("Dedup ratio", format_ratio(n.dedup_ratio)),
        ("Compression ratio", format_ratio(n.compression_ratio)),
        ("Checksum errors", n.checksum_errors.to_string()),
        ("Disks", n.disks.len().to_string()),
    ]);
    if !n.disks.is_empty() {
        let mut t = Table::new(&[
            ("PATH", Align::Left),
            ("DISK ID", Align::Left),
            ("CAPACITY", Align::Right),
            ("USED", Align::Right),
        ]);
        for d in &n.disks {
            t.row(vec![
                d.path.clone(),
                d.disk_id.clone(),
                format_size(d.capacity_bytes),
                format_size(d.used_bytes),
            ]);
        }
        out.push_str(&output::indent(&t.render(), 2));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Disk;

    #[test]
    fn renders_ratios_and_disks() {
        let n = NodeInfo {
            node_id: "n1".into(),
            version: "0.1.0".into(),
            io_backend: "io_uring".into(),
            capacity_bytes: 1 << 40,
            used_bytes: 1 << 38,
            logical_bytes: 3 << 30,
            unique_bytes: 1 << 30,
            stored_bytes: 512 << 20,
            dedup_ratio: 2.3125,
            compression_ratio: 2.0,
            checksum_errors: 0,
            disks: vec![Disk {
                path: "/dev/nvme0n1".into(),
                disk_id: "d0".into(),
                capacity_bytes: 1 << 40,
                used_bytes: 1 << 38,
            }],
            nbd_address: "127.0.0.1:10809".into(),
        };
        let text = info_text(&n);
        assert!(
            text.contains("Used:               256.0 GiB (25.0%)"),
            "{text}"
        );
        assert!(text.contains("Dedup ratio:        2.31x"), "{text}");
        assert!(text.contains("Compression ratio:  2.00x"), "{text}");
        assert!(text.contains("/dev/nvme0n1  d0"), "{text}");
    }
}
