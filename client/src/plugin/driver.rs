//! The volume driver: Docker's verbs mapped onto Ballast volumes, host
//! attachments and mounts.
//!
//! Every verb that changes a volume runs under that volume's lock, so
//! Docker's concurrent calls (two containers starting on one volume, a
//! Remove racing an Unmount) are serialized per volume while different
//! volumes proceed in parallel. State changes are saved before the verb
//! answers, and each step of a Mount is recorded as soon as it is done, so a
//! plugin that dies half-way leaves a record that the next start (or the
//! next Mount) cleans up instead of a leaked attachment.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};

use serde_json::json;
use tonic::Code;
use tracing::{info, warn};

use super::control::ControlPlane;
use super::host::{Host, HostError, Probe};
use super::options::{Fs, OptionError, VolumeOptions};
use super::protocol::VolumeInfo;
use super::state::{self, Cleanup, MountRecord, Observed, State, StateError, StateStore};
use crate::api::{ApiError, Volume};
use crate::cli::output::format_rfc3339;
use crate::mountinfo;

/// A verb failed; the text goes to Docker's `Err` field and so to the user.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(
        "invalid volume name {name:?}: use 1-128 characters from A-Z, a-z, 0-9, '.', '_' and \
         '-', starting with a letter or digit"
    )]
    InvalidName { name: String },
    #[error(transparent)]
    Options(#[from] OptionError),
    #[error("{action}: {source}")]
    Api { action: String, source: ApiError },
    #[error(
        "Ballast volume {name:?} already exists with {diffs}; drop those -o options to use it \
         as it is, or choose another name"
    )]
    Conflict { name: String, diffs: String },
    #[error(
        "volume {name:?} was created with fs={recorded}, not {asked}; drop -o fs or pass \
         fs={recorded}"
    )]
    FsConflict {
        name: String,
        recorded: Fs,
        asked: Fs,
    },
    #[error("no Ballast volume named {name:?}; create it with `docker volume create --driver <this plugin> {name}`")]
    NotFound { name: String },
    #[error(
        "{name:?} is a read-only Ballast snapshot and cannot be used as a Docker volume; clone \
         it (`ballast volume clone {name} NEW`) and use the clone"
    )]
    Snapshot { name: String },
    #[error(
        "volume {name:?} is still mounted at {mountpoint} ({users}); stop and remove the \
         containers using it first (docker ps -a --filter volume={name}); if none is left, \
         `umount {mountpoint}` and remove the volume again"
    )]
    InUse {
        name: String,
        mountpoint: String,
        users: String,
    },
    #[error("{step} for volume {name:?} failed: {source}{rollback}")]
    Host {
        step: &'static str,
        name: String,
        source: Box<HostError>,
        /// Empty, or "; undoing the earlier steps also failed: ...".
        rollback: String,
    },
    /// The host could not be inspected at start.
    #[error("cannot inspect this host at start ({what}): {source}")]
    Observe {
        what: &'static str,
        source: Box<HostError>,
    },
    #[error(transparent)]
    State(#[from] StateError),
}

fn host_err(step: &'static str, name: &str) -> impl FnOnce(HostError) -> DriverError {
    let name = name.to_string();
    move |source| DriverError::Host {
        step,
        name,
        source: Box::new(source),
        rollback: String::new(),
    }
}

/// Check a Docker volume name: it becomes a Ballast volume name and a path
/// component, so only the characters both accept, and no `.`/`..`.
pub fn validate_name(name: &str) -> Result<(), DriverError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(DriverError::InvalidName {
            name: name.to_string(),
        })
    }
}

/// Settings of a driver.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Volumes are mounted at `MOUNT_ROOT/NAME`.
    pub mount_root: PathBuf,
    /// Parent of FUSE attachment directories; used by the start-up
    /// reconciliation to recognize the plugin's own attachments.
    pub attach_root: PathBuf,
    /// Size of volumes created without `-o size`.
    pub default_size: u64,
    /// `local` for a standalone node.
    pub scope: String,
}

