//! Headers of the transmission phase: requests, replies and reply chunks.

use bytes::{Buf, BufMut};

use super::constants::*;

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
    /// Whether structured reply chunks may be sent.
    pub fn structured(self) -> bool {
        !matches!(self, HeaderMode::Simple)
    }

    /// Size of a request header in this mode.
    pub fn request_len(self) -> usize {
        match self {
            HeaderMode::Extended => EXTENDED_REQUEST_LEN,
            _ => REQUEST_LEN,
        }
    }
}

/// Why a header could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer bytes than the header needs.
    Incomplete,
    /// The magic is not the one this header must start with.
    BadMagic(u64),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Incomplete => f.write_str("header cut short"),
            HeaderError::BadMagic(m) => write!(f, "bad magic {m:#x}"),
        }
    }
}

impl std::error::Error for HeaderError {}

/// A transmission request header, compact or extended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`cmd_flag::*`).
    pub flags: u16,
    /// Command type (`cmd::*`).
    pub kind: u16,
    /// Handle (the spec's *cookie*) echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length; a compact header carries only the low 32 bits.
    pub length: u64,
}

impl Request {
    /// Append the 28-byte compact header to `out`.
    #[inline]
    pub fn encode(&self, out: &mut impl BufMut) {
        debug_assert!(self.length <= u32::MAX as u64, "compact request length");
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.handle);
        out.put_u64(self.offset);
        out.put_u32(self.length as u32);
    }

    /// Append the 32-byte extended header to `out`.
    pub fn encode_extended(&self, out: &mut impl BufMut) {
        out.put_u32(EXTENDED_REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.handle);
        out.put_u64(self.offset);
        out.put_u64(self.length);
    }

    /// Append the header in the shape `mode` uses.
    pub fn encode_for(&self, mode: HeaderMode, out: &mut impl BufMut) {
        match mode {
            HeaderMode::Extended => self.encode_extended(out),
            _ => self.encode(out),
        }
    }

    /// Decode a compact header from the front of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Request, HeaderError> {
        Self::decode_shape(buf, REQUEST_MAGIC, REQUEST_LEN)
    }

    /// Decode an extended header from the front of `buf`.
    pub fn decode_extended(buf: &[u8]) -> Result<Request, HeaderError> {
        Self::decode_shape(buf, EXTENDED_REQUEST_MAGIC, EXTENDED_REQUEST_LEN)
    }

    /// Decode the header shape `mode` uses; the other shape's magic is
    /// refused, as the spec forbids mixing them.
    pub fn decode_for(mode: HeaderMode, buf: &[u8]) -> Result<Request, HeaderError> {
        match mode {
            HeaderMode::Extended => Self::decode_extended(buf),
            _ => Self::decode(buf),
        }
    }

    /// The two shapes differ only in their magic and the width of the
    /// trailing length field.
    fn decode_shape(buf: &[u8], magic: u32, len: usize) -> Result<Request, HeaderError> {
        if buf.len() < len {
            return Err(HeaderError::Incomplete);
        }
        let mut b = &buf[..len];
        let found = b.get_u32();
        if found != magic {
            return Err(HeaderError::BadMagic(found as u64));
        }
        Ok(Request {
            flags: b.get_u16(),
            kind: b.get_u16(),
            handle: b.get_u64(),
            offset: b.get_u64(),
            length: if len == EXTENDED_REQUEST_LEN {
                b.get_u64()
            } else {
                b.get_u32() as u64
            },
        })
    }
}

/// A reply header: simple, or one chunk of a structured reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// Simple reply: `error` is 0 on success. A successful read's data follows.
    Simple {
        /// NBD errno, 0 on success.
        error: u32,
        /// Handle of the request.
        handle: u64,
    },
    /// One chunk of a structured reply; `length` payload bytes follow.
    Structured {
        /// `REPLY_FLAG_DONE` etc.
        flags: u16,
        /// Chunk type (`reply_type::*`).
        kind: u16,
        /// Handle of the request.
        handle: u64,
        /// Payload length.
        length: u32,
    },
    /// One chunk with an extended header (after `NBD_OPT_EXTENDED_HEADERS`,
    /// the only reply shape allowed); `length` payload bytes follow.
    Extended {
        /// `REPLY_FLAG_DONE` etc.
        flags: u16,
        /// Chunk type (`reply_type::*`).
        kind: u16,
        /// Handle of the request.
        handle: u64,
        /// The request's offset, echoed.
        offset: u64,
        /// Payload length.
        length: u64,
    },
}

