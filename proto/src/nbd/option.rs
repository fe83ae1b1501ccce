//! The handshake: greeting, option requests and replies, and the payloads of
//! the options both ends build or parse.

use bytes::{Buf, BufMut};

use super::constants::*;
use super::header::HeaderError;

/// The greeting of a fixed newstyle server: `NBDMAGIC`, `IHAVEOPT` and the
/// handshake flags.
pub fn server_greeting(flags: u16, out: &mut impl BufMut) {
    out.put_u64(NBDMAGIC);
    out.put_u64(IHAVEOPT);
    out.put_u16(flags);
}

/// The header of an option request; `length` bytes of data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code (`opt::*`).
    pub option: u32,
    /// Length of the option data.
    pub length: u32,
}

impl OptionHeader {
    /// Append the 16-byte header to `out`.
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u64(IHAVEOPT);
        out.put_u32(self.option);
        out.put_u32(self.length);
    }

    /// Decode the header from the front of `buf`.
    pub fn decode(buf: &[u8]) -> Result<OptionHeader, HeaderError> {
        let mut b = buf
            .get(..OPTION_HEADER_LEN)
            .ok_or(HeaderError::Incomplete)?;
        let magic = b.get_u64();
        if magic != IHAVEOPT {
            return Err(HeaderError::BadMagic(magic));
        }
        Ok(OptionHeader {
            option: b.get_u32(),
            length: b.get_u32(),
        })
    }
}

/// Encode an option request header plus its data.
pub fn encode_option(option: u32, data: &[u8], out: &mut impl BufMut) {
    OptionHeader {
        option,
        length: data.len() as u32,
    }
    .encode(out);
    out.put_slice(data);
}

/// The header of an option reply; `length` bytes of data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReply {
    /// The option answered (`opt::*`).
    pub option: u32,
    /// Reply type (`rep::*`).
    pub kind: u32,
    /// Length of the reply data.
    pub length: u32,
}

impl OptionReply {
    /// Append the 20-byte header to `out`.
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u64(OPT_REPLY_MAGIC);
        out.put_u32(self.option);
        out.put_u32(self.kind);
        out.put_u32(self.length);
    }

    /// Append the header and its data to `out`.
    pub fn encode_with(option: u32, kind: u32, data: &[u8], out: &mut impl BufMut) {
        OptionReply {
            option,
            kind,
            length: data.len() as u32,
        }
        .encode(out);
        out.put_slice(data);
    }

    /// Decode the header from the front of `buf`.
    pub fn decode(buf: &[u8]) -> Result<OptionReply, HeaderError> {
        let mut b = buf.get(..OPTION_REPLY_LEN).ok_or(HeaderError::Incomplete)?;
        let magic = b.get_u64();
        if magic != OPT_REPLY_MAGIC {
            return Err(HeaderError::BadMagic(magic));
        }
        Ok(OptionReply {
            option: b.get_u32(),
            kind: b.get_u32(),
            length: b.get_u32(),
        })
    }
}

/// A string as the spec allows it on the wire: at most [`MAX_STRING`]
/// bytes of UTF-8 without NUL.
pub fn parse_string(b: &[u8]) -> Result<String, &'static str> {
    if b.len() > MAX_STRING {
        return Err("string longer than 4096 bytes");
    }
    if b.contains(&0) {
        return Err("string contains NUL");
    }
    String::from_utf8(b.to_vec()).map_err(|_| "string is not UTF-8")
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

/// Data of `NBD_OPT_GO` / `NBD_OPT_INFO`: the export name and the
/// information types asked for.
pub fn go_data(export: &str, info_requests: &[u16]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + export.len() + 2 + 2 * info_requests.len());
    put_string(export, &mut v);
    v.put_u16(info_requests.len() as u16);
    for r in info_requests {
        v.put_u16(*r);
    }
    v
}

/// Parsed `NBD_OPT_INFO` / `NBD_OPT_GO` data (see [`go_data`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name.
    pub name: String,
    /// Information types asked for (`info::*`).
    pub requests: Vec<u16>,
}

