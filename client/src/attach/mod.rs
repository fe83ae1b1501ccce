//! Attaching volumes to this host: `ballast attach` / `detach` / `attach --list`.
//!
//! Two ways to attach, one contract (see docs/attach.md):
//!
//! * **kernel** — the nbd driver's generic netlink interface: this process
//!   negotiates the NBD sockets (no structured replies, no extended headers),
//!   hands them to the kernel with `NBD_CMD_CONNECT` and exits; `/dev/nbdN`
//!   stays. [`netlink`] builds the messages, [`kernel`] runs the flow.
//! * **FUSE** (`--fuse DIR`, where the nbd module is missing) — a background
//!   `ballast` process mounts at DIR a file system with one file, DIR/VOLUME,
//!   served over NBD ([`fuse_fs`], [`serve`]) through reconnecting connections
//!   ([`pool`], [`reconnect`]); [`fuse`] starts and stops it.
//!
//! A kernel device gets a background [`watcher`] that hands it fresh
//! sockets when its connections die (ballastd restarted); [`watch`] is its
//! decision logic.
//!
//! Where ballastd's NBD server is comes from `Node.Info` ([`locate`]); every
//! attachment is recorded as one JSON file in the state directory
//! ([`registry`]), which `--list` reads and checks.

pub mod dial;
pub mod fuse;
pub mod fuse_fs;
pub mod kernel;
pub mod locate;
pub mod netlink;
pub mod pool;
pub mod reconnect;
pub mod registry;
pub mod serve;
pub mod watch;
pub mod watcher;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::api::{ApiClient, ApiError};
use crate::nbd::{NbdError, NbdUri};
use registry::{Record, Registry};
pub use serve::ServeRequest;

/// Kernel device or FUSE file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachKind {
    /// `/dev/nbdN` through the kernel's nbd driver.
    Kernel,
    /// A file in a FUSE mount served by a `ballast` process.
    Fuse,
}

impl AttachKind {
    /// `kernel` or `fuse`.
    pub fn as_str(self) -> &'static str {
        match self {
            AttachKind::Kernel => "kernel",
            AttachKind::Fuse => "fuse",
        }
    }
}

/// One attachment, as `ballast attach --json` and `--list --json` print it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Volume name.
    pub volume: String,
    /// How it is attached.
    pub kind: AttachKind,
    /// `/dev/nbdN`, or the file `DIR/VOLUME`.
    pub device: String,
    /// FUSE mount point; `None` for kernel attachments.
    pub mountpoint: Option<String>,
    /// Serving process (FUSE) or reconnect watcher (kernel); `None` when a
    /// kernel device has no running watcher.
    pub pid: Option<u32>,
    /// `nbd://HOST:PORT/VOLUME`.
    pub nbd_uri: String,
}

