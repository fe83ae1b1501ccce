//! Shared helpers for the NBD integration tests (included by the other
//! `nbd_*.rs` test files with `#[path]`; as a test target of its own it has
//! no tests).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use ballast_server::nbd::memory_export::MemoryCatalog;
use ballast_server::nbd::proto;
use ballast_server::nbd::{NbdConfig, NbdServer};
use tokio_util::sync::CancellationToken;

/// An in-process NBD server on 127.0.0.1:0 with its own runtime thread.
pub struct TestServer {
    pub addr: SocketAddr,
    token: CancellationToken,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub fn start(catalog: Arc<MemoryCatalog>, cfg: NbdConfig) -> TestServer {
        let token = CancellationToken::new();
        let t = token.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let srv = NbdServer::bind("127.0.0.1:0".parse().unwrap(), catalog, cfg).await?;
                tx.send(srv.local_addr()).unwrap();
                srv.run(t).await
            })
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server did not start");
        TestServer {
            addr,
            token,
            thread: Some(thread),
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    /// Requests shutdown and waits for `run` to return.
    pub fn stop(mut self) -> std::io::Result<()> {
        self.token.cancel();
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("server thread panicked")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.token.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Path of `tool`, or a panic naming the Debian package that provides it.
pub fn need_tool(tool: &str, package: &str) -> PathBuf {
    let path = if tool.starts_with('/') {
        Some(PathBuf::from(tool))
    } else {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(tool))
                .find(|p| p.is_file())
        })
    };
    match path {
        Some(p) if p.is_file() => p,
        _ => panic!("`{tool}` is not installed: install the Debian package `{package}` (apt-get install {package})"),
    }
}