/// Parses `NBD_OPT_INFO` / `NBD_OPT_GO` data, refusing anything but an exact
/// fit: the client's lengths are checked before anything is allocated.
pub fn parse_info(payload: &[u8]) -> Result<InfoRequest, &'static str> {
    let mut b = payload;
    let name = take_name(&mut b)?;
    let count = take_u16(&mut b).ok_or("missing information request count")? as usize;
    if b.len() != count * 2 {
        return Err("information request count does not match the payload");
    }
    let requests = b.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]));
    Ok(InfoRequest {
        name,
        requests: requests.collect(),
    })
}

/// Data of `NBD_OPT_SET_META_CONTEXT` / `NBD_OPT_LIST_META_CONTEXT`: the
/// export name and the context queries.
pub fn meta_context_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    put_string(export, &mut v);
    v.put_u32(queries.len() as u32);
    for q in queries {
        put_string(q, &mut v);
    }
    v
}

/// Parsed metadata context option data (see [`meta_context_data`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// Export name.
    pub name: String,
    /// Context queries, e.g. `base:allocation` or `base:`.
    pub queries: Vec<String>,
}

/// Parses metadata context option data, refusing anything but an exact fit.
pub fn parse_meta(payload: &[u8]) -> Result<MetaRequest, &'static str> {
    let mut b = payload;
    let name = take_name(&mut b)?;
    let count = take_u32(&mut b).ok_or("missing query count")? as usize;
    // Every query needs at least its 4-byte length: bound before allocating.
    if count > b.len() / 4 {
        return Err("query count runs past the payload");
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let n = take_u32(&mut b).ok_or("query length runs past the payload")? as usize;
        let q = take_bytes(&mut b, n).ok_or("query runs past the payload")?;
        queries.push(parse_string(q)?);
    }
    if !b.is_empty() {
        return Err("trailing bytes after the queries");
    }
    Ok(MetaRequest { name, queries })
}

/// A string with its 32-bit length in front, as option data carries names.
fn put_string(s: &str, out: &mut impl BufMut) {
    out.put_u32(s.len() as u32);
    out.put_slice(s.as_bytes());
}

/// The export name at the front of option data (see [`put_string`]).
fn take_name(b: &mut &[u8]) -> Result<String, &'static str> {
    let n = take_u32(b).ok_or("payload shorter than a name length")? as usize;
    parse_string(take_bytes(b, n).ok_or("name length runs past the payload")?)
}

fn take_u32(b: &mut &[u8]) -> Option<u32> {
    let v = b.get(..4)?;
    let v = u32::from_be_bytes(v.try_into().ok()?);
    *b = &b[4..];
    Some(v)
}

fn take_u16(b: &mut &[u8]) -> Option<u16> {
    let v = b.get(..2)?;
    let v = u16::from_be_bytes([v[0], v[1]]);
    *b = &b[2..];
    Some(v)
}

