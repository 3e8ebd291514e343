//! Connections: shared frames, the bounded priority outbound queue and its drop policy.
//!
//! Backpressure policy (docs/architecture.md):
//! - each queue is bounded in bytes (`queue_bytes`); a frame is always admitted into an
//!   empty queue, so one large message cannot wedge a connection;
//! - low priority is admitted only while the queue is under half the bound;
//! - over the bound, queued frames of lower priority than the new one are evicted, oldest
//!   first; if that is not enough a normal frame is dropped, and a high-priority frame
//!   closes the connection as a slow consumer (4008);
//! - publishers never wait: every outcome is decided under one short lock.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::metrics::{self, Counters, Histogram, LocalHistogram};
use crate::protocol::deflate::deflate;
use crate::protocol::frame::{self, OP_TEXT};
use crate::protocol::{close, CloseCode};
use crate::tls;

pub use crate::protocol::codes::{PRIO_HIGH, PRIO_LOW, PRIO_NORMAL};

/// Bytes of `limits_queue_bytes` kept for the control replies, so that they never take a
/// queue over its bound: data frames are admitted up to the bound minus this. It holds
/// one coalesced WebSocket pong (at most 127 bytes) and one application pong.
pub const CONTROL_RESERVE: usize = 256;

/// The reply slots: at most one reply of each kind waits per connection; a newer one
/// replaces it (RFC 6455 §5.5.3 allows answering only the latest ping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// A WebSocket pong, or a server ping when no pong waits.
    Control,
    /// `{"op":"pong",…}`.
    AppPong,
}

/// A server frame encoded once and shared by reference with every recipient.
pub struct Frame {
    /// The complete uncompressed frame (header + payload).
    plain: Bytes,
    header_len: usize,
    /// Data frame long enough to be worth compressing.
    compressible: bool,
    /// Compressed frames, by server window bits 9..=15, made on first use.
    deflated: [OnceLock<Bytes>; 7],
    /// Logical messages inside (a batch frame carries several).
    pub logical: u32,
    /// Monotonic publish time in µs since engine start (0 = untracked), for lag stats.
    pub born_us: u64,
}

impl Frame {
    fn build(opcode: u8, payload: &[u8], min_deflate: usize, logical: u32) -> Self {
        let buf = frame::encode(opcode, false, payload);
        Self {
            header_len: buf.len() - payload.len(),
            plain: Bytes::from(buf),
            compressible: opcode < 0x8 && payload.len() >= min_deflate,
            deflated: Default::default(),
            logical,
            born_us: 0,
        }
    }

    /// A text message frame.
    pub fn text(payload: &[u8], min_deflate: usize) -> Arc<Self> {
        Arc::new(Self::build(OP_TEXT, payload, min_deflate, 1))
    }

    /// A data frame with an explicit opcode and logical message count.
    pub fn data(opcode: u8, payload: &[u8], min_deflate: usize, logical: u32) -> Arc<Self> {
        Arc::new(Self::build(opcode, payload, min_deflate, logical))
    }

    /// A data frame stamped with its publish time (engine clock, µs) for lag statistics.
    pub fn stamped(opcode: u8, payload: &[u8], min_deflate: usize, logical: u32, born_us: u64) -> Arc<Self> {
        let mut f = Self::build(opcode, payload, min_deflate, logical);
        f.born_us = born_us;
        Arc::new(f)
    }

    /// A control frame (ping, pong, close) from pre-encoded bytes.
    pub fn control(encoded: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            header_len: 2,
            plain: Bytes::from(encoded),
            compressible: false,
            deflated: Default::default(),
            logical: 0,
            born_us: 0,
        })
    }

    pub fn payload(&self) -> &[u8] {
        &self.plain[self.header_len..]
    }

    /// Size used for queue accounting.
    pub fn len(&self) -> usize {
        self.plain.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plain.is_empty()
    }

    /// The bytes to send to a connection with the given deflate window (None = no deflate).
    /// Compression happens once per window size, whoever needs it first.
    pub fn bytes_for(&self, deflate_bits: Option<u8>, level: u32, counters: &Counters) -> &Bytes {
        match deflate_bits {
            Some(bits) if self.compressible => {
                let bits = bits.clamp(9, 15);
                self.deflated[(bits - 9) as usize].get_or_init(|| {
                    metrics::inc(&counters.deflate_compressions);
                    let z = deflate(self.payload(), bits, level);
                    let opcode = self.plain[0] & 0x0F;
                    Bytes::from(frame::encode(opcode, true, &z))
                })
            }
            _ => &self.plain,
        }
    }
}

