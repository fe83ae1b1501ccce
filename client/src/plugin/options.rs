//! `docker volume create -o KEY=VALUE` options, validated at Create.
//!
//! Docker hands the options over only once, at Create; a mistake found later
//! (at Mount, when a container starts) would surface far from its cause. So
//! every option is checked here, and an unknown key is an error rather than
//! something silently ignored (a typo such as `-o blocksize=64K` would
//! otherwise create a volume the user did not ask for).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::api::{CreateVolumeSpec, Volume};
use crate::cli::size::{parse_block_size, parse_nonzero_size, SizeError};

/// The options `-o` accepts, in the order the help text lists them.
pub const KNOWN: [&str; 6] = [
    "size",
    "block-size",
    "dedup",
    "compression",
    "replicas",
    "fs",
];

/// Size of a volume created without `-o size=...`. Volumes are thin: the
/// size costs nothing until data is written, so a generous default is cheap
/// and lets `docker run -v NAME:/data --volume-driver ballast` (which passes
/// no options) work.
pub const DEFAULT_SIZE: u64 = 10 << 30;

/// A filesystem the plugin can make on a volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fs {
    #[default]
    Ext4,
    Xfs,
}

impl Fs {
    /// The name `mount -t` and `blkid` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Fs::Ext4 => "ext4",
            Fs::Xfs => "xfs",
        }
    }

    /// The program that makes this filesystem.
    pub fn mkfs_program(self) -> &'static str {
        match self {
            Fs::Ext4 => "mkfs.ext4",
            Fs::Xfs => "mkfs.xfs",
        }
    }

    /// The Debian package that provides [`Fs::mkfs_program`].
    pub fn package(self) -> &'static str {
        match self {
            Fs::Ext4 => "e2fsprogs",
            Fs::Xfs => "xfsprogs",
        }
    }
}

impl fmt::Display for Fs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Fs {
    type Err = OptionError;
    fn from_str(s: &str) -> Result<Self, OptionError> {
        match s {
            "ext4" => Ok(Fs::Ext4),
            "xfs" => Ok(Fs::Xfs),
            _ => Err(OptionError::Invalid {
                key: "fs",
                value: s.to_string(),
                expected: "ext4 or xfs".into(),
            }),
        }
    }
}

/// An option that cannot be honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error(
        "unknown option {key:?}; valid options are size, block-size, dedup, compression, \
         replicas and fs (e.g. -o size=10G -o fs=ext4)"
    )]
    Unknown { key: String },
    /// The size parser's message names the value and what to pass.
    #[error("option size: {0}")]
    Size(SizeError),
    #[error("invalid value {value:?} for option {key}: pass {expected}")]
    Invalid {
        key: &'static str,
        value: String,
        expected: String,
    },
    #[error(
        "size {size} is not a multiple of the block size {block_size}; pass a size that is \
         (e.g. -o size={suggestion})"
    )]
    Unaligned {
        size: String,
        block_size: String,
        suggestion: String,
    },
}

/// Validated options. `None` means "not given": the server's default for a
/// new volume, and no constraint when an existing volume is adopted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeOptions {
    pub size_bytes: Option<u64>,
    pub block_size: Option<u32>,
    pub dedup: Option<bool>,
    /// `lz4` or `none`.
    pub compression: Option<String>,
    pub replicas: Option<u32>,
    pub fs: Option<Fs>,
}

/// A size in the form `-o size=` accepts, exactly: `128K`, `2G`, `1000`.
pub fn exact_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

fn invalid(key: &'static str, value: &str, expected: impl Into<String>) -> OptionError {
    OptionError::Invalid {
        key,
        value: value.to_string(),
        expected: expected.into(),
    }
}

