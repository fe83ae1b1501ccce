//! In-memory fakes of the control plane and the host for the driver's and
//! the HTTP layer's unit tests.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::Code;

use super::control::ControlPlane;
use super::host::{Host, HostError, Probe};
use super::options::Fs;
use super::state::{AttachKind, Attachment, LoopDevice};
use crate::api::{ApiError, CreateVolumeSpec, Volume};
use crate::mountinfo::MountEntry;

/// A control plane holding volumes in a map.
#[derive(Clone, Default)]
pub struct FakeControl {
    pub volumes: Arc<Mutex<BTreeMap<String, Volume>>>,
    pub unreachable: Arc<Mutex<bool>>,
}

pub fn volume(name: &str, size: u64) -> Volume {
    Volume {
        name: name.into(),
        size_bytes: size,
        block_size: 4096,
        mapped_bytes: 0,
        dedup: true,
        compression: "lz4".into(),
        read_only: false,
        parent_snapshot: None,
        replicas: vec![],
        generation: 1,
        created_unix: 1_700_000_000,
    }
}

impl FakeControl {
    fn check(&self) -> Result<(), ApiError> {
        if *self.unreachable.lock().unwrap() {
            return Err(ApiError::Unreachable {
                url: "http://fake".into(),
                detail: "connection refused".into(),
            });
        }
        Ok(())
    }

    pub fn insert(&self, v: Volume) {
        self.volumes.lock().unwrap().insert(v.name.clone(), v);
    }

    pub fn names(&self) -> Vec<String> {
        self.volumes.lock().unwrap().keys().cloned().collect()
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::Rpc {
        code: Code::NotFound,
        message: format!("volume {name:?} not found"),
    }
}

impl ControlPlane for FakeControl {
    async fn create(&self, spec: CreateVolumeSpec) -> Result<Volume, ApiError> {
        self.check()?;
        if spec.replicas.unwrap_or(1) > 1 {
            return Err(ApiError::Rpc {
                code: Code::FailedPrecondition,
                message: "2 replicas requested but this node runs standalone".into(),
            });
        }
        let mut v = volume(&spec.name, spec.size_bytes);
        v.block_size = spec.block_size.unwrap_or(4096);
        v.dedup = spec.dedup.unwrap_or(true);
        v.compression = spec.compression.unwrap_or_else(|| "lz4".into());
        self.insert(v.clone());
        Ok(v)
    }

    async fn get(&self, name: &str) -> Result<Volume, ApiError> {
        self.check()?;
        self.volumes
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| not_found(name))
    }

    async fn delete(&self, name: &str) -> Result<(), ApiError> {
        self.check()?;
        self.volumes
            .lock()
            .unwrap()
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| not_found(name))
    }

    async fn list(&self) -> Result<Vec<Volume>, ApiError> {
        self.check()?;
        Ok(self.volumes.lock().unwrap().values().cloned().collect())
    }
}

/// What the fake machine holds.
#[derive(Default)]
pub struct Machine {
    pub attachments: Vec<Attachment>,
    pub loops: Vec<LoopDevice>,
    pub mounts: Vec<MountEntry>,
    /// Filesystem per volume name (it lives on the volume, so it survives
    /// detach and re-attach).
    pub filesystems: HashMap<String, String>,
    /// Every operation, in order (`attach v`, `mkfs /dev/loop0 ext4`, ...).
    pub log: Vec<String>,
    /// Operation names that fail (once each).
    pub fail: Vec<&'static str>,
    next_loop: u32,
    next_nbd: u32,
}

/// A host that simulates attachments, loop devices, filesystems and mounts.
#[derive(Clone)]
pub struct FakeHost {
    pub m: Arc<Mutex<Machine>>,
    pub kernel: bool,
    pub attach_root: PathBuf,
    pub have_xfs: bool,
    /// Sleep in attach, to let concurrent requests overlap.
    pub attach_delay: Duration,
}

impl FakeHost {
    pub fn new(attach_root: &Path) -> Self {
        FakeHost {
            m: Arc::default(),
            kernel: false,
            attach_root: attach_root.to_path_buf(),
            have_xfs: false,
            attach_delay: Duration::ZERO,
        }
    }

    pub fn log(&self) -> Vec<String> {
        self.m.lock().unwrap().log.clone()
    }

    pub fn clear_log(&self) {
        self.m.lock().unwrap().log.clear();
    }

    pub fn fail_once(&self, op: &'static str) {
        self.m.lock().unwrap().fail.push(op);
    }

