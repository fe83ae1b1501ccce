//! The command side of FUSE attachments: start the serving process in the
//! background and wait for its mount; unmount and wait for it to finish.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::registry::{Record, Registry, STATE_DIR_ENV};
use super::serve::{umount, ServeRequest};
use super::AttachError;

/// The hidden subcommand that runs [`super::serve::serve`].
pub const SERVE_COMMAND: &str = "__fuse-serve";
/// How long `attach` waits for the mount.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `detach` waits for the final flush and exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

/// The serving process's arguments after the program name.
pub fn serve_args(req: &ServeRequest) -> Vec<String> {
    vec![
        "--api".into(),
        req.api.clone(),
        SERVE_COMMAND.into(),
        "--volume".into(),
        req.volume.clone(),
        "--nbd-uri".into(),
        req.nbd_uri.clone(),
        "--mountpoint".into(),
        req.mountpoint.display().to_string(),
        "--connections".into(),
        req.connections.to_string(),
        "--reconnect-timeout".into(),
        req.reconnect_timeout.as_secs().to_string(),
    ]
}

/// The last `lines` lines of the log at `path`, joined with ` | `.
pub(super) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// Start `ballast ARGS` in the background: its own session (so it outlives
/// the shell that ran `ballast attach`), stdin closed, stdout and stderr
/// appended to the log of `volume` in the state directory. Returns the
/// child and the log's path.
pub(super) fn spawn_background(
    reg: &Registry,
    volume: &str,
    args: &[String],
) -> Result<(Child, PathBuf), AttachError> {
    reg.ensure()?;
    let log_path = reg.log_path(volume);
    let state = |source| AttachError::State {
        path: log_path.clone(),
        source,
    };
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(state)?;
    let exe = std::env::current_exe().map_err(AttachError::Io)?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env(STATE_DIR_ENV, reg.dir())
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(state)?)
        .stderr(log);
    // SAFETY: setsid() is async-signal-safe and touches no memory of ours;
    // it detaches the child from our terminal and process group.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(AttachError::Io)?;
    Ok((child, log_path))
}

/// Start the serving process in its own session, logging to the state
/// directory, and wait until it has mounted and recorded the attachment.
pub async fn start(reg: &Registry, req: &ServeRequest) -> Result<Record, AttachError> {
    let (mut child, log_path) = spawn_background(reg, &req.volume, &serve_args(req))?;
    let pid = child.id();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(rec) = reg.load(&req.volume)? {
            if rec.attachment.pid == Some(pid) {
                return Ok(rec);
            }
        }
        if let Some(status) = child.try_wait().map_err(AttachError::Io)? {
            return Err(AttachError::ServerFailed {
                volume: req.volume.clone(),
                detail: format!("{status}: {}", tail(&log_path, 3)),
                log: log_path,
            });
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(AttachError::ServerFailed {
                volume: req.volume.clone(),
                detail: format!(
                    "no mount within {}s: {}",
                    READY_TIMEOUT.as_secs(),
                    tail(&log_path, 3)
                ),
                log: log_path,
            });
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// True when `pid` runs and is a FUSE serving process of ours (a pid may
/// be reused by an unrelated process after ours died).
pub fn server_alive(pid: u32) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => cmdline
            .split(|&b| b == 0)
            .any(|arg| arg == SERVE_COMMAND.as_bytes()),
        Err(_) => false,
    }
}

/// True when `dir` is a mount point of a ballast FUSE file system.
pub fn is_mounted(dir: &Path) -> bool {
    crate::mountinfo::read().is_ok_and(|mounts| {
        mounts
            .iter()
            .any(|m| m.mountpoint == dir && m.fstype.starts_with("fuse"))
    })
}

/// How long an unmount keeps retrying while the file is busy: a loop device
/// released just before (`losetup -d` after unmounting its filesystem, as
/// the Docker plugin does) lets go of its backing file asynchronously, a
/// few milliseconds later; the plugin's detach raced with that.
const BUSY_GRACE: Duration = Duration::from_secs(3);

