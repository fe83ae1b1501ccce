//! The record of current attachments: one JSON file per attached volume under
//! the state directory (default `/run/ballast/attach`, or `$BALLAST_STATE_DIR`).
//!
//! Files are written to a temporary name, fsynced and renamed, so a reader
//! never sees half a record. `/run` is a tmpfs, so records vanish with a
//! reboot, exactly like the attachments they describe.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{AttachError, Attachment};

/// Where records live when `BALLAST_STATE_DIR` is not set.
pub const DEFAULT_STATE_DIR: &str = "/run/ballast/attach";
/// Environment variable that moves the state directory (tests isolate with it).
pub const STATE_DIR_ENV: &str = "BALLAST_STATE_DIR";

/// What the registry keeps about one attachment: the public [`Attachment`]
/// plus bookkeeping that `--list --json` does not print.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    #[serde(flatten)]
    pub attachment: Attachment,
    /// ballastd's control API the attachment was made through.
    #[serde(default)]
    pub api: String,
    /// Log file of the FUSE serving process.
    #[serde(default)]
    pub log: Option<PathBuf>,
    /// Set by a FUSE serving process whose final flush or unmount failed, so
    /// `ballast detach` can report it after the process has gone.
    #[serde(default)]
    pub failure: Option<String>,
}

/// The state directory and its records.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

impl Registry {
    /// The registry at `$BALLAST_STATE_DIR`, or `/run/ballast/attach`.
    pub fn from_env() -> Registry {
        let dir = std::env::var_os(STATE_DIR_ENV)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        Registry { dir }
    }

    /// A registry at an explicit folder.
    pub fn at(dir: impl Into<PathBuf>) -> Registry {
        Registry { dir: dir.into() }
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn state_err(&self, path: &Path, source: io::Error) -> AttachError {
        AttachError::State {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Create the state directory (and its `logs/` folder) if needed.
    pub fn ensure(&self) -> Result<(), AttachError> {
        let logs = self.logs_dir();
        fs::create_dir_all(&logs).map_err(|e| self.state_err(&logs, e))
    }

    /// Folder for the FUSE serving processes' logs.
    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// Log file of the serving process of `volume`.
    pub fn log_path(&self, volume: &str) -> PathBuf {
        self.logs_dir().join(format!("{}.log", file_stem(volume)))
    }

    /// Path of the record of `volume`.
    pub fn path(&self, volume: &str) -> PathBuf {
        self.dir.join(format!("{}.json", file_stem(volume)))
    }

    /// Write (or replace) the record of `rec.attachment.volume` atomically.
    pub fn save(&self, rec: &Record) -> Result<(), AttachError> {
        self.ensure()?;
        let path = self.path(&rec.attachment.volume);
        let tmp = self.dir.join(format!(
            ".{}.{}.tmp",
            file_stem(&rec.attachment.volume),
            std::process::id()
        ));
        let json = serde_json::to_vec_pretty(rec)
            .map_err(|e| self.state_err(&path, io::Error::new(io::ErrorKind::InvalidData, e)))?;
        let write = || -> io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            // The rename is durable once the directory is synced; on tmpfs
            // this is free, elsewhere it keeps records across a crash.
            fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            self.state_err(&path, e)
        })
    }

    /// The record of `volume`, if any.
    pub fn load(&self, volume: &str) -> Result<Option<Record>, AttachError> {
        read_record(&self.path(volume)).map_err(|e| self.state_err(&self.path(volume), e))
    }

    /// Remove the record of `volume` (no error if it is already gone).
    pub fn remove(&self, volume: &str) -> Result<(), AttachError> {
        let path = self.path(volume);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.state_err(&path, e)),
        }
    }

    /// Every record, sorted by volume name. Unreadable files are skipped
    /// with a warning on stderr (they are not ours to delete).
    pub fn all(&self) -> Result<Vec<Record>, AttachError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.state_err(&self.dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| self.state_err(&self.dir, e))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            match read_record(&path) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => {}
                Err(e) => eprintln!(
                    "warning: ignoring unreadable attachment record {}: {e}",
                    path.display()
                ),
            }
        }
        out.sort_by(|a, b| a.attachment.volume.cmp(&b.attachment.volume));
        Ok(out)
    }
}

fn read_record(path: &Path) -> io::Result<Option<Record>> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A file name for `volume`. Volume names are `[A-Za-z0-9._-]`, which are
/// safe as they are; anything else (and a leading dot) is escaped so a name
/// can never step outside the state directory.
fn file_stem(volume: &str) -> String {
    let mut s = String::with_capacity(volume.len());
    for (i, c) in volume.chars().enumerate() {
        if c.is_ascii_alphanumeric() || c == '-' || c == '_' || (c == '.' && i > 0) {
            s.push(c);
        } else {
            s.push_str(&format!("%{:02x}", c as u32));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::AttachKind;

    fn rec(volume: &str) -> Record {
        Record {
            attachment: Attachment {
                volume: volume.into(),
                kind: AttachKind::Fuse,
                device: format!("/mnt/x/{volume}"),
                mountpoint: Some("/mnt/x".into()),
                pid: Some(42),
                nbd_uri: format!("nbd://127.0.0.1:10809/{volume}"),
            },
            api: "http://127.0.0.1:7800".into(),
            log: None,
            failure: None,
        }
    }

    #[test]
    fn save_load_list_remove() {
        let dir = tempdir();
        let reg = Registry::at(dir.join("state"));
        assert!(
            reg.all().unwrap().is_empty(),
            "a missing dir is an empty registry"
        );
        reg.save(&rec("b")).unwrap();
        reg.save(&rec("a")).unwrap();
        let all = reg.all().unwrap();
        assert_eq!(
            all.iter()
                .map(|r| r.attachment.volume.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(reg.load("a").unwrap(), Some(rec("a")));
        // Replacing is atomic and leaves no temporary file behind.
        let mut changed = rec("a");
        changed.failure = Some("final flush failed".into());
        reg.save(&changed).unwrap();
        assert_eq!(reg.load("a").unwrap(), Some(changed));
        let names: Vec<String> = fs::read_dir(reg.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        reg.remove("a").unwrap();
        reg.remove("a").unwrap();
        assert_eq!(reg.load("a").unwrap(), None);
        assert_eq!(reg.all().unwrap().len(), 1);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn record_json_flattens_the_attachment() {
        let j = serde_json::to_value(rec("v1")).unwrap();
        assert_eq!(j["volume"], "v1");
        assert_eq!(j["kind"], "fuse");
        assert_eq!(j["pid"], 42);
        assert_eq!(j["api"], "http://127.0.0.1:7800");
    }

    #[test]
    fn file_names_cannot_escape() {
        assert_eq!(file_stem("vol-1.a_b"), "vol-1.a_b");
        assert_eq!(file_stem("../x"), "%2e.%2fx");
        assert_eq!(file_stem(".hidden"), "%2ehidden");
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ballast-registry-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }
}
