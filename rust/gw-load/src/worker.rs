//! One event-loop thread: a mio `Poll` (edge-triggered epoll) driving a
//! share of the connections. It opens them (rate- and inflight-limited),
//! sends heartbeats spread over the interval, publishes (fixed-rate or
//! window-limited) when it owns publisher connections, and counts what it
//! receives. The coordinator (main thread) drives the phases through
//! [`Shared::phase`].

use crate::cli::{Config, Rate};
use crate::conn::{Conn, Ctx, End, State, NOT_PUBLISHER};
use crate::scan::Scanner;
use crate::stats::{Counters, Histogram, SharedCounters};
use crate::sys::{self, Rng};
use crate::ws;
use mio::event::Event;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, Socket, Type};
use std::collections::HashMap;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Size of the per-thread read buffer all connections read into (wss://
/// reads leave `tls::HEADROOM` of it free in front).
const SCRATCH: usize = 256 * 1024;
/// Don't queue more publishes on a connection whose unsent output exceeds
/// this (the server is not reading); the pacer catches up later.
const MAX_PUB_BACKLOG: usize = 1 << 20;
/// At most this many publishes per publisher per loop iteration.
const MAX_PUB_BURST: u64 = 1000;
/// At the end, how long to keep reading slow consumers for the server's
/// close frame (in total, across all of a thread's slow consumers).
const SLOW_DRAIN: Duration = Duration::from_secs(2);

/// A non-blocking, TCP_NODELAY socket, bound to source address `n` of
/// --sources (round-robin) when there are several, with the connect to the
/// target started (completion arrives as a writable event). `rcvbuf` > 0 sets
/// SO_RCVBUF first, so the advertised window (scale) follows it.
pub fn open_socket(cfg: &Config, n: usize, rcvbuf: usize) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(cfg.target), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if rcvbuf > 0 {
        socket.set_recv_buffer_size(rcvbuf)?;
    }
    if !cfg.sources.is_empty() {
        let src = cfg.sources[n % cfg.sources.len()];
        socket.bind(&SocketAddr::new(src.into(), 0).into())?;
    }
    match socket.connect(&cfg.target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EINPROGRESS as i32) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// Run phases, set by the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Connecting / idle: no publishing.
    Idle = 0,
    /// Unmeasured publishing.
    Warmup = 1,
    /// Gap between warmup and measurement: no publishing, nothing counted.
    Quiet = 2,
    /// Measured publishing.
    Measure = 3,
    /// Publishing stopped; late deliveries still counted.
    Drain = 4,
    /// Close everything and return.
    Done = 5,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            1 => Phase::Warmup,
            2 => Phase::Quiet,
            3 => Phase::Measure,
            4 => Phase::Drain,
            5 => Phase::Done,
            _ => Phase::Idle,
        }
    }

    pub fn publishing(self) -> bool {
        matches!(self, Phase::Warmup | Phase::Measure)
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Warmup => "warmup",
            Phase::Quiet => "quiet",
            Phase::Measure => "measure",
            Phase::Drain => "drain",
            Phase::Done => "done",
        }
    }
}

/// State shared between the coordinator and the workers.
pub struct Shared {
    phase: AtomicU8,
    pub counters: Vec<SharedCounters>,
}

impl Shared {
    pub fn new(threads: usize) -> Shared {
        Shared {
            phase: AtomicU8::new(Phase::Idle as u8),
            counters: (0..threads).map(|_| SharedCounters::default()).collect(),
        }
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Release);
    }
}

/// What a worker hands back when done.
pub struct ThreadResult {
    pub counters: Counters,
    pub lat: Histogram,
    pub connect_hist: Histogram,
    pub closes: HashMap<String, u64>,
    pub slow_closes: HashMap<String, u64>,
    pub tls_full: u64,
    pub tls_resumed: u64,
    pub tls_negotiated: Option<crate::tls::Negotiated>,
    pub ack_lat: Histogram,
    pub per_msg: Option<HashMap<u64, (u64, u32)>>,
    /// Publisher timestamps (`t`) of the first and last measured publish.
    pub measured_t: Option<(u64, u64)>,
}