/// `umount`, retried while it fails with EBUSY for up to [`BUSY_GRACE`].
async fn umount_when_released(dir: &Path) -> std::io::Result<()> {
    let deadline = Instant::now() + BUSY_GRACE;
    loop {
        match umount(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r => return r,
        }
    }
}

/// Unmount a FUSE attachment and wait for its server's final flush.
pub async fn stop(reg: &Registry, rec: &Record) -> Result<(), AttachError> {
    let a = &rec.attachment;
    let dir = Path::new(a.mountpoint.as_deref().unwrap_or(""));
    let pid = a.pid.filter(|&p| server_alive(p));
    if pid.is_none() {
        // The server is gone (crashed or killed): clear what it left.
        if is_mounted(dir) {
            lazy_umount(dir);
        }
        reg.remove(&a.volume)?;
        return match &rec.failure {
            Some(f) => Err(AttachError::FinalFlush {
                volume: a.volume.clone(),
                detail: f.clone(),
            }),
            None => Err(AttachError::ServerGone {
                volume: a.volume.clone(),
                log: rec.log.clone(),
            }),
        };
    }
    match umount_when_released(dir).await {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            return Err(AttachError::Busy {
                path: a.device.clone(),
                detail: format!(
                    "{} is still in use (a loop device — see `losetup -j {}` — or an open file); \
                     release it, then detach again",
                    a.device, a.device
                ),
            })
        }
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            // Not root: the setuid helper may unmount our own FUSE mount.
            let out = Command::new("fusermount3")
                .arg("-u")
                .arg(dir)
                .output()
                .map_err(AttachError::Io)?;
            if !out.status.success() {
                return Err(AttachError::Busy {
                    path: dir.display().to_string(),
                    detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // Not mounted (any more): make the server finish.
            if let Some(p) = pid {
                // SAFETY: kill(2) on a pid checked to be our serving process.
                unsafe { libc::kill(p as i32, libc::SIGTERM) };
            }
        }
        Err(e) => {
            return Err(AttachError::Busy {
                path: dir.display().to_string(),
                detail: format!("unmount failed: {e}"),
            })
        }
    }
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while pid.is_some_and(server_alive) {
        if Instant::now() > deadline {
            return Err(AttachError::ServerFailed {
                volume: a.volume.clone(),
                detail: format!(
                    "unmounted, but the server (pid {}) did not finish its final flush within {}s",
                    pid.unwrap_or(0),
                    EXIT_TIMEOUT.as_secs()
                ),
                log: rec.log.clone().unwrap_or_default(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The server removes its record after a good flush and leaves a failure
    // note after a bad one.
    match reg.load(&a.volume)? {
        Some(r) if r.failure.is_some() => {
            reg.remove(&a.volume)?;
            Err(AttachError::FinalFlush {
                volume: a.volume.clone(),
                detail: r.failure.unwrap_or_default(),
            })
        }
        Some(_) => {
            reg.remove(&a.volume)?;
            Ok(())
        }
        None => Ok(()),
    }
}

/// Detach a (dead) FUSE mount lazily.
pub fn lazy_umount(dir: &Path) {
    use std::os::unix::ffi::OsStrExt;
    if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) {
        // SAFETY: valid NUL-terminated path; MNT_DETACH only detaches.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_arguments_round_trip_through_the_cli() {
        let req = ServeRequest {
            api: "http://127.0.0.1:7800".into(),
            volume: "v1".into(),
            nbd_uri: "nbd://127.0.0.1:10809/v1".into(),
            mountpoint: "/mnt/b".into(),
            connections: 4,
            reconnect_timeout: Duration::from_secs(60),
        };
        let mut argv = vec!["ballast".to_string()];
        argv.extend(serve_args(&req));
        let cli = crate::cli::Cli::try_parse_from_args(&argv).unwrap();
        assert_eq!(cli.serve_request(), Some(req));
    }
}
