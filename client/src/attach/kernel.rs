//! Attaching through the kernel's nbd driver over generic netlink.
//!
//! `attach` negotiates the sockets here (fixed newstyle, GO, simple replies,
//! no extended headers), hands them to the kernel with `NBD_CMD_CONNECT` and
//! exits: from then on the kernel owns the connections and `/dev/nbdN`
//! lives without any process of ours. `detach` sends `NBD_CMD_DISCONNECT`
//! (the device is destroyed on disconnect). When a connection dies — ballastd
//! restarted — the kernel keeps the device for the dead-connection timeout
//! and waits for `NBD_CMD_RECONFIGURE` with fresh sockets: [`reconnect`]
//! sends it, from the device's background watcher ([`super::watcher`]) or
//! from `ballast attach --reconnect /dev/nbdN` (see docs/attach.md).

use std::os::fd::AsRawFd;
use std::time::Duration;

use super::netlink::{self, ConnectSpec, GenlSocket, NetlinkError};
use super::{dial, AttachError};
use crate::nbd::{NbdError, NbdUri};

/// Largest logical block size the block layer accepts (one page).
const MAX_KERNEL_BLOCK: u64 = 4096;

/// What a kernel attach needs.
#[derive(Debug, Clone)]
pub struct KernelRequest {
    /// Volume name (for messages).
    pub volume: String,
    /// The export.
    pub uri: NbdUri,
    /// Connections wanted (one unless the server offers CAN_MULTI_CONN).
    pub connections: usize,
    /// `/dev/nbdN` to use; `None` lets the kernel pick a free one.
    pub index: Option<u32>,
    /// Volume block size.
    pub block_size: u64,
    /// Per-request timeout.
    pub timeout: Duration,
    /// How long the kernel waits for RECONFIGURE when every connection died.
    pub dead_conn_timeout: Duration,
}