/// Outcome of trying to decode a reply header from the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// A header and how many bytes it used.
    Header(ReplyHeader, usize),
    /// More bytes are needed.
    Incomplete,
    /// The magic is not one this mode allows.
    BadMagic(u32),
}

impl ReplyHeader {
    /// The chunk header `mode` uses: extended, else structured. `offset` is
    /// only carried by extended headers; a structured chunk's `length` must
    /// fit 32 bits.
    pub fn chunk(
        mode: HeaderMode,
        flags: u16,
        kind: u16,
        handle: u64,
        offset: u64,
        length: u64,
    ) -> ReplyHeader {
        match mode {
            HeaderMode::Extended => ReplyHeader::Extended {
                flags,
                kind,
                handle,
                offset,
                length,
            },
            _ => {
                debug_assert!(length <= u32::MAX as u64, "structured chunk length");
                ReplyHeader::Structured {
                    flags,
                    kind,
                    handle,
                    length: length as u32,
                }
            }
        }
    }

    /// Append the header to `out`.
    #[inline]
    pub fn encode(&self, out: &mut impl BufMut) {
        match *self {
            ReplyHeader::Simple { error, handle } => {
                out.put_u32(SIMPLE_REPLY_MAGIC);
                out.put_u32(error);
                out.put_u64(handle);
            }
            ReplyHeader::Structured {
                flags,
                kind,
                handle,
                length,
            } => {
                out.put_u32(STRUCTURED_REPLY_MAGIC);
                out.put_u16(flags);
                out.put_u16(kind);
                out.put_u64(handle);
                out.put_u32(length);
            }
            ReplyHeader::Extended {
                flags,
                kind,
                handle,
                offset,
                length,
            } => {
                out.put_u32(EXTENDED_REPLY_MAGIC);
                out.put_u16(flags);
                out.put_u16(kind);
                out.put_u64(handle);
                out.put_u64(offset);
                out.put_u64(length);
            }
        }
    }

    /// Encode a simple reply header.
    pub fn encode_simple(error: u32, handle: u64, out: &mut impl BufMut) {
        ReplyHeader::Simple { error, handle }.encode(out)
    }

    /// Encode a structured (compact) chunk header.
    pub fn encode_structured(
        flags: u16,
        kind: u16,
        handle: u64,
        length: u32,
        out: &mut impl BufMut,
    ) {
        ReplyHeader::Structured {
            flags,
            kind,
            handle,
            length,
        }
        .encode(out)
    }

    /// Decode a simple or structured header from the front of `buf` without
    /// consuming it (what a peer without extended headers accepts).
    #[inline]
    pub fn decode(buf: &[u8]) -> Decoded {
        let Some(magic) = peek_u32(buf) else {
            return Decoded::Incomplete;
        };
        match magic {
            SIMPLE_REPLY_MAGIC => {
                if buf.len() < SIMPLE_REPLY_LEN {
                    return Decoded::Incomplete;
                }
                let mut b = &buf[4..SIMPLE_REPLY_LEN];
                let error = b.get_u32();
                let handle = b.get_u64();
                Decoded::Header(ReplyHeader::Simple { error, handle }, SIMPLE_REPLY_LEN)
            }
            STRUCTURED_REPLY_MAGIC => {
                if buf.len() < STRUCTURED_REPLY_LEN {
                    return Decoded::Incomplete;
                }
                let mut b = &buf[4..STRUCTURED_REPLY_LEN];
                let flags = b.get_u16();
                let kind = b.get_u16();
                let handle = b.get_u64();
                let length = b.get_u32();
                Decoded::Header(
                    ReplyHeader::Structured {
                        flags,
                        kind,
                        handle,
                        length,
                    },
                    STRUCTURED_REPLY_LEN,
                )
            }
            other => Decoded::BadMagic(other),
        }
    }

