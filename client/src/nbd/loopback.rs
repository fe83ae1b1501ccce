//! A small in-memory NBD server on 127.0.0.1 for tests and benchmarks of the
//! client: no external program needed, and it can misbehave on purpose
//! (refuse `NBD_OPT_GO`, split or reorder replies, corrupt reads) to exercise
//! the client's fallbacks and checks. Not meant to serve real data.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::proto::errno::{EINVAL, EIO, ENOSPC};
use super::proto::{
    self, cmd, cmd_flag, info, opt, rep, reply_type, HeaderMode, OptionHeader, OptionReply,
    ReplyHeader, Request, TransmissionFlags,
};

/// How the loopback server behaves.
#[derive(Debug, Clone)]
pub struct LoopbackConfig {
    /// Export size.
    pub size: u64,
    /// Accept `NBD_OPT_STRUCTURED_REPLY`.
    pub structured: bool,
    /// Accept `NBD_OPT_GO` (else answer `NBD_REP_ERR_UNSUP`).
    pub go: bool,
    /// Send structured reads as two chunks (data and, if all zero, a hole),
    /// in reverse order.
    pub fragment_reads: bool,
    /// Answer each batch of requests read together in reverse order.
    pub reverse_batches: bool,
    /// Flip one bit of every read.
    pub corrupt_reads: bool,
    /// Like `nbdkit null`: writes are dropped and reads return zeroes.
    pub null: bool,
    /// Fail every request whose range contains this offset with `NBD_EIO`.
    pub fail_at: Option<u64>,
}

impl Default for LoopbackConfig {
    fn default() -> Self {
        LoopbackConfig {
            size: 64 << 20,
            structured: true,
            go: true,
            fragment_reads: false,
            reverse_batches: false,
            corrupt_reads: false,
            null: false,
            fail_at: None,
        }
    }
}

/// A running loopback server; stops when dropped.
#[derive(Debug)]
pub struct Loopback {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Loopback {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Loopback {
    /// Listen on an ephemeral port of 127.0.0.1.
    pub async fn start(cfg: LoopbackConfig) -> std::io::Result<Loopback> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let data = Arc::new(Mutex::new(if cfg.null {
            Vec::new()
        } else {
            vec![0u8; cfg.size as usize]
        }));
        let cfg = Arc::new(cfg);
        let task = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                let _ = s.set_nodelay(true);
                conns.push(tokio::spawn(serve(s, cfg.clone(), data.clone())));
            }
        });
        Ok(Loopback { addr, task })
    }

    /// `nbd://127.0.0.1:PORT/`.
    pub fn uri(&self) -> String {
        format!("nbd://{}/", self.addr)
    }
}