/// The index of `/dev/nbdN`, `nbdN` or `N`.
pub fn parse_device(dev: &str) -> Option<u32> {
    let name = dev.strip_prefix("/dev/").unwrap_or(dev);
    let digits = name.strip_prefix("nbd").unwrap_or(name);
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `/dev/nbd{index}`.
pub fn device_path(index: u32) -> String {
    format!("/dev/nbd{index}")
}

/// The logical block size to give the kernel for a volume block size: the
/// volume's, within 512..=4096 (the block layer refuses larger ones; the
/// engine handles partial blocks itself).
pub fn kernel_block_size(volume_block: u64) -> u64 {
    volume_block.clamp(512, MAX_KERNEL_BLOCK)
}

fn netlink_err(op: &'static str) -> impl Fn(NetlinkError) -> AttachError {
    move |e| AttachError::Netlink {
        op,
        detail: e.to_string(),
    }
}

/// A netlink socket and the nbd family id, or the error that explains that
/// the driver is missing.
fn nbd_family(volume: &str) -> Result<(GenlSocket, u16), AttachError> {
    let missing = |detail: String| AttachError::NoKernelNbd {
        volume: volume.to_string(),
        detail,
    };
    let mut sock = GenlSocket::open().map_err(|e| missing(e.to_string()))?;
    match sock.resolve(netlink::NBD_FAMILY) {
        Ok(Some(id)) => Ok((sock, id)),
        Ok(None) => Err(missing(
            "the generic netlink family \"nbd\" does not exist: the nbd module is not loaded"
                .into(),
        )),
        Err(e) => Err(missing(e.to_string())),
    }
}

/// True when the kernel's nbd driver answers on netlink.
pub fn available() -> bool {
    nbd_family("").is_ok()
}

async fn sockets(
    uri: &NbdUri,
    wanted: usize,
) -> Result<(Vec<std::net::TcpStream>, crate::nbd::Negotiated), AttachError> {
    let nbd_err = |source: NbdError| AttachError::Nbd {
        uri: uri.to_string(),
        source,
    };
    let (first, negotiated) = dial::kernel_socket(uri).await.map_err(nbd_err)?;
    let n = if negotiated.flags.can_multi_conn() {
        wanted.max(1)
    } else {
        1
    };
    let mut streams = vec![first];
    for _ in 1..n {
        streams.push(dial::kernel_socket(uri).await.map_err(nbd_err)?.0);
    }
    Ok((streams, negotiated))
}

/// Connect `/dev/nbdN` to the export; returns N.
pub async fn attach(req: &KernelRequest) -> Result<u32, AttachError> {
    let (mut sock, family) = nbd_family(&req.volume)?;
    let (streams, negotiated) = sockets(&req.uri, req.connections).await?;
    let spec = ConnectSpec {
        index: req.index,
        sockets: streams.iter().map(|s| s.as_raw_fd() as u32).collect(),
        size_bytes: negotiated.size,
        block_size: kernel_block_size(req.block_size),
        timeout_secs: req.timeout.as_secs().max(1),
        dead_conn_timeout_secs: req.dead_conn_timeout.as_secs(),
        server_flags: negotiated.flags.bits() as u64,
        client_flags: netlink::CFLAG_DESTROY_ON_DISCONNECT,
        backend: Some(format!("ballast {}", req.uri)),
    };
    let seq = sock.next_seq();
    let msg = netlink::connect(family, seq, &spec).map_err(netlink_err("NBD_CMD_CONNECT"))?;
    let replies = sock
        .exchange("NBD_CMD_CONNECT", &msg)
        .map_err(netlink_err("NBD_CMD_CONNECT"))?;
    let index = replies
        .iter()
        .flatten()
        .find(|a| *a.nla_type().nla_type() == netlink::attr::INDEX)
        .and_then(|a| netlink::u32_of(a.nla_payload().as_ref()))
        .or(req.index)
        .ok_or_else(|| AttachError::Netlink {
            op: "NBD_CMD_CONNECT",
            detail: "the kernel's reply names no device index".into(),
        })?;
    // The kernel took its own references to the sockets; ours close here.
    drop(streams);
    Ok(index)
}

/// Hand fresh sockets to `/dev/nbd{index}` to replace dead connections.
pub async fn reconnect(index: u32, uri: &NbdUri, connections: usize) -> Result<(), AttachError> {
    let (mut sock, family) = nbd_family(&uri.export)?;
    let (streams, _) = sockets(uri, connections).await?;
    let fds: Vec<u32> = streams.iter().map(|s| s.as_raw_fd() as u32).collect();
    let seq = sock.next_seq();
    let msg = netlink::reconfigure(family, seq, index, &fds)
        .map_err(netlink_err("NBD_CMD_RECONFIGURE"))?;
    sock.exchange("NBD_CMD_RECONFIGURE", &msg)
        .map_err(netlink_err("NBD_CMD_RECONFIGURE"))?;
    drop(streams);
    Ok(())
}

/// Disconnect `/dev/nbd{index}`.
pub fn disconnect(volume: &str, index: u32) -> Result<(), AttachError> {
    let (mut sock, family) = nbd_family(volume)?;
    let seq = sock.next_seq();
    let msg = netlink::disconnect(family, seq, index).map_err(netlink_err("NBD_CMD_DISCONNECT"))?;
    sock.exchange("NBD_CMD_DISCONNECT", &msg)
        .map_err(netlink_err("NBD_CMD_DISCONNECT"))?;
    Ok(())
}

/// Whether `/dev/nbd{index}` is connected: `None` when the driver cannot
/// be asked.
pub fn connected(index: u32) -> Option<bool> {
    let (mut sock, family) = nbd_family("").ok()?;
    let seq = sock.next_seq();
    let msg = netlink::status(family, seq, Some(index)).ok()?;
    match sock.exchange("NBD_CMD_STATUS", &msg) {
        Ok(replies) => Some(
            netlink::parse_status(&replies)
                .iter()
                .any(|&(i, c)| i == index && c),
        ),
        // An unknown index is a device that no longer exists.
        Err(NetlinkError::Kernel { errno, .. }) if errno == libc::EINVAL => Some(false),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert_eq!(parse_device("/dev/nbd0"), Some(0));
        assert_eq!(parse_device("nbd12"), Some(12));
        assert_eq!(parse_device("3"), Some(3));
        assert_eq!(parse_device("/dev/sda"), None);
        assert_eq!(parse_device("/dev/nbd"), None);
        assert_eq!(parse_device("/dev/nbd1p1"), None);
        assert_eq!(device_path(7), "/dev/nbd7");
    }

    #[test]
    fn block_sizes_fit_the_block_layer() {
        assert_eq!(kernel_block_size(4096), 4096);
        assert_eq!(kernel_block_size(512), 512);
        assert_eq!(kernel_block_size(65536), 4096);
        assert_eq!(kernel_block_size(0), 512);
    }
}