/// Docker's volume verbs over a control plane `C` and a host `H`.
pub struct Driver<C, H> {
    control: C,
    host: H,
    cfg: DriverConfig,
    store: StateStore,
    /// The saved state; changed only through [`Driver::update`].
    state: tokio::sync::Mutex<State>,
    /// One lock per volume name.
    locks: StdMutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl<C: ControlPlane, H: Host> Driver<C, H> {
    /// Load the saved state, reconcile it with the host (see
    /// [`state::reconcile`]), release leftovers and save the result.
    pub async fn start(
        control: C,
        host: H,
        cfg: DriverConfig,
        store: StateStore,
    ) -> Result<Self, DriverError> {
        let mut st = store.load()?;
        let mounts = host.mounts().map_err(|e| DriverError::Observe {
            what: "the mount table",
            source: Box::new(e),
        })?;
        let attachments = match host.attachments().await {
            Ok(a) => Some(a),
            Err(e) => {
                warn!(error = %e, "cannot list attachments; only recorded ones are released");
                None
            }
        };
        let loops = host.loops().unwrap_or_else(|e| {
            warn!(error = %e, "cannot list loop devices");
            Vec::new()
        });
        let obs = Observed {
            mounts,
            attachments,
            loops,
        };
        let before = st.clone();
        let cleanups = state::reconcile(&mut st, &obs, &cfg.mount_root, &cfg.attach_root);
        for (name, rec) in &st.volumes {
            if let Some(m) = &rec.mount {
                let was = before.volumes.get(name).and_then(|r| r.mount.as_ref());
                if was.is_none() {
                    info!(volume = %name, mountpoint = %m.mountpoint.display(), "adopted an existing mount");
                } else {
                    info!(volume = %name, mountpoint = %m.mountpoint.display(), ids = m.ids.len(), "mount found again");
                }
            } else if before.volumes.get(name).is_some_and(|r| r.mount.is_some()) {
                info!(volume = %name, "recorded mount is gone; released its attachment");
            }
        }
        for c in cleanups {
            let r = match &c {
                Cleanup::DetachLoop(dev) => host.loop_detach(dev).await,
                Cleanup::Detach(target) => host.detach(target).await,
            };
            match r {
                Ok(()) => info!(cleanup = ?c, "released a leftover"),
                Err(e) => warn!(cleanup = ?c, error = %e, "could not release a leftover"),
            }
        }
        store.save(&st)?;
        Ok(Driver {
            control,
            host,
            cfg,
            store,
            state: tokio::sync::Mutex::new(st),
            locks: StdMutex::new(HashMap::new()),
        })
    }

    /// A copy of the current state.
    pub async fn snapshot(&self) -> State {
        self.state.lock().await.clone()
    }

    fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(name.to_string()).or_default().clone()
    }

    /// Change the state and save it; memory keeps the old state when the
    /// save fails, so memory and disk never disagree.
    async fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> Result<R, StateError> {
        let mut guard = self.state.lock().await;
        let mut next = guard.clone();
        let r = f(&mut next);
        if next != *guard {
            self.store.save(&next)?;
            *guard = next;
        }
        Ok(r)
    }

    async fn set_mount(&self, name: &str, m: Option<MountRecord>) -> Result<(), StateError> {
        self.update(|s| {
            s.volumes.entry(name.to_string()).or_default().mount = m;
        })
        .await
    }

    async fn record(&self, name: &str) -> Option<state::VolumeRecord> {
        self.state.lock().await.volumes.get(name).cloned()
    }

