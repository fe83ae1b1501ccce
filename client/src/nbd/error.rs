//! Errors of the NBD client.

use std::fmt;
use std::io;

/// An NBD error number as carried in replies (`NBD_EPERM` ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NbdErrno {
    /// `NBD_EPERM` (1): operation not permitted.
    Eperm,
    /// `NBD_EIO` (5): input/output error.
    Eio,
    /// `NBD_ENOMEM` (12): cannot allocate memory.
    Enomem,
    /// `NBD_EINVAL` (22): invalid argument.
    Einval,
    /// `NBD_ENOSPC` (28): no space left on device.
    Enospc,
    /// `NBD_EOVERFLOW` (75): value too large.
    Eoverflow,
    /// `NBD_ENOTSUP` (95): operation not supported.
    Enotsup,
    /// `NBD_ESHUTDOWN` (108): server is shutting down.
    Eshutdown,
    /// A value the spec does not define.
    Other(u32),
}

impl NbdErrno {
    /// Map a wire value.
    pub fn from_wire(v: u32) -> NbdErrno {
        match v {
            1 => NbdErrno::Eperm,
            5 => NbdErrno::Eio,
            12 => NbdErrno::Enomem,
            22 => NbdErrno::Einval,
            28 => NbdErrno::Enospc,
            75 => NbdErrno::Eoverflow,
            95 => NbdErrno::Enotsup,
            108 => NbdErrno::Eshutdown,
            other => NbdErrno::Other(other),
        }
    }

    /// The wire value.
    pub fn to_wire(self) -> u32 {
        match self {
            NbdErrno::Eperm => 1,
            NbdErrno::Eio => 5,
            NbdErrno::Enomem => 12,
            NbdErrno::Einval => 22,
            NbdErrno::Enospc => 28,
            NbdErrno::Eoverflow => 75,
            NbdErrno::Enotsup => 95,
            NbdErrno::Eshutdown => 108,
            NbdErrno::Other(v) => v,
        }
    }

    /// The spec's name, e.g. `NBD_ENOSPC`.
    pub fn name(self) -> &'static str {
        match self {
            NbdErrno::Eperm => "NBD_EPERM",
            NbdErrno::Eio => "NBD_EIO",
            NbdErrno::Enomem => "NBD_ENOMEM",
            NbdErrno::Einval => "NBD_EINVAL",
            NbdErrno::Enospc => "NBD_ENOSPC",
            NbdErrno::Eoverflow => "NBD_EOVERFLOW",
            NbdErrno::Enotsup => "NBD_ENOTSUP",
            NbdErrno::Eshutdown => "NBD_ESHUTDOWN",
            NbdErrno::Other(_) => "unknown NBD error",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            NbdErrno::Eperm => "operation not permitted",
            NbdErrno::Eio => "input/output error",
            NbdErrno::Enomem => "cannot allocate memory",
            NbdErrno::Einval => "invalid argument",
            NbdErrno::Enospc => "no space left on device",
            NbdErrno::Eoverflow => "value too large",
            NbdErrno::Enotsup => "operation not supported",
            NbdErrno::Eshutdown => "server is shutting down",
            NbdErrno::Other(_) => "unrecognised error value",
        }
    }
}

impl fmt::Display for NbdErrno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdErrno::Other(v) => write!(f, "{} {v} ({})", self.name(), self.describe()),
            _ => write!(f, "{} ({})", self.name(), self.describe()),
        }
    }
}

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
    fn errno_names() {
        for v in [1, 5, 12, 22, 28, 75, 95, 108, 7] {
            assert_eq!(NbdErrno::from_wire(v).to_wire(), v);
        }
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
