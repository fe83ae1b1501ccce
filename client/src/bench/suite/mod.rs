//! `ballast bench suite FILE`: start every target of a suite file, prefill
//! each identically, run every workload on every target interleaved
//! (A B A B ...) with repeats, and write a results folder:
//!
//! * `raw.json`: every run's full report, plus target statuses;
//! * `summary.json`: medians per (workload, target) and ratios to the best;
//! * `results.md`: the same as Markdown tables;
//! * `<workload>.png`: a bar chart per workload;
//! * `logs/<target>.log`: each server's output.
//!
//! Targets whose program is missing (e.g. `ballastd` not built, `qemu-nbd`
//! not installed) are skipped with a message; targets that fail to start
//! are reported as failed; the other targets still run.

pub mod chart;
pub mod config;
pub mod targets;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde::Serialize;

use super::{report::fmt_bytes, run_load, BenchReport, Live, LoadConfig, Pattern};
use config::{Suite, TargetKind, WorkloadSpec};
use targets::{Running, StartCtx, StartError};

/// Arguments of `ballast bench suite`.
#[derive(Debug, Clone, clap::Args)]
pub struct SuiteArgs {
    /// Suite description (TOML), e.g. benches/suite.toml.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Results folder (default: settings.out, else bench-results/suite-<unix time>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Only these targets (comma-separated names).
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub targets: Vec<String>,
    /// Only these workloads (comma-separated names).
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Override settings.repeats.
    #[arg(long, value_name = "N")]
    pub repeats: Option<u32>,
    /// Override the run time of every workload (e.g. 2s for a quick look).
    #[arg(long, value_name = "TIME", value_parser = super::parse_duration)]
    pub duration: Option<Duration>,
    /// Override settings.size (export size).
    #[arg(long, value_name = "SIZE")]
    pub size: Option<String>,
    /// Print summary.json to stdout instead of the Markdown tables.
    #[arg(long)]
    pub json: bool,
}

/// Status of a target in the results.
#[derive(Debug, Clone, Serialize)]
pub struct TargetStatus {
    /// Name.
    pub name: String,
    /// Kind (`ballast`, `nbdkit`, `qemu-nbd`, `command`).
    pub kind: String,
    /// `ok`, `skipped` or `failed`.
    pub status: String,
    /// Why not ok.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Prefill time in seconds.
    pub prefill_seconds: f64,
}

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    /// Workload name.
    pub workload: String,
    /// Target name.
    pub target: String,
    /// Repeat number (0-based).
    pub repeat: u32,
    /// Result, if the run succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<BenchReport>,
    /// Error, if it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Medians of one (workload, target) pair.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// Workload name.
    pub workload: String,
    /// Target name.
    pub target: String,
    /// Successful runs.
    pub runs: usize,
    /// Failed runs.
    pub failures: usize,
    /// Median IOPS.
    pub iops: Option<f64>,
    /// Lowest IOPS of the runs.
    pub iops_min: Option<f64>,
    /// Highest IOPS of the runs.
    pub iops_max: Option<f64>,
    /// Median MB/s.
    pub mbps: Option<f64>,
    /// Median of the runs' p50 latency (µs).
    pub p50_us: Option<f64>,
    /// Median of the runs' p99 latency (µs).
    pub p99_us: Option<f64>,
    /// Median of the runs' p99.9 latency (µs).
    pub p999_us: Option<f64>,
    /// Median IOPS divided by the best target's median IOPS on this workload.
    pub ratio_to_best: Option<f64>,
    /// Verification mismatches over all runs.
    pub verify_errors: u64,
    /// Why there is no result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Suite file.
    pub suite: String,
    /// Start time (unix seconds).
    pub started_unix: u64,
    /// Wall time of the whole suite.
    pub seconds: f64,
    /// Settings in force.
    pub settings: config::Settings,
    /// Targets and their status.
    pub targets: Vec<TargetStatus>,
    /// Medians.
    pub cells: Vec<Cell>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn kind_name(k: &TargetKind) -> &'static str {
    match k {
        TargetKind::Ballast { .. } => "ballast",
        TargetKind::Nbdkit { .. } => "nbdkit",
        TargetKind::QemuNbd { .. } => "qemu-nbd",
        TargetKind::Command { .. } => "command",
    }
}