/// A queued frame.
pub struct Item {
    pub frame: Arc<Frame>,
    pub prio: u8,
}

/// Why and how a connection is being closed by the server.
#[derive(Debug, Clone)]
pub struct Closing {
    pub code: CloseCode,
    pub reason: String,
    /// Discard frames still queued (slow consumer, protocol error) instead of flushing them.
    pub discard: bool,
}

/// The outbound queue of one connection.
///
/// `repr(C)`: what a fan-out reads for every member (the fd, `woken`, whether anything is
/// queued or half-written) sits first, next to the lock, so that the miss per member is
/// one or two adjacent cache lines (see `Conn`).
#[repr(C)]
pub struct OutQueue {
    /// The socket, while its I/O task may be written to directly (-1 otherwise). Set and
    /// cleared by the I/O task under this lock; a direct write holds the lock, so the fd
    /// cannot be closed (and reused) under it.
    pub fd: RawFd,
    /// A wake-up is pending for the writer: later pushes need not notify again. False
    /// only while the writer is idle: nothing queued, nothing in flight.
    pub woken: bool,
    /// A TLS connection's session (boxed: plain connections pay one pointer, on the
    /// line a fan-out reads anyway).
    pub tls: Option<Box<TlsState>>,
    pub items: VecDeque<Item>,
    /// A frame a direct write sent only partly, and how many of its bytes went out. The
    /// writer sends the rest before anything else; no drop policy or discarding close
    /// removes it (the stream must stay well-framed).
    pub head: Option<(Arc<Frame>, usize)>,
    /// Queued bytes, reply slots included.
    pub bytes: usize,
    pub closing: Option<Closing>,
    /// Reply slots (see [`Reply`]); the writer sends them before queued data.
    pub control: Option<Arc<Frame>>,
    pub app_pong: Option<Arc<Frame>>,
    /// Pongs queued behind a waiting one since the writer last took the replies.
    spilled: u8,
}

/// The TLS side of a connection, under its queue lock: whoever writes (the I/O task, or
/// a fan-out writing directly) encrypts with it, in order.
pub struct TlsState {
    pub sess: tls::Session,
    /// Encrypted bytes the socket has not taken yet. They go out before anything else;
    /// no drop policy touches them (they are part of a record already sequenced). Empty,
    /// without an allocation, while the connection keeps up.
    pub pending: Vec<u8>,
}

impl TlsState {
    pub fn new(sess: tls::Session) -> Box<Self> {
        Box::new(Self { sess, pending: Vec::new() })
    }

    /// Keep what the socket did not take of `out` (from byte `sent`).
    pub fn keep(&mut self, out: &[u8], sent: usize) {
        if sent < out.len() {
            self.pending.extend_from_slice(&out[sent..]);
        }
    }

    /// `n` pending bytes were written; an emptied buffer gives its memory back.
    pub fn written(&mut self, n: usize) {
        self.pending.drain(..n);
        if self.pending.is_empty() {
            self.pending = Vec::new();
        }
    }
}

