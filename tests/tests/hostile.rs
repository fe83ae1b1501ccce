//! Hostile and broken clients on raw TCP: each may lose its own connection,
//! never the server or anybody else's data.

use ballast_e2e::raw::{self, Conn};
use ballast_e2e::*;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

/// A connection that works: write, read back, flush.
fn check_usable(c: &mut Conn, offset: u64, seed: u64) {
    let data = random_bytes(65536, seed);
    assert_eq!(
        c.write(offset, &data, true).expect("write"),
        0,
        "write failed"
    );
    let back = c.read(offset, 65536).expect("read").expect("read error");
    assert_same("read back", &back, &data);
    assert_eq!(c.flush().expect("flush"), 0);
}

fn connect(node: &Node, export: &str) -> Conn {
    raw::handshake(node.nbd_port, export).unwrap_or_else(|e| panic!("handshake with {export}: {e}"))
}

#[test]
fn bad_handshakes_close_only_their_own_connection() {
    let mut node = Node::start();
    node.create_volume("v", "256M", &[]);
    let mut good = connect(&node, "v");
    check_usable(&mut good, 0, 1);

    // 1. Garbage instead of client flags + options.
    let mut s = raw::tcp(node.nbd_port).unwrap();
    raw::greeting(&mut s).unwrap();
    s.write_all(&random_bytes(1024, 2)).unwrap();
    assert!(
        raw::closed_within(&mut s, Duration::from_secs(10)),
        "garbage in the handshake did not close the connection"
    );

    // 2. Good client flags, then an option with bad magic.
    let mut s = raw::tcp(node.nbd_port).unwrap();
    raw::greeting(&mut s).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = raw::option(raw::OPT_LIST, &[]);
    opt[0] ^= 0xff;
    s.write_all(&opt).unwrap();
    assert!(
        raw::closed_within(&mut s, Duration::from_secs(10)),
        "an option with bad magic did not close the connection"
    );

    // 3. Client flags the server never advertised.
    let mut s = raw::tcp(node.nbd_port).unwrap();
    raw::greeting(&mut s).unwrap();
    s.write_all(&0xffff_fff0u32.to_be_bytes()).unwrap();
    s.write_all(&raw::go_bytes("v")).unwrap();
    assert!(
        raw::closed_within(&mut s, Duration::from_secs(10)),
        "unknown client flags were accepted"
    );

    // 4. An option claiming 4 GiB of data: no allocation, the connection goes.
    let vm_before = node.proc_status_kib("VmSize");
    let mut s = raw::tcp(node.nbd_port).unwrap();
    raw::greeting(&mut s).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut h = Vec::new();
    h.extend_from_slice(&raw::IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&raw::OPT_GO.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    h.extend_from_slice(&[0u8; 4096]);
    let _ = s.write_all(&h);
    std::thread::sleep(Duration::from_millis(300));
    let vm_during = node.proc_status_kib("VmSize");
    assert!(
        vm_during < vm_before + 2 * 1024 * 1024,
        "an option claiming 4 GiB grew ballastd from {vm_before} KiB to {vm_during} KiB"
    );
    drop(s);

    // 5. An unknown option gets ERR_UNSUP and the stream stays in sync.
    let mut s = raw::tcp(node.nbd_port).unwrap();
    raw::greeting(&mut s).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(&raw::option(0x7777, b"some data the server must skip"))
        .unwrap();
    let (o, t, _) = raw::option_reply(&mut s).expect("reply to an unknown option");
    assert_eq!((o, t), (0x7777, raw::REP_ERR_UNSUP), "unknown option");
    // ... a missing export gets an error reply, not a dead connection ...
    s.write_all(&raw::go_bytes("no-such-volume")).unwrap();
    let (o, t, _) = raw::option_reply(&mut s).expect("reply to GO of a missing export");
    assert_eq!(o, raw::OPT_GO);
    assert!(
        t & 0x8000_0000 != 0,
        "GO of a missing export: reply type {t:#x}"
    );
    // ... and LIST still works and ends with ACK.
    s.write_all(&raw::option(raw::OPT_LIST, &[])).unwrap();
    let mut names = Vec::new();
    loop {
        let (o, t, d) = raw::option_reply(&mut s).expect("LIST reply");
        assert_eq!(o, raw::OPT_LIST);
        match t {
            raw::REP_SERVER => {
                let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8_lossy(&d[4..4 + n]).to_string());
            }
            raw::REP_ACK => break,
            t => panic!("LIST reply type {t:#x}"),
        }
    }
    assert!(names.contains(&"v".to_string()), "LIST: {names:?}");
    s.write_all(&raw::option(raw::OPT_ABORT, &[])).unwrap();
    drop(s);

    // 6. Connect and hang up at every stage.
    for cut in [0usize, 2, 4, 10, 20] {
        let mut s = raw::tcp(node.nbd_port).unwrap();
        raw::greeting(&mut s).unwrap();
        let mut bytes = 3u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&raw::go_bytes("v"));
        s.write_all(&bytes[..cut]).unwrap();
        s.shutdown(Shutdown::Both).unwrap();
    }

    // 7. Bad request magic in the transmission phase closes that connection.
    let mut bad = connect(&node, "v");
    let mut req = raw::request(0, raw::CMD_READ, 9, 0, 4096);
    req[0] = 0;
    bad.s.write_all(&req).unwrap();
    assert!(
        raw::closed_within(&mut bad.s, Duration::from_secs(10)),
        "a request with bad magic did not close the connection"
    );

    // Everyone else is fine, old and new connections alike.
    check_usable(&mut good, 4 << 20, 3);
    let mut fresh = connect(&node, "v");
    check_usable(&mut fresh, 8 << 20, 4);
    assert!(node.is_running(), "ballastd died");
    good.disconnect();
    fresh.disconnect();
}

