//! Opening NBD connections for attachments: TCP as every client opens it
//! ([`connect_tcp`]: `TCP_NODELAY`, a non-pacing congestion control to a
//! server on this host) plus keepalive (so a vanished host is noticed in
//! about half a minute even when no request is waiting), negotiated either
//! into an [`NbdClient`] (FUSE) or left as a raw socket in transmission mode
//! for the kernel.

use std::os::fd::AsRawFd;

use tokio::net::TcpStream;

use crate::nbd::{
    connect_tcp, negotiate, ConnectOptions, NbdAddr, NbdClient, NbdError, NbdUri, Negotiated,
};

/// Seconds of silence before the first keepalive probe.
const KEEPALIVE_IDLE_SECS: libc::c_int = 10;
/// Seconds between probes.
const KEEPALIVE_INTERVAL_SECS: libc::c_int = 5;
/// Unanswered probes before the kernel declares the peer dead.
const KEEPALIVE_PROBES: libc::c_int = 3;

fn setsockopt_int(fd: libc::c_int, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: `fd` is an open socket owned by the caller; the option value is
    // a valid c_int that outlives the call.
    let _ = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// [`connect_tcp`] with keepalive set.
pub async fn tcp(host: &str, port: u16, opts: &ConnectOptions) -> Result<TcpStream, NbdError> {
    let stream = connect_tcp(host, port, opts).await?;
    let fd = stream.as_raw_fd();
    // Keepalive tuning is best effort: without it the connection still
    // works, a dead host is only noticed later.
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPIDLE,
        KEEPALIVE_IDLE_SECS,
    );
    setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        KEEPALIVE_INTERVAL_SECS,
    );
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_PROBES);
    Ok(stream)
}

/// Connect and negotiate a pipelined client (structured replies allowed).
pub async fn client(uri: &NbdUri, opts: &ConnectOptions) -> Result<NbdClient, NbdError> {
    match &uri.addr {
        NbdAddr::Tcp { host, port } => {
            let s = tcp(host, *port, opts).await?;
            NbdClient::from_stream(s, uri.clone(), opts, |s| s.into_split()).await
        }
        NbdAddr::Unix(_) => NbdClient::connect_with(uri, opts).await,
    }
}

/// What the kernel may be handed: fixed newstyle, `NBD_OPT_GO`, simple
/// replies only (nbd.ko rejects any reply magic but the simple one) and no
/// extended headers (this client never asks for them).
pub fn kernel_options() -> ConnectOptions {
    ConnectOptions {
        structured_replies: false,
        meta_contexts: Vec::new(),
        request_block_size: false,
        ..ConnectOptions::default()
    }
}

/// Connect over TCP and negotiate with [`kernel_options`], returning the
/// socket in transmission mode as a blocking std stream for the kernel.
pub async fn kernel_socket(uri: &NbdUri) -> Result<(std::net::TcpStream, Negotiated), NbdError> {
    let NbdAddr::Tcp { host, port } = &uri.addr else {
        return Err(NbdError::InvalidUri {
            uri: uri.to_string(),
            reason: "the kernel attach path needs a TCP address (nbd://HOST:PORT/EXPORT)".into(),
        });
    };
    let opts = kernel_options();
    let mut s = tcp(host, *port, &opts).await?;
    let negotiated = negotiate(&mut s, &uri.export, &opts).await?;
    if negotiated.structured_replies {
        // negotiate() only turns them on when asked; this guards the kernel
        // against a future change of the defaults.
        return Err(NbdError::Handshake(
            "structured replies were negotiated on a socket meant for the kernel".into(),
        ));
    }
    let std = s.into_std()?;
    std.set_nonblocking(false)?;
    Ok((std, negotiated))
}
