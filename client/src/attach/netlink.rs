//! Generic netlink messages of the kernel's nbd driver (family `nbd`,
//! version 1; include/uapi/linux/nbd-netlink.h) and of the controller that
//! resolves family names (`nlctrl`), built with `neli`, plus the one
//! request/response exchange the attach flow needs.
//!
//! Attribute payloads are in host byte order, as netlink wants. Every
//! message asks for an ACK, so the kernel's answer always ends with an
//! `NLMSG_ERROR` carrying 0 or a negative errno.

use std::io::Cursor;

use neli::consts::nl::NlmF;
use neli::consts::socket::NlFamily;
use neli::genl::{AttrTypeBuilder, Genlmsghdr, GenlmsghdrBuilder, Nlattr, NlattrBuilder};
use neli::nl::{NlPayload, Nlmsghdr, NlmsghdrBuilder};
use neli::socket::synchronous::NlSocketHandle;
use neli::types::{Buffer, GenlBuffer};
use neli::utils::Groups;
use neli::{Size, ToBytes};

/// Family id of the generic netlink controller (`GENL_ID_CTRL`).
pub const GENL_ID_CTRL: u16 = 0x10;
/// `CTRL_CMD_GETFAMILY`.
pub const CTRL_CMD_GETFAMILY: u8 = 3;
/// Version of the controller protocol sent in requests.
pub const CTRL_VERSION: u8 = 2;
/// `CTRL_ATTR_FAMILY_ID` (u16).
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
/// `CTRL_ATTR_FAMILY_NAME` (NUL-terminated string).
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;
/// `CTRL_ATTR_MCAST_GROUPS`: nested list, one nested item per group (the
/// item's type is its 1-based position, not a meaningful constant).
pub const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
/// `CTRL_ATTR_MCAST_GRP_NAME` (NUL-terminated string), inside an item.
pub const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
/// `CTRL_ATTR_MCAST_GRP_ID` (u32), inside an item.
pub const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;

/// The nbd driver's generic netlink family name.
pub const NBD_FAMILY: &str = "nbd";
/// `NBD_GENL_VERSION`.
pub const NBD_VERSION: u8 = 1;
/// `NBD_GENL_MCAST_GROUP_NAME`: where the driver multicasts `LINK_DEAD`.
pub const NBD_MCAST_GROUP: &str = "nbd_mc_group";

/// `NBD_CMD_*`.
pub mod cmd {
    /// Attach sockets to a device.
    pub const CONNECT: u8 = 1;
    /// Disconnect a device.
    pub const DISCONNECT: u8 = 2;
    /// Change settings or replace dead sockets of a connected device.
    pub const RECONFIGURE: u8 = 3;
    /// Multicast by the kernel when a connection dies.
    pub const LINK_DEAD: u8 = 4;
    /// Report devices and whether they are connected.
    pub const STATUS: u8 = 5;
}

/// `NBD_ATTR_*`.
pub mod attr {
    /// Device index, u32 (`/dev/nbdN`).
    pub const INDEX: u16 = 1;
    /// Device size in bytes, u64.
    pub const SIZE_BYTES: u16 = 2;
    /// Logical block size in bytes, u64.
    pub const BLOCK_SIZE_BYTES: u16 = 3;
    /// Per-request timeout in seconds, u64.
    pub const TIMEOUT: u16 = 4;
    /// Transmission flags from the handshake, u64.
    pub const SERVER_FLAGS: u16 = 5;
    /// `NBD_CFLAG_*`, u64.
    pub const CLIENT_FLAGS: u16 = 6;
    /// Nested list of [`super::SOCK_ITEM`].
    pub const SOCKETS: u16 = 7;
    /// Seconds to wait for RECONFIGURE after all connections died, u64.
    pub const DEAD_CONN_TIMEOUT: u16 = 8;
    /// Nested list of [`super::DEVICE_ITEM`] (STATUS replies).
    pub const DEVICE_LIST: u16 = 9;
    /// Free-form string shown in `/sys/block/nbdN/backend`.
    pub const BACKEND_IDENTIFIER: u16 = 10;
}

