//! The TCP congestion control of connections from this host.
//!
//! A client on the server's own host (the hyper-converged case: a VM, a
//! container or `nbd-client` beside `ballastd`) reaches it over loopback,
//! where there is no link to share and no queue to fill. A pacing algorithm
//! such as BBR (a common system default) still spaces the server's sends
//! out: with no `fq` qdisc on `lo`, TCP paces by itself, arming a
//! high-resolution timer whenever a burst runs ahead of the pacing rate and
//! sending the rest from the timer. On a VM each timer costs a trip to the
//! hypervisor, and 1 MiB reads lost a fifth of their throughput to it
//! (docs/benchmarks.md, session 30). Such connections therefore get a
//! non-pacing algorithm; connections from other hosts keep the system's.

use std::net::SocketAddr;
use tokio::net::TcpStream;

/// Default of [`crate::nbd::NbdConfig::local_congestion`]: CUBIC, the
/// kernel's own default, and Reno, which an unprivileged process may
/// always choose (`net.ipv4.tcp_allowed_congestion_control`).
pub const DEFAULT_LOCAL_CONGESTION: &[&str] = &["cubic", "reno"];

/// Whether a connection from `peer`, accepted on `local`, comes from this
/// host: from a loopback address, or from the address it reached us on.
pub(crate) fn is_local(peer: SocketAddr, local: SocketAddr) -> bool {
    peer.ip().is_loopback() || peer.ip() == local.ip()
}

/// Gives a connection from this host the first algorithm of `choices` the
/// kernel accepts (unless it already uses one of them); returns the one in
/// use then. Connections from elsewhere, and an empty `choices`, are left
/// alone (`None`).
pub(crate) fn choose(stream: &TcpStream, peer: SocketAddr, choices: &[String]) -> Option<String> {
    let local = stream.local_addr().ok()?;
    if choices.is_empty() || !is_local(peer, local) {
        return None;
    }
    let sock = socket2::SockRef::from(stream);
    let current = sock.tcp_congestion().ok().map(|name| algorithm_name(&name));
    if let Some(c) = current.as_ref().filter(|c| choices.contains(c)) {
        return Some(c.clone());
    }
    for choice in choices {
        match sock.set_tcp_congestion(choice.as_bytes()) {
            Ok(()) => return Some(choice.clone()),
            // Not built into this kernel, or not allowed for this process.
            Err(e) => tracing::debug!(peer = %peer, algorithm = %choice, error = %e,
                "TCP congestion control not available"),
        }
    }
    current
}

/// The kernel pads the name with NULs to its fixed length.
fn algorithm_name(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    async fn pair() -> (TcpStream, SocketAddr) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, peer) = l.accept().await.unwrap();
        drop(client);
        (server, peer)
    }

    fn in_use(s: &TcpStream) -> String {
        algorithm_name(&socket2::SockRef::from(s).tcp_congestion().unwrap())
    }

    #[tokio::test]
    async fn a_local_connection_gets_the_first_algorithm_the_kernel_takes() {
        let (s, peer) = pair().await;
        // "none-such" is no algorithm: the next one is taken.
        let choices: Vec<String> = ["none-such", "reno"].map(String::from).to_vec();
        assert_eq!(choose(&s, peer, &choices).as_deref(), Some("reno"));
        assert_eq!(in_use(&s), "reno");
        // Already one of the choices: kept.
        let choices: Vec<String> = ["cubic", "reno"].map(String::from).to_vec();
        assert_eq!(choose(&s, peer, &choices).as_deref(), Some("reno"));
    }

    #[tokio::test]
    async fn no_choices_or_a_remote_peer_leave_the_system_default() {
        let (s, peer) = pair().await;
        let before = in_use(&s);
        assert_eq!(choose(&s, peer, &[]), None);
        let remote: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        assert_eq!(choose(&s, remote, &["reno".to_string()]), None);
        assert_eq!(in_use(&s), before);
    }
}
