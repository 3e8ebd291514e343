//! Events for the application, queued as plain Rust data and signalled through one
//! eventfd: Rust writes the fd only when the queue goes from empty to non-empty, and the
//! application drains up to N events per wake-up. No engine thread ever waits for the
//! application.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::conn::Conn;
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

/// Bytes an event holds while queued: its payload and strings, plus the queue slot.
fn footprint(ev: &Event) -> usize {
    std::mem::size_of::<Queued>()
        + match ev {
            Event::Connect { peer, path, query, headers, protocols, .. } => {
                peer.len()
                    + path.len()
                    + query.len()
                    + headers.iter().map(|(k, v)| k.len() + v.len() + 48).sum::<usize>()
                    + protocols.iter().map(|p| p.len() + 24).sum::<usize>()
            }
            Event::Message { data, .. } => data.capacity(),
            Event::Closed { reason, rooms, .. } => reason.len() + rooms.iter().map(|r| r.len() + 24).sum::<usize>(),
        }
}

struct Queued {
    ev: Event,
    /// The sender of a client message (its share of the queue is returned at poll).
    from: Option<Arc<Conn>>,
    size: usize,
    /// When a connect was queued (stale ones are dropped at poll).
    at: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    q: VecDeque<Queued>,
    bytes: usize,
}

/// Limits of the queue (see `EngineConfig`).
#[derive(Debug, Clone, Copy)]
pub struct EventLimits {
    /// Client messages are shed above this many events...
    pub max_events: usize,
    /// ...or this many bytes.
    pub max_bytes: usize,
    /// One connection's bytes above which it is not read (see `Conn::events_over`).
    pub conn_bytes: usize,
    /// Connect requests older than this are dropped at poll: the engine has answered 503.
    pub connect_ttl: Duration,
}

pub struct EventQueue {
    q: Mutex<Inner>,
    fd: OwnedFd,
    lim: EventLimits,
}

