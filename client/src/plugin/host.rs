//! The host operations the driver composes: attach/detach a volume,
//! loop devices, probing and making filesystems, mount/unmount.
//!
//! [`Host`] is the seam between the driver's bookkeeping (reference counts,
//! state, rollback) and the machine; [`SystemHost`] runs the real programs,
//! the driver's unit tests use an in-memory fake.
//!
//! Attaching goes through the `ballast` binary itself (`ballast attach
//! --json`, `ballast detach`, `ballast attach --list --json`) rather than a
//! library call: the CLI is the stable contract, and a FUSE attachment is
//! served by a background process that must outlive this request anyway.

use std::future::Future;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::options::Fs;
use super::state::{Attachment, LoopDevice};
use crate::mountinfo::{self, MountEntry};

/// A host operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("`{program}` is not installed: install the {package} package")]
    Missing {
        program: String,
        package: &'static str,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}` did not finish within {secs} s (killed); check ballastd and the device, then retry")]
    Timeout { command: String, secs: u64 },
    #[error("`{command}` printed output the plugin cannot read ({detail}): {stdout}")]
    BadOutput {
        command: String,
        detail: String,
        stdout: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{device} holds a partition table ({pttype}) but no filesystem; the plugin formats only \
         blank volumes: wipe it (wipefs -a) or use another volume"
    )]
    PartitionTable { device: PathBuf, pttype: String },
}

/// What a probe found on a block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No signature at all: safe to format.
    Blank,
    /// A filesystem of this type (`ext4`, `xfs`, ...).
    Filesystem(String),
}

/// Operations on the machine the plugin runs on.
pub trait Host: Send + Sync + 'static {
    /// Fail unless the programs every Mount needs are installed.
    fn preflight(&self) -> Result<(), HostError>;
    /// Fail unless `fs` can be made here (checked at Create).
    fn check_fs(&self, fs: Fs) -> Result<(), HostError>;
    /// Attach `volume` to this host.
    fn attach(&self, volume: &str) -> impl Future<Output = Result<Attachment, HostError>> + Send;
    /// Undo an attachment (`ballast detach TARGET`).
    fn detach(&self, target: &Path) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Current attachments of this host.
    fn attachments(&self) -> impl Future<Output = Result<Vec<Attachment>, HostError>> + Send;
    /// A loop device over `file`.
    fn loop_attach(&self, file: &Path) -> impl Future<Output = Result<PathBuf, HostError>> + Send;
    fn loop_detach(&self, device: &Path) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Loop devices in use and their backing files.
    fn loops(&self) -> Result<Vec<LoopDevice>, HostError>;
    /// What `device` holds.
    fn probe(&self, device: &Path) -> impl Future<Output = Result<Probe, HostError>> + Send;
    fn mkfs(&self, device: &Path, fs: Fs) -> impl Future<Output = Result<(), HostError>> + Send;
    fn mount(
        &self,
        device: &Path,
        dir: &Path,
        fstype: &str,
    ) -> impl Future<Output = Result<(), HostError>> + Send;
    fn unmount(&self, dir: &Path) -> impl Future<Output = Result<(), HostError>> + Send;
    /// The mounts of this host.
    fn mounts(&self) -> Result<Vec<MountEntry>, HostError>;
}

/// How [`SystemHost`] attaches volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// The kernel nbd driver where it is available, FUSE + loop otherwise.
    Auto,
    /// Always the kernel nbd driver.
    Kernel,
    /// Always FUSE + a loop device.
    Fuse,
}

/// The real machine.
#[derive(Debug, Clone)]
pub struct SystemHost {
    /// The `ballast` binary to run `attach`/`detach` with.
    pub ballast: PathBuf,
    /// ballastd's control API, passed to `ballast --api`.
    pub api: String,
    /// Parent of the FUSE attachment directories (`ROOT/NAME`).
    pub attach_root: PathBuf,
    pub mode: AttachMode,
}

/// Time limits of the programs the plugin runs. Docker gives a Mount two
/// minutes in all.
const SHORT: Duration = Duration::from_secs(30);
const ATTACH: Duration = Duration::from_secs(60);
const MKFS: Duration = Duration::from_secs(100);