#[test]
fn write_claiming_1gib_payload_does_not_allocate_or_crash() {
    let mut node = Node::start();
    node.create_volume("v", "2G", &[]);
    let mut good = connect(&node, "v");
    check_usable(&mut good, 0, 5);
    let vm_before = node.proc_status_kib("VmSize");
    let rss_before = node.proc_status_kib("VmRSS");

    // Four connections each claim a 1 GiB WRITE and send 1 MiB of it.
    let mut liars = Vec::new();
    for i in 0..4u64 {
        let mut c = connect(&node, "v");
        let hdr = raw::request(0, raw::CMD_WRITE, 77, i * (256 << 20), 1 << 30);
        c.s.write_all(&hdr).unwrap();
        let _ = c.s.write_all(&random_bytes(1 << 20, 6 + i));
        liars.push(c);
    }
    std::thread::sleep(Duration::from_millis(500));
    let vm_during = node.proc_status_kib("VmSize");
    let rss_during = node.proc_status_kib("VmRSS");
    assert!(node.is_running(), "ballastd died");
    assert!(
        vm_during < vm_before + 2 * 1024 * 1024,
        "4 writes claiming 1 GiB each grew ballastd's address space from {vm_before} to {vm_during} KiB"
    );
    assert!(
        rss_during < rss_before + 256 * 1024,
        "RSS grew from {rss_before} to {rss_during} KiB"
    );
    // Each liar either got an error reply or was disconnected; none succeeded.
    for c in liars.iter_mut() {
        let _ = c.s.set_read_timeout(Some(Duration::from_secs(2)));
        // Err: disconnected, or still waiting for the payload; both fine
        if let Ok((err, _)) = c.reply() {
            assert_ne!(err, 0, "a 1 GiB write claim was acknowledged");
        }
    }
    // Meanwhile others are served.
    check_usable(&mut good, 64 << 20, 8);
    let mut fresh = connect(&node, "v");
    check_usable(&mut fresh, 128 << 20, 9);
    drop(liars);
    check_usable(&mut fresh, 132 << 20, 10);
    assert!(node.is_running());

    // A 1 GiB READ request must not be buffered whole either.
    let vm_before = node.proc_status_kib("VmSize");
    let mut r = connect(&node, "v");
    r.s.write_all(&raw::request(0, raw::CMD_READ, 5, 0, 1 << 30))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Nobody reads the socket, so a streaming server blocks on it.
    let vm_during = node.proc_status_kib("VmSize");
    assert!(
        vm_during < vm_before + 900 * 1024,
        "a 1 GiB READ grew ballastd's address space from {vm_before} to {vm_during} KiB"
    );
    drop(r);
    check_usable(&mut fresh, 136 << 20, 11);
}