/// Why attaching, detaching or listing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttachError {
    /// The control API failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The volume is not on the node.
    #[error(
        "volume {volume:?} does not exist on ballastd at {api}; see `ballast volume list`, \
         or create it with `ballast volume create {volume} --size SIZE`"
    )]
    NoSuchVolume {
        /// Volume name.
        volume: String,
        /// API URL.
        api: String,
    },
    /// The NBD server's address could not be worked out.
    #[error("cannot tell where ballastd serves NBD: {0}")]
    NbdAddress(String),
    /// NBD connection or negotiation failed.
    #[error("cannot attach over NBD ({uri}): {source}")]
    Nbd {
        /// The export.
        uri: String,
        /// What failed.
        #[source]
        source: NbdError,
    },
    /// The kernel's nbd driver is not there.
    #[error(
        "the kernel nbd driver is not available ({detail}); load it with `modprobe nbd`, \
         or attach through FUSE instead: ballast attach {volume} --fuse DIR"
    )]
    NoKernelNbd {
        /// Volume name.
        volume: String,
        /// What was found missing.
        detail: String,
    },
    /// A netlink request to the nbd driver failed.
    #[error("{op} failed: {detail}")]
    Netlink {
        /// The request.
        op: &'static str,
        /// Why.
        detail: String,
    },
    /// The volume is attached already.
    #[error("volume {volume:?} is already attached as {device}; detach it first: ballast detach {device}")]
    AlreadyAttached {
        /// Volume name.
        volume: String,
        /// Its device or file.
        device: String,
    },
    /// `detach` target not found.
    #[error("nothing is attached as {0:?}; `ballast attach --list` shows what is")]
    NotAttached(String),
    /// The state directory is unusable.
    #[error("attachment state {}: {source} (set BALLAST_STATE_DIR to a writable folder)", path.display())]
    State {
        /// File or folder.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The FUSE mount failed.
    #[error("cannot mount the FUSE file system at {}: {detail}", dir.display())]
    Mount {
        /// Mount point.
        dir: PathBuf,
        /// Why.
        detail: String,
    },
    /// The mount point is not usable.
    #[error("--fuse {}: {detail}", dir.display())]
    BadMountpoint {
        /// The folder given.
        dir: PathBuf,
        /// Why.
        detail: String,
    },
    /// The FUSE serving process failed.
    #[error("the FUSE server of {volume} failed ({detail}); its log is {}", log.display())]
    ServerFailed {
        /// Volume name.
        volume: String,
        /// What happened.
        detail: String,
        /// Its log file.
        log: PathBuf,
    },
    /// The FUSE serving process had already gone.
    #[error(
        "the FUSE server of {volume} had already exited (crashed or killed){}; its record was removed",
        log.as_ref().map(|l| format!(", see {}", l.display())).unwrap_or_default()
    )]
    ServerGone {
        /// Volume name.
        volume: String,
        /// Its log file.
        log: Option<PathBuf>,
    },
    /// The final flush of a FUSE attachment failed.
    #[error("the last writes to {volume} may not be durable: {detail}; check the volume's data")]
    FinalFlush {
        /// Volume name.
        volume: String,
        /// Why.
        detail: String,
    },
    /// Something still uses the attachment.
    #[error("cannot detach {path}: {detail}")]
    Busy {
        /// Device, file or folder.
        path: String,
        /// Why and what to do.
        detail: String,
    },
    /// The reconnect watcher of a kernel device did not start.
    #[error("the reconnect watcher of {volume} did not start ({detail}); its log is {}", log.display())]
    WatcherFailed {
        /// Volume name.
        volume: String,
        /// What happened.
        detail: String,
        /// Its log file.
        log: PathBuf,
    },
    /// Other I/O failure.
    #[error("I/O error: {0}")]
    Io(#[source] std::io::Error),
}

/// Default connections when the server offers multi-conn.
pub const DEFAULT_CONNECTIONS: usize = 4;
/// Most connections accepted.
pub const MAX_CONNECTIONS: usize = 16;

/// What to attach, and how.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// ballastd's control API URL.
    pub api: String,
    /// Volume name.
    pub volume: String,
    /// Connections (used only when the server offers CAN_MULTI_CONN).
    pub connections: usize,
    /// Kernel path: `/dev/nbdN` to use.
    pub device: Option<String>,
    /// FUSE path: the mount point.
    pub fuse: Option<PathBuf>,
    /// `HOST:PORT` of the NBD server, instead of what `Node.Info` reports.
    pub nbd: Option<String>,
    /// Kernel path: per-request timeout.
    pub request_timeout: Duration,
    /// Kernel path: how long a device with no live connection waits for
    /// new sockets (from the watcher or `--reconnect`) before failing its I/O.
    pub dead_conn_timeout: Duration,
    /// FUSE path: how long requests wait for ballastd to come back.
    pub reconnect_timeout: Duration,
}

impl AttachOptions {
    /// Options with the defaults for `volume` at `api`.
    pub fn new(api: &str, volume: &str) -> AttachOptions {
        AttachOptions {
            api: api.to_string(),
            volume: volume.to_string(),
            connections: DEFAULT_CONNECTIONS,
            device: None,
            fuse: None,
            nbd: None,
            request_timeout: Duration::from_secs(30),
            dead_conn_timeout: Duration::from_secs(120),
            reconnect_timeout: Duration::from_secs(60),
        }
    }
}

/// Is the attachment of `rec` still there?
fn live(rec: &Record) -> bool {
    let a = &rec.attachment;
    match a.kind {
        AttachKind::Fuse => a.pid.is_some_and(fuse::server_alive),
        AttachKind::Kernel => {
            let Some(index) = kernel::parse_device(&a.device) else {
                return false;
            };
            match kernel::connected(index) {
                Some(c) => c,
                // No netlink answer: trust sysfs (a disconnected device
                // with DESTROY_ON_DISCONNECT is gone or has size 0).
                None => std::fs::read_to_string(format!("/sys/block/nbd{index}/size"))
                    .is_ok_and(|s| s.trim() != "0"),
            }
        }
    }
}

