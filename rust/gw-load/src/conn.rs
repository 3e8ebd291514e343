//! One client connection: its small state and the protocol state machine
//! (HTTP upgrade -> `connected` -> `join`/`ack` -> counting room messages).
//!
//! A `Conn` is ~100 bytes while idle: the socket, a few integers and three
//! empty `Vec`s (partial frame, fragmented message, unsent output). The
//! handshake data lives in a boxed side struct that is freed once the
//! upgrade completed.

use crate::scan::{op_of, Scanner};
use crate::stats::{Counters, Histogram};
use crate::sys::Rng;
use crate::tls::{self, Progress, Session};
use crate::ws::{self, Flow, FrameReader, Message, ProtoError, UpgradeError};
use mio::net::TcpStream;
use std::collections::HashMap;
use std::io::{self, Write};
use std::time::Instant;

/// Connection life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// TCP connect in progress.
    Connecting,
    /// Upgrade request sent, waiting for `101`.
    Upgrading,
    /// Waiting for the `{"op":"connected"}` frame.
    AwaitConnected,
    /// `join` sent, waiting for its `ack`.
    AwaitJoinAck,
    /// Established; counting messages.
    Ready,
    /// Socket dropped.
    Closed,
}

/// Data only needed during the HTTP upgrade.
pub struct Handshake {
    /// Our `Sec-WebSocket-Key`.
    pub key: String,
    /// Response bytes received so far.
    pub buf: Vec<u8>,
}

/// Why a connection ended (the key it is counted under in `closes_by_code`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Close frame from the server (1005 when it carried no code).
    Server(u16),
    /// TCP closed without a close frame.
    Eof,
    Io(io::ErrorKind),
    Protocol(ProtoError),
    Upgrade(UpgradeError),
    /// `error` reply to our join.
    JoinError,
    ConnectError(io::ErrorKind),
    ConnectTimeout,
    /// TLS failure (handshake, certificate, decryption, alert).
    Tls(String),
}

impl End {
    /// Key for the `closes_by_code` report.
    pub fn key(&self) -> String {
        match self {
            End::Server(c) => c.to_string(),
            End::Eof => "eof".into(),
            End::Io(k) => format!("io_{k:?}"),
            End::Protocol(e) => format!("protocol_{e:?}"),
            End::Upgrade(UpgradeError::Status(s)) => format!("http_{s}"),
            End::Upgrade(e) => format!("upgrade_{e:?}"),
            End::JoinError => "join_error".into(),
            End::ConnectError(k) => format!("connect_{k:?}"),
            End::ConnectTimeout => "connect_timeout".into(),
            End::Tls(k) => format!("tls_{k}"),
        }
    }
}

/// Per-thread state the connections need while handling input.
pub struct Ctx {
    pub scanner: Scanner,
    pub rng: Rng,
    pub counters: Counters,
    /// Delivery latency, microseconds (measured phase only).
    pub lat: Histogram,
    /// Connect-to-ready time, microseconds.
    pub connect_hist: Histogram,
    pub closes: HashMap<String, u64>,
    /// How slow consumers (--slow) ended, by the same keys as `closes`.
    pub slow_closes: HashMap<String, u64>,
    /// True during the measured phase and the drain after it.
    pub measuring: bool,
    /// Wall clock (unix µs) of the current read, for latency.
    pub now_us: u64,
    /// Latency sampling: countdown and period (--lat-sample).
    pub lat_countdown: u32,
    pub lat_every: u32,
    /// Unacked publishes per publisher slot.
    pub pub_inflight: Vec<u32>,
    /// Pre-encoded (unmasked) join request payload, None with --no-join.
    pub join_payload: Option<Vec<u8>>,
    /// Monotonic reference for connect timing.
    pub epoch: Instant,
    /// Handshakes in progress on this thread.
    pub handshaking: u32,
    /// TLS connections that became ready after a full / a resumed handshake.
    pub tls_full: u64,
    pub tls_resumed: u64,
    /// What the first TLS handshake of this thread negotiated.
    pub tls_negotiated: Option<tls::Negotiated>,
    /// Publish to ack, microseconds (measured phase only).
    pub ack_lat: Histogram,
    /// (publisher slot, request id) -> when the publish was queued (µs on
    /// `epoch`), until its ack or error.
    pub sent: HashMap<(u32, u64), u64>,
    /// --dm-pairs: publishers count their peer's messages as deliveries.
    pub dm: bool,
    /// --user-prefix as bytes and --user-offset (a sender's connection number).
    pub user_prefix: Vec<u8>,
    pub user_offset: u64,
    /// --per-message: publisher timestamp -> (latest receive, unix µs; receivers).
    pub per_msg: Option<HashMap<u64, (u64, u32)>>,
}