impl VolumeOptions {
    /// Parse and check Docker's option map.
    pub fn parse(opts: &BTreeMap<String, String>) -> Result<Self, OptionError> {
        let mut o = VolumeOptions::default();
        for (key, value) in opts {
            let v = value.trim();
            match key.as_str() {
                "size" => {
                    let size = parse_nonzero_size(v).map_err(OptionError::Size)?;
                    o.size_bytes = Some(size);
                }
                "block-size" => {
                    let bs = parse_block_size(v)
                        .ok()
                        .filter(|bs| bs.is_power_of_two() && (512..=65536).contains(bs))
                        .ok_or_else(|| {
                            invalid(
                                "block-size",
                                value,
                                "a power of two from 512 to 64K, e.g. 4K",
                            )
                        })?;
                    o.block_size = Some(bs);
                }
                "dedup" => {
                    o.dedup = Some(match v {
                        "on" => true,
                        "off" => false,
                        _ => return Err(invalid("dedup", value, "on or off")),
                    });
                }
                "compression" => match v {
                    "lz4" | "none" => o.compression = Some(v.to_string()),
                    _ => return Err(invalid("compression", value, "lz4 or none")),
                },
                "replicas" => {
                    let n: u32 = v
                        .parse()
                        .ok()
                        .filter(|n| *n >= 1)
                        .ok_or_else(|| invalid("replicas", value, "a whole number >= 1"))?;
                    o.replicas = Some(n);
                }
                "fs" => o.fs = Some(v.parse()?),
                _ => {
                    return Err(OptionError::Unknown { key: key.clone() });
                }
            }
        }
        let bs = u64::from(o.block_size.unwrap_or(4096));
        if let Some(size) = o.size_bytes {
            if !size.is_multiple_of(bs) {
                let up = size.div_ceil(bs) * bs;
                return Err(OptionError::Unaligned {
                    size: exact_size(size),
                    block_size: exact_size(bs),
                    suggestion: exact_size(up),
                });
            }
        }
        Ok(o)
    }

    /// The control-plane request for a new volume named `name`.
    pub fn create_spec(&self, name: &str, default_size: u64) -> CreateVolumeSpec {
        CreateVolumeSpec {
            name: name.to_string(),
            size_bytes: self.size_bytes.unwrap_or(default_size),
            block_size: self.block_size,
            dedup: self.dedup,
            compression: self.compression.clone(),
            replicas: self.replicas,
        }
    }

