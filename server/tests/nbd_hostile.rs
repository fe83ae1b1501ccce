//! Hand-written hostile clients: the server must keep each connection's
//! damage to that connection, never allocate client-claimed sizes, and stay
//! responsive.

#[path = "nbd_support.rs"]
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_server::nbd::memory_export::{MemoryCatalog, MemoryExport};
use ballast_server::nbd::proto;
use ballast_server::nbd::{NbdConfig, NbdServer};
use support::*;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;

fn server() -> (TestServer, Arc<MemoryExport>) {
    let c = MemoryCatalog::new();
    let disk = c.add("disk", MemoryExport::new(64 * MIB));
    (TestServer::start(Arc::new(c), NbdConfig::default()), disk)
}

fn check_io(c: &mut RawClient, cookie: u64, offset: u64) {
    let data = random_bytes(cookie, 8192);
    assert_eq!(c.write(cookie, offset, &data), 0);
    let (e, d) = c.read(cookie + 1, offset, 8192);
    assert_eq!(e, 0);
    assert!(d == data);
}

#[test]
fn bad_magic_closes_only_that_connection() {
    let (srv, _) = server();
    for (structured, extended) in [(false, false), (true, false), (true, true)] {
        let mut bad = RawClient::connect(srv.addr, "disk", structured, extended);
        let mut good = RawClient::connect(srv.addr, "disk", structured, extended);
        check_io(&mut bad, 1, 0);
        let mut junk = bad.request_bytes(0, proto::CMD_READ, 9, 0, 512);
        junk[0] ^= 0xff;
        bad.s.write_all(&junk).unwrap();
        assert!(
            bad.closed_by_server(),
            "a bad request magic must close the connection"
        );
        check_io(&mut good, 3, MIB);
    }
    // A compact header on an extended-header connection is also bad magic.
    let mut ext = RawClient::connect(srv.addr, "disk", true, true);
    ext.extended = false;
    let req = ext.request_bytes(0, proto::CMD_READ, 9, 0, 512);
    ext.s.write_all(&req).unwrap();
    ext.s.write_all(&[0u8; 4]).unwrap();
    assert!(ext.closed_by_server());
}

#[test]
fn huge_write_claim_disconnects_without_allocating() {
    let (srv, disk) = server();
    let mut other = RawClient::connect(srv.addr, "disk", true, false);
    for (structured, extended, claim) in [
        (false, false, 1u64 << 30),
        (true, false, u32::MAX as u64),
        (true, true, 1u64 << 40),
    ] {
        let mut h = RawClient::connect(srv.addr, "disk", structured, extended);
        h.send(0, proto::CMD_WRITE, 1, 0, claim, &[0xee; 65536]);
        let t0 = Instant::now();
        assert!(
            h.closed_by_server(),
            "a WRITE over the payload cap must be refused by disconnecting"
        );
        assert!(t0.elapsed() < Duration::from_secs(5));
        check_io(&mut other, 10, 2 * MIB);
    }
    assert!(
        disk.read_now(0, 16).iter().all(|&b| b == 0),
        "nothing of the refused write may be applied"
    );
    // A huge READ is an error, not a disconnect.
    let mut h = RawClient::connect(srv.addr, "disk", true, false);
    h.send(0, proto::CMD_READ, 5, 0, u32::MAX as u64, &[]);
    let (e, c, _) = h.read_reply(0, 0).unwrap();
    assert_eq!((e, c), (proto::EINVAL, 5));
    check_io(&mut h, 20, 0);
}

#[test]
fn mid_payload_disconnect_applies_nothing() {
    let (srv, disk) = server();
    let mut h = RawClient::connect(srv.addr, "disk", false, false);
    check_io(&mut h, 1, 4 * MIB);
    let before = disk.write_count();
    // 64 KiB announced, 32 KiB sent, then the client goes away.
    h.send(0, proto::CMD_WRITE, 2, 8 * MIB, 65536, &[0xaa; 32768]);
    h.s.shutdown(std::net::Shutdown::Both).unwrap();
    drop(h);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        disk.write_count(),
        before,
        "a write whose payload never fully arrived must not be applied"
    );
    assert!(disk.read_now(8 * MIB, 65536).iter().all(|&b| b == 0));
    let mut g = RawClient::connect(srv.addr, "disk", true, false);
    let (e, d) = g.read(3, 8 * MIB, 65536);
    assert_eq!(e, 0);
    assert!(d.iter().all(|&b| b == 0));
}