impl Ctx {
    /// Microseconds since `epoch` (monotonic).
    #[inline]
    pub fn mono_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

pub const NOT_PUBLISHER: u32 = u32::MAX;

pub struct Conn {
    /// None once closed (the fd is released).
    pub stream: Option<TcpStream>,
    pub state: State,
    /// Publisher slot, or [`NOT_PUBLISHER`].
    pub pub_slot: u32,
    /// A slow consumer (--slow): stops reading once joined.
    pub slow: bool,
    /// Set by the worker when it stopped reading a slow consumer.
    pub paused: bool,
    /// Global connection number (user id suffix).
    pub gid: u32,
    /// When the connect started (µs on `Ctx::epoch`).
    pub started_us: u64,
    pub hs: Option<Box<Handshake>>,
    pub reader: FrameReader,
    /// Encoded frames not yet accepted by the socket (with TLS: not yet
    /// encrypted).
    pub out: Vec<u8>,
    /// The TLS session for wss:// (None on the plain path).
    pub tls: Option<Box<Session>>,
}

impl Conn {
    pub fn new(
        stream: TcpStream,
        tls: Option<Box<Session>>,
        gid: u32,
        pub_slot: u32,
        slow: bool,
        started_us: u64,
        key: String,
    ) -> Conn {
        Conn {
            stream: Some(stream),
            state: State::Connecting,
            pub_slot,
            slow,
            paused: false,
            gid,
            started_us,
            hs: Some(Box::new(Handshake { key, buf: Vec::new() })),
            reader: FrameReader::default(),
            out: Vec::new(),
            tls,
        }
    }

    /// Output waiting for the socket: queued frames, or TLS records
    /// (handshake messages, encrypted frames, alerts).
    #[inline]
    pub fn has_output(&self) -> bool {
        !self.out.is_empty() || self.tls.as_ref().is_some_and(|t| !t.wire.is_empty())
    }

    /// Where in the read buffer a read for this connection goes: after room
    /// for a TLS record left over from the previous read (see
    /// [`Session::read`]); at the start on the plain path.
    #[inline]
    pub fn read_offset(&self) -> usize {
        if self.tls.is_some() {
            tls::HEADROOM
        } else {
            0
        }
    }

    #[inline]
    pub fn is_publisher(&self) -> bool {
        self.pub_slot != NOT_PUBLISHER
    }

    /// Still handshaking (counts against --connect-inflight).
    #[inline]
    pub fn is_pending(&self) -> bool {
        matches!(self.state, State::Connecting | State::Upgrading | State::AwaitConnected | State::AwaitJoinAck)
    }

    /// Appends a masked text frame to the output buffer (sent by `flush`).
    #[inline]
    pub fn queue_text(&mut self, payload: &[u8], rng: &mut Rng) {
        ws::encode_frame(&mut self.out, ws::OP_TEXT, payload, rng.mask());
    }

    /// Writes as much queued output as the socket takes. Remaining bytes
    /// stay queued; the next writable event flushes them.
    pub fn flush(&mut self) -> Result<(), End> {
        let Some(stream) = self.stream.as_mut() else { return Ok(()) };
        let mut off = 0;
        if let Some(tls) = self.tls.as_mut() {
            off = tls::flush(tls, stream, &self.out).map_err(|e| End::Io(e.kind()))?;
        } else {
            while off < self.out.len() {
                match stream.write(&self.out[off..]) {
                    Ok(0) => return Err(End::Io(io::ErrorKind::WriteZero)),
                    Ok(n) => off += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(End::Io(e.kind())),
                }
            }
        }
        if off == self.out.len() {
            // Everything sent: release large buffers, keep small ones.
            if self.out.capacity() > 4096 {
                self.out = Vec::new();
            } else {
                self.out.clear();
            }
        } else if off > 0 {
            self.out.drain(..off);
        }
        Ok(())
    }