#[test]
fn disconnect_mid_payload_applies_nothing() {
    let node = Node::start();
    node.create_volume("v", "256M", &[]);
    let mut c = connect(&node, "v");
    let old = random_bytes(1 << 20, 20);
    assert_eq!(c.write(16 << 20, &old, true).unwrap(), 0);
    assert_eq!(c.write(32 << 20, &old[..65536], true).unwrap(), 0);

    // A 1 MiB write of which half arrives, then the client vanishes.
    let mut w = connect(&node, "v");
    w.s.write_all(&raw::request(
        raw::CMD_FLAG_FUA,
        raw::CMD_WRITE,
        3,
        16 << 20,
        1 << 20,
    ))
    .unwrap();
    w.s.write_all(&random_bytes(512 << 10, 21)).unwrap();
    w.s.shutdown(Shutdown::Both).unwrap();
    drop(w);
    // A 64 KiB write missing its last 4 KiB, and one missing its last byte.
    for (i, sent) in [(0u64, 61440usize), (1, 65535)] {
        let mut w = connect(&node, "v");
        w.s.write_all(&raw::request(0, raw::CMD_WRITE, 4, 32 << 20, 65536))
            .unwrap();
        w.s.write_all(&random_bytes(sent, 22 + i)).unwrap();
        w.s.shutdown(Shutdown::Write).unwrap();
        raw::closed_within(&mut w.s, Duration::from_secs(5));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.flush().unwrap(), 0);
    let back = c.read(16 << 20, 1 << 20).unwrap().expect("read");
    assert_same("range under a half-sent write", &back, &old);
    let back = c.read(32 << 20, 65536).unwrap().expect("read");
    assert_same("range under a truncated write", &back, &old[..65536]);
    // A new connection sees the same.
    let mut n = connect(&node, "v");
    let back = n.read(16 << 20, 1 << 20).unwrap().expect("read");
    assert_same(
        "range under a half-sent write (new connection)",
        &back,
        &old,
    );
}

#[test]
fn unknown_commands_and_flags_get_einval_and_connection_stays_usable() {
    let node = Node::start();
    node.create_volume("v", "64M", &[]);
    let mut c = connect(&node, "v");
    check_usable(&mut c, 0, 30);
    for typ in [0x00ffu16, 0x1234, 0xffff, 9] {
        let err = c
            .command(0, typ, 0, 0)
            .unwrap_or_else(|e| panic!("command type {typ:#x} broke the connection: {e}"));
        assert_eq!(err, raw::EINVAL, "command type {typ:#x}");
        check_usable(&mut c, 4096, u64::from(typ));
    }
    // An unknown flag on a READ.
    let r = c
        .read_flags(0x4000, 0, 4096)
        .unwrap_or_else(|e| panic!("READ with an unknown flag broke the connection: {e}"));
    assert_eq!(r, Err(raw::EINVAL), "READ with unknown flag 0x4000");
    check_usable(&mut c, 8192, 31);
    // Out-of-range requests on the raw path, with simple replies.
    let r = c.read(64 << 20, 4096).unwrap();
    assert_eq!(r, Err(raw::EINVAL), "read past the end");
    let err = c.write((64 << 20) - 512, &[0u8; 4096], false).unwrap();
    assert!(
        err == raw::ENOSPC || err == raw::EINVAL,
        "write past the end: {err}"
    );
    let r = c.read(u64::MAX - 100, 4096).unwrap();
    assert_eq!(r, Err(raw::EINVAL), "read at offset 2^64-101");
    check_usable(&mut c, 12288, 32);
    c.disconnect();
}

#[test]
fn three_hundred_idle_connections_do_not_starve_others() {
    require_nbd_tools();
    let node = Node::start();
    node.create_volume("v", "256M", &[]);
    let mut idle: Vec<TcpStream> = Vec::new();
    let mut idle_conns: Vec<Conn> = Vec::new();
    for i in 0..300 {
        match i % 3 {
            // connected, never reads the greeting
            0 => idle.push(raw::tcp(node.nbd_port).expect("connect")),
            // read the greeting, sent half the client flags
            1 => {
                let mut s = raw::tcp(node.nbd_port).expect("connect");
                raw::greeting(&mut s).expect("greeting");
                s.write_all(&[0, 0]).unwrap();
                idle.push(s);
            }
            // in transmission, silent
            _ => idle_conns.push(connect(&node, "v")),
        }
    }
    // A real client works meanwhile.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("r");
    let data = random_file(&src, 32 * MIB as usize, 40);
    let t = std::time::Instant::now();
    nbdcopy(&["--flush", src.to_str().unwrap(), &node.uri("v")]);
    let back = read_export(&node.uri("v"), data.len());
    assert_same("round trip with 300 idle connections", &back, &data);
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "a 32 MiB round trip took {:?}",
        t.elapsed()
    );
    // The idle transmission-phase connections still work afterwards.
    for (i, c) in idle_conns.iter_mut().enumerate().step_by(25) {
        check_usable(c, 200 << 20, 100 + i as u64);
    }
    drop(idle);
    drop(idle_conns);
    let mut c = connect(&node, "v");
    check_usable(&mut c, 0, 50);
}

