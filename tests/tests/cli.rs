//! The `ballast` CLI against a real ballastd.

use ballast_e2e::*;
use std::process::Output;
use std::time::Duration;

/// Assert a failed command printed exactly one `error: ...` line on stderr,
/// nothing on stdout, and exited non-zero. Returns the line.
#[track_caller]
fn one_line_error(what: &str, out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "{what}: succeeded but must fail; stdout: {stdout}"
    );
    assert_ne!(out.status.code(), None, "{what}: killed by a signal");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: want one line on stderr, got:\n{stderr}"
    );
    assert!(
        lines[0].starts_with("error:"),
        "{what}: stderr does not start with `error:`: {stderr}"
    );
    assert!(
        stdout.trim().is_empty(),
        "{what}: printed on stdout: {stdout}"
    );
    lines[0].to_string()
}

fn volume_names(node: &Node) -> Vec<String> {
    let list = node.cli_json(&["volume", "list"]);
    list.as_array()
        .unwrap_or_else(|| panic!("volume list --json is not an array: {list}"))
        .iter()
        .map(|v| v["name"].as_str().expect("name").to_string())
        .collect()
}

#[test]
fn volume_lifecycle_and_json_shapes() {
    require_nbd_tools();
    let node = Node::start();
    assert!(volume_names(&node).is_empty());
    let text = node.cli_ok(&["volume", "list"]);
    assert!(
        !text.trim().is_empty(),
        "an empty `volume list` prints nothing"
    );

    // create: defaults and every option
    let out = node.cli_ok(&["volume", "create", "v1", "--size", "1G"]);
    assert!(out.contains("v1"), "create output: {out}");
    let created = node.cli_json(&[
        "volume",
        "create",
        "v2",
        "--size",
        "512M",
        "--block-size",
        "64K",
        "--dedup",
        "off",
        "--compression",
        "none",
    ]);
    assert_eq!(created["name"], "v2", "{created}");

    let v1 = node.cli_json(&["volume", "info", "v1"]);
    for key in [
        "name",
        "size",
        "block_size",
        "mapped_bytes",
        "dedup",
        "compression",
        "replicas",
    ] {
        assert!(
            v1.get(key).is_some(),
            "volume info --json lacks {key}: {v1}"
        );
    }
    assert_eq!(v1["name"], "v1");
    assert_eq!(v1["size"], GIB);
    assert_eq!(v1["block_size"], 4096);
    assert_eq!(v1["mapped_bytes"], 0);
    assert_eq!(v1["dedup"], true);
    assert_eq!(v1["compression"], "lz4");
    assert!(v1["replicas"].is_array(), "{v1}");
    let v2 = node.cli_json(&["volume", "info", "v2"]);
    assert_eq!(v2["size"], 512 * MIB);
    assert_eq!(v2["block_size"], 65536);
    assert_eq!(v2["dedup"], false);
    assert_eq!(v2["compression"], "none");

    // the human forms name the volumes
    let list = node.cli_ok(&["volume", "list"]);
    assert!(list.contains("v1") && list.contains("v2"), "{list}");
    let info = node.cli_ok(&["volume", "info", "v1"]);
    assert!(info.contains("v1"), "{info}");

    // writing maps bytes
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let data = random_file(&a, 8 * MIB as usize, 1);
    nbdcopy(&["--flush", a.to_str().unwrap(), &node.uri("v1")]);
    let v1 = node.cli_json(&["volume", "info", "v1"]);
    assert_eq!(
        v1["mapped_bytes"],
        8 * MIB,
        "mapped after an 8 MiB write: {v1}"
    );

    // resize: grow; the export follows
    let r = node.cli_json(&["volume", "resize", "v1", "--size", "2G"]);
    assert_eq!(r["size"], 2 * GIB, "{r}");
    assert_eq!(node.cli_json(&["volume", "info", "v1"])["size"], 2 * GIB);
    let q = run_ok(
        &mut cmd("qemu-img", ["info", "-f", "raw", &node.uri("v1")]),
        Duration::from_secs(60),
    );
    assert!(q.contains("virtual size: 2 GiB"), "{q}");

    // snapshot and clone
    let s = node.cli_json(&["volume", "snapshot", "v1", "s1"]);
    assert_eq!(s["name"], "s1", "{s}");
    let s = node.cli_json(&["volume", "info", "s1"]);
    assert_eq!(s["size"], 2 * GIB, "{s}");
    if let Some(ro) = s.get("read_only") {
        assert_eq!(ro, true, "snapshot is not read-only: {s}");
    }
    let c = node.cli_json(&["volume", "clone", "s1", "c1"]);
    assert_eq!(c["name"], "c1", "{c}");
    assert_eq!(
        read_export(&node.uri("c1"), data.len()),
        data,
        "clone content"
    );
    let names = volume_names(&node);
    for n in ["v1", "v2", "s1", "c1"] {
        assert!(names.iter().any(|x| x == n), "{n} missing: {names:?}");
    }

    // Deleting a volume a client is connected to: that client's next
    // request fails and the server closes its connection, rather than
    // answering every later request with an error.
    require_python_nbd();
    let ballast = bin("ballast");
    python(
        r#"
import subprocess, time
h = conn(sys.argv[1])
h.pread(4096, 0)
subprocess.run([sys.argv[2], "--api", sys.argv[3], "volume", "delete", "c1"], check=True)
try:
    h.pread(4096, 0)
    raise AssertionError("read of a deleted volume succeeded")
except nbd.Error as e:
    print("after delete:", e.string)
for _ in range(100):
    if h.aio_is_dead() or h.aio_is_closed():
        break
    try:
        h.pread(4096, 0)
    except nbd.Error:
        pass
    time.sleep(0.05)
assert h.aio_is_dead() or h.aio_is_closed(), "connection stayed open after its volume was deleted"
"#,
        &[&node.uri("c1"), ballast.to_str().unwrap(), &node.api_url()],
    );

    // delete, newest first
    for n in ["s1", "v2"] {
        node.cli_ok(&["volume", "delete", n]);
    }
    assert_eq!(volume_names(&node), vec!["v1".to_string()]);
    let out = run(
        &mut cmd("nbdinfo", [node.uri("v2")]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "a deleted volume is still exported");
    // a name can be reused after delete
    node.create_volume("v2", "16M", &[]);
    let v2 = node.cli_json(&["volume", "info", "v2"]);
    assert_eq!(v2["size"], 16 * MIB);
    assert_eq!(
        v2["mapped_bytes"], 0,
        "a re-created volume kept old data: {v2}"
    );
}

#[test]
fn errors_are_one_line_with_nonzero_exit() {
    let node = Node::start();
    node.create_volume("v", "64M", &[]);
    node.cli_ok(&["volume", "snapshot", "v", "snap"]);

    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("duplicate", vec!["volume", "create", "v", "--size", "1G"]),
        (
            "duplicate of a snapshot name",
            vec!["volume", "create", "snap", "--size", "1G"],
        ),
        ("info missing", vec!["volume", "info", "nope"]),
        (
            "info --json missing",
            vec!["volume", "info", "nope", "--json"],
        ),
        ("delete missing", vec!["volume", "delete", "nope"]),
        (
            "resize missing",
            vec!["volume", "resize", "nope", "--size", "1G"],
        ),
        ("snapshot missing", vec!["volume", "snapshot", "nope", "s2"]),
        (
            "snapshot to an existing name",
            vec!["volume", "snapshot", "v", "snap"],
        ),
        ("clone missing", vec!["volume", "clone", "nope", "c"]),
        (
            "clone to an existing name",
            vec!["volume", "clone", "snap", "v"],
        ),
        (
            "bad size unit",
            vec!["volume", "create", "x", "--size", "12Q"],
        ),
        ("zero size", vec!["volume", "create", "x", "--size", "0"]),
        (
            "negative size",
            vec!["volume", "create", "x", "--size", "-5G"],
        ),
        (
            "size not a multiple of the block size",
            vec!["volume", "create", "x", "--size", "1000"],
        ),
        (
            "bad block size",
            vec![
                "volume",
                "create",
                "x",
                "--size",
                "1G",
                "--block-size",
                "3000",
            ],
        ),
        (
            "bad dedup",
            vec!["volume", "create", "x", "--size", "1G", "--dedup", "maybe"],
        ),
        (
            "bad compression",
            vec![
                "volume",
                "create",
                "x",
                "--size",
                "1G",
                "--compression",
                "zip",
            ],
        ),
        ("bad name", vec!["volume", "create", "a/b", "--size", "1G"]),
        ("empty name", vec!["volume", "create", "", "--size", "1G"]),
        (
            "resize to a bad size",
            vec!["volume", "resize", "v", "--size", "lots"],
        ),
        (
            "resize a snapshot",
            vec!["volume", "resize", "snap", "--size", "1G"],
        ),
        ("missing --size", vec!["volume", "create", "x"]),
        ("unknown subcommand", vec!["volume", "explode"]),
    ];
    for (what, args) in &cases {
        let out = node.cli(args);
        let line = one_line_error(what, &out);
        assert!(line.len() < 1000, "{what}: a very long line: {line}");
    }
    // the failed commands changed nothing
    let names = volume_names(&node);
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(node.cli_json(&["volume", "info", "v"])["size"], 64 * MIB);

    // a not-found error says what was not found
    let out = node.cli(&["volume", "info", "nope"]);
    let line = one_line_error("info missing", &out);
    assert!(line.contains("nope"), "{line}");

    // an API that is not there: one line, non-zero, no hang
    let dead = free_port();
    let out = run(
        &mut cmd(
            bin("ballast").to_str().unwrap(),
            [
                "--api".to_string(),
                format!("http://127.0.0.1:{dead}"),
                "volume".to_string(),
                "list".to_string(),
            ],
        ),
        Duration::from_secs(60),
    );
    one_line_error("unreachable API", &out);
    let out = run(
        &mut cmd(
            bin("ballast").to_str().unwrap(),
            ["--api", "not a url", "node", "info"],
        ),
        Duration::from_secs(60),
    );
    one_line_error("malformed API URL", &out);
}

