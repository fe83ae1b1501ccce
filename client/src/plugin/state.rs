//! The plugin's persistent state and its reconciliation with the host.
//!
//! Docker keeps no record of what a volume plugin mounted: after a plugin
//! restart it simply calls Unmount for the containers it stops. So the
//! plugin persists, per volume, the filesystem chosen at Create and — while
//! mounted — the mount IDs, the attachment, the loop device and the
//! mountpoint (`STATE_DIR/state.json`, replaced atomically on every change).
//!
//! On start, [`reconcile`] compares that record with what the kernel and
//! `ballast attach --list` report: mounts that still exist are kept with
//! their IDs (never mounted a second time), records whose mount is gone are
//! cleaned up (loop device and attachment released), mounts under the mount
//! root that the record lost are adopted, and loop devices or FUSE
//! attachments the plugin made but no record holds are released. The
//! function is pure — it returns the cleanups to run — so every case has a
//! unit test.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::options::Fs;
use crate::mountinfo::{self, MountEntry};

/// Version of `state.json`'s layout.
pub const STATE_VERSION: u32 = 1;

/// How a volume is attached to this host (the `kind` of `ballast attach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachKind {
    /// The kernel's nbd driver: `device` is `/dev/nbdX`.
    Kernel,
    /// A FUSE mount served by ballast: `device` is a regular file.
    Fuse,
}

/// One attachment, as `ballast attach --json` prints it (fields the plugin
/// does not use are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub volume: String,
    pub kind: AttachKind,
    /// `/dev/nbdX`, or the file `DIR/VOLUME` of a FUSE attachment.
    pub device: PathBuf,
    /// The FUSE mount directory (`null` for the kernel path).
    #[serde(default)]
    pub mountpoint: Option<PathBuf>,
}

impl Attachment {
    /// What `ballast detach` takes to undo this attachment.
    pub fn detach_target(&self) -> PathBuf {
        match (&self.kind, &self.mountpoint) {
            (AttachKind::Fuse, Some(dir)) => dir.clone(),
            _ => self.device.clone(),
        }
    }
}

/// A loop device and the file behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    pub device: PathBuf,
    pub backing_file: PathBuf,
}

/// A mounted (or half-mounted) volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    /// The callers (containers) using the mount; it is undone when the last
    /// one leaves. Empty for a mount adopted without its IDs.
    pub ids: BTreeSet<String>,
    pub mountpoint: PathBuf,
    pub attachment: Option<Attachment>,
    /// The loop device over a FUSE attachment's file.
    pub loop_device: Option<PathBuf>,
    /// False while a Mount is in progress (or failed half-way): the
    /// attachment and loop device above exist but the filesystem is not
    /// mounted yet.
    pub mounted: bool,
}

impl MountRecord {
    /// The block device the filesystem lives on.
    pub fn block_device(&self) -> Option<&Path> {
        self.loop_device
            .as_deref()
            .or_else(|| match &self.attachment {
                Some(a) if a.kind == AttachKind::Kernel => Some(a.device.as_path()),
                _ => None,
            })
    }
}

/// What the plugin remembers about one volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// The filesystem to make on first mount (the `fs` option of Create).
    pub fs: Fs,
    #[serde(default)]
    pub mount: Option<MountRecord>,
}

/// Everything in `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub volumes: BTreeMap<String, VolumeRecord>,
}

impl Default for State {
    fn default() -> Self {
        State {
            version: STATE_VERSION,
            volumes: BTreeMap::new(),
        }
    }
}

/// Reading or writing `state.json` failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {op} plugin state {path}: {source} (check that the state directory is writable by the plugin; see --state-dir)")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plugin state {path} is not valid: {source}; move it aside and restart the plugin (mounts are then re-adopted from /proc/self/mountinfo)")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("plugin state {path} has version {found}, this plugin understands version {STATE_VERSION}; run the matching ballast version")]
    Version { path: PathBuf, found: u32 },
}

