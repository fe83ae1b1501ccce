//! Error values of NBD replies. They are the Linux errno numbers, but the
//! spec fixes them on the wire so that peers on other systems agree: a
//! server maps its own errors to these and a client maps them back.

use std::fmt;

/// `NBD_EPERM`: operation not permitted.
pub const EPERM: u32 = 1;
/// `NBD_EIO`: input/output error.
pub const EIO: u32 = 5;
/// `NBD_ENOMEM`: cannot allocate memory.
pub const ENOMEM: u32 = 12;
/// `NBD_EINVAL`: invalid argument.
pub const EINVAL: u32 = 22;
/// `NBD_ENOSPC`: no space left on device.
pub const ENOSPC: u32 = 28;
/// `NBD_EOVERFLOW`: value too large.
pub const EOVERFLOW: u32 = 75;
/// `NBD_ENOTSUP`: operation not supported.
pub const ENOTSUP: u32 = 95;
/// `NBD_ESHUTDOWN`: server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// An NBD error value as carried in replies (`NBD_EPERM` ...).
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
            EPERM => NbdErrno::Eperm,
            EIO => NbdErrno::Eio,
            ENOMEM => NbdErrno::Enomem,
            EINVAL => NbdErrno::Einval,
            ENOSPC => NbdErrno::Enospc,
            EOVERFLOW => NbdErrno::Eoverflow,
            ENOTSUP => NbdErrno::Enotsup,
            ESHUTDOWN => NbdErrno::Eshutdown,
            other => NbdErrno::Other(other),
        }
    }

    /// The wire value.
    pub fn to_wire(self) -> u32 {
        match self {
            NbdErrno::Eperm => EPERM,
            NbdErrno::Eio => EIO,
            NbdErrno::Enomem => ENOMEM,
            NbdErrno::Einval => EINVAL,
            NbdErrno::Enospc => ENOSPC,
            NbdErrno::Eoverflow => EOVERFLOW,
            NbdErrno::Enotsup => ENOTSUP,
            NbdErrno::Eshutdown => ESHUTDOWN,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_round_trip() {
        // The numbers of the spec's error table, written out literally.
        for v in [1, 5, 12, 22, 28, 75, 95, 108, 7] {
            assert_eq!(NbdErrno::from_wire(v).to_wire(), v);
        }
        assert_eq!(NbdErrno::from_wire(28), NbdErrno::Enospc);
        assert_eq!(NbdErrno::from_wire(7), NbdErrno::Other(7));
    }

    #[test]
    fn display_names_the_spec_value() {
        assert_eq!(
            NbdErrno::Enospc.to_string(),
            "NBD_ENOSPC (no space left on device)"
        );
        assert_eq!(
            NbdErrno::Other(7).to_string(),
            "unknown NBD error 7 (unrecognised error value)"
        );
    }
}
