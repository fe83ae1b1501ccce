//! When and how often a lost NBD connection is dialled again.
//!
//! A ballastd restart (SIGTERM, then start again on the same address) takes
//! from well under a second to a minute (recovery replays the metadata
//! journal). The FUSE server keeps the requests that were in flight and
//! retries them once a new connection is up, dialling with exponential
//! backoff until the reconnect window has passed; after that, requests fail
//! with EIO at once (one quick dial each) until the server is back.

use std::time::Duration;

/// Backoff schedule of one outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Delay before the second dial.
    pub initial: Duration,
    /// Longest delay between dials.
    pub max_delay: Duration,
    /// How long after the connection was lost requests keep waiting for a
    /// new one. Zero: fail at once.
    pub window: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            initial: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            window: Duration::from_secs(60),
        }
    }
}

impl ReconnectPolicy {
    /// A policy with the default backoff and the given window.
    pub fn with_window(window: Duration) -> Self {
        ReconnectPolicy {
            window,
            ..Self::default()
        }
    }

    /// Delay after the failed dial number `attempt` (0-based): doubling from
    /// `initial`, capped at `max_delay`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max_delay)
    }

    /// What to do after the failed dial number `attempt`, `down_for` after
    /// the outage began: `Some(delay)` to sleep and dial again, `None` to
    /// give up. The last sleep is cut so no dial starts after the window.
    pub fn next(&self, attempt: u32, down_for: Duration) -> Option<Duration> {
        let left = self.window.checked_sub(down_for)?;
        if left.is_zero() {
            return None;
        }
        Some(self.delay(attempt).min(left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_and_cap() {
        let p = ReconnectPolicy::default();
        let ms = |a| p.delay(a).as_millis();
        assert_eq!(
            [ms(0), ms(1), ms(2), ms(3), ms(4)],
            [100, 200, 400, 800, 1600]
        );
        assert_eq!(ms(5), 2000);
        assert_eq!(ms(40), 2000, "huge attempt numbers do not overflow");
    }

    #[test]
    fn gives_up_after_the_window() {
        let p = ReconnectPolicy::with_window(Duration::from_secs(10));
        assert_eq!(p.next(0, Duration::ZERO), Some(Duration::from_millis(100)));
        // The last sleep ends exactly at the window.
        assert_eq!(
            p.next(9, Duration::from_millis(9_500)),
            Some(Duration::from_millis(500))
        );
        assert_eq!(p.next(3, Duration::from_secs(10)), None);
        assert_eq!(p.next(3, Duration::from_secs(11)), None);
        let never = ReconnectPolicy::with_window(Duration::ZERO);
        assert_eq!(never.next(0, Duration::ZERO), None);
    }

    #[test]
    fn a_full_outage_dials_about_window_over_max_delay_times() {
        let p = ReconnectPolicy::with_window(Duration::from_secs(60));
        let (mut t, mut dials) = (Duration::ZERO, 1u32);
        while let Some(d) = p.next(dials - 1, t) {
            t += d;
            dials += 1;
        }
        assert_eq!(t, Duration::from_secs(60));
        // 100+200+400+800+1600 ms, then every 2 s.
        assert!((31..=35).contains(&dials), "{dials} dials");
    }
}