/// `NBD_SOCK_ITEM`: one socket in [`attr::SOCKETS`].
pub const SOCK_ITEM: u16 = 1;
/// `NBD_SOCK_FD`: the socket's file descriptor, u32.
pub const SOCK_FD: u16 = 1;
/// `NBD_DEVICE_ITEM`: one device in [`attr::DEVICE_LIST`].
pub const DEVICE_ITEM: u16 = 1;
/// `NBD_DEVICE_INDEX`, u32.
pub const DEVICE_INDEX: u16 = 1;
/// `NBD_DEVICE_CONNECTED`, u8.
pub const DEVICE_CONNECTED: u16 = 2;

/// `NBD_CFLAG_DESTROY_ON_DISCONNECT`: remove the device when it disconnects.
pub const CFLAG_DESTROY_ON_DISCONNECT: u64 = 1;
/// `NBD_CFLAG_DISCONNECT_ON_CLOSE`: disconnect on the last close.
pub const CFLAG_DISCONNECT_ON_CLOSE: u64 = 2;

/// A generic netlink message with u8 commands and u16 attribute types.
pub type GenlMessage = Nlmsghdr<u16, Genlmsghdr<u8, u16>>;

/// A netlink failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetlinkError {
    /// A message could not be built (a bug, or a value out of range).
    #[error("cannot encode the netlink message: {0}")]
    Encode(String),
    /// The socket failed.
    #[error("netlink socket error: {0}")]
    Socket(String),
    /// The kernel refused the request.
    #[error("the kernel refused {op}: {}", std::io::Error::from_raw_os_error(*errno))]
    Kernel {
        /// What was asked.
        op: &'static str,
        /// Positive errno.
        errno: i32,
    },
    /// The reply was not what the request calls for.
    #[error("unexpected netlink reply to {op}: {detail}")]
    Reply {
        /// What was asked.
        op: &'static str,
        /// What was wrong.
        detail: String,
    },
}

fn enc(e: impl std::fmt::Display) -> NetlinkError {
    NetlinkError::Encode(e.to_string())
}

/// An attribute with a scalar or byte payload.
fn attr_of<P: Size + ToBytes>(kind: u16, payload: P) -> Result<Nlattr<u16, Buffer>, NetlinkError> {
    NlattrBuilder::default()
        .nla_type(
            AttrTypeBuilder::default()
                .nla_type(kind)
                .build()
                .map_err(enc)?,
        )
        .nla_payload(payload)
        .build()
        .map_err(enc)
}

/// An attribute holding the given attributes (`NLA_F_NESTED` set).
fn nested(kind: u16, inner: &[Nlattr<u16, Buffer>]) -> Result<Nlattr<u16, Buffer>, NetlinkError> {
    let mut a = NlattrBuilder::default()
        .nla_type(
            AttrTypeBuilder::default()
                .nla_type(kind)
                .nla_nested(true)
                .build()
                .map_err(enc)?,
        )
        .nla_payload(Vec::<u8>::new())
        .build()
        .map_err(enc)?;
    for i in inner {
        a = a.nest(i).map_err(enc)?;
    }
    Ok(a)
}

/// A request to `family`: `NLM_F_REQUEST | NLM_F_ACK`, port id 0 (the
/// kernel fills in ours).
pub fn request(
    family: u16,
    seq: u32,
    command: u8,
    version: u8,
    attrs: Vec<Nlattr<u16, Buffer>>,
) -> Result<GenlMessage, NetlinkError> {
    let genl = GenlmsghdrBuilder::default()
        .cmd(command)
        .version(version)
        .attrs(attrs.into_iter().collect::<GenlBuffer<u16, Buffer>>())
        .build()
        .map_err(enc)?;
    NlmsghdrBuilder::default()
        .nl_type(family)
        .nl_flags(NlmF::REQUEST | NlmF::ACK)
        .nl_seq(seq)
        .nl_pid(0)
        .nl_payload(NlPayload::Payload(genl))
        .build()
        .map_err(enc)
}

/// The bytes of `msg` as they go on the socket.
pub fn to_bytes(msg: &GenlMessage) -> Result<Vec<u8>, NetlinkError> {
    let mut c = Cursor::new(Vec::with_capacity(msg.padded_size()));
    msg.to_bytes(&mut c).map_err(enc)?;
    Ok(c.into_inner())
}

