//! NBD wire constants and the fixed-size headers of the protocol
//! (see doc/proto.md of the NetworkBlockDevice project).
//!
//! Everything here is pure encoding/decoding: no I/O, no allocation beyond
//! what the caller's buffer needs.

use bytes::{BufMut, BytesMut};

// ---- Handshake magics ----
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

// ---- Handshake flags (server → client, u16) ----
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

// ---- Client flags (client → server, u32) ----
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---- Transmission flags (u16) ----
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- Options ----
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---- Option replies ----
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_PLATFORM: u32 = 0x8000_0004;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = 0x8000_0008;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
pub const REP_ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;

// ---- NBD_REP_INFO types ----
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- Transmission magics ----
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---- Commands ----
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// ---- Command flags ----
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---- Structured reply flags and types ----
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// ---- base:allocation status bits ----
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

pub const BASE_ALLOCATION: &str = "base:allocation";

// ---- Error values ----
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest READ/WRITE payload the server accepts (2^25, the size the spec
/// says must never be treated as abuse).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Longest string (export name, description, error message) on the wire.
pub const MAX_STRING: usize = 4096;

/// Size of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Size of an extended reply header.
pub const EXTENDED_REPLY_LEN: usize = 32;

/// Which header shapes the transmission phase uses, fixed at the end of the
/// handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderMode {
    /// Compact requests, simple replies only.
    Simple,
    /// Compact requests, structured replies negotiated.
    Structured,
    /// Extended (64-bit) requests and replies; implies structured replies.
    Extended,
}

impl HeaderMode {
    pub fn structured(self) -> bool {
        !matches!(self, HeaderMode::Simple)
    }

    pub fn request_len(self) -> usize {
        match self {
            HeaderMode::Extended => EXTENDED_REQUEST_LEN,
            _ => REQUEST_LEN,
        }
    }
}

/// A decoded transmission request header (compact or extended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u64,
}

/// Why a request header could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    BadMagic(u32),
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Request {
    /// Decodes a header of exactly `mode.request_len()` bytes.
    pub fn decode(mode: HeaderMode, b: &[u8]) -> Result<Request, HeaderError> {
        debug_assert_eq!(b.len(), mode.request_len());
        let magic = be32(b, 0);
        let flags = be16(b, 4);
        let typ = be16(b, 6);
        let cookie = be64(b, 8);
        let offset = be64(b, 16);
        match mode {
            HeaderMode::Extended => {
                if magic != EXTENDED_REQUEST_MAGIC {
                    return Err(HeaderError::BadMagic(magic));
                }
                Ok(Request {
                    flags,
                    typ,
                    cookie,
                    offset,
                    len: be64(b, 24),
                })
            }
            _ => {
                if magic != REQUEST_MAGIC {
                    return Err(HeaderError::BadMagic(magic));
                }
                Ok(Request {
                    flags,
                    typ,
                    cookie,
                    offset,
                    len: be32(b, 24) as u64,
                })
            }
        }
    }

    /// Encodes the header (used by tests and tools; the server only decodes).
    pub fn encode(&self, mode: HeaderMode, out: &mut BytesMut) {
        match mode {
            HeaderMode::Extended => {
                out.put_u32(EXTENDED_REQUEST_MAGIC);
                out.put_u16(self.flags);
                out.put_u16(self.typ);
                out.put_u64(self.cookie);
                out.put_u64(self.offset);
                out.put_u64(self.len);
            }
            _ => {
                out.put_u32(REQUEST_MAGIC);
                out.put_u16(self.flags);
                out.put_u16(self.typ);
                out.put_u64(self.cookie);
                out.put_u64(self.offset);
                out.put_u32(self.len as u32);
            }
        }
    }
}

/// Human name of a command, for logs.
pub fn command_name(typ: u16) -> &'static str {
    match typ {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown",
    }
}

/// Human name of an option, for logs.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "EXPORT_NAME",
        OPT_ABORT => "ABORT",
        OPT_LIST => "LIST",
        OPT_STARTTLS => "STARTTLS",
        OPT_INFO => "INFO",
        OPT_GO => "GO",
        OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "EXTENDED_HEADERS",
        _ => "unknown",
    }
}

/// Simple reply header: magic, error, cookie.
pub fn put_simple_reply(out: &mut BytesMut, error: u32, cookie: u64) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// Structured (compact) or extended chunk header. `offset` is only sent in
/// extended headers (the request's offset, per the extension).
pub fn put_chunk_header(
    out: &mut BytesMut,
    mode: HeaderMode,
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    payload_len: u64,
) {
    match mode {
        HeaderMode::Extended => {
            out.put_u32(EXTENDED_REPLY_MAGIC);
            out.put_u16(flags);
            out.put_u16(typ);
            out.put_u64(cookie);
            out.put_u64(offset);
            out.put_u64(payload_len);
        }
        _ => {
            debug_assert!(payload_len <= u32::MAX as u64);
            out.put_u32(STRUCTURED_REPLY_MAGIC);
            out.put_u16(flags);
            out.put_u16(typ);
            out.put_u64(cookie);
            out.put_u32(payload_len as u32);
        }
    }
}

