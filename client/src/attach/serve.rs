//! The background process of a FUSE attachment (`ballast __fuse-serve`,
//! started by `ballast attach --fuse`): connect, mount, record the
//! attachment, serve until unmounted (or SIGTERM/SIGINT, which unmount),
//! flush, disconnect, remove the record, exit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, Session, SessionACL};
use tokio::runtime::Handle;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use super::fuse_fs::VolumeFs;
use super::pool::{Pool, PoolConfig};
use super::reconnect::ReconnectPolicy;
use super::registry::{Record, Registry};
use super::{AttachError, AttachKind, Attachment};
use crate::nbd::{ConnectOptions, NbdUri};

/// FUSE threads reading requests from the kernel; the work itself runs on
/// tokio tasks.
const FUSE_THREADS: usize = 2;

/// Everything the serving process is told on its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeRequest {
    /// ballastd's API (recorded only).
    pub api: String,
    /// Volume name: the file's name.
    pub volume: String,
    /// The export.
    pub nbd_uri: String,
    /// Mount point.
    pub mountpoint: PathBuf,
    /// Connections wanted.
    pub connections: usize,
    /// Reconnect window.
    pub reconnect_timeout: Duration,
}

pub(super) fn log_init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BALLAST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
}

/// `umount(2)` of `dir`.
pub fn umount(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Run the serving process; returns when the file system is unmounted and
/// the final flush is done.
pub async fn serve(req: ServeRequest) -> Result<(), AttachError> {
    log_init();
    let reg = Registry::from_env();
    let uri = NbdUri::parse(&req.nbd_uri).map_err(|source| AttachError::Nbd {
        uri: req.nbd_uri.clone(),
        source,
    })?;
    let pool = Pool::connect(PoolConfig {
        uri: uri.clone(),
        connections: req.connections,
        policy: ReconnectPolicy::with_window(req.reconnect_timeout),
        options: ConnectOptions::default(),
    })
    .await
    .map_err(|source| AttachError::Nbd {
        uri: req.nbd_uri.clone(),
        source,
    })?;
    let pool = Arc::new(pool);
    tracing::info!(
        volume = %req.volume,
        uri = %uri,
        size = pool.size(),
        connections = pool.connections(),
        "connected"
    );
    let read_only = pool.flags().read_only();
    let fs = VolumeFs::new(&req.volume, pool.clone(), Handle::current());
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let config = {
        let mut c = Config::default();
        c.mount_options = vec![
            MountOption::FSName(format!("ballast:{}", req.volume)),
            MountOption::Subtype("ballast".into()),
            MountOption::NoSuid,
            MountOption::NoDev,
            MountOption::NoAtime,
            if read_only {
                MountOption::RO
            } else {
                MountOption::RW
            },
        ];
        // Root may let every user (and the kernel threads of a loop device
        // acting for them) in; others get the FUSE default, owner only.
        c.acl = if root {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        c.n_threads = Some(FUSE_THREADS);
        c.clone_fd = true;
        c
    };

    // fuser's session loop blocks: it gets its own thread. Session::new
    // returns once the kernel's INIT has been answered, i.e. the mount is
    // usable.
    let (ready_tx, ready_rx) = oneshot::channel::<std::io::Result<()>>();
    let (done_tx, done_rx) = oneshot::channel::<std::io::Result<()>>();
    let mountpoint = req.mountpoint.clone();
    std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || match Session::new(fs, &mountpoint, &config) {
            Ok(session) => {
                let _ = ready_tx.send(Ok(()));
                let _ = done_tx.send(session.run());
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })
        .map_err(|e| AttachError::Mount {
            dir: req.mountpoint.clone(),
            detail: format!("cannot start the FUSE thread: {e}"),
        })?;
    let mounted = ready_rx.await.unwrap_or_else(|_| {
        Err(std::io::Error::other(
            "the FUSE thread ended during the mount",
        ))
    });
    if let Err(e) = mounted {
        let _ = pool.close().await;
        return Err(AttachError::Mount {
            dir: req.mountpoint.clone(),
            detail: e.to_string(),
        });
    }

    let device = req.mountpoint.join(&req.volume);
    let mut record = Record {
        attachment: Attachment {
            volume: req.volume.clone(),
            kind: AttachKind::Fuse,
            device: device.display().to_string(),
            mountpoint: Some(req.mountpoint.display().to_string()),
            pid: Some(std::process::id()),
            nbd_uri: uri.to_string(),
        },
        api: req.api.clone(),
        log: Some(reg.log_path(&req.volume)),
        failure: None,
    };
    if let Err(e) = reg.save(&record) {
        // Without a record nobody can find or detach us: give up cleanly.
        tracing::error!(error = %e, "cannot record the attachment; unmounting");
        let _ = umount(&req.mountpoint);
        let _ = done_rx.await;
        let _ = pool.close().await;
        return Err(e);
    }
    tracing::info!(device = %device.display(), "mounted");

    let mut term = signal(SignalKind::terminate()).map_err(AttachError::Io)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AttachError::Io)?;
    let mut hup = signal(SignalKind::hangup()).map_err(AttachError::Io)?;
    tokio::pin!(done_rx);
    let session_result = loop {
        tokio::select! {
            r = &mut done_rx => break r.unwrap_or_else(|_| Err(std::io::Error::other("the FUSE thread died"))),
            _ = term.recv() => stop_requested(&req.mountpoint, "SIGTERM"),
            _ = int.recv() => stop_requested(&req.mountpoint, "SIGINT"),
            // The attach command's terminal may go away: not a reason to stop.
            _ = hup.recv() => tracing::info!("SIGHUP ignored"),
        }
    };
    if let Err(e) = &session_result {
        tracing::warn!(error = %e, "the FUSE session ended with an error");
    }
    tracing::info!("unmounted; flushing");
    match pool.close().await {
        Ok(()) => {
            tracing::info!("final flush done; exiting");
            reg.remove(&req.volume)?;
            Ok(())
        }
        Err(e) => {
            let msg = format!("final flush after unmount failed: {e}");
            tracing::error!("{msg}");
            record.failure = Some(msg.clone());
            record.attachment.pid = None;
            let _ = reg.save(&record);
            Err(AttachError::FinalFlush {
                volume: req.volume.clone(),
                detail: e.to_string(),
            })
        }
    }
}

fn stop_requested(dir: &std::path::Path, what: &str) {
    tracing::info!("{what}: unmounting {}", dir.display());
    if let Err(e) = umount(dir) {
        // Refusing to die while mounted keeps a loop device or a process
        // using the file from losing its storage.
        tracing::warn!(
            error = %e,
            "cannot unmount {}: still serving; stop what uses the file (losetup -d, umount) and \
             run `ballast detach {}`",
            dir.display(),
            dir.display()
        );
    }
}
