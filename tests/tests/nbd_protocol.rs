//! Negotiation paths real clients use that libnbd does not: the kernel
//! client's NBD_OPT_EXPORT_NAME with simple replies only, NO_ZEROES, and the
//! transmission flags, checked byte by byte.

use ballast_e2e::raw::{self, Conn};
use ballast_e2e::*;
use std::io::{Read, Write};
use std::time::Duration;

const HAS_FLAGS: u16 = 1;
const READ_ONLY: u16 = 2;
const SEND_FLUSH: u16 = 4;
const SEND_FUA: u16 = 8;
const SEND_TRIM: u16 = 0x20;
const SEND_WRITE_ZEROES: u16 = 0x40;
const CAN_MULTI_CONN: u16 = 0x100;

/// NBD_OPT_EXPORT_NAME as nbd-client/the kernel path does; returns the
/// connection and the bytes that followed size+flags.
fn export_name(port: u16, export: &str, no_zeroes: bool) -> std::io::Result<(Conn, Vec<u8>)> {
    let mut s = raw::tcp(port)?;
    let flags = raw::greeting(&mut s)?;
    assert_eq!(
        flags & 3,
        3,
        "server must advertise FIXED_NEWSTYLE and NO_ZEROES: {flags:#x}"
    );
    let client: u32 = if no_zeroes { 3 } else { 1 };
    s.write_all(&client.to_be_bytes())?;
    s.write_all(&raw::option(raw::OPT_EXPORT_NAME, export.as_bytes()))?;
    let mut b = [0u8; 10];
    s.read_exact(&mut b)?;
    let size = u64::from_be_bytes(b[..8].try_into().unwrap());
    let tflags = u16::from_be_bytes(b[8..].try_into().unwrap());
    let mut pad = vec![0u8; if no_zeroes { 0 } else { 124 }];
    s.read_exact(&mut pad)?;
    let c = Conn {
        s,
        size,
        flags: tflags,
        cookie: 0,
    };
    Ok((c, pad))
}

#[test]
fn export_name_path_simple_replies() {
    let node = Node::start();
    node.create_volume("k", "128M", &[]);

    for no_zeroes in [false, true] {
        let (mut c, pad) = export_name(node.nbd_port, "k", no_zeroes).expect("EXPORT_NAME");
        assert!(
            all_zero(&pad),
            "the 124 bytes after EXPORT_NAME are not zero"
        );
        assert_eq!(c.size, 128 * MIB);
        for (bit, name) in [
            (HAS_FLAGS, "HAS_FLAGS"),
            (SEND_FLUSH, "SEND_FLUSH"),
            (SEND_FUA, "SEND_FUA"),
            (SEND_TRIM, "SEND_TRIM"),
            (SEND_WRITE_ZEROES, "SEND_WRITE_ZEROES"),
            (CAN_MULTI_CONN, "CAN_MULTI_CONN"),
        ] {
            assert!(c.flags & bit != 0, "{name} missing from {:#x}", c.flags);
        }
        assert_eq!(c.flags & READ_ONLY, 0);
        // Only what the kernel sends: READ, WRITE(+FUA), FLUSH, TRIM, and
        // every reply is a simple one (the kernel rejects other magics).
        let data = random_bytes(128 * 1024, 1);
        assert_eq!(c.write(4096, &data, true).unwrap(), 0);
        assert_eq!(c.write(1 << 20, &data, false).unwrap(), 0);
        assert_eq!(c.flush().unwrap(), 0);
        let back = c.read(4096, data.len() as u32).unwrap().unwrap();
        assert_same("read over EXPORT_NAME", &back, &data);
        assert_eq!(c.command(0, 4, 1 << 20, 65536).unwrap(), 0, "TRIM"); // NBD_CMD_TRIM
        let back = c.read(1 << 20, 65536).unwrap().unwrap();
        assert!(all_zero(&back), "trimmed range not zero");
        assert_eq!(c.command(0, 6, 8192, 4096).unwrap(), 0, "WRITE_ZEROES");
        let back = c.read(4096, 8192).unwrap().unwrap();
        assert_same("before the zeroed block", &back[..4096], &data[..4096]);
        assert!(all_zero(&back[4096..]), "WRITE_ZEROES did not zero");
        // errors are simple replies too, and do not end the connection
        assert_eq!(c.read(128 * MIB, 4096).unwrap(), Err(raw::EINVAL));
        assert_eq!(c.read(0, 512).unwrap().unwrap().len(), 512);
        c.disconnect();
    }

    // A snapshot over EXPORT_NAME is read-only and refuses writes with EPERM.
    node.cli_ok(&["volume", "snapshot", "k", "k-snap"]);
    let (mut c, _) = export_name(node.nbd_port, "k-snap", true).expect("EXPORT_NAME snapshot");
    assert!(c.flags & READ_ONLY != 0, "snapshot flags {:#x}", c.flags);
    assert_eq!(c.write(0, &[1u8; 4096], false).unwrap(), raw::EPERM);
    assert_eq!(c.command(0, 4, 0, 4096).unwrap(), raw::EPERM, "TRIM");
    assert_eq!(c.read(0, 4096).unwrap().unwrap().len(), 4096);
    c.disconnect();

    // An unknown export over EXPORT_NAME: the server closes the connection.
    let mut s = raw::tcp(node.nbd_port).unwrap();
    raw::greeting(&mut s).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(&raw::option(raw::OPT_EXPORT_NAME, b"missing"))
        .unwrap();
    assert!(
        raw::closed_within(&mut s, Duration::from_secs(10)),
        "EXPORT_NAME of a missing export did not close the connection"
    );
}

