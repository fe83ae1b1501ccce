//! The NBD client and `ballast bench` against a server we did not write:
//! `nbdkit memory` (Debian package `nbdkit`).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_client::bench::{run_load, Live, LoadConfig, Pattern};
use ballast_client::nbd::{NbdClient, NbdError, NbdUri};
use bytes::Bytes;

/// A running `nbdkit`, killed when dropped (also when a test panics).
struct NbdKit {
    child: Child,
    uri: String,
    _dir: Option<TempDir>,
}

impl Drop for NbdKit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn nbdkit_command() -> Command {
    let mut c = Command::new("nbdkit");
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    c
}

fn spawn(mut cmd: Command) -> Child {
    match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "nbdkit is not installed: these tests need it (Debian package `nbdkit`: apt-get install nbdkit)"
        ),
        Err(e) => panic!("cannot start nbdkit: {e}"),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `nbdkit -f -p PORT PLUGIN ARGS...` on 127.0.0.1.
fn nbdkit_tcp(plugin_args: &[&str]) -> NbdKit {
    for _ in 0..5 {
        let port = free_port();
        let mut cmd = nbdkit_command();
        cmd.args(["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(plugin_args);
        let mut kit = NbdKit {
            child: spawn(cmd),
            uri: format!("nbd://127.0.0.1:{port}/"),
            _dir: None,
        };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = kit.child.try_wait() {
                break; // port taken meanwhile, or bad arguments: try again
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return kit;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = kit.child.kill();
    }
    panic!("nbdkit {plugin_args:?} did not start listening");
}

/// `nbdkit -f -U SOCKET PLUGIN ARGS...`.
fn nbdkit_unix(plugin_args: &[&str]) -> NbdKit {
    let dir = std::env::temp_dir().join(format!("ballast-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("nbd.sock");
    let mut cmd = nbdkit_command();
    cmd.args(["-f", "--exit-with-parent", "-U"])
        .arg(&sock)
        .args(plugin_args);
    let kit = NbdKit {
        child: spawn(cmd),
        uri: format!("nbd+unix:///?socket={}", sock.display()),
        _dir: Some(TempDir(dir)),
    };
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "nbdkit did not create {sock:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    kit
}

fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed ^ (i >> 9) as u8)
        .collect::<Vec<u8>>()
        .into()
}

async fn exercise_client(uri: &str) {
    let c = NbdClient::connect(uri).await.unwrap();
    assert_eq!(c.size(), 256 << 20);
    let f = c.flags();
    assert!(
        f.can_flush() && f.can_trim() && f.can_write_zeroes() && !f.read_only(),
        "{f}"
    );
    assert!(c.negotiated().structured_replies);
    assert_eq!(c.negotiated().entered_by, "NBD_OPT_GO");

    // Untouched memory reads as zeroes and is reported as a hole.
    assert!(c.read(0, 8192).await.unwrap().iter().all(|&b| b == 0));
    let ext = c.block_status(0, 1 << 20).await.unwrap();
    assert!(ext[0].is_hole() && ext[0].is_zero(), "{ext:?}");

    // Write, read back, overwrite part with FUA.
    let data = pattern(256 * 1024, 3);
    c.write(1 << 20, data.clone(), false).await.unwrap();
    assert_eq!(c.read(1 << 20, data.len()).await.unwrap(), data);
    c.write((1 << 20) + 4096, pattern(4096, 99), true)
        .await
        .unwrap();
    let back = c.read(1 << 20, 3 * 4096).await.unwrap();
    assert_eq!(&back[..4096], &data[..4096]);
    assert_eq!(&back[4096..8192], &pattern(4096, 99)[..]);
    assert_eq!(&back[8192..], &data[8192..12288]);
    let ext = c.block_status(1 << 20, 256 * 1024).await.unwrap();
    assert!(!ext[0].is_hole(), "{ext:?}");

    // Zero and trim.
    c.write_zeroes((1 << 20) + 8192, 8192, false).await.unwrap();
    let back = c.read((1 << 20) + 8192, 8192).await.unwrap();
    assert!(back.iter().all(|&b| b == 0));
    c.trim(1 << 20, 4096).await.unwrap();
    c.flush().await.unwrap();

    // Many requests in flight from many tasks on one connection.
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let d = pattern(4096, i as u8);
            let off = (8 << 20) + i * 4096;
            c.write(off, d.clone(), false).await.unwrap();
            assert_eq!(c.read(off, 4096).await.unwrap(), d);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    // Past the end: refused locally with a clear error.
    let e = c.read(c.size() - 512, 4096).await.unwrap_err();
    assert!(matches!(e, NbdError::InvalidRequest(_)), "{e}");
    c.disconnect().await.unwrap();
    assert!(matches!(
        c.read(0, 512).await,
        Err(NbdError::Disconnected(_))
    ));
}

#[tokio::test]
async fn nbd_client_round_trip_against_nbdkit_memory() {
    let kit = nbdkit_tcp(&["memory", "256M"]);
    exercise_client(&kit.uri).await;
}

#[tokio::test]
async fn nbd_client_over_unix_socket() {
    let kit = nbdkit_unix(&["memory", "256M"]);
    exercise_client(&kit.uri).await;
}

#[tokio::test]
async fn nbd_client_reports_server_errors_with_errno() {
    // The error filter fails every read with EIO.
    let kit = nbdkit_tcp(&[
        "--filter=error",
        "memory",
        "16M",
        "error=EIO",
        "error-pread-rate=1",
    ]);
    let c = NbdClient::connect(&kit.uri).await.unwrap();
    let e = c.read(0, 4096).await.unwrap_err();
    assert_eq!(e.errno(), Some(ballast_client::nbd::NbdErrno::Eio), "{e}");
    assert!(e.to_string().contains("NBD_EIO"), "{e}");
    c.write(0, pattern(4096, 1), false).await.unwrap();
}

fn load(uri: &str, pattern: Pattern) -> LoadConfig {
    let mut cfg = LoadConfig::new(NbdUri::parse(uri).unwrap(), pattern);
    cfg.duration = Some(Duration::from_millis(1500));
    cfg.verify = true;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_verify_randwrite_and_randrw_as_library() {
    let kit = nbdkit_tcp(&["memory", "256M"]);
    let mut cfg = load(&kit.uri, Pattern::Randwrite);
    cfg.dedupe_percent = 20;
    cfg.compress_percent = 50;
    let r = run_load(&cfg, Arc::new(Live::default())).await.unwrap();
    assert_eq!(r.verify_errors, 0, "{:?}", r.first_mismatch);
    assert!(r.verified_blocks > 100, "{r:?}");
    assert_eq!(r.pattern, "randwrite");

    let mut cfg = load(&kit.uri, Pattern::Randrw);
    cfg.read_percent = 70;
    cfg.connections = 2;
    cfg.queue_depth = 8;
    cfg.size = Some(8 << 20); // small region: reads often hit blocks written this run
    let r = run_load(&cfg, Arc::new(Live::default())).await.unwrap();
    assert_eq!(r.verify_errors, 0, "{:?}", r.first_mismatch);
    let (rd, wr) = (r.read.unwrap(), r.write.unwrap());
    let share = rd.ops as f64 / (rd.ops + wr.ops) as f64;
    assert!((share - 0.7).abs() < 0.05, "read share {share}");
    assert_eq!(r.connections, 2);
}

/// The example binary (`cargo build --example bench`), built if missing.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let bin = profile_dir.join("examples").join("bench");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let target_dir = profile_dir.parent().unwrap();
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "ballast-client", "--example", "bench"])
            .env("CARGO_TARGET_DIR", target_dir);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build --example bench");
        assert!(st.success(), "cargo build --example bench failed");
    }
    bin
}