thread_local! {
    /// Per-thread TLS scratch: (plaintext gathered from several frames, ciphertext).
    pub static TLS_SCRATCH: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Gather `frames` (their bytes for this connection) into one slice: the frame itself
/// when there is one, else a copy into `gather`. One TLS record per write, not per frame.
pub fn gathered<'a>(frames: impl ExactSizeIterator<Item = &'a Bytes>, gather: &'a mut Vec<u8>) -> &'a [u8] {
    if frames.len() == 1 {
        let mut frames = frames;
        return frames.next().map_or(&[], |b| &b[..]);
    }
    gather.clear();
    for b in frames {
        gather.extend_from_slice(b);
    }
    gather
}

/// Pongs answered one by one while the writer is busy, before further pings coalesce
/// into the latest. NOTE: browsers and Autobahn (cases 2.10/2.11: 10 pings in one
/// segment) expect a pong per ping from a peer that reads; a client that never reads
/// stalls the writer, which stops taking replies, so at most this many (<= 16 x 131
/// bytes) wait beside the slot and the rest coalesce.
const MAX_SPILLED_PONGS: u8 = 16;

impl Default for OutQueue {
    fn default() -> Self {
        Self {
            items: VecDeque::new(),
            bytes: 0,
            woken: false,
            closing: None,
            head: None,
            fd: -1,
            control: None,
            app_pong: None,
            spilled: 0,
            tls: None,
        }
    }
}

/// What happened to a pushed frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// Queued; the writer must be notified.
    Wake,
    /// Queued; the writer was already notified.
    Queued,
    /// Dropped by the priority policy.
    Dropped,
    /// Over the bound with high-priority traffic: the connection is now closing (4008).
    SlowConsumer,
    /// The connection is closing; nothing more is queued.
    Closed,
}

impl OutQueue {
    /// Admit a frame according to the backpressure policy (see the module docs).
    pub fn push(&mut self, frame: &Arc<Frame>, prio: u8, bound: usize, c: &Counters) -> Push {
        if self.closing.is_some() {
            metrics::inc(&c.dropped_closed);
            return Push::Closed;
        }
        let len = frame.len();
        if !self.items.is_empty() {
            let limit = if prio == PRIO_LOW { bound / 2 } else { bound };
            if self.bytes + len > limit {
                if prio == PRIO_LOW {
                    metrics::inc(&c.dropped_low);
                    return Push::Dropped;
                }
                self.evict_below(prio, len, bound, c);
                if self.bytes + len > bound {
                    if prio == PRIO_NORMAL {
                        metrics::inc(&c.dropped_normal);
                        return Push::Dropped;
                    }
                    metrics::add(&c.dropped_high, 1 + self.items.len() as u64);
                    self.items.clear();
                    self.bytes = 0;
                    self.closing =
                        Some(Closing { code: close::SLOW_CONSUMER, reason: "slow consumer".into(), discard: true });
                    metrics::inc(&c.close_slow_consumer);
                    return self.wake();
                }
            }
        }
        self.items.push_back(Item { frame: frame.clone(), prio });
        self.bytes += len;
        self.wake()
    }

    fn wake(&mut self) -> Push {
        if self.closing.as_ref().is_some_and(|c| c.code == close::SLOW_CONSUMER) {
            self.woken = true;
            return Push::SlowConsumer;
        }
        if self.woken {
            Push::Queued
        } else {
            self.woken = true;
            Push::Wake
        }
    }

    /// Put a reply in its slot, replacing (coalescing) one that is still waiting. Replies
    /// fit in [`CONTROL_RESERVE`].
    pub fn reply(&mut self, kind: Reply, frame: &Arc<Frame>, c: &Counters) -> Push {
        if self.closing.is_some() {
            return Push::Closed;
        }
        if kind == Reply::Control && self.control.is_some() && self.spilled < MAX_SPILLED_PONGS {
            // Behind the waiting one, in order; bounded by MAX_SPILLED_PONGS per write round.
            self.spilled += 1;
            self.items.push_back(Item { frame: frame.clone(), prio: PRIO_HIGH });
            self.bytes += frame.len();
            return self.wake();
        }
        let slot = match kind {
            Reply::Control => &mut self.control,
            Reply::AppPong => &mut self.app_pong,
        };
        if let Some(old) = slot.take() {
            metrics::inc(&c.pongs_coalesced);
            self.bytes -= old.len();
        }
        *slot = Some(frame.clone());
        self.bytes += frame.len();
        self.wake()
    }

    /// The waiting replies, for the writer (they go out before queued data).
    pub fn take_replies(&mut self) -> impl Iterator<Item = Arc<Frame>> {
        self.spilled = 0;
        let (a, b) = (self.control.take(), self.app_pong.take());
        self.bytes -= a.as_ref().map_or(0, |f| f.len()) + b.as_ref().map_or(0, |f| f.len());
        a.into_iter().chain(b)
    }

