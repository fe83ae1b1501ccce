//! The reconnect watcher of a kernel attachment: a background `ballast
//! __kernel-watch` process started by `ballast attach` right after
//! `NBD_CMD_CONNECT` and stopped (SIGTERM) by `ballast detach`.
//!
//! It listens on the nbd driver's `nbd_mc_group` multicast group for
//! `NBD_CMD_LINK_DEAD`, probes periodically in case a notification was
//! missed, polls `NBD_CMD_STATUS` to notice the device going away, and lets
//! [`super::watch::Watch`] decide what each of these means. Reconnecting is
//! [`super::kernel::reconnect`], exactly what `attach --reconnect` does.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};

use super::fuse::{spawn_background, tail};
use super::kernel;
use super::netlink::{self, GenlSocket};
use super::reconnect::ReconnectPolicy;
use super::registry::{Record, Registry};
use super::watch::{self, Action, Event, ExitReason, Watch};
use super::AttachError;
use crate::nbd::NbdUri;

/// The hidden subcommand that runs [`run`].
pub const WATCH_COMMAND: &str = "__kernel-watch";
/// How often STATUS is polled.
const STATUS_EVERY: Duration = Duration::from_secs(5);
/// Longest one reconnect (dial, handshake, RECONFIGURE) may take: a host
/// that swallows SYNs would otherwise hold the watcher for minutes.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `attach` waits for the watcher to be listening.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `detach` waits for the watcher to exit after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Room for a few notifications per read; LINK_DEAD is 28 bytes.
const RECV_BUFFER: usize = 16 * 1024;

/// Everything the watcher is told on its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchRequest {
    /// Volume name: finds the record.
    pub volume: String,
    /// The device's index (`/dev/nbdN`).
    pub index: u32,
    /// The export to dial.
    pub nbd_uri: String,
    /// Connections to hand over on each reconnect.
    pub connections: usize,
    /// The device's dead-connection timeout (sets the probe interval).
    pub dead_conn_timeout: Duration,
}

/// The watcher's arguments after the program name.
pub fn watch_args(req: &WatchRequest) -> Vec<String> {
    vec![
        WATCH_COMMAND.into(),
        "--volume".into(),
        req.volume.clone(),
        "--index".into(),
        req.index.to_string(),
        "--nbd-uri".into(),
        req.nbd_uri.clone(),
        "--connections".into(),
        req.connections.to_string(),
        "--dead-conn-timeout".into(),
        req.dead_conn_timeout.as_secs().to_string(),
    ]
}

/// True when `pid` runs and is a watcher of ours (the pid of a dead
/// watcher may belong to an unrelated process by now).
pub fn alive(pid: u32) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => cmdline
            .split(|&b| b == 0)
            .any(|arg| arg == WATCH_COMMAND.as_bytes()),
        Err(_) => false,
    }
}