fn run_example(args: &[&str]) -> (std::process::ExitStatus, serde_json::Value, String) {
    let out = Command::new(example_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "--json prints exactly one line; got {stdout:?} (stderr {stderr})"
    );
    let v = serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("bad JSON {stdout:?}: {e}"));
    (out.status, v, stderr)
}

fn check_shape(v: &serde_json::Value) {
    for k in ["iops", "mbps", "seconds"] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k} in {v}");
    }
    for k in [
        "ops",
        "bytes",
        "block_size",
        "queue_depth",
        "connections",
        "verify_errors",
    ] {
        assert!(v[k].is_u64(), "{k} in {v}");
    }
    assert!(v["pattern"].is_string());
    for k in ["p50", "p90", "p99", "p999", "max"] {
        assert!(
            v["latency_us"][k].as_f64().unwrap() > 0.0,
            "latency_us.{k} in {v}"
        );
    }
    let l = &v["latency_us"];
    assert!(l["p50"].as_f64() <= l["p99"].as_f64() && l["p99"].as_f64() <= l["max"].as_f64());
}

#[test]
fn bench_example_binary_prints_json_and_verifies() {
    let kit = nbdkit_tcp(&["memory", "256M"]);
    let (st, v, err) = run_example(&[
        "--uri",
        &kit.uri,
        "--pattern",
        "randwrite",
        "--block-size",
        "4k",
        "--queue-depth",
        "16",
        "--duration",
        "1s",
        "--verify",
        "--json",
    ]);
    assert!(st.success(), "{err}");
    check_shape(&v);
    assert_eq!(v["pattern"], "randwrite");
    assert_eq!(v["queue_depth"], 16);
    assert_eq!(v["block_size"], 4096);
    assert_eq!(v["verify_errors"], 0);
    assert!(v["verified_blocks"].as_u64().unwrap() > 0);

    let (st, v, err) = run_example(&[
        "--uri",
        &kit.uri,
        "--pattern",
        "randrw",
        "--read-percent",
        "60",
        "--connections",
        "2",
        "--bytes",
        "8M",
        "--dedupe-percent",
        "30",
        "--compress-percent",
        "50",
        "--verify",
        "--json",
    ]);
    assert!(st.success(), "{err}");
    check_shape(&v);
    assert_eq!(v["pattern"], "randrw");
    assert_eq!(v["connections"], 2);
    assert_eq!(v["bytes"], 8 << 20);
    assert_eq!(v["verify_errors"], 0);

    let (st, v, err) = run_example(&[
        "--uri",
        &kit.uri,
        "--pattern",
        "randread",
        "--queue-depth",
        "32",
        "--duration",
        "1s",
        "--json",
    ]);
    assert!(st.success(), "{err}");
    check_shape(&v);

    // A multi-threaded runtime and sequential 64 KiB reads over a byte budget.
    let (st, v, err) = run_example(&[
        "--uri",
        &kit.uri,
        "--pattern",
        "read",
        "--block-size",
        "64k",
        "--bytes",
        "32M",
        "--threads",
        "2",
        "--json",
    ]);
    assert!(st.success(), "{err}");
    check_shape(&v);
    assert_eq!(v["ops"], 512);
}