    /// Whether a reply waits for the writer.
    pub fn reply_waiting(&self) -> bool {
        self.control.is_some() || self.app_pong.is_some()
    }

    /// Evict frames with priority lower than `prio`, oldest first, until `len` more fits.
    fn evict_below(&mut self, prio: u8, len: usize, bound: usize, c: &Counters) {
        let mut i = 0;
        while self.bytes + len > bound && i < self.items.len() {
            if self.items[i].prio < prio {
                let it = self.items.remove(i).expect("index in range");
                self.bytes -= it.frame.len();
                metrics::inc(if it.prio == PRIO_LOW { &c.dropped_low } else { &c.dropped_normal });
            } else {
                i += 1;
            }
        }
    }

    /// The writer is idle and the socket may be written to by the caller, in order.
    fn direct_ok(&self) -> bool {
        self.fd >= 0
            && !self.woken
            && self.items.is_empty()
            && self.head.is_none()
            && self.closing.is_none()
            && self.tls.as_ref().is_none_or(|t| t.pending.is_empty())
    }

    /// Encrypted bytes wait for the socket.
    pub fn tls_pending(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| !t.pending.is_empty())
    }

    /// Start a server-side close. Returns false if one is already under way.
    pub fn close(&mut self, code: CloseCode, reason: &str, discard: bool) -> bool {
        if self.closing.is_some() {
            return false;
        }
        if discard {
            self.items.clear();
            self.control = None;
            self.app_pong = None;
            self.bytes = 0;
        }
        self.closing = Some(Closing { code, reason: reason.to_owned(), discard });
        true
    }
}

/// A fan-out's licence to write to idle members' sockets itself, and its tallies, which
/// reach the shared counters once per fan-out chunk (`finish`) rather than per write.
pub struct Direct {
    deflate_level: u32,
    /// The engine clock origin (`Frame::born_us` counts from it).
    epoch: Instant,
    writes: u64,
    partial: u64,
    bytes: u64,
    frames: u64,
    lag: LocalHistogram,
}

impl Direct {
    pub fn new(deflate_level: u32, epoch: Instant) -> Self {
        Self { deflate_level, epoch, writes: 0, partial: 0, bytes: 0, frames: 0, lag: LocalHistogram::default() }
    }

    /// Add the tallies to the engine's counters and lag histogram.
    pub fn finish(self, c: &Counters, lag: &Histogram) {
        if self.writes > 0 {
            metrics::add(&c.writev_calls, self.writes);
            metrics::add(&c.direct_writes, self.writes);
            metrics::add(&c.direct_partial, self.partial);
            metrics::add(&c.bytes_out, self.bytes);
            metrics::add(&c.frames_out, self.frames);
            lag.merge(&self.lag);
        }
    }
}

/// One accepted WebSocket connection, shared by its I/O task, the hub and the binding.
///
/// `repr(C)` with the fields a fan-out touches per member first: at 50 msgs/s into 5,000
/// members perf put most of the fan-out's user time on two cache misses per member (the
/// lock, and `deflate_bits` on another line); together they span one or two lines.
#[repr(C)]
pub struct Conn {
    pub deflate_bits: Option<u8>,
    pub out: Mutex<OutQueue>,
    pub id: u64,
    pub user: Option<Arc<str>>,
    /// Opaque JSON text set by the application at accept time (member lists return it).
    pub meta: Option<Arc<str>>,
    pub notify: Notify,
    /// Names of the rooms this connection is in.
    pub rooms: Mutex<Vec<Arc<str>>>,
    /// Engine clock (10 ms ticks) of the last frame received / last ping sent.
    pub last_rx: AtomicU32,
    pub last_ping: AtomicU32,
    /// Bytes of this connection's messages waiting for the application (events.rs).
    pub ev_bytes: AtomicUsize,
    /// The I/O task has ended: queued events of this connection are dropped at poll.
    pub gone: AtomicBool,
}

impl Conn {
    pub fn new(id: u64, user: Option<Arc<str>>, meta: Option<Arc<str>>, deflate_bits: Option<u8>, now: u32) -> Self {
        Self {
            id,
            user,
            meta,
            deflate_bits,
            out: Mutex::new(OutQueue::default()),
            notify: Notify::new(),
            rooms: Mutex::new(Vec::new()),
            last_rx: AtomicU32::new(now),
            last_ping: AtomicU32::new(now),
            ev_bytes: AtomicUsize::new(0),
            gone: AtomicBool::new(false),
        }
    }

