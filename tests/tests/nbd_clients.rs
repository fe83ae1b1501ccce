//! Real NBD clients we did not write (libnbd's nbdinfo/nbdcopy/python
//! bindings, qemu-img/qemu-io, fio) against a real ballastd.

use ballast_e2e::*;
use std::time::Duration;

fn export_json(uri: &str) -> Json {
    let out = run_ok(
        &mut cmd("nbdinfo", ["--json", uri]),
        Duration::from_secs(60),
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo --json: {e}: {out}"))
}

#[test]
fn nbdinfo_flags_block_sizes_and_list() {
    require_nbd_tools();
    let node = Node::start();
    node.create_volume("v1", "1G", &[]);
    node.create_volume("v2", "256M", &["--block-size", "64K"]);

    let d = export_json(&node.uri("v1"));
    assert!(
        d["protocol"].as_str().unwrap_or("").starts_with("newstyle"),
        "protocol: {d}"
    );
    assert_eq!(
        d["structured"], true,
        "structured replies not negotiated: {d}"
    );
    let e = &d["exports"][0];
    assert_eq!(e["export-name"], "v1", "{e}");
    assert_eq!(e["export-size"], GIB, "{e}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag], true, "{flag} is not set: {e}");
    }
    assert_eq!(e["is_read_only"], false, "{e}");
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c.as_str()).collect())
        .unwrap_or_default();
    assert!(contexts.contains(&"base:allocation"), "contexts: {e}");

    // Block sizes: present, and in the shape libnbd accepts (otherwise
    // libnbd silently ignores the advertisement).
    let min = e["block_size_minimum"]
        .as_u64()
        .unwrap_or_else(|| panic!("no block_size_minimum: {e}"));
    let pref = e["block_size_preferred"]
        .as_u64()
        .unwrap_or_else(|| panic!("no block_size_preferred: {e}"));
    let max = e["block_size_maximum"]
        .as_u64()
        .unwrap_or_else(|| panic!("no block_size_maximum: {e}"));
    assert!(
        min.is_power_of_two() && min <= 64 * KIB,
        "minimum {min}: {e}"
    );
    assert!(
        pref.is_power_of_two() && pref >= 512 && pref >= min,
        "preferred {pref}: {e}"
    );
    assert!(
        max == 0xffff_ffff || (max >= pref && max % min == 0),
        "maximum {max}: {e}"
    );
    assert!(
        max >= 32 * MIB || max == 0xffff_ffff,
        "maximum payload {max} < 32 MiB"
    );
    assert!(pref >= 4096, "preferred {pref} below the 4K volume block");

    // A 64K-block volume prefers 64K requests.
    let e2 = export_json(&node.uri("v2"));
    let e2 = &e2["exports"][0];
    assert_eq!(e2["export-size"], 256 * MIB, "{e2}");
    assert_eq!(e2["block_size_preferred"], 64 * KIB, "{e2}");

    // --list names every volume.
    let list = run_ok(
        &mut cmd(
            "nbdinfo",
            [
                "--list".to_string(),
                "--json".to_string(),
                format!("nbd://127.0.0.1:{}/", node.nbd_port),
            ],
        ),
        Duration::from_secs(60),
    );
    let list: Json = serde_json::from_str(&list).expect("nbdinfo --list --json");
    let names: Vec<&str> = list["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .filter_map(|x| x["export-name"].as_str())
        .collect();
    assert!(
        names.contains(&"v1") && names.contains(&"v2"),
        "nbdinfo --list shows {names:?}"
    );

    // An export that does not exist is refused, and nbdinfo says so.
    let out = run(
        &mut cmd("nbdinfo", [node.uri("nope")]),
        Duration::from_secs(60),
    );
    assert!(
        !out.status.success(),
        "nbdinfo on a missing export succeeded"
    );

    // A snapshot is a read-only export of the same size.
    node.cli_ok(&["volume", "snapshot", "v1", "v1-snap"]);
    let s = export_json(&node.uri("v1-snap"));
    let s = &s["exports"][0];
    assert_eq!(s["is_read_only"], true, "snapshot export is writable: {s}");
    assert_eq!(s["export-size"], GIB, "{s}");

    // qemu-img sees the size.
    let info = run_ok(
        &mut cmd("qemu-img", ["info", "-f", "raw", &node.uri("v1")]),
        Duration::from_secs(60),
    );
    assert!(
        info.contains("virtual size: 1 GiB (1073741824 bytes)"),
        "qemu-img info:\n{info}"
    );
}

