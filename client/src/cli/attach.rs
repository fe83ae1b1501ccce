//! `ballast attach`, `ballast detach` and the hidden `ballast __fuse-serve`
//! and `ballast __kernel-watch`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::output::{self, Align, Table};
use super::JsonArg;
use crate::attach::watcher::WatchRequest;
use crate::attach::{self, AttachOptions, Attachment, ServeRequest};

pub const ATTACH_ABOUT: &str =
    "Attach a volume to this host as a block device (kernel nbd) or a file (FUSE)";

pub const ATTACH_LONG: &str = "\
Attach a volume to this host.

Without --fuse the kernel's nbd driver is used: the NBD connections are negotiated here (simple \
replies, no structured replies or extended headers) and handed to the driver over generic \
netlink; the command prints /dev/nbdN and exits while the device stays attached. Where the nbd \
module is missing, --fuse DIR mounts a FUSE file system at DIR holding one file, DIR/VOLUME, \
served in the background by ballast itself; it can back a loop device (losetup). The command \
prints the file's path and exits once the mount is ready.

Several connections are used only when ballastd offers multi-conn. Both kinds reconnect by \
themselves when ballastd restarts: the FUSE server redials, and a kernel device gets a background \
watcher that hands it fresh connections (the device waits --dead-conn-timeout seconds for them \
before failing I/O); `ballast attach --reconnect DEVICE` does the same by hand. See docs/attach.md.";

pub const ATTACH_AFTER: &str = "\
Examples:
  ballast attach db1                       # -> /dev/nbd0
  ballast attach db1 --fuse /mnt/ballast   # -> /mnt/ballast/db1
  losetup --find --show /mnt/ballast/db1   # a block device on top of the file
  ballast attach --list --json
  ballast detach db1                       # or: ballast detach /dev/nbd0 | /mnt/ballast
  ballast attach --reconnect /dev/nbd0     # by hand, if the watcher is not running

Attachments are recorded in $BALLAST_STATE_DIR (default /run/ballast/attach).";

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Volume to attach.
    #[arg(required_unless_present_any = ["list", "reconnect"])]
    pub volume: Option<String>,
    /// NBD connections (used only when ballastd offers multi-conn).
    #[arg(long, value_name = "N", default_value_t = attach::DEFAULT_CONNECTIONS as u16,
          value_parser = clap::value_parser!(u16).range(1..=attach::MAX_CONNECTIONS as i64))]
    pub connections: u16,
    /// Kernel path: use this nbd device instead of the first free one.
    #[arg(long, value_name = "/dev/nbdX", conflicts_with = "fuse")]
    pub device: Option<String>,
    /// Attach through FUSE: mount at DIR a file system holding the file DIR/VOLUME.
    #[arg(long, value_name = "DIR")]
    pub fuse: Option<PathBuf>,
    /// NBD server HOST:PORT (default: the address ballastd reports in `node info`).
    #[arg(long, value_name = "HOST:PORT")]
    pub nbd: Option<String>,
    /// Kernel path: seconds before a request that got no reply fails.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
    /// Kernel path: seconds a device with no live connection waits for new ones.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub dead_conn_timeout: u64,
    /// FUSE path: seconds requests wait for ballastd to come back after a lost connection.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub reconnect_timeout: u64,
    /// List current attachments (stale records are removed).
    #[arg(long, conflicts_with_all = ["volume", "fuse", "device", "reconnect"])]
    pub list: bool,
    /// Kernel path: replace the dead connections of DEVICE with new ones.
    #[arg(long, value_name = "DEVICE", conflicts_with_all = ["volume", "fuse", "device"])]
    pub reconnect: Option<String>,
    #[command(flatten)]
    pub out: JsonArg,
}

#[derive(Debug, Args)]
pub struct DetachArgs {
    /// What to detach: /dev/nbdX, a volume name, a FUSE folder or its file.
    pub target: String,
    #[command(flatten)]
    pub out: JsonArg,
}

/// Arguments of the FUSE serving process (started by `attach --fuse`).
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[arg(long)]
    pub volume: String,
    #[arg(long)]
    pub nbd_uri: String,
    #[arg(long)]
    pub mountpoint: PathBuf,
    #[arg(long)]
    pub connections: usize,
    #[arg(long)]
    pub reconnect_timeout: u64,
}