/// Where a program lives when PATH lacks the sbin directories (systemd and
/// containers often run with a short PATH).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn program(name: &str, package: &'static str) -> Result<PathBuf, HostError> {
    find_program(name).ok_or_else(|| HostError::Missing {
        program: name.to_string(),
        package,
    })
}

fn describe(program: &Path, args: &[&std::ffi::OsStr]) -> String {
    let mut s = program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run a program to completion and return its stdout.
///
/// Output goes to unnamed temporary files, not pipes: `ballast attach
/// --fuse` leaves a serving process behind, and a pipe it inherited would
/// keep a reader waiting for an end of file that never comes.
async fn run(
    program: &Path,
    args: &[&std::ffi::OsStr],
    limit: Duration,
) -> Result<String, HostError> {
    let command = describe(program, args);
    let tmp = |what| {
        tempfile::tempfile().map_err(|source| HostError::Io {
            what,
            path: std::env::temp_dir(),
            source,
        })
    };
    let mut out = tmp("cannot create a temporary file in")?;
    let mut err = tmp("cannot create a temporary file in")?;
    let clone = |f: &std::fs::File| {
        f.try_clone().map_err(|source| HostError::Io {
            what: "cannot duplicate a temporary file in",
            path: std::env::temp_dir(),
            source,
        })
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(clone(&out)?)
        .stderr(clone(&err)?)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| HostError::Io {
            what: "cannot run",
            path: program.to_path_buf(),
            source,
        })?;
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(st)) => st,
        Ok(Err(source)) => {
            return Err(HostError::Io {
                what: "waiting for",
                path: program.to_path_buf(),
                source,
            })
        }
        Err(_) => {
            let _ = child.kill().await;
            return Err(HostError::Timeout {
                command,
                secs: limit.as_secs(),
            });
        }
    };
    let read_all = |f: &mut std::fs::File| {
        let mut s = String::new();
        let _ = f.rewind();
        let _ = f.read_to_string(&mut s);
        s
    };
    let stdout = read_all(&mut out);
    if !status.success() {
        let stderr = read_all(&mut err);
        let stderr = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        return Err(HostError::Failed {
            command,
            status: status.to_string(),
            stderr: if stderr.is_empty() {
                "(no error output)".to_string()
            } else {
                stderr
            },
        });
    }
    Ok(stdout)
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

impl SystemHost {
    /// True when the kernel path should be used.
    pub fn use_kernel(&self) -> bool {
        match self.mode {
            AttachMode::Kernel => true,
            AttachMode::Fuse => false,
            AttachMode::Auto => {
                Path::new("/dev/nbd0").exists() || Path::new("/sys/module/nbd").exists()
            }
        }
    }

    async fn ballast(
        &self,
        args: &[&std::ffi::OsStr],
        limit: Duration,
    ) -> Result<String, HostError> {
        let mut full: Vec<&std::ffi::OsStr> = vec![os("--api"), os(&self.api)];
        full.extend_from_slice(args);
        run(&self.ballast, &full, limit).await
    }
}

/// Parse `blkid -p -o export` output.
pub fn parse_blkid(device: &Path, out: &str) -> Result<Probe, HostError> {
    let mut fstype = None;
    let mut pttype = None;
    for line in out.lines() {
        if let Some(t) = line.strip_prefix("TYPE=") {
            fstype = Some(t.trim().to_string());
        } else if let Some(t) = line.strip_prefix("PTTYPE=") {
            pttype = Some(t.trim().to_string());
        }
    }
    match (fstype, pttype) {
        (Some(t), _) => Ok(Probe::Filesystem(t)),
        (None, Some(pt)) => Err(HostError::PartitionTable {
            device: device.to_path_buf(),
            pttype: pt,
        }),
        // A signature blkid names neither way (e.g. only a UUID): refuse
        // to format rather than guess.
        (None, None) => Err(HostError::BadOutput {
            command: format!("blkid -p -o export {}", device.display()),
            detail: "a signature with neither TYPE nor PTTYPE".into(),
            stdout: out.replace('\n', " "),
        }),
    }
}