#[test]
fn help_and_version() {
    for b in ["ballast", "ballastd"] {
        let out = run(
            &mut cmd(bin(b).to_str().unwrap(), ["--help"]),
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "{b} --help failed");
        let h = String::from_utf8_lossy(&out.stdout);
        assert!(h.contains("Usage"), "{b} --help:\n{h}");
        let out = run(
            &mut cmd(bin(b).to_str().unwrap(), ["--version"]),
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "{b} --version failed");
    }
    let out = run(
        &mut cmd(bin("ballastd").to_str().unwrap(), ["--help"]),
        Duration::from_secs(30),
    );
    let h = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--data",
        "--listen-nbd",
        "--listen-api",
        "--disk",
        "--io-backend",
        "--log-format",
        "--max-nbd-connections",
    ] {
        assert!(h.contains(flag), "ballastd --help lacks {flag}");
    }
}

fn ratio(info: &Json, key: &str) -> f64 {
    info[key]
        .as_f64()
        .unwrap_or_else(|| panic!("node info --json lacks a numeric {key}: {info}"))
}

#[test]
fn node_info_reports_dedup_ratio() {
    require_nbd_tools();
    let node = Node::start();
    let info = node.node_info();
    for key in [
        "capacity_bytes",
        "used_bytes",
        "logical_bytes",
        "unique_bytes",
        "stored_bytes",
        "dedup_ratio",
        "compression_ratio",
    ] {
        assert!(
            info.get(key).is_some(),
            "node info --json lacks {key}: {info}"
        );
    }
    assert!(
        info["capacity_bytes"].as_u64().unwrap() >= GIB,
        "capacity of a 2 GiB disk: {info}"
    );
    let text = node.cli_ok(&["node", "info"]);
    assert!(!text.trim().is_empty());

    // The same 48 MiB of random data into two volumes, dedup on.
    node.create_volume("a", "256M", &[]);
    node.create_volume("b", "256M", &[]);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("r");
    random_file(&f, 48 * MIB as usize, 5);
    nbdcopy(&["--flush", f.to_str().unwrap(), &node.uri("a")]);
    nbdcopy(&["--flush", f.to_str().unwrap(), &node.uri("b")]);
    let mut info = Json::Null;
    let ok = wait_until(Duration::from_secs(20), || {
        info = node.node_info();
        ratio(&info, "dedup_ratio") > 1.5
    });
    assert!(
        ok,
        "dedup_ratio after writing the same data into two volumes: {info}"
    );
    assert!(ratio(&info, "dedup_ratio") < 2.5, "{info}");
    let logical = info["logical_bytes"].as_u64().unwrap();
    let unique = info["unique_bytes"].as_u64().unwrap();
    assert!(
        logical >= 96 * MIB && unique < 60 * MIB,
        "logical {logical}, unique {unique}: {info}"
    );
    // random data does not compress
    assert!(ratio(&info, "compression_ratio") < 1.2, "{info}");
    let used = info["used_bytes"].as_u64().unwrap();
    assert!(
        used >= 40 * MIB && used <= info["capacity_bytes"].as_u64().unwrap(),
        "used_bytes {used}: {info}"
    );
}

