//! The suite file: settings, targets and workloads (TOML).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::bench::Pattern;

/// A whole suite file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    /// Settings shared by every target and workload.
    #[serde(default)]
    pub settings: Settings,
    /// Servers to compare.
    #[serde(rename = "target", default)]
    pub targets: Vec<TargetSpec>,
    /// Loads to run on each target.
    #[serde(rename = "workload", default)]
    pub workloads: Vec<WorkloadSpec>,
}

/// `[settings]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Size of every export (`1G`).
    pub size: String,
    /// Runs of each (workload, target) pair; the report shows medians.
    pub repeats: u32,
    /// Default run time of a workload.
    pub duration: String,
    /// Write the whole export once before the workloads.
    pub prefill: bool,
    /// Request size of the prefill.
    pub prefill_block_size: String,
    /// Duplicate share of the prefill data.
    pub prefill_dedupe_percent: u8,
    /// Compressible share of the prefill data.
    pub prefill_compress_percent: u8,
    /// Seed of all generated data and offsets.
    pub seed: u64,
    /// Where image files and server data go (default: a folder in the results).
    pub scratch_dir: Option<PathBuf>,
    /// Results folder (default: `bench-results/suite-<unix time>`).
    pub out: Option<PathBuf>,
    /// Pause between runs, letting servers settle.
    pub pause: String,
    /// How long a target may take to start listening.
    pub start_timeout: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            size: "1G".into(),
            repeats: 3,
            duration: "10s".into(),
            prefill: true,
            prefill_block_size: "1M".into(),
            prefill_dedupe_percent: 0,
            prefill_compress_percent: 50,
            seed: 1,
            scratch_dir: None,
            out: None,
            pause: "1s".into(),
            start_timeout: "30s".into(),
        }
    }
}

impl TargetKind {
    /// Whether what is written can be read back: nbdkit's `null` and `zero`
    /// plugins discard writes, so `verify` workloads run on them unverified
    /// (they still measure the protocol ceiling) instead of failing the suite.
    pub fn stores_data(&self) -> bool {
        !matches!(self, TargetKind::Nbdkit { plugin, .. } if plugin == "null" || plugin == "zero")
    }
}

/// `[[target]]`: a name plus how to start it.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TargetSpec {
    /// Unique name used in reports.
    pub name: String,
    /// How to run it.
    #[serde(flatten)]
    pub kind: TargetKind,
}

/// Kinds of target. Strings in `args` may use `{port}`, `{size}` (bytes),
/// `{file}` (a raw image file of the export size, created on demand) and
/// `{dir}` (a scratch folder of the target).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TargetKind {
    /// `ballastd` plus a volume created with `ballast volume create`, both
    /// found next to the running executable.
    Ballast {
        /// Extra arguments of ballastd.
        #[serde(default)]
        daemon_args: Vec<String>,
        /// Extra arguments of `ballast volume create NAME --size SIZE`.
        #[serde(default)]
        volume_args: Vec<String>,
    },
    /// `nbdkit -f -i 127.0.0.1 -p PORT [--filter=F]... PLUGIN ARGS...`.
    Nbdkit {
        /// Plugin name (`memory`, `file`, `null`, ...).
        plugin: String,
        /// Plugin arguments (default: `{size}` for memory/null, `{file}` for file).
        #[serde(default)]
        args: Vec<String>,
        /// Filters.
        #[serde(default)]
        filters: Vec<String>,
    },
    /// `qemu-nbd` serving a raw image file.
    QemuNbd {
        /// `--cache=` (none, writeback, writethrough, directsync, unsafe).
        #[serde(default = "default_cache")]
        cache: String,
        /// `--aio=` (threads, native, io_uring).
        #[serde(default = "default_aio")]
        aio: String,
        /// Extra arguments.
        #[serde(default)]
        args: Vec<String>,
    },
    /// Any NBD server started by a command line.
    Command {
        /// Program.
        program: String,
        /// Arguments.
        #[serde(default)]
        args: Vec<String>,
        /// URI to connect to, e.g. `nbd://127.0.0.1:{port}/`.
        uri: String,
    },
}

fn default_cache() -> String {
    "writeback".into()
}

fn default_aio() -> String {
    "threads".into()
}

/// `[[workload]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Unique name used in reports.
    pub name: String,
    /// Access pattern.
    pub pattern: Pattern,
    /// Request size.
    #[serde(default = "default_bs")]
    pub block_size: String,
    /// Requests in flight per connection.
    #[serde(default = "default_qd")]
    pub queue_depth: u32,
    /// Connections.
    #[serde(default = "default_one")]
    pub connections: u32,
    /// Run time (default: settings.duration).
    pub duration: Option<String>,
    /// Stop after this many bytes instead.
    pub bytes: Option<String>,
    /// Share of reads in randrw.
    #[serde(default = "default_read_percent")]
    pub read_percent: u8,
    /// Duplicate share of written data.
    #[serde(default)]
    pub dedupe_percent: u8,
    /// Compressible share of written data.
    #[serde(default)]
    pub compress_percent: u8,
    /// Verify written data.
    #[serde(default)]
    pub verify: bool,
}