    /// Queue one frame and wake the writer if needed. Never blocks on the socket.
    pub fn push(&self, frame: &Arc<Frame>, prio: u8, bound: usize, c: &Counters) -> Push {
        let r = self.out.lock().push(frame, prio, bound, c);
        if matches!(r, Push::Wake | Push::SlowConsumer) {
            self.notify.notify_one();
        }
        r
    }

    /// Put a reply in its slot and wake the writer if needed.
    pub fn reply(&self, kind: Reply, frame: &Arc<Frame>, c: &Counters) -> Push {
        let r = self.out.lock().reply(kind, frame, c);
        if r == Push::Wake {
            self.notify.notify_one();
        }
        r
    }

    /// Queue a server ping in the control slot unless something waits there already (a
    /// pong proves liveness as well; a ping waiting means the socket is not flushing).
    pub fn ping(&self, frame: &Arc<Frame>, c: &Counters) -> bool {
        let r = {
            let mut q = self.out.lock();
            if q.control.is_some() {
                return false;
            }
            q.reply(Reply::Control, frame, c)
        };
        if r == Push::Wake {
            self.notify.notify_one();
        }
        matches!(r, Push::Wake | Push::Queued)
    }

    /// Queue several frames under one lock (the cork for a batch of room messages).
    /// Returns how many were queued (or written).
    ///
    /// With `direct`, frames for an idle writer are written to the socket right here, in
    /// one non-blocking call, instead of waking the connection's task to do it: at moderate rates
    /// each delivery is its own write, and the wake-up and poll cost about as much user
    /// CPU as the rest of the fan-out. Only fan-out tasks on runtime threads pass it.
    pub fn push_all(
        &self,
        frames: &[(Arc<Frame>, u8)],
        bound: usize,
        c: &Counters,
        direct: Option<&mut Direct>,
    ) -> usize {
        let mut wake = false;
        let mut queued = 0;
        {
            let mut q = self.out.lock();
            let mut rest = frames;
            if let Some(d) = direct.filter(|_| q.direct_ok()) {
                let fd = q.fd;
                let (done, partial) = match q.tls.as_deref_mut() {
                    Some(t) => self.write_direct_tls(fd, t, frames, d, c),
                    None => self.write_direct(q.fd, frames, d, c),
                };
                queued += done;
                rest = &frames[done..];
                if partial > 0 && q.tls.is_some() {
                    // Encrypted bytes the socket did not take: the writer sends them first.
                    q.woken = true;
                    wake = true;
                } else if partial > 0 {
                    // The writer finishes this frame before anything else.
                    q.head = Some((rest[0].0.clone(), partial));
                    q.woken = true;
                    wake = true;
                    queued += 1;
                    rest = &rest[1..];
                }
                // Not all written: the rest is queued below and the writer waits for room.
            }
            for (f, p) in rest {
                match q.push(f, *p, bound, c) {
                    Push::Wake => {
                        wake = true;
                        queued += 1;
                    }
                    Push::Queued => queued += 1,
                    Push::Dropped => {}
                    Push::SlowConsumer => {
                        wake = true;
                        break;
                    }
                    Push::Closed => break,
                }
            }
        }
        if wake {
            self.notify.notify_one();
        }
        queued
    }

