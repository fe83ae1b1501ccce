//! What the reconnect watcher of a kernel device does about each thing it
//! sees, as a state machine without I/O (the process around it is
//! [`super::watcher`]).
//!
//! The kernel multicasts `NBD_CMD_LINK_DEAD` when a connection of a device
//! dies and then waits the dead-connection timeout for `NBD_CMD_RECONFIGURE`
//! with fresh sockets. A notification can be missed (the socket's receive
//! buffer overran, or it died before the watcher joined the group), and
//! `NBD_CMD_STATUS` does not help there: it reports a device as connected
//! as long as it is configured, dead links or not. So besides reacting to
//! notifications the watcher periodically *probes*: it hands over fresh
//! sockets anyway. The kernel swaps them in for dead connections and drops
//! the rest (a RECONFIGURE without a dead connection succeeds and changes
//! nothing), so a probe is one handshake with ballastd and never harms.
//! STATUS is still polled, to notice that the device went away.

use std::time::Duration;

use super::reconnect::ReconnectPolicy;

/// Something the watcher noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `NBD_CMD_LINK_DEAD` for the device with this index.
    LinkDead(u32),
    /// Notifications may have been dropped (`ENOBUFS` on the socket).
    Overrun,
    /// Time for the periodic probe.
    ProbeDue,
    /// `NBD_CMD_STATUS` said the device is (`Some(true)`) or is not
    /// connected; `None` when the driver could not be asked.
    Status(Option<bool>),
    /// The backoff delay after a failed reconnect has passed.
    RetryDue,
    /// Fresh sockets were handed over.
    Reconnected,
    /// Dialling or RECONFIGURE failed.
    ReconnectFailed,
    /// SIGTERM or SIGINT (`ballast detach`).
    Terminate,
}

/// What to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Keep waiting.
    Nothing,
    /// Dial the server and send RECONFIGURE now.
    Reconnect,
    /// Dial again after this delay (send [`Event::RetryDue`] then).
    RetryAfter(Duration),
    /// Stop watching.
    Exit(ExitReason),
}

/// Why the watcher stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The device is no longer connected: nothing left to keep alive.
    Disconnected,
    /// Asked to stop.
    Terminated,
    /// The nbd driver stopped answering STATUS for
    /// [`MAX_UNANSWERED_POLLS`] polls in a row (module unloaded).
    DriverGone,
}

/// STATUS polls without an answer before the watcher gives up.
pub const MAX_UNANSWERED_POLLS: u32 = 12;

/// The watcher's state for one device.
#[derive(Debug, Clone)]
pub struct Watch {
    index: u32,
    policy: ReconnectPolicy,
    /// Set while sockets are being handed over or a retry is pending: the
    /// failed dials so far.
    outage: Option<u32>,
    unanswered: u32,
}

impl Watch {
    /// A watcher of `/dev/nbd{index}`, retrying with `policy`'s backoff.
    pub fn new(index: u32, policy: ReconnectPolicy) -> Watch {
        Watch {
            index,
            policy,
            outage: None,
            unanswered: 0,
        }
    }

    /// True while a reconnect is under way or waiting for its retry.
    pub fn reconnecting(&self) -> bool {
        self.outage.is_some()
    }

    /// The next step after `event`.
    pub fn on(&mut self, event: Event) -> Action {
        match event {
            Event::Terminate => Action::Exit(ExitReason::Terminated),
            Event::Status(Some(false)) => Action::Exit(ExitReason::Disconnected),
            Event::Status(Some(true)) => {
                self.unanswered = 0;
                Action::Nothing
            }
            Event::Status(None) => {
                self.unanswered += 1;
                if self.unanswered >= MAX_UNANSWERED_POLLS {
                    Action::Exit(ExitReason::DriverGone)
                } else {
                    Action::Nothing
                }
            }
            Event::LinkDead(i) if i != self.index => Action::Nothing,
            // A reconnect already under way (or its retry) covers this
            // one too: the kernel replaces every dead link it finds.
            Event::LinkDead(_) | Event::Overrun | Event::ProbeDue if self.reconnecting() => {
                Action::Nothing
            }
            Event::LinkDead(_) | Event::Overrun | Event::ProbeDue => {
                self.outage = Some(0);
                Action::Reconnect
            }
            Event::RetryDue if self.reconnecting() => Action::Reconnect,
            Event::RetryDue => Action::Nothing,
            Event::Reconnected => {
                self.outage = None;
                Action::Nothing
            }
            Event::ReconnectFailed => {
                let attempt = self.outage.unwrap_or(0);
                self.outage = Some(attempt.saturating_add(1));
                // The policy's window is for FUSE requests waiting on a
                // connection; a device waits for us as long as it is
                // configured (even past its dead-connection timeout a
                // RECONFIGURE revives it), so only the backoff applies.
                Action::RetryAfter(self.policy.delay(attempt))
            }
        }
    }
}