/// `CTRL_CMD_GETFAMILY` for `name`.
pub fn get_family(seq: u32, name: &str) -> Result<GenlMessage, NetlinkError> {
    request(
        GENL_ID_CTRL,
        seq,
        CTRL_CMD_GETFAMILY,
        CTRL_VERSION,
        vec![attr_of(CTRL_ATTR_FAMILY_NAME, name)?],
    )
}

/// Everything `NBD_CMD_CONNECT` carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectSpec {
    /// `Some(n)` for `/dev/nbdN`; `None` lets the kernel pick a free device.
    pub index: Option<u32>,
    /// Sockets in transmission mode (simple replies only).
    pub sockets: Vec<u32>,
    /// Export size.
    pub size_bytes: u64,
    /// Logical block size of the device.
    pub block_size: u64,
    /// Per-request timeout, seconds (0: the kernel default, 30 s).
    pub timeout_secs: u64,
    /// How long the device waits for RECONFIGURE once every connection is
    /// dead, seconds.
    pub dead_conn_timeout_secs: u64,
    /// Transmission flags from the handshake.
    pub server_flags: u64,
    /// `NBD_CFLAG_*`.
    pub client_flags: u64,
    /// Shown in `/sys/block/nbdN/backend`.
    pub backend: Option<String>,
}

fn sockets_attr(fds: &[u32]) -> Result<Nlattr<u16, Buffer>, NetlinkError> {
    let items = fds
        .iter()
        .map(|&fd| nested(SOCK_ITEM, &[attr_of(SOCK_FD, fd)?]))
        .collect::<Result<Vec<_>, _>>()?;
    nested(attr::SOCKETS, &items)
}

/// `NBD_CMD_CONNECT`.
pub fn connect(family: u16, seq: u32, spec: &ConnectSpec) -> Result<GenlMessage, NetlinkError> {
    let mut attrs = Vec::new();
    if let Some(i) = spec.index {
        attrs.push(attr_of(attr::INDEX, i)?);
    }
    attrs.push(attr_of(attr::SIZE_BYTES, spec.size_bytes)?);
    attrs.push(attr_of(attr::BLOCK_SIZE_BYTES, spec.block_size)?);
    attrs.push(attr_of(attr::TIMEOUT, spec.timeout_secs)?);
    attrs.push(attr_of(
        attr::DEAD_CONN_TIMEOUT,
        spec.dead_conn_timeout_secs,
    )?);
    attrs.push(attr_of(attr::SERVER_FLAGS, spec.server_flags)?);
    attrs.push(attr_of(attr::CLIENT_FLAGS, spec.client_flags)?);
    attrs.push(sockets_attr(&spec.sockets)?);
    if let Some(b) = &spec.backend {
        attrs.push(attr_of(attr::BACKEND_IDENTIFIER, b.as_str())?);
    }
    request(family, seq, cmd::CONNECT, NBD_VERSION, attrs)
}

/// `NBD_CMD_DISCONNECT` of `/dev/nbd{index}`.
pub fn disconnect(family: u16, seq: u32, index: u32) -> Result<GenlMessage, NetlinkError> {
    request(
        family,
        seq,
        cmd::DISCONNECT,
        NBD_VERSION,
        vec![attr_of(attr::INDEX, index)?],
    )
}

/// `NBD_CMD_RECONFIGURE` of `/dev/nbd{index}` handing over `sockets` to
/// replace dead connections (the kernel swaps each one in for a dead one).
pub fn reconfigure(
    family: u16,
    seq: u32,
    index: u32,
    sockets: &[u32],
) -> Result<GenlMessage, NetlinkError> {
    request(
        family,
        seq,
        cmd::RECONFIGURE,
        NBD_VERSION,
        vec![attr_of(attr::INDEX, index)?, sockets_attr(sockets)?],
    )
}

/// `NBD_CMD_STATUS`, of one device or (`None`) of all.
pub fn status(family: u16, seq: u32, index: Option<u32>) -> Result<GenlMessage, NetlinkError> {
    let attrs = match index {
        Some(i) => vec![attr_of(attr::INDEX, i)?],
        None => Vec::new(),
    };
    request(family, seq, cmd::STATUS, NBD_VERSION, attrs)
}