    /// Write `frames` (up to 64) to `fd` with one non-blocking `send`/`sendmsg`. Returns how many frames
    /// went out whole and how many bytes of the next one (0 when none, or on an error:
    /// the I/O task then meets the error itself).
    fn write_direct(&self, fd: RawFd, frames: &[(Arc<Frame>, u8)], d: &mut Direct, c: &Counters) -> (usize, usize) {
        const MAX: usize = 64;
        let n = frames.len().min(MAX);
        let mut iov = [IoSlice::new(&[]); MAX];
        for (slot, (f, _)) in iov.iter_mut().zip(&frames[..n]) {
            *slot = IoSlice::new(f.bytes_for(self.deflate_bits, d.deflate_level, c));
        }
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        // SAFETY: the caller holds the queue lock, under which the I/O task keeps `fd`
        // open; the buffers outlive the call. One frame (the usual case below saturation)
        // takes plain send(), which spares the kernel the msghdr and iovec copies; several
        // take sendmsg() with the IoSlices, which are ABI-compatible with iovec.
        let sent = unsafe {
            if n == 1 {
                libc::send(fd, iov[0].as_ptr().cast(), iov[0].len(), flags)
            } else {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = iov.as_mut_ptr().cast();
                msg.msg_iovlen = n as _;
                libc::sendmsg(fd, &msg, flags)
            }
        };
        if sent <= 0 {
            return (0, 0);
        }
        let mut left = sent as usize;
        d.writes += 1;
        d.bytes += left as u64;
        if let Some(born) = frames.iter().map(|(f, _)| f.born_us).find(|b| *b > 0) {
            let now = d.epoch.elapsed().as_micros() as u64 + 1;
            d.lag.observe_ns(now.saturating_sub(born) * 1000);
        }
        let mut done = 0;
        for s in &iov[..n] {
            if left < s.len() {
                break;
            }
            left -= s.len();
            done += 1;
        }
        d.frames += done as u64;
        d.partial += u64::from(done < n);
        (done, left)
    }