    /// `/VolumeDriver.Create`: validate the options, create the Ballast
    /// volume or adopt an existing one, remember the filesystem.
    pub async fn create(
        &self,
        name: &str,
        opts: &BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        validate_name(name)?;
        let opts = VolumeOptions::parse(opts)?;
        if let Some(fs) = opts.fs {
            self.host
                .check_fs(fs)
                .map_err(host_err("checking the fs option", name))?;
        }
        let lock = self.lock_for(name);
        let _held = lock.lock().await;
        match self.control.get(name).await {
            Ok(v) => {
                if v.read_only {
                    return Err(DriverError::Snapshot { name: name.into() });
                }
                if let Some(diffs) = opts.conflicts_with(&v) {
                    return Err(DriverError::Conflict {
                        name: name.into(),
                        diffs,
                    });
                }
                let recorded = self.record(name).await.map(|r| r.fs);
                if let (Some(recorded), Some(asked)) = (recorded, opts.fs) {
                    if recorded != asked {
                        return Err(DriverError::FsConflict {
                            name: name.into(),
                            recorded,
                            asked,
                        });
                    }
                }
                self.update(|s| {
                    let rec = s.volumes.entry(name.to_string()).or_default();
                    if let Some(fs) = opts.fs {
                        rec.fs = fs;
                    }
                })
                .await?;
                info!(volume = %name, "adopted existing Ballast volume");
            }
            Err(e) if e.code() == Some(Code::NotFound) => {
                let spec = opts.create_spec(name, self.cfg.default_size);
                let v = self
                    .control
                    .create(spec)
                    .await
                    .map_err(|source| DriverError::Api {
                        action: format!("creating Ballast volume {name:?}"),
                        source,
                    })?;
                // A new volume: whatever an old record said is void.
                self.update(|s| {
                    let rec = s.volumes.entry(name.to_string()).or_default();
                    rec.fs = opts.fs.unwrap_or_default();
                })
                .await?;
                info!(volume = %name, size = v.size_bytes, fs = %opts.fs.unwrap_or_default(), "created Ballast volume");
            }
            Err(source) => {
                return Err(DriverError::Api {
                    action: format!("looking up Ballast volume {name:?}"),
                    source,
                })
            }
        }
        Ok(())
    }

    /// `/VolumeDriver.Remove`: delete the Ballast volume; refused while it
    /// is mounted here.
    pub async fn remove(&self, name: &str) -> Result<(), DriverError> {
        validate_name(name)?;
        let lock = self.lock_for(name);
        let _held = lock.lock().await;
        if let Some(mut m) = self.record(name).await.and_then(|r| r.mount) {
            let mounts = self
                .host
                .mounts()
                .map_err(host_err("reading the mount table", name))?;
            if mountinfo::find(&mounts, &m.mountpoint).is_some() {
                return Err(DriverError::InUse {
                    name: name.into(),
                    mountpoint: m.mountpoint.display().to_string(),
                    users: users(&m),
                });
            }
            // Docker removes only volumes no container uses, and the
            // filesystem is not mounted: what is left of the record is a
            // leftover to release, not a user.
            m.mounted = false;
            self.release(name, m).await?;
        }
        match self.control.delete(name).await {
            Ok(()) => info!(volume = %name, "deleted Ballast volume"),
            // Already gone (deleted with `ballast volume delete`, say): the
            // Docker volume must still be removable.
            Err(e) if e.code() == Some(Code::NotFound) => {
                info!(volume = %name, "Ballast volume was already deleted")
            }
            Err(source) => {
                return Err(DriverError::Api {
                    action: format!("deleting Ballast volume {name:?}"),
                    source,
                })
            }
        }
        self.update(|s| {
            s.volumes.remove(name);
        })
        .await?;
        Ok(())
    }