#[test]
fn nbdcopy_round_trip_and_qemu_img_compare() {
    require_nbd_tools();
    let node = Node::start();
    node.create_volume("v", "512M", &[]);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("rand");
    let len = 160 * MIB as usize;
    let data = random_file(&src, len, 1);
    let uri = node.uri("v");

    nbdcopy(&["--flush", src.to_str().unwrap(), &uri]);
    let back = read_export(&uri, 512 * MIB as usize);
    assert_same("nbdcopy read-back", &back[..len], &data);
    assert!(all_zero(&back[len..]), "the unwritten tail is not zero");

    // qemu-img compare: identical, and the volume's tail beyond the file is zero.
    run_ok(
        &mut cmd(
            "qemu-img",
            [
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                src.to_str().unwrap(),
                &uri,
            ],
        ),
        Duration::from_secs(300),
    );
    // ... and a changed byte is noticed (the comparison really reads the volume).
    let mut changed = data.clone();
    changed[len / 2] ^= 0xff;
    let other = dir.path().join("changed");
    std::fs::write(&other, &changed).unwrap();
    let out = run(
        &mut cmd(
            "qemu-img",
            [
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                other.to_str().unwrap(),
                &uri,
            ],
        ),
        Duration::from_secs(300),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "qemu-img compare missed a difference"
    );

    // nbd -> nbd copy between two volumes of the same server.
    node.create_volume("w", "512M", &[]);
    nbdcopy(&["--flush", &uri, &node.uri("w")]);
    run_ok(
        &mut cmd(
            "qemu-img",
            ["compare", "-f", "raw", "-F", "raw", &uri, &node.uri("w")],
        ),
        Duration::from_secs(300),
    );
}