fn default_bs() -> String {
    "4k".into()
}
fn default_qd() -> u32 {
    32
}
fn default_one() -> u32 {
    1
}
fn default_read_percent() -> u8 {
    70
}

/// Parse a size setting.
pub fn size(what: &str, s: &str) -> anyhow::Result<u64> {
    ballast_proto::size::parse_size(s).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

/// Parse a duration setting.
pub fn duration(what: &str, s: &str) -> anyhow::Result<Duration> {
    crate::bench::parse_duration(s).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

impl Suite {
    /// Read and check a suite file.
    pub fn load(path: &std::path::Path) -> anyhow::Result<Suite> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read suite file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in suite file {}", path.display()))
    }

    /// Parse and check suite TOML.
    pub fn parse(text: &str) -> anyhow::Result<Suite> {
        let suite: Suite = toml::from_str(text)?;
        suite.check()?;
        Ok(suite)
    }

    fn check(&self) -> anyhow::Result<()> {
        let s = &self.settings;
        if size("settings.size", &s.size)? == 0 {
            bail!("settings.size must be more than zero");
        }
        size("settings.prefill_block_size", &s.prefill_block_size)?;
        duration("settings.duration", &s.duration)?;
        duration("settings.pause", &s.pause)?;
        duration("settings.start_timeout", &s.start_timeout)?;
        if s.repeats == 0 {
            bail!("settings.repeats must be at least 1");
        }
        if self.targets.is_empty() || self.workloads.is_empty() {
            bail!("a suite needs at least one [[target]] and one [[workload]]");
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.targets {
            if !names.insert(("target", t.name.as_str())) {
                bail!("two targets are named {:?}", t.name);
            }
        }
        for w in &self.workloads {
            if !names.insert(("workload", w.name.as_str())) {
                bail!("two workloads are named {:?}", w.name);
            }
            let what = format!("workload {}", w.name);
            size(&what, &w.block_size)?;
            if let Some(d) = &w.duration {
                duration(&what, d)?;
            }
            if let Some(b) = &w.bytes {
                size(&what, b)?;
            }
            if w.queue_depth == 0 || w.connections == 0 {
                bail!("{what}: queue_depth and connections must be at least 1");
            }
            if w.read_percent > 100 || w.dedupe_percent > 100 || w.compress_percent > 100 {
                bail!("{what}: percentages must be 0..=100");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_target_kinds() {
        let s = Suite::parse(
            r#"
            [settings]
            size = "64M"
            repeats = 2

            [[target]]
            name = "b"
            kind = "ballast"
            volume_args = ["--compression", "lz4"]

            [[target]]
            name = "m"
            kind = "nbdkit"
            plugin = "memory"

            [[target]]
            name = "q"
            kind = "qemu-nbd"
            cache = "none"
            aio = "io_uring"

            [[target]]
            name = "c"
            kind = "command"
            program = "nbdkit"
            args = ["-f", "-p", "{port}", "null", "{size}"]
            uri = "nbd://127.0.0.1:{port}/"

            [[workload]]
            name = "rr"
            pattern = "randread"
            "#,
        )
        .unwrap();
        assert_eq!(s.targets.len(), 4);
        assert!(
            matches!(s.targets[2].kind, TargetKind::QemuNbd { ref aio, .. } if aio == "io_uring")
        );
        assert_eq!(s.workloads[0].queue_depth, 32);
        assert_eq!(s.settings.repeats, 2);
        // memory keeps data; ballast, qemu-nbd and commands are assumed to.
        assert!(s.targets.iter().all(|t| t.kind.stores_data()));
        let null = TargetKind::Nbdkit {
            plugin: "null".into(),
            args: vec![],
            filters: vec![],
        };
        assert!(!null.stores_data(), "nbdkit null discards writes");
    }

    #[test]
    fn rejects_mistakes() {
        for bad in [
            "[[target]]\nname='a'\nkind='nbdkit'\nplugin='memory'\n",
            "[[workload]]\nname='w'\npattern='randread'\n",
            "[settings]\nsize='12Q'\n[[target]]\nname='a'\nkind='nbdkit'\nplugin='null'\n[[workload]]\nname='w'\npattern='randread'\n",
            "[[target]]\nname='a'\nkind='nope'\n[[workload]]\nname='w'\npattern='randread'\n",
            "[[target]]\nname='a'\nkind='nbdkit'\nplugin='null'\n[[workload]]\nname='w'\npattern='sideways'\n",
            "[[target]]\nname='a'\nkind='nbdkit'\nplugin='null'\n[[target]]\nname='a'\nkind='nbdkit'\nplugin='null'\n[[workload]]\nname='w'\npattern='read'\n",
        ] {
            assert!(Suite::parse(bad).is_err(), "{bad}");
        }
    }
}
