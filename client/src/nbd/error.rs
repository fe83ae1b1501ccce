//! Errors of the NBD client.

use std::io;

pub use ballast_proto::nbd::NbdErrno;

/// Everything that can go wrong talking to an NBD server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    /// The URI could not be parsed.
    #[error("invalid NBD URI {uri:?}: {reason}")]
    InvalidUri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TCP or Unix socket connection failed.
    #[error("cannot connect to {addr}: {error}")]
    Connect {
        /// Where we tried to connect.
        addr: String,
        /// The OS error (part of the message, so not also a `source`).
        error: io::Error,
    },
    /// Socket I/O failed.
    #[error("NBD connection I/O error: {0}")]
    Io(io::Error),
    /// The server's handshake was not what the protocol requires.
    #[error("NBD handshake failed: {0}")]
    Handshake(String),
    /// The server refused an option during negotiation.
    #[error("server refused {option} with {reply}{}", fmt_msg(message))]
    OptionRefused {
        /// Option name, e.g. `NBD_OPT_GO`.
        option: &'static str,
        /// Reply name, e.g. `NBD_REP_ERR_UNKNOWN`.
        reply: &'static str,
        /// The server's message, possibly empty.
        message: String,
    },
    /// The server sent something the protocol forbids during transmission.
    #[error("NBD protocol violation by the server: {0}")]
    Protocol(String),
    /// A command failed on the server with an NBD errno.
    #[error(
        "{command} offset {offset} length {length} failed: {errno}{}",
        fmt_msg(message)
    )]
    Command {
        /// Command name, e.g. `NBD_CMD_WRITE`.
        command: &'static str,
        /// The error number the server sent.
        errno: NbdErrno,
        /// Request offset.
        offset: u64,
        /// Request length.
        length: u64,
        /// The server's message from a structured error chunk, possibly empty.
        message: String,
    },
    /// The export does not support this operation (flag not advertised).
    #[error("the export does not support {0}")]
    Unsupported(&'static str),
    /// A write-type request on a read-only export.
    #[error("the export is read-only")]
    ReadOnly,
    /// A request outside the export or too large for one NBD request.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The connection is gone (closed by us, or lost earlier).
    #[error("NBD connection closed: {0}")]
    Disconnected(String),
}

impl From<io::Error> for NbdError {
    fn from(e: io::Error) -> NbdError {
        NbdError::Io(e)
    }
}

fn fmt_msg(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        format!(": {m}")
    }
}

impl NbdError {
    /// The NBD errno if this is a failed command.
    pub fn errno(&self) -> Option<NbdErrno> {
        match self {
            NbdError::Command { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Result alias of the NBD client.
pub type Result<T, E = NbdError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_error_names_the_errno() {
        let e = NbdError::Command {
            command: "NBD_CMD_WRITE",
            errno: NbdErrno::from_wire(28),
            offset: 4096,
            length: 512,
            message: "full".into(),
        };
        assert_eq!(
            e.to_string(),
            "NBD_CMD_WRITE offset 4096 length 512 failed: NBD_ENOSPC (no space left on device): full"
        );
        assert_eq!(e.errno(), Some(NbdErrno::Enospc));
    }
}
