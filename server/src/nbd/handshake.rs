//! Fixed newstyle handshake and option haggling.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::export::{Export, ExportCatalog};
use super::proto::{self, HeaderMode, OptionHeader, OptionReply};
use super::server::NbdConfig;

/// What option haggling settled on, handed to the transmission phase.
pub(crate) struct Negotiated {
    pub name: String,
    pub export: Arc<dyn Export>,
    pub size: u64,
    pub flags: u16,
    pub mode: HeaderMode,
    /// Context id of `base:allocation` if the client selected it for this
    /// export.
    pub allocation_ctx: Option<u32>,
}

pub(crate) enum Outcome {
    Transmission(Negotiated),
    /// The client aborted (or went away) during option haggling.
    Closed,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Transmission flags for `export`, given what was negotiated.
pub(crate) fn transmission_flags(export: &dyn Export, structured: bool) -> u16 {
    let mut f = proto::FLAG_HAS_FLAGS
        | proto::FLAG_SEND_FLUSH
        | proto::FLAG_SEND_FUA
        | proto::FLAG_SEND_CACHE
        | proto::FLAG_CAN_MULTI_CONN;
    if export.read_only() {
        f |= proto::FLAG_READ_ONLY;
    } else {
        f |= proto::FLAG_SEND_TRIM | proto::FLAG_SEND_WRITE_ZEROES | proto::FLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= proto::FLAG_SEND_DF;
    }
    f
}

/// `(minimum, preferred, maximum)` block sizes advertised in
/// `NBD_INFO_BLOCK_SIZE`: minimum 1, preferred the export's block size
/// rounded to a power of two within `512..=max`, maximum the payload cap.
pub(crate) fn block_sizes(export: &dyn Export, max_payload: u32) -> (u32, u32, u32) {
    let max = max_payload.max(512);
    let pref = export.block_size().clamp(512, max).next_power_of_two();
    let pref = if pref > max {
        max.next_power_of_two() / 2
    } else {
        pref
    };
    (1, pref, max.max(pref))
}

/// Whether a LIST_META_CONTEXT query list matches `base:allocation`
/// (an empty list lists everything; `base:` is a wildcard for the namespace;
/// unknown namespaces are ignored).
pub(crate) fn list_matches_allocation(queries: &[String]) -> bool {
    queries.is_empty()
        || queries
            .iter()
            .any(|q| q == "base:" || q == proto::BASE_ALLOCATION)
}

/// Whether a SET_META_CONTEXT query list selects `base:allocation`
/// (only the exact name selects; anything else is ignored).
pub(crate) fn set_selects_allocation(queries: &[String]) -> bool {
    queries.iter().any(|q| q == proto::BASE_ALLOCATION)
}

struct State<'a> {
    catalog: &'a dyn ExportCatalog,
    cfg: &'a NbdConfig,
    peer: SocketAddr,
    mode: HeaderMode,
    no_zeroes: bool,
    /// Export name the context selection was made for, and the id given.
    meta: Option<(String, u32)>,
    next_ctx_id: u32,
    out: BytesMut,
}

impl State<'_> {
    fn reply(&mut self, opt: u32, rep: u32, data: &[u8]) {
        OptionReply::encode_with(opt, rep, data, &mut self.out);
    }

    /// The header of a reply whose `length` bytes of data the caller appends.
    fn reply_header(&mut self, option: u32, kind: u32, length: u32) {
        OptionReply {
            option,
            kind,
            length,
        }
        .encode(&mut self.out);
    }

    fn error(&mut self, opt: u32, rep: u32, msg: &str) {
        tracing::debug!(peer = %self.peer, option = proto::option_name(opt), rep = format_args!("{rep:#x}"), msg, "option refused");
        self.reply(
            opt,
            rep,
            proto::truncate_str(msg, proto::MAX_STRING).as_bytes(),
        );
    }

    fn allocation_ctx_for(&self, name: &str) -> Option<u32> {
        match &self.meta {
            Some((n, id)) if n == name => Some(*id),
            _ => None,
        }
    }
}