/// A publisher owned by this thread.
struct Publisher {
    /// Index into `conns`.
    conn: usize,
    /// The room it posts into, as a JSON string (with quotes).
    room_json: String,
    /// Next request id (1 is the join).
    next_id: u64,
    /// Publishes sent since the current publishing phase started.
    sent_in_phase: u64,
    /// Fixed rate: this publisher's offset in its period (its number /
    /// publishers, in [0, 1)), so that many slow publishers do not all send
    /// at the same instants.
    phase: f64,
}

pub struct Worker {
    tid: usize,
    cfg: Arc<Config>,
    shared: Arc<Shared>,
    poll: Poll,
    conns: Vec<Conn>,
    scratch: Vec<u8>,
    ctx: Ctx,
    /// Global ids this thread connects (publishers first), and progress.
    todo: Vec<u32>,
    next_todo: usize,
    connect_started_at: Option<Instant>,
    max_inflight: u32,
    /// Per-thread connect rate (conns/s), 0 = unlimited.
    connect_rate: f64,
    // Heartbeat: a cursor sweeps the connections once per interval.
    ping_cursor: usize,
    ping_cycle_start: Instant,
    ping_payload: &'static [u8],
    // Publishing.
    pubs: Vec<Publisher>,
    /// Messages/s per publisher with a fixed rate.
    rate_per_pub: f64,
    phase: Phase,
    phase_started: Instant,
    /// Publisher timestamps of the first and last measured publish.
    measured_t: Option<(u64, u64)>,
    /// Publish `type` as a JSON string (with quotes).
    type_json: String,
    /// Padding for the publish `data`.
    padding: String,
    msg_buf: Vec<u8>,
}

