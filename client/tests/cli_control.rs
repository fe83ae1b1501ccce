//! End-to-end tests of the `ballast` binary against a real gRPC control
//! plane backed by the in-memory backend.

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::Arc;
use std::thread::JoinHandle;

use ballast_server::control::memory::MemoryBackend;
use ballast_server::control::{serve_listener, ControlBackend};
use serde_json::Value;

/// A control-plane server on 127.0.0.1:<random port>, stopped on drop.
struct TestServer {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    fn start() -> Self {
        Self::with_backend(Arc::new(MemoryBackend::new()))
    }

    fn with_backend(backend: Arc<dyn ControlBackend>) -> Self {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr: SocketAddr = std_listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                serve_listener(listener, backend, async {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
            });
        });
        TestServer {
            url: format!("http://{addr}"),
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Run `ballast --api <url> args...`.
    fn run(&self, args: &[&str]) -> Output {
        ballast(&self.url, args)
    }

    /// Run and expect success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ballast {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run with `--json` and parse stdout.
    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.ok(&args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}\n{out}"))
    }

    /// Run, expect failure with exactly one stderr line; returns that line.
    fn fail(&self, args: &[&str]) -> String {
        expect_one_line_error(self.run(args), args)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ballast(api: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ballast"))
        .env_remove("BALLAST_API")
        .env("NO_COLOR", "1")
        .arg("--api")
        .arg(api)
        .args(args)
        .output()
        .expect("run ballast")
}

fn expect_one_line_error(out: Output, args: &[&str]) -> String {
    assert!(
        !out.status.success(),
        "ballast {args:?} unexpectedly succeeded"
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one stderr line for {args:?}, got:\n{stderr}"
    );
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_string()
}

const GIB: u64 = 1 << 30;

#[test]
fn volume_lifecycle() {
    let srv = TestServer::start();

    let out = srv.ok(&["volume", "create", "db1", "--size", "1G"]);
    assert!(out.contains("Created volume \"db1\": 1.0 GiB"), "{out}");

    let created = srv.json(&[
        "volume",
        "create",
        "scratch",
        "--size",
        "512MiB",
        "--block-size",
        "64K",
        "--dedup",
        "off",
        "--compression",
        "none",
    ]);
    assert_eq!(created["block_size"], 65536);
    assert_eq!(created["dedup"], false);
    assert_eq!(created["compression"], "none");

    let list = srv.ok(&["volume", "list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 3, "{list}");
    assert!(lines[0].starts_with("NAME"), "{list}");
    assert!(
        lines[1].starts_with("db1 ") && lines[1].contains("1.0 GiB"),
        "{list}"
    );
    assert!(lines[2].contains("512.0 MiB"), "{list}");

    let info = srv.json(&["volume", "info", "db1"]);
    assert_eq!(info["name"], "db1");
    assert_eq!(info["size"], GIB);
    assert_eq!(info["block_size"], 4096);
    assert_eq!(info["mapped_bytes"], 0);
    assert_eq!(info["dedup"], true);
    assert_eq!(info["compression"], "lz4");
    assert_eq!(info["read_only"], false);
    assert_eq!(info["generation"], 1);
    assert!(info["parent_snapshot"].is_null());
    let replicas = info["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 1);
    assert_eq!(replicas[0]["node"], "mem-0");
    assert_eq!(replicas[0]["state"], "healthy");

    let text = srv.ok(&["volume", "info", "db1"]);
    assert!(text.contains("1.0 GiB (1073741824 bytes)"), "{text}");

    let resized = srv.json(&["volume", "resize", "db1", "--size", "2G"]);
    assert_eq!(resized["size"], 2 * GIB);
    assert_eq!(resized["generation"], 2);
    let out = srv.ok(&["volume", "resize", "db1", "--size", "3GiB"]);
    assert!(out.contains("to 3.0 GiB"), "{out}");

    let snap = srv.json(&["volume", "snapshot", "db1", "db1-snap"]);
    assert_eq!(snap["name"], "db1-snap");
    assert_eq!(snap["read_only"], true);
    assert_eq!(snap["size"], 3 * GIB);

    let clone = srv.json(&["volume", "clone", "db1-snap", "db1-clone"]);
    assert_eq!(clone["name"], "db1-clone");
    assert_eq!(clone["read_only"], false);
    assert_eq!(clone["parent_snapshot"], "db1-snap");

    let all = srv.json(&["volume", "list"]);
    let names: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["db1", "db1-clone", "db1-snap", "scratch"]);

    // A snapshot with clones cannot go away first.
    let line = srv.fail(&["volume", "delete", "db1-snap"]);
    assert!(line.contains("has clones"), "{line}");

    let out = srv.ok(&["volume", "delete", "db1-clone"]);
    assert!(out.contains("Deleted \"db1-clone\""), "{out}");
    srv.ok(&["volume", "rm", "db1-snap"]);
    let line = srv.fail(&["volume", "info", "db1-clone"]);
    assert_eq!(line, "error: volume \"db1-clone\" not found");
    assert_eq!(srv.json(&["volume", "list"]).as_array().unwrap().len(), 2);
}

#[test]
fn node_info() {
    let srv = TestServer::start();
    let n = srv.json(&["node", "info"]);
    for key in [
        "node_id",
        "version",
        "io_backend",
        "capacity_bytes",
        "used_bytes",
        "logical_bytes",
        "unique_bytes",
        "stored_bytes",
        "dedup_ratio",
        "compression_ratio",
        "checksum_errors",
        "disks",
    ] {
        assert!(n.get(key).is_some(), "node info --json lacks {key}: {n}");
    }
    assert_eq!(n["capacity_bytes"], 1u64 << 40);
    assert_eq!(n["dedup_ratio"], 1.0);
    assert!(n["disks"][0]["disk_id"].is_string());

    let text = srv.ok(&["node", "info"]);
    assert!(text.contains("Capacity:"), "{text}");
    assert!(text.contains("1.0 TiB"), "{text}");
    assert!(text.contains("Dedup ratio:        1.00x"), "{text}");
}

#[test]
fn server_errors_are_one_line() {
    let srv = TestServer::start();
    srv.ok(&["volume", "create", "dup", "--size", "4K"]);

    let line = srv.fail(&["volume", "create", "dup", "--size", "4K"]);
    assert_eq!(line, "error: volume \"dup\" already exists");

    let line = srv.fail(&["volume", "info", "nope"]);
    assert_eq!(line, "error: volume \"nope\" not found");
    let line = srv.fail(&["volume", "resize", "nope", "--size", "1G"]);
    assert_eq!(line, "error: volume \"nope\" not found");
    let line = srv.fail(&["volume", "delete", "nope"]);
    assert_eq!(line, "error: volume \"nope\" not found");
    let line = srv.fail(&["volume", "snapshot", "nope", "s"]);
    assert_eq!(line, "error: volume \"nope\" not found");
    let line = srv.fail(&["volume", "clone", "nope", "c"]);
    assert_eq!(line, "error: snapshot \"nope\" not found");

    let line = srv.fail(&["volume", "create", "odd", "--size", "10000"]);
    assert!(
        line.contains("not a multiple of the block size 4096"),
        "{line}"
    );
    assert!(line.contains("e.g. 8192 or 12288"), "{line}");

    let line = srv.fail(&[
        "volume",
        "create",
        "bs",
        "--size",
        "1G",
        "--block-size",
        "3K",
    ]);
    assert!(line.contains("power of two from 512 to 65536"), "{line}");

    let line = srv.fail(&["volume", "create", "a/b", "--size", "1G"]);
    assert!(line.contains("invalid volume name \"a/b\""), "{line}");

    let line = srv.fail(&["volume", "clone", "dup", "c"]);
    assert!(line.contains("not a snapshot"), "{line}");
}

#[test]
fn bad_size_is_one_line() {
    // Rejected before any connection is made, so no server is needed.
    let out = ballast(
        "http://127.0.0.1:9",
        &["volume", "create", "v", "--size", "12Q"],
    );
    assert_eq!(out.status.code(), Some(2));
    let line = expect_one_line_error(out, &["--size", "12Q"]);
    assert!(line.contains("'12Q'"), "{line}");
    assert!(line.contains("unknown unit \"Q\""), "{line}");
    assert!(line.contains("512M, 10G"), "{line}");

    let out = ballast(
        "http://127.0.0.1:9",
        &["volume", "resize", "v", "--size", "10GB"],
    );
    let line = expect_one_line_error(out, &["--size", "10GB"]);
    assert!(line.contains("use G or GiB"), "{line}");
}

#[test]
fn unreachable_api() {
    // Reserve a port and release it so nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    for args in [&["node", "info"][..], &["volume", "list"][..]] {
        let line = expect_one_line_error(ballast(&url, args), args);
        assert!(
            line.starts_with(&format!("error: cannot reach ballastd at {url}: ")),
            "{line}"
        );
        assert!(
            line.ends_with("(is ballastd running? set --api or BALLAST_API)"),
            "{line}"
        );
    }
}

#[test]
fn api_from_environment() {
    let srv = TestServer::start();
    let out = Command::new(env!("CARGO_BIN_EXE_ballast"))
        .env("BALLAST_API", &srv.url)
        .args(["volume", "list", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, Value::Array(vec![]));
}

#[test]
fn help_mentions_size_examples() {
    let out = Command::new(env!("CARGO_BIN_EXE_ballast"))
        .args(["volume", "create", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--size <SIZE>",
        "--block-size",
        "--dedup",
        "--compression",
        "512M",
        "10G",
    ] {
        assert!(help.contains(needle), "help lacks {needle}:\n{help}");
    }
}
