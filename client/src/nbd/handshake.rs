//! Fixed newstyle negotiation: structured replies, metadata contexts, then
//! `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME` when the server does
//! not know GO). Oldstyle servers are accepted too.

use ballast_proto::congestion::LocalCongestion;
use bytes::Buf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::{NbdError, Result};
use super::proto::{self, info, opt, rep, OptionReply, TransmissionFlags};

/// Largest option reply payload accepted.
const MAX_OPTION_REPLY: u32 = 16 << 20;

/// What to ask for during negotiation.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Negotiate structured replies (needed for block status).
    pub structured_replies: bool,
    /// Metadata contexts to select when structured replies are on
    /// (default: `base:allocation`).
    pub meta_contexts: Vec<String>,
    /// Ask for block size constraints with `NBD_INFO_BLOCK_SIZE`.
    pub request_block_size: bool,
    /// TCP congestion control of a connection to a server on this host
    /// (what the client sends, writes, is not paced over loopback; see
    /// `ballast_proto::congestion`).
    pub local_congestion: LocalCongestion,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            structured_replies: true,
            meta_contexts: vec![proto::BASE_ALLOCATION.to_string()],
            request_block_size: true,
            local_congestion: LocalCongestion::default(),
        }
    }
}

/// Block size constraints from `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Minimum block size.
    pub minimum: u32,
    /// Preferred block size.
    pub preferred: u32,
    /// Maximum payload size.
    pub maximum: u32,
}

/// How the negotiation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: TransmissionFlags,
    /// Structured replies are on.
    pub structured_replies: bool,
    /// Selected metadata contexts: (id, name).
    pub meta_contexts: Vec<(u32, String)>,
    /// Block size constraints, if the server sent them.
    pub block_sizes: Option<BlockSizes>,
    /// Which path entered transmission: `NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME` or `oldstyle`.
    pub entered_by: &'static str,
}

struct OptReply {
    kind: u32,
    data: Vec<u8>,
}

async fn read_opt_reply<S: AsyncRead + Unpin>(s: &mut S, option: u32) -> Result<OptReply> {
    let mut hdr = [0u8; proto::OPTION_REPLY_LEN];
    s.read_exact(&mut hdr).await?;
    let h = OptionReply::decode(&hdr)
        .map_err(|e| NbdError::Handshake(format!("option reply to {}: {e}", opt::name(option))))?;
    if h.option != option {
        return Err(NbdError::Handshake(format!(
            "reply for option {} while waiting for {}",
            h.option,
            opt::name(option)
        )));
    }
    if h.length > MAX_OPTION_REPLY {
        return Err(NbdError::Handshake(format!(
            "option reply of {} bytes is too large",
            h.length
        )));
    }
    let mut data = vec![0u8; h.length as usize];
    s.read_exact(&mut data).await?;
    Ok(OptReply { kind: h.kind, data })
}

fn refused(option: u32, r: &OptReply) -> NbdError {
    NbdError::OptionRefused {
        option: opt::name(option),
        reply: rep::name(r.kind),
        message: String::from_utf8_lossy(&r.data).into_owned(),
    }
}

async fn send_opt<S: AsyncWrite + Unpin>(s: &mut S, option: u32, data: &[u8]) -> Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    proto::encode_option(option, data, &mut b);
    s.write_all(&b).await?;
    s.flush().await?;
    Ok(())
}

