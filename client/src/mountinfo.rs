//! What is mounted where, read from `/proc/self/mountinfo`.
//!
//! Shared by `attach` (is a FUSE attachment still mounted?) and the Docker
//! plugin, which asks the kernel rather than trusting its own records: a
//! mount can vanish behind its back (an admin's `umount`, a reboot), and
//! after a plugin restart the kernel is the only authority on what is still
//! mounted.

use std::path::{Path, PathBuf};

/// One line of mountinfo, reduced to what its users need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// Filesystem type (`ext4`, `xfs`, `fuse`, ...).
    pub fstype: String,
    /// The mount source: for block filesystems the device (`/dev/loop3`).
    pub source: String,
}

/// Undo mountinfo's octal escapes (`\040` space, `\011` tab, `\012`
/// newline, `\134` backslash).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse the text of a mountinfo file; malformed lines are skipped (the
/// format is the kernel's, and one odd line must not hide the others).
pub fn parse(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        // id parent major:minor root mountpoint options [optional...] - fstype source superopts
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < 5 || sep < 6 || fields.len() < sep + 3 {
            continue;
        }
        out.push(MountEntry {
            mountpoint: PathBuf::from(unescape(fields[4])),
            fstype: unescape(fields[sep + 1]),
            source: unescape(fields[sep + 2]),
        });
    }
    out
}

/// The mounts of this process's mount namespace.
pub fn read() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The topmost mount at `dir`, if any (later lines are mounted on top).
pub fn find<'a>(mounts: &'a [MountEntry], dir: &Path) -> Option<&'a MountEntry> {
    mounts.iter().rev().find(|m| m.mountpoint == dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
36 22 7:3 / /var/lib/ballast/mounts/v1 rw,relatime shared:40 - ext4 /dev/loop3 rw
37 22 0:55 / /var/lib/ballast/attach/v1 rw,nosuid,nodev,relatime shared:41 - fuse /dev/fuse rw,user_id=0
38 22 43:0 / /var/lib/ballast/mounts/with\\040space rw - xfs /dev/nbd0 rw,attr2
bogus line
";

    #[test]
    fn parses_mountinfo_lines() {
        let m = parse(SAMPLE);
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[1],
            MountEntry {
                mountpoint: "/var/lib/ballast/mounts/v1".into(),
                fstype: "ext4".into(),
                source: "/dev/loop3".into(),
            }
        );
        assert_eq!(m[2].fstype, "fuse");
        assert_eq!(
            m[3].mountpoint,
            PathBuf::from("/var/lib/ballast/mounts/with space")
        );
        assert_eq!(m[3].source, "/dev/nbd0");
        assert_eq!(
            find(&m, Path::new("/var/lib/ballast/mounts/v1"))
                .unwrap()
                .source,
            "/dev/loop3"
        );
        assert!(find(&m, Path::new("/var/lib/ballast/mounts/v2")).is_none());
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape("a\\040b\\134c\\011d"), "a b\\c\td");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape(r"/x\04"), r"/x\04");
    }

    #[test]
    fn reads_this_process_mounts() {
        let m = read().unwrap();
        assert!(m.iter().any(|e| e.mountpoint == Path::new("/")));
    }
}