/// Attributes of a kernel reply.
pub type ReplyAttrs = Vec<Nlattr<u16, Buffer>>;

/// A connected generic netlink socket.
pub struct GenlSocket {
    sock: NlSocketHandle,
    seq: u32,
}

impl GenlSocket {
    /// Open a `NETLINK_GENERIC` socket.
    pub fn open() -> Result<GenlSocket, NetlinkError> {
        let sock = NlSocketHandle::connect(NlFamily::Generic, Some(0), Groups::empty())
            .map_err(|e| NetlinkError::Socket(e.to_string()))?;
        Ok(GenlSocket { sock, seq: 0 })
    }

    /// The next sequence number.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Send `msg` and collect the attributes of every reply until the ACK.
    pub fn exchange(
        &mut self,
        op: &'static str,
        msg: &GenlMessage,
    ) -> Result<Vec<ReplyAttrs>, NetlinkError> {
        self.sock
            .send(msg)
            .map_err(|e| NetlinkError::Socket(e.to_string()))?;
        let seq = *msg.nl_seq();
        let mut replies = Vec::new();
        loop {
            let (iter, _) = self
                .sock
                .recv::<u16, Genlmsghdr<u8, u16>>()
                .map_err(|e| NetlinkError::Socket(e.to_string()))?;
            for m in iter {
                let m = m.map_err(|e| NetlinkError::Reply {
                    op,
                    detail: e.to_string(),
                })?;
                if *m.nl_seq() != seq {
                    continue; // an answer to an earlier request
                }
                match m.nl_payload() {
                    NlPayload::Payload(p) => replies.push(p.attrs().iter().cloned().collect()),
                    NlPayload::Ack(_) => return Ok(replies),
                    NlPayload::Err(e) if *e.error() == 0 => return Ok(replies),
                    NlPayload::Err(e) => {
                        return Err(NetlinkError::Kernel {
                            op,
                            errno: e.error().unsigned_abs() as i32,
                        })
                    }
                    NlPayload::DumpExtAck(_) | NlPayload::Empty => return Ok(replies),
                }
            }
        }
    }

    /// The id of generic netlink family `name`; `Ok(None)` when the kernel
    /// does not know it (module not loaded).
    pub fn resolve(&mut self, name: &str) -> Result<Option<u16>, NetlinkError> {
        Ok(self.resolve_family(name)?.map(|f| f.id))
    }

    /// Id and multicast groups of generic netlink family `name`; `Ok(None)`
    /// when the kernel does not know it (module not loaded).
    pub fn resolve_family(&mut self, name: &str) -> Result<Option<Family>, NetlinkError> {
        let seq = self.next_seq();
        let msg = get_family(seq, name)?;
        match self.exchange("CTRL_CMD_GETFAMILY", &msg) {
            Ok(replies) => {
                let attrs: Vec<(u16, Vec<u8>)> = replies
                    .iter()
                    .flatten()
                    .map(|a| (*a.nla_type().nla_type(), a.nla_payload().as_ref().to_vec()))
                    .collect();
                Ok(family_of(&attrs))
            }
            Err(NetlinkError::Kernel { errno, .. }) if errno == libc::ENOENT => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// What `CTRL_CMD_GETFAMILY` tells about a family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    /// The id requests to the family carry as netlink message type.
    pub id: u16,
    /// Multicast groups: name and the id to join.
    pub mcast_groups: Vec<(String, u32)>,
}

impl Family {
    /// The id of multicast group `name`.
    pub fn mcast_group(&self, name: &str) -> Option<u32> {
        self.mcast_groups
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, id)| id)
    }
}

/// The family described by the attributes of a GETFAMILY reply; `None`
/// without a family id. Groups lacking a name or an id are skipped.
pub fn family_of(attrs: &[(u16, Vec<u8>)]) -> Option<Family> {
    let id = find_attr(attrs, CTRL_ATTR_FAMILY_ID).and_then(u16_of)?;
    let mut mcast_groups = Vec::new();
    for (_, groups) in attrs
        .iter()
        .filter(|(k, _)| *k & 0x3fff == CTRL_ATTR_MCAST_GROUPS)
    {
        for (_, item) in parse_nested(groups) {
            let fields = parse_nested(&item);
            let name = find_attr(&fields, CTRL_ATTR_MCAST_GRP_NAME).map(c_string);
            let gid = find_attr(&fields, CTRL_ATTR_MCAST_GRP_ID).and_then(u32_of);
            if let (Some(name), Some(gid)) = (name, gid) {
                mcast_groups.push((name, gid));
            }
        }
    }
    Some(Family { id, mcast_groups })
}

