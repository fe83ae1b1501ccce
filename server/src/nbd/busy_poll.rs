//! Busy-polling a connection for its next request.
//!
//! A client that sends one request at a time (queue depth 1) waits for each
//! reply before it sends the next, so the connection's task goes idle after
//! every request and its worker thread parks in `epoll_wait`. Waking a
//! parked thread is the expensive part of such a round trip on a VM: the
//! vCPU halts, and the client's next request has to wake it through the
//! hypervisor (a server on the client's own vCPU answered three times as
//! fast, see docs/benchmarks.md, session 13). Waiting a little while for the
//! next request without parking — yielding to the runtime between looks,
//! so other tasks run and the reactor keeps polling the sockets — keeps the
//! vCPU awake for the round trip, as the kernel's `net.core.busy_poll` does
//! for NIC queues.
//!
//! Polling is only for a client that waits for each short reply before it
//! sends its next request: one that pipelines has work of its own with the
//! replies it already has, and polling took CPU it needed (4 KiB random
//! reads at QD 32 lost a tenth, since a client slower than the server sends
//! most requests into an idle connection too; only a long run of requests
//! with none overlapping tells the two apart). After a large transfer, the
//! copy outlasts a wake-up many times over, and polling slowed 1 MiB reads
//! at QD 8 by a tenth.
//!
//! Polling is only worth it while the client runs on another CPU: a client
//! on the polling thread's own CPU cannot send while the poller holds that
//! CPU (polling halved QD 1 reads with fio and ballastd on one vCPU). The
//! socket tells where the client's last request came in (`SO_INCOMING_CPU`:
//! over loopback, the CPU the client sent from), so a connection polls only
//! when that is not the CPU its task runs on.
//!
//! Polling costs CPU while it waits, so it is bounded per wait, and a
//! connection whose client did not send within the budget (it is idle, or
//! thinks longer between requests) stops polling for a growing number of
//! requests, so an idle or slow connection costs one budget per burst of
//! requests, not one per request.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufRead;

use super::socket_hints::SocketHints;

/// The CPU this thread runs on now.
fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu takes no arguments and only reads the calling
    // thread's state.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).ok()
}

/// Largest READ or WRITE after which a connection may poll for the next
/// request.
const SMALL: u64 = 128 << 10;

/// Small requests in a row, each arriving with nothing else in flight,
/// after which a connection polls.
const SYNC_RUN: u32 = 256;

/// Most requests a connection skips polling for after a poll that timed
/// out (the back-off doubles up to this).
const MAX_SKIP: u32 = 256;

/// One connection's polling state.
pub(crate) struct BusyPoll {
    budget: Duration,
    /// Requests still to go before the next poll.
    skip: u32,
    /// What `skip` is set to after the next poll that times out.
    backoff: u32,
    /// Small requests in a row that arrived alone.
    sync_run: u32,
}

impl BusyPoll {
    /// Polls for up to `budget` each time (zero: never).
    pub fn new(budget: Duration) -> BusyPoll {
        BusyPoll {
            budget,
            skip: 0,
            backoff: 1,
            sync_run: 0,
        }
    }

    /// Records a request: the bytes it moves (READ or WRITE length, else
    /// 0) and whether it arrived with no other request in flight.
    pub fn note_request(&mut self, moves: u64, alone: bool) {
        self.sync_run = if moves <= SMALL && alone {
            self.sync_run.saturating_add(1)
        } else {
            0
        };
    }

    /// Returns once `rd` has bytes to read (or an error or end of stream to
    /// report), or the budget ran out; the caller then reads as usual.
    pub async fn wait<R: AsyncBufRead + SocketHints + Unpin>(&mut self, rd: &mut R) {
        if self.budget.is_zero() || self.sync_run < SYNC_RUN {
            return;
        }
        if ready(rd).await {
            return;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return;
        }
        if let (Some(client), Some(here)) = (rd.incoming_cpu(), current_cpu()) {
            if client == here {
                return;
            }
        }
        let start = Instant::now();
        loop {
            // Lets the connection's reply writer run first (it is usually
            // what was just woken), then the reactor poll the sockets.
            tokio::task::yield_now().await;
            if ready(rd).await {
                self.backoff = 1;
                return;
            }
            if start.elapsed() >= self.budget {
                self.skip = self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_SKIP);
                return;
            }
        }
    }
}