/// `state.json` in a directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateStore { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn io(&self, op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError {
        let path = path.to_path_buf();
        move |source| StateError::Io { op, path, source }
    }

    /// Load the state; a missing file is an empty state.
    pub fn load(&self) -> Result<State, StateError> {
        let path = self.path();
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => return Err(self.io("read", &path)(e)),
        };
        let state: State = serde_json::from_slice(&text).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        if state.version != STATE_VERSION {
            return Err(StateError::Version {
                path,
                found: state.version,
            });
        }
        Ok(state)
    }

    /// Replace the state atomically: a crash leaves the old or the new file,
    /// never a torn one (write a temporary file, fsync, rename, fsync the
    /// directory).
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        fs::create_dir_all(&self.dir).map_err(self.io("create", &self.dir))?;
        let path = self.path();
        let tmp = self.dir.join("state.json.tmp");
        let text = serde_json::to_vec_pretty(state).expect("state serializes");
        let mut f = File::create(&tmp).map_err(self.io("write", &tmp))?;
        f.write_all(&text).map_err(self.io("write", &tmp))?;
        f.sync_all().map_err(self.io("fsync", &tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(self.io("replace", &path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(self.io("fsync", &self.dir))?;
        Ok(())
    }
}

/// What the host reports, for [`reconcile`].
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub mounts: Vec<MountEntry>,
    /// `None` when `ballast attach --list` failed: then no attachment is
    /// called a leak.
    pub attachments: Option<Vec<Attachment>>,
    pub loops: Vec<LoopDevice>,
}

/// A release [`reconcile`] asks for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cleanup {
    /// `losetup -d DEVICE` (ordered before detaches: a loop device holds its
    /// file open).
    DetachLoop(PathBuf),
    /// `ballast detach TARGET`.
    Detach(PathBuf),
}

/// The record of a mount found in mountinfo that no record holds: its loop
/// device and attachment are looked up by device, its IDs are unknown.
pub fn adopt_mount(e: &MountEntry, obs: &Observed) -> MountRecord {
    let source = PathBuf::from(&e.source);
    let backing = obs
        .loops
        .iter()
        .find(|l| l.device == source)
        .map(|l| l.backing_file.clone());
    let (loop_device, device) = match backing {
        Some(b) => (Some(source), b),
        None => (None, source),
    };
    let attachment = obs
        .attachments
        .as_ref()
        .and_then(|list| list.iter().find(|a| a.device == device))
        .cloned();
    MountRecord {
        ids: BTreeSet::new(),
        mountpoint: e.mountpoint.clone(),
        attachment,
        loop_device,
        mounted: true,
    }
}

