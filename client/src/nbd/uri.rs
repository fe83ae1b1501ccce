//! NBD URIs: `nbd://HOST[:PORT]/[EXPORT]` and `nbd+unix:///[EXPORT]?socket=PATH`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::error::NbdError;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NbdAddr {
    /// TCP: host name or IP literal (without brackets) and port.
    Tcp {
        /// Host name or IP address.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A Unix domain socket.
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NbdUri {
    /// Server address.
    pub addr: NbdAddr,
    /// Export name (may be empty: the default export).
    pub export: String,
}

impl NbdUri {
    /// Parse a URI such as `nbd://127.0.0.1:10809/vol1`.
    pub fn parse(s: &str) -> Result<NbdUri, NbdError> {
        let bad = |reason: &str| NbdError::InvalidUri {
            uri: s.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            bad("expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")
        })?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export =
            percent_decode(path).ok_or_else(|| bad("bad percent-encoding in the export name"))?;
        let mut socket = None;
        for pair in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "socket" => {
                    socket = Some(
                        percent_decode(v).ok_or_else(|| bad("bad percent-encoding in socket="))?,
                    )
                }
                _ => return Err(bad(&format!("unsupported query parameter {k:?}"))),
            }
        }
        match scheme.to_ascii_lowercase().as_str() {
            "nbd" => {
                if socket.is_some() {
                    return Err(bad("socket= is only valid with nbd+unix://"));
                }
                let (host, port) = split_host_port(authority).map_err(|r| bad(&r))?;
                Ok(NbdUri {
                    addr: NbdAddr::Tcp { host, port },
                    export,
                })
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad(
                        "nbd+unix:// takes no host; write nbd+unix:///EXPORT?socket=PATH",
                    ));
                }
                let path = socket.ok_or_else(|| bad("nbd+unix:// needs ?socket=PATH"))?;
                if path.is_empty() {
                    return Err(bad("empty socket path"));
                }
                Ok(NbdUri {
                    addr: NbdAddr::Unix(PathBuf::from(path)),
                    export,
                })
            }
            "nbds" | "nbds+unix" => Err(bad("TLS (nbds://) is not supported")),
            other => Err(bad(&format!(
                "unknown scheme {other:?}; use nbd:// or nbd+unix://"
            ))),
        }
    }
}

fn split_host_port(authority: &str) -> Result<(String, u16), String> {
    if authority.is_empty() {
        return Err("missing host".into());
    }
    let parse_port = |p: &str| -> Result<u16, String> {
        if p.is_empty() {
            return Ok(DEFAULT_PORT);
        }
        p.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("invalid port {p:?}"))
    };
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| "unterminated [IPv6] literal".to_string())?;
        let port = match after {
            "" => DEFAULT_PORT,
            a => parse_port(
                a.strip_prefix(':')
                    .ok_or_else(|| format!("unexpected {a:?} after ]"))?,
            )?,
        };
        return Ok((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, _)) if h.contains(':') => {
            Err("IPv6 addresses must be written in [brackets]".into())
        }
        Some((h, p)) if !h.is_empty() => Ok((h.to_string(), parse_port(p)?)),
        Some(_) => Err("missing host".into()),
        None => Ok((authority.to_string(), DEFAULT_PORT)),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) || (keep_slash && c == b'/') {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

impl FromStr for NbdUri {
    type Err = NbdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NbdUri::parse(s)
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = percent_encode(&self.export, true);
        match &self.addr {
            NbdAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{export}")
            }
            NbdAddr::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{export}"),
            NbdAddr::Unix(p) => write!(
                f,
                "nbd+unix:///{export}?socket={}",
                percent_encode(&p.to_string_lossy(), true)
            ),
        }
    }
}

impl fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddr::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
            NbdAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            addr: NbdAddr::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn parses_tcp() {
        assert_eq!(
            NbdUri::parse("nbd://127.0.0.1:10900/").unwrap(),
            tcp("127.0.0.1", 10900, "")
        );
        assert_eq!(
            NbdUri::parse("nbd://host").unwrap(),
            tcp("host", DEFAULT_PORT, "")
        );
        assert_eq!(
            NbdUri::parse("nbd://host/vol1").unwrap(),
            tcp("host", DEFAULT_PORT, "vol1")
        );
        assert_eq!(
            NbdUri::parse("nbd://host:/a%20b/c").unwrap(),
            tcp("host", DEFAULT_PORT, "a b/c")
        );
        assert_eq!(
            NbdUri::parse("NBD://[::1]:99/x").unwrap(),
            tcp("::1", 99, "x")
        );
        assert_eq!(
            NbdUri::parse("nbd://[::1]/").unwrap(),
            tcp("::1", DEFAULT_PORT, "")
        );
    }

    #[test]
    fn parses_unix() {
        let u = NbdUri::parse("nbd+unix:///vol?socket=/tmp/s.sock").unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/tmp/s.sock".into()));
        assert_eq!(u.export, "vol");
        assert_eq!(u.to_string(), "nbd+unix:///vol?socket=/tmp/s.sock");
        assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
    }

    #[test]
    fn rejects_bad() {
        for s in [
            "127.0.0.1:10809",
            "http://x/",
            "nbd://",
            "nbd://:10809/",
            "nbd://h:0/",
            "nbd://h:70000/",
            "nbd://::1/",
            "nbd://[::1/",
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/s",
            "nbd://h/?socket=/s",
            "nbd://h/%zz",
            "nbds://h/",
        ] {
            assert!(NbdUri::parse(s).is_err(), "{s} should be rejected");
        }
    }

    #[test]
    fn display_round_trip() {
        for s in [
            "nbd://h:1/",
            "nbd://[::1]:10809/a%20b",
            "nbd://storage-1:10809/vol/x",
        ] {
            let u = NbdUri::parse(s).unwrap();
            assert_eq!(u.to_string(), s);
        }
    }
}