impl EventQueue {
    pub fn new(lim: EventLimits) -> std::io::Result<Self> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { q: Mutex::default(), fd, lim })
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

    fn enqueue(&self, mut inner: parking_lot::MutexGuard<'_, Inner>, item: Queued) {
        let was_empty = inner.q.is_empty();
        inner.bytes += item.size;
        inner.q.push_back(item);
        drop(inner);
        if was_empty {
            self.signal();
        }
    }

    /// Queue a connect or a close. These are never shed: their number is bounded by the
    /// connection caps, and a connect is the application's to refuse.
    pub fn push(&self, ev: Event) {
        let at = matches!(ev, Event::Connect { .. }).then(Instant::now);
        let size = footprint(&ev);
        self.enqueue(self.q.lock(), Queued { ev, from: None, size, at });
    }

    /// Queue a client message of `from`, or shed it (counted; the data comes back) when
    /// the queue is over its count or byte bound. The message's bytes count against
    /// `from`'s share until the application takes it.
    pub fn push_message(
        &self,
        from: &Arc<Conn>,
        data: Vec<u8>,
        binary: bool,
        counters: &Counters,
    ) -> Result<(), Vec<u8>> {
        let size = std::mem::size_of::<Queued>() + data.capacity();
        let inner = self.q.lock();
        if inner.q.len() >= self.lim.max_events || inner.bytes + size > self.lim.max_bytes {
            drop(inner);
            counters.messages_shed.fetch_add(1, Relaxed);
            return Err(data);
        }
        from.ev_bytes.fetch_add(size, Relaxed);
        let ev = Event::Message { conn: from.id, data, binary };
        self.enqueue(inner, Queued { ev, from: Some(from.clone()), size, at: None });
        Ok(())
    }

    /// Take up to `max` events. The bool is true when more are left: the caller must
    /// come back without waiting for the fd (it is only signalled on empty -> non-empty).
    /// Messages of connections that are gone and connects older than the auth deadline
    /// are dropped here (counted), so the application never spends work on them.
    pub fn drain(&self, max: usize, counters: &Counters) -> (Vec<Event>, bool) {
        let mut buf = 0u64;
        // SAFETY: reads 8 bytes into a valid u64; EAGAIN when nothing was signalled.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut buf as *mut u64).cast(), 8) };
        let mut out = Vec::with_capacity(max.min(1024));
        let mut inner = self.q.lock();
        while out.len() < max {
            let Some(it) = inner.q.pop_front() else { break };
            inner.bytes -= it.size;
            if let Some(c) = &it.from {
                let before = c.ev_bytes.fetch_sub(it.size, Relaxed);
                if before >= self.lim.conn_bytes && before - it.size < self.lim.conn_bytes {
                    // Under its share again: its task may read once more.
                    c.notify.notify_one();
                }
                if c.gone.load(Relaxed) {
                    counters.events_discarded.fetch_add(1, Relaxed);
                    continue;
                }
            }
            if it.at.is_some_and(|at| at.elapsed() >= self.lim.connect_ttl) {
                counters.connects_expired.fetch_add(1, Relaxed);
                continue;
            }
            out.push(it.ev);
        }
        (out, !inner.q.is_empty())
    }

    /// (events, bytes) waiting.
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.q.lock();
        (inner.q.len(), inner.bytes)
    }

    pub fn len(&self) -> usize {
        self.usage().0
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

    fn lim(max_events: usize, max_bytes: usize) -> EventLimits {
        EventLimits { max_events, max_bytes, conn_bytes: 1000, connect_ttl: Duration::from_secs(5) }
    }

    fn closed(conn: u64) -> Event {
        Event::Closed { conn, code: 1000, reason: String::new(), rooms: vec![], user: None }
    }

    fn conn(id: u64) -> Arc<Conn> {
        Arc::new(Conn::new(id, None, None, None, 0))
    }

    #[test]
    fn signals_once_per_empty_transition_and_drains_in_batches() {
        let c = Counters::default();
        let q = EventQueue::new(lim(3, usize::MAX)).unwrap();
        assert!(!readable(q.fd()));
        for id in 0..5 {
            q.push(closed(id));
        }
        assert!(readable(q.fd()));
        let (a, more) = q.drain(2, &c);
        assert_eq!((a.len(), more), (2, true));
        assert!(!readable(q.fd()), "drain resets the fd");
        let (b, more) = q.drain(10, &c);
        assert_eq!((b.len(), more), (3, false));
        // Messages are shed above the cap; closes are not.
        let x = conn(1);
        for _ in 0..4 {
            let _ = q.push_message(&x, vec![], false, &c);
        }
        assert_eq!(q.len(), 3);
        assert_eq!(c.messages_shed.load(Relaxed), 1);
    }

    #[test]
    fn bytes_are_bounded_and_returned_to_the_sender_at_poll() {
        let c = Counters::default();
        let q = EventQueue::new(lim(usize::MAX, 10_000)).unwrap();
        let a = conn(1);
        let mut n = 0;
        while q.push_message(&a, vec![0; 1000], false, &c).is_ok() {
            n += 1;
        }
        let (events, bytes) = q.usage();
        assert!(n >= 8 && events == n && bytes <= 10_000, "{n} {bytes}");
        assert_eq!(a.ev_bytes.load(Relaxed), bytes, "the sender's share");
        assert_eq!(c.messages_shed.load(Relaxed), 1);
        // Closes still go in over the bound.
        q.push(closed(9));
        let (out, more) = q.drain(usize::MAX, &c);
        assert_eq!((out.len(), more), (n + 1, false));
        assert_eq!((q.usage(), a.ev_bytes.load(Relaxed)), ((0, 0), 0));
    }

    #[test]
    fn messages_of_gone_connections_and_stale_connects_are_dropped_at_poll() {
        let c = Counters::default();
        let q = EventQueue::new(EventLimits { connect_ttl: Duration::from_millis(20), ..lim(100, 1 << 20) }).unwrap();
        let (a, b) = (conn(1), conn(2));
        q.push_message(&a, b"x".to_vec(), false, &c).unwrap();
        q.push_message(&b, b"y".to_vec(), false, &c).unwrap();
        let connect = |conn| Event::Connect {
            conn,
            peer: "1.2.3.4:5".into(),
            path: "/ws".into(),
            query: String::new(),
            headers: vec![],
            protocols: vec![],
        };
        q.push(connect(3));
        std::thread::sleep(Duration::from_millis(30));
        q.push(connect(4));
        a.gone.store(true, Relaxed);
        let (out, _) = q.drain(10, &c);
        let ids: Vec<u64> = out
            .iter()
            .map(|e| match e {
                Event::Message { conn, .. } | Event::Connect { conn, .. } | Event::Closed { conn, .. } => *conn,
            })
            .collect();
        assert_eq!(ids, vec![2, 4]);
        assert_eq!(c.events_discarded.load(Relaxed), 1);
        assert_eq!(c.connects_expired.load(Relaxed), 1);
        assert_eq!(a.ev_bytes.load(Relaxed), 0);
    }
}