/// Bring `state` in line with `obs` and return the releases to run.
///
/// `mount_root` holds the plugin's mountpoints (`ROOT/NAME`), `attach_root`
/// its FUSE attachments (`ROOT/NAME`).
pub fn reconcile(
    state: &mut State,
    obs: &Observed,
    mount_root: &Path,
    attach_root: &Path,
) -> Vec<Cleanup> {
    let mut cleanups = BTreeSet::new();
    let loop_backing = |dev: &Path| -> Option<&Path> {
        obs.loops
            .iter()
            .find(|l| l.device == dev)
            .map(|l| l.backing_file.as_path())
    };

    // 1. Records: keep the mounts that exist, release what is left of the
    //    others.
    for rec in state.volumes.values_mut() {
        let Some(m) = rec.mount.as_mut() else {
            continue;
        };
        if mountinfo::find(&obs.mounts, &m.mountpoint).is_some() {
            m.mounted = true;
            continue;
        }
        if let Some(l) = &m.loop_device {
            let backing = loop_backing(l);
            let ours = match (&m.attachment, backing) {
                (Some(a), Some(b)) => a.device == b,
                // Without an attachment record, only a loop over a file
                // under our attach root is ours.
                (None, Some(b)) => b.starts_with(attach_root),
                (_, None) => false,
            };
            if ours {
                cleanups.insert(Cleanup::DetachLoop(l.clone()));
            }
        }
        if let Some(a) = &m.attachment {
            let listed = match &obs.attachments {
                Some(list) => list.iter().any(|x| x.device == a.device),
                // Unknown: try; detaching something already gone only logs.
                None => true,
            };
            if listed {
                cleanups.insert(Cleanup::Detach(a.detach_target()));
            }
        }
        rec.mount = None;
    }

    // 2. Mounts under the mount root that no record holds: adopt them, so a
    //    later Mount reuses them instead of mounting a second time.
    for e in &obs.mounts {
        if e.mountpoint.parent() != Some(mount_root) {
            continue;
        }
        let Some(name) = e.mountpoint.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let rec = state
            .volumes
            .entry(name.to_string())
            .or_insert_with(|| VolumeRecord {
                fs: e.fstype.parse().unwrap_or_default(),
                mount: None,
            });
        if rec.mount.is_some() {
            continue;
        }
        rec.mount = Some(adopt_mount(e, obs));
    }

    // 3. Leaks: loop devices over files under the attach root, and FUSE
    //    attachments there, that no record holds (a crash between attaching
    //    and saving the record, say).
    let held_loops: BTreeSet<&Path> = state
        .volumes
        .values()
        .filter_map(|r| r.mount.as_ref()?.loop_device.as_deref())
        .collect();
    let held_devices: BTreeSet<&Path> = state
        .volumes
        .values()
        .filter_map(|r| Some(r.mount.as_ref()?.attachment.as_ref()?.device.as_path()))
        .collect();
    for l in &obs.loops {
        if l.backing_file.starts_with(attach_root) && !held_loops.contains(l.device.as_path()) {
            cleanups.insert(Cleanup::DetachLoop(l.device.clone()));
        }
    }
    for a in obs.attachments.iter().flatten() {
        let under_root = a.kind == AttachKind::Fuse
            && a.mountpoint
                .as_deref()
                .is_some_and(|d| d.starts_with(attach_root));
        if under_root && !held_devices.contains(a.device.as_path()) {
            cleanups.insert(Cleanup::Detach(a.detach_target()));
        }
    }
    cleanups.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MROOT: &str = "/var/lib/ballast/mounts";
    const AROOT: &str = "/var/lib/ballast/attach";

    fn fuse_attachment(name: &str) -> Attachment {
        Attachment {
            volume: name.into(),
            kind: AttachKind::Fuse,
            device: format!("{AROOT}/{name}/{name}").into(),
            mountpoint: Some(format!("{AROOT}/{name}").into()),
        }
    }

    fn mounted_record(name: &str, loop_dev: &str, ids: &[&str]) -> VolumeRecord {
        VolumeRecord {
            fs: Fs::Ext4,
            mount: Some(MountRecord {
                ids: ids.iter().map(|s| s.to_string()).collect(),
                mountpoint: format!("{MROOT}/{name}").into(),
                attachment: Some(fuse_attachment(name)),
                loop_device: Some(loop_dev.into()),
                mounted: true,
            }),
        }
    }

    fn mount_entry(name: &str, source: &str) -> MountEntry {
        MountEntry {
            mountpoint: format!("{MROOT}/{name}").into(),
            fstype: "ext4".into(),
            source: source.into(),
        }
    }

    fn loop_dev(dev: &str, name: &str) -> LoopDevice {
        LoopDevice {
            device: dev.into(),
            backing_file: format!("{AROOT}/{name}/{name}").into(),
        }
    }

    fn run(state: &mut State, obs: &Observed) -> Vec<Cleanup> {
        reconcile(state, obs, Path::new(MROOT), Path::new(AROOT))
    }

    #[test]
    fn existing_mount_is_kept_with_its_ids() {
        let mut s = State::default();
        s.volumes
            .insert("a".into(), mounted_record("a", "/dev/loop1", &["c1", "c2"]));
        let obs = Observed {
            mounts: vec![mount_entry("a", "/dev/loop1")],
            attachments: Some(vec![fuse_attachment("a")]),
            loops: vec![loop_dev("/dev/loop1", "a")],
        };
        let before = s.clone();
        assert_eq!(run(&mut s, &obs), vec![]);
        assert_eq!(s, before);
    }

    #[test]
    fn half_done_mount_that_exists_is_marked_mounted() {
        let mut s = State::default();
        let mut rec = mounted_record("a", "/dev/loop1", &["c1"]);
        rec.mount.as_mut().unwrap().mounted = false;
        s.volumes.insert("a".into(), rec);
        let obs = Observed {
            mounts: vec![mount_entry("a", "/dev/loop1")],
            attachments: Some(vec![fuse_attachment("a")]),
            loops: vec![loop_dev("/dev/loop1", "a")],
        };
        assert_eq!(run(&mut s, &obs), vec![]);
        assert!(s.volumes["a"].mount.as_ref().unwrap().mounted);
    }

    #[test]
    fn vanished_mount_releases_loop_then_attachment() {
        let mut s = State::default();
        s.volumes
            .insert("a".into(), mounted_record("a", "/dev/loop1", &["c1"]));
        let obs = Observed {
            mounts: vec![],
            attachments: Some(vec![fuse_attachment("a")]),
            loops: vec![loop_dev("/dev/loop1", "a")],
        };
        assert_eq!(
            run(&mut s, &obs),
            vec![
                Cleanup::DetachLoop("/dev/loop1".into()),
                Cleanup::Detach(format!("{AROOT}/a").into()),
            ]
        );
        assert_eq!(s.volumes["a"].mount, None);
        assert_eq!(s.volumes["a"].fs, Fs::Ext4, "the fs choice survives");
    }

    #[test]
    fn vanished_mount_does_not_touch_a_reused_loop_device() {
        // After a reboot /dev/loop1 may back somebody else's file.
        let mut s = State::default();
        s.volumes
            .insert("a".into(), mounted_record("a", "/dev/loop1", &["c1"]));
        let obs = Observed {
            mounts: vec![],
            attachments: Some(vec![]),
            loops: vec![LoopDevice {
                device: "/dev/loop1".into(),
                backing_file: "/srv/other.img".into(),
            }],
        };
        assert_eq!(run(&mut s, &obs), vec![]);
        assert_eq!(s.volumes["a"].mount, None);
    }

    #[test]
    fn unknown_attachment_list_still_tries_to_detach_recorded_ones() {
        let mut s = State::default();
        s.volumes
            .insert("a".into(), mounted_record("a", "/dev/loop1", &["c1"]));
        let obs = Observed {
            mounts: vec![],
            attachments: None,
            loops: vec![],
        };
        assert_eq!(
            run(&mut s, &obs),
            vec![Cleanup::Detach(format!("{AROOT}/a").into())]
        );
    }

    #[test]
    fn lost_record_mount_is_adopted_not_mounted_twice() {
        let mut s = State::default();
        let obs = Observed {
            mounts: vec![
                mount_entry("b", "/dev/loop4"),
                // Not under the mount root: not ours.
                MountEntry {
                    mountpoint: "/mnt/b".into(),
                    fstype: "ext4".into(),
                    source: "/dev/loop9".into(),
                },
            ],
            attachments: Some(vec![fuse_attachment("b")]),
            loops: vec![loop_dev("/dev/loop4", "b")],
        };
        assert_eq!(run(&mut s, &obs), vec![]);
        assert_eq!(s.volumes.len(), 1);
        let m = s.volumes["b"].mount.clone().unwrap();
        assert!(m.ids.is_empty());
        assert!(m.mounted);
        assert_eq!(m.loop_device, Some("/dev/loop4".into()));
        assert_eq!(m.attachment, Some(fuse_attachment("b")));
        assert_eq!(m.block_device(), Some(Path::new("/dev/loop4")));
    }

    #[test]
    fn adopted_kernel_mount_keeps_its_nbd_device() {
        let mut s = State::default();
        s.volumes.insert(
            "k".into(),
            VolumeRecord {
                fs: Fs::Xfs,
                mount: None,
            },
        );
        let att = Attachment {
            volume: "k".into(),
            kind: AttachKind::Kernel,
            device: "/dev/nbd2".into(),
            mountpoint: None,
        };
        let obs = Observed {
            mounts: vec![MountEntry {
                mountpoint: format!("{MROOT}/k").into(),
                fstype: "xfs".into(),
                source: "/dev/nbd2".into(),
            }],
            attachments: Some(vec![att.clone()]),
            loops: vec![],
        };
        assert_eq!(run(&mut s, &obs), vec![]);
        let m = s.volumes["k"].mount.clone().unwrap();
        assert_eq!(m.attachment, Some(att));
        assert_eq!(m.loop_device, None);
        assert_eq!(m.block_device(), Some(Path::new("/dev/nbd2")));
        assert_eq!(s.volumes["k"].fs, Fs::Xfs);
    }

    #[test]
    fn leaked_loops_and_fuse_attachments_are_released() {
        let mut s = State::default();
        s.volumes
            .insert("a".into(), mounted_record("a", "/dev/loop1", &["c1"]));
        let manual = Attachment {
            volume: "m".into(),
            kind: AttachKind::Fuse,
            device: "/tmp/mine/m".into(),
            mountpoint: Some("/tmp/mine".into()),
        };
        let obs = Observed {
            mounts: vec![mount_entry("a", "/dev/loop1")],
            attachments: Some(vec![
                fuse_attachment("a"),
                fuse_attachment("z"),
                manual.clone(),
            ]),
            loops: vec![
                loop_dev("/dev/loop1", "a"),
                loop_dev("/dev/loop7", "z"),
                LoopDevice {
                    device: "/dev/loop8".into(),
                    backing_file: "/tmp/mine/m".into(),
                },
            ],
        };
        // z's loop and attachment are ours and unheld; the user's own
        // attachment outside the attach root is left alone.
        assert_eq!(
            run(&mut s, &obs),
            vec![
                Cleanup::DetachLoop("/dev/loop7".into()),
                Cleanup::Detach(format!("{AROOT}/z").into()),
            ]
        );
    }

    #[test]
    fn state_round_trips_through_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("nested"));
        assert_eq!(store.load().unwrap(), State::default());
        let mut s = State::default();
        s.volumes
            .insert("a".into(), mounted_record("a", "/dev/loop1", &["c1", "c2"]));
        s.volumes.insert(
            "b".into(),
            VolumeRecord {
                fs: Fs::Xfs,
                mount: None,
            },
        );
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), s);
        assert!(!dir.path().join("nested/state.json.tmp").exists());
        let text = fs::read_to_string(store.path()).unwrap();
        assert!(text.contains("\"fs\": \"xfs\""), "{text}");
        assert!(text.contains("\"kind\": \"fuse\""), "{text}");
    }

    #[test]
    fn corrupt_or_future_state_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        fs::write(store.path(), b"{\"version\": 1, \"volumes\": [").unwrap();
        let e = store.load().unwrap_err().to_string();
        assert!(e.contains("is not valid"), "{e}");
        assert!(e.contains("move it aside"), "{e}");
        fs::write(store.path(), b"{\"version\": 9, \"volumes\": {}}").unwrap();
        let e = store.load().unwrap_err().to_string();
        assert!(e.contains("has version 9"), "{e}");
    }

    #[test]
    fn attachment_json_from_ballast_attach_parses() {
        let a: Attachment = serde_json::from_str(
            r#"{"volume":"v","kind":"fuse","device":"/x/v/v","mountpoint":"/x/v","pid":42,"nbd_uri":"nbd://127.0.0.1:10809/v"}"#,
        )
        .unwrap();
        assert_eq!(a.detach_target(), PathBuf::from("/x/v"));
        let k: Attachment = serde_json::from_str(
            r#"{"volume":"v","kind":"kernel","device":"/dev/nbd0","mountpoint":null,"pid":null,"nbd_uri":"nbd://h/v"}"#,
        )
        .unwrap();
        assert_eq!(k.detach_target(), PathBuf::from("/dev/nbd0"));
    }
}
