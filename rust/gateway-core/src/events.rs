//! Events for the application, queued as plain Rust data and signalled through one
//! eventfd: Rust writes the fd only when the queue goes from empty to non-empty, and the
//! application drains up to N events per wake-up. No engine thread ever waits for the
//! application.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;

use parking_lot::Mutex;

use crate::metrics::Counters;

/// Something the application must decide on or know about.
#[derive(Debug)]
pub enum Event {
    /// An upgrade request waiting for `accept` or `reject`.
    Connect {
        conn: u64,
        peer: String,
        path: String,
        query: String,
        headers: Vec<(String, String)>,
        protocols: Vec<String>,
    },
    /// A client data message that needs business logic.
    Message { conn: u64, data: Vec<u8>, binary: bool },
    /// The connection is gone; `rooms` are the rooms it was still in.
    Closed { conn: u64, code: u16, reason: String, rooms: Vec<String>, user: Option<String> },
}

pub struct EventQueue {
    q: Mutex<VecDeque<Event>>,
    fd: OwnedFd,
    cap: usize,
}

impl EventQueue {
    pub fn new(cap: usize) -> std::io::Result<Self> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { q: Mutex::new(VecDeque::new()), fd, cap })
    }

    /// The fd to watch for readability (`loop.add_reader`).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd. EAGAIN (counter full)
        // cannot lose a wake-up: the fd is readable then anyway.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Queue an event. Client messages are shed (returns false) when the queue is over
    /// its cap; connects and closes are always queued, a connect is the app's to refuse.
    pub fn push(&self, ev: Event, counters: &Counters) -> bool {
        let was_empty = {
            let mut q = self.q.lock();
            if q.len() >= self.cap && matches!(ev, Event::Message { .. }) {
                counters.messages_shed.fetch_add(1, Relaxed);
                return false;
            }
            let was_empty = q.is_empty();
            q.push_back(ev);
            was_empty
        };
        if was_empty {
            self.signal();
        }
        true
    }

    /// Take up to `max` events. The bool is true when more are left: the caller must
    /// come back without waiting for the fd (it is only signalled on empty -> non-empty).
    pub fn drain(&self, max: usize) -> (Vec<Event>, bool) {
        let mut buf = 0u64;
        // SAFETY: reads 8 bytes into a valid u64; EAGAIN when nothing was signalled.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut buf as *mut u64).cast(), 8) };
        let mut q = self.q.lock();
        let n = q.len().min(max);
        let out: Vec<Event> = q.drain(..n).collect();
        (out, !q.is_empty())
    }

    pub fn len(&self) -> usize {
        self.q.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn signals_once_per_empty_transition_and_drains_in_batches() {
        let c = Counters::default();
        let q = EventQueue::new(3).unwrap();
        assert!(!readable(q.fd()));
        for conn in 0..5 {
            q.push(Event::Closed { conn, code: 1000, reason: String::new(), rooms: vec![], user: None }, &c);
        }
        assert!(readable(q.fd()));
        let (a, more) = q.drain(2);
        assert_eq!((a.len(), more), (2, true));
        assert!(!readable(q.fd()), "drain resets the fd");
        let (b, more) = q.drain(10);
        assert_eq!((b.len(), more), (3, false));
        // Messages are shed above the cap; closes are not.
        for _ in 0..4 {
            q.push(Event::Message { conn: 1, data: vec![], binary: false }, &c);
        }
        assert_eq!(q.len(), 3);
        assert_eq!(c.messages_shed.load(Relaxed), 1);
    }
}