#[test]
fn unknown_command_and_bad_flags_get_einval_and_the_connection_stays_usable() {
    let (srv, disk) = server();
    for (structured, extended) in [(false, false), (true, false), (true, true)] {
        let mut h = RawClient::connect(srv.addr, "disk", structured, extended);
        // Unknown command types.
        for (i, typ) in [9u16, 0x55, 0xffff].into_iter().enumerate() {
            h.send(0, typ, 100 + i as u64, 0, 4096, &[]);
            assert_eq!(h.status_reply().unwrap(), (proto::EINVAL, 100 + i as u64));
        }
        // A WRITE with an unknown flag: EINVAL, payload consumed, not applied.
        h.send(1 << 9, proto::CMD_WRITE, 200, 3 * MIB, 4096, &[0x77; 4096]);
        assert_eq!(h.status_reply().unwrap(), (proto::EINVAL, 200));
        assert!(disk.read_now(3 * MIB, 4096).iter().all(|&b| b == 0));
        // BLOCK_STATUS without a negotiated context.
        if !structured {
            h.send(0, proto::CMD_BLOCK_STATUS, 201, 0, 4096, &[]);
            assert_eq!(h.status_reply().unwrap(), (proto::EINVAL, 201));
        }
        // DF without structured replies, REQ_ONE on a read: READ errors.
        h.send(proto::CMD_FLAG_REQ_ONE, proto::CMD_READ, 202, 0, 4096, &[]);
        let (e, c, _) = h.read_reply(0, 4096).unwrap();
        assert_eq!((e, c), (proto::EINVAL, 202));
        // Out of range write / read.
        h.send(0, proto::CMD_WRITE, 203, 64 * MIB - 512, 4096, &[1; 4096]);
        assert_eq!(h.status_reply().unwrap(), (proto::ENOSPC, 203));
        h.send(0, proto::CMD_READ, 204, u64::MAX - 10, 4096, &[]);
        let (e, c, _) = h.read_reply(0, 4096).unwrap();
        assert_eq!((e, c), (proto::EINVAL, 204));
        // Zero-length requests are harmless.
        h.send(0, proto::CMD_WRITE, 205, 0, 0, &[]);
        assert_eq!(h.status_reply().unwrap(), (0, 205));
        h.send(0, proto::CMD_READ, 206, 0, 0, &[]);
        let (e, c, d) = h.read_reply(0, 0).unwrap();
        assert_eq!((e, c, d.len()), (0, 206, 0));
        check_io(&mut h, 300, 5 * MIB);
        if extended {
            // A payload on a command that takes none is skipped and refused.
            h.send(
                proto::CMD_FLAG_PAYLOAD_LEN,
                proto::CMD_TRIM,
                207,
                0,
                100,
                &[9; 100],
            );
            assert_eq!(h.status_reply().unwrap(), (proto::EINVAL, 207));
            // A WRITE may carry PAYLOAD_LEN.
            h.send(
                proto::CMD_FLAG_PAYLOAD_LEN,
                proto::CMD_WRITE,
                208,
                6 * MIB,
                512,
                &[4; 512],
            );
            assert_eq!(h.status_reply().unwrap(), (0, 208));
            assert_eq!(disk.read_now(6 * MIB, 512), vec![4; 512]);
        }
        check_io(&mut h, 400, 5 * MIB);
    }
}

#[test]
fn structured_block_status_and_error_chunks() {
    let (srv, disk) = server();
    for extended in [false, true] {
        let mut h = RawClient::connect(srv.addr, "disk", true, extended);
        let base = if extended { 32 * MIB } else { 0 };
        assert_eq!(h.write(1, base + MIB, &[5; 65536]), 0);
        h.send(0, proto::CMD_BLOCK_STATUS, 2, base, 4 * MIB, &[]);
        let (cookie, ext) = h.block_status_reply().unwrap();
        assert_eq!(cookie, 2);
        assert_eq!(ext, vec![(MIB, 3), (65536, 0), (3 * MIB - 65536, 3)]);

        // An export failure on READ is a structured error chunk, and the
        // connection goes on.
        disk.set_failure(Some(ballast_server::nbd::ExportError::Io(
            "injected".into(),
        )));
        h.send(0, proto::CMD_READ, 3, 0, 4096, &[]);
        let (c, d) = h.chunk().unwrap();
        assert_eq!((c.cookie, c.typ), (3, proto::REPLY_TYPE_ERROR));
        assert_ne!(c.flags & proto::REPLY_FLAG_DONE, 0);
        assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), proto::EIO);
        let mlen = u16::from_be_bytes([d[4], d[5]]) as usize;
        assert_eq!(d.len(), 6 + mlen);
        assert!(String::from_utf8_lossy(&d[6..]).contains("injected"));
        h.send(0, proto::CMD_FLUSH, 4, 0, 0, &[]);
        assert_eq!(h.status_reply().unwrap(), (proto::EIO, 4));
        disk.set_failure(None);
        check_io(&mut h, 10, base + 2 * MIB);
        h.send(0, proto::CMD_TRIM, 5, base + 2 * MIB, 8192, &[]);
        assert_eq!(h.status_reply().unwrap(), (0, 5));
        // Clean disconnect.
        h.send(0, proto::CMD_DISC, 6, 0, 0, &[]);
        assert!(h.closed_by_server());
    }
}