#[test]
fn client_that_never_reads_replies_does_not_grow_memory() {
    let mut node = Node::start();
    node.create_volume("v", "256M", &[]);
    let mut good = connect(&node, "v");
    check_usable(&mut good, 0, 60);
    let rss_before = node.proc_status_kib("VmRSS");
    // Pipeline 1 MiB READs (up to 8 GiB worth) and never read a reply: the
    // server must stop reading requests when its replies cannot be sent,
    // not queue gigabytes of replies.
    let hog = connect(&node, "v");
    let mut s = hog.s.try_clone().unwrap();
    s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let sender = std::thread::spawn(move || {
        let mut sent = 0u64;
        for i in 0..8192u64 {
            let req = raw::request(0, raw::CMD_READ, i, (i % 255) << 20, 1 << 20);
            if s.write_all(&req).is_err() {
                break; // the server stopped reading requests: good
            }
            sent += 1;
        }
        sent
    });
    std::thread::sleep(Duration::from_secs(4));
    let rss_during = node.proc_status_kib("VmRSS");
    let sent = sender.join().unwrap();
    assert!(node.is_running(), "ballastd died");
    assert!(
        rss_during < rss_before + 512 * 1024,
        "{sent} unread 1 MiB READ replies grew ballastd's RSS from {rss_before} to {rss_during} KiB"
    );
    // others are served meanwhile
    check_usable(&mut good, 8 << 20, 61);
    let _ = hog.s.shutdown(Shutdown::Both);
    drop(hog);
    let mut fresh = connect(&node, "v");
    check_usable(&mut fresh, 16 << 20, 62);
}

#[test]
fn abrupt_disconnects_under_load_lose_no_acknowledged_write() {
    let node = Node::start();
    node.create_volume("v", "256M", &[]);
    let port = node.nbd_port;
    // 8 writers, each owning a 16 MiB region: acknowledged FUA writes are
    // tracked; every few requests the writer drops its connection in the
    // middle of a payload and reconnects.
    let workers: Vec<_> = (0..8u64)
        .map(|w| {
            std::thread::spawn(move || {
                let base = w * (16 << 20);
                let mut acked: Vec<(u64, u64)> = Vec::new(); // (offset, seed)
                let mut seed = w * 1000;
                for _round in 0..6 {
                    let mut c = raw::handshake(port, "v").expect("handshake");
                    for k in 0..10u64 {
                        seed += 1;
                        let off = base + ((seed * 7919) % 255) * 65536;
                        let data = random_bytes(65536, seed);
                        assert_eq!(c.write(off, &data, k % 2 == 0).unwrap(), 0);
                        acked.retain(|(o, _)| *o != off);
                        acked.push((off, seed));
                    }
                    // a torn write to a region we then no longer claim
                    let off = base + 255 * 65536;
                    let _ =
                        c.s.write_all(&raw::request(0, raw::CMD_WRITE, 1, off, 65536));
                    let _ = c.s.write_all(&random_bytes(30000, seed + 99999));
                    let _ = c.s.shutdown(Shutdown::Both);
                }
                acked
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.join().expect("writer thread"));
    }
    let mut c = connect(&node, "v");
    assert_eq!(c.flush().unwrap(), 0);
    for (off, seed) in &all {
        let back = c.read(*off, 65536).unwrap().expect("read");
        assert_same(
            &format!("acknowledged write at {off}"),
            &back,
            &random_bytes(65536, *seed),
        );
    }
    // the torn writes applied nothing: those blocks were never written
    for w in 0..8u64 {
        let back = c
            .read(w * (16 << 20) + 255 * 65536, 65536)
            .unwrap()
            .unwrap();
        assert!(all_zero(&back), "a torn write was applied (writer {w})");
    }
}
