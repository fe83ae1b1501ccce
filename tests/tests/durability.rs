//! Acknowledged data survives `kill -9` and restarts; SIGTERM finishes,
//! flushes and exits 0.

use ballast_e2e::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn flushed_data_survives_kill9() {
    require_nbd_tools();
    require_python_nbd();
    let mut node = Node::start_with(&["--disk", "{dir}/disk0.img:4G"]);
    node.create_volume("v1", "2G", &[]);
    node.create_volume("v2", "1G", &[]);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("rand");
    let len = 200 * MIB as usize;
    let data = random_file(&src, len, 11);

    // 1: nbdcopy --flush (FLUSH acknowledged before nbdcopy exits)
    nbdcopy(&["--flush", src.to_str().unwrap(), &node.uri("v1")]);
    // 2: FUA writes and write+flush on another connection, through libnbd
    python(
        r#"
h = conn(sys.argv[1]); g = conn(sys.argv[1])
for i in range(32):
    h.pwrite(bytes([i + 1]) * 65536, (300 << 20) + i * 65536, nbd.CMD_FLAG_FUA)
g.pwrite(b"F" * (1 << 20), 500 << 20)
h.flush()          # multi-conn: a flush on any connection covers g's write
h.trim(1 << 20, 100 << 20); h.zero(1 << 20, 101 << 20, nbd.CMD_FLAG_FUA)
h.flush()
"#,
        &[&node.uri("v1")],
    );
    // 3: a snapshot taken before the crash
    node.cli_ok(&["volume", "snapshot", "v1", "before"]);
    // 4: the volume metadata change of a resize
    node.cli_ok(&["volume", "resize", "v2", "--size", "1536M"]);

    node.kill9();
    node.restart();

    let back = read_export(&node.uri("v1"), 600 * MIB as usize);
    let mut want = data.clone();
    want.resize(600 * MIB as usize, 0);
    for i in 0..32usize {
        let off = 300 * MIB as usize + i * 65536;
        want[off..off + 65536].fill(i as u8 + 1);
    }
    want[500 * MIB as usize..501 * MIB as usize].fill(b'F');
    want[100 * MIB as usize..102 * MIB as usize].fill(0);
    assert_same("v1 after kill -9 and restart", &back, &want);

    let snap = read_export(&node.uri("before"), 600 * MIB as usize);
    assert_same("snapshot after kill -9 and restart", &snap, &want);

    let v2 = node.cli_json(&["volume", "info", "v2"]);
    assert_eq!(v2["size"], 1536 * MIB, "resize lost by kill -9: {v2}");
    let names = node.cli_ok(&["volume", "list"]);
    for n in ["v1", "v2", "before"] {
        assert!(names.contains(n), "{n} missing after restart:\n{names}");
    }

    // A second crash right after recovery changes nothing.
    node.kill9();
    node.restart();
    let back2 = read_export(&node.uri("v1"), 600 * MIB as usize);
    assert_same("v1 after a second kill -9", &back2, &want);
}

/// What the reviewers' durability-kill9 check does: a plain `nbdcopy` (libnbd
/// 1.14's nbdcopy sends no FLUSH unless given --flush; it ends with
/// NBD_CMD_DISC), then `kill -9` a few seconds later.
#[test]
fn nbdcopy_without_flush_then_disconnect_survives_kill9() {
    require_nbd_tools();
    let mut node = Node::start_with(&["--disk", "{dir}/disk0.img:4G"]);
    node.create_volume("v1", "2G", &[]);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("rand");
    let len = 300 * MIB as usize;
    let data = random_file(&src, len, 12);
    nbdcopy(&[src.to_str().unwrap(), &node.uri("v1")]);
    // The disconnect lands (hashes, stores) and commits what the client
    // left in the write-back buffer: 300 MiB of unique data takes about
    // 0.6 s on 2 cores. The acceptance script kills later still, after
    // building an ext4 on another volume.
    std::thread::sleep(Duration::from_secs(3));
    node.kill9();
    node.restart();
    let back = read_export(&node.uri("v1"), len);
    assert_same(
        "data written by nbdcopy (no --flush, clean disconnect) after kill -9",
        &back,
        &data,
    );
}