#[test]
fn qemu_img_convert_from_qcow2() {
    require_nbd_tools();
    require("qemu-io", "qemu-utils");
    let node = Node::start();
    node.create_volume("q", "256M", &[]);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let img_s = img.to_str().unwrap();
    run_ok(
        &mut cmd("qemu-img", ["create", "-q", "-f", "qcow2", img_s, "200M"]),
        Duration::from_secs(60),
    );
    run_ok(
        &mut cmd(
            "qemu-io",
            [
                "-f",
                "qcow2",
                "-c",
                "write -P 0xab 0 4M",
                "-c",
                "write -P 0xcd 100M 3M",
                "-c",
                "write -P 0x11 123k 5k",
                "-c",
                "write -z 101M 1M",
                img_s,
            ],
        ),
        Duration::from_secs(60),
    );
    let uri = node.uri("q");
    // Dirty the volume first so qemu's zero writes have something to clear.
    run_ok(
        &mut cmd(
            "qemu-io",
            ["-f", "raw", "-c", "write -q -P 0x77 0 256M", &uri],
        ),
        Duration::from_secs(120),
    );
    // qemu writes data, WRITE_ZEROES and flushes (cache=writeback default).
    run_ok(
        &mut cmd(
            "qemu-img",
            ["convert", "-n", "-f", "qcow2", "-O", "raw", img_s, &uri],
        ),
        Duration::from_secs(300),
    );
    // The 56 MiB beyond the image still hold 0x77, so compare the first
    // 200 MiB strictly.
    let raw = dir.path().join("disk.raw");
    run_ok(
        &mut cmd(
            "qemu-img",
            [
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                img_s,
                raw.to_str().unwrap(),
            ],
        ),
        Duration::from_secs(300),
    );
    let want = std::fs::read(&raw).unwrap();
    let got = read_export(&uri, want.len());
    assert_same("qcow2 converted into the volume", &got, &want);
    assert_eq!(got[0], 0xab);
    assert!(all_zero(&got[(101 * MIB) as usize..(102 * MIB) as usize]));
    // qemu-io against the export directly: FUA writes and reads back.
    let out = run_ok(
        &mut cmd(
            "qemu-io",
            [
                "-f",
                "raw",
                "-c",
                "write -P 0x5a -f 7M 64k",
                "-c",
                "read -P 0x5a 7M 64k",
                "-c",
                "flush",
                &uri,
            ],
        ),
        Duration::from_secs(60),
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn fio_randwrite_verify() {
    require("fio", "fio");
    let node = Node::start();
    node.create_volume("f", "1G", &[]);
    let uri = node.uri("f");
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("fio.txt");
    let o = run(
        &mut cmd(
            "fio",
            [
                "--name=verify4k".to_string(),
                "--ioengine=nbd".to_string(),
                format!("--uri={uri}"),
                "--rw=randwrite".to_string(),
                "--bs=4k".to_string(),
                "--offset=512M".to_string(),
                "--size=96M".to_string(),
                "--iodepth=16".to_string(),
                "--verify=crc32c".to_string(),
                "--do_verify=1".to_string(),
                "--refill_buffers=1".to_string(),
                // a second job: mixed sizes up to 1 MiB in another range
                "--name=verifymixed".to_string(),
                "--ioengine=nbd".to_string(),
                format!("--uri={uri}"),
                "--rw=randwrite".to_string(),
                "--bsrange=4k-1m".to_string(),
                "--offset=64M".to_string(),
                "--size=64M".to_string(),
                "--iodepth=8".to_string(),
                "--verify=crc32c".to_string(),
                "--do_verify=1".to_string(),
                "--refill_buffers=1".to_string(),
                format!("--output={}", out_file.display()),
            ],
        ),
        Duration::from_secs(300),
    );
    let report = std::fs::read_to_string(&out_file).unwrap_or_default();
    assert!(
        o.status.success(),
        "fio verify failed ({}):\n{}\n{}",
        o.status,
        tail(&report, 40),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!report.contains("verify: bad"), "{report}");
    for l in report.lines().filter(|l| l.contains("err=")) {
        let n = l.split("err=").nth(1).unwrap().trim_start();
        assert!(
            n.starts_with("0:") || n.starts_with('0'),
            "fio job error: {l}"
        );
    }
    assert!(
        report.matches("err= 0").count() == 2,
        "both fio jobs must report err= 0:\n{report}"
    );
}

#[test]
fn libnbd_semantics() {
    require_python_nbd();
    let node = Node::start();
    node.create_volume("v1", "1G", &[]);
    python(
        r#"
u = sys.argv[1]
B = 1 << 20
h = conn(u); g = conn(u)
assert h.get_size() == 1 << 30
assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_multi_conn()
assert not h.is_read_only()
assert h.can_meta_context("base:allocation")
data = os.urandom(B)

# multi-conn: a FUA write is seen by another connection
h.pwrite(data, 700 * B, nbd.CMD_FLAG_FUA)
assert g.pread(B, 700 * B) == data, "second connection does not see a FUA write"
# write on h, flush on g, read on g
d2 = os.urandom(B)
h.pwrite(d2, 710 * B)
g.flush()
assert g.pread(B, 710 * B) == d2, "write -> flush(other conn) -> read(other conn) broken"

# trim reads back zero
h.trim(B, 700 * B); h.flush()
assert h.pread(B, 700 * B) == bytes(B), "trimmed range does not read back as zeros"
assert g.pread(B, 700 * B) == bytes(B), "trim not visible on the other connection"
# write-zeroes, with and without NO_HOLE, and with FUA
h.pwrite(data, 701 * B); h.zero(B, 701 * B)
assert h.pread(B, 701 * B) == bytes(B), "zeroed range not zero"
h.pwrite(data, 703 * B); h.zero(B, 703 * B, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
assert g.pread(B, 703 * B) == bytes(B), "NO_HOLE zero not zero"
# a huge WRITE_ZEROES and TRIM (beyond the payload maximum) are fine
h.pwrite(data, 0); h.pwrite(data, 300 * B)
h.pwrite(data, 150 * B); h.pwrite(data, 270 * B)
h.zero(200 * B, 50 * B); h.trim(40 * B, 255 * B)
assert h.pread(B, 300 * B) == data, "data after a big zero/trim range was hit"
assert h.pread(B, 0) == data, "data before a big zero range was hit"
assert h.pread(B, 150 * B) == bytes(B), "200 MiB WRITE_ZEROES missed data"
assert h.pread(B, 270 * B) == bytes(B), "40 MiB TRIM missed data"

# unaligned and tiny writes keep their neighbours
h.pwrite(data[:4096], 702 * B + 512)
assert h.pread(4096, 702 * B + 512) == data[:4096], "unaligned write wrong"
assert h.pread(512, 702 * B) == bytes(512), "bytes before an unaligned write changed"
assert h.pread(512, 702 * B + 4608) == bytes(512), "bytes after an unaligned write changed"
h.pwrite(b"\x01", 702 * B + 3)
h.pwrite(b"xyz", 702 * B + 4095)
got = h.pread(8192, 702 * B)
want = bytearray(8192); want[512:4608] = data[:4096]; want[3] = 1; want[4095:4098] = b"xyz"
assert got == bytes(want), "1- and 3-byte writes across a block edge wrong"
# reads at odd offsets and lengths
assert h.pread(5, 702 * B + 4094) == bytes(want[4094:4099])

# block status: never-written range is a hole reading as zero; data is data
ext = extents(h, 8 * B, 900 * B)
assert ext[0][1] & 3 == 3, "never-written range is not hole+zero: %r" % ext[:4]
assert sum(l for l, _ in ext) <= 8 * B
ext = extents(h, 2 * B, 0)
assert ext[0][1] & 1 == 0 and ext[0][0] >= 4096, "written range reported as hole: %r" % ext[:4]
one = extents(h, 64 * B, 0, nbd.CMD_FLAG_REQ_ONE)
assert len(one) == 1 and one[0][0] <= 64 * B, "REQ_ONE: %r" % one
ext = extents(h, 4096, (1 << 30) - 4096)   # the very last block
assert ext[0][0] <= 4096

# a 32 MiB payload is accepted
big = os.urandom(32 * B)
h.pwrite(big, 400 * B)
assert h.pread(32 * B, 400 * B) == big, "32 MiB write/read wrong"

# out-of-range requests fail with the spec's errors, and the connection lives on
E = (1 << 30)
expect_err("read past end", lambda: h.pread(4096, E), "EINVAL")
expect_err("read crossing the end", lambda: h.pread(8192, E - 4096), "EINVAL")
expect_err("write past end", lambda: h.pwrite(bytes(4096), E - 1024), "ENOSPC", "EINVAL")
expect_err("write-zeroes past end", lambda: h.zero(8192, E - 4096), "ENOSPC", "EINVAL")
expect_err("trim past end", lambda: h.trim(8192, E - 4096), "EINVAL")
expect_err("block status past end", lambda: extents(h, 4096, E), "EINVAL")
assert h.pread(4096, E - 4096) is not None
assert h.pread(B, 0) == data, "connection unusable after errors"

# many requests in flight on one connection, checked by aio reads
bufs = {}
for i in range(64):
    off = 800 * B + i * 65536
    bufs[off] = os.urandom(65536)
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(bufs[off])), off)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
for off, want in bufs.items():
    assert g.pread(65536, off) == want, "aio write at %d wrong" % off
# overlapping writes from one connection apply in arrival order
for i in range(16):
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i]) * 8192), 850 * B)
while h.aio_in_flight() > 0:
    h.poll(-1)