/// Start the watcher of a recorded kernel attachment and wait until it
/// listens for notifications; it then records its pid. Returns the record
/// with that pid.
pub async fn start(reg: &Registry, req: &WatchRequest) -> Result<Record, AttachError> {
    let (mut child, log) = spawn_background(reg, &req.volume, &watch_args(req))?;
    let pid = child.id();
    let failed = |detail: String| AttachError::WatcherFailed {
        volume: req.volume.clone(),
        detail,
        log: log.clone(),
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(rec) = reg.load(&req.volume)? {
            if rec.attachment.pid == Some(pid) {
                return Ok(rec);
            }
        }
        if let Some(status) = child.try_wait().map_err(AttachError::Io)? {
            return Err(failed(format!("{status}: {}", tail(&log, 3))));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed(format!(
                "not listening within {}s: {}",
                READY_TIMEOUT.as_secs(),
                tail(&log, 3)
            )));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Stop the watcher `pid` (SIGTERM, then SIGKILL after [`EXIT_TIMEOUT`])
/// and wait until it is gone, so it cannot hand sockets to a device that is
/// being disconnected.
pub async fn stop(pid: u32) {
    if !alive(pid) {
        return;
    }
    // SAFETY: kill(2) on a pid just checked to be one of our watchers.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while alive(pid) {
        if Instant::now() > deadline {
            // SAFETY: as above; it ignored SIGTERM (stuck in a syscall).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            tokio::time::sleep(Duration::from_millis(50)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A netlink socket that joined the nbd driver's multicast group.
struct Listener {
    fd: AsyncFd<OwnedFd>,
    family: u16,
    buf: Vec<u8>,
}

fn os_err(op: &'static str) -> impl Fn(io::Error) -> AttachError {
    move |e| AttachError::Netlink {
        op,
        detail: e.to_string(),
    }
}

impl Listener {
    /// Resolve the nbd family and its group, then join it.
    fn join(volume: &str) -> Result<Listener, AttachError> {
        let no_driver = |detail: String| AttachError::NoKernelNbd {
            volume: volume.to_string(),
            detail,
        };
        let mut ctrl = GenlSocket::open().map_err(|e| no_driver(e.to_string()))?;
        let family = ctrl
            .resolve_family(netlink::NBD_FAMILY)
            .map_err(|e| no_driver(e.to_string()))?
            .ok_or_else(|| no_driver("the generic netlink family \"nbd\" does not exist".into()))?;
        let group = family
            .mcast_group(netlink::NBD_MCAST_GROUP)
            .ok_or_else(|| AttachError::Netlink {
                op: "joining the nbd multicast group",
                detail: format!(
                    "the nbd family has no group {:?} (groups: {:?})",
                    netlink::NBD_MCAST_GROUP,
                    family.mcast_groups
                ),
            })?;
        // A socket of our own rather than neli's: it must be non-blocking
        // for tokio, and notifications are parsed from the raw bytes.
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(os_err("opening a netlink socket")(
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; all-zero is valid (port id 0
        // lets the kernel assign one).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_nl for the length given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(os_err("binding the netlink socket")(
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: the option value is a u32 that outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_ADD_MEMBERSHIP,
                (&group as *const u32).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(os_err("joining the nbd multicast group")(
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: the OwnedFd moves into the AsyncFd and stays open, the
        // same descriptor, until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| AttachError::Io(e.into()))?;
        Ok(Listener {
            fd,
            family: family.id,
            buf: vec![0; RECV_BUFFER],
        })
    }

    /// The events of the next datagram: a `LinkDead` per notification
    /// (of any device; the state machine picks ours), or `Overrun` when the
    /// kernel had to drop messages.
    async fn next(&mut self) -> io::Result<Vec<Event>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let buf = &mut self.buf;
            let got = guard.try_io(|fd| {
                // SAFETY: `buf` is writable for its whole length.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match got {
                Ok(Ok(n)) => {
                    return Ok(netlink::parse_messages(&self.buf[..n])
                        .iter()
                        .filter_map(|m| netlink::link_dead_index(m, self.family))
                        .map(Event::LinkDead)
                        .collect())
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Ok(vec![Event::Overrun])
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// The next events of the listener; never, once it has failed.
async fn next_notification(listener: &mut Option<Listener>) -> io::Result<Vec<Event>> {
    match listener {
        Some(l) => l.next().await,
        None => std::future::pending().await,
    }
}

/// Put our pid into the attachment's record, which tells `attach` that we
/// are listening and `detach` whom to stop.
fn claim(reg: &Registry, volume: &str) -> Result<(), AttachError> {
    let mut rec = reg
        .load(volume)?
        .ok_or_else(|| AttachError::NotAttached(volume.to_string()))?;
    rec.attachment.pid = Some(std::process::id());
    reg.save(&rec)
}

/// Run the watcher until the device is disconnected or we are told to stop.
pub async fn run(req: WatchRequest) -> Result<(), AttachError> {
    super::serve::log_init();
    let reg = Registry::from_env();
    let uri = NbdUri::parse(&req.nbd_uri).map_err(|source| AttachError::Nbd {
        uri: req.nbd_uri.clone(),
        source,
    })?;
    let device = kernel::device_path(req.index);
    let mut listener = Some(Listener::join(&req.volume)?);
    claim(&reg, &req.volume)?;
    let probe_every = watch::probe_interval(req.dead_conn_timeout);
    tracing::info!(
        volume = %req.volume,
        %device,
        uri = %uri,
        probe_secs = probe_every.as_secs(),
        "watching for dead connections"
    );

    let mut term = signal(SignalKind::terminate()).map_err(AttachError::Io)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AttachError::Io)?;
    let mut hup = signal(SignalKind::hangup()).map_err(AttachError::Io)?;
    let mut status = tokio::time::interval(STATUS_EVERY);
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probe =
        tokio::time::interval_at(tokio::time::Instant::now() + probe_every, probe_every);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let retry = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(retry);
    let mut retry_armed = false;
    let mut machine = Watch::new(req.index, ReconnectPolicy::default());

    loop {
        let events = tokio::select! {
            got = next_notification(&mut listener) => match got {
                Ok(events) => events,
                Err(e) => {
                    // Without notifications the probes still keep the
                    // device alive, only later.
                    tracing::error!(error = %e, "the multicast socket failed; relying on probes");
                    listener = None;
                    vec![Event::Overrun]
                }
            },
            _ = status.tick() => vec![Event::Status(kernel::connected(req.index))],
            _ = probe.tick() => vec![Event::ProbeDue],
            _ = &mut retry, if retry_armed => {
                retry_armed = false;
                vec![Event::RetryDue]
            }
            _ = term.recv() => vec![Event::Terminate],
            _ = int.recv() => vec![Event::Terminate],
            // The attach command's terminal may go away: not a reason to stop.
            _ = hup.recv() => Vec::new(),
        };
        for event in events {
            // Probes find nothing dead almost always: keep them out of the log.
            let quiet = event == Event::ProbeDue;
            if let Event::LinkDead(i) = event {
                if i == req.index {
                    tracing::warn!(%device, "the kernel reports a dead connection");
                }
            }
            let mut action = machine.on(event);
            loop {
                match action {
                    Action::Nothing => break,
                    Action::RetryAfter(d) => {
                        retry.as_mut().reset(tokio::time::Instant::now() + d);
                        retry_armed = true;
                        break;
                    }
                    Action::Exit(why) => {
                        match why {
                            ExitReason::Terminated => tracing::info!("stopping on request"),
                            ExitReason::Disconnected => {
                                tracing::info!(%device, "the device is no longer connected; exiting")
                            }
                            ExitReason::DriverGone => {
                                tracing::warn!("the nbd driver no longer answers STATUS; exiting")
                            }
                        }
                        return Ok(());
                    }
                    Action::Reconnect => {
                        let attempt = tokio::time::timeout(
                            RECONNECT_TIMEOUT,
                            kernel::reconnect(req.index, &uri, req.connections),
                        );
                        // A dial to a dead host can be slow; `detach` must
                        // not wait for it.
                        let outcome = tokio::select! {
                            r = attempt => r,
                            _ = term.recv() => {
                                tracing::info!("stopping on request (a reconnect was under way)");
                                return Ok(());
                            }
                        };
                        action = match outcome {
                            Ok(Ok(())) => {
                                if quiet {
                                    tracing::debug!(%device, "probe: fresh connections handed over");
                                } else {
                                    tracing::info!(%device, "fresh connections handed over");
                                }
                                machine.on(Event::Reconnected)
                            }
                            Ok(Err(e)) => {
                                tracing::warn!(%device, error = %e, "reconnect failed");
                                machine.on(Event::ReconnectFailed)
                            }
                            Err(_) => {
                                tracing::warn!(
                                    %device,
                                    "reconnect took longer than {}s",
                                    RECONNECT_TIMEOUT.as_secs()
                                );
                                machine.on(Event::ReconnectFailed)
                            }
                        };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_arguments_round_trip_through_the_cli() {
        let req = WatchRequest {
            volume: "v1".into(),
            index: 3,
            nbd_uri: "nbd://127.0.0.1:10809/v1".into(),
            connections: 4,
            dead_conn_timeout: Duration::from_secs(120),
        };
        let mut argv = vec!["ballast".to_string()];
        argv.extend(watch_args(&req));
        let cli = crate::cli::Cli::try_parse_from_args(&argv).unwrap();
        assert_eq!(cli.watch_request(), Some(req));
    }

    #[test]
    fn only_our_watchers_count_as_alive() {
        // This test process is not a watcher; pid 0 never is.
        assert!(!alive(std::process::id()));
        assert!(!alive(0));
    }
}
