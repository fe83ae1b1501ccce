//! Magics, sizes, flags and codes of the NBD protocol.

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, the newstyle magic, also prefixed to every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The oldstyle magic that follows `NBDMAGIC` (oldstyle servers only).
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of an option reply during fixed newstyle negotiation.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended (64-bit) transmission request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Size of an option request header (`IHAVEOPT`, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header (magic, option, reply type, length).
pub const OPTION_REPLY_LEN: usize = 20;
/// Size of a compact transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an extended transmission request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Size of an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;

/// Largest READ/WRITE payload every peer must accept (2^25: the spec says a
/// request this large must never be treated as abuse, and it is the limit a
/// client assumes when the server states none).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Longest string (export name, description, error message) on the wire.
pub const MAX_STRING: usize = 4096;

/// Handshake flag (server, 16 bits): fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag (server): may omit the 124 zero bytes after
/// `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag (32 bits): fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: asks the server to omit the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option codes.
pub mod opt {
    /// Enter transmission with the named export (no error reporting).
    pub const EXPORT_NAME: u32 = 1;
    /// Abort negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Query an export.
    pub const INFO: u32 = 6;
    /// Query an export and enter transmission.
    pub const GO: u32 = 7;
    /// Negotiate structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Negotiate 64-bit extended headers.
    pub const EXTENDED_HEADERS: u32 = 11;

    /// The spec's name of an option code, e.g. `NBD_OPT_GO`.
    pub fn name(code: u32) -> &'static str {
        match code {
            EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
            ABORT => "NBD_OPT_ABORT",
            LIST => "NBD_OPT_LIST",
            STARTTLS => "NBD_OPT_STARTTLS",
            INFO => "NBD_OPT_INFO",
            GO => "NBD_OPT_GO",
            STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
            LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
            SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
            EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
            _ => "unknown option",
        }
    }
}

/// Option reply types.
pub mod rep {
    /// Option accepted / list finished.
    pub const ACK: u32 = 1;
    /// One export of `NBD_OPT_LIST`.
    pub const SERVER: u32 = 2;
    /// Information item of `NBD_OPT_INFO`/`NBD_OPT_GO`.
    pub const INFO: u32 = 3;
    /// A selected metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Bit set on every error reply.
    pub const ERR_BIT: u32 = 1 << 31;
    /// Option unknown to the server.
    pub const ERR_UNSUP: u32 = ERR_BIT | 1;
    /// Forbidden by server policy.
    pub const ERR_POLICY: u32 = ERR_BIT | 2;
    /// Syntactically invalid.
    pub const ERR_INVALID: u32 = ERR_BIT | 3;
    /// Not supported on the server's platform.
    pub const ERR_PLATFORM: u32 = ERR_BIT | 4;
    /// TLS required first.
    pub const ERR_TLS_REQD: u32 = ERR_BIT | 5;
    /// Unknown export.
    pub const ERR_UNKNOWN: u32 = ERR_BIT | 6;
    /// Server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR_BIT | 7;
    /// Client must ask for block size constraints.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT | 8;
    /// Request too big.
    pub const ERR_TOO_BIG: u32 = ERR_BIT | 9;
    /// Extended headers required.
    pub const ERR_EXT_HEADER_REQD: u32 = ERR_BIT | 10;

    /// The spec's name of an option reply type, e.g. `NBD_REP_ERR_UNKNOWN`.
    pub fn name(code: u32) -> &'static str {
        match code {
            ACK => "NBD_REP_ACK",
            SERVER => "NBD_REP_SERVER",
            INFO => "NBD_REP_INFO",
            META_CONTEXT => "NBD_REP_META_CONTEXT",
            ERR_UNSUP => "NBD_REP_ERR_UNSUP",
            ERR_POLICY => "NBD_REP_ERR_POLICY",
            ERR_INVALID => "NBD_REP_ERR_INVALID",
            ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
            ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
            ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
            ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
            ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
            ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
            ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
            c if c & ERR_BIT != 0 => "unknown NBD_REP_ERR",
            _ => "unknown NBD_REP",
        }
    }
}

/// Information types of `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags (mandatory).
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Soft disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim (discard).
    pub const TRIM: u16 = 4;
    /// Cache (prefetch).
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
    /// Resize.
    pub const RESIZE: u16 = 8;

    /// The spec's name of a command, e.g. `NBD_CMD_READ`.
    pub fn name(code: u16) -> &'static str {
        match code {
            READ => "NBD_CMD_READ",
            WRITE => "NBD_CMD_WRITE",
            DISC => "NBD_CMD_DISC",
            FLUSH => "NBD_CMD_FLUSH",
            TRIM => "NBD_CMD_TRIM",
            CACHE => "NBD_CMD_CACHE",
            WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
            BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
            RESIZE => "NBD_CMD_RESIZE",
            _ => "unknown NBD_CMD",
        }
    }
}