async fn serve(mut s: TcpStream, cfg: Arc<LoopbackConfig>, data: Arc<Mutex<Vec<u8>>>) {
    let Ok(structured) = handshake(&mut s, &cfg).await else {
        return;
    };
    let (mut r, mut w) = s.into_split();
    let mut inbuf = BytesMut::with_capacity(256 * 1024);
    let mut batch: Vec<BytesMut> = Vec::new();
    loop {
        // Parse every complete request in the buffer, then answer them.
        while let Ok(req) = Request::decode(&inbuf) {
            let payload = if req.kind == cmd::WRITE {
                req.length as usize
            } else {
                0
            };
            if inbuf.len() < proto::REQUEST_LEN + payload {
                break;
            }
            inbuf.advance(proto::REQUEST_LEN);
            let body = inbuf.split_to(payload);
            if req.kind == cmd::DISC {
                return;
            }
            batch.push(answer(&req, &body, &cfg, &data, structured));
        }
        if !batch.is_empty() {
            if cfg.reverse_batches {
                batch.reverse();
            }
            let mut out = BytesMut::new();
            for b in batch.drain(..) {
                out.extend_from_slice(&b);
            }
            if w.write_all(&out).await.is_err() {
                return;
            }
        }
        if inbuf.capacity() - inbuf.len() < 64 * 1024 {
            inbuf.reserve(256 * 1024);
        }
        match r.read_buf(&mut inbuf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn answer(
    req: &Request,
    body: &[u8],
    cfg: &LoopbackConfig,
    data: &Mutex<Vec<u8>>,
    structured: bool,
) -> BytesMut {
    let mut out = BytesMut::new();
    let (off, len) = (req.offset, req.length);
    let in_range = off.checked_add(len).is_some_and(|e| e <= cfg.size);
    let error = |out: &mut BytesMut, errno: u32| {
        if structured {
            let mode = HeaderMode::Structured;
            proto::encode_error_chunk(mode, req.handle, off, errno, "loopback refuses", out);
        } else {
            ReplyHeader::encode_simple(errno, req.handle, out);
        }
    };
    if let Some(bad) = cfg.fail_at {
        if req.kind != cmd::FLUSH && off <= bad && bad < off.saturating_add(len.max(1)) {
            error(&mut out, EIO);
            return out;
        }
    }
    match req.kind {
        cmd::READ => {
            if !in_range {
                error(&mut out, EINVAL);
                return out;
            }
            let mut buf = if cfg.null {
                vec![0u8; len as usize]
            } else {
                let d = data.lock().unwrap_or_else(|e| e.into_inner());
                d[off as usize..(off + len) as usize].to_vec()
            };
            if cfg.corrupt_reads && !buf.is_empty() {
                buf[0] ^= 1;
            }
            if !structured {
                ReplyHeader::encode_simple(0, req.handle, &mut out);
                out.put_slice(&buf);
            } else if cfg.fragment_reads && buf.len() >= 2 {
                let half = buf.len() / 2;
                let second = &buf[half..];
                if second.iter().all(|&b| b == 0) {
                    ReplyHeader::encode_structured(
                        0,
                        reply_type::OFFSET_HOLE,
                        req.handle,
                        12,
                        &mut out,
                    );
                    out.put_u64(off + half as u64);
                    out.put_u32(second.len() as u32);
                } else {
                    ReplyHeader::encode_structured(
                        0,
                        reply_type::OFFSET_DATA,
                        req.handle,
                        8 + second.len() as u32,
                        &mut out,
                    );
                    out.put_u64(off + half as u64);
                    out.put_slice(second);
                }
                ReplyHeader::encode_structured(
                    proto::REPLY_FLAG_DONE,
                    reply_type::OFFSET_DATA,
                    req.handle,
                    8 + half as u32,
                    &mut out,
                );
                out.put_u64(off);
                out.put_slice(&buf[..half]);
            } else {
                ReplyHeader::encode_structured(
                    proto::REPLY_FLAG_DONE,
                    reply_type::OFFSET_DATA,
                    req.handle,
                    8 + buf.len() as u32,
                    &mut out,
                );
                out.put_u64(off);
                out.put_slice(&buf);
            }
        }
        cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM => {
            if !in_range {
                error(&mut out, ENOSPC);
                return out;
            }
            if !cfg.null {
                let mut d = data.lock().unwrap_or_else(|e| e.into_inner());
                let dst = &mut d[off as usize..(off + len) as usize];
                if req.kind == cmd::WRITE {
                    dst.copy_from_slice(body);
                } else {
                    dst.fill(0);
                }
            }
            ReplyHeader::encode_simple(0, req.handle, &mut out);
        }
        cmd::FLUSH => ReplyHeader::encode_simple(0, req.handle, &mut out),
        cmd::BLOCK_STATUS if structured => {
            if !in_range || len == 0 {
                error(&mut out, EINVAL);
                return out;
            }
            // One extent per 4 KiB-aligned run of zero / non-zero data, at most 8.
            let d = data.lock().unwrap_or_else(|e| e.into_inner());
            let mut extents: Vec<(u32, u32)> = Vec::new();
            let mut pos = off;
            while pos < off + len && extents.len() < 8 {
                let end = ((pos / 4096) + 1) * 4096;
                let end = end.min(off + len);
                let zero = cfg.null || d[pos as usize..end as usize].iter().all(|&b| b == 0);
                let flags = if zero { proto::STATE_ZERO } else { 0 };
                match extents.last_mut() {
                    Some(last) if last.1 == flags => last.0 += (end - pos) as u32,
                    _ => extents.push(((end - pos) as u32, flags)),
                }
                pos = end;
            }
            if req.flags & cmd_flag::REQ_ONE != 0 {
                extents.truncate(1);
            }
            ReplyHeader::encode_structured(
                proto::REPLY_FLAG_DONE,
                reply_type::BLOCK_STATUS,
                req.handle,
                4 + 8 * extents.len() as u32,
                &mut out,
            );
            out.put_u32(1);
            for (l, f) in extents {
                out.put_u32(l);
                out.put_u32(f);
            }
        }
        _ => error(&mut out, EINVAL),
    }
    out
}

async fn handshake(s: &mut TcpStream, cfg: &LoopbackConfig) -> std::io::Result<bool> {
    let mut g = Vec::new();
    proto::server_greeting(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES, &mut g);
    s.write_all(&g).await?;
    let client_flags = s.read_u32().await?;
    let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
    let flags = TransmissionFlags::HAS_FLAGS
        | TransmissionFlags::SEND_FLUSH
        | TransmissionFlags::SEND_FUA
        | TransmissionFlags::SEND_TRIM
        | TransmissionFlags::SEND_WRITE_ZEROES
        | TransmissionFlags::CAN_MULTI_CONN;
    let mut structured = false;
    loop {
        let mut hdr = [0u8; proto::OPTION_HEADER_LEN];
        s.read_exact(&mut hdr).await?;
        let OptionHeader { option, length } =
            OptionHeader::decode(&hdr).map_err(|_| std::io::ErrorKind::InvalidData)?;
        let mut body = vec![0u8; length as usize];
        s.read_exact(&mut body).await?;
        let mut out = Vec::new();
        let reply = |out: &mut Vec<u8>, kind: u32, data: &[u8]| {
            OptionReply::encode_with(option, kind, data, out)
        };
        match option {
            opt::EXPORT_NAME => {
                out.put_u64(cfg.size);
                out.put_u16(flags);
                if !no_zeroes {
                    out.put_slice(&[0u8; 124]);
                }
                s.write_all(&out).await?;
                return Ok(structured);
            }
            opt::STRUCTURED_REPLY if cfg.structured => {
                structured = true;
                reply(&mut out, rep::ACK, &[]);
            }
            opt::SET_META_CONTEXT if structured => {
                let mut ctx = 1u32.to_be_bytes().to_vec();
                ctx.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
                reply(&mut out, rep::META_CONTEXT, &ctx);
                reply(&mut out, rep::ACK, &[]);
            }
            opt::GO if cfg.go => {
                let mut i = Vec::new();
                i.put_u16(info::EXPORT);
                i.put_u64(cfg.size);
                i.put_u16(flags);
                reply(&mut out, rep::INFO, &i);
                reply(&mut out, rep::ACK, &[]);
                s.write_all(&out).await?;
                return Ok(structured);
            }
            opt::ABORT => {
                reply(&mut out, rep::ACK, &[]);
                s.write_all(&out).await?;
                return Err(std::io::ErrorKind::ConnectionAborted.into());
            }
            _ => reply(&mut out, rep::ERR_UNSUP, &[]),
        }
        s.write_all(&out).await?;
    }
}