    /// `/VolumeDriver.Mount`: attach, make the filesystem on first use,
    /// mount, and count `id` as a user. A second ID reuses the mount.
    pub async fn mount(&self, name: &str, id: &str) -> Result<PathBuf, DriverError> {
        validate_name(name)?;
        let lock = self.lock_for(name);
        let _held = lock.lock().await;
        let mounts = self
            .host
            .mounts()
            .map_err(host_err("reading the mount table", name))?;
        let rec = self.record(name).await;
        if let Some(mut m) = rec.as_ref().and_then(|r| r.mount.clone()) {
            // The kernel decides, not the record's `mounted` flag: a Mount
            // that died between `mount` and saving the record did mount.
            if mountinfo::find(&mounts, &m.mountpoint).is_some() {
                let mp = m.mountpoint.clone();
                m.mounted = true;
                m.ids.insert(id.to_string());
                self.set_mount(name, Some(m)).await?;
                info!(volume = %name, id, "mount reused");
                return Ok(mp);
            }
            // The record outlived its mount (unmounted behind the plugin's
            // back, or a Mount that failed half-way): release the rest.
            warn!(volume = %name, "recorded mount is gone; releasing its leftovers before mounting again");
            m.mounted = false;
            self.release(name, m).await?;
        }
        let mountpoint = self.cfg.mount_root.join(name);
        if let Some(e) = mountinfo::find(&mounts, &mountpoint) {
            // Mounted, but no record: a mount of this plugin whose state was
            // lost. Adopt it rather than mount the volume twice.
            let obs = Observed {
                mounts: mounts.clone(),
                attachments: self.host.attachments().await.ok(),
                loops: self.host.loops().unwrap_or_default(),
            };
            let mut m = state::adopt_mount(e, &obs);
            m.ids.insert(id.to_string());
            self.set_mount(name, Some(m)).await?;
            warn!(volume = %name, mountpoint = %mountpoint.display(), "adopted an unrecorded mount");
            return Ok(mountpoint);
        }
        let fs = match rec {
            Some(r) => r.fs,
            None => {
                // Docker knows the volume but the plugin has no record of
                // it (state lost, or created with `ballast volume create`).
                match self.control.get(name).await {
                    Ok(v) if v.read_only => {
                        return Err(DriverError::Snapshot { name: name.into() })
                    }
                    Ok(_) => Fs::default(),
                    Err(e) if e.code() == Some(Code::NotFound) => {
                        return Err(DriverError::NotFound { name: name.into() })
                    }
                    Err(source) => {
                        return Err(DriverError::Api {
                            action: format!("looking up Ballast volume {name:?}"),
                            source,
                        })
                    }
                }
            }
        };
        self.mount_fresh(name, fs, id, mountpoint).await
    }

    async fn mount_fresh(
        &self,
        name: &str,
        fs: Fs,
        id: &str,
        mountpoint: PathBuf,
    ) -> Result<PathBuf, DriverError> {
        let mut m = MountRecord {
            mountpoint: mountpoint.clone(),
            ..Default::default()
        };
        let attachment = self
            .host
            .attach(name)
            .await
            .map_err(host_err("attaching", name))?;
        m.attachment = Some(attachment.clone());
        let result = self.mount_steps(name, fs, id, &mut m).await;
        match result {
            Ok(()) => {
                info!(volume = %name, id, device = %attachment.device.display(), mountpoint = %mountpoint.display(), "mounted");
                Ok(mountpoint)
            }
            Err(mut e) => {
                // Undo what was done, newest first, and say so if that fails
                // too.
                m.mounted =
                    mountinfo::find(&self.host.mounts().unwrap_or_default(), &mountpoint).is_some();
                if let Err(undo) = self.release(name, m).await {
                    if let DriverError::Host { rollback, .. } = &mut e {
                        *rollback = format!("; undoing the earlier steps also failed: {undo}");
                    }
                }
                Err(e)
            }
        }
    }