    /// Decode an extended chunk header from the front of `buf` without
    /// consuming it (the only shape allowed once extended headers are on).
    pub fn decode_extended(buf: &[u8]) -> Decoded {
        let Some(magic) = peek_u32(buf) else {
            return Decoded::Incomplete;
        };
        if magic != EXTENDED_REPLY_MAGIC {
            return Decoded::BadMagic(magic);
        }
        if buf.len() < EXTENDED_REPLY_LEN {
            return Decoded::Incomplete;
        }
        let mut b = &buf[4..EXTENDED_REPLY_LEN];
        let h = ReplyHeader::Extended {
            flags: b.get_u16(),
            kind: b.get_u16(),
            handle: b.get_u64(),
            offset: b.get_u64(),
            length: b.get_u64(),
        };
        Decoded::Header(h, EXTENDED_REPLY_LEN)
    }

    /// Handle carried by the header.
    pub fn handle(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { handle, .. }
            | ReplyHeader::Structured { handle, .. }
            | ReplyHeader::Extended { handle, .. } => handle,
        }
    }
}

/// The big-endian `u32` at the front of `buf` (a reply's magic), if there.
fn peek_u32(buf: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(buf.get(..4)?.try_into().ok()?))
}

/// A complete error chunk (`NBD_REPLY_TYPE_ERROR`, flagged DONE): header,
/// error value, and a message cut to [`MAX_STRING`] bytes.
pub fn encode_error_chunk(
    mode: HeaderMode,
    handle: u64,
    offset: u64,
    error: u32,
    msg: &str,
    out: &mut impl BufMut,
) {
    let msg = super::truncate_str(msg, MAX_STRING);
    ReplyHeader::chunk(
        mode,
        REPLY_FLAG_DONE,
        reply_type::ERROR,
        handle,
        offset,
        6 + msg.len() as u64,
    )
    .encode(out);
    out.put_u32(error);
    out.put_u16(msg.len() as u16);
    out.put_slice(msg.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::super::errno::{EINVAL, EIO};
    use super::*;

    fn be16(b: &[u8], at: usize) -> u16 {
        u16::from_be_bytes(b[at..at + 2].try_into().unwrap())
    }
    fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn be64(b: &[u8], at: usize) -> u64 {
        u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn compact_request_layout_and_round_trip() {
        let r = Request {
            flags: cmd_flag::FUA,
            kind: cmd::WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        let mut b = Vec::new();
        r.encode(&mut b);
        assert_eq!(b.len(), REQUEST_LEN);
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0, 1, 0, 1]); // flags, type
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(be64(&b, 16), 1 << 40);
        assert_eq!(&b[24..28], &[0, 0, 0x10, 0]);
        assert_eq!(Request::decode(&b), Ok(r));
        assert_eq!(Request::decode_for(HeaderMode::Structured, &b), Ok(r));
        assert_eq!(Request::decode(&b[..27]), Err(HeaderError::Incomplete));
    }

    #[test]
    fn extended_request_layout_and_round_trip() {
        let r = Request {
            flags: cmd_flag::PAYLOAD_LEN,
            kind: cmd::TRIM,
            handle: 7,
            offset: 12345,
            length: 5 << 32,
        };
        let mut b = Vec::new();
        r.encode_for(HeaderMode::Extended, &mut b);
        assert_eq!(b.len(), EXTENDED_REQUEST_LEN);
        assert_eq!(&b[..4], &[0x21, 0xe4, 0x1c, 0x71]);
        assert_eq!(be16(&b, 4), 0x20);
        assert_eq!(be16(&b, 6), cmd::TRIM);
        assert_eq!(be64(&b, 24), 5 << 32);
        assert_eq!(Request::decode_for(HeaderMode::Extended, &b), Ok(r));
    }

    #[test]
    fn request_magic_must_match_the_mode() {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
        assert_eq!(
            Request::decode_for(HeaderMode::Simple, &b),
            Err(HeaderError::BadMagic(0xdead_beef))
        );
        // A compact header is not accepted once extended headers are on,
        // nor an extended one before.
        let r = Request {
            flags: 0,
            kind: cmd::READ,
            handle: 1,
            offset: 0,
            length: 512,
        };
        let mut c = Vec::new();
        r.encode(&mut c);
        c.put_u32(0);
        assert_eq!(
            Request::decode_for(HeaderMode::Extended, &c),
            Err(HeaderError::BadMagic(REQUEST_MAGIC as u64))
        );
        let mut e = Vec::new();
        r.encode_extended(&mut e);
        assert_eq!(
            Request::decode(&e),
            Err(HeaderError::BadMagic(EXTENDED_REQUEST_MAGIC as u64))
        );
    }

    #[test]
    fn simple_and_structured_replies() {
        let mut b = Vec::new();
        ReplyHeader::encode_simple(EINVAL, 9, &mut b);
        assert_eq!(
            b,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 9]
        );
        assert_eq!(
            ReplyHeader::decode(&b),
            Decoded::Header(
                ReplyHeader::Simple {
                    error: 22,
                    handle: 9
                },
                SIMPLE_REPLY_LEN
            )
        );
        assert_eq!(ReplyHeader::decode(&b[..15]), Decoded::Incomplete);
        assert_eq!(ReplyHeader::decode(&b[..3]), Decoded::Incomplete);

        let mut s = Vec::new();
        ReplyHeader::encode_structured(REPLY_FLAG_DONE, reply_type::OFFSET_DATA, 7, 4104, &mut s);
        assert_eq!(s.len(), STRUCTURED_REPLY_LEN);
        assert_eq!(&s[..8], &[0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1]);
        assert_eq!(be32(&s, 16), 4104);
        let h = ReplyHeader::Structured {
            flags: 1,
            kind: 1,
            handle: 7,
            length: 4104,
        };
        assert_eq!(
            ReplyHeader::decode(&s),
            Decoded::Header(h, STRUCTURED_REPLY_LEN)
        );
        // chunk() in a compact mode is the same header.
        assert_eq!(
            ReplyHeader::chunk(HeaderMode::Structured, 1, 1, 7, 99, 4104),
            h
        );
        assert_eq!(
            ReplyHeader::decode(&[1, 2, 3, 4, 5]),
            Decoded::BadMagic(0x0102_0304)
        );
    }

    #[test]
    fn extended_replies() {
        let h = ReplyHeader::chunk(HeaderMode::Extended, 0, reply_type::OFFSET_DATA, 3, 99, 520);
        let mut b = Vec::new();
        h.encode(&mut b);
        assert_eq!(b.len(), EXTENDED_REPLY_LEN);
        assert_eq!(&b[..4], &[0x6e, 0x8a, 0x27, 0x8c]);
        assert_eq!(be16(&b, 6), reply_type::OFFSET_DATA);
        assert_eq!(be64(&b, 8), 3);
        assert_eq!(be64(&b, 16), 99);
        assert_eq!(be64(&b, 24), 520);
        assert_eq!(
            ReplyHeader::decode_extended(&b),
            Decoded::Header(h, EXTENDED_REPLY_LEN)
        );
        assert_eq!(h.handle(), 3);
        assert_eq!(ReplyHeader::decode_extended(&b[..31]), Decoded::Incomplete);
        // Each decoder refuses the other's shapes.
        assert_eq!(
            ReplyHeader::decode(&b),
            Decoded::BadMagic(EXTENDED_REPLY_MAGIC)
        );
        let mut s = Vec::new();
        ReplyHeader::encode_simple(0, 1, &mut s);
        assert_eq!(
            ReplyHeader::decode_extended(&s),
            Decoded::BadMagic(SIMPLE_REPLY_MAGIC)
        );
    }

    #[test]
    fn error_chunk_layout() {
        let mut b = Vec::new();
        encode_error_chunk(HeaderMode::Structured, 5, 0, EIO, "boom", &mut b);
        assert_eq!(be16(&b, 4), REPLY_FLAG_DONE);
        assert_eq!(be16(&b, 6), reply_type::ERROR);
        assert_eq!(be32(&b, 16), 6 + 4);
        assert_eq!(be32(&b, 20), EIO);
        assert_eq!(be16(&b, 24), 4);
        assert_eq!(&b[26..], b"boom");

        let mut e = Vec::new();
        let long = "x".repeat(MAX_STRING + 10);
        encode_error_chunk(HeaderMode::Extended, 5, 77, EIO, &long, &mut e);
        assert_eq!(be64(&e, 16), 77);
        assert_eq!(be64(&e, 24), 6 + MAX_STRING as u64);
        assert_eq!(e.len(), EXTENDED_REPLY_LEN + 6 + MAX_STRING);
    }
}