#[test]
fn block_status_answers_a_bounded_span_and_the_rest_when_asked_again() {
    // 16 GiB, sparse: one request may name gigabytes, but the server asks
    // the export about 64 Ki blocks (256 MiB at 4 KiB) at most.
    let c = MemoryCatalog::new();
    c.add("big", MemoryExport::new(16 << 30));
    let srv = TestServer::start(Arc::new(c), NbdConfig::default());
    for extended in [false, true] {
        let mut h = RawClient::connect(srv.addr, "big", true, extended);
        assert_eq!(h.write(1, 300 * MIB, &[9; 65536]), 0);
        let len = if extended {
            12 << 30
        } else {
            u32::MAX as u64 - 4095
        };
        // From an unaligned offset: the answer ends on a block boundary.
        h.send(0, proto::CMD_BLOCK_STATUS, 2, 100, len, &[]);
        assert_eq!(
            h.block_status_reply().unwrap(),
            (2, vec![(256 * MIB - 100, 3)])
        );
        // Asking again from there goes on where the answer stopped.
        h.send(0, proto::CMD_BLOCK_STATUS, 3, 256 * MIB, len, &[]);
        assert_eq!(
            h.block_status_reply().unwrap(),
            (3, vec![(44 * MIB, 3), (65536, 0), (212 * MIB - 65536, 3)])
        );
        // REQ_ONE: one extent, still no longer than asked.
        h.send(
            proto::CMD_FLAG_REQ_ONE,
            proto::CMD_BLOCK_STATUS,
            4,
            300 * MIB,
            4096,
            &[],
        );
        assert_eq!(h.block_status_reply().unwrap(), (4, vec![(4096, 0)]));
        // Past the spans looked at above.
        check_io(&mut h, 10, 8 << 30);
    }
}

#[test]
fn hundreds_of_idle_connections_do_not_disturb_a_busy_one() {
    let (srv, _) = server();
    let mut idle = Vec::new();
    for i in 0..300 {
        // Mix connections idle in transmission with ones idle mid-handshake.
        if i % 3 == 0 {
            let s = TcpStream::connect(srv.addr).unwrap();
            idle.push(s);
        } else {
            idle.push(RawClient::connect(srv.addr, "disk", i % 2 == 0, false).s);
        }
    }
    let mut h = RawClient::connect(srv.addr, "disk", true, false);
    let t0 = Instant::now();
    for i in 0..500u64 {
        check_io(&mut h, 1000 + 2 * i, (i % 64) * 65536);
    }
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "I/O beside idle connections took {:?}",
        t0.elapsed()
    );
    // The idle ones are all still served.
    let mut sample = RawClient::connect(srv.addr, "disk", false, false);
    check_io(&mut sample, 5, 0);
    drop(idle);
}