#[test]
fn go_info_and_structured_reply_options() {
    let node = Node::start();
    node.create_volume("g", "64M", &["--block-size", "64K"]);
    let mut s = raw::tcp(node.nbd_port).unwrap();
    raw::greeting(&mut s).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();

    // NBD_OPT_INFO (6) asking for NBD_INFO_BLOCK_SIZE (3): INFO_EXPORT is
    // always there, the block sizes as asked, and the handshake goes on.
    let mut d = Vec::new();
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(b"g");
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&3u16.to_be_bytes());
    s.write_all(&raw::option(6, &d)).unwrap();
    let mut infos = Vec::new();
    loop {
        let (o, t, data) = raw::option_reply(&mut s).expect("INFO reply");
        assert_eq!(o, 6);
        match t {
            raw::REP_INFO => infos.push(data),
            raw::REP_ACK => break,
            t => panic!("INFO reply type {t:#x}"),
        }
    }
    let export = infos
        .iter()
        .find(|i| i[..2] == [0, 0])
        .expect("INFO without NBD_INFO_EXPORT");
    assert_eq!(export.len(), 12);
    assert_eq!(
        u64::from_be_bytes(export[2..10].try_into().unwrap()),
        64 * MIB
    );
    let bs = infos
        .iter()
        .find(|i| i[..2] == [0, 3])
        .expect("INFO without the NBD_INFO_BLOCK_SIZE asked for");
    assert_eq!(bs.len(), 14);
    let min = u32::from_be_bytes(bs[2..6].try_into().unwrap());
    let pref = u32::from_be_bytes(bs[6..10].try_into().unwrap());
    let max = u32::from_be_bytes(bs[10..14].try_into().unwrap());
    assert!(min.is_power_of_two() && min <= 65536, "min {min}");
    assert_eq!(pref, 65536, "preferred block size of a 64K volume");
    assert!(max >= pref && max % min == 0, "max {max}");

    // STRUCTURED_REPLY (8) is acknowledged; then GO; reads come back as
    // structured chunks (magic 0x668e33ef).
    s.write_all(&raw::option(8, &[])).unwrap();
    let (o, t, _) = raw::option_reply(&mut s).unwrap();
    assert_eq!((o, t), (8, raw::REP_ACK), "STRUCTURED_REPLY");
    s.write_all(&raw::go_bytes("g")).unwrap();
    loop {
        let (o, t, _) = raw::option_reply(&mut s).unwrap();
        assert_eq!(o, raw::OPT_GO);
        if t == raw::REP_ACK {
            break;
        }
        assert_eq!(t, raw::REP_INFO, "GO reply {t:#x}");
    }
    s.write_all(&raw::request(0, raw::CMD_READ, 77, 0, 4096))
        .unwrap();
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(
        u32::from_be_bytes(h[..4].try_into().unwrap()),
        0x668e_33ef,
        "a READ after STRUCTURED_REPLY must get a structured reply"
    );
    assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), 77);
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut rest = vec![0u8; len];
    s.read_exact(&mut rest).unwrap();
    // a READ error after structured replies is a structured error chunk
    s.write_all(&raw::request(0, raw::CMD_READ, 78, 64 * MIB, 4096))
        .unwrap();
    let mut seen_err = false;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x668e_33ef);
        let flags = u16::from_be_bytes(h[4..6].try_into().unwrap());
        let typ = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        if typ & 0x8000 != 0 {
            assert_eq!(
                u32::from_be_bytes(body[..4].try_into().unwrap()),
                raw::EINVAL,
                "read past the end"
            );
            seen_err = true;
        }
        if flags & 1 != 0 {
            break;
        }
    }
    assert!(seen_err, "a read past the end got no error chunk");
}