assert h.pread(8192, 850 * B) == bytes([15]) * 8192, "overlapping writes not in arrival order"

h.flush(); h.shutdown(); g.shutdown()
print("ok")
"#,
        &[&node.uri("v1")],
    );

    // Snapshots are read-only exports with the contents at snapshot time;
    // clones are writable and independent.
    python(
        r#"
h = conn(sys.argv[1])
h.pwrite(b"A" * 65536, 0, nbd.CMD_FLAG_FUA)
h.shutdown()
"#,
        &[&node.uri("v1")],
    );
    node.cli_ok(&["volume", "snapshot", "v1", "s1"]);
    node.cli_ok(&["volume", "clone", "s1", "c1"]);
    python(
        r#"
v, s, c = (conn(x) for x in sys.argv[1:4])
v.pwrite(b"B" * 65536, 0, nbd.CMD_FLAG_FUA)       # after the snapshot
assert s.is_read_only(), "snapshot export is writable"
assert s.pread(65536, 0) == b"A" * 65536, "snapshot changed after a write to its volume"
assert c.pread(65536, 0) == b"A" * 65536, "clone does not start from the snapshot"
expect_err("write to a snapshot", lambda: s.pwrite(b"x" * 4096, 0), "EPERM")
expect_err("trim on a snapshot", lambda: s.trim(4096, 0), "EPERM")
expect_err("zero on a snapshot", lambda: s.zero(4096, 0), "EPERM")
assert s.pread(4096, 0) == b"A" * 4096, "snapshot connection unusable after EPERM"
s.flush()
c.pwrite(b"C" * 4096, 0, nbd.CMD_FLAG_FUA)
assert c.pread(4096, 0) == b"C" * 4096
assert s.pread(4096, 0) == b"A" * 4096, "write to a clone changed its snapshot"
assert v.pread(4096, 0) == b"B" * 4096, "write to a clone changed the origin"
for x in (v, s, c): x.shutdown()
print("ok")
"#,
        &[&node.uri("v1"), &node.uri("s1"), &node.uri("c1")],
    );
}