    /// The TLS twin of `write_direct`: encrypt up to 64 frames as one record and write it
    /// with one `send`. Every frame encrypted counts as written: what the socket did not
    /// take waits in `t.pending` (second value nonzero), for the I/O task. Nothing is
    /// written if the session cannot send now (the I/O task then meets that itself).
    fn write_direct_tls(
        &self,
        fd: RawFd,
        t: &mut TlsState,
        frames: &[(Arc<Frame>, u8)],
        d: &mut Direct,
        c: &Counters,
    ) -> (usize, usize) {
        let n = frames.len().min(64);
        TLS_SCRATCH.with(|s| {
            let (gather, out) = &mut *s.borrow_mut();
            out.clear();
            let plain =
                gathered(frames[..n].iter().map(|(f, _)| f.bytes_for(self.deflate_bits, d.deflate_level, c)), gather);
            if tls::encrypt(&mut t.sess, plain, out).is_err() {
                return (0, 0);
            }
            // SAFETY: as in write_direct (the queue lock keeps `fd` open; `out` outlives the call).
            let sent =
                unsafe { libc::send(fd, out.as_ptr().cast(), out.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
            let sent = usize::try_from(sent).unwrap_or(0);
            t.keep(out, sent);
            if sent > 0 {
                d.writes += 1;
                d.bytes += sent as u64;
            }
            if let Some(born) = frames[..n].iter().map(|(f, _)| f.born_us).find(|b| *b > 0) {
                let now = d.epoch.elapsed().as_micros() as u64 + 1;
                d.lag.observe_ns(now.saturating_sub(born) * 1000);
            }
            d.frames += n as u64;
            let left = out.len() - sent;
            d.partial += u64::from(left > 0);
            (n, left)
        })
    }

    /// Ask the I/O task to close with `code`. `discard` drops frames not yet written.
    pub fn close(&self, code: CloseCode, reason: &str, discard: bool) {
        let started = {
            let mut q = self.out.lock();
            let s = q.close(code, reason, discard);
            q.woken = true;
            s
        };
        if started {
            self.notify.notify_one();
        }
    }

    pub fn is_closing(&self) -> bool {
        self.out.lock().closing.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    fn f(n: usize) -> Arc<Frame> {
        Frame::text(&vec![b'x'; n], usize::MAX)
    }

    #[test]
    fn wakes_once_until_drained() {
        let c = Counters::default();
        let mut q = OutQueue::default();
        assert_eq!(q.push(&f(10), PRIO_NORMAL, 1000, &c), Push::Wake);
        assert_eq!(q.push(&f(10), PRIO_NORMAL, 1000, &c), Push::Queued);
        assert_eq!(q.items.len(), 2);
    }

    #[test]
    fn low_priority_dropped_first_at_half_the_bound() {
        let c = Counters::default();
        let mut q = OutQueue::default();
        for _ in 0..5 {
            q.push(&f(98), PRIO_NORMAL, 1000, &c); // 100 bytes each
        }
        assert_eq!(q.push(&f(98), PRIO_LOW, 1000, &c), Push::Dropped);
        assert_eq!(c.dropped_low.load(Relaxed), 1);
        assert_eq!(q.push(&f(98), PRIO_NORMAL, 1000, &c), Push::Queued);
    }

    #[test]
    fn high_evicts_lower_then_slow_consumer() {
        let c = Counters::default();
        let mut q = OutQueue::default();
        q.push(&f(98), PRIO_LOW, 1000, &c);
        for _ in 0..9 {
            q.push(&f(98), PRIO_NORMAL, 1000, &c);
        }
        assert_eq!(q.bytes, 1000);
        // Normal evicts the older low frame.
        assert_eq!(q.push(&f(98), PRIO_NORMAL, 1000, &c), Push::Queued);
        assert_eq!(c.dropped_low.load(Relaxed), 1);
        assert!(q.items.iter().all(|i| i.prio == PRIO_NORMAL));
        // Normal cannot evict normal: the new one is dropped.
        assert_eq!(q.push(&f(98), PRIO_NORMAL, 1000, &c), Push::Dropped);
        assert_eq!(c.dropped_normal.load(Relaxed), 1);
        // High evicts the oldest normal frame.
        assert_eq!(q.push(&f(98), PRIO_HIGH, 1000, &c), Push::Queued);
        assert_eq!(c.dropped_normal.load(Relaxed), 2);
        assert_eq!(q.items.back().unwrap().prio, PRIO_HIGH);
        // Fill with high until nothing lower is left: the next high closes the connection.
        for _ in 0..9 {
            assert_eq!(q.push(&f(98), PRIO_HIGH, 1000, &c), Push::Queued);
        }
        assert_eq!(q.items.iter().filter(|i| i.prio == PRIO_HIGH).count(), 10);
        assert_eq!(q.push(&f(98), PRIO_HIGH, 1000, &c), Push::SlowConsumer);
        assert!(q.items.is_empty());
        assert_eq!(q.push(&f(1), PRIO_HIGH, 1000, &c), Push::Closed);
        assert_eq!(c.close_slow_consumer.load(Relaxed), 1);
    }

    #[test]
    fn oversized_frame_fits_an_empty_queue() {
        let c = Counters::default();
        let mut q = OutQueue::default();
        assert_eq!(q.push(&f(5000), PRIO_LOW, 1000, &c), Push::Wake);
    }

    /// A connected TCP pair: (server side, non-blocking, as the engine holds it; client).
    fn tcp_pair(sndbuf: Option<usize>) -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        if sndbuf.is_some() {
            client.set_recv_buffer_size(4096).unwrap(); // a client that reads little
        }
        client.connect(&l.local_addr().unwrap().into()).unwrap();
        let (server, _) = l.accept().unwrap();
        if let Some(n) = sndbuf {
            socket2::SockRef::from(&server).set_send_buffer_size(n).unwrap();
        }
        server.set_nonblocking(true).unwrap();
        (server, client.into())
    }

    fn direct() -> Direct {
        Direct::new(5, Instant::now())
    }

    fn conn_on(fd: RawFd) -> Conn {
        let c = Conn::new(1, None, None, None, 0);
        c.out.lock().fd = fd;
        c
    }

    #[test]
    fn idle_writer_is_written_directly_in_one_call() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let c = Counters::default();
        let (server, mut client) = tcp_pair(None);
        let conn = conn_on(server.as_raw_fd());
        let frames = [(f(3), PRIO_NORMAL), (f(4), PRIO_HIGH)];
        let mut d = direct();
        assert_eq!(conn.push_all(&frames, 1000, &c, Some(&mut d)), 2);
        {
            let q = conn.out.lock();
            assert!(q.items.is_empty() && q.head.is_none() && !q.woken, "nothing left for the I/O task");
        }
        d.finish(&c, &Histogram::default());
        assert_eq!(c.direct_writes.load(Relaxed), 1);
        assert_eq!(c.writev_calls.load(Relaxed), 1);
        assert_eq!(c.frames_out.load(Relaxed), 2);
        assert_eq!(c.bytes_out.load(Relaxed), 11);
        let mut got = [0u8; 11];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"\x81\x03xxx\x81\x04xxxx");
    }