    /// Everything after the attachment, recorded step by step.
    async fn mount_steps(
        &self,
        name: &str,
        fs: Fs,
        id: &str,
        m: &mut MountRecord,
    ) -> Result<(), DriverError> {
        self.set_mount(name, Some(m.clone())).await?;
        let attachment = m.attachment.clone().expect("set by the caller");
        let device = match attachment.kind {
            state::AttachKind::Kernel => attachment.device.clone(),
            state::AttachKind::Fuse => {
                let dev = self
                    .host
                    .loop_attach(&attachment.device)
                    .await
                    .map_err(host_err("setting up a loop device", name))?;
                m.loop_device = Some(dev.clone());
                self.set_mount(name, Some(m.clone())).await?;
                dev
            }
        };
        let fstype = match self
            .host
            .probe(&device)
            .await
            .map_err(host_err("probing for a filesystem", name))?
        {
            Probe::Blank => {
                info!(volume = %name, fs = %fs, device = %device.display(), "making a filesystem (first mount)");
                self.host
                    .mkfs(&device, fs)
                    .await
                    .map_err(host_err("making the filesystem", name))?;
                fs.as_str().to_string()
            }
            Probe::Filesystem(t) => {
                if t != fs.as_str() {
                    warn!(volume = %name, found = %t, recorded = %fs, "volume holds another filesystem than recorded; mounting what it holds");
                }
                t
            }
        };
        self.host
            .mount(&device, &m.mountpoint, &fstype)
            .await
            .map_err(host_err("mounting", name))?;
        m.mounted = true;
        m.ids.insert(id.to_string());
        self.set_mount(name, Some(m.clone())).await?;
        Ok(())
    }

    /// Undo a mount record newest step first: unmount (when `m.mounted`,
    /// which the caller sets from the mount table), release the loop device,
    /// detach. The record is saved after every step, so a failure leaves
    /// exactly what remains to be undone.
    async fn release(&self, name: &str, mut m: MountRecord) -> Result<(), DriverError> {
        if m.mounted {
            self.host
                .unmount(&m.mountpoint)
                .await
                .map_err(host_err("unmounting", name))?;
        }
        m.mounted = false;
        self.set_mount(name, Some(m.clone())).await?;
        if let Some(dev) = m.loop_device.clone() {
            self.host
                .loop_detach(&dev)
                .await
                .map_err(host_err("releasing the loop device", name))?;
            m.loop_device = None;
            self.set_mount(name, Some(m.clone())).await?;
        }
        if let Some(a) = m.attachment.clone() {
            self.host
                .detach(&a.detach_target())
                .await
                .map_err(host_err("detaching", name))?;
        }
        self.set_mount(name, None).await?;
        // An empty directory is left by a clean unmount; anything else is
        // not ours to delete.
        let _ = std::fs::remove_dir(&m.mountpoint);
        Ok(())
    }

    /// `/VolumeDriver.Unmount`: `id` leaves; the last one out unmounts and
    /// detaches.
    pub async fn unmount(&self, name: &str, id: &str) -> Result<(), DriverError> {
        validate_name(name)?;
        let lock = self.lock_for(name);
        let _held = lock.lock().await;
        let Some(m) = self.record(name).await.and_then(|r| r.mount) else {
            info!(volume = %name, id, "unmount of a volume that is not mounted: nothing to do");
            return Ok(());
        };
        // An ID the record does not know, while others are known, is not a
        // user of this mount (a plugin restart lost nothing: IDs are saved).
        if !m.ids.contains(id) && !m.ids.is_empty() {
            warn!(volume = %name, id, "unmount by an unknown ID ignored; the mount has other users");
            return Ok(());
        }
        let mut m = m;
        m.ids.remove(id);
        if !m.ids.is_empty() {
            let left = m.ids.len();
            self.set_mount(name, Some(m)).await?;
            info!(volume = %name, id, users_left = left, "user left; mount stays");
            return Ok(());
        }
        self.set_mount(name, Some(m.clone())).await?;
        let mounts = self
            .host
            .mounts()
            .map_err(host_err("reading the mount table", name))?;
        m.mounted = mountinfo::find(&mounts, &m.mountpoint).is_some();
        self.release(name, m).await?;
        info!(volume = %name, id, "last user left; unmounted and detached");
        Ok(())
    }