/// A string attribute without its NUL terminator.
fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// One generic netlink message read off a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawGenlMessage {
    /// `nlmsg_type`: the family id (or a control type such as `NLMSG_ERROR`).
    pub nl_type: u16,
    /// `genlmsghdr.cmd`.
    pub cmd: u8,
    /// Top-level attributes as `(type without flags, payload)`.
    pub attrs: Vec<(u16, Vec<u8>)>,
}

/// Length of `struct nlmsghdr`.
const NLMSG_HDR_LEN: usize = 16;
/// Length of `struct genlmsghdr`.
const GENL_HDR_LEN: usize = 4;

/// Every generic netlink message in one datagram. Netlink packs several
/// messages, each padded to 4 bytes, into one read; a truncated tail is
/// dropped. Messages too short for a generic header (`NLMSG_DONE`, ...)
/// are skipped.
pub fn parse_messages(datagram: &[u8]) -> Vec<RawGenlMessage> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while rest.len() >= NLMSG_HDR_LEN {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < NLMSG_HDR_LEN || len > rest.len() {
            break;
        }
        let nl_type = u16::from_ne_bytes([rest[4], rest[5]]);
        let body = &rest[NLMSG_HDR_LEN..len];
        if body.len() >= GENL_HDR_LEN {
            out.push(RawGenlMessage {
                nl_type,
                cmd: body[0],
                attrs: parse_nested(&body[GENL_HDR_LEN..]),
            });
        }
        let padded = (len + 3) & !3;
        rest = &rest[padded.min(rest.len())..];
    }
    out
}

/// The device index of an `NBD_CMD_LINK_DEAD` notification from the nbd
/// family `family`; `None` for any other message.
pub fn link_dead_index(msg: &RawGenlMessage, family: u16) -> Option<u32> {
    if msg.nl_type != family || msg.cmd != cmd::LINK_DEAD {
        return None;
    }
    find_attr(&msg.attrs, attr::INDEX).and_then(u32_of)
}

/// The payload of the first attribute of `kind` (flag bits ignored).
fn find_attr(attrs: &[(u16, Vec<u8>)], kind: u16) -> Option<&[u8]> {
    attrs
        .iter()
        .find(|(k, _)| *k & 0x3fff == kind)
        .map(|(_, v)| v.as_slice())
}

fn u16_of(b: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(..2)?.try_into().ok()?))
}

/// A u32 payload.
pub fn u32_of(b: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(..4)?.try_into().ok()?))
}

/// The attributes nested in `payload`.
pub fn parse_nested(payload: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = payload;
    while rest.len() >= 4 {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            break;
        }
        out.push((kind, rest[4..len].to_vec()));
        let padded = (len + 3) & !3;
        rest = &rest[padded.min(rest.len())..];
    }
    out
}

