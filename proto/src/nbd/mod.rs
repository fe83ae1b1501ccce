//! The NBD wire protocol (doc/proto.md of the NetworkBlockDevice project),
//! written once for both ends: `ballastd`'s server and the `ballast` client
//! (whose `bench` and tools speak NBD too).
//!
//! Pure encoding and decoding — no I/O — so each piece is unit-tested against
//! the spec's byte layouts here, and both ends agree by construction.
//! All integers are big-endian on the wire.
//!
//! * [`constants`]: magics, header sizes, handshake flags, the
//!   [`TransmissionFlags`] of an export, and the option ([`opt`]), option
//!   reply ([`rep`]), information ([`info`]), command ([`cmd`]), command flag
//!   ([`cmd_flag`]) and reply chunk ([`reply_type`]) codes.
//! * [`errno`]: the error values of replies and [`NbdErrno`].
//! * [`header`]: the transmission phase — [`Request`] headers (compact and
//!   extended), [`ReplyHeader`]s (simple, structured and extended chunks) and
//!   error chunks, in the [`HeaderMode`] the handshake settled on.
//! * [`option`]: the handshake — greeting, option requests and replies, and
//!   the payloads of `NBD_OPT_GO`/`INFO` and the metadata context options.
//!
//! Codes are plain `u16`/`u32` constants grouped in modules rather than Rust
//! enums because both ends must carry values they do not know (an unknown
//! option is answered, an unknown chunk type is skipped).

pub mod constants;
pub mod errno;
pub mod header;
pub mod option;

pub use constants::*;
pub use errno::NbdErrno;
pub use header::{encode_error_chunk, Decoded, HeaderError, HeaderMode, ReplyHeader, Request};
pub use option::{
    encode_option, go_data, meta_context_data, parse_info, parse_meta, parse_string,
    server_greeting, truncate_str, InfoRequest, MetaRequest, OptionHeader, OptionReply,
};