/// Run the handshake on a fresh connection, ending in transmission mode.
pub async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    opts: &ConnectOptions,
) -> Result<Negotiated> {
    let mut hello = [0u8; 16];
    s.read_exact(&mut hello).await.map_err(|e| {
        NbdError::Handshake(format!("server closed or failed before its greeting: {e}"))
    })?;
    let mut h = &hello[..];
    let magic = h.get_u64();
    if magic != proto::NBDMAGIC {
        return Err(NbdError::Handshake(format!(
            "not an NBD server (greeting magic {magic:#018x})"
        )));
    }
    match h.get_u64() {
        proto::IHAVEOPT => {}
        proto::CLISERV_MAGIC => {
            let mut rest = [0u8; 8 + 4 + 124];
            s.read_exact(&mut rest).await?;
            let mut r = &rest[..];
            let size = r.get_u64();
            let flags = r.get_u32();
            return Ok(Negotiated {
                size,
                flags: TransmissionFlags(flags as u16),
                structured_replies: false,
                meta_contexts: Vec::new(),
                block_sizes: None,
                entered_by: "oldstyle",
            });
        }
        other => {
            return Err(NbdError::Handshake(format!(
                "unknown handshake magic {other:#018x}"
            )))
        }
    }
    let mut hs = [0u8; 2];
    s.read_exact(&mut hs).await?;
    let server_flags = u16::from_be_bytes(hs);
    let fixed = server_flags & proto::FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = server_flags & proto::FLAG_NO_ZEROES != 0;
    let mut client_flags = 0u32;
    if fixed {
        client_flags |= proto::FLAG_C_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        client_flags |= proto::FLAG_C_NO_ZEROES;
    }
    s.write_all(&client_flags.to_be_bytes()).await?;

    let mut structured = false;
    let mut meta_contexts = Vec::new();
    if fixed {
        if opts.structured_replies {
            send_opt(s, opt::STRUCTURED_REPLY, &[]).await?;
            let r = read_opt_reply(s, opt::STRUCTURED_REPLY).await?;
            match r.kind {
                rep::ACK => structured = true,
                k if k & rep::ERR_BIT != 0 => {}
                k => {
                    return Err(NbdError::Handshake(format!(
                        "unexpected {} to NBD_OPT_STRUCTURED_REPLY",
                        rep::name(k)
                    )))
                }
            }
        }
        if structured && !opts.meta_contexts.is_empty() {
            let queries: Vec<&str> = opts.meta_contexts.iter().map(String::as_str).collect();
            send_opt(
                s,
                opt::SET_META_CONTEXT,
                &proto::meta_context_data(export, &queries),
            )
            .await?;
            loop {
                let r = read_opt_reply(s, opt::SET_META_CONTEXT).await?;
                match r.kind {
                    rep::META_CONTEXT if r.data.len() >= 4 => {
                        let mut d = &r.data[..];
                        let id = d.get_u32();
                        meta_contexts.push((id, String::from_utf8_lossy(d).into_owned()));
                    }
                    rep::ACK => break,
                    k if k & rep::ERR_BIT != 0 => {
                        meta_contexts.clear();
                        break;
                    }
                    k => {
                        return Err(NbdError::Handshake(format!(
                            "unexpected {} to NBD_OPT_SET_META_CONTEXT",
                            rep::name(k)
                        )))
                    }
                }
            }
        }
        let requests: &[u16] = if opts.request_block_size {
            &[info::BLOCK_SIZE]
        } else {
            &[]
        };
        send_opt(s, opt::GO, &proto::go_data(export, requests)).await?;
        let mut export_info: Option<(u64, u16)> = None;
        let mut block_sizes = None;
        loop {
            let r = read_opt_reply(s, opt::GO).await?;
            match r.kind {
                rep::INFO => {
                    if r.data.len() < 2 {
                        return Err(NbdError::Handshake("short NBD_REP_INFO".into()));
                    }
                    let mut d = &r.data[..];
                    match d.get_u16() {
                        info::EXPORT if d.len() >= 10 => {
                            export_info = Some((d.get_u64(), d.get_u16()));
                        }
                        info::BLOCK_SIZE if d.len() >= 12 => {
                            block_sizes = Some(BlockSizes {
                                minimum: d.get_u32(),
                                preferred: d.get_u32(),
                                maximum: d.get_u32(),
                            });
                        }
                        info::EXPORT | info::BLOCK_SIZE => {
                            return Err(NbdError::Handshake("short NBD_REP_INFO item".into()))
                        }
                        _ => {}
                    }
                }
                rep::ACK => {
                    let (size, flags) = export_info.ok_or_else(|| {
                        NbdError::Handshake("NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into())
                    })?;
                    return Ok(Negotiated {
                        size,
                        flags: TransmissionFlags(flags),
                        structured_replies: structured,
                        meta_contexts,
                        block_sizes,
                        entered_by: "NBD_OPT_GO",
                    });
                }
                rep::ERR_UNSUP => break,
                k if k & rep::ERR_BIT != 0 => return Err(refused(opt::GO, &r)),
                k => {
                    return Err(NbdError::Handshake(format!(
                        "unexpected {} to NBD_OPT_GO",
                        rep::name(k)
                    )))
                }
            }
        }
    }

    // NBD_OPT_EXPORT_NAME: no error reporting; the server closes on failure.
    send_opt(s, opt::EXPORT_NAME, export.as_bytes()).await?;
    let mut b = [0u8; 10];
    s.read_exact(&mut b).await.map_err(|e| {
        NbdError::Handshake(format!(
            "server closed the connection after NBD_OPT_EXPORT_NAME {export:?} (unknown export?): {e}"
        ))
    })?;
    let mut d = &b[..];
    let size = d.get_u64();
    let flags = d.get_u16();
    if !no_zeroes {
        let mut z = [0u8; 124];
        s.read_exact(&mut z).await?;
    }
    Ok(Negotiated {
        size,
        flags: TransmissionFlags(flags),
        structured_replies: structured,
        meta_contexts,
        block_sizes: None,
        entered_by: "NBD_OPT_EXPORT_NAME",
    })
}
