//! Client-claimed sizes are never allocated. Alone in its own test binary so
//! that the process's virtual size is not disturbed by other tests.

#[path = "nbd_support.rs"]
mod support;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;

use ballast_server::nbd::memory_export::{MemoryCatalog, MemoryExport};
use ballast_server::nbd::proto;
use ballast_server::nbd::NbdConfig;
use support::*;

#[test]
fn claimed_sizes_are_not_allocated() {
    let c = MemoryCatalog::new();
    c.add("disk", MemoryExport::new(64 << 20));
    let srv = TestServer::start(Arc::new(c), NbdConfig::default());
    let mut warm = RawClient::connect(srv.addr, "disk", true, false);
    assert_eq!(warm.write(1, 0, &[1; 4096]), 0);
    let base = vm_peak();

    for claim in [1u64 << 30, u32::MAX as u64] {
        let mut h = RawClient::connect(srv.addr, "disk", false, false);
        h.send(0, proto::CMD_WRITE, 1, 0, claim, &[0; 4096]);
        assert!(h.closed_by_server());
    }
    let mut h = RawClient::connect(srv.addr, "disk", true, true);
    h.send(0, proto::CMD_WRITE, 1, 0, 1 << 42, &[0; 4096]);
    assert!(h.closed_by_server());

    // An option claiming a 4 GiB payload during the handshake.
    let mut s = TcpStream::connect(srv.addr).unwrap();
    let mut hello = [0u8; 18];
    std::io::Read::read_exact(&mut s, &mut hello).unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap();
    let mut opt = Vec::new();
    opt.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    opt.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&opt).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        std::io::Read::read(&mut s, &mut b).unwrap_or(0),
        0,
        "server should drop the connection"
    );

    let grown = vm_peak().saturating_sub(base);
    assert!(
        grown < 512 << 20,
        "peak virtual size grew by {} MiB while handling huge claims",
        grown >> 20
    );
    assert_eq!(warm.write(2, 4096, &[2; 4096]), 0);
}
