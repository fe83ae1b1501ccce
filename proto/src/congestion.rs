//! The TCP congestion control of NBD connections within one host.
//!
//! A client on the server's own host (the hyper-converged case: a VM, a
//! container, `nbd-client`, `ballast attach` or `ballast bench` beside
//! `ballastd`) reaches it over loopback, where there is no link to share and
//! no queue to fill. A pacing algorithm such as BBR (a common system
//! default) still spaces the sender's data out: with no `fq` qdisc on `lo`,
//! TCP paces by itself, arming a high-resolution timer whenever a burst runs
//! ahead of the pacing rate and sending the rest from the timer. On a VM each
//! timer costs a trip to the hypervisor: 1 MiB reads from `ballastd` lost a
//! fifth of their throughput to it, 1 MiB writes from `ballast bench` a
//! quarter (docs/benchmarks.md, sessions 30 and 31). Both ends therefore
//! give such connections a non-pacing algorithm, each for what it sends;
//! connections to or from other hosts keep the system's.

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::str::FromStr;

/// Algorithms tried in order for a connection within this host; empty
/// keeps the system's default (written `system`).
///
/// The default is CUBIC, the kernel's own default, then Reno, which an
/// unprivileged process may always choose
/// (`net.ipv4.tcp_allowed_congestion_control`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalCongestion(Vec<String>);

/// The default list, as `--help` shows it.
pub const DEFAULT_LOCAL_CONGESTION: &[&str] = &["cubic", "reno"];

impl Default for LocalCongestion {
    fn default() -> Self {
        LocalCongestion(
            DEFAULT_LOCAL_CONGESTION
                .iter()
                .map(|s| s.to_string())
                .collect(),
        )
    }
}

impl LocalCongestion {
    /// Leave every connection with the system's algorithm.
    pub fn system() -> Self {
        LocalCongestion(Vec::new())
    }

    /// The algorithms, in the order they are tried.
    pub fn algorithms(&self) -> &[String] {
        &self.0
    }

    /// Gives `socket`, if both its ends are on this host, the first
    /// algorithm the kernel accepts (unless it already uses one of them);
    /// returns the one in use then. Connections with another host, and
    /// `system`, are left alone (`None`). Best effort: a connection works
    /// the same with any algorithm.
    pub fn apply(&self, socket: &impl AsFd) -> Option<String> {
        if self.0.is_empty() {
            return None;
        }
        let sock = socket2::SockRef::from(socket);
        let local = sock.local_addr().ok()?.as_socket()?;
        let peer = sock.peer_addr().ok()?.as_socket()?;
        if !is_local(peer, local) {
            return None;
        }
        let current = sock.tcp_congestion().ok().map(|name| algorithm_name(&name));
        if let Some(c) = current.as_ref().filter(|c| self.0.contains(c)) {
            return Some(c.clone());
        }
        for choice in &self.0 {
            match sock.set_tcp_congestion(choice.as_bytes()) {
                Ok(()) => return Some(choice.clone()),
                // Not built into this kernel, or not allowed for this process.
                Err(e) => tracing::debug!(peer = %peer, algorithm = %choice, error = %e,
                    "TCP congestion control not available"),
            }
        }
        current
    }
}

/// Whether the other end `peer` of a connection whose own end is `local`
/// is on this host: a loopback address, or the address we have ourselves.
pub fn is_local(peer: SocketAddr, local: SocketAddr) -> bool {
    peer.ip().is_loopback() || peer.ip() == local.ip()
}

/// The kernel pads the name with NULs to its fixed length.
fn algorithm_name(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// A list that is not `system` nor comma-separated algorithm names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a TCP congestion control name: give a comma-separated list such as \"cubic,reno\" (see /proc/sys/net/ipv4/tcp_available_congestion_control) or \"system\"")]
pub struct BadAlgorithmName(pub String);

/// `cubic,reno` or `system`.
impl FromStr for LocalCongestion {
    type Err = BadAlgorithmName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().eq_ignore_ascii_case("system") {
            return Ok(LocalCongestion::system());
        }
        let names: Vec<String> = s.split(',').map(|n| n.trim().to_string()).collect();
        for n in &names {
            // The kernel's names fit TCP_CA_NAME_MAX (16 bytes with the NUL).
            let ok = !n.is_empty()
                && n.len() < 16
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return Err(BadAlgorithmName(n.clone()));
            }
        }
        Ok(LocalCongestion(names))
    }
}

/// As a flag is written (what `--help` shows as the default).
impl fmt::Display for LocalCongestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("system")
        } else {
            f.write_str(&self.0.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn local_means_loopback_or_our_own_address() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(is_local(a("127.0.0.1:5000"), a("127.0.0.1:10809")));
        assert!(is_local(a("127.3.4.5:5000"), a("0.0.0.0:10809")));
        assert!(is_local(a("[::1]:5000"), a("[::1]:10809")));
        assert!(is_local(a("10.1.2.3:5000"), a("10.1.2.3:10809")));
        assert!(!is_local(a("10.1.2.4:5000"), a("10.1.2.3:10809")));
        assert!(!is_local(a("[fd00::2]:5000"), a("[fd00::1]:10809")));
    }

    #[test]
    fn names_lose_their_padding() {
        assert_eq!(algorithm_name(b"cubic\0\0\0\0\0\0\0\0\0\0\0"), "cubic");
        assert_eq!(algorithm_name(b"reno"), "reno");
    }

    #[test]
    fn lists_parse_and_print_as_written() {
        let l: LocalCongestion = "dctcp, reno".parse().unwrap();
        assert_eq!(l.algorithms(), ["dctcp", "reno"]);
        assert_eq!(l.to_string(), "dctcp,reno");
        let s: LocalCongestion = " System ".parse().unwrap();
        assert_eq!(s, LocalCongestion::system());
        assert_eq!(s.to_string(), "system");
        assert_eq!(LocalCongestion::default().to_string(), "cubic,reno");
        for bad in ["", "cubic,", "a b", "averyveryverylongname", "bbr;reno"] {
            let e = bad.parse::<LocalCongestion>().unwrap_err();
            assert!(e.to_string().contains("comma-separated"), "{bad:?}: {e}");
        }
    }

    /// Both ends of a loopback connection.
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        (client, server)
    }

    fn in_use(s: &TcpStream) -> String {
        algorithm_name(&socket2::SockRef::from(s).tcp_congestion().unwrap())
    }

    #[test]
    fn a_local_connection_gets_the_first_algorithm_the_kernel_takes() {
        let (client, server) = pair();
        // "none-such" is no algorithm: the next one is taken, on either end.
        let list: LocalCongestion = "none-such,reno".parse().unwrap();
        for s in [&client, &server] {
            assert_eq!(list.apply(s).as_deref(), Some("reno"));
            assert_eq!(in_use(s), "reno");
        }
        // Already one of the choices: kept.
        let list: LocalCongestion = "cubic,reno".parse().unwrap();
        assert_eq!(list.apply(&server).as_deref(), Some("reno"));
    }

    #[test]
    fn system_leaves_the_default() {
        let (client, _server) = pair();
        let before = in_use(&client);
        assert_eq!(LocalCongestion::system().apply(&client), None);
        assert_eq!(in_use(&client), before);
    }
}