/// How often the watcher probes with fresh sockets: well inside the
/// dead-connection timeout (so a missed notification costs at most half of
/// it), at most every 30 s, at least every second.
pub fn probe_interval(dead_conn_timeout: Duration) -> Duration {
    const MOST: Duration = Duration::from_secs(30);
    if dead_conn_timeout.is_zero() {
        // No grace period: I/O fails at once, and waiting longer for the
        // probe does not make that worse.
        return MOST;
    }
    (dead_conn_timeout / 2).clamp(Duration::from_secs(1), MOST)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch() -> Watch {
        Watch::new(3, ReconnectPolicy::default())
    }

    #[test]
    fn link_dead_of_our_device_reconnects_others_are_ignored() {
        let mut w = watch();
        assert_eq!(w.on(Event::LinkDead(4)), Action::Nothing);
        assert!(!w.reconnecting());
        assert_eq!(w.on(Event::LinkDead(3)), Action::Reconnect);
        assert!(w.reconnecting());
        assert_eq!(w.on(Event::Reconnected), Action::Nothing);
        assert!(!w.reconnecting());
    }

    #[test]
    fn failed_reconnects_back_off_and_retry_until_one_works() {
        let mut w = watch();
        assert_eq!(w.on(Event::LinkDead(3)), Action::Reconnect);
        let ms = Duration::from_millis;
        assert_eq!(w.on(Event::ReconnectFailed), Action::RetryAfter(ms(100)));
        // More notifications for the same outage do not start a second
        // reconnect beside the pending retry.
        assert_eq!(w.on(Event::LinkDead(3)), Action::Nothing);
        assert_eq!(w.on(Event::ProbeDue), Action::Nothing);
        assert_eq!(w.on(Event::RetryDue), Action::Reconnect);
        assert_eq!(w.on(Event::ReconnectFailed), Action::RetryAfter(ms(200)));
        for _ in 0..10 {
            w.on(Event::RetryDue);
            w.on(Event::ReconnectFailed);
        }
        // Past any window: still retrying, at the capped delay.
        assert_eq!(w.on(Event::RetryDue), Action::Reconnect);
        assert_eq!(
            w.on(Event::ReconnectFailed),
            Action::RetryAfter(Duration::from_secs(2))
        );
        assert_eq!(w.on(Event::RetryDue), Action::Reconnect);
        assert_eq!(w.on(Event::Reconnected), Action::Nothing);
        // A stale retry timer after success does nothing.
        assert_eq!(w.on(Event::RetryDue), Action::Nothing);
        // The next outage starts from the first delay again.
        assert_eq!(w.on(Event::LinkDead(3)), Action::Reconnect);
        assert_eq!(w.on(Event::ReconnectFailed), Action::RetryAfter(ms(100)));
    }

    #[test]
    fn probes_and_overruns_reconnect_in_case_a_notification_was_missed() {
        let mut w = watch();
        assert_eq!(w.on(Event::ProbeDue), Action::Reconnect);
        assert_eq!(w.on(Event::Reconnected), Action::Nothing);
        assert_eq!(w.on(Event::Overrun), Action::Reconnect);
    }

    #[test]
    fn status_decides_when_to_stop() {
        let mut w = watch();
        assert_eq!(w.on(Event::Status(Some(true))), Action::Nothing);
        assert_eq!(
            w.on(Event::Status(Some(false))),
            Action::Exit(ExitReason::Disconnected)
        );
        // Even in the middle of a reconnect.
        let mut w = watch();
        w.on(Event::LinkDead(3));
        w.on(Event::ReconnectFailed);
        assert_eq!(
            w.on(Event::Status(Some(false))),
            Action::Exit(ExitReason::Disconnected)
        );
        assert_eq!(w.on(Event::Terminate), Action::Exit(ExitReason::Terminated));
    }

    #[test]
    fn a_silent_driver_is_given_up_only_after_many_polls() {
        let mut w = watch();
        for _ in 1..MAX_UNANSWERED_POLLS {
            assert_eq!(w.on(Event::Status(None)), Action::Nothing);
        }
        // One answer resets the count.
        assert_eq!(w.on(Event::Status(Some(true))), Action::Nothing);
        for _ in 1..MAX_UNANSWERED_POLLS {
            assert_eq!(w.on(Event::Status(None)), Action::Nothing);
        }
        assert_eq!(
            w.on(Event::Status(None)),
            Action::Exit(ExitReason::DriverGone)
        );
    }

    #[test]
    fn probe_interval_stays_inside_the_grace_period() {
        let s = Duration::from_secs;
        assert_eq!(probe_interval(s(120)), s(30));
        assert_eq!(probe_interval(s(20)), s(10));
        assert_eq!(probe_interval(s(1)), s(1));
        assert_eq!(probe_interval(Duration::ZERO), s(30));
    }
}