    /// Handles bytes read from the socket, `buf[at..]` (`at` from
    /// [`Conn::read_offset`]; TLS uses the room before it and decrypts in
    /// place): straight to the protocol handler, or through TLS first. The
    /// caller flushes afterwards ([`Conn::has_output`]): there may be records
    /// to send (handshake, the upgrade request held until it completed).
    #[inline]
    pub fn on_wire(&mut self, buf: &mut [u8], at: usize, ctx: &mut Ctx) -> Result<(), End> {
        let Some(mut session) = self.tls.take() else { return self.on_bytes(&buf[at..], ctx) };
        let was_handshaking = session.is_handshaking();
        let res = session.read(buf, at, |e| End::Tls(tls::error_key(&e)), |plain| self.on_bytes(plain, ctx));
        if was_handshaking && !session.is_handshaking() {
            match session.resumed() {
                Some(true) => ctx.tls_resumed += 1,
                _ => ctx.tls_full += 1,
            }
            if ctx.tls_negotiated.is_none() {
                ctx.tls_negotiated = Some(session.negotiated());
            }
        }
        self.tls = Some(session);
        match res? {
            Progress::Handshaking | Progress::Open => Ok(()),
            Progress::PeerClosed => Err(End::Eof),
        }
    }

    /// Handles plaintext bytes (the HTTP upgrade response, then frames).
    pub fn on_bytes(&mut self, data: &[u8], ctx: &mut Ctx) -> Result<(), End> {
        match self.state {
            State::Upgrading => {
                let hs = self.hs.as_mut().expect("handshake data while upgrading");
                hs.buf.extend_from_slice(data);
                match ws::check_upgrade_response(&hs.buf, &hs.key) {
                    Ok(None) => Ok(()),
                    Ok(Some(n)) => {
                        // Upgrade done: free the handshake data and parse any
                        // frames that arrived in the same segment.
                        let hs = self.hs.take().expect("checked above");
                        self.state = State::AwaitConnected;
                        self.on_frames(&hs.buf[n..], ctx)
                    }
                    Err(e) => Err(End::Upgrade(e)),
                }
            }
            State::AwaitConnected | State::AwaitJoinAck | State::Ready => self.on_frames(data, ctx),
            State::Connecting | State::Closed => Ok(()),
        }
    }