/// Command flags.
pub mod cmd_flag {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// WRITE_ZEROES must allocate (not punch a hole).
    pub const NO_HOLE: u16 = 1 << 1;
    /// Don't fragment a structured read reply.
    pub const DF: u16 = 1 << 2;
    /// BLOCK_STATUS: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// WRITE_ZEROES: fail fast if not faster than a write.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Extended headers: the length field is a payload length.
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk types.
pub mod reply_type {
    /// Final chunk without payload.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Zeroes at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors (32-bit lengths).
    pub const BLOCK_STATUS: u16 = 5;
    /// Block status descriptors (64-bit, extended headers only).
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// Bit set on every error chunk type.
    pub const ERROR_BIT: u16 = 1 << 15;
    /// Error without offset.
    pub const ERROR: u16 = ERROR_BIT | 1;
    /// Error at an offset.
    pub const ERROR_OFFSET: u16 = ERROR_BIT | 2;
}

/// Structured reply flag: last chunk of this reply.
pub const REPLY_FLAG_DONE: u16 = 1;

/// The metadata context of allocation status.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` state: the extent is a hole.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` state: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 2;

/// Transmission flags of an export, as the server advertises them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TransmissionFlags(pub u16);

impl TransmissionFlags {
    /// `NBD_FLAG_HAS_FLAGS`.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_ROTATIONAL`.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_FLAG_SEND_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_SEND_DF`.
    pub const SEND_DF: u16 = 1 << 7;
    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_FLAG_SEND_RESIZE`.
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// `NBD_FLAG_SEND_CACHE`.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_FLAG_SEND_FAST_ZERO`.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;

    /// Raw bits.
    pub fn bits(self) -> u16 {
        self.0
    }
    /// Whether all of `mask` is set.
    pub fn contains(self, mask: u16) -> bool {
        self.0 & mask == mask
    }
    /// The export refuses writes.
    pub fn read_only(self) -> bool {
        self.contains(Self::READ_ONLY)
    }
    /// `NBD_CMD_FLUSH` is supported.
    pub fn can_flush(self) -> bool {
        self.contains(Self::SEND_FLUSH)
    }
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub fn can_fua(self) -> bool {
        self.contains(Self::SEND_FUA)
    }
    /// `NBD_CMD_TRIM` is supported.
    pub fn can_trim(self) -> bool {
        self.contains(Self::SEND_TRIM)
    }
    /// `NBD_CMD_WRITE_ZEROES` is supported.
    pub fn can_write_zeroes(self) -> bool {
        self.contains(Self::SEND_WRITE_ZEROES)
    }
    /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub fn can_fast_zero(self) -> bool {
        self.contains(Self::SEND_FAST_ZERO)
    }
    /// `NBD_CMD_FLAG_DF` is supported.
    pub fn can_df(self) -> bool {
        self.contains(Self::SEND_DF)
    }
    /// Several connections to the export see one consistent cache.
    pub fn can_multi_conn(self) -> bool {
        self.contains(Self::CAN_MULTI_CONN)
    }
    /// `NBD_CMD_CACHE` is advertised.
    pub fn can_cache(self) -> bool {
        self.contains(Self::SEND_CACHE)
    }
    /// The medium is rotational.
    pub fn rotational(self) -> bool {
        self.contains(Self::ROTATIONAL)
    }
}

impl std::fmt::Display for TransmissionFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const NAMES: [(u16, &str); 12] = [
            (TransmissionFlags::HAS_FLAGS, "HAS_FLAGS"),
            (TransmissionFlags::READ_ONLY, "READ_ONLY"),
            (TransmissionFlags::SEND_FLUSH, "SEND_FLUSH"),
            (TransmissionFlags::SEND_FUA, "SEND_FUA"),
            (TransmissionFlags::ROTATIONAL, "ROTATIONAL"),
            (TransmissionFlags::SEND_TRIM, "SEND_TRIM"),
            (TransmissionFlags::SEND_WRITE_ZEROES, "SEND_WRITE_ZEROES"),
            (TransmissionFlags::SEND_DF, "SEND_DF"),
            (TransmissionFlags::CAN_MULTI_CONN, "CAN_MULTI_CONN"),
            (TransmissionFlags::SEND_RESIZE, "SEND_RESIZE"),
            (TransmissionFlags::SEND_CACHE, "SEND_CACHE"),
            (TransmissionFlags::SEND_FAST_ZERO, "SEND_FAST_ZERO"),
        ];
        write!(f, "{:#06x}", self.0)?;
        let mut sep = " (";
        for (bit, name) in NAMES {
            if self.0 & bit != 0 {
                write!(f, "{sep}{name}")?;
                sep = "|";
            }
        }
        if sep != " (" {
            f.write_str(")")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_display() {
        let f = TransmissionFlags(1 | 4 | 256);
        assert_eq!(
            f.to_string(),
            "0x0105 (HAS_FLAGS|SEND_FLUSH|CAN_MULTI_CONN)"
        );
        assert!(f.can_flush() && f.can_multi_conn() && !f.read_only());
        assert_eq!(TransmissionFlags(0).to_string(), "0x0000");
    }

    #[test]
    fn codes_match_the_spec() {
        // The values of doc/proto.md, spelled out independently of the
        // shifts and ORs above.
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(rep::ERR_UNSUP, 0x8000_0001);
        assert_eq!(rep::ERR_EXT_HEADER_REQD, 0x8000_000a);
        assert_eq!(reply_type::ERROR, 32769);
        assert_eq!(reply_type::ERROR_OFFSET, 32770);
        assert_eq!(TransmissionFlags::SEND_FAST_ZERO, 0x0800);
        assert_eq!(cmd_flag::PAYLOAD_LEN, 0x20);
        assert_eq!(rep::name(0x8000_0042), "unknown NBD_REP_ERR");
        assert_eq!(opt::name(opt::GO), "NBD_OPT_GO");
        assert_eq!(cmd::name(99), "unknown NBD_CMD");
    }
}