async fn volume_uri(
    opts: &AttachOptions,
    api: &mut ApiClient,
) -> Result<(NbdUri, u32), AttachError> {
    let vol = match api.get_volume(&opts.volume).await {
        Ok(v) => v,
        Err(e) if e.code() == Some(tonic::Code::NotFound) => {
            return Err(AttachError::NoSuchVolume {
                volume: opts.volume.clone(),
                api: api.url().to_string(),
            })
        }
        Err(e) => return Err(e.into()),
    };
    let host_port = match &opts.nbd {
        Some(a) => a.clone(),
        None => {
            let info = api.node_info().await?;
            locate::nbd_host_port(&opts.api, &info.nbd_address)?
        }
    };
    let text = locate::volume_uri(&host_port, &opts.volume);
    let uri = NbdUri::parse(&text).map_err(|source| AttachError::Nbd {
        uri: text.clone(),
        source,
    })?;
    Ok((uri, vol.block_size))
}

/// Attach a volume; returns once the device or file is usable.
pub async fn attach(opts: &AttachOptions) -> Result<Attachment, AttachError> {
    let reg = Registry::from_env();
    if let Some(rec) = reg.load(&opts.volume)? {
        if live(&rec) {
            return Err(AttachError::AlreadyAttached {
                volume: opts.volume.clone(),
                device: rec.attachment.device,
            });
        }
        reg.remove(&opts.volume)?;
    }
    let mut api = ApiClient::connect(&opts.api).await?;
    let (uri, block_size) = volume_uri(opts, &mut api).await?;
    let connections = opts.connections.clamp(1, MAX_CONNECTIONS);
    match &opts.fuse {
        Some(dir) => {
            let dir = prepare_mountpoint(dir)?;
            let req = ServeRequest {
                api: api.url().to_string(),
                volume: opts.volume.clone(),
                nbd_uri: uri.to_string(),
                mountpoint: dir,
                connections,
                reconnect_timeout: opts.reconnect_timeout,
            };
            Ok(fuse::start(&reg, &req).await?.attachment)
        }
        None => {
            let index = match &opts.device {
                Some(d) => Some(kernel::parse_device(d).ok_or_else(|| AttachError::Netlink {
                    op: "--device",
                    detail: format!("{d:?} is not an nbd device; use /dev/nbdN"),
                })?),
                None => None,
            };
            let index = kernel::attach(&kernel::KernelRequest {
                volume: opts.volume.clone(),
                uri: uri.clone(),
                connections,
                index,
                block_size: block_size as u64,
                timeout: opts.request_timeout,
                dead_conn_timeout: opts.dead_conn_timeout,
            })
            .await?;
            let rec = Record {
                attachment: Attachment {
                    volume: opts.volume.clone(),
                    kind: AttachKind::Kernel,
                    device: kernel::device_path(index),
                    mountpoint: None,
                    pid: None,
                    nbd_uri: uri.to_string(),
                },
                api: api.url().to_string(),
                log: Some(reg.log_path(&opts.volume)),
                failure: None,
            };
            if let Err(e) = reg.save(&rec) {
                // Do not leave a device nobody knows about.
                let _ = kernel::disconnect(&opts.volume, index);
                return Err(e);
            }
            let watch = watcher::WatchRequest {
                volume: opts.volume.clone(),
                index,
                nbd_uri: uri.to_string(),
                connections,
                dead_conn_timeout: opts.dead_conn_timeout,
            };
            match watcher::start(&reg, &watch).await {
                Ok(rec) => Ok(rec.attachment),
                Err(e) => {
                    // The device works; it only lacks automatic reconnects.
                    // Failing the attach would be worse than saying so.
                    eprintln!(
                        "warning: {e}; {} is attached but will not reconnect by itself after a \
                         ballastd restart (use `ballast attach --reconnect {}`)",
                        rec.attachment.device, rec.attachment.device
                    );
                    Ok(rec.attachment)
                }
            }
        }
    }
}

/// The absolute mount point, created if missing; it must be an empty folder
/// that is not a mount point already.
fn prepare_mountpoint(dir: &Path) -> Result<PathBuf, AttachError> {
    let bad = |detail: String| AttachError::BadMountpoint {
        dir: dir.to_path_buf(),
        detail,
    };
    std::fs::create_dir_all(dir).map_err(|e| bad(format!("cannot create the folder: {e}")))?;
    let abs = dir
        .canonicalize()
        .map_err(|e| bad(format!("cannot resolve the path: {e}")))?;
    if !abs.is_dir() {
        return Err(bad("not a folder".into()));
    }
    if fuse::is_mounted(&abs) {
        return Err(bad("something is already mounted there".into()));
    }
    Ok(abs)
}