    #[test]
    fn busy_or_unregistered_writer_gets_queued_not_written() {
        use std::os::fd::AsRawFd;
        let c = Counters::default();
        let (server, _client) = tcp_pair(None);
        // The I/O task has work in flight (woken): order requires going through the queue.
        let conn = conn_on(server.as_raw_fd());
        conn.out.lock().woken = true;
        assert_eq!(conn.push_all(&[(f(3), PRIO_NORMAL)], 1000, &c, Some(&mut direct())), 1);
        assert_eq!(conn.out.lock().items.len(), 1);
        // No socket registered (before the task runs, or after it ended).
        let conn = conn_on(-1);
        assert_eq!(conn.push_all(&[(f(3), PRIO_NORMAL)], 1000, &c, Some(&mut direct())), 1);
        assert_eq!(conn.out.lock().items.len(), 1);
        // Closing: nothing is written past the close.
        let conn = conn_on(server.as_raw_fd());
        conn.close(1001, "bye", false);
        assert_eq!(conn.push_all(&[(f(3), PRIO_NORMAL)], 1000, &c, Some(&mut direct())), 0);
        assert_eq!(c.direct_writes.load(Relaxed), 0);
    }

    #[test]
    fn partly_written_frame_survives_a_discarding_close_and_completes_the_stream() {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        let c = Counters::default();
        let (mut server, mut client) = tcp_pair(Some(4096));
        let conn = conn_on(server.as_raw_fd());
        // Push 3000-byte frames into a client that does not read until one is taken only
        // partly by the kernel.
        let big = |i: u8| Frame::text(&[b'a' + i % 26; 3000], usize::MAX);
        let mut sent = Vec::new();
        let mut d = direct();
        for i in 0..200u8 {
            let fr = big(i);
            sent.push(fr.clone());
            conn.push_all(&[(fr, PRIO_NORMAL)], 1 << 20, &c, Some(&mut d));
            if conn.out.lock().head.is_some() {
                break;
            }
        }
        d.finish(&c, &Histogram::default());
        assert_eq!(c.direct_partial.load(Relaxed), 1, "no direct write was partial");
        // The writer is now woken; more frames queue behind the partial one.
        assert!(conn.out.lock().woken);
        assert_eq!(conn.push_all(&[(big(99), PRIO_NORMAL)], 1 << 20, &c, Some(&mut direct())), 1);
        assert_eq!(conn.out.lock().items.len(), 1);
        // A slow-consumer style close discards the queue but not the partial frame.
        conn.close(4008, "slow consumer", true);
        let (head, off) = {
            let mut q = conn.out.lock();
            assert!(q.items.is_empty());
            q.head.take().expect("the partial frame is kept")
        };
        assert!(off > 0 && off < head.len());
        // The I/O task's part: finish the frame, then the stream ends.
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            client.read_to_end(&mut all).unwrap();
            all
        });
        server.set_nonblocking(false).unwrap();
        server.write_all(&head.bytes_for(None, 5, &c)[off..]).unwrap();
        server.shutdown(std::net::Shutdown::Write).unwrap();
        let all = reader.join().unwrap();
        let expected: Vec<u8> = sent.iter().flat_map(|f| f.bytes_for(None, 5, &c).to_vec()).collect();
        assert_eq!(all.len(), expected.len());
        assert!(all == expected, "the client got every frame whole, in order, and nothing else");
    }

    #[test]
    fn shared_deflate_is_computed_once() {
        let c = Counters::default();
        let fr = Frame::text(&b"hello ".repeat(100), 64);
        let a = fr.bytes_for(Some(15), 5, &c).clone();
        let b = fr.bytes_for(Some(15), 5, &c).clone();
        assert_eq!(a, b);
        assert_eq!(a[0], 0xC1, "FIN + RSV1 + text");
        assert_eq!(c.deflate_compressions.load(Relaxed), 1);
        assert_eq!(fr.bytes_for(None, 5, &c)[0], 0x81);
    }
}