impl Worker {
    pub fn new(tid: usize, cfg: Arc<Config>, shared: Arc<Shared>) -> io::Result<Worker> {
        let threads = cfg.args.threads as u64;
        let receivers = cfg.args.conns as u64;
        let publishers = cfg.publishers() as u64;
        // Global ids: receivers 0..N, publishers N..N+P; thread = id % threads.
        let mine = |id: &u64| id % threads == tid as u64;
        let mut todo: Vec<u32> = (receivers..receivers + publishers).filter(mine).map(|i| i as u32).collect();
        let n_pubs = todo.len();
        todo.extend((0..receivers).filter(mine).map(|i| i as u32));

        let room_json = serde_json::to_string(&cfg.args.room).expect("string serializes");
        let type_json = serde_json::to_string(&cfg.args.msg_type).expect("string serializes");
        let join_payload = if cfg.args.sync {
            Some(br#"{"op":"sync","id":1,"limit":1,"msgs":0}"#.to_vec())
        } else {
            (!cfg.args.no_join).then(|| format!(r#"{{"op":"join","id":1,"room":{room_json}}}"#).into_bytes())
        };
        // data = {"t":<16 digits>,"p":"<pad>"} -> 29 bytes + padding.
        let padding = "x".repeat(cfg.args.payload_bytes.saturating_sub(29));
        let rate_per_pub = match cfg.rate {
            Rate::Fixed(r) if publishers > 0 => r / publishers as f64,
            _ => 0.0,
        };
        let now = Instant::now();
        Ok(Worker {
            tid,
            poll: Poll::new()?,
            conns: Vec::with_capacity(todo.len()),
            scratch: vec![0; SCRATCH],
            ctx: Ctx {
                scanner: Scanner::default(),
                rng: Rng::new(tid as u64 + 1),
                counters: Counters::default(),
                lat: Histogram::default(),
                connect_hist: Histogram::default(),
                closes: HashMap::new(),
                slow_closes: HashMap::new(),
                measuring: false,
                now_us: 0,
                lat_countdown: cfg.args.lat_sample,
                lat_every: cfg.args.lat_sample,
                pub_inflight: vec![0; n_pubs],
                join_payload,
                epoch: now,
                handshaking: 0,
                tls_full: 0,
                tls_resumed: 0,
                tls_negotiated: None,
                ack_lat: Histogram::default(),
                sent: HashMap::new(),
                dm: cfg.args.dm_pairs,
                user_prefix: cfg.args.user_prefix.as_bytes().to_vec(),
                user_offset: cfg.args.user_offset,
                per_msg: cfg.args.per_message.then(HashMap::new),
            },
            todo,
            next_todo: 0,
            connect_started_at: None,
            max_inflight: (cfg.args.connect_inflight / cfg.args.threads).max(1),
            connect_rate: cfg.args.connect_rate / threads as f64,
            ping_cursor: 0,
            ping_cycle_start: now,
            ping_payload: br#"{"op":"ping"}"#,
            pubs: Vec::with_capacity(n_pubs),
            rate_per_pub,
            phase: Phase::Idle,
            phase_started: now,
            measured_t: None,
            type_json,
            padding,
            msg_buf: Vec::with_capacity(256),
            cfg,
            shared,
        })
    }

    /// Runs the event loop until the coordinator sets [`Phase::Done`].
    pub fn run(mut self) -> ThreadResult {
        let mut events = Events::with_capacity(1024);
        let mut next_timeout_check = Instant::now();
        loop {
            let phase = self.shared.phase();
            if phase == Phase::Done {
                break;
            }
            if phase != self.phase {
                self.enter_phase(phase);
            }
            let now = Instant::now();
            self.connect_more(now);
            self.heartbeat(now);
            if self.phase.publishing() && matches!(self.cfg.rate, Rate::Fixed(_)) {
                self.publish_fixed_rate(now);
            }
            if self.ctx.handshaking > 0 && now >= next_timeout_check {
                self.expire_handshakes();
                next_timeout_check = now + Duration::from_millis(100);
            }
            self.ctx.counters.publish_to(&self.shared.counters[self.tid]);

            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    eprintln!("gw-load: thread {}: poll failed: {e}", self.tid);
                    break;
                }
            }
            for ev in events.iter() {
                self.on_event(ev);
            }
        }
        self.drain_slow();
        self.close_all();
        self.ctx.counters.publish_to(&self.shared.counters[self.tid]);
        ThreadResult {
            counters: self.ctx.counters,
            lat: self.ctx.lat,
            connect_hist: self.ctx.connect_hist,
            closes: self.ctx.closes,
            slow_closes: self.ctx.slow_closes,
            tls_full: self.ctx.tls_full,
            tls_resumed: self.ctx.tls_resumed,
            tls_negotiated: self.ctx.tls_negotiated,
            ack_lat: self.ctx.ack_lat,
            per_msg: self.ctx.per_msg,
            measured_t: self.measured_t,
        }
    }

    /// How long to sleep in epoll: short while pacing publishes or connects,
    /// otherwise long enough to be cheap but short enough for the heartbeat
    /// sweep and phase changes.
    fn poll_timeout(&self) -> Duration {
        let pacing_pubs = self.phase.publishing() && !self.pubs.is_empty() && matches!(self.cfg.rate, Rate::Fixed(_));
        let pacing_connects = self.next_todo < self.todo.len() && self.connect_rate > 0.0;
        if pacing_pubs || pacing_connects {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(10)
        }
    }

    fn enter_phase(&mut self, phase: Phase) {
        self.phase = phase;
        self.phase_started = Instant::now();
        self.ctx.measuring = matches!(phase, Phase::Measure | Phase::Drain);
        for p in &mut self.pubs {
            p.sent_in_phase = 0;
        }
        if phase.publishing() && self.cfg.rate == Rate::Max {
            for slot in 0..self.pubs.len() {
                self.top_up(slot);
            }
        }
    }

    // ----- connecting -----

    /// Starts as many connections as the inflight cap and rate allow.
    fn connect_more(&mut self, now: Instant) {
        if self.next_todo >= self.todo.len() {
            return;
        }
        let started_at = *self.connect_started_at.get_or_insert(now);
        let mut allowed = self.todo.len();
        if self.connect_rate > 0.0 {
            let due = (now.duration_since(started_at).as_secs_f64() * self.connect_rate) as usize + 1;
            allowed = allowed.min(due);
        }
        while self.next_todo < allowed && self.ctx.handshaking < self.max_inflight {
            let gid = self.todo[self.next_todo];
            self.next_todo += 1;
            let is_pub = self.next_todo <= self.ctx.pub_inflight.len();
            if let Err(end) = self.start_connect(gid, is_pub) {
                self.ctx.counters.failed += 1;
                *self.ctx.closes.entry(end.key()).or_insert(0) += 1;
            }
        }
    }

    /// Creates a non-blocking socket, binds the source address, starts the
    /// TCP connect and registers the socket. Completion arrives as a
    /// writable event.
    fn start_connect(&mut self, gid: u32, is_pub: bool) -> Result<(), End> {
        let cfg = &self.cfg;
        let err = |e: io::Error| End::ConnectError(e.kind());
        let slow = !is_pub && gid < cfg.args.slow;
        let rcvbuf = if slow { cfg.args.slow_rcvbuf } else { 0 };
        let mut stream = open_socket(cfg, gid as usize, rcvbuf).map_err(err)?;
        let tls = match &cfg.tls {
            Some(t) => Some(t.connect().map_err(|e| End::Tls(crate::tls::error_key(&e)))?),
            None => None,
        };
        let idx = self.conns.len();
        self.poll.registry().register(&mut stream, Token(idx), Interest::READABLE | Interest::WRITABLE).map_err(err)?;
        let pub_slot = if is_pub {
            let slot = self.pubs.len();
            let room = cfg.publish_room(gid as u64 - cfg.args.conns as u64);

            let room_json = serde_json::to_string(&room).expect("string serializes");
            let p = gid as u64 - cfg.args.conns as u64;
            let phase = p as f64 / cfg.publishers().max(1) as f64;
            self.pubs.push(Publisher { conn: idx, room_json, next_id: 2, sent_in_phase: 0, phase });
            slot as u32
        } else {
            NOT_PUBLISHER
        };
        let key = ws::make_key(self.ctx.rng.bytes16());
        self.conns.push(Conn::new(stream, tls, gid, pub_slot, slow, self.ctx.mono_us(), key));
        self.ctx.handshaking += 1;
        Ok(())
    }

    /// Fails handshakes older than --connect-timeout.
    fn expire_handshakes(&mut self) {
        let limit = self.cfg.connect_timeout.as_micros() as u64;
        let now = self.ctx.mono_us();
        for idx in 0..self.conns.len() {
            let c = &self.conns[idx];
            if c.is_pending() && now.saturating_sub(c.started_us) > limit {
                self.end_conn(idx, End::ConnectTimeout);
            }
        }
    }

    /// The TCP connect finished (writable event): check it and send the
    /// upgrade request.
    fn on_connected(&mut self, idx: usize) -> Result<(), End> {
        let conn = &mut self.conns[idx];
        let stream = conn.stream.as_mut().expect("connecting conn has a socket");
        match stream.take_error() {
            Ok(Some(e)) | Err(e) => return Err(End::ConnectError(e.kind())),
            Ok(None) => {}
        }
        match stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()), // spurious wake-up
            Err(e) => return Err(End::ConnectError(e.kind())),
        }
        let path = self.cfg.request_path(conn.gid as u64, sys::unix_secs());
        let key = &conn.hs.as_ref().expect("handshake data").key;
        let req = ws::upgrade_request(&self.cfg.host_header, &path, key, &self.cfg.args.subprotocol);
        conn.out.extend_from_slice(req.as_bytes());
        conn.state = State::Upgrading;
        conn.flush()
    }

    // ----- I/O -----

    fn on_event(&mut self, ev: &Event) {
        let idx = ev.token().0;
        let Some(conn) = self.conns.get(idx) else { return };
        let res = match conn.state {
            State::Closed => return,
            State::Connecting => self.on_connected(idx).and_then(|()| {
                // Data may already be there (unlikely before our request).
                if ev.is_readable() && self.conns[idx].state != State::Connecting {
                    self.read_conn(idx, ev.is_read_closed())
                } else {
                    Ok(())
                }
            }),
            _ if conn.paused => {
                // A slow consumer: never read, only send (heartbeats).
                if ev.is_writable() && conn.has_output() {
                    self.conns[idx].flush()
                } else {
                    Ok(())
                }
            }
            _ => {
                let mut r = Ok(());
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    r = self.read_conn(idx, ev.is_read_closed() || ev.is_error());
                }
                if r.is_ok() && ev.is_writable() && self.conns[idx].has_output() {
                    r = self.conns[idx].flush();
                }
                r
            }
        };
        match res {
            Ok(()) => {
                let slot = self.conns[idx].pub_slot;
                if slot != NOT_PUBLISHER && self.cfg.rate == Rate::Max && self.phase.publishing() {
                    self.top_up(slot as usize);
                }
            }
            Err(end) => self.end_conn(idx, end),
        }
    }

    /// Reads until the socket is drained, feeding the protocol handler, then
    /// flushes replies (pongs, join, close echo).
    ///
    /// mio registers edge-triggered. On Linux a short read (less than the
    /// buffer) means the receive queue was emptied, and any later arrival
    /// raises a new edge, so we skip the extra read that would only return
    /// EAGAIN -- unless the peer already half-closed (`drain_all`), where
    /// we read on to see the EOF.
    fn read_conn(&mut self, idx: usize, drain_all: bool) -> Result<(), End> {
        let conn = &mut self.conns[idx];
        let at = conn.read_offset();
        loop {
            let Some(stream) = conn.stream.as_mut() else { return Ok(()) };
            match stream.read(&mut self.scratch[at..]) {
                Ok(0) => {
                    // Flush a pending close echo etc. before reporting EOF.
                    let _ = conn.flush();
                    return Err(End::Eof);
                }
                Ok(n) => {
                    self.ctx.now_us = sys::unix_micros();
                    if let Err(end) = conn.on_wire(&mut self.scratch[..at + n], at, &mut self.ctx) {
                        let _ = conn.flush();
                        return Err(end);
                    }
                    if conn.slow && conn.state == State::Ready {
                        // Joined: from now on this slow consumer never reads.
                        // Watching only writability keeps its heartbeats going.
                        conn.paused = true;
                        if let Some(stream) = conn.stream.as_mut() {
                            self.poll
                                .registry()
                                .reregister(stream, Token(idx), Interest::WRITABLE)
                                .map_err(|e| End::Io(e.kind()))?;
                        }
                        break;
                    }
                    if at + n < self.scratch.len() && !drain_all {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(End::Io(e.kind())),
            }
        }
        if conn.has_output() {
            conn.flush()
        } else {
            Ok(())
        }
    }

    /// Closes a connection and accounts for it.
    fn end_conn(&mut self, idx: usize, end: End) {
        let conn = &mut self.conns[idx];
        if conn.state == State::Closed {
            return;
        }
        if conn.is_pending() {
            self.ctx.handshaking -= 1;
            self.ctx.counters.failed += 1;
        } else if conn.slow {
            *self.ctx.slow_closes.entry(end.key()).or_insert(0) += 1;
            conn.state = State::Closed;
            conn.stream = None;
            conn.reader = Default::default();
            conn.out = Vec::new();
            conn.tls = None;
            return;
        } else {
            if conn.is_publisher() {
                self.ctx.counters.pub_lost += 1;
            } else {
                self.ctx.counters.lost += 1;
            }
        }
        *self.ctx.closes.entry(end.key()).or_insert(0) += 1;
        conn.state = State::Closed;
        if let Some(mut s) = conn.stream.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        conn.reader = Default::default();
        conn.out = Vec::new();
        conn.hs = None;
        conn.tls = None;
    }

    /// At the end: read what the server queued to each slow consumer, to
    /// learn whether it closed the connection (e.g. 4008 slow consumer).
    /// Slow consumers still open when the time is up count as `open`.
    fn drain_slow(&mut self) {
        let deadline = Instant::now() + SLOW_DRAIN;
        for idx in 0..self.conns.len() {
            if !self.conns[idx].paused || self.conns[idx].state == State::Closed {
                continue;
            }
            let end = loop {
                let conn = &mut self.conns[idx];
                let at = conn.read_offset();
                let Some(stream) = conn.stream.as_mut() else { break None };
                match stream.read(&mut self.scratch[at..]) {
                    Ok(0) => break Some(End::Eof),
                    Ok(n) => {
                        self.ctx.counters.slow_bytes += n as u64;
                        if let Err(end) = conn.on_wire(&mut self.scratch[..at + n], at, &mut self.ctx) {
                            break Some(end);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if Instant::now() >= deadline {
                            break None;
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Some(End::Io(e.kind())),
                }
            };
            match end {
                Some(end) => self.end_conn(idx, end),
                None => *self.ctx.slow_closes.entry("open".into()).or_insert(0) += 1,
            }
        }
    }

    /// At the end: send a normal close on every established connection and
    /// drop all sockets.
    fn close_all(&mut self) {
        for c in &mut self.conns {
            if c.state == State::Ready {
                ws::encode_frame(&mut c.out, ws::OP_CLOSE, &1000u16.to_be_bytes(), self.ctx.rng.mask());
                let _ = c.flush();
                if let Some(t) = c.tls.as_mut() {
                    // After the frame (nothing is sent after the alert).
                    t.close_notify();
                    let _ = c.flush();
                }
            }
            c.stream = None;
            c.state = State::Closed;
        }
    }

    // ----- heartbeat -----

    /// Sends the app-level `{"op":"ping"}`: a cursor sweeps all connections
    /// once per --ping-interval, so pings are spread evenly over time.
    fn heartbeat(&mut self, now: Instant) {
        let Some(interval) = self.cfg.ping_interval else { return };
        if self.conns.is_empty() {
            return;
        }
        let mut elapsed = now.duration_since(self.ping_cycle_start);
        if elapsed >= interval {
            // Finish the previous sweep, then start a new cycle.
            self.ping_until(self.conns.len());
            self.ping_cursor = 0;
            self.ping_cycle_start += interval;
            if now.duration_since(self.ping_cycle_start) >= interval {
                self.ping_cycle_start = now; // we fell far behind; resync
            }
            elapsed = now.duration_since(self.ping_cycle_start);
        }
        let target = ((elapsed.as_secs_f64() / interval.as_secs_f64()) * self.conns.len() as f64) as usize;
        self.ping_until(target.min(self.conns.len()));
    }

    fn ping_until(&mut self, target: usize) {
        while self.ping_cursor < target {
            let idx = self.ping_cursor;
            self.ping_cursor += 1;
            let c = &mut self.conns[idx];
            if matches!(c.state, State::Ready | State::AwaitJoinAck) {
                c.queue_text(self.ping_payload, &mut self.ctx.rng);
                if let Err(end) = c.flush() {
                    self.end_conn(idx, end);
                }
            }
        }
    }

    // ----- publishing -----

    /// Fixed-rate pacing: each publisher sends `floor(rate * elapsed + phase)`
    /// messages since the phase started (publisher k of P is k/P of a period
    /// ahead: P publishers at r/P msgs/s each send evenly spread, not in
    /// bursts of P).
    fn publish_fixed_rate(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.phase_started).as_secs_f64();
        let base = elapsed * self.rate_per_pub;
        for slot in 0..self.pubs.len() {
            let due = (base + self.pubs[slot].phase) as u64;
            let backlog = due.saturating_sub(self.pubs[slot].sent_in_phase).min(MAX_PUB_BURST);
            if backlog == 0 {
                continue;
            }
            let ci = self.pubs[slot].conn;
            if self.conns[ci].state != State::Ready {
                continue;
            }
            for _ in 0..backlog {
                if self.conns[ci].out.len() > MAX_PUB_BACKLOG {
                    break;
                }
                self.queue_publish(slot);
            }
            if let Err(end) = self.conns[ci].flush() {
                self.end_conn(ci, end);
            }
        }
    }

    /// Window mode: keep --window publishes unacked.
    fn top_up(&mut self, slot: usize) {
        let ci = self.pubs[slot].conn;
        if self.conns[ci].state != State::Ready {
            return;
        }
        let mut queued = false;
        while self.ctx.pub_inflight[slot] < self.cfg.args.window {
            self.queue_publish(slot);
            queued = true;
        }
        if queued {
            if let Err(end) = self.conns[ci].flush() {
                self.end_conn(ci, end);
            }
        }
    }

    /// Queues one publish frame on publisher `slot`:
    /// `{"op":"publish","id":N,"room":R,"type":"chat","data":{"t":µs,"p":"…"}}`.
    fn queue_publish(&mut self, slot: usize) {
        use std::io::Write as _;
        let p = &mut self.pubs[slot];
        let id = p.next_id;
        p.next_id += 1;
        p.sent_in_phase += 1;
        self.msg_buf.clear();
        let t = sys::unix_micros();
        let _ = write!(
            self.msg_buf,
            r#"{{"op":"publish","id":{id},"room":{},"type":{},"data":{{"t":{t},"p":"{}"}}}}"#,
            p.room_json, self.type_json, self.padding
        );
        let ci = p.conn;
        self.conns[ci].queue_text(&self.msg_buf, &mut self.ctx.rng);
        let at = self.ctx.mono_us();
        self.ctx.sent.insert((slot as u32, id), at);
        self.ctx.pub_inflight[slot] += 1;
        self.ctx.counters.published_total += 1;
        if self.phase == Phase::Measure {
            self.ctx.counters.published += 1;
            let (lo, hi) = self.measured_t.get_or_insert((t, t));
            *lo = (*lo).min(t);
            *hi = (*hi).max(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli;
    use crate::stats::Snapshot;
    use clap::Parser as _;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// Server frame (unmasked) with a 16-bit or 7-bit length.
    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        if payload.len() < 126 {
            f.push(payload.len() as u8);
        } else {
            f.push(126);
            f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        f.extend_from_slice(payload);
        f
    }

    /// The fake gateway's side of the upgrade and the join on `s` (plain or
    /// TLS): answer the upgrade, send `connected`, wait for the join (a masked
    /// client frame) and ack it.
    fn accept_upgrade_and_join(s: &mut (impl Read + Write)) {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let key = head.lines().find_map(|l| l.strip_prefix("Sec-WebSocket-Key:")).unwrap().trim().to_string();
        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: gateway.v1\r\n\r\n",
            ws::accept_for(&key)
        );
        s.write_all(resp.as_bytes()).unwrap();
        s.write_all(&server_frame(ws::OP_TEXT, br#"{"op":"connected"}"#)).unwrap();
        let mut hdr = [0u8; 2];
        s.read_exact(&mut hdr).unwrap();
        let mut rest = vec![0u8; 4 + (hdr[1] & 0x7f) as usize];
        s.read_exact(&mut rest).unwrap();
        s.write_all(&server_frame(ws::OP_TEXT, br#"{"op":"ack","id":1}"#)).unwrap();
    }

    /// A one-connection fake gateway: upgrade, `connected`, ack the join, then
    /// (once told) send room messages and a 4008 close without reading.
    #[test]
    fn slow_consumer_stops_reading_and_reports_the_close() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = format!("ws://127.0.0.1:{port}/ws");
        let args = cli::Args::try_parse_from([
            "gw-load",
            "--url",
            &url,
            "--conns",
            "1",
            "--slow",
            "1",
            "--publishers",
            "0",
            "--ping-interval",
            "0",
        ])
        .unwrap();
        let cfg = Arc::new(Config::from_args(args).unwrap());
        let shared = Arc::new(Shared::new(1));
        let worker = Worker::new(0, cfg, shared.clone()).unwrap();
        let handle = std::thread::spawn(move || worker.run());

        let (mut sock, _) = listener.accept().unwrap();
        accept_upgrade_and_join(&mut sock);

        let t0 = Instant::now();
        while Snapshot::read(&shared.counters).slow_ready < 1 {
            assert!(t0.elapsed() < Duration::from_secs(5), "slow consumer never joined");
            std::thread::sleep(Duration::from_millis(5));
        }
        let msg = br#"{"op":"msg","room":"bench","seq":1,"data":{"t":1}}"#;
        let mut burst = Vec::new();
        for _ in 0..1000 {
            burst.extend_from_slice(&server_frame(ws::OP_TEXT, msg));
        }
        burst.extend_from_slice(&server_frame(ws::OP_CLOSE, &4008u16.to_be_bytes()));
        sock.write_all(&burst).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        shared.set_phase(Phase::Done);
        let r = handle.join().unwrap();

        assert_eq!(r.counters.slow_ready, 1);
        assert_eq!(r.counters.ready, 0, "a slow consumer is not a receiver");
        assert_eq!(r.counters.received_total, 0, "slow consumers' messages are not counted");
        assert_eq!(r.counters.slow_bytes, burst.len() as u64, "everything was left unread until the end");
        assert_eq!(r.slow_closes.get("4008"), Some(&1));
        assert!(r.closes.is_empty());
    }

    /// wss://: a one-connection fake gateway behind rustls. Upgrade,
    /// `connected`, ack the join, then 2,000 room messages in records of all
    /// sizes; the client counts every one and reports the handshake.
    #[test]
    fn wss_receiver_counts_every_message() {
        for layer in ["direct", "rustls"] {
            wss_receiver(layer);
        }
    }

    fn wss_receiver(layer: &str) {
        use rustls::{ServerConnection, StreamOwned};

        let pki = crate::tls::testing::pki();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = format!("wss://127.0.0.1:{port}/ws");
        let ca = pki.ca_path.to_str().unwrap().to_string();
        let args = cli::Args::try_parse_from([
            "gw-load",
            "--url",
            &url,
            "--ca",
            &ca,
            "--conns",
            "1",
            "--publishers",
            "0",
            "--ping-interval",
            "0",
            "--tls-record-layer",
            layer,
        ])
        .unwrap();
        let cfg = Arc::new(Config::from_args(args).unwrap());
        let shared = Arc::new(Shared::new(1));
        let worker = Worker::new(0, cfg, shared.clone()).unwrap();
        shared.set_phase(Phase::Measure);
        let handle = std::thread::spawn(move || worker.run());

        let (sock, _) = listener.accept().unwrap();
        let mut tls = StreamOwned::new(ServerConnection::new(pki.server.clone()).unwrap(), sock);
        accept_upgrade_and_join(&mut tls);
        let t0 = Instant::now();
        while Snapshot::read(&shared.counters).ready < 1 {
            assert!(t0.elapsed() < Duration::from_secs(5), "never joined");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Single messages, bursts of them in one record, and one write of
        // ~300 KB that rustls cuts into 16 KiB records mid-frame.
        let msg = |i: u32| {
            server_frame(ws::OP_TEXT, format!(r#"{{"op":"msg","room":"bench","seq":{i},"data":{{"t":1}}}}"#).as_bytes())
        };
        for i in 0..500 {
            tls.write_all(&msg(i)).unwrap();
        }
        let mut burst = Vec::new();
        for i in 500..2000 {
            burst.extend_from_slice(&msg(i));
            if i % 100 == 0 {
                tls.write_all(&burst).unwrap();
                burst.clear();
            }
        }
        let mut big = Vec::new();
        for i in 0..5000 {
            big.extend_from_slice(&msg(i));
        }
        tls.write_all(&burst).unwrap();
        tls.write_all(&big).unwrap();
        tls.flush().unwrap();
        while Snapshot::read(&shared.counters).received_total < 7000 {
            assert!(t0.elapsed() < Duration::from_secs(10), "messages missing");
            std::thread::sleep(Duration::from_millis(5));
        }
        shared.set_phase(Phase::Done);
        let r = handle.join().unwrap();
        assert_eq!(r.counters.received_total, 7000);
        assert_eq!((r.tls_full, r.tls_resumed), (1, 0));
        assert!(r.closes.is_empty(), "{:?}", r.closes);
        // The client's goodbye: a close frame, then close_notify.
        let mut rest = Vec::new();
        let _ = tls.read_to_end(&mut rest);
        assert_eq!(rest.first(), Some(&0x88), "close frame");
    }
}