#[test]
fn nbdcopy_multi_conn_and_resize_visible() {
    require_nbd_tools();
    require_python_nbd();
    let node = Node::start();
    node.create_volume("r", "64M", &[]);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a");
    let data = random_file(&src, 64 * MIB as usize, 7);
    // 4 connections, many requests in flight
    nbdcopy(&[
        "--flush",
        "-C",
        "4",
        "--requests=32",
        src.to_str().unwrap(),
        &node.uri("r"),
    ]);
    node.cli_ok(&["volume", "resize", "r", "--size", "128M"]);
    let d = export_json(&node.uri("r"));
    assert_eq!(d["exports"][0]["export-size"], 128 * MIB, "{d}");
    let back = read_export(&node.uri("r"), 128 * MIB as usize);
    assert_same("data after resize", &back[..data.len()], &data);
    assert!(all_zero(&back[data.len()..]), "grown part is not zero");
}

/// Random writes, trims, zeroes and reads from two connections against a
/// model of the volume, for several block sizes and data options; then the
/// whole volume is compared with the model, also after kill -9 and restart.
#[test]
fn random_operations_match_a_model() {
    require_python_nbd();
    require_nbd_tools();
    let mut node = Node::start();
    let dir = tempfile::tempdir().unwrap();
    let vols: [(&str, &[&str]); 4] = [
        ("b512", &["--block-size", "512"]),
        ("b4k", &[]),
        ("b64k", &["--block-size", "64K"]),
        ("plain", &["--dedup", "off", "--compression", "none"]),
    ];
    for (name, opts) in vols {
        node.create_volume(name, "32M", opts);
        let model = dir.path().join(name);
        python(
            r#"
uri, path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
S = 32 << 20
model = bytearray(S)
hs = [conn(uri), conn(uri)]
pool = [os.urandom(4096) for _ in range(8)]      # repeated content: dedup
text = b"compressible text " * 4096
for i in range(1500):
    h = rng.choice(hs)
    op = rng.random()
    ln = rng.choice([1, 511, 512, 4096, 4097, 65536, 100000, 1 << 20])
    off = rng.randrange(0, S - ln)
    if rng.random() < 0.5:
        off -= off % 512
    if op < 0.55:
        kind = rng.random()
        if kind < 0.3:
            buf = (rng.choice(pool) * (ln // 4096 + 1))[:ln]
        elif kind < 0.5:
            buf = text[:ln] if ln <= len(text) else (text * (ln // len(text) + 1))[:ln]
        else:
            buf = os.urandom(ln)
        h.pwrite(buf, off, nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0)
        model[off:off + ln] = buf
    elif op < 0.65:
        h.trim(ln, off)
        model[off:off + ln] = bytes(ln)
    elif op < 0.75:
        h.zero(ln, off, nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0)
        model[off:off + ln] = bytes(ln)
    elif op < 0.8:
        h.flush()
    else:
        # read on the connection that did not necessarily write: multi-conn
        # needs a flush first
        h.flush()
        g = rng.choice(hs)
        got = g.pread(ln, off)
        assert got == bytes(model[off:off + ln]), "op %d: read %d@%d differs from the model" % (i, ln, off)
for h in hs:
    h.flush()
got = hs[0].pread(S, 0)
assert got == bytes(model), "volume differs from the model"
for h in hs:
    h.shutdown()
open(path, "wb").write(model)
"#,
            &[&node.uri(name), model.to_str().unwrap(), "42"],
        );
    }
    // snapshot + clone of a model volume, then more writes to the origin
    node.cli_ok(&["volume", "snapshot", "b4k", "b4k-s"]);
    node.cli_ok(&["volume", "clone", "b4k-s", "b4k-c"]);
    python(
        r#"
h = conn(sys.argv[1])
h.pwrite(b"\xee" * (1 << 20), 0, nbd.CMD_FLAG_FUA)
h.shutdown()
"#,
        &[&node.uri("b4k")],
    );
    node.kill9();
    node.restart();
    for (name, _) in vols {
        let want = std::fs::read(dir.path().join(name)).unwrap();
        let mut want_now = want.clone();
        if name == "b4k" {
            want_now[..1 << 20].fill(0xee);
            assert_same(
                "snapshot after kill -9",
                &read_export(&node.uri("b4k-s"), want.len()),
                &want,
            );
            assert_same(
                "clone after kill -9",
                &read_export(&node.uri("b4k-c"), want.len()),
                &want,
            );
        }
        assert_same(
            &format!("{name} after kill -9 and restart"),
            &read_export(&node.uri(name), want.len()),
            &want_now,
        );
    }
}