fn workload_config(
    w: &WorkloadSpec,
    r: &Running,
    suite: &Suite,
    duration_override: Option<Duration>,
    size: u64,
) -> anyhow::Result<LoadConfig> {
    let what = format!("workload {}", w.name);
    let mut cfg = LoadConfig::new(r.uri.clone(), w.pattern);
    cfg.block_size = config::size(&what, &w.block_size)? as u32;
    cfg.queue_depth = w.queue_depth as usize;
    cfg.connections = w.connections as usize;
    cfg.bytes = w
        .bytes
        .as_deref()
        .map(|b| config::size(&what, b))
        .transpose()?;
    cfg.duration = match (duration_override, &w.duration, cfg.bytes) {
        (Some(d), _, _) => Some(d),
        (None, Some(d), _) => Some(config::duration(&what, d)?),
        (None, None, Some(_)) => None,
        (None, None, None) => Some(config::duration(
            "settings.duration",
            &suite.settings.duration,
        )?),
    };
    cfg.read_percent = w.read_percent;
    cfg.dedupe_percent = w.dedupe_percent;
    cfg.compress_percent = w.compress_percent;
    cfg.verify = w.verify
        && suite
            .targets
            .iter()
            .find(|t| t.name == r.name)
            .is_none_or(|t| t.kind.stores_data());
    cfg.seed = suite.settings.seed;
    cfg.size = Some(size);
    Ok(cfg)
}

async fn prefill(r: &Running, suite: &Suite, size: u64) -> anyhow::Result<f64> {
    let s = &suite.settings;
    let mut cfg = LoadConfig::new(r.uri.clone(), Pattern::Write);
    let bs = config::size("settings.prefill_block_size", &s.prefill_block_size)?;
    cfg.block_size = bs.min(size).max(512) as u32;
    cfg.queue_depth = 8;
    cfg.duration = None;
    cfg.bytes = Some(size);
    cfg.size = Some(size);
    cfg.dedupe_percent = s.prefill_dedupe_percent;
    cfg.compress_percent = s.prefill_compress_percent;
    cfg.seed = s.seed ^ 0x5052_4546_494c_4c00;
    let report = run_load(&cfg, Arc::new(Live::default())).await?;
    let c = crate::nbd::NbdClient::connect_with(&r.uri, &Default::default()).await?;
    if c.flags().can_flush() {
        c.flush().await?;
    }
    c.disconnect().await?;
    Ok(report.seconds)
}