    /// `/VolumeDriver.Path`: the mountpoint, or empty while not mounted.
    pub async fn path(&self, name: &str) -> Result<PathBuf, DriverError> {
        validate_name(name)?;
        Ok(self
            .record(name)
            .await
            .and_then(|r| r.mount)
            .filter(|m| m.mounted)
            .map(|m| m.mountpoint)
            .unwrap_or_default())
    }

    fn info(&self, v: &Volume, rec: Option<&state::VolumeRecord>, with_status: bool) -> VolumeInfo {
        let mount = rec.and_then(|r| r.mount.as_ref()).filter(|m| m.mounted);
        let mut status = BTreeMap::new();
        if with_status {
            status.insert("size".into(), json!(v.size_bytes));
            status.insert("block_size".into(), json!(v.block_size));
            status.insert("mapped_bytes".into(), json!(v.mapped_bytes));
            status.insert("dedup".into(), json!(v.dedup));
            status.insert("compression".into(), json!(v.compression));
            status.insert("replicas".into(), json!(v.replicas));
            status.insert(
                "fs".into(),
                json!(rec.map(|r| r.fs).unwrap_or_default().as_str()),
            );
            if let Some(m) = mount {
                status.insert("mounts".into(), json!(m.ids.len()));
                if let Some(a) = &m.attachment {
                    status.insert("attach".into(), json!(a.kind));
                    status.insert("device".into(), json!(m.block_device()));
                }
            }
        }
        VolumeInfo {
            name: v.name.clone(),
            mountpoint: mount
                .map(|m| m.mountpoint.display().to_string())
                .unwrap_or_default(),
            created_at: format_rfc3339(v.created_unix),
            status,
        }
    }

    /// `/VolumeDriver.Get`: the volume with its details.
    pub async fn get(&self, name: &str) -> Result<VolumeInfo, DriverError> {
        validate_name(name)?;
        let rec = self.record(name).await;
        match self.control.get(name).await {
            Ok(v) if v.read_only => Err(DriverError::Snapshot { name: name.into() }),
            Ok(v) => Ok(self.info(&v, rec.as_ref(), true)),
            Err(e) if e.code() == Some(Code::NotFound) => {
                Err(DriverError::NotFound { name: name.into() })
            }
            // ballastd unreachable: a mounted volume still exists; say what
            // is known rather than make Docker think it vanished.
            Err(e) if rec.as_ref().is_some_and(|r| r.mount.is_some()) => {
                let m = rec
                    .as_ref()
                    .and_then(|r| r.mount.as_ref())
                    .expect("checked");
                let mut status = BTreeMap::new();
                status.insert("control_plane".into(), json!(format!("unreachable: {e}")));
                Ok(VolumeInfo {
                    name: name.into(),
                    mountpoint: if m.mounted {
                        m.mountpoint.display().to_string()
                    } else {
                        String::new()
                    },
                    created_at: String::new(),
                    status,
                })
            }
            Err(source) => Err(DriverError::Api {
                action: format!("looking up Ballast volume {name:?}"),
                source,
            }),
        }
    }

    /// `/VolumeDriver.List`: the Ballast volumes (snapshots excluded: they
    /// are read-only and cannot back a Docker volume).
    pub async fn list(&self) -> Result<Vec<VolumeInfo>, DriverError> {
        let vols = self
            .control
            .list()
            .await
            .map_err(|source| DriverError::Api {
                action: "listing Ballast volumes".into(),
                source,
            })?;
        let st = self.state.lock().await.clone();
        Ok(vols
            .iter()
            .filter(|v| !v.read_only && validate_name(&v.name).is_ok())
            .map(|v| self.info(v, st.volumes.get(&v.name), false))
            .collect())
    }

    /// `/VolumeDriver.Capabilities`.
    pub fn scope(&self) -> &str {
        &self.cfg.scope
    }
}

fn users(m: &MountRecord) -> String {
    match m.ids.len() {
        0 => "users unknown".into(),
        1 => "1 user".into(),
        n => format!("{n} users"),
    }
}

#[cfg(test)]
#[path = "driver_tests.rs"]
mod tests;