/// Find the record `target` names: a volume, a device/file path or a mount point.
fn find(reg: &Registry, target: &str) -> Result<Record, AttachError> {
    let records = reg.all()?;
    let canon = |p: &str| Path::new(p).canonicalize().ok();
    let target_canon = canon(target);
    let same = |p: &str| {
        Path::new(p) == Path::new(target)
            || (target_canon.is_some() && canon(p).is_some() && canon(p) == target_canon)
    };
    records
        .into_iter()
        .find(|r| {
            let a = &r.attachment;
            a.volume == target || same(&a.device) || a.mountpoint.as_deref().is_some_and(same)
        })
        .ok_or_else(|| AttachError::NotAttached(target.to_string()))
}

/// Detach what `target` names (device, volume or FUSE folder).
pub async fn detach(target: &str) -> Result<Attachment, AttachError> {
    let reg = Registry::from_env();
    let rec = find(&reg, target)?;
    match rec.attachment.kind {
        AttachKind::Fuse => fuse::stop(&reg, &rec).await?,
        AttachKind::Kernel => {
            let index = kernel::parse_device(&rec.attachment.device)
                .ok_or_else(|| AttachError::NotAttached(rec.attachment.device.clone()))?;
            // First the watcher, so it cannot hand sockets to the device
            // while it disconnects.
            if let Some(pid) = rec.attachment.pid {
                watcher::stop(pid).await;
            }
            match kernel::disconnect(&rec.attachment.volume, index) {
                Ok(()) => {}
                // The device is gone already: nothing left to disconnect.
                Err(AttachError::Netlink { .. }) if !live(&rec) => {}
                Err(e) => return Err(e),
            }
            reg.remove(&rec.attachment.volume)?;
        }
    }
    Ok(rec.attachment)
}

/// Hand fresh connections to a kernel device whose connections died.
pub async fn reconnect(device: &str, connections: usize) -> Result<Attachment, AttachError> {
    let reg = Registry::from_env();
    let rec = find(&reg, device)?;
    let a = rec.attachment;
    if a.kind != AttachKind::Kernel {
        return Err(AttachError::Busy {
            path: a.device,
            detail: "--reconnect is for kernel devices; a FUSE attachment reconnects by itself"
                .into(),
        });
    }
    let index = kernel::parse_device(&a.device)
        .ok_or_else(|| AttachError::NotAttached(a.device.clone()))?;
    let uri = NbdUri::parse(&a.nbd_uri).map_err(|source| AttachError::Nbd {
        uri: a.nbd_uri.clone(),
        source,
    })?;
    kernel::reconnect(index, &uri, connections.clamp(1, MAX_CONNECTIONS)).await?;
    Ok(a)
}

/// Current attachments. Records whose attachment is gone (dead server,
/// missing device) are removed, with a note on stderr.
pub fn list() -> Result<Vec<Attachment>, AttachError> {
    let reg = Registry::from_env();
    let mut out = Vec::new();
    for mut rec in reg.all()? {
        if live(&rec) {
            let a = &rec.attachment;
            if a.kind == AttachKind::Kernel && a.pid.is_some_and(|p| !watcher::alive(p)) {
                eprintln!(
                    "note: the reconnect watcher of {} (pid {}) is not running; {} will not \
                     reconnect by itself (see {}; `ballast attach --reconnect {}` does it by hand)",
                    a.volume,
                    a.pid.unwrap_or(0),
                    a.device,
                    rec.log
                        .as_ref()
                        .map(|l| l.display().to_string())
                        .unwrap_or_else(|| "its log".into()),
                    a.device
                );
                rec.attachment.pid = None;
                reg.save(&rec)?;
            }
            out.push(rec.attachment);
        } else {
            eprintln!(
                "note: removed the stale record of {} ({} {} is gone)",
                rec.attachment.volume,
                rec.attachment.kind.as_str(),
                rec.attachment.device
            );
            if rec.attachment.kind == AttachKind::Fuse {
                if let Some(dir) = &rec.attachment.mountpoint {
                    // A dead FUSE server leaves "transport endpoint is not
                    // connected" behind; detach the corpse.
                    if fuse::is_mounted(Path::new(dir)) {
                        fuse::lazy_umount(Path::new(dir));
                    }
                }
            }
            reg.remove(&rec.attachment.volume)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachment_json_is_the_contract() {
        let a = Attachment {
            volume: "v1".into(),
            kind: AttachKind::Kernel,
            device: "/dev/nbd0".into(),
            mountpoint: None,
            pid: None,
            nbd_uri: "nbd://127.0.0.1:10809/v1".into(),
        };
        let j = serde_json::to_value(&a).unwrap();
        assert_eq!(
            j,
            serde_json::json!({
                "volume": "v1", "kind": "kernel", "device": "/dev/nbd0",
                "mountpoint": null, "pid": null, "nbd_uri": "nbd://127.0.0.1:10809/v1"
            })
        );
    }
}