#[test]
fn bench_example_binary_fails_cleanly_without_a_server() {
    let port = free_port();
    let out = Command::new(example_binary())
        .args([
            "--uri",
            &format!("nbd://127.0.0.1:{port}/"),
            "--duration",
            "1s",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect"), "{err}");
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn tiny_suite_with_nbdkit_targets() {
    // Fail early with the package hint if nbdkit is missing.
    drop(nbdkit_tcp(&["null", "1M"]));
    let dir =
        TempDir(std::env::temp_dir().join(format!("ballast-suite-test-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("tiny.toml");
    std::fs::write(
        &file,
        r#"
[settings]
size = "32M"
repeats = 2
duration = "300ms"
pause = "0s"

[[target]]
name = "ballast"
kind = "ballast"

[[target]]
name = "nbdkit-memory"
kind = "nbdkit"
plugin = "memory"

[[target]]
name = "nbdkit-null"
kind = "nbdkit"
plugin = "null"

[[target]]
name = "not-installed"
kind = "command"
program = "no-such-nbd-server"
uri = "nbd://127.0.0.1:{port}/"

[[workload]]
name = "randread-4k"
pattern = "randread"
queue_depth = 8

[[workload]]
name = "randwrite-4k"
pattern = "randwrite"
queue_depth = 8
dedupe_percent = 30
compress_percent = 50
"#,
    )
    .unwrap();
    let out = dir.0.join("results");
    let args = ballast_client::bench::suite::SuiteArgs {
        file: file.clone(),
        out: Some(out.clone()),
        targets: vec![],
        workloads: vec![],
        repeats: None,
        duration: None,
        size: None,
        json: true,
    };
    ballast_client::bench::suite::run(args).await.unwrap();

    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    let status = |name: &str| {
        summary["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap()["status"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(status("ballast"), "skipped");
    assert_eq!(status("not-installed"), "skipped");
    assert_eq!(status("nbdkit-memory"), "ok");
    assert_eq!(status("nbdkit-null"), "ok");
    let cells = summary["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2 * 4);
    for c in cells
        .iter()
        .filter(|c| c["target"].as_str().unwrap().starts_with("nbdkit"))
    {
        assert_eq!(c["runs"], 2, "{c}");
        assert!(c["iops"].as_f64().unwrap() > 0.0, "{c}");
        let r = c["ratio_to_best"].as_f64().unwrap();
        assert!(r > 0.0 && r <= 1.0, "{c}");
    }
    for w in ["randread-4k", "randwrite-4k"] {
        assert!(cells
            .iter()
            .any(|c| c["workload"] == w && c["ratio_to_best"] == 1.0));
        let png = std::fs::read(out.join(format!("{w}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
    let raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("raw.json")).unwrap()).unwrap();
    let runs = raw["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2 * 2 * 2);
    // Interleaved: consecutive runs alternate between the targets.
    assert_ne!(runs[0]["target"], runs[1]["target"]);
    assert_eq!(runs[0]["target"], runs[2]["target"]);
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("## randread-4k") && md.contains("nbdkit-memory") && md.contains("skipped")
    );
    assert!(
        !out.join("scratch").exists(),
        "scratch folder is cleaned up"
    );
}
