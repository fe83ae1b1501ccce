//! Results of a load run: the JSON object `--json` prints, and the text form.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::load::LoadConfig;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
}

fn us(ns: u64) -> f64 {
    (ns as f64 / 100.0).round() / 10.0
}

impl Latency {
    /// Percentiles of a histogram of nanoseconds.
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }
}

/// Counters of one direction (or both).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirReport {
    /// Requests completed.
    pub ops: u64,
    /// Bytes transferred.
    pub bytes: u64,
    /// Requests per second.
    pub iops: f64,
    /// Megabytes (10^6) per second.
    pub mbps: f64,
    /// Latency percentiles.
    pub latency_us: Latency,
}

impl DirReport {
    /// Build from counters and a histogram of nanoseconds.
    pub fn new(ops: u64, bytes: u64, seconds: f64, hist: &Histogram<u64>) -> DirReport {
        let s = seconds.max(1e-9);
        DirReport {
            ops,
            bytes,
            iops: round1(ops as f64 / s),
            mbps: round1(bytes as f64 / s / 1e6),
            latency_us: Latency::from_histogram(hist),
        }
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// The result of one run; `--json` prints it as one object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// Requests per second (reads and writes).
    pub iops: f64,
    /// Megabytes (10^6) per second.
    pub mbps: f64,
    /// Latency percentiles over all requests.
    pub latency_us: Latency,
    /// Requests completed.
    pub ops: u64,
    /// Bytes transferred.
    pub bytes: u64,
    /// Measured wall time.
    pub seconds: f64,
    /// Access pattern.
    pub pattern: String,
    /// Bytes per request.
    pub block_size: u64,
    /// Requests in flight per connection.
    pub queue_depth: usize,
    /// Connections.
    pub connections: usize,
    /// Blocks whose content did not match what was written.
    pub verify_errors: u64,
    /// Blocks checked by the final read-back.
    pub verified_blocks: u64,
    /// Reads alone, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<DirReport>,
    /// Writes alone, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write: Option<DirReport>,
    /// Share of reads asked for (randrw).
    pub read_percent: u8,
    /// Duplicate share of written data.
    pub dedupe_percent: u8,
    /// Compressible share of written data.
    pub compress_percent: u8,
    /// Target.
    pub uri: String,
    /// First mismatch found by verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_mismatch: Option<String>,
}

impl BenchReport {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: &LoadConfig,
        seconds: f64,
        total: DirReport,
        read: Option<DirReport>,
        write: Option<DirReport>,
        verify_errors: u64,
        verified_blocks: u64,
        first_mismatch: Option<String>,
    ) -> BenchReport {
        BenchReport {
            iops: total.iops,
            mbps: total.mbps,
            latency_us: total.latency_us,
            ops: total.ops,
            bytes: total.bytes,
            seconds: (seconds * 1000.0).round() / 1000.0,
            pattern: cfg.pattern.as_str().to_string(),
            block_size: cfg.block_size as u64,
            queue_depth: cfg.queue_depth,
            connections: cfg.connections,
            verify_errors,
            verified_blocks,
            read,
            write,
            read_percent: cfg.pattern.read_share(cfg.read_percent),
            dedupe_percent: cfg.dedupe_percent,
            compress_percent: cfg.compress_percent,
            uri: cfg.uri.to_string(),
            first_mismatch,
        }
    }

    /// Human-readable summary (several lines, no trailing newline).
    pub fn to_text(&self, verify: bool) -> String {
        let mut s = format!(
            "{} bs={} qd={} conns={} on {}\n  {:.0} IOPS, {:.1} MB/s, {} ops in {:.2} s",
            self.pattern,
            fmt_bytes(self.block_size),
            self.queue_depth,
            self.connections,
            self.uri,
            self.iops,
            self.mbps,
            self.ops,
            self.seconds
        );
        let lat = |l: &Latency| {
            format!(
                "p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} max {:.1} us",
                l.p50, l.p90, l.p99, l.p999, l.max
            )
        };
        s.push_str(&format!("\n  latency: {}", lat(&self.latency_us)));
        if let (Some(r), Some(w)) = (&self.read, &self.write) {
            s.push_str(&format!(
                "\n  read:  {:.0} IOPS, {}",
                r.iops,
                lat(&r.latency_us)
            ));
            s.push_str(&format!(
                "\n  write: {:.0} IOPS, {}",
                w.iops,
                lat(&w.latency_us)
            ));
        }
        if verify {
            s.push_str(&format!(
                "\n  verify: {} mismatched of {} blocks read back",
                self.verify_errors, self.verified_blocks
            ));
            if let Some(m) = &self.first_mismatch {
                s.push_str(&format!("; first: {m}"));
            }
        }
        s
    }
}

/// `4096` → `4KiB`, `1536` → `1536B`.
pub fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024 && v.is_multiple_of(1024) && u < UNITS.len() - 1 {
        v /= 1024;
        u += 1;
    }
    format!("{v}{}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_in_microseconds() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).unwrap();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let l = Latency::from_histogram(&h);
        assert!((l.p50 - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99 - 990.0).abs() < 1.0, "{l:?}");
        assert!((l.max - 1000.0).abs() < 1.0, "{l:?}");
        assert_eq!(fmt_bytes(4096), "4KiB");
        assert_eq!(fmt_bytes(1536), "1536B");
        assert_eq!(fmt_bytes(1 << 20), "1MiB");
    }
}
