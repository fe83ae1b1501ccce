//! The NBD wire protocol: [`ballast_proto::nbd`], the one codec the server
//! shares with the `ballast` client, re-exported whole.
//!
//! On top of it, the flat `FLAG_*`/`OPT_*`/`REP_*`/`CMD_*`/... spellings the
//! server's code and integration tests were written with, as aliases of the
//! shared constants (no value is defined here).

pub use ballast_proto::nbd::*;

pub use ballast_proto::nbd::cmd::{
    BLOCK_STATUS as CMD_BLOCK_STATUS, CACHE as CMD_CACHE, DISC as CMD_DISC, FLUSH as CMD_FLUSH,
    READ as CMD_READ, TRIM as CMD_TRIM, WRITE as CMD_WRITE, WRITE_ZEROES as CMD_WRITE_ZEROES,
};
pub use ballast_proto::nbd::cmd_flag::{
    DF as CMD_FLAG_DF, FAST_ZERO as CMD_FLAG_FAST_ZERO, FUA as CMD_FLAG_FUA,
    NO_HOLE as CMD_FLAG_NO_HOLE, PAYLOAD_LEN as CMD_FLAG_PAYLOAD_LEN, REQ_ONE as CMD_FLAG_REQ_ONE,
};
pub use ballast_proto::nbd::errno::{
    EINVAL, EIO, ENOMEM, ENOSPC, ENOTSUP, EOVERFLOW, EPERM, ESHUTDOWN,
};
pub use ballast_proto::nbd::info::{
    BLOCK_SIZE as INFO_BLOCK_SIZE, DESCRIPTION as INFO_DESCRIPTION, EXPORT as INFO_EXPORT,
    NAME as INFO_NAME,
};
pub use ballast_proto::nbd::opt::{
    ABORT as OPT_ABORT, EXPORT_NAME as OPT_EXPORT_NAME, EXTENDED_HEADERS as OPT_EXTENDED_HEADERS,
    GO as OPT_GO, INFO as OPT_INFO, LIST as OPT_LIST, LIST_META_CONTEXT as OPT_LIST_META_CONTEXT,
    SET_META_CONTEXT as OPT_SET_META_CONTEXT, STARTTLS as OPT_STARTTLS,
    STRUCTURED_REPLY as OPT_STRUCTURED_REPLY,
};
pub use ballast_proto::nbd::rep::{
    ACK as REP_ACK, ERR_BLOCK_SIZE_REQD as REP_ERR_BLOCK_SIZE_REQD,
    ERR_EXT_HEADER_REQD as REP_ERR_EXT_HEADER_REQD, ERR_INVALID as REP_ERR_INVALID,
    ERR_PLATFORM as REP_ERR_PLATFORM, ERR_POLICY as REP_ERR_POLICY,
    ERR_SHUTDOWN as REP_ERR_SHUTDOWN, ERR_TLS_REQD as REP_ERR_TLS_REQD,
    ERR_TOO_BIG as REP_ERR_TOO_BIG, ERR_UNKNOWN as REP_ERR_UNKNOWN, ERR_UNSUP as REP_ERR_UNSUP,
    INFO as REP_INFO, META_CONTEXT as REP_META_CONTEXT, SERVER as REP_SERVER,
};
pub use ballast_proto::nbd::reply_type::{
    BLOCK_STATUS as REPLY_TYPE_BLOCK_STATUS, BLOCK_STATUS_EXT as REPLY_TYPE_BLOCK_STATUS_EXT,
    ERROR as REPLY_TYPE_ERROR, ERROR_OFFSET as REPLY_TYPE_ERROR_OFFSET, NONE as REPLY_TYPE_NONE,
    OFFSET_DATA as REPLY_TYPE_OFFSET_DATA, OFFSET_HOLE as REPLY_TYPE_OFFSET_HOLE,
};
pub use ballast_proto::nbd::OPT_REPLY_MAGIC as OPTION_REPLY_MAGIC;

/// `NBD_FLAG_HAS_FLAGS` (and the other transmission flags below): the
/// server builds its flags as a plain `u16`.
pub const FLAG_HAS_FLAGS: u16 = TransmissionFlags::HAS_FLAGS;
pub const FLAG_READ_ONLY: u16 = TransmissionFlags::READ_ONLY;
pub const FLAG_SEND_FLUSH: u16 = TransmissionFlags::SEND_FLUSH;
pub const FLAG_SEND_FUA: u16 = TransmissionFlags::SEND_FUA;
pub const FLAG_ROTATIONAL: u16 = TransmissionFlags::ROTATIONAL;
pub const FLAG_SEND_TRIM: u16 = TransmissionFlags::SEND_TRIM;
pub const FLAG_SEND_WRITE_ZEROES: u16 = TransmissionFlags::SEND_WRITE_ZEROES;
pub const FLAG_SEND_DF: u16 = TransmissionFlags::SEND_DF;
pub const FLAG_CAN_MULTI_CONN: u16 = TransmissionFlags::CAN_MULTI_CONN;
pub const FLAG_SEND_RESIZE: u16 = TransmissionFlags::SEND_RESIZE;
pub const FLAG_SEND_CACHE: u16 = TransmissionFlags::SEND_CACHE;
pub const FLAG_SEND_FAST_ZERO: u16 = TransmissionFlags::SEND_FAST_ZERO;

/// Short name of a command (`READ`), as the server's logs and error
/// messages (which reach clients) have always spelled it.
pub fn command_name(kind: u16) -> &'static str {
    cmd::name(kind)
        .strip_prefix("NBD_CMD_")
        .unwrap_or("unknown")
}

/// Short name of an option (`GO`), for logs.
pub fn option_name(option: u32) -> &'static str {
    opt::name(option)
        .strip_prefix("NBD_OPT_")
        .unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_keep_their_spelling() {
        assert_eq!(command_name(CMD_WRITE_ZEROES), "WRITE_ZEROES");
        assert_eq!(command_name(CMD_READ), "READ");
        assert_eq!(command_name(0x99), "unknown");
        assert_eq!(option_name(OPT_GO), "GO");
        assert_eq!(option_name(0x1234), "unknown");
    }
}