pub fn need_python_nbd() -> PathBuf {
    let py = need_tool("/usr/bin/python3", "python3");
    let ok = Command::new(&py)
        .args(["-c", "import nbd"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        panic!("/usr/bin/python3 cannot `import nbd`: install the Debian package `python3-libnbd`");
    }
    py
}

/// Runs a command, panicking with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Runs a Python script with libnbd, passing `args`.
pub fn run_python(script: &str, args: &[&str]) -> Output {
    let py = need_python_nbd();
    let mut cmd = Command::new(py);
    cmd.arg("-c").arg(script).args(args);
    run_ok(&mut cmd)
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ballast-nbd-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A minimal blocking NBD client for hostile and raw-protocol tests.
pub struct RawClient {
    pub s: TcpStream,
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    pub extended: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
}

impl RawClient {
    /// Connects and negotiates with NBD_OPT_GO (optionally structured replies
    /// + base:allocation, or extended headers).
    pub fn connect(addr: SocketAddr, export: &str, structured: bool, extended: bool) -> RawClient {
        RawClient::try_connect(addr, export, structured, extended)
            .expect("the server closed the connection before its greeting")
    }

    /// `connect`, or `None` when the server closes the connection before
    /// greeting it (as it does past its connection limit).
    pub fn try_connect(
        addr: SocketAddr,
        export: &str,
        structured: bool,
        extended: bool,
    ) -> Option<RawClient> {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        // The server greets (or closes) as it accepts: a client must never
        // be left waiting for either.
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 18];
        match s.read_exact(&mut b) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return None
            }
            Err(e) => panic!("the server neither greeted nor closed a new connection: {e}"),
        }
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        assert_eq!(
            u64::from_be_bytes(b[..8].try_into().unwrap()),
            proto::NBDMAGIC
        );
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut c = RawClient {
            s,
            size: 0,
            flags: 0,
            structured: false,
            extended: false,
        };
        if extended {
            c.option(proto::OPT_EXTENDED_HEADERS, &[]);
            assert_eq!(c.option_reply().1, proto::REP_ACK);
            c.extended = true;
            c.structured = true;
        } else if structured {
            c.option(proto::OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(c.option_reply().1, proto::REP_ACK);
            c.structured = true;
        }
        if c.structured {
            let mut p = Vec::new();
            p.extend_from_slice(&(export.len() as u32).to_be_bytes());
            p.extend_from_slice(export.as_bytes());
            p.extend_from_slice(&1u32.to_be_bytes());
            p.extend_from_slice(&15u32.to_be_bytes());
            p.extend_from_slice(b"base:allocation");
            c.option(proto::OPT_SET_META_CONTEXT, &p);
            while c.option_reply().1 != proto::REP_ACK {}
        }
        let mut p = Vec::new();
        p.extend_from_slice(&(export.len() as u32).to_be_bytes());
        p.extend_from_slice(export.as_bytes());
        p.extend_from_slice(&0u16.to_be_bytes());
        c.option(proto::OPT_GO, &p);
        loop {
            let (_, rep, d) = c.option_reply();
            if rep == proto::REP_ACK {
                break;
            }
            assert_eq!(
                rep,
                proto::REP_INFO,
                "GO failed: {rep:#x} {}",
                String::from_utf8_lossy(&d)
            );
            if u16::from_be_bytes([d[0], d[1]]) == proto::INFO_EXPORT {
                c.size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                c.flags = u16::from_be_bytes([d[10], d[11]]);
            }
        }
        Some(c)
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        let mut v = Vec::new();
        v.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        self.s.write_all(&v).unwrap();
    }

    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            proto::OPTION_REPLY_MAGIC
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0; len as usize];
        self.s.read_exact(&mut d).unwrap();
        (
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            d,
        )
    }

    pub fn request_bytes(
        &self,
        flags: u16,
        typ: u16,
        cookie: u64,
        offset: u64,
        len: u64,
    ) -> Vec<u8> {
        let mut v = Vec::with_capacity(32);
        if self.extended {
            v.extend_from_slice(&proto::EXTENDED_REQUEST_MAGIC.to_be_bytes());
        } else {
            v.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        }
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&typ.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        if self.extended {
            v.extend_from_slice(&len.to_be_bytes());
        } else {
            v.extend_from_slice(&(len as u32).to_be_bytes());
        }
        v
    }

    pub fn send(
        &mut self,
        flags: u16,
        typ: u16,
        cookie: u64,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) {
        let mut v = self.request_bytes(flags, typ, cookie, offset, len);
        v.extend_from_slice(payload);
        self.s.write_all(&v).unwrap();
    }

    /// Reads one simple reply (no payload): (error, cookie).
    pub fn simple_reply(&mut self) -> std::io::Result<(u32, u64)> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            proto::SIMPLE_REPLY_MAGIC,
            "not a simple reply"
        );
        Ok((
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        ))
    }

    /// Reads one structured/extended chunk with its payload.
    pub fn chunk(&mut self) -> std::io::Result<(Chunk, Vec<u8>)> {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m)?;
        let magic = u32::from_be_bytes(m);
        let (c, len) = if magic == proto::EXTENDED_REPLY_MAGIC {
            let mut h = [0u8; 28];
            self.s.read_exact(&mut h)?;
            let c = Chunk {
                flags: u16::from_be_bytes([h[0], h[1]]),
                typ: u16::from_be_bytes([h[2], h[3]]),
                cookie: u64::from_be_bytes(h[4..12].try_into().unwrap()),
            };
            (c, u64::from_be_bytes(h[20..28].try_into().unwrap()))
        } else {
            assert_eq!(
                magic,
                proto::STRUCTURED_REPLY_MAGIC,
                "unexpected reply magic {magic:#x}"
            );
            let mut h = [0u8; 16];
            self.s.read_exact(&mut h)?;
            let c = Chunk {
                flags: u16::from_be_bytes([h[0], h[1]]),
                typ: u16::from_be_bytes([h[2], h[3]]),
                cookie: u64::from_be_bytes(h[4..12].try_into().unwrap()),
            };
            (c, u32::from_be_bytes(h[12..16].try_into().unwrap()) as u64)
        };
        let mut d = vec![0; len as usize];
        self.s.read_exact(&mut d)?;
        Ok((c, d))
    }

    /// Reads a successful BLOCK_STATUS reply (one chunk, for the one
    /// context): (cookie, [(length, flags)]).
    pub fn block_status_reply(&mut self) -> std::io::Result<(u64, Vec<(u64, u32)>)> {
        let (c, d) = self.chunk()?;
        assert_ne!(
            c.flags & proto::REPLY_FLAG_DONE,
            0,
            "exactly one chunk for the one context"
        );
        let ext = if self.extended {
            assert_eq!(c.typ, proto::REPLY_TYPE_BLOCK_STATUS_EXT);
            let n = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
            assert_eq!(d.len(), 8 + 16 * n);
            (0..n)
                .map(|i| {
                    let o = 8 + 16 * i;
                    (
                        u64::from_be_bytes(d[o..o + 8].try_into().unwrap()),
                        u64::from_be_bytes(d[o + 8..o + 16].try_into().unwrap()) as u32,
                    )
                })
                .collect()
        } else {
            assert_eq!(c.typ, proto::REPLY_TYPE_BLOCK_STATUS);
            (0..(d.len() - 4) / 8)
                .map(|i| {
                    let o = 4 + 8 * i;
                    (
                        u32::from_be_bytes(d[o..o + 4].try_into().unwrap()) as u64,
                        u32::from_be_bytes(d[o + 4..o + 8].try_into().unwrap()),
                    )
                })
                .collect()
        };
        Ok((c.cookie, ext))
    }

    /// Reads the reply to a non-read command in whatever form the mode uses:
    /// (error, cookie).
    pub fn status_reply(&mut self) -> std::io::Result<(u32, u64)> {
        if !self.structured {
            return self.simple_reply();
        }
        let mut m = [0u8; 4];
        self.s.peek(&mut m)?;
        if u32::from_be_bytes(m) == proto::SIMPLE_REPLY_MAGIC {
            return self.simple_reply();
        }
        let (c, d) = self.chunk()?;
        assert_ne!(c.flags & proto::REPLY_FLAG_DONE, 0);
        let err = if c.typ & 0x8000 != 0 {
            u32::from_be_bytes(d[..4].try_into().unwrap())
        } else {
            0
        };
        Ok((err, c.cookie))
    }

    /// Reads a READ reply (simple: `len` bytes follow a good header).
    /// Returns (error, cookie, data with holes filled).
    pub fn read_reply(&mut self, offset: u64, len: usize) -> std::io::Result<(u32, u64, Vec<u8>)> {
        if !self.structured {
            let (e, c) = self.simple_reply()?;
            let mut d = vec![0; if e == 0 { len } else { 0 }];
            self.s.read_exact(&mut d)?;
            return Ok((e, c, d));
        }
        let mut out = vec![0u8; len];
        let mut err = 0;
        loop {
            let (c, d) = self.chunk()?;
            match c.typ {
                proto::REPLY_TYPE_OFFSET_DATA => {
                    let at = u64::from_be_bytes(d[..8].try_into().unwrap()) - offset;
                    out[at as usize..at as usize + d.len() - 8].copy_from_slice(&d[8..]);
                }
                proto::REPLY_TYPE_OFFSET_HOLE => {}
                proto::REPLY_TYPE_NONE => {}
                t if t & 0x8000 != 0 => err = u32::from_be_bytes(d[..4].try_into().unwrap()),
                t => panic!("unexpected chunk type {t}"),
            }
            if c.flags & proto::REPLY_FLAG_DONE != 0 {
                return Ok((err, c.cookie, out));
            }
        }
    }

    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        self.send(0, proto::CMD_WRITE, cookie, offset, data.len() as u64, data);
        let (e, c) = self.status_reply().unwrap();
        assert_eq!(c, cookie);
        e
    }

    pub fn read(&mut self, cookie: u64, offset: u64, len: usize) -> (u32, Vec<u8>) {
        self.send(0, proto::CMD_READ, cookie, offset, len as u64, &[]);
        let (e, c, d) = self.read_reply(offset, len).unwrap();
        assert_eq!(c, cookie);
        (e, d)
    }

    /// True once the server has closed the connection (EOF or reset).
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

/// Current virtual memory size of this process, in bytes.
pub fn vm_size() -> u64 {
    vm_stat("VmSize:")
}

/// Peak virtual memory size of this process so far, in bytes.
pub fn vm_peak() -> u64 {
    vm_stat("VmPeak:")
}

fn vm_stat(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[test]
fn support_helpers_work() {
    assert_eq!(random_bytes(1, 100), random_bytes(1, 100));
    assert_ne!(random_bytes(1, 100), random_bytes(2, 100));
    assert!(vm_size() > 0);
}