async fn flush_out<W: AsyncWrite + Unpin>(wr: &mut W, out: &mut BytesMut) -> io::Result<()> {
    if !out.is_empty() {
        wr.write_all(out).await?;
        out.clear();
    }
    wr.flush().await
}

/// Runs the handshake on a fresh connection. Returns once the transmission
/// phase starts, or the client leaves.
pub(crate) async fn negotiate<R, W>(
    rd: &mut R,
    wr: &mut W,
    catalog: &dyn ExportCatalog,
    cfg: &NbdConfig,
    peer: SocketAddr,
) -> Result<Outcome, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut st = State {
        catalog,
        cfg,
        peer,
        mode: HeaderMode::Simple,
        no_zeroes: false,
        meta: None,
        next_ctx_id: 1,
        out: BytesMut::with_capacity(1024),
    };
    proto::server_greeting(
        proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
        &mut st.out,
    );
    flush_out(wr, &mut st.out).await?;

    let client_flags = match rd.read_u32().await {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Outcome::Closed),
        Err(e) => return Err(e.into()),
    };
    let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(HandshakeError::Protocol(format!(
            "client flags {client_flags:#x} were not advertised"
        )));
    }
    st.no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;

    let mut hdr = [0u8; proto::OPTION_HEADER_LEN];
    loop {
        match rd.read_exact(&mut hdr).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Outcome::Closed),
            Err(e) => return Err(e.into()),
        }
        let OptionHeader {
            option: opt,
            length: len,
        } = OptionHeader::decode(&hdr)
            .map_err(|e| HandshakeError::Protocol(format!("option request: {e}")))?;

        if len > cfg.max_option_len {
            // Never allocate a client-claimed size. EXPORT_NAME cannot be
            // refused politely; others get ERR_TOO_BIG / ERR_UNSUP once the
            // payload is skipped, unless it is absurdly large.
            if opt == proto::OPT_EXPORT_NAME || len > cfg.max_option_len.saturating_mul(256) {
                return Err(HandshakeError::Protocol(format!(
                    "option {} with a {len}-byte payload",
                    proto::option_name(opt)
                )));
            }
            tracing::info!(peer = %peer, option = opt, len, "oversized option payload skipped");
            let skipped =
                tokio::io::copy(&mut (&mut *rd).take(len as u64), &mut tokio::io::sink()).await?;
            if skipped != len as u64 {
                return Ok(Outcome::Closed);
            }
            let known_opt = matches!(
                opt,
                proto::OPT_ABORT
                    | proto::OPT_LIST
                    | proto::OPT_STARTTLS
                    | proto::OPT_INFO
                    | proto::OPT_GO
                    | proto::OPT_STRUCTURED_REPLY
                    | proto::OPT_LIST_META_CONTEXT
                    | proto::OPT_SET_META_CONTEXT
                    | proto::OPT_EXTENDED_HEADERS
            );
            if opt == proto::OPT_ABORT {
                st.reply(opt, proto::REP_ACK, &[]);
                let _ = flush_out(wr, &mut st.out).await;
                return Ok(Outcome::Closed);
            }
            if opt == proto::OPT_SET_META_CONTEXT {
                st.meta = None;
            }
            let rep = if known_opt {
                proto::REP_ERR_TOO_BIG
            } else {
                proto::REP_ERR_UNSUP
            };
            st.error(opt, rep, "option payload too large");
            flush_out(wr, &mut st.out).await?;
            continue;
        }

        let mut payload = vec![0u8; len as usize];
        match rd.read_exact(&mut payload).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Outcome::Closed),
            Err(e) => return Err(e.into()),
        }

        match opt {
            proto::OPT_EXPORT_NAME => {
                let name = proto::parse_string(&payload)
                    .map_err(|e| HandshakeError::Protocol(format!("EXPORT_NAME: {e}")))?;
                let Some(export) = st.catalog.open(&name) else {
                    tracing::info!(peer = %peer, export = %name, "EXPORT_NAME for an unknown export; closing");
                    return Ok(Outcome::Closed);
                };
                let size = export.size();
                let flags = transmission_flags(&*export, st.mode.structured());
                st.out.put_u64(size);
                st.out.put_u16(flags);
                if !st.no_zeroes {
                    st.out.put_bytes(0, 124);
                }
                flush_out(wr, &mut st.out).await?;
                let allocation_ctx = st.allocation_ctx_for(&name);
                return Ok(Outcome::Transmission(Negotiated {
                    name,
                    export,
                    size,
                    flags,
                    mode: st.mode,
                    allocation_ctx,
                }));
            }
            proto::OPT_ABORT => {
                st.reply(opt, proto::REP_ACK, &[]);
                // The client may already be gone; that is fine.
                let _ = flush_out(wr, &mut st.out).await;
                return Ok(Outcome::Closed);
            }
            proto::OPT_LIST => {
                if !payload.is_empty() {
                    st.error(opt, proto::REP_ERR_INVALID, "LIST takes no data");
                } else {
                    for (name, desc) in st.catalog.list() {
                        let name = proto::truncate_str(&name, proto::MAX_STRING);
                        let desc = proto::truncate_str(&desc, proto::MAX_STRING);
                        let len = (4 + name.len() + desc.len()) as u32;
                        st.reply_header(opt, proto::REP_SERVER, len);
                        st.out.put_u32(name.len() as u32);
                        st.out.put_slice(name.as_bytes());
                        st.out.put_slice(desc.as_bytes());
                    }
                    st.reply(opt, proto::REP_ACK, &[]);
                }
            }
            proto::OPT_INFO | proto::OPT_GO => match proto::parse_info(&payload) {
                Err(e) => st.error(opt, proto::REP_ERR_INVALID, e),
                Ok(req) => match st.catalog.open(&req.name) {
                    None => {
                        let msg = format!("no export named {:?}", req.name);
                        st.error(opt, proto::REP_ERR_UNKNOWN, &msg);
                    }
                    Some(export) => {
                        let size = export.size();
                        let flags = transmission_flags(&*export, st.mode.structured());
                        st.reply_header(opt, proto::REP_INFO, 12);
                        st.out.put_u16(proto::INFO_EXPORT);
                        st.out.put_u64(size);
                        st.out.put_u16(flags);
                        if req.requests.contains(&proto::INFO_NAME) && !req.name.is_empty() {
                            st.reply_header(opt, proto::REP_INFO, 2 + req.name.len() as u32);
                            st.out.put_u16(proto::INFO_NAME);
                            st.out.put_slice(req.name.as_bytes());
                        }
                        if req.requests.contains(&proto::INFO_DESCRIPTION) {
                            let d = export.description();
                            let d = proto::truncate_str(&d, proto::MAX_STRING);
                            st.reply_header(opt, proto::REP_INFO, 2 + d.len() as u32);
                            st.out.put_u16(proto::INFO_DESCRIPTION);
                            st.out.put_slice(d.as_bytes());
                        }
                        // Always sent: clients that did not ask ignore it.
                        let (min, pref, max) = block_sizes(&*export, st.cfg.max_payload);
                        st.reply_header(opt, proto::REP_INFO, 14);
                        st.out.put_u16(proto::INFO_BLOCK_SIZE);
                        st.out.put_u32(min);
                        st.out.put_u32(pref);
                        st.out.put_u32(max);
                        st.reply(opt, proto::REP_ACK, &[]);
                        if opt == proto::OPT_GO {
                            flush_out(wr, &mut st.out).await?;
                            let allocation_ctx = st.allocation_ctx_for(&req.name);
                            return Ok(Outcome::Transmission(Negotiated {
                                name: req.name,
                                export,
                                size,
                                flags,
                                mode: st.mode,
                                allocation_ctx,
                            }));
                        }
                    }
                },
            },
            proto::OPT_STRUCTURED_REPLY => {
                if !payload.is_empty() {
                    st.error(
                        opt,
                        proto::REP_ERR_INVALID,
                        "STRUCTURED_REPLY takes no data",
                    );
                } else if !st.cfg.structured_replies {
                    st.error(opt, proto::REP_ERR_UNSUP, "structured replies are disabled");
                } else if st.mode == HeaderMode::Extended {
                    st.error(
                        opt,
                        proto::REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    );
                } else if st.mode == HeaderMode::Structured {
                    st.error(
                        opt,
                        proto::REP_ERR_INVALID,
                        "structured replies already negotiated",
                    );
                } else {
                    st.mode = HeaderMode::Structured;
                    st.reply(opt, proto::REP_ACK, &[]);
                }
            }
            proto::OPT_EXTENDED_HEADERS => {
                if !payload.is_empty() {
                    st.error(
                        opt,
                        proto::REP_ERR_INVALID,
                        "EXTENDED_HEADERS takes no data",
                    );
                } else if !st.cfg.extended_headers || !st.cfg.structured_replies {
                    st.error(opt, proto::REP_ERR_UNSUP, "extended headers are disabled");
                } else if st.mode == HeaderMode::Extended {
                    st.error(
                        opt,
                        proto::REP_ERR_INVALID,
                        "extended headers already negotiated",
                    );
                } else {
                    st.mode = HeaderMode::Extended;
                    st.reply(opt, proto::REP_ACK, &[]);
                }
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                let set = opt == proto::OPT_SET_META_CONTEXT;
                if set {
                    // A SET replaces the selection even when it fails.
                    st.meta = None;
                }
                if !st.cfg.structured_replies {
                    st.error(opt, proto::REP_ERR_UNSUP, "structured replies are disabled");
                } else if set && !st.mode.structured() {
                    st.error(
                        opt,
                        proto::REP_ERR_INVALID,
                        "negotiate structured replies first",
                    );
                } else {
                    match proto::parse_meta(&payload) {
                        Err(e) => st.error(opt, proto::REP_ERR_INVALID, e),
                        Ok(req) => {
                            if st.catalog.open(&req.name).is_none() {
                                let msg = format!("no export named {:?}", req.name);
                                st.error(opt, proto::REP_ERR_UNKNOWN, &msg);
                            } else {
                                let matched = if set {
                                    set_selects_allocation(&req.queries)
                                } else {
                                    list_matches_allocation(&req.queries)
                                };
                                if matched {
                                    let id = if set {
                                        let id = st.next_ctx_id;
                                        st.next_ctx_id = st.next_ctx_id.wrapping_add(1).max(1);
                                        st.meta = Some((req.name.clone(), id));
                                        id
                                    } else {
                                        0
                                    };
                                    let name = proto::BASE_ALLOCATION.as_bytes();
                                    let len = 4 + name.len() as u32;
                                    st.reply_header(opt, proto::REP_META_CONTEXT, len);
                                    st.out.put_u32(id);
                                    st.out.put_slice(name);
                                }
                                st.reply(opt, proto::REP_ACK, &[]);
                            }
                        }
                    }
                }
            }
            proto::OPT_STARTTLS => st.error(opt, proto::REP_ERR_UNSUP, "TLS is not supported"),
            _ => st.error(opt, proto::REP_ERR_UNSUP, "unknown option"),
        }
        flush_out(wr, &mut st.out).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::memory_export::{MemoryCatalog, MemoryExport};
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    #[test]
    fn meta_matching() {
        assert!(list_matches_allocation(&[]));
        assert!(list_matches_allocation(&["base:".into()]));
        assert!(list_matches_allocation(&[
            "x-foo:bar".into(),
            "base:allocation".into()
        ]));
        assert!(!list_matches_allocation(&["qemu:dirty-bitmap:a".into()]));
        assert!(!set_selects_allocation(&[]));
        assert!(!set_selects_allocation(&["base:".into()]));
        assert!(set_selects_allocation(&["base:allocation".into()]));
        assert!(!set_selects_allocation(&[
            "base:other".into(),
            "nocolon".into()
        ]));
    }

    #[test]
    fn block_size_advertisement_is_valid_for_libnbd() {
        for bs in [0u32, 1, 512, 1000, 4096, 65536, 1 << 20, 64 << 20, u32::MAX] {
            let e = MemoryExport::with_block_size(1 << 20, bs);
            let (min, pref, max) = block_sizes(&e, proto::MAX_PAYLOAD);
            assert!(min.is_power_of_two() && min <= 65536, "{bs}");
            assert!(
                pref.is_power_of_two() && pref >= 512 && pref >= min,
                "{bs}: {pref}"
            );
            assert!(max >= pref && max % min == 0, "{bs}: {max}");
        }
        let e = MemoryExport::with_block_size(1 << 20, 4096);
        assert_eq!(block_sizes(&e, proto::MAX_PAYLOAD), (1, 4096, 32 << 20));
    }

    struct Client {
        s: DuplexStream,
    }

    impl Client {
        async fn opt(&mut self, opt: u32, data: &[u8]) {
            let mut v = Vec::new();
            v.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
            v.extend_from_slice(&opt.to_be_bytes());
            v.extend_from_slice(&(data.len() as u32).to_be_bytes());
            v.extend_from_slice(data);
            self.s.write_all(&v).await.unwrap();
        }

        async fn reply(&mut self) -> (u32, u32, Vec<u8>) {
            assert_eq!(self.s.read_u64().await.unwrap(), proto::OPTION_REPLY_MAGIC);
            let opt = self.s.read_u32().await.unwrap();
            let rep = self.s.read_u32().await.unwrap();
            let len = self.s.read_u32().await.unwrap();
            let mut d = vec![0; len as usize];
            self.s.read_exact(&mut d).await.unwrap();
            (opt, rep, d)
        }
    }

    async fn start(
        cfg: NbdConfig,
        flags: u32,
    ) -> (
        Client,
        tokio::task::JoinHandle<Result<Outcome, HandshakeError>>,
    ) {
        let cat = MemoryCatalog::new();
        cat.add("disk", MemoryExport::new(1 << 20));
        cat.add("ro", MemoryExport::new(1 << 20).read_only(true));
        let (a, b) = duplex(1 << 20);
        let task = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(b);
            let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
            negotiate(&mut r, &mut w, &cat, &cfg, peer).await
        });
        let mut c = Client { s: a };
        assert_eq!(c.s.read_u64().await.unwrap(), proto::NBDMAGIC);
        assert_eq!(c.s.read_u64().await.unwrap(), proto::IHAVEOPT);
        assert_eq!(c.s.read_u16().await.unwrap(), 3);
        c.s.write_u32(flags).await.unwrap();
        (c, task)
    }

    #[tokio::test]
    async fn unadvertised_client_flag_drops() {
        let (_c, task) = start(NbdConfig::default(), 1 | 4).await;
        assert!(matches!(
            task.await.unwrap(),
            Err(HandshakeError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn unknown_option_then_go() {
        let (mut c, task) = start(NbdConfig::default(), 3).await;
        c.opt(0x1234, b"some ignored payload").await;
        let (opt, rep, _) = c.reply().await;
        assert_eq!((opt, rep), (0x1234, proto::REP_ERR_UNSUP));
        c.opt(proto::OPT_STARTTLS, &[]).await;
        assert_eq!(c.reply().await.1, proto::REP_ERR_UNSUP);
        // SET before STRUCTURED_REPLY is invalid.
        c.opt(
            proto::OPT_SET_META_CONTEXT,
            &proto::meta_context_data("disk", &["base:allocation"]),
        )
        .await;
        assert_eq!(c.reply().await.1, proto::REP_ERR_INVALID);
        c.opt(proto::OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(c.reply().await.1, proto::REP_ACK);
        c.opt(proto::OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(c.reply().await.1, proto::REP_ERR_INVALID);
        c.opt(
            proto::OPT_SET_META_CONTEXT,
            &proto::meta_context_data("disk", &["base:allocation", "zz:top"]),
        )
        .await;
        let (_, rep, d) = c.reply().await;
        assert_eq!(rep, proto::REP_META_CONTEXT);
        assert_ne!(u32::from_be_bytes(d[..4].try_into().unwrap()), 0);
        assert_eq!(&d[4..], b"base:allocation");
        assert_eq!(c.reply().await.1, proto::REP_ACK);
        c.opt(proto::OPT_GO, &proto::go_data("nope", &[3])).await;
        assert_eq!(c.reply().await.1, proto::REP_ERR_UNKNOWN);
        c.opt(proto::OPT_GO, &proto::go_data("disk", &[1, 2, 3]))
            .await;
        let mut seen = Vec::new();
        loop {
            let (_, rep, d) = c.reply().await;
            if rep == proto::REP_ACK {
                break;
            }
            assert_eq!(rep, proto::REP_INFO);
            let t = u16::from_be_bytes([d[0], d[1]]);
            if t == proto::INFO_EXPORT {
                assert_eq!(d.len(), 12);
                assert_eq!(u64::from_be_bytes(d[2..10].try_into().unwrap()), 1 << 20);
                let f = u16::from_be_bytes([d[10], d[11]]);
                assert_ne!(f & proto::FLAG_SEND_DF, 0);
                assert_ne!(f & proto::FLAG_CAN_MULTI_CONN, 0);
            }
            if t == proto::INFO_NAME {
                assert_eq!(&d[2..], b"disk");
            }
            seen.push(t);
        }
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3]);
        match task.await.unwrap().unwrap() {
            Outcome::Transmission(n) => {
                assert_eq!(n.mode, HeaderMode::Structured);
                assert!(n.allocation_ctx.is_some());
                assert_eq!(n.name, "disk");
            }
            Outcome::Closed => panic!("expected transmission"),
        }
    }

    #[tokio::test]
    async fn list_and_abort() {
        let (mut c, task) = start(NbdConfig::default(), 1).await;
        c.opt(proto::OPT_LIST, &[]).await;
        let mut names = Vec::new();
        loop {
            let (_, rep, d) = c.reply().await;
            if rep == proto::REP_ACK {
                break;
            }
            assert_eq!(rep, proto::REP_SERVER);
            let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
            names.push(String::from_utf8(d[4..4 + n].to_vec()).unwrap());
        }
        names.sort();
        assert_eq!(names, vec!["disk", "ro"]);
        c.opt(proto::OPT_LIST, b"x").await;
        assert_eq!(c.reply().await.1, proto::REP_ERR_INVALID);
        // LIST_META_CONTEXT with no queries lists base:allocation, id 0.
        c.opt(
            proto::OPT_LIST_META_CONTEXT,
            &proto::meta_context_data("disk", &[]),
        )
        .await;
        let (_, rep, d) = c.reply().await;
        assert_eq!(rep, proto::REP_META_CONTEXT);
        assert_eq!(&d[..4], &[0, 0, 0, 0]);
        assert_eq!(c.reply().await.1, proto::REP_ACK);
        c.opt(
            proto::OPT_LIST_META_CONTEXT,
            &proto::meta_context_data("disk", &["x-other:"]),
        )
        .await;
        assert_eq!(c.reply().await.1, proto::REP_ACK);
        c.opt(proto::OPT_ABORT, &[]).await;
        assert_eq!(c.reply().await.1, proto::REP_ACK);
        assert!(matches!(task.await.unwrap(), Ok(Outcome::Closed)));
    }

    #[tokio::test]
    async fn oversized_option_is_skipped_not_allocated() {
        let cfg = NbdConfig {
            max_option_len: 1024,
            ..NbdConfig::default()
        };
        let (mut c, task) = start(cfg, 1).await;
        c.opt(proto::OPT_LIST_META_CONTEXT, &vec![7u8; 4096]).await;
        assert_eq!(c.reply().await.1, proto::REP_ERR_TOO_BIG);
        c.opt(0x4242, &vec![7u8; 4096]).await;
        assert_eq!(c.reply().await.1, proto::REP_ERR_UNSUP);
        // A claim far past the limit disconnects without reading it.
        let mut v = Vec::new();
        v.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        v.extend_from_slice(&u32::MAX.to_be_bytes());
        c.s.write_all(&v).await.unwrap();
        assert!(matches!(
            task.await.unwrap(),
            Err(HandshakeError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn export_name_paths() {
        // No zeroes negotiated: exactly 10 bytes follow.
        let (mut c, task) = start(NbdConfig::default(), 3).await;
        c.opt(proto::OPT_EXPORT_NAME, b"ro").await;
        assert_eq!(c.s.read_u64().await.unwrap(), 1 << 20);
        let f = c.s.read_u16().await.unwrap();
        assert_ne!(f & proto::FLAG_READ_ONLY, 0);
        assert_eq!(f & proto::FLAG_SEND_DF, 0, "DF needs structured replies");
        assert!(matches!(task.await.unwrap(), Ok(Outcome::Transmission(_))));

        // Without NO_ZEROES: 124 zero bytes follow.
        let (mut c, task) = start(NbdConfig::default(), 1).await;
        c.opt(proto::OPT_EXPORT_NAME, b"disk").await;
        let mut b = [1u8; 8 + 2 + 124];
        c.s.read_exact(&mut b).await.unwrap();
        assert!(b[10..].iter().all(|&x| x == 0));
        assert!(matches!(task.await.unwrap(), Ok(Outcome::Transmission(_))));

        // Unknown export: the connection is closed.
        let (mut c, task) = start(NbdConfig::default(), 1).await;
        c.opt(proto::OPT_EXPORT_NAME, b"missing").await;
        assert!(matches!(task.await.unwrap(), Ok(Outcome::Closed)));
        let mut b = [0u8; 1];
        assert_eq!(c.s.read(&mut b).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn extended_headers_negotiation() {
        let (mut c, task) = start(NbdConfig::default(), 1).await;
        c.opt(proto::OPT_EXTENDED_HEADERS, &[]).await;
        assert_eq!(c.reply().await.1, proto::REP_ACK);
        c.opt(proto::OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(c.reply().await.1, proto::REP_ERR_EXT_HEADER_REQD);
        c.opt(proto::OPT_EXTENDED_HEADERS, &[]).await;
        assert_eq!(c.reply().await.1, proto::REP_ERR_INVALID);
        c.opt(proto::OPT_GO, &proto::go_data("disk", &[])).await;
        while c.reply().await.1 != proto::REP_ACK {}
        match task.await.unwrap().unwrap() {
            Outcome::Transmission(n) => {
                assert_eq!(n.mode, HeaderMode::Extended);
                assert!(n.allocation_ctx.is_none());
            }
            Outcome::Closed => panic!(),
        }

        let cfg = NbdConfig {
            extended_headers: false,
            ..NbdConfig::default()
        };
        let (mut c, _task) = start(cfg, 1).await;
        c.opt(proto::OPT_EXTENDED_HEADERS, &[]).await;
        assert_eq!(c.reply().await.1, proto::REP_ERR_UNSUP);
    }

    #[tokio::test]
    async fn contexts_for_another_export_are_dropped_at_go() {
        let (mut c, task) = start(NbdConfig::default(), 1).await;
        c.opt(proto::OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(c.reply().await.1, proto::REP_ACK);
        c.opt(
            proto::OPT_SET_META_CONTEXT,
            &proto::meta_context_data("ro", &["base:allocation"]),
        )
        .await;
        assert_eq!(c.reply().await.1, proto::REP_META_CONTEXT);
        assert_eq!(c.reply().await.1, proto::REP_ACK);
        c.opt(proto::OPT_GO, &proto::go_data("disk", &[])).await;
        while c.reply().await.1 != proto::REP_ACK {}
        match task.await.unwrap().unwrap() {
            Outcome::Transmission(n) => assert!(n.allocation_ctx.is_none()),
            Outcome::Closed => panic!(),
        }
    }
}