impl Host for SystemHost {
    fn preflight(&self) -> Result<(), HostError> {
        program("blkid", "util-linux")?;
        program("mount", "mount")?;
        program("umount", "mount")?;
        program(Fs::Ext4.mkfs_program(), Fs::Ext4.package())?;
        if !self.use_kernel() {
            program("losetup", "mount")?;
            program("fusermount3", "fuse3")?;
        }
        if !self.ballast.is_file() {
            return Err(HostError::Io {
                what: "the ballast binary is missing at",
                path: self.ballast.clone(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        Ok(())
    }

    fn check_fs(&self, fs: Fs) -> Result<(), HostError> {
        program(fs.mkfs_program(), fs.package()).map(|_| ())
    }

    async fn attach(&self, volume: &str) -> Result<Attachment, HostError> {
        let dir = self.attach_root.join(volume);
        let mut args: Vec<&std::ffi::OsStr> = vec![os("attach"), os(volume)];
        if !self.use_kernel() {
            std::fs::create_dir_all(&dir).map_err(|source| HostError::Io {
                what: "cannot create the FUSE attachment directory",
                path: dir.clone(),
                source,
            })?;
            args.push(os("--fuse"));
            args.push(dir.as_os_str());
        }
        args.push(os("--json"));
        let out = self.ballast(&args, ATTACH).await?;
        serde_json::from_str(out.trim()).map_err(|e| HostError::BadOutput {
            command: describe(&self.ballast, &args),
            detail: e.to_string(),
            stdout: out.trim().to_string(),
        })
    }

    async fn detach(&self, target: &Path) -> Result<(), HostError> {
        self.ballast(&[os("detach"), target.as_os_str()], ATTACH)
            .await
            .map(|_| ())
    }

    async fn attachments(&self) -> Result<Vec<Attachment>, HostError> {
        let args = [os("attach"), os("--list"), os("--json")];
        let out = self.ballast(&args, SHORT).await?;
        serde_json::from_str(out.trim()).map_err(|e| HostError::BadOutput {
            command: describe(&self.ballast, &args),
            detail: e.to_string(),
            stdout: out.trim().to_string(),
        })
    }

    async fn loop_attach(&self, file: &Path) -> Result<PathBuf, HostError> {
        let losetup = program("losetup", "mount")?;
        let args = [
            os("--find"),
            os("--show"),
            os("--direct-io=off"),
            file.as_os_str(),
        ];
        let out = run(&losetup, &args, SHORT).await?;
        let dev = out.trim();
        if !dev.starts_with("/dev/") {
            return Err(HostError::BadOutput {
                command: describe(&losetup, &args),
                detail: "expected a device path".into(),
                stdout: dev.to_string(),
            });
        }
        Ok(PathBuf::from(dev))
    }

    async fn loop_detach(&self, device: &Path) -> Result<(), HostError> {
        let losetup = program("losetup", "mount")?;
        run(&losetup, &[os("-d"), device.as_os_str()], SHORT)
            .await
            .map(|_| ())
    }

    fn loops(&self) -> Result<Vec<LoopDevice>, HostError> {
        let sys = Path::new("/sys/block");
        let entries = match std::fs::read_dir(sys) {
            Ok(e) => e,
            Err(source) => {
                return Err(HostError::Io {
                    what: "cannot list",
                    path: sys.to_path_buf(),
                    source,
                })
            }
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                continue;
            }
            // Only bound loop devices have loop/backing_file.
            if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
                out.push(LoopDevice {
                    device: PathBuf::from("/dev").join(&name),
                    backing_file: PathBuf::from(b.trim_end_matches('\n')),
                });
            }
        }
        Ok(out)
    }

    async fn probe(&self, device: &Path) -> Result<Probe, HostError> {
        let blkid = program("blkid", "util-linux")?;
        let args = [os("-p"), os("-o"), os("export"), device.as_os_str()];
        match run(&blkid, &args, SHORT).await {
            Ok(out) => parse_blkid(device, &out),
            // blkid exits 2 when it finds no signature at all.
            Err(HostError::Failed { status, .. }) if status.ends_with("exit status: 2") => {
                Ok(Probe::Blank)
            }
            Err(e) => Err(e),
        }
    }

    async fn mkfs(&self, device: &Path, fs: Fs) -> Result<(), HostError> {
        let mkfs = program(fs.mkfs_program(), fs.package())?;
        // No discard: the volume is thin and blank already, and a discard
        // of the whole device through FUSE and a loop device is slow.
        // Lazy inode-table init: the kernel zeroes them after the mount
        // instead of mkfs doing it before Docker's time limit runs out.
        let args: Vec<&std::ffi::OsStr> = match fs {
            Fs::Ext4 => vec![
                os("-q"),
                os("-F"),
                os("-E"),
                os("nodiscard,lazy_itable_init=1"),
                device.as_os_str(),
            ],
            Fs::Xfs => vec![os("-q"), os("-K"), device.as_os_str()],
        };
        run(&mkfs, &args, MKFS).await.map(|_| ())
    }

    async fn mount(&self, device: &Path, dir: &Path, fstype: &str) -> Result<(), HostError> {
        std::fs::create_dir_all(dir).map_err(|source| HostError::Io {
            what: "cannot create the mountpoint",
            path: dir.to_path_buf(),
            source,
        })?;
        let mount = program("mount", "mount")?;
        run(
            &mount,
            &[os("-t"), os(fstype), device.as_os_str(), dir.as_os_str()],
            ATTACH,
        )
        .await
        .map(|_| ())
    }

    async fn unmount(&self, dir: &Path) -> Result<(), HostError> {
        let umount = program("umount", "mount")?;
        run(&umount, &[dir.as_os_str()], ATTACH).await.map(|_| ())
    }

    fn mounts(&self) -> Result<Vec<MountEntry>, HostError> {
        mountinfo::read().map_err(|source| HostError::Io {
            what: "cannot read",
            path: "/proc/self/mountinfo".into(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkid_output_is_classified() {
        let d = Path::new("/dev/loop0");
        assert_eq!(
            parse_blkid(
                d,
                "DEVNAME=/dev/loop0\nUUID=x\nBLOCK_SIZE=4096\nTYPE=ext4\n"
            )
            .unwrap(),
            Probe::Filesystem("ext4".into())
        );
        let e = parse_blkid(d, "DEVNAME=/dev/loop0\nPTUUID=1\nPTTYPE=dos\n").unwrap_err();
        assert!(e.to_string().contains("partition table (dos)"), "{e}");
        assert!(e.to_string().contains("wipefs"), "{e}");
        assert!(parse_blkid(d, "DEVNAME=/dev/loop0\n").is_err());
    }

    #[tokio::test]
    async fn run_reports_status_stderr_and_timeouts() {
        let sh = Path::new("/bin/sh");
        let out = run(sh, &[os("-c"), os("echo hi")], SHORT).await.unwrap();
        assert_eq!(out, "hi\n");
        let e = run(sh, &[os("-c"), os("echo bad >&2; exit 3")], SHORT)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("exit status: 3"), "{e}");
        assert!(e.ends_with(": bad"), "{e}");
        let e = run(sh, &[os("-c"), os("sleep 5")], Duration::from_millis(200))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("did not finish within"), "{e}");
    }

    #[tokio::test]
    async fn run_does_not_wait_for_a_daemon_holding_stdout() {
        // Like `ballast attach --fuse`: the command exits, its child lives on
        // with the same stdout.
        let sh = Path::new("/bin/sh");
        let started = std::time::Instant::now();
        let out = run(
            sh,
            &[os("-c"), os("sleep 3 & echo attached")],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(out, "attached\n");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn missing_program_names_the_package() {
        let e = program("definitely-not-a-program", "some-pkg").unwrap_err();
        assert_eq!(
            e.to_string(),
            "`definitely-not-a-program` is not installed: install the some-pkg package"
        );
    }
}