fn take_bytes<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Some(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_layout() {
        let mut b = Vec::new();
        server_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, &mut b);
        assert_eq!(&b[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(&b[16..], &[0, 3]);
    }

    #[test]
    fn option_request_layout_and_round_trip() {
        let mut b = Vec::new();
        encode_option(opt::GO, &go_data("ex", &[info::BLOCK_SIZE]), &mut b);
        assert_eq!(
            b,
            [
                0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0, 0, 0, 7, 0, 0, 0, 10, 0, 0, 0,
                2, b'e', b'x', 0, 1, 0, 3
            ]
        );
        let h = OptionHeader::decode(&b).unwrap();
        assert_eq!(
            h,
            OptionHeader {
                option: opt::GO,
                length: 10
            }
        );
        assert_eq!(
            parse_info(&b[OPTION_HEADER_LEN..]).unwrap(),
            InfoRequest {
                name: "ex".into(),
                requests: vec![info::BLOCK_SIZE]
            }
        );
        assert_eq!(OptionHeader::decode(&b[..15]), Err(HeaderError::Incomplete));
        b[0] = 0;
        assert_eq!(
            OptionHeader::decode(&b),
            Err(HeaderError::BadMagic(IHAVEOPT & !(0xff << 56)))
        );
    }

    #[test]
    fn option_reply_layout_and_round_trip() {
        let mut b = Vec::new();
        OptionReply::encode_with(opt::GO, rep::ERR_UNKNOWN, b"no", &mut b);
        assert_eq!(b.len(), OPTION_REPLY_LEN + 2);
        assert_eq!(&b[..8], &[0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);
        assert_eq!(&b[8..20], &[0, 0, 0, 7, 0x80, 0, 0, 6, 0, 0, 0, 2]);
        assert_eq!(
            OptionReply::decode(&b),
            Ok(OptionReply {
                option: opt::GO,
                kind: rep::ERR_UNKNOWN,
                length: 2
            })
        );
        assert_eq!(OptionReply::decode(&b[..19]), Err(HeaderError::Incomplete));
        assert_eq!(
            OptionReply::decode(&[0u8; 20]),
            Err(HeaderError::BadMagic(0))
        );
    }

    #[test]
    fn info_parsing() {
        let p = go_data("disk", &[3, 1]);
        assert_eq!(
            parse_info(&p).unwrap(),
            InfoRequest {
                name: "disk".into(),
                requests: vec![3, 1]
            }
        );
        assert_eq!(parse_info(&go_data("", &[])).unwrap().name, "");
        // Truncated: no count.
        assert!(parse_info(&p[..8]).is_err());
        // Name length past the end.
        let mut bad = p.clone();
        bad[..4].copy_from_slice(&1000u32.to_be_bytes());
        assert!(parse_info(&bad).is_err());
        // Count says 3, only 2 present.
        let mut bad = p.clone();
        bad[8..10].copy_from_slice(&3u16.to_be_bytes());
        assert!(parse_info(&bad).is_err());
        // Trailing garbage.
        let mut bad = p.clone();
        bad.push(0);
        assert!(parse_info(&bad).is_err());
        // Empty payload and a u32::MAX name length.
        assert!(parse_info(&[]).is_err());
        assert!(parse_info(&[0xff, 0xff, 0xff, 0xff, 0, 0]).is_err());
        // NUL and non-UTF-8 names.
        assert!(parse_info(&go_data("a\0b", &[])).is_err());
        let mut bad = go_data("ab", &[]);
        bad[4..6].copy_from_slice(&[0xff, 0xfe]);
        assert!(parse_info(&bad).is_err());
    }

    #[test]
    fn meta_layout_and_parsing() {
        let m = meta_context_data("", &[BASE_ALLOCATION]);
        assert_eq!(&m[..8], &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(&m[8..12], &[0, 0, 0, 15]);
        assert_eq!(&m[12..], b"base:allocation");

        let p = meta_context_data("disk", &["base:allocation", "qemu:dirty-bitmap:x"]);
        let r = parse_meta(&p).unwrap();
        assert_eq!(r.name, "disk");
        assert_eq!(r.queries, ["base:allocation", "qemu:dirty-bitmap:x"]);
        assert_eq!(
            parse_meta(&meta_context_data("", &[]))
                .unwrap()
                .queries
                .len(),
            0
        );
        // A huge query count with no data must not allocate or succeed.
        let mut bad = meta_context_data("d", &[]);
        let at = bad.len() - 4;
        bad[at..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta(&bad).is_err());
        // Query length past the end.
        let mut bad = meta_context_data("d", &["base:allocation"]);
        let at = 4 + 1 + 4;
        bad[at..at + 4].copy_from_slice(&100u32.to_be_bytes());
        assert!(parse_meta(&bad).is_err());
        // Trailing bytes.
        let mut bad = p.clone();
        bad.push(1);
        assert!(parse_meta(&bad).is_err());
    }

    #[test]
    fn strings() {
        let s = "ééé"; // 2 bytes each
        assert_eq!(truncate_str(s, 3), "é");
        assert_eq!(truncate_str(s, 10), s);
        assert!(parse_string(&[b'a'; MAX_STRING]).is_ok());
        assert!(parse_string(&[b'a'; MAX_STRING + 1]).is_err());
    }
}