/// Run a suite.
pub async fn run(args: SuiteArgs) -> anyhow::Result<()> {
    let mut suite = Suite::load(&args.file)?;
    if let Some(n) = args.repeats {
        if n == 0 {
            bail!("--repeats must be at least 1");
        }
        suite.settings.repeats = n;
    }
    if let Some(s) = &args.size {
        suite.settings.size = s.clone();
    }
    for (names, what) in [(&args.targets, "target"), (&args.workloads, "workload")] {
        for n in names {
            let known = match what {
                "target" => suite.targets.iter().any(|t| &t.name == n),
                _ => suite.workloads.iter().any(|w| &w.name == n),
            };
            if !known {
                bail!("no {what} named {n:?} in {}", args.file.display());
            }
        }
    }
    if !args.targets.is_empty() {
        suite.targets.retain(|t| args.targets.contains(&t.name));
    }
    if !args.workloads.is_empty() {
        suite.workloads.retain(|w| args.workloads.contains(&w.name));
    }
    let size = config::size("settings.size", &suite.settings.size)?;
    let pause = config::duration("settings.pause", &suite.settings.pause)?;
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let wall = std::time::Instant::now();
    let out = args
        .out
        .clone()
        .or_else(|| suite.settings.out.clone())
        .unwrap_or_else(|| PathBuf::from(format!("bench-results/suite-{started}")));
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let own_scratch = suite.settings.scratch_dir.is_none();
    let scratch = suite
        .settings
        .scratch_dir
        .clone()
        .unwrap_or_else(|| out.join("scratch"));
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    let ctx = StartCtx {
        size,
        scratch: scratch.clone(),
        logs,
        timeout: config::duration("settings.start_timeout", &suite.settings.start_timeout)?,
    };
    eprintln!(
        "suite {}: {} target(s), {} workload(s), {} repeat(s), export size {}; results in {}",
        args.file.display(),
        suite.targets.len(),
        suite.workloads.len(),
        suite.settings.repeats,
        fmt_bytes(size),
        out.display()
    );

    let mut statuses = Vec::new();
    let mut running: Vec<Running> = Vec::new();
    for t in &suite.targets {
        let mut st = TargetStatus {
            name: t.name.clone(),
            kind: kind_name(&t.kind).to_string(),
            status: "ok".into(),
            message: String::new(),
            prefill_seconds: 0.0,
        };
        match targets::start(t, &ctx).await {
            Ok(r) => {
                if suite.settings.prefill {
                    eprintln!(
                        "target {}: started at {}, prefilling {}",
                        t.name,
                        r.uri,
                        fmt_bytes(size)
                    );
                    match prefill(&r, &suite, size).await {
                        Ok(s) => st.prefill_seconds = (s * 1000.0).round() / 1000.0,
                        Err(e) => {
                            st.status = "failed".into();
                            st.message = format!("prefill failed: {e:#}");
                        }
                    }
                } else {
                    eprintln!("target {}: started at {}", t.name, r.uri);
                }
                if st.status == "ok" {
                    running.push(r);
                }
            }
            Err(e) => {
                st.status = match e {
                    StartError::Skipped(_) => "skipped",
                    StartError::Failed(_) => "failed",
                }
                .into();
                st.message = match e {
                    StartError::Skipped(m) | StartError::Failed(m) => m,
                };
            }
        }
        if st.status != "ok" {
            eprintln!("target {}: {} ({})", t.name, st.status, st.message);
        }
        statuses.push(st);
    }

    let mut records = Vec::new();
    let total = suite.workloads.len() * suite.settings.repeats as usize * running.len();
    let mut n = 0;
    for w in &suite.workloads {
        for rep in 0..suite.settings.repeats {
            for r in running.iter_mut() {
                if super::INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                n += 1;
                let mut rec = RunRecord {
                    workload: w.name.clone(),
                    target: r.name.clone(),
                    repeat: rep,
                    report: None,
                    error: None,
                };
                if !r.alive() {
                    rec.error = Some(format!(
                        "the target's server is gone (log {})",
                        r.log.display()
                    ));
                } else {
                    let res = match workload_config(w, r, &suite, args.duration, size) {
                        Ok(cfg) => super::run_with_progress(cfg, 1, false).await,
                        Err(e) => Err(e),
                    };
                    match res {
                        Ok(rep) => rec.report = Some(rep),
                        Err(e) => rec.error = Some(format!("{e:#}")),
                    }
                }
                match (&rec.report, &rec.error) {
                    (Some(rp), _) => eprintln!(
                        "[{n}/{total}] {} #{} on {}: {:.0} IOPS {:.1} MB/s p50 {}us p99 {}us{}",
                        w.name,
                        rep + 1,
                        r.name,
                        rp.iops,
                        rp.mbps,
                        rp.latency_us.p50,
                        rp.latency_us.p99,
                        if rp.verify_errors > 0 {
                            format!(" VERIFY ERRORS {}", rp.verify_errors)
                        } else {
                            String::new()
                        }
                    ),
                    (None, Some(e)) => {
                        eprintln!(
                            "[{n}/{total}] {} #{} on {}: failed: {e}",
                            w.name,
                            rep + 1,
                            r.name
                        )
                    }
                    (None, None) => {}
                }
                records.push(rec);
                if !pause.is_zero() && n < total {
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
    for r in running.iter_mut() {
        r.stop();
    }
    drop(running);
    if own_scratch {
        let _ = std::fs::remove_dir_all(&scratch);
    }

    let cells = summarize(&suite, &statuses, &records);
    let summary = Summary {
        suite: args.file.display().to_string(),
        started_unix: started,
        seconds: (wall.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        settings: suite.settings.clone(),
        targets: statuses.clone(),
        cells,
    };
    write_json(
        &out.join("raw.json"),
        &serde_json::json!({
            "suite": summary.suite,
            "started_unix": started,
            "settings": suite.settings,
            "targets": statuses,
            "workloads": suite.workloads,
            "runs": records,
        }),
    )?;
    write_json(&out.join("summary.json"), &summary)?;
    let md = markdown(&suite, &summary);
    std::fs::write(out.join("results.md"), &md)
        .with_context(|| format!("cannot write {}", out.join("results.md").display()))?;
    for w in &suite.workloads {
        let path = out.join(format!("{}.png", file_safe(&w.name)));
        chart_for(&path, w, &suite, &summary)?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("{md}");
    }
    eprintln!("results written to {}", out.display());
    if !statuses.iter().any(|s| s.status == "ok") {
        bail!(
            "no target could be started (see {})",
            out.join("results.md").display()
        );
    }
    let verify_errors: u64 = summary.cells.iter().map(|c| c.verify_errors).sum();
    if verify_errors > 0 {
        bail!(
            "{verify_errors} verification error(s); see {}",
            out.display()
        );
    }
    Ok(())
}

fn write_json<T: Serialize>(path: &std::path::Path, v: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

fn file_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn summarize(suite: &Suite, statuses: &[TargetStatus], records: &[RunRecord]) -> Vec<Cell> {
    let mut cells = Vec::new();
    for w in &suite.workloads {
        let mut row: Vec<Cell> = statuses
            .iter()
            .map(|t| {
                let runs: Vec<&BenchReport> = records
                    .iter()
                    .filter(|r| r.workload == w.name && r.target == t.name)
                    .filter_map(|r| r.report.as_ref())
                    .collect();
                let failures = records
                    .iter()
                    .filter(|r| r.workload == w.name && r.target == t.name && r.error.is_some())
                    .count();
                let pick = |f: fn(&BenchReport) -> f64| median(runs.iter().map(|r| f(r)).collect());
                let iops: Vec<f64> = runs.iter().map(|r| r.iops).collect();
                let note = if t.status != "ok" {
                    Some(format!("{}: {}", t.status, t.message))
                } else if runs.is_empty() {
                    records
                        .iter()
                        .find(|r| r.workload == w.name && r.target == t.name)
                        .and_then(|r| r.error.clone())
                } else {
                    None
                };
                Cell {
                    workload: w.name.clone(),
                    target: t.name.clone(),
                    runs: runs.len(),
                    failures,
                    iops: pick(|r| r.iops),
                    iops_min: iops.iter().copied().reduce(f64::min),
                    iops_max: iops.iter().copied().reduce(f64::max),
                    mbps: pick(|r| r.mbps),
                    p50_us: pick(|r| r.latency_us.p50),
                    p99_us: pick(|r| r.latency_us.p99),
                    p999_us: pick(|r| r.latency_us.p999),
                    ratio_to_best: None,
                    verify_errors: runs.iter().map(|r| r.verify_errors).sum(),
                    note,
                }
            })
            .collect();
        let best = row.iter().filter_map(|c| c.iops).fold(0f64, f64::max);
        for c in row.iter_mut() {
            if let (Some(i), true) = (c.iops, best > 0.0) {
                c.ratio_to_best = Some((i / best * 1000.0).round() / 1000.0);
            }
        }
        cells.extend(row);
    }
    cells
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".to_string(), |x| format!("{x:.digits$}"))
}

fn workload_line(w: &WorkloadSpec) -> String {
    let mut s = format!(
        "{}, bs {}, qd {}, {} connection(s)",
        w.pattern, w.block_size, w.queue_depth, w.connections
    );
    if w.pattern == Pattern::Randrw {
        s.push_str(&format!(", {}% reads", w.read_percent));
    }
    if w.pattern.writes() {
        s.push_str(&format!(
            ", dedupe {}%, compress {}%",
            w.dedupe_percent, w.compress_percent
        ));
    }
    if w.verify {
        s.push_str(", verified");
    }
    s
}

fn markdown(suite: &Suite, s: &Summary) -> String {
    let mut md = format!(
        "# Benchmark suite `{}`\n\nStarted at unix time {}, took {:.0} s. Export size {}, {} repeat(s) per \
         workload and target, run interleaved (A B A B ...); numbers are medians over the repeats, \
         \"vs best\" is the median IOPS over the best target's.\n\n## Targets\n\n\
         | target | kind | status | prefill s | note |\n|---|---|---|---:|---|\n",
        s.suite,
        s.started_unix,
        s.seconds,
        s.settings.size,
        s.settings.repeats
    );
    for t in &s.targets {
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} | {} |\n",
            t.name,
            t.kind,
            t.status,
            t.prefill_seconds,
            t.message.replace('|', "/")
        ));
    }
    for w in &suite.workloads {
        md.push_str(&format!(
            "\n## {}\n\n{}\n\n| target | IOPS | MB/s | p50 µs | p99 µs | p99.9 µs | vs best | runs | IOPS min–max |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---|\n",
            w.name,
            workload_line(w)
        ));
        for c in s.cells.iter().filter(|c| c.workload == w.name) {
            let range = match (c.iops_min, c.iops_max) {
                (Some(a), Some(b)) => format!("{a:.0}–{b:.0}"),
                _ => c.note.clone().unwrap_or_default().replace('|', "/"),
            };
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {}{} | {} |\n",
                c.target,
                fmt_opt(c.iops, 0),
                fmt_opt(c.mbps, 1),
                fmt_opt(c.p50_us, 1),
                fmt_opt(c.p99_us, 1),
                fmt_opt(c.p999_us, 1),
                fmt_opt(c.ratio_to_best, 2),
                c.runs,
                if c.failures > 0 {
                    format!(" ({} failed)", c.failures)
                } else {
                    String::new()
                },
                range
            ));
        }
    }
    md
}

fn chart_for(
    path: &std::path::Path,
    w: &WorkloadSpec,
    suite: &Suite,
    s: &Summary,
) -> anyhow::Result<()> {
    let cells: Vec<&Cell> = s.cells.iter().filter(|c| c.workload == w.name).collect();
    let bars: Vec<chart::Bar> =
        cells
            .iter()
            .map(|c| chart::Bar {
                label: c.target.clone(),
                value: c.iops,
                range: c.iops_min.zip(c.iops_max),
                note: match c.iops {
                    Some(i) => format!(
                        "{} IOPS  p99 {}us  x{}",
                        short(i),
                        fmt_opt(c.p99_us, 0),
                        fmt_opt(c.ratio_to_best, 2)
                    ),
                    None => s.targets.iter().find(|t| t.name == c.target).map_or(
                        "no result".into(),
                        |t| {
                            if t.status == "ok" {
                                "failed".to_string()
                            } else {
                                t.status.clone()
                            }
                        },
                    ),
                },
                best: c.ratio_to_best == Some(1.0),
            })
            .collect();
    chart::bar_chart(
        path,
        &format!("{}: median IOPS", w.name),
        &format!("{}; {} repeats", workload_line(w), suite.settings.repeats),
        &bars,
    )
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(short(123_456.0), "123.5k");
        assert_eq!(file_safe("rand read/4k"), "rand_read_4k");
    }
}
