//! What the request loop asks of, and tells, the kernel about a
//! connection's socket: where the client's packets arrive (for
//! `busy_poll`), and how much of a large WRITE payload to wait for before
//! being woken ([`LowWater`]).

use std::os::fd::AsRawFd;
use tokio::io::BufReader;
use tokio::net::tcp::OwnedReadHalf;

/// A connection's read side, as far as socket options go. The defaults
/// suit streams that are not sockets (tests over in-memory pipes).
pub(crate) trait SocketHints {
    /// The CPU that received the connection's last packet, if known.
    fn incoming_cpu(&self) -> Option<usize> {
        None
    }

    /// The socket's receive buffer size, if known.
    fn receive_buffer(&self) -> Option<usize> {
        None
    }

    /// Report the socket readable only once `bytes` are queued
    /// (`SO_RCVLOWAT`; 1 is the kernel's default).
    fn set_low_water(&self, _bytes: usize) {}
}

impl SocketHints for BufReader<OwnedReadHalf> {
    fn incoming_cpu(&self) -> Option<usize> {
        socket2::SockRef::from(self.get_ref().as_ref())
            .cpu_affinity()
            .ok()
    }

    fn receive_buffer(&self) -> Option<usize> {
        socket2::SockRef::from(self.get_ref().as_ref())
            .recv_buffer_size()
            .ok()
    }

    fn set_low_water(&self, bytes: usize) {
        let stream: &tokio::net::TcpStream = self.get_ref().as_ref();
        let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: setsockopt on a socket this half keeps open, with a
        // pointer to a live int and its size.
        let rc = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            // Only a hint: reads work the same without it.
            tracing::debug!(error = %std::io::Error::last_os_error(), "SO_RCVLOWAT not set");
        }
    }
}

/// Payload bytes still to come below which the mark is not worth a
/// system call: one 64 KiB segment, what loopback delivers at a time.
const LOW_WATER_MIN: usize = 64 << 10;

/// The highest mark: one wake-up per four segments.
const LOW_WATER_MAX: usize = 256 << 10;

/// A low-water mark on the socket while a large WRITE payload comes in.
///
/// The reader wants the whole payload before it can do anything with it,
/// yet the kernel wakes it for every segment that arrives (64 KiB over
/// loopback), and each wake-up is work on both sides: the client's send
/// runs our socket's delivery, wake-up included, in its own system call.
/// With 1 MiB writes the client (fio, generating each buffer) is the busier
/// side, so what it saves is throughput: `nbd-ab.sh`, 1 MiB writes at QD 8,
/// 6 s × 4 rounds in turns, 2249–2647 MB/s without the mark and 2574–2751
/// with it, ahead in all 12 runs (docs/benchmarks.md, session 29).
///
/// The mark never exceeds the bytes still to come, so a wait always ends
/// when they have arrived (and end of stream or an error wakes the reader
/// regardless). It stays at a quarter of the receive buffer or below: a
/// mark above half of it makes the kernel grow the buffer and clamp the
/// receive window to the mark, which a long fat network would feel;
/// autotuning has grown the buffer to megabytes by the time a stream of
/// large writes is under way.
pub(crate) struct LowWater {
    set: usize,
    rcvbuf: usize,
}

impl LowWater {
    /// For one payload of `len` bytes on `s` (asks the receive buffer's
    /// size only of payloads large enough for a mark).
    pub fn for_payload(s: &impl SocketHints, len: usize) -> LowWater {
        let rcvbuf = if len > LOW_WATER_MIN {
            s.receive_buffer()
        } else {
            None
        };
        LowWater::new(rcvbuf)
    }

    /// On a socket whose receive buffer is `rcvbuf` bytes.
    fn new(rcvbuf: Option<usize>) -> LowWater {
        LowWater {
            set: 1,
            rcvbuf: rcvbuf.unwrap_or(0),
        }
    }

    /// The mark for `want` payload bytes still to come.
    fn mark(&self, want: usize) -> usize {
        let m = want.min(LOW_WATER_MAX).min(self.rcvbuf / 4);
        if m < LOW_WATER_MIN {
            1
        } else {
            m
        }
    }

    /// Before a read that waits for `want` more payload bytes.
    pub fn before_read(&mut self, s: &impl SocketHints, want: usize) {
        let m = self.mark(want);
        if m != self.set {
            s.set_low_water(m);
            self.set = m;
        }
    }

    /// Back to the default, for the next request's header.
    pub fn reset(&mut self, s: &impl SocketHints) {
        if self.set != 1 {
            s.set_low_water(1);
            self.set = 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[derive(Default)]
    struct Recorder(RefCell<Vec<usize>>);

    impl SocketHints for Recorder {
        fn set_low_water(&self, bytes: usize) {
            self.0.borrow_mut().push(bytes);
        }
    }

    #[test]
    fn the_mark_follows_what_is_left_and_is_reset() {
        let s = Recorder::default();
        let mut lw = LowWater::new(Some(8 << 20));
        for want in [1 << 20, 900 << 10, 200 << 10, 100 << 10, 30 << 10, 10] {
            lw.before_read(&s, want);
        }
        lw.reset(&s);
        lw.reset(&s);
        assert_eq!(*s.0.borrow(), vec![256 << 10, 200 << 10, 100 << 10, 1]);
    }

    #[test]
    fn no_mark_on_a_small_receive_buffer() {
        let s = Recorder::default();
        let mut lw = LowWater::new(Some(128 << 10));
        lw.before_read(&s, 1 << 20);
        lw.reset(&s);
        let mut unknown = LowWater::new(None);
        unknown.before_read(&s, 1 << 20);
        assert!(s.0.borrow().is_empty());
        // A quarter of 1 MiB: 256 KiB, the most it ever asks for anyway.
        let mut lw = LowWater::new(Some(1 << 20));
        lw.before_read(&s, 1 << 20);
        assert_eq!(*s.0.borrow(), vec![256 << 10]);
    }
}