    /// Parses WebSocket frames and reacts to each message.
    fn on_frames(&mut self, data: &[u8], ctx: &mut Ctx) -> Result<(), End> {
        let Conn { reader, state, out, pub_slot, started_us, slow, gid, .. } = self;
        let mut end: Result<(), End> = Ok(());
        let res = reader.feed(data, |m| match m {
            Message::Text(p) => {
                // Hot path: an established receiver counting room messages.
                if *state == State::Ready && *pub_slot == NOT_PUBLISHER {
                    if !*slow {
                        count_messages(p, ctx, false, *gid);
                    }
                    return Flow::Continue;
                }
                match on_control_text(p, state, out, (*pub_slot, *gid), *slow, *started_us, ctx) {
                    Ok(()) => Flow::Continue,
                    Err(e) => {
                        end = Err(e);
                        Flow::Stop
                    }
                }
            }
            Message::Ping(p) => {
                ws::encode_frame(out, ws::OP_PONG, p, ctx.rng.mask());
                Flow::Continue
            }
            Message::Close(code, _reason) => {
                // Echo the close (masked, same code) before dropping.
                let payload = code.map(|c| c.to_be_bytes());
                ws::encode_frame(out, ws::OP_CLOSE, payload.as_ref().map_or(&[][..], |p| &p[..]), ctx.rng.mask());
                end = Err(End::Server(code.unwrap_or(1005)));
                Flow::Stop
            }
            Message::Binary(_) | Message::Pong(_) => Flow::Continue,
        });
        res.map_err(End::Protocol)?;
        end
    }
}

/// Counts the room messages in a text payload, with latency sampling on
/// receivers during the measured phase. `publisher` selects which counter is
/// charged (a publisher's copies of the room traffic are not sampled; with
/// --dm-pairs its peer's messages are deliveries). `gid`: the connection's
/// number.
#[inline]
fn count_messages(p: &[u8], ctx: &mut Ctx, publisher: bool, gid: u32) {
    if publisher {
        if ctx.dm {
            count_dm(p, ctx, gid);
        } else if ctx.measuring {
            ctx.counters.pub_received += ctx.scanner.count(p);
        }
        return;
    }
    if ctx.per_msg.is_some() {
        count_per_message(p, ctx);
        return;
    }
    let n = if ctx.measuring {
        let now = ctx.now_us;
        let lat = &mut ctx.lat;
        let no_t = &mut ctx.counters.no_t;
        let n = ctx.scanner.count_and_sample(p, &mut ctx.lat_countdown, ctx.lat_every, |t| match t {
            Some(t) => lat.record(now.saturating_sub(t)),
            None => *no_t += 1,
        });
        ctx.counters.received += n;
        n
    } else {
        ctx.scanner.count(p)
    };
    ctx.counters.received_total += n;
}

/// --dm-pairs, on a publisher: messages from another user (its peer) are
/// deliveries with their latency; its own copies count as `pub_received`.
fn count_dm(p: &[u8], ctx: &mut Ctx, gid: u32) {
    let own = ctx.user_offset + gid as u64;
    let (now, measuring) = (ctx.now_us, ctx.measuring);
    let Ctx { scanner, counters, lat, user_prefix, .. } = ctx;
    scanner.each_message(p, |s, m| {
        if s.sender_number(m, user_prefix) == Some(own) {
            if measuring {
                counters.pub_received += 1;
            }
            return;
        }
        counters.received_total += 1;
        if measuring {
            counters.received += 1;
            match s.find_t(m) {
                Some(t) => lat.record(now.saturating_sub(t)),
                None => counters.no_t += 1,
            }
        }
    });
}

/// --per-message, on a receiver: every message's latency (measured phase) and
/// its latest receive time, in all phases.
fn count_per_message(p: &[u8], ctx: &mut Ctx) {
    let (now, measuring) = (ctx.now_us, ctx.measuring);
    let Ctx { scanner, counters, lat, per_msg, .. } = ctx;
    let Some(map) = per_msg.as_mut() else { return };
    let n = scanner.each_message(p, |s, m| match s.find_t(m) {
        Some(t) => {
            let e = map.entry(t).or_insert((0, 0));
            e.0 = e.0.max(now);
            e.1 += 1;
            if measuring {
                lat.record(now.saturating_sub(t));
            }
        }
        None => {
            if measuring {
                counters.no_t += 1;
            }
        }
    });
    counters.received_total += n;
    if measuring {
        counters.received += n;
    }
}

/// Text frames outside the receiver hot path: the handshake sequence and
/// publisher acks/errors.
fn on_control_text(
    p: &[u8],
    state: &mut State,
    out: &mut Vec<u8>,
    (pub_slot, gid): (u32, u32),
    slow: bool,
    started_us: u64,
    ctx: &mut Ctx,
) -> Result<(), End> {
    let op = op_of(p);
    match *state {
        State::AwaitConnected => {
            if op == Some(b"connected") {
                match &ctx.join_payload {
                    Some(join) => {
                        ws::encode_frame(out, ws::OP_TEXT, join, ctx.rng.mask());
                        *state = State::AwaitJoinAck;
                    }
                    None => become_ready(state, pub_slot, slow, started_us, ctx),
                }
            }
            Ok(())
        }
        State::AwaitJoinAck => match op {
            Some(b"ack") => {
                become_ready(state, pub_slot, slow, started_us, ctx);
                Ok(())
            }
            Some(b"error") => Err(End::JoinError),
            // Presence or early room messages: ignore until the ack.
            _ => Ok(()),
        },
        State::Ready => {
            // Publisher (receivers take the hot path in on_frames).
            match op {
                Some(b"ack") => {
                    ctx.counters.acks_total += 1;
                    let sent = ctx.scanner.request_id(p).and_then(|id| ctx.sent.remove(&(pub_slot, id)));
                    if ctx.measuring {
                        ctx.counters.acks += 1;
                        if let Some(t0) = sent {
                            ctx.ack_lat.record(ctx.mono_us().saturating_sub(t0));
                        }
                    }
                    release_slot(ctx, pub_slot);
                }
                Some(b"error") => {
                    if let Some(id) = ctx.scanner.request_id(p) {
                        ctx.sent.remove(&(pub_slot, id));
                    }
                    if ctx.measuring {
                        ctx.counters.errors += 1;
                    }
                    release_slot(ctx, pub_slot);
                }
                _ => count_messages(p, ctx, true, gid),
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[inline]
fn release_slot(ctx: &mut Ctx, slot: u32) {
    if let Some(n) = ctx.pub_inflight.get_mut(slot as usize) {
        *n = n.saturating_sub(1);
    }
}

fn become_ready(state: &mut State, pub_slot: u32, slow: bool, started_us: u64, ctx: &mut Ctx) {
    *state = State::Ready;
    ctx.handshaking -= 1;
    if slow {
        ctx.counters.slow_ready += 1;
    } else if pub_slot == NOT_PUBLISHER {
        ctx.counters.ready += 1;
    } else {
        ctx.counters.pub_ready += 1;
    }
    let now = ctx.mono_us();
    ctx.connect_hist.record(now.saturating_sub(started_us));
}