/// `(index, connected)` of every device in a STATUS reply.
pub fn parse_status(replies: &[ReplyAttrs]) -> Vec<(u32, bool)> {
    let mut out = Vec::new();
    for a in replies.iter().flatten() {
        if *a.nla_type().nla_type() != attr::DEVICE_LIST {
            continue;
        }
        for (kind, item) in parse_nested(a.nla_payload().as_ref()) {
            if kind != DEVICE_ITEM {
                continue;
            }
            let fields = parse_nested(&item);
            let index = find_attr(&fields, DEVICE_INDEX).and_then(u32_of);
            let connected = find_attr(&fields, DEVICE_CONNECTED)
                .is_some_and(|v| v.first().copied().unwrap_or(0) != 0);
            if let Some(i) = index {
                out.push((i, connected));
            }
        }
    }
    out
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    //! Expected bytes are written out by hand from the netlink layout:
    //! nlmsghdr = len u32 · type u16 · flags u16 · seq u32 · pid u32;
    //! genlmsghdr = cmd u8 · version u8 · reserved u16; nlattr = len u16
    //! (header + payload, without padding) · type u16 (0x8000 = nested),
    //! payload padded with zeros to 4 bytes. Host order is little endian.
    use super::*;

    /// `NLM_F_REQUEST | NLM_F_ACK`.
    const FLAGS: [u8; 2] = [0x05, 0x00];

    #[test]
    fn getfamily_nbd() {
        let b = to_bytes(&get_family(1, "nbd").unwrap()).unwrap();
        #[rustfmt::skip]
        let want: Vec<u8> = [
            &[28, 0, 0, 0][..], &[0x10, 0x00], &FLAGS, &[1, 0, 0, 0], &[0, 0, 0, 0],
            &[3, 2, 0, 0],                       // CTRL_CMD_GETFAMILY, version 2
            &[8, 0, 2, 0], b"nbd\0",             // CTRL_ATTR_FAMILY_NAME "nbd\0"
        ].concat();
        assert_eq!(b, want);
    }

    #[test]
    fn disconnect_nbd3() {
        let b = to_bytes(&disconnect(0x1a, 7, 3).unwrap()).unwrap();
        #[rustfmt::skip]
        let want: Vec<u8> = [
            &[28, 0, 0, 0][..], &[0x1a, 0x00], &FLAGS, &[7, 0, 0, 0], &[0, 0, 0, 0],
            &[2, 1, 0, 0],                       // NBD_CMD_DISCONNECT, version 1
            &[8, 0, 1, 0], &[3, 0, 0, 0],        // NBD_ATTR_INDEX = 3
        ].concat();
        assert_eq!(b, want);
    }

    #[test]
    fn connect_two_sockets_with_padding() {
        let spec = ConnectSpec {
            index: Some(0),
            sockets: vec![5, 6],
            size_bytes: 1 << 30,
            block_size: 4096,
            timeout_secs: 30,
            dead_conn_timeout_secs: 120,
            server_flags: 0x01ed,
            client_flags: CFLAG_DESTROY_ON_DISCONNECT,
            backend: Some("v1".into()),
        };
        let b = to_bytes(&connect(0x1a, 9, &spec).unwrap()).unwrap();
        #[rustfmt::skip]
        let want: Vec<u8> = [
            // nlmsghdr: 16 + genl 4 + attrs 8 + 6*12 + 28 + 8 = 136
            &[136, 0, 0, 0][..], &[0x1a, 0x00], &FLAGS, &[9, 0, 0, 0], &[0, 0, 0, 0],
            &[1, 1, 0, 0],                                   // NBD_CMD_CONNECT, v1
            &[8, 0, 1, 0], &[0, 0, 0, 0],                    // INDEX 0
            &[12, 0, 2, 0], &[0, 0, 0, 0x40, 0, 0, 0, 0],    // SIZE_BYTES 1 GiB
            &[12, 0, 3, 0], &[0, 0x10, 0, 0, 0, 0, 0, 0],    // BLOCK_SIZE_BYTES 4096
            &[12, 0, 4, 0], &[30, 0, 0, 0, 0, 0, 0, 0],      // TIMEOUT 30
            &[12, 0, 8, 0], &[120, 0, 0, 0, 0, 0, 0, 0],     // DEAD_CONN_TIMEOUT 120
            &[12, 0, 5, 0], &[0xed, 0x01, 0, 0, 0, 0, 0, 0], // SERVER_FLAGS
            &[12, 0, 6, 0], &[1, 0, 0, 0, 0, 0, 0, 0],       // CLIENT_FLAGS destroy
            &[28, 0, 0x07, 0x80],                            // SOCKETS | NLA_F_NESTED
            &[12, 0, 0x01, 0x80],                            //   SOCK_ITEM | nested
            &[8, 0, 1, 0], &[5, 0, 0, 0],                    //     SOCK_FD 5
            &[12, 0, 0x01, 0x80],                            //   SOCK_ITEM | nested
            &[8, 0, 1, 0], &[6, 0, 0, 0],                    //     SOCK_FD 6
            &[7, 0, 10, 0], b"v1\0", &[0],                   // BACKEND "v1\0" + 1 pad
        ].concat();
        assert_eq!(b, want);
    }

    #[test]
    fn connect_without_index_lets_the_kernel_choose() {
        let spec = ConnectSpec {
            index: None,
            sockets: vec![4],
            size_bytes: 4096,
            block_size: 512,
            timeout_secs: 0,
            dead_conn_timeout_secs: 0,
            server_flags: 0,
            client_flags: 0,
            backend: None,
        };
        let b = to_bytes(&connect(0x1a, 1, &spec).unwrap()).unwrap();
        // No INDEX attribute: the first attribute is SIZE_BYTES.
        assert_eq!(&b[20..24], &[12, 0, 2, 0]);
        assert_eq!(b.len(), 16 + 4 + 6 * 12 + (4 + 12));
        assert_eq!(
            u32::from_le_bytes(b[..4].try_into().unwrap()) as usize,
            b.len()
        );
    }

    #[test]
    fn reconfigure_replaces_one_socket() {
        let b = to_bytes(&reconfigure(0x1a, 4, 2, &[11]).unwrap()).unwrap();
        #[rustfmt::skip]
        let want: Vec<u8> = [
            &[44, 0, 0, 0][..], &[0x1a, 0x00], &FLAGS, &[4, 0, 0, 0], &[0, 0, 0, 0],
            &[3, 1, 0, 0],                       // NBD_CMD_RECONFIGURE, v1
            &[8, 0, 1, 0], &[2, 0, 0, 0],        // INDEX 2
            &[16, 0, 0x07, 0x80],                // SOCKETS | NLA_F_NESTED
            &[12, 0, 0x01, 0x80],                //   SOCK_ITEM | nested
            &[8, 0, 1, 0], &[11, 0, 0, 0],       //     SOCK_FD 11
        ].concat();
        assert_eq!(b, want);
    }

    #[test]
    fn status_of_all_and_of_one() {
        let all = to_bytes(&status(0x1a, 2, None).unwrap()).unwrap();
        #[rustfmt::skip]
        let want: Vec<u8> = [
            &[20, 0, 0, 0][..], &[0x1a, 0x00], &FLAGS, &[2, 0, 0, 0], &[0, 0, 0, 0],
            &[5, 1, 0, 0],                       // NBD_CMD_STATUS, v1, no attributes
        ].concat();
        assert_eq!(all, want);
        let one = to_bytes(&status(0x1a, 3, Some(1)).unwrap()).unwrap();
        assert_eq!(one.len(), 28);
        assert_eq!(&one[20..], &[8, 0, 1, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn status_reply_parsing() {
        // DEVICE_LIST { DEVICE_ITEM { INDEX 0, CONNECTED 1 }, DEVICE_ITEM { INDEX 4, CONNECTED 0 } }
        #[rustfmt::skip]
        let item = |i: u8, c: u8| -> Vec<u8> {
            [&[20, 0, 0x01, 0x80][..], &[8, 0, 1, 0, i, 0, 0, 0], &[5, 0, 2, 0, c, 0, 0, 0]].concat()
        };
        let payload = [item(0, 1), item(4, 0)].concat();
        let list = NlattrBuilder::default()
            .nla_type(
                AttrTypeBuilder::default()
                    .nla_type(attr::DEVICE_LIST)
                    .nla_nested(true)
                    .build()
                    .unwrap(),
            )
            .nla_payload(payload)
            .build()
            .unwrap();
        assert_eq!(parse_status(&[vec![list]]), [(0, true), (4, false)]);
    }

    #[test]
    fn getfamily_reply_with_multicast_groups() {
        // CTRL_CMD_NEWFAMILY reply for "nbd" as the kernel lays it out: the
        // group list is nested twice, the item types are positions (1, 2),
        // and the u16 id and the group names carry padding.
        #[rustfmt::skip]
        let datagram: Vec<u8> = [
            &[104, 0, 0, 0][..], &[0x10, 0x00], &[0, 0], &[1, 0, 0, 0], &[0, 0, 0, 0],
            &[1, 2, 0, 0],                               // CTRL_CMD_NEWFAMILY, v2
            &[8, 0, 2, 0], b"nbd\0",                    // FAMILY_NAME "nbd"
            &[6, 0, 1, 0], &[0x1a, 0x00], &[0, 0],       // FAMILY_ID 0x1a + 2 pad
            &[8, 0, 3, 0], &[1, 0, 0, 0],                // VERSION 1
            &[60, 0, 0x07, 0x80],                        // MCAST_GROUPS | NLA_F_NESTED
            &[32, 0, 1, 0],                              //   item 1
            &[8, 0, 2, 0], &[5, 0, 0, 0],                //     GRP_ID 5
            &[17, 0, 1, 0], b"nbd_mc_group\0", &[0, 0, 0], //   GRP_NAME + 3 pad
            &[24, 0, 2, 0],                              //   item 2
            &[8, 0, 2, 0], &[9, 0, 0, 0],                //     GRP_ID 9
            &[10, 0, 1, 0], b"other\0", &[0, 0],        //     GRP_NAME + 2 pad
        ].concat();
        assert_eq!(datagram.len(), 104);
        let msgs = parse_messages(&datagram);
        assert_eq!(msgs.len(), 1);
        assert_eq!((msgs[0].nl_type, msgs[0].cmd), (GENL_ID_CTRL, 1));
        let fam = family_of(&msgs[0].attrs).unwrap();
        assert_eq!(fam.id, 0x1a);
        assert_eq!(
            fam.mcast_groups,
            [("nbd_mc_group".to_string(), 5), ("other".to_string(), 9)]
        );
        assert_eq!(fam.mcast_group(NBD_MCAST_GROUP), Some(5));
        assert_eq!(fam.mcast_group("missing"), None);
    }

    #[test]
    fn getfamily_reply_without_groups_or_id() {
        // An old kernel's family without multicast groups: still a family.
        let only_id = [(CTRL_ATTR_FAMILY_ID, vec![0x1a, 0x00])];
        let fam = family_of(&only_id).unwrap();
        assert_eq!((fam.id, fam.mcast_group(NBD_MCAST_GROUP)), (0x1a, None));
        // A group item lacking its id is skipped, not misread.
        #[rustfmt::skip]
        let groups: Vec<u8> = [
            &[24, 0, 1, 0][..],                          // item 1, name only
            &[17, 0, 1, 0], b"nbd_mc_group\0", &[0, 0, 0],
        ].concat();
        let attrs = [
            (CTRL_ATTR_FAMILY_ID, vec![0x1a, 0x00]),
            (CTRL_ATTR_MCAST_GROUPS, groups),
        ];
        assert!(family_of(&attrs).unwrap().mcast_groups.is_empty());
        assert_eq!(
            family_of(&[(CTRL_ATTR_FAMILY_NAME, b"nbd\0".to_vec())]),
            None
        );
    }

    #[test]
    fn link_dead_notifications() {
        // One datagram, three multicast messages: LINK_DEAD of nbd3, a
        // STATUS-shaped message, and LINK_DEAD from another family id.
        #[rustfmt::skip]
        let msg = |family: u8, command: u8, index: u8| -> Vec<u8> {
            [
                &[28, 0, 0, 0][..], &[family, 0x00], &[0, 0], &[0, 0, 0, 0], &[0, 0, 0, 0],
                &[command, 1, 0, 0],
                &[8, 0, 1, 0], &[index, 0, 0, 0],        // NBD_ATTR_INDEX
            ].concat()
        };
        let datagram = [msg(0x1a, 4, 3), msg(0x1a, 5, 7), msg(0x1b, 4, 8)].concat();
        let msgs = parse_messages(&datagram);
        assert_eq!(msgs.len(), 3);
        let found: Vec<Option<u32>> = msgs.iter().map(|m| link_dead_index(m, 0x1a)).collect();
        assert_eq!(found, [Some(3), None, None]);
        let truncated = parse_messages(&msg(0x1a, 4, 3)[..20]);
        assert!(truncated.is_empty(), "the header says 28 bytes, 20 arrived");
        // LINK_DEAD without an index names no device.
        let mut no_index = msg(0x1a, 4, 3);
        no_index[0] = 20;
        no_index.truncate(20);
        let m = parse_messages(&no_index);
        assert_eq!(m.len(), 1);
        assert_eq!(link_dead_index(&m[0], 0x1a), None);
    }
}