/// A complete error chunk (NBD_REPLY_TYPE_ERROR) flagged DONE.
pub fn put_error_chunk(
    out: &mut BytesMut,
    mode: HeaderMode,
    cookie: u64,
    offset: u64,
    error: u32,
    msg: &str,
) {
    let msg = truncate_str(msg, MAX_STRING);
    put_chunk_header(
        out,
        mode,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        offset,
        6 + msg.len() as u64,
    );
    out.put_u32(error);
    out.put_u16(msg.len() as u16);
    out.put_slice(msg.as_bytes());
}

/// Option reply header (fixed newstyle).
pub fn put_option_reply(out: &mut BytesMut, option: u32, reply: u32, len: u32) {
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(len);
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char
/// boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_request_roundtrip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            typ: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        let mut b = BytesMut::new();
        r.encode(HeaderMode::Structured, &mut b);
        assert_eq!(b.len(), REQUEST_LEN);
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..6], &[0, 1]); // flags
        assert_eq!(&b[6..8], &[0, 1]); // type
        assert_eq!(&b[24..28], &[0, 0, 0x10, 0]);
        assert_eq!(Request::decode(HeaderMode::Simple, &b).unwrap(), r);
    }

    #[test]
    fn extended_request_roundtrip() {
        let r = Request {
            flags: 0,
            typ: CMD_TRIM,
            cookie: 7,
            offset: 12345,
            len: 5 << 32,
        };
        let mut b = BytesMut::new();
        r.encode(HeaderMode::Extended, &mut b);
        assert_eq!(b.len(), EXTENDED_REQUEST_LEN);
        assert_eq!(&b[..4], &[0x21, 0xe4, 0x1c, 0x71]);
        assert_eq!(Request::decode(HeaderMode::Extended, &b).unwrap(), r);
    }

    #[test]
    fn bad_magic_is_rejected() {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
        assert_eq!(
            Request::decode(HeaderMode::Simple, &b),
            Err(HeaderError::BadMagic(0xdead_beef))
        );
        // A compact header is not accepted once extended headers are on.
        let r = Request {
            flags: 0,
            typ: CMD_READ,
            cookie: 1,
            offset: 0,
            len: 512,
        };
        let mut c = BytesMut::new();
        r.encode(HeaderMode::Simple, &mut c);
        c.put_u32(0);
        assert_eq!(
            Request::decode(HeaderMode::Extended, &c),
            Err(HeaderError::BadMagic(REQUEST_MAGIC))
        );
    }

    #[test]
    fn reply_headers_layout() {
        let mut b = BytesMut::new();
        put_simple_reply(&mut b, EINVAL, 9);
        assert_eq!(
            &b[..],
            &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 9]
        );

        let mut b = BytesMut::new();
        put_chunk_header(
            &mut b,
            HeaderMode::Structured,
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            3,
            99,
            0,
        );
        assert_eq!(b.len(), STRUCTURED_REPLY_LEN);
        assert_eq!(&b[..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(&b[4..8], &[0, 1, 0, 0]);

        let mut b = BytesMut::new();
        put_chunk_header(
            &mut b,
            HeaderMode::Extended,
            0,
            REPLY_TYPE_OFFSET_DATA,
            3,
            99,
            8 + 512,
        );
        assert_eq!(b.len(), EXTENDED_REPLY_LEN);
        assert_eq!(&b[..4], &[0x6e, 0x8a, 0x27, 0x8c]);
        assert_eq!(be64(&b, 16), 99);
        assert_eq!(be64(&b, 24), 520);
    }

    #[test]
    fn error_chunk_layout() {
        let mut b = BytesMut::new();
        put_error_chunk(&mut b, HeaderMode::Structured, 5, 0, EIO, "boom");
        assert_eq!(be16(&b, 4), REPLY_FLAG_DONE);
        assert_eq!(be16(&b, 6), REPLY_TYPE_ERROR);
        assert_eq!(be32(&b, 16), 6 + 4);
        assert_eq!(be32(&b, 20), EIO);
        assert_eq!(be16(&b, 24), 4);
        assert_eq!(&b[26..], b"boom");
    }

    #[test]
    fn option_reply_layout() {
        let mut b = BytesMut::new();
        put_option_reply(&mut b, OPT_GO, REP_ERR_UNKNOWN, 0);
        assert_eq!(b.len(), 20);
        assert_eq!(be64(&b, 0), OPTION_REPLY_MAGIC);
        assert_eq!(be32(&b, 8), OPT_GO);
        assert_eq!(be32(&b, 12), 0x8000_0006);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let s = "ééé"; // 2 bytes each
        assert_eq!(truncate_str(s, 3), "é");
        assert_eq!(truncate_str(s, 10), s);
    }
}