#[test]
fn node_info_reports_compression_ratio() {
    require_nbd_tools();
    let node = Node::start();
    node.create_volume("c", "256M", &[]);
    // Compressible but unique blocks (no two 4K blocks alike, so dedup does
    // not explain the saving).
    let mut data = Vec::with_capacity(32 * MIB as usize);
    let mut i = 0u64;
    while data.len() < 32 * MIB as usize {
        data.extend_from_slice(
            format!("{i:016} the quick brown fox jumps over the lazy dog; ").as_bytes(),
        );
        i += 1;
    }
    data.truncate(32 * MIB as usize);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("text");
    std::fs::write(&f, &data).unwrap();
    nbdcopy(&["--flush", f.to_str().unwrap(), &node.uri("c")]);
    let mut info = Json::Null;
    let ok = wait_until(Duration::from_secs(20), || {
        info = node.node_info();
        ratio(&info, "compression_ratio") > 2.0
    });
    assert!(ok, "compression_ratio after writing text: {info}");
    assert_same(
        "compressed volume read back",
        &read_export(&node.uri("c"), data.len()),
        &data,
    );
    // the same data in a --compression none volume is stored raw
    node.create_volume("n", "256M", &["--compression", "none", "--dedup", "off"]);
    nbdcopy(&["--flush", f.to_str().unwrap(), &node.uri("n")]);
    assert_same(
        "uncompressed volume read back",
        &read_export(&node.uri("n"), data.len()),
        &data,
    );
    let info2 = node.node_info();
    assert!(
        info2["stored_bytes"].as_u64().unwrap()
            >= info["stored_bytes"].as_u64().unwrap() + 30 * MIB,
        "a --compression none volume did not store raw blocks: before {info}, after {info2}"
    );
}