#[test]
fn connections_past_the_limit_are_closed_at_once_and_open_ones_go_on() {
    let c = MemoryCatalog::new();
    c.add("disk", MemoryExport::new(64 * MIB));
    let cfg = NbdConfig {
        max_connections: 3,
        ..NbdConfig::default()
    };
    let srv = TestServer::start(Arc::new(c), cfg);
    let mut a = RawClient::connect(srv.addr, "disk", true, false);
    let mut b = RawClient::connect(srv.addr, "disk", false, false);
    // A connection still in the handshake holds a slot too.
    let mut pending = TcpStream::connect(srv.addr).unwrap();
    let mut greeting = [0u8; 18];
    pending.read_exact(&mut greeting).unwrap();
    for _ in 0..20 {
        assert!(
            RawClient::try_connect(srv.addr, "disk", false, false).is_none(),
            "a connection past the limit was served"
        );
    }
    check_io(&mut a, 1, 0);
    check_io(&mut b, 3, MIB);
    // A slot frees once a connection ends (the server notices the close
    // asynchronously, hence the retries; a refused attempt holds no slot).
    drop(pending);
    let t0 = Instant::now();
    let mut d = loop {
        if let Some(d) = RawClient::try_connect(srv.addr, "disk", true, true) {
            break d;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the slot of a closed connection was never reused"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    check_io(&mut d, 5, 2 * MIB);
    check_io(&mut a, 7, 3 * MIB);
}

#[test]
fn slow_reader_gets_back_pressure_not_unbounded_buffering() {
    let (srv, disk) = server();
    let mut h = RawClient::connect(srv.addr, "disk", true, false);
    assert_eq!(h.write(1, 0, &vec![3u8; 256 * 1024]), 0);
    // Pipeline 2000 reads of 256 KiB without reading any reply: the server
    // must stop taking requests once its in-flight bound is reached.
    let n = 2000u64;
    let mut batch = Vec::new();
    for i in 0..n {
        batch.extend_from_slice(&h.request_bytes(0, proto::CMD_READ, 10_000 + i, 0, 256 * 1024));
    }
    h.s.write_all(&batch).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let started = disk.read_count();
    assert!(
        started < 400,
        "{started} reads started for a client that reads no replies"
    );
    assert!(started >= 64, "only {started} reads started");
    // Once the client reads, everything is answered, in full.
    for _ in 0..n {
        let (e, _, d) = h.read_reply(0, 256 * 1024).unwrap();
        assert_eq!(e, 0);
        assert_eq!(d[0], 3);
    }
    assert_eq!(disk.read_count(), n);
    check_io(&mut h, 7, MIB);
}

#[test]
fn shutdown_answers_a_pending_block_status_at_once() {
    // Every answer of this export takes 6 s, longer than the grace. (The
    // flush a connection makes as it ends takes as long, so the server
    // itself stops after about grace + 6 s whatever happens here.)
    let c = MemoryCatalog::new();
    let slow = Duration::from_secs(6);
    c.add("disk", MemoryExport::new(64 * MIB).latency(slow, slow));
    let cfg = NbdConfig {
        shutdown_grace: Some(Duration::from_secs(3)),
        ..NbdConfig::default()
    };
    let srv = TestServer::start(Arc::new(c), cfg);
    let mut h = RawClient::connect(srv.addr, "disk", true, false);
    h.send(0, proto::CMD_BLOCK_STATUS, 9, 0, MIB, &[]);
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let stopper = std::thread::spawn(move || srv.stop());
    // ESHUTDOWN at once: not after the lookup, and not a connection cut
    // when the grace runs out before it.
    assert_eq!(h.status_reply().unwrap(), (proto::ESHUTDOWN, 9));
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "the block status was answered {:?} after shutdown began",
        t0.elapsed()
    );
    stopper.join().unwrap().unwrap();
}

#[test]
fn shutdown_ends_a_connection_whose_client_reads_no_replies_within_the_grace() {
    // A runtime of our own, to see which of the server's tasks are alive.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let c = MemoryCatalog::new();
    let disk = c.add("disk", MemoryExport::new(64 * MIB));
    let grace = Duration::from_millis(300);
    let cfg = NbdConfig {
        shutdown_grace: Some(grace),
        ..NbdConfig::default()
    };
    let srv = rt
        .block_on(NbdServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(c),
            cfg,
        ))
        .unwrap();
    let addr = srv.local_addr();
    let token = CancellationToken::new();
    let server = rt.spawn(srv.run(token.clone()));

    // 1 MiB reads, pipelined, replies never read: once the socket buffers
    // are full, the server's reply writer blocks in its socket write.
    let mut h = RawClient::connect(addr, "disk", true, false);
    // Data, not holes: a hole's reply is a few bytes.
    assert_eq!(h.write(1, 0, &vec![7; MIB as usize]), 0);
    let mut batch = Vec::new();
    for i in 0..1000u64 {
        batch.extend_from_slice(&h.request_bytes(0, proto::CMD_READ, i, 0, MIB));
    }
    h.s.write_all(&batch).unwrap();
    let t0 = Instant::now();
    let mut last = u64::MAX;
    // Until the reads stop starting: the server is stuck on the writer.
    while disk.read_count() != last {
        assert!(t0.elapsed() < Duration::from_secs(10));
        last = disk.read_count();
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        last < 1000,
        "every read was answered to a client that reads nothing"
    );

    let t0 = Instant::now();
    token.cancel();
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), server).await })
        .expect("the server did not stop")
        .unwrap()
        .unwrap();
    // Every task of the connection, its blocked writer included, ends.
    while rt.metrics().num_alive_tasks() > 0 {
        assert!(
            t0.elapsed() < grace + Duration::from_secs(5),
            "{} server tasks outlived the shutdown grace",
            rt.metrics().num_alive_tasks()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // And the client sees its connection end, after the replies that were
    // already in the socket buffers.
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match h.s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("the connection is still open after the server stopped")
            }
            // Reset: the server closed with requests it never read.
            Err(_) => break,
        }
    }
}
