//! The NBD server driven by real clients installed on this machine (libnbd
//! tools, its Python binding, qemu-img/qemu-io, fio) and by a raw client for
//! pipelining and shutdown behaviour. A missing tool fails the test with the
//! Debian package to install.

#[path = "nbd_support.rs"]
mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_server::nbd::memory_export::{MemoryCatalog, MemoryExport};
use ballast_server::nbd::proto;
use ballast_server::nbd::NbdConfig;
use support::*;

const MIB: u64 = 1 << 20;

fn catalog() -> Arc<MemoryCatalog> {
    let c = MemoryCatalog::new();
    c.add(
        "disk",
        MemoryExport::new(256 * MIB).description("test disk"),
    );
    c.add(
        "ro",
        MemoryExport::new(16 * MIB)
            .read_only(true)
            .description("read-only disk"),
    );
    c.add("blk64k", MemoryExport::with_block_size(8 * MIB, 65536));
    Arc::new(c)
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn nbdinfo_json_reports_flags_sizes_and_contexts() {
    let nbdinfo = need_tool("nbdinfo", "libnbd-bin");
    let srv = TestServer::start(catalog(), NbdConfig::default());
    let out = run_ok(Command::new(&nbdinfo).arg("--json").arg(srv.uri("disk")));
    let d = json(&out);
    assert!(
        d["protocol"].as_str().unwrap().starts_with("newstyle"),
        "{d}"
    );
    let e = &d["exports"][0];
    assert_eq!(e["export-name"], "disk");
    assert_eq!(e["description"], "test disk");
    assert_eq!(e["export-size"], 256 * MIB);
    for k in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
        "can_cache",
        "can_df",
    ] {
        assert_eq!(e[k], true, "{k} in {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 * MIB);
    assert!(
        e["contexts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "base:allocation"),
        "{e}"
    );

    let d = json(&run_ok(
        Command::new(&nbdinfo).arg("--json").arg(srv.uri("ro")),
    ));
    let e = &d["exports"][0];
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["can_trim"], false);
    assert_eq!(e["export-size"], 16 * MIB);

    let d = json(&run_ok(
        Command::new(&nbdinfo).arg("--json").arg(srv.uri("blk64k")),
    ));
    assert_eq!(d["exports"][0]["block_size_preferred"], 65536);

    // Unknown export: nbdinfo fails cleanly.
    let out = Command::new(&nbdinfo)
        .arg(srv.uri("nope"))
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn nbdinfo_list_shows_every_export() {
    let nbdinfo = need_tool("nbdinfo", "libnbd-bin");
    let srv = TestServer::start(catalog(), NbdConfig::default());
    let d = json(&run_ok(
        Command::new(&nbdinfo)
            .args(["--list", "--json"])
            .arg(format!("nbd://{}", srv.addr)),
    ));
    let mut names: Vec<(String, String)> = d["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap().to_string(),
                e["description"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "{d}");
    assert_eq!(names[0].0, "blk64k");
    assert_eq!(names[1], ("disk".to_string(), "test disk".to_string()));
    assert_eq!(names[2], ("ro".to_string(), "read-only disk".to_string()));
    let out = run_ok(
        Command::new(&nbdinfo)
            .arg("--list")
            .arg(format!("nbd://{}", srv.addr)),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("disk") && text.contains("read-only disk"),
        "{text}"
    );
}

/// A sparse-ish source image: random data with zero stretches.
fn source_image(len: usize) -> Vec<u8> {
    let mut v = random_bytes(42, len);
    let mut at = 3 * MIB as usize;
    while at + 2 * MIB as usize <= len {
        v[at..at + 2 * MIB as usize].fill(0);
        at += 9 * MIB as usize;
    }
    v
}

#[test]
fn nbdcopy_round_trip_and_qemu_img_compare() {
    let nbdcopy = need_tool("nbdcopy", "libnbd-bin");
    let qemu_img = need_tool("qemu-img", "qemu-utils");
    let len = 40 * MIB as usize;
    let c = MemoryCatalog::new();
    let disk = c.add("copy", MemoryExport::new(len as u64));
    let srv = TestServer::start(Arc::new(c), NbdConfig::default());
    let dir = temp_dir("nbdcopy");
    let src = dir.join("src.img");
    let back = dir.join("back.img");
    let img = source_image(len);
    std::fs::write(&src, &img).unwrap();

    run_ok(
        Command::new(&nbdcopy)
            .arg("--flush")
            .arg(&src)
            .arg(srv.uri("copy")),
    );
    assert!(
        disk.read_now(0, len) == img,
        "export content differs from the source after nbdcopy"
    );
    assert!(disk.flush_count() >= 1);
    run_ok(Command::new(&nbdcopy).arg(srv.uri("copy")).arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == img,
        "nbdcopy read back different data"
    );
    run_ok(
        Command::new(&qemu_img)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(srv.uri("copy")),
    );

    // A change on the export is noticed by qemu-img compare.
    disk.set_failure(None);
    let mut one = vec![0u8; 4096];
    one[0] = 1;
    let mut h = RawClient::connect(srv.addr, "copy", true, false);
    assert_eq!(h.write(1, 5 * MIB, &one), 0);
    let out = Command::new(&qemu_img)
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(srv.uri("copy"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "qemu-img compare should report a difference"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn qemu_checks(extended: bool) {
    let qemu_img = need_tool("qemu-img", "qemu-utils");
    let qemu_io = need_tool("qemu-io", "qemu-utils");
    let c = MemoryCatalog::new();
    let disk = c.add("q", MemoryExport::new(64 * MIB));
    let cfg = NbdConfig {
        extended_headers: extended,
        ..NbdConfig::default()
    };
    let srv = TestServer::start(Arc::new(c), cfg);
    let uri = srv.uri("q");

    let out = run_ok(
        Command::new(&qemu_img)
            .args(["info", "-f", "raw", "--output=json"])
            .arg(&uri),
    );
    let d = json(&out);
    assert_eq!(d["virtual-size"], 64 * MIB);

    // qemu-io's default cache mode sends FUA writes; also zero, discard, flush.
    run_ok(Command::new(&qemu_io).args(["-f", "raw"]).arg(&uri).args([
        "-c",
        "write -P 0xab 1M 256k",
        "-c",
        "write -P 0xcd 8M 64k",
        "-c",
        "write -z 8M 64k",
        "-c",
        "write -P 0x11 16M 128k",
        "-c",
        "discard 16M 64k",
        "-c",
        "flush",
        "-c",
        "read -P 0xab 1M 256k",
        "-c",
        "read -P 0 8M 64k",
        "-c",
        "read -P 0 16M 64k",
        "-c",
        "read -P 0x11 16448k 64k",
    ]));
    assert_eq!(disk.read_now(MIB, 4), vec![0xab; 4]);
    assert!(disk.flush_count() >= 1);
    assert!(disk.fua_count() >= 1, "qemu-io writes with FUA by default");

    // qemu-img map reads base:allocation (BLOCK_STATUS_EXT with extended headers).
    let d = json(&run_ok(
        Command::new(&qemu_img)
            .args(["map", "-f", "raw", "--output=json"])
            .arg(&uri),
    ));
    let data: Vec<(u64, u64)> = d
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["data"] == true)
        .map(|m| (m["start"].as_u64().unwrap(), m["length"].as_u64().unwrap()))
        .collect();
    assert!(
        data.iter()
            .any(|&(s, l)| s <= MIB && s + l >= MIB + 256 * 1024),
        "{d}"
    );
    assert!(
        !data.iter().any(|&(s, l)| s < 40 * MIB && s + l > 32 * MIB),
        "never-written range mapped as data: {d}"
    );
    let total: u64 = d
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["length"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 64 * MIB);

    // Copy an image in with qemu-img convert and compare it.
    let dir = temp_dir(if extended { "qemu-ext" } else { "qemu-compact" });
    let src = dir.join("src.img");
    let img = source_image(24 * MIB as usize);
    std::fs::write(&src, &img).unwrap();
    let nbd_opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=q",
        srv.addr.port()
    );
    run_ok(
        Command::new(&qemu_img)
            .args(["convert", "-n", "-f", "raw", "--target-image-opts"])
            .arg(&src)
            .arg(&nbd_opts),
    );
    assert!(disk.read_now(0, img.len()) == img);
    run_ok(
        Command::new(&qemu_img)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `(start, length)` runs of a JSON map's entries that `keep` accepts,
/// adjacent ones merged; `start` names the offset field.
fn map_runs(
    map: &serde_json::Value,
    start: &str,
    keep: impl Fn(&serde_json::Value) -> bool,
) -> Vec<(u64, u64)> {
    merged(
        map.as_array()
            .unwrap()
            .iter()
            .filter(|m| keep(m))
            .map(|m| (m[start].as_u64().unwrap(), m["length"].as_u64().unwrap()))
            .collect(),
    )
}

/// Merges adjacent `(start, length)` runs.
fn merged(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, l) in runs {
        match out.last_mut() {
            Some((ps, pl)) if *ps + *pl == s => *pl += l,
            _ => out.push((s, l)),
        }
    }
    out
}

#[test]
fn nbdinfo_and_qemu_img_map_the_whole_export_from_short_block_status_answers() {
    let nbdinfo = need_tool("nbdinfo", "libnbd-bin");
    let qemu_img = need_tool("qemu-img", "qemu-utils");
    // 512-byte blocks: the server answers at most 32 MiB per BLOCK_STATUS,
    // less than the 64 MiB libnbd asks for, so every answer is short and
    // the clients must ask again from where it ended.
    let size = 1u64 << 30;
    let written = [(0, 65536), (100 * MIB, 65536), (size - 65536, 65536)];
    for extended in [false, true] {
        let c = MemoryCatalog::new();
        c.add("b512", MemoryExport::with_block_size(size, 512));
        let cfg = NbdConfig {
            extended_headers: extended,
            ..NbdConfig::default()
        };
        let srv = TestServer::start(Arc::new(c), cfg);
        let mut h = RawClient::connect(srv.addr, "b512", true, false);
        for (i, &(at, len)) in written.iter().enumerate() {
            assert_eq!(h.write(i as u64, at, &vec![0x5a; len as usize]), 0);
        }
        let uri = srv.uri("b512");

        let map = json(&run_ok(
            Command::new(&nbdinfo).args(["--map", "--json"]).arg(&uri),
        ));
        let all = map_runs(&map, "offset", |_| true);
        assert_eq!(all, vec![(0, size)], "nbdinfo --map: {map}");
        let data = map_runs(&map, "offset", |m| m["type"] == 0);
        assert_eq!(data, written, "nbdinfo --map: {map}");

        let map = json(&run_ok(
            Command::new(&qemu_img)
                .args(["map", "-f", "raw", "--output=json"])
                .arg(&uri),
        ));
        let all = map_runs(&map, "start", |_| true);
        assert_eq!(all, vec![(0, size)], "qemu-img map: {map}");
        let data = map_runs(&map, "start", |m| m["data"] == true);
        assert_eq!(data, written, "qemu-img map: {map}");
    }
}

#[test]
fn qemu_img_and_qemu_io_with_extended_headers() {
    qemu_checks(true);
}

#[test]
fn qemu_img_and_qemu_io_without_extended_headers() {
    qemu_checks(false);
}

#[test]
fn fio_random_writes_verify() {
    let fio = need_tool("fio", "fio");
    let c = MemoryCatalog::new();
    c.add("fio", MemoryExport::new(128 * MIB));
    let srv = TestServer::start(Arc::new(c), NbdConfig::default());
    let dir = temp_dir("fio");
    let out_file = dir.join("fio.txt");
    let out = Command::new(&fio)
        .arg("--name=verify")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", srv.uri("fio")))
        .args([
            "--rw=randwrite",
            "--bs=4k",
            "--offset=32M",
            "--offset_increment=32M",
            "--size=24M",
            "--iodepth=16",
        ])
        .args([
            "--verify=crc32c",
            "--do_verify=1",
            "--refill_buffers=1",
            "--numjobs=2",
        ])
        .arg(format!("--output={}", out_file.display()))
        .output()
        .unwrap();
    let report = std::fs::read_to_string(&out_file).unwrap_or_default();
    assert!(
        out.status.success(),
        "fio failed:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!report.contains("verify: bad"), "{report}");
    assert!(report.contains("err= 0"), "{report}");
    let _ = std::fs::remove_dir_all(&dir);
}

const LIBNBD_SEMANTICS: &str = r#"
import nbd, os, sys
u, ro_u = sys.argv[1], sys.argv[2]
B = 1 << 20

def conn(uri=u, strict=True):
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h

def expect(name, f):
    try:
        f()
    except nbd.Error as e:
        assert e.errno == name, (name, e.errno, str(e))
        return
    raise AssertionError("expected %s" % name)

h = conn(); g = conn()
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
for k in ("can_multi_conn", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df", "can_cache", "can_flush"):
    assert getattr(h, k)(), k
assert not h.is_read_only()

data = os.urandom(B)
# Multi-conn: a FUA write is visible on another connection; so is a flushed one.
h.pwrite(data, 10 * B, nbd.CMD_FLAG_FUA)
assert g.pread(B, 10 * B) == data, "FUA write not visible on another connection"
h.pwrite(data[::-1], 11 * B)
h.flush()
assert g.pread(B, 11 * B) == data[::-1], "flushed write not visible on another connection"
# Trim and zero read back as zeros.
h.trim(B, 10 * B, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(B, 10 * B) == bytes(B), "trimmed range not zero"
h.pwrite(data, 12 * B); h.zero(B, 12 * B)
assert g.pread(B, 12 * B) == bytes(B), "zeroed range not zero"
h.pwrite(data, 13 * B); h.zero(B, 13 * B, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(B, 13 * B) == bytes(B), "NO_HOLE zero not zero"
h.pwrite(data, 14 * B); h.zero(B, 14 * B, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)
assert h.pread(B, 14 * B) == bytes(B), "fast zero not zero"
# Unaligned small write.
h.pwrite(data[:4096], 15 * B + 513)
assert h.pread(4096, 15 * B + 513) == data[:4096] and h.pread(513, 15 * B) == bytes(513)
h.cache(B, 0)

# Block status: holes where nothing was written, data where it was.
ents = []
def cb(ctx, off, e, err):
    assert ctx == "base:allocation", ctx
    ents.append((off, list(e)))
    return 0
h.block_status(32 * B, 0, cb)
assert len(ents) == 1
off, e = ents[0]
assert off == 0 and len(e) >= 2 and len(e) % 2 == 0
assert all(e[i] > 0 for i in range(0, len(e), 2)), e
runs = []
pos = 0
for i in range(0, len(e), 2):
    runs.append((pos, e[i], e[i + 1])); pos += e[i]
assert pos <= 32 * B
def status(at):
    for s, l, f in runs:
        if s <= at < s + l:
            return f
    raise AssertionError("offset %d not covered by %r" % (at, runs))
assert status(0) & 3 == 3, runs            # never written: hole + zero
assert status(10 * B) & 1 == 1, runs       # trimmed
assert status(11 * B) == 0, runs           # data
assert status(15 * B) == 0, runs

# REQ_ONE: exactly one extent, no longer than asked.
one = []
h.block_status(8 * B, 11 * B - 4096, lambda c, o, e, err: one.append(list(e)) or 0, nbd.CMD_FLAG_REQ_ONE)
assert one == [[4096, 3]], one
one = []
h.block_status(100, 11 * B, lambda c, o, e, err: one.append(list(e)) or 0, nbd.CMD_FLAG_REQ_ONE)
assert one == [[100, 0]], one

# Structured reads: a hole chunk for the unwritten half, data for the rest.
chunks = []
def rcb(buf, off, st, err):
    chunks.append((off, len(buf), st, bytes(buf) == bytes(len(buf))))
    return 0
buf = h.pread_structured(B, 11 * B - B // 2, rcb)
assert buf[B // 2:] == data[::-1][:B // 2]
assert any(st == nbd.READ_HOLE for _, _, st, _ in chunks), chunks
assert any(st == nbd.READ_DATA for _, _, st, _ in chunks), chunks
assert sum(l for _, l, _, _ in chunks) == B
# DF: exactly one content chunk.
chunks = []
h.pread_structured(B, 11 * B - B // 2, rcb, nbd.CMD_FLAG_DF)
assert len(chunks) == 1 and chunks[0][2] == nbd.READ_DATA and chunks[0][1] == B, chunks

# Bad requests (strict mode off so libnbd sends them) get the right errno and
# leave the connection usable.
s = conn(strict=False)
size = s.get_size()
expect("EINVAL", lambda: s.pread(4096, size - 1024))
expect("ENOSPC", lambda: s.pwrite(bytes(4096), size - 1024))
expect("EINVAL", lambda: s.trim(4096, size - 1024))
expect("ENOSPC", lambda: s.zero(4096, size - 1024))
expect("EINVAL", lambda: s.block_status(4096, size, lambda *a: 0))
expect("EINVAL", lambda: s.cache(4096, size))
expect("EINVAL", lambda: s.pread(4096, 0, nbd.CMD_FLAG_REQ_ONE))
expect("EINVAL", lambda: s.pwrite(bytes(4096), 0, nbd.CMD_FLAG_NO_HOLE))
expect("EINVAL", lambda: s.trim(4096, 0, nbd.CMD_FLAG_DF))
expect("EINVAL", lambda: s.pread(40 * B, 0))
assert s.pread(4096, 11 * B) == data[::-1][:4096]
s.pwrite(b"ok" * 256, 20 * B)
assert g.pread(512, 20 * B) == b"ok" * 256

# Read-only export: EPERM for every kind of write, reads fine.
r = conn(ro_u, strict=False)
assert r.is_read_only()
expect("EPERM", lambda: r.pwrite(b"x" * 512, 0))
expect("EPERM", lambda: r.trim(512, 0))
expect("EPERM", lambda: r.zero(512, 0))
r.flush()
assert r.pread(512, 0) == bytes(512)

for x in (h, g, s, r):
    x.shutdown()
print("ok")
"#;

#[test]
fn libnbd_semantics() {
    let c = MemoryCatalog::new();
    let disk = c.add("disk", MemoryExport::new(64 * MIB));
    c.add("ro", MemoryExport::new(MIB).read_only(true));
    let srv = TestServer::start(Arc::new(c), NbdConfig::default());
    let out = run_python(LIBNBD_SEMANTICS, &[&srv.uri("disk"), &srv.uri("ro")]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    assert!(disk.fua_count() >= 3);
    assert!(disk.flush_count() >= 2);
}

#[test]
fn libnbd_simple_replies_only() {
    // A client that does not ask for structured replies gets simple ones.
    let c = MemoryCatalog::new();
    c.add("disk", MemoryExport::new(8 * MIB));
    let srv = TestServer::start(Arc::new(c), NbdConfig::default());
    let script = r#"
import nbd, sys, os
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(sys.argv[1])
assert not h.get_structured_replies_negotiated()
assert not h.can_df()
d = os.urandom(65536)
h.pwrite(d, 4096)
assert h.pread(65536, 4096) == d
h.set_strict_mode(0)
try:
    h.pread(4096, 8 << 20)
    raise SystemExit("read past end succeeded")
except nbd.Error as e:
    assert e.errno == "EINVAL", e.errno
assert h.pread(4096, 4096) == d[:4096]
h.shutdown()
print("ok")
"#;
    let out = run_python(script, &[&srv.uri("disk")]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

#[test]
fn pipelined_requests_complete_out_of_order_and_overlapping_writes_keep_order() {
    for (structured, extended) in [(false, false), (true, false), (true, true)] {
        let c = MemoryCatalog::new();
        let disk = c.add(
            "slow",
            MemoryExport::new(16 * MIB)
                .latency(Duration::from_micros(0), Duration::from_millis(20)),
        );
        let srv = TestServer::start(Arc::new(c), NbdConfig::default());
        let mut h = RawClient::connect(srv.addr, "slow", structured, extended);
        // 200 overlapping writes to the same block, pipelined; the last one
        // must win even though completions are reordered.
        let mut batch = Vec::new();
        for i in 0..200u64 {
            let payload = vec![(i % 251) as u8; 4096];
            batch.extend_from_slice(&h.request_bytes(0, proto::CMD_WRITE, 1000 + i, 8192, 4096));
            batch.extend_from_slice(&payload);
        }
        std::io::Write::write_all(&mut h.s, &batch).unwrap();
        let mut cookies = Vec::new();
        for _ in 0..200 {
            let (e, c) = h.status_reply().unwrap();
            assert_eq!(e, 0);
            cookies.push(c);
        }
        let mut sorted = cookies.clone();
        sorted.sort();
        assert_eq!(sorted, (1000..1200).collect::<Vec<_>>());
        assert_ne!(
            cookies, sorted,
            "replies should arrive out of order with random latency"
        );
        assert_eq!(disk.read_now(8192, 4096), vec![199u8; 4096]);
        let (e, d) = h.read(7, 8192, 4096);
        assert_eq!(e, 0);
        assert_eq!(d, vec![199u8; 4096]);
    }
}

#[test]
fn pipelined_large_reads_then_disc_get_every_reply() {
    // Large finished replies are queued from tasks of their own: a DISC
    // right behind them must still see each one written, with its data.
    for (structured, extended) in [(false, false), (true, false), (true, true)] {
        let c = MemoryCatalog::new();
        c.add("disk", MemoryExport::new(16 * MIB));
        let srv = TestServer::start(Arc::new(c), NbdConfig::default());
        let mut h = RawClient::connect(srv.addr, "disk", structured, extended);
        let image = random_bytes(27, 16 * MIB as usize);
        for (i, chunk) in image.chunks(MIB as usize).enumerate() {
            assert_eq!(h.write(i as u64, i as u64 * MIB, chunk), 0);
        }
        // Sixteen 1 MiB reads, one straddling a MiB boundary and an
        // unaligned 512 KiB one, then DISC, in one write.
        let mut asked: Vec<(u64, u64, usize)> = (0..16u64)
            .map(|i| (100 + i, (15 - i) * MIB, MIB as usize))
            .collect();
        asked.push((200, MIB / 2, MIB as usize));
        asked.push((201, 7 * MIB + 4096, (MIB / 2) as usize));
        let mut batch = Vec::new();
        for &(cookie, offset, len) in &asked {
            batch.extend_from_slice(&h.request_bytes(
                0,
                proto::CMD_READ,
                cookie,
                offset,
                len as u64,
            ));
        }
        batch.extend_from_slice(&h.request_bytes(0, proto::CMD_DISC, 999, 0, 0));
        std::io::Write::write_all(&mut h.s, &batch).unwrap();
        let mut seen = Vec::new();
        let range = |cookie: u64| {
            let &(_, offset, len) = asked
                .iter()
                .find(|a| a.0 == cookie)
                .expect("a cookie we sent");
            offset as usize..offset as usize + len
        };
        for _ in 0..asked.len() {
            let (e, cookie, got) = if structured {
                // Chunks carry absolute offsets: read into a whole image's
                // worth of room and cut the request's range out after.
                let (e, cookie, data) = h.read_reply(0, 16 * MIB as usize).unwrap();
                (e, cookie, data[range(cookie)].to_vec())
            } else {
                let (e, cookie) = h.simple_reply().unwrap();
                let mut data = vec![0; range(cookie).len()];
                std::io::Read::read_exact(&mut h.s, &mut data).unwrap();
                (e, cookie, data)
            };
            assert_eq!(e, 0);
            assert!(got == image[range(cookie)], "cookie {cookie}: wrong data");
            seen.push(cookie);
        }
        seen.sort();
        let mut want: Vec<u64> = asked.iter().map(|a| a.0).collect();
        want.sort();
        assert_eq!(seen, want);
        assert!(
            h.closed_by_server(),
            "DISC should close the connection after the replies"
        );
    }
}

#[test]
fn large_writes_on_their_own_task_keep_arrival_order_with_later_overlapping_writes() {
    // Writes of 64 KiB and more are applied on a task of their own; a later
    // write, trim or zeroing that overlaps one must still take effect after
    // it. Each 64 KiB region gets a large write, then a 4 KiB write (or a
    // trim, or zeroes) inside it, all pipelined.
    const REGION: u64 = 64 * 1024;
    const REGIONS: u64 = 96;
    let c = MemoryCatalog::new();
    let disk = c.add("disk", MemoryExport::new(REGIONS * REGION));
    let srv = TestServer::start(Arc::new(c), NbdConfig::default());
    let mut h = RawClient::connect(srv.addr, "disk", true, false);
    let mut batch = Vec::new();
    for i in 0..REGIONS {
        let base = i * REGION;
        batch.extend_from_slice(&h.request_bytes(0, proto::CMD_WRITE, 2 * i, base, REGION));
        batch.extend(std::iter::repeat_n(0xAA, REGION as usize));
        match i % 3 {
            0 => {
                batch.extend_from_slice(&h.request_bytes(
                    0,
                    proto::CMD_WRITE,
                    2 * i + 1,
                    base + 4096,
                    4096,
                ));
                batch.extend(std::iter::repeat_n(0xBB, 4096));
            }
            1 => batch.extend_from_slice(&h.request_bytes(
                0,
                proto::CMD_TRIM,
                2 * i + 1,
                base + 4096,
                4096,
            )),
            _ => batch.extend_from_slice(&h.request_bytes(
                0,
                proto::CMD_WRITE_ZEROES,
                2 * i + 1,
                base + 4096,
                4096,
            )),
        }
    }
    std::io::Write::write_all(&mut h.s, &batch).unwrap();
    for _ in 0..2 * REGIONS {
        let (e, _) = h.status_reply().unwrap();
        assert_eq!(e, 0);
    }
    for i in 0..REGIONS {
        let base = i * REGION;
        let want = if i % 3 == 0 { 0xBB } else { 0 };
        assert_eq!(
            disk.read_now(base, 4096),
            vec![0xAA; 4096],
            "region {i}, first block"
        );
        assert_eq!(
            disk.read_now(base + 4096, 4096),
            vec![want; 4096],
            "region {i}: the later request lost"
        );
        assert_eq!(
            disk.read_now(base + 8192, 4096),
            vec![0xAA; 4096],
            "region {i}, third block"
        );
    }
}

#[test]
fn large_writes_one_at_a_time_and_in_slow_pieces_complete() {
    // Large payloads are read with a low-water mark on the socket (see
    // `socket_hints::LowWater`): a client that waits for each reply, or
    // sends a payload in pieces with pauses between them, must still get
    // every write done, and the mark must be gone for the next header.
    const MIB: usize = 1 << 20;
    let c = MemoryCatalog::new();
    let disk = c.add("disk", MemoryExport::new(64 * MIB as u64));
    let srv = TestServer::start(Arc::new(c), NbdConfig::default());
    let mut h = RawClient::connect(srv.addr, "disk", true, false);
    // Enough back-to-back megabytes for the receive buffer to grow past
    // where a mark is set.
    for i in 0..48u64 {
        let data = random_bytes(i, MIB);
        assert_eq!(h.write(i, i * MIB as u64, &data), 0, "write {i}");
    }
    for (i, split) in [(48u64, 1000usize), (49, 300 << 10), (50, MIB - 1)] {
        let data = random_bytes(i, MIB);
        let head = h.request_bytes(0, proto::CMD_WRITE, i, i * MIB as u64, MIB as u64);
        std::io::Write::write_all(&mut h.s, &head).unwrap();
        std::io::Write::write_all(&mut h.s, &data[..split]).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        std::io::Write::write_all(&mut h.s, &data[split..]).unwrap();
        let (e, cookie) = h.status_reply().unwrap();
        assert_eq!((e, cookie), (0, i), "write {i} split at {split}");
        // A small request right after: its header alone must wake the server.
        let (e, got) = h.read(1000 + i, i * MIB as u64, 4096);
        assert_eq!(e, 0);
        assert_eq!(got, data[..4096]);
    }
    for i in 0..51u64 {
        assert_eq!(
            disk.read_now(i * MIB as u64, MIB),
            random_bytes(i, MIB),
            "MiB {i}"
        );
    }
}

#[test]
fn shutdown_finishes_in_flight_requests_and_flushes() {
    let c = MemoryCatalog::new();
    let disk = c.add(
        "slow",
        MemoryExport::new(16 * MIB).latency(Duration::from_millis(200), Duration::from_millis(400)),
    );
    let srv = TestServer::start(Arc::new(c), NbdConfig::default());
    let mut h = RawClient::connect(srv.addr, "slow", true, false);
    let mut idle = RawClient::connect(srv.addr, "slow", false, false);
    let mut batch = Vec::new();
    for i in 0..20u64 {
        batch.extend_from_slice(&h.request_bytes(0, proto::CMD_WRITE, i, i * 4096, 4096));
        batch.extend_from_slice(&[i as u8 + 1; 4096]);
    }
    std::io::Write::write_all(&mut h.s, &batch).unwrap();
    // Let the server read them, then shut down while they are in flight.
    let t0 = Instant::now();
    while disk.write_count() < 20 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(disk.write_count(), 20);
    let flushes_before = disk.flush_count();
    let stopper = std::thread::spawn(move || srv.stop());
    let mut got = Vec::new();
    for _ in 0..20 {
        let (e, c) = h
            .status_reply()
            .expect("reply to an in-flight request lost at shutdown");
        assert_eq!(e, 0);
        got.push(c);
    }
    got.sort();
    assert_eq!(got, (0..20).collect::<Vec<_>>());
    assert!(h.closed_by_server());
    assert!(idle.closed_by_server());
    stopper.join().unwrap().unwrap();
    assert!(
        disk.flush_count() > flushes_before,
        "exports are flushed at shutdown"
    );
    for i in 0..20u64 {
        assert_eq!(disk.read_now(i * 4096, 1), vec![i as u8 + 1]);
    }
}

/// Throughput check, not run by default:
/// `cargo test --release -p ballast-server --test nbd_protocol -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_fio_4k_one_connection() {
    let fio = need_tool("fio", "fio");
    let c = MemoryCatalog::new();
    let disk = c.add("bench", MemoryExport::new(256 * MIB));
    disk.set_failure(None);
    let srv = TestServer::start(Arc::new(c), NbdConfig::default());
    for rw in ["randwrite", "randread"] {
        let out = run_ok(
            Command::new(&fio)
                .arg("--name=bench")
                .arg("--ioengine=nbd")
                .arg(format!("--uri={}", srv.uri("bench")))
                .arg(format!("--rw={rw}"))
                .args([
                    "--bs=4k",
                    "--size=256M",
                    "--iodepth=32",
                    "--time_based",
                    "--runtime=5",
                    "--output-format=json",
                ]),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let d: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
        let job = &d["jobs"][0];
        let iops = job["write"]["iops"].as_f64().unwrap() + job["read"]["iops"].as_f64().unwrap();
        eprintln!("fio {rw} 4k qd32, one connection: {iops:.0} IOPS");
    }
}