/// Whether a read from `rd` would complete now. Nothing is consumed: bytes
/// read from the socket stay in `rd`'s buffer.
async fn ready<R: AsyncBufRead + Unpin>(rd: &mut R) -> bool {
    poll_fn(|cx| match Pin::new(&mut *rd).poll_fill_buf(cx) {
        Poll::Ready(_) => Poll::Ready(true),
        Poll::Pending => Poll::Ready(false),
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncWriteExt, BufReader, DuplexStream};

    impl SocketHints for BufReader<DuplexStream> {}

    /// A poller whose client has been sending one short request at a time.
    fn synchronous(budget: Duration) -> BusyPoll {
        let mut p = BusyPoll::new(budget);
        for _ in 0..SYNC_RUN {
            p.note_request(4096, true);
        }
        p
    }

    #[test]
    fn polls_only_for_a_run_of_lone_small_requests() {
        let mut p = BusyPoll::new(Duration::from_micros(100));
        for _ in 1..SYNC_RUN {
            p.note_request(4096, true);
        }
        assert!(p.sync_run < SYNC_RUN);
        p.note_request(0, true);
        assert_eq!(p.sync_run, SYNC_RUN, "non-transfer commands count as small");
        p.note_request(4096, false);
        assert_eq!(p.sync_run, 0, "an overlapping request ends the run");
        let mut p = synchronous(Duration::from_micros(100));
        p.note_request(1 << 20, true);
        assert_eq!(p.sync_run, 0, "a large transfer ends the run");
    }

    #[tokio::test]
    async fn a_pipelining_client_is_not_polled_for() {
        let (_client, server) = tokio::io::duplex(64);
        let mut rd = BufReader::new(server);
        let mut p = BusyPoll::new(Duration::from_secs(10));
        let t = Instant::now();
        p.wait(&mut rd).await;
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!((p.skip, p.backoff), (0, 1), "no poll was made");
    }

    #[tokio::test]
    async fn returns_at_once_when_bytes_wait() {
        let (client, server) = tokio::io::duplex(64);
        let mut rd = BufReader::new(server);
        let mut client = client;
        client.write_all(b"x").await.unwrap();
        let mut p = BusyPoll::new(Duration::from_secs(10));
        let t = Instant::now();
        p.wait(&mut rd).await;
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(
            tokio::io::AsyncBufReadExt::fill_buf(&mut rd).await.unwrap(),
            b"x"
        );
    }

    #[tokio::test]
    async fn sees_bytes_sent_while_polling() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut rd = BufReader::new(server);
        let sender = tokio::spawn(async move {
            tokio::task::yield_now().await;
            client.write_all(b"y").await.unwrap();
            client
        });
        let mut p = BusyPoll::new(Duration::from_secs(10));
        let t = Instant::now();
        p.wait(&mut rd).await;
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(
            p.backoff, 1,
            "a poll that saw its request resets the back-off"
        );
        assert_eq!(
            tokio::io::AsyncBufReadExt::fill_buf(&mut rd).await.unwrap(),
            b"y"
        );
        drop(sender.await.unwrap());
    }

    #[tokio::test]
    async fn an_idle_connection_backs_off() {
        let (_client, server) = tokio::io::duplex(64);
        let mut rd = BufReader::new(server);
        let mut p = synchronous(Duration::from_micros(200));
        let mut polled = 0;
        for _ in 0..600 {
            let skipping = p.skip > 0;
            p.wait(&mut rd).await;
            if !skipping {
                polled += 1;
            }
        }
        // 1 + 2 + 4 + … + 256 skips, then 256 at a time: 10 polls cover
        // the first 600 waits.
        assert_eq!(polled, 10);
        assert_eq!(p.backoff, MAX_SKIP);
    }

    #[tokio::test]
    async fn zero_budget_never_polls() {
        let (_client, server) = tokio::io::duplex(64);
        let mut rd = BufReader::new(server);
        let mut p = synchronous(Duration::ZERO);
        p.wait(&mut rd).await;
        assert_eq!((p.skip, p.backoff), (0, 1));
    }
}