    /// Count log lines starting with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.log().iter().filter(|l| l.starts_with(prefix)).count()
    }

    fn step(&self, op: &'static str, line: String) -> Result<(), HostError> {
        let mut m = self.m.lock().unwrap();
        m.log.push(line.clone());
        if let Some(i) = m.fail.iter().position(|f| *f == op) {
            m.fail.remove(i);
            return Err(HostError::Failed {
                command: line,
                status: "exit status: 1".into(),
                stderr: format!("injected {op} failure"),
            });
        }
        Ok(())
    }

    /// Which volume a block device shows.
    fn volume_of(m: &Machine, dev: &Path) -> Option<String> {
        let file = m
            .loops
            .iter()
            .find(|l| l.device == dev)
            .map(|l| l.backing_file.clone())
            .unwrap_or_else(|| dev.to_path_buf());
        m.attachments
            .iter()
            .find(|a| a.device == file)
            .map(|a| a.volume.clone())
    }

    /// Unmount behind the plugin's back (an admin's `umount`).
    pub fn external_umount(&self, dir: &Path) {
        self.m
            .lock()
            .unwrap()
            .mounts
            .retain(|e| e.mountpoint != dir);
    }
}

impl Host for FakeHost {
    fn preflight(&self) -> Result<(), HostError> {
        Ok(())
    }

    fn check_fs(&self, fs: Fs) -> Result<(), HostError> {
        if fs == Fs::Xfs && !self.have_xfs {
            return Err(HostError::Missing {
                program: fs.mkfs_program().into(),
                package: fs.package(),
            });
        }
        Ok(())
    }

    async fn attach(&self, volume: &str) -> Result<Attachment, HostError> {
        tokio::time::sleep(self.attach_delay).await;
        self.step("attach", format!("attach {volume}"))?;
        let mut m = self.m.lock().unwrap();
        let a = if self.kernel {
            let n = m.next_nbd;
            m.next_nbd += 1;
            Attachment {
                volume: volume.into(),
                kind: AttachKind::Kernel,
                device: format!("/dev/nbd{n}").into(),
                mountpoint: None,
            }
        } else {
            let dir = self.attach_root.join(volume);
            Attachment {
                volume: volume.into(),
                kind: AttachKind::Fuse,
                device: dir.join(volume),
                mountpoint: Some(dir),
            }
        };
        m.attachments.push(a.clone());
        Ok(a)
    }

    async fn detach(&self, target: &Path) -> Result<(), HostError> {
        self.step("detach", format!("detach {}", target.display()))?;
        let mut m = self.m.lock().unwrap();
        m.attachments.retain(|a| a.detach_target() != target);
        Ok(())
    }

    async fn attachments(&self) -> Result<Vec<Attachment>, HostError> {
        Ok(self.m.lock().unwrap().attachments.clone())
    }

    async fn loop_attach(&self, file: &Path) -> Result<PathBuf, HostError> {
        self.step("loop_attach", format!("loop_attach {}", file.display()))?;
        let mut m = self.m.lock().unwrap();
        let dev = PathBuf::from(format!("/dev/loop{}", m.next_loop));
        m.next_loop += 1;
        m.loops.push(LoopDevice {
            device: dev.clone(),
            backing_file: file.to_path_buf(),
        });
        Ok(dev)
    }

    async fn loop_detach(&self, device: &Path) -> Result<(), HostError> {
        self.step("loop_detach", format!("loop_detach {}", device.display()))?;
        self.m.lock().unwrap().loops.retain(|l| l.device != device);
        Ok(())
    }

    fn loops(&self) -> Result<Vec<LoopDevice>, HostError> {
        Ok(self.m.lock().unwrap().loops.clone())
    }

    async fn probe(&self, device: &Path) -> Result<Probe, HostError> {
        self.step("probe", format!("probe {}", device.display()))?;
        let m = self.m.lock().unwrap();
        let vol = Self::volume_of(&m, device).expect("probe of an attached device");
        Ok(match m.filesystems.get(&vol) {
            Some(t) => Probe::Filesystem(t.clone()),
            None => Probe::Blank,
        })
    }

    async fn mkfs(&self, device: &Path, fs: Fs) -> Result<(), HostError> {
        self.step("mkfs", format!("mkfs {} {fs}", device.display()))?;
        let mut m = self.m.lock().unwrap();
        let vol = Self::volume_of(&m, device).expect("mkfs of an attached device");
        m.filesystems.insert(vol, fs.as_str().into());
        Ok(())
    }

    async fn mount(&self, device: &Path, dir: &Path, fstype: &str) -> Result<(), HostError> {
        self.step(
            "mount",
            format!("mount {} {} {fstype}", device.display(), dir.display()),
        )?;
        let mut m = self.m.lock().unwrap();
        assert!(
            !m.mounts.iter().any(|e| e.mountpoint == dir),
            "{} mounted twice",
            dir.display()
        );
        m.mounts.push(MountEntry {
            mountpoint: dir.to_path_buf(),
            fstype: fstype.into(),
            source: device.display().to_string(),
        });
        Ok(())
    }

    async fn unmount(&self, dir: &Path) -> Result<(), HostError> {
        self.step("unmount", format!("unmount {}", dir.display()))?;
        self.external_umount(dir);
        Ok(())
    }

    fn mounts(&self) -> Result<Vec<MountEntry>, HostError> {
        Ok(self.m.lock().unwrap().mounts.clone())
    }
}