impl ServeArgs {
    pub fn request(&self, api: &str) -> ServeRequest {
        ServeRequest {
            api: api.to_string(),
            volume: self.volume.clone(),
            nbd_uri: self.nbd_uri.clone(),
            mountpoint: self.mountpoint.clone(),
            connections: self.connections,
            reconnect_timeout: Duration::from_secs(self.reconnect_timeout),
        }
    }
}

/// Arguments of the reconnect watcher (started by a kernel attach).
#[derive(Debug, Args)]
pub struct WatchArgs {
    #[arg(long)]
    pub volume: String,
    #[arg(long)]
    pub index: u32,
    #[arg(long)]
    pub nbd_uri: String,
    #[arg(long)]
    pub connections: usize,
    #[arg(long)]
    pub dead_conn_timeout: u64,
}

impl WatchArgs {
    pub fn request(&self) -> WatchRequest {
        WatchRequest {
            volume: self.volume.clone(),
            index: self.index,
            nbd_uri: self.nbd_uri.clone(),
            connections: self.connections,
            dead_conn_timeout: Duration::from_secs(self.dead_conn_timeout),
        }
    }
}

fn print_one(a: &Attachment, json: bool) -> anyhow::Result<()> {
    if json {
        output::print_json(a)
    } else {
        println!("{}", a.device);
        Ok(())
    }
}

/// The `attach --list` table.
pub fn list_text(items: &[Attachment]) -> String {
    if items.is_empty() {
        return "no attachments\n".into();
    }
    let mut t = Table::new(&[
        ("VOLUME", Align::Left),
        ("KIND", Align::Left),
        ("DEVICE", Align::Left),
        ("MOUNTPOINT", Align::Left),
        ("PID", Align::Right),
        ("NBD URI", Align::Left),
    ]);
    for a in items {
        t.row(vec![
            a.volume.clone(),
            a.kind.as_str().into(),
            a.device.clone(),
            a.mountpoint.clone().unwrap_or_else(|| "-".into()),
            a.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            a.nbd_uri.clone(),
        ]);
    }
    t.render()
}

pub async fn run_attach(api: &str, a: AttachArgs) -> anyhow::Result<()> {
    if a.list {
        let items = attach::list()?;
        if a.out.json {
            return output::print_json(&items);
        }
        print!("{}", list_text(&items));
        return Ok(());
    }
    if let Some(dev) = &a.reconnect {
        let att = attach::reconnect(dev, a.connections as usize).await?;
        return print_one(&att, a.out.json);
    }
    let volume = a
        .volume
        .clone()
        .ok_or_else(|| anyhow::anyhow!("name the volume to attach (or use --list)"))?;
    let mut opts = AttachOptions::new(api, &volume);
    opts.connections = a.connections as usize;
    opts.device = a.device;
    opts.fuse = a.fuse;
    opts.nbd = a.nbd;
    opts.request_timeout = Duration::from_secs(a.timeout);
    opts.dead_conn_timeout = Duration::from_secs(a.dead_conn_timeout);
    opts.reconnect_timeout = Duration::from_secs(a.reconnect_timeout);
    let att = attach::attach(&opts).await?;
    print_one(&att, a.out.json)
}

pub async fn run_detach(d: DetachArgs) -> anyhow::Result<()> {
    let att = attach::detach(&d.target).await?;
    if d.out.json {
        return output::print_json(&att);
    }
    println!("detached {} ({})", att.device, att.volume);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::AttachKind;

    #[test]
    fn list_table() {
        let items = vec![Attachment {
            volume: "v1".into(),
            kind: AttachKind::Fuse,
            device: "/mnt/b/v1".into(),
            mountpoint: Some("/mnt/b".into()),
            pid: Some(77),
            nbd_uri: "nbd://127.0.0.1:10809/v1".into(),
        }];
        let t = list_text(&items);
        assert!(t.starts_with("VOLUME"), "{t}");
        assert!(t.contains("fuse"), "{t}");
        assert!(t.contains("/mnt/b/v1"), "{t}");
        assert!(t.contains("77"), "{t}");
        assert_eq!(list_text(&[]), "no attachments\n");
    }
}