    /// The options that an existing volume contradicts, as one sentence, or
    /// `None` when it can be adopted as it is. Only options the user gave
    /// count: `docker run --volume-driver` sends none.
    pub fn conflicts_with(&self, v: &Volume) -> Option<String> {
        let mut diffs = Vec::new();
        if let Some(s) = self.size_bytes.filter(|s| *s != v.size_bytes) {
            diffs.push(format!(
                "size {} (asked {})",
                exact_size(v.size_bytes),
                exact_size(s)
            ));
        }
        if let Some(bs) = self.block_size.filter(|bs| *bs != v.block_size) {
            diffs.push(format!(
                "block-size {} (asked {})",
                exact_size(u64::from(v.block_size)),
                exact_size(u64::from(bs))
            ));
        }
        if let Some(d) = self.dedup.filter(|d| *d != v.dedup) {
            let word = |b: bool| if b { "on" } else { "off" };
            diffs.push(format!("dedup {} (asked {})", word(v.dedup), word(d)));
        }
        if let Some(c) = self.compression.as_ref().filter(|c| **c != v.compression) {
            diffs.push(format!("compression {} (asked {c})", v.compression));
        }
        if let Some(r) = self
            .replicas
            .filter(|r| *r as usize != v.replicas.len().max(1))
        {
            diffs.push(format!("replicas {} (asked {r})", v.replicas.len().max(1)));
        }
        if diffs.is_empty() {
            None
        } else {
            Some(diffs.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parse(pairs: &[(&str, &str)]) -> Result<VolumeOptions, String> {
        VolumeOptions::parse(&opts(pairs)).map_err(|e| e.to_string())
    }

    #[test]
    fn all_options_parse() {
        let o = parse(&[
            ("size", "1G"),
            ("block-size", "64K"),
            ("dedup", "off"),
            ("compression", "none"),
            ("replicas", "1"),
            ("fs", "xfs"),
        ])
        .unwrap();
        assert_eq!(
            o,
            VolumeOptions {
                size_bytes: Some(1 << 30),
                block_size: Some(65536),
                dedup: Some(false),
                compression: Some("none".into()),
                replicas: Some(1),
                fs: Some(Fs::Xfs),
            }
        );
        let spec = o.create_spec("v", DEFAULT_SIZE);
        assert_eq!(spec.size_bytes, 1 << 30);
        assert_eq!(spec.block_size, Some(65536));
        assert_eq!(spec.dedup, Some(false));
    }

    #[test]
    fn no_options_use_defaults() {
        let o = parse(&[]).unwrap();
        assert_eq!(o, VolumeOptions::default());
        let spec = o.create_spec("v", DEFAULT_SIZE);
        assert_eq!(spec.size_bytes, DEFAULT_SIZE);
        assert_eq!(spec.block_size, None);
        assert_eq!(spec.compression, None);
    }

    #[test]
    fn unknown_option_names_the_valid_ones() {
        let e = parse(&[("blocksize", "4K")]).unwrap_err();
        assert!(e.contains("unknown option \"blocksize\""), "{e}");
        assert!(e.contains("block-size"), "{e}");
    }

    #[test]
    fn bad_values_say_what_to_pass() {
        let e = parse(&[("size", "12Q")]).unwrap_err();
        assert!(
            e.starts_with("option size: invalid size \"12Q\": unknown unit \"Q\"; pass bytes"),
            "{e}"
        );
        let e = parse(&[("size", "0")]).unwrap_err();
        assert!(
            e.starts_with("option size: size must be greater than 0; pass"),
            "{e}"
        );
        let e = parse(&[("fs", "btrfs")]).unwrap_err();
        assert_eq!(e, "invalid value \"btrfs\" for option fs: pass ext4 or xfs");
        let e = parse(&[("dedup", "yes")]).unwrap_err();
        assert!(e.ends_with("pass on or off"), "{e}");
        let e = parse(&[("compression", "zstd")]).unwrap_err();
        assert!(e.ends_with("pass lz4 or none"), "{e}");
        let e = parse(&[("replicas", "0")]).unwrap_err();
        assert!(e.ends_with("pass a whole number >= 1"), "{e}");
        let e = parse(&[("block-size", "3000")]).unwrap_err();
        assert!(e.contains("a power of two from 512 to 64K"), "{e}");
    }

    #[test]
    fn size_must_be_a_multiple_of_the_block_size() {
        let e = parse(&[("size", "100000")]).unwrap_err();
        assert!(
            e.contains("size 100000 is not a multiple of the block size 4K"),
            "{e}"
        );
        assert!(e.contains("-o size=100K"), "{e}");
        assert!(parse(&[("size", "1G"), ("block-size", "64K")]).is_ok());
        let e = parse(&[("size", "96K"), ("block-size", "64K")]).unwrap_err();
        assert!(e.contains("-o size=128K"), "{e}");
    }

    fn volume() -> Volume {
        Volume {
            name: "v".into(),
            size_bytes: 2 << 30,
            block_size: 4096,
            mapped_bytes: 0,
            dedup: true,
            compression: "lz4".into(),
            read_only: false,
            parent_snapshot: None,
            replicas: vec![],
            generation: 0,
            created_unix: 0,
        }
    }

    #[test]
    fn adoption_conflicts_only_on_given_options() {
        let v = volume();
        assert_eq!(parse(&[]).unwrap().conflicts_with(&v), None);
        assert_eq!(
            parse(&[("size", "2G"), ("fs", "xfs")])
                .unwrap()
                .conflicts_with(&v),
            None
        );
        let c = parse(&[("size", "1G"), ("dedup", "off")])
            .unwrap()
            .conflicts_with(&v)
            .unwrap();
        assert_eq!(c, "size 2G (asked 1G), dedup on (asked off)");
    }
}