fn md5_tree(root: &Path) -> String {
    let out = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("find . -type f -print0 | sort -z | xargs -0 md5sum")
            .current_dir(root),
        Duration::from_secs(300),
    );
    assert!(out.lines().count() > 100, "too few files: {out}");
    out
}

fn populate(root: &Path) {
    // a directory tree of small and medium files, hard and symbolic links,
    // and one large random file
    let mut n = 0u64;
    for d in 0..20 {
        let sub = root.join(format!("dir{d:02}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..40 {
            n += 1;
            let size = ((n * 7919) % 200_000) as usize + 1;
            std::fs::write(sub.join(format!("f{f:03}")), random_bytes(size, n)).unwrap();
        }
        std::os::unix::fs::symlink("f000", sub.join("link")).unwrap();
        std::fs::hard_link(sub.join("f001"), sub.join("hard")).unwrap();
    }
    // compressible text, to exercise lz4 on a real filesystem
    let text: String = (0..200_000)
        .map(|i| format!("line {i} of a log file\n"))
        .collect();
    std::fs::write(root.join("log.txt"), text).unwrap();
    std::fs::write(root.join("big.bin"), random_bytes(50 * MIB as usize, 99)).unwrap();
    run_ok(
        Command::new("cp").args(["-a", "/usr/share/doc", root.join("doc").to_str().unwrap()]),
        Duration::from_secs(300),
    );
}

#[test]
fn ext4_on_nbdfuse_survives_kill9() {
    require_root("losetup and mount");
    require_nbd_tools();
    require("mkfs.ext4", "e2fsprogs");
    require("fsck.ext4", "e2fsprogs");
    require("nbdfuse", "libnbd-bin");
    require("fusermount3", "fuse3");
    let mut node = Node::start_with(&["--disk", "{dir}/disk0.img:4G"]);
    node.create_volume("fs", "1G", &[]);
    let tmp = tempfile::tempdir().unwrap();
    let fuse_dir = tmp.path().join("fuse");
    let mnt = tmp.path().join("mnt");

    let sums = {
        let mut fuse = Fuse::mount(&fuse_dir, &node.uri("fs"));
        let mut lo = Loop::attach(&fuse.file(), false);
        run_ok(
            &mut cmd("mkfs.ext4", ["-q", "-F", lo.dev.as_str()]),
            Duration::from_secs(300),
        );
        let mut m = Mount::new(&lo.dev, &mnt, None);
        populate(&mnt);
        let sums = md5_tree(&mnt);
        m.unmount();
        lo.detach();
        fuse.unmount();
        sums
    };

    node.kill9();
    node.restart();

    let mut fuse = Fuse::mount(&fuse_dir, &node.uri("fs"));
    let mut lo = Loop::attach(&fuse.file(), true);
    let out = run(
        &mut cmd("fsck.ext4", ["-fn", lo.dev.as_str()]),
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "fsck.ext4 -fn after kill -9 ({}):\n{}{}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stdout), 20),
        tail(&String::from_utf8_lossy(&out.stderr), 10)
    );
    let mut m = Mount::new(&lo.dev, &mnt, Some("ro"));
    let after = md5_tree(&mnt);
    assert!(
        after == sums,
        "file checksums differ after kill -9 and restart ({} vs {} files)",
        after.lines().count(),
        sums.lines().count()
    );
    m.unmount();
    lo.detach();
    fuse.unmount();
}

#[test]
fn sigterm_flushes_unflushed_writes_and_exits_0() {
    require_python_nbd();
    let mut node = Node::start();
    node.create_volume("v", "256M", &[]);
    // writes that are acknowledged but never flushed, no FUA
    python(
        r#"
h = conn(sys.argv[1])
for i in range(64):
    h.pwrite(bytes([i + 1]) * 65536 * 2, i * 131072)
h.shutdown()      # NBD_CMD_DISC, no FLUSH
"#,
        &[&node.uri("v")],
    );
    node.stop(); // SIGTERM: exit status 0 asserted
    node.restart();
    python(
        r#"
h = conn(sys.argv[1])
for i in range(64):
    assert h.pread(131072, i * 131072) == bytes([i + 1]) * 131072, "block %d lost after SIGTERM" % i
print("ok")
"#,
        &[&node.uri("v")],
    );
    // SIGINT behaves the same.
    let st = node.terminate(libc::SIGINT, Duration::from_secs(60));
    assert!(st.success(), "ballastd exited with {st} after SIGINT");
}

#[test]
fn sigterm_during_writes_keeps_every_acknowledged_write() {
    require_python_nbd();
    let mut node = Node::start();
    node.create_volume("v", "512M", &[]);
    let dir = tempfile::tempdir().unwrap();
    let progress = dir.path().join("acked");
    // A writer that records how many writes were acknowledged; it stops at
    // the first error (the server going away).
    let script = format!(
        "{PY_PRELUDE}\n{}",
        r#"
h = conn(sys.argv[1])
acked = 0
try:
    for i in range(4096):
        h.pwrite(i.to_bytes(4, "little") * 16384, i * 65536)
        acked = i + 1
        if acked % 16 == 0:
            open(sys.argv[2], "w").write(str(acked))
except nbd.Error as e:
    pass
open(sys.argv[2], "w").write(str(acked))
"#
    );
    let mut writer = Command::new(PYTHON)
        .arg("-c")
        .arg(&script)
        .arg(node.uri("v"))
        .arg(&progress)
        .stdin(Stdio::null())
        .spawn()
        .expect("start python writer");
    let started = wait_until(Duration::from_secs(60), || {
        std::fs::read_to_string(&progress)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .is_some_and(|n| n >= 64)
    });
    assert!(started, "the writer did not get going");
    node.stop(); // SIGTERM with a client writing: exit 0 asserted
    let finished = wait_until(Duration::from_secs(30), || {
        writer.try_wait().unwrap().is_some()
    });
    if !finished {
        let _ = writer.kill();
        let _ = writer.wait();
        panic!("the client was not disconnected by the shutdown");
    }
    let acked: usize = std::fs::read_to_string(&progress)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(acked >= 64);
    node.restart();
    let back = read_export(&node.uri("v"), acked * 65536);
    for i in 0..acked {
        let want = (i as u32).to_le_bytes().repeat(16384);
        assert_same(
            &format!("acknowledged write {i} of {acked} after SIGTERM"),
            &back[i * 65536..(i + 1) * 65536],
            &want,
        );
    }
}

#[test]
fn data_moves_between_io_backends() {
    require_python_nbd();
    let mut node = Node::start_with(&["--disk", "{dir}/disk0.img:2G", "--io-backend", "uring"]);
    assert!(
        node.log().contains("io_uring"),
        "--io-backend uring: log does not mention io_uring"
    );
    node.create_volume("v", "64M", &[]);
    let script = r#"
h = conn(sys.argv[1]); tag = int(sys.argv[2])
for i in range(tag + 1):
    assert h.pread(65536, i * 65536) == bytes([i + 1]) * 65536, "block %d written by backend %d lost" % (i, i)
h.pwrite(bytes([tag + 2]) * 65536, (tag + 1) * 65536, nbd.CMD_FLAG_FUA)
h.shutdown()
"#;
    python(
        r#"
h = conn(sys.argv[1]); h.pwrite(b"\x01" * 65536, 0, nbd.CMD_FLAG_FUA); h.shutdown()
"#,
        &[&node.uri("v")],
    );
    node.stop();
    node.set_args(&["--disk", "{dir}/disk0.img:2G", "--io-backend", "threads"]);
    node.restart();
    assert_eq!(node.node_info()["io_backend"], "threads");
    python(script, &[&node.uri("v"), "0"]);
    node.kill9();
    node.set_args(&["--disk", "{dir}/disk0.img:2G", "--io-backend", "auto"]);
    node.restart();
    python(script, &[&node.uri("v"), "1"]);
    node.stop();
    node.set_args(&["--disk", "{dir}/disk0.img:2G"]);
    node.restart();
    python(
        r#"
h = conn(sys.argv[1])
for i in range(3):
    assert h.pread(65536, i * 65536) == bytes([i + 1]) * 65536, "block %d lost" % i
"#,
        &[&node.uri("v")],
    );
}

/// kill -9 at an arbitrary moment under a write load: every write covered
/// by an acknowledged FLUSH is intact, and no 4 KiB block of an unflushed
/// write is torn (it reads as all old or all new). A second crash in the
/// middle of recovery changes none of that.
#[test]
fn kill9_under_write_load_keeps_flushed_writes_untorn() {
    require_python_nbd();
    let mut node = Node::start();
    node.create_volume("v", "512M", &[]);
    let dir = tempfile::tempdir().unwrap();
    let progress = dir.path().join("progress");
    let script = format!(
        "{PY_PRELUDE}\n{}",
        r#"
h = conn(sys.argv[1])
def block(i):
    return b"".join((i * 16 + k).to_bytes(4, "little") * 1024 for k in range(16))
attempted = flushed = 0
try:
    for i in range(8000):
        attempted = i + 1
        open(sys.argv[2], "w").write("%d %d" % (flushed, attempted))
        h.pwrite(block(i), i * 65536)
        if (i + 1) % 8 == 0:
            h.flush()
            flushed = i + 1
            open(sys.argv[2], "w").write("%d %d" % (flushed, attempted))
except nbd.Error:
    pass
"#
    );
    let mut writer = std::process::Command::new(PYTHON)
        .arg("-c")
        .arg(&script)
        .arg(node.uri("v"))
        .arg(&progress)
        .stdin(Stdio::null())
        .spawn()
        .expect("start python writer");
    let read_progress = || -> Option<(usize, usize)> {
        let s = std::fs::read_to_string(&progress).ok()?;
        let mut it = s.split_whitespace().map(|x| x.parse::<usize>().ok());
        Some((it.next()??, it.next()??))
    };
    let going = wait_until(Duration::from_secs(60), || {
        read_progress().is_some_and(|(f, _)| f >= 200)
    });
    assert!(going, "the writer did not get going");
    node.kill9();
    let done = wait_until(Duration::from_secs(30), || {
        writer.try_wait().unwrap().is_some()
    });
    if !done {
        let _ = writer.kill();
        let _ = writer.wait();
        panic!("the writer was not disconnected by kill -9");
    }
    let (flushed, attempted) = read_progress().unwrap();
    // crash again while recovering, then recover for real
    node.start_and_kill9_after(Duration::from_millis(150));
    node.restart();

    let back = read_export(&node.uri("v"), (attempted + 1) * 65536);
    for i in 0..=attempted {
        for k in 0..16usize {
            let off = i * 65536 + k * 4096;
            let got = &back[off..off + 4096];
            let want = ((i * 16 + k) as u32).to_le_bytes().repeat(1024);
            if i < flushed {
                assert_same(
                    &format!("flushed write {i} (of {flushed} flushed), 4K block {k}"),
                    got,
                    &want,
                );
            } else {
                assert!(
                    got == want.as_slice() || all_zero(got),
                    "unflushed write {i} ({flushed} flushed, {attempted} attempted), 4K block {k}: torn or garbage"
                );
            }
        }
    }
}
