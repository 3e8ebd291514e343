//! `--mode handshake`: connection set-up throughput. Each event-loop thread
//! keeps its share of --concurrency connections in flight; a connection is a
//! TCP connect, the TLS handshake (wss://) and, with --upgrade, the WebSocket
//! upgrade up to the `101`. Once it is done it is closed (`close_notify`, then
//! the socket) and its slot starts the next one at the end of the event batch.
//!
//! Each slot is one emulated client with its own TLS session cache, so with
//! --tls-resume on it resumes the session of its previous connection, as a
//! reconnecting device does.
//!
//! Only connections that finish during the measured phase count; what is in
//! flight when a phase changes just carries on (a warmup fills the session
//! cache, so a resumption run measures resumptions).
//!
//! TLS 1.3 sends session tickets after the handshake, one round trip after
//! the client's `Finished`. Without --upgrade and with --tls-resume on, a
//! connection therefore waits for its first ticket before it closes (at most
//! [`TICKET_WAIT_US`]), or the next connection would have nothing to resume
//! with. A server that sends no tickets at all (socketify's uSockets disables
//! them) is recognised after [`NO_TICKET_GIVE_UP`] connections in a row and
//! not waited for any more. TLS 1.2 carries its ticket inside the handshake.

use crate::cli::{Config, OnOff};
use crate::stats::{Counters, Histogram};
use crate::sys::{self, Rng};
use crate::tls::{self, Negotiated, Progress, Session, Tls};
use crate::worker::{self, Phase, Shared};
use crate::ws;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest wait for a TLS 1.3 session ticket after the handshake.
const TICKET_WAIT_US: u64 = 50_000;
/// Stop waiting for tickets after this many connections in a row got none
/// (and none ever did).
const NO_TICKET_GIVE_UP: u32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// No connection (between two).
    Free,
    /// TCP connect in progress.
    Connecting,
    /// TLS handshake in progress (the upgrade request, if any, is held by
    /// rustls until it completes).
    Handshaking,
    /// TLS 1.3 done; waiting for the first session ticket.
    AwaitTicket,
    /// Waiting for the `101`.
    Upgrading,
}

struct Slot {
    /// This emulated client's TLS settings and session cache (wss://).
    client: Option<Tls>,
    stream: Option<TcpStream>,
    tls: Option<Box<Session>>,
    state: St,
    /// µs on the worker's epoch.
    started_us: u64,
    /// When the TLS handshake completed (µs), 0 before.
    tls_done_us: u64,
    /// Sec-WebSocket-Key, with --upgrade.
    key: String,
    /// Upgrade response bytes so far.
    buf: Vec<u8>,
    /// wss:// with --upgrade: the upgrade request, held until the TLS
    /// handshake is done.
    out: Vec<u8>,
}

/// What a handshake thread hands back.
#[derive(Default)]
pub struct HsResult {
    /// Connections completed in the measured phase.
    pub done: u64,
    /// Of those: TLS full / resumed handshakes.
    pub full: u64,
    pub resumed: u64,
    /// Failures in the measured phase, by cause (`closes_by_code` keys).
    pub failures: HashMap<String, u64>,
    /// Connect start -> TLS handshake done (µs, measured phase).
    pub tls_hist: Histogram,
    /// Connect start -> connection counted (µs, measured phase).
    pub conn_hist: Histogram,
    pub negotiated: Option<Negotiated>,
    /// TLS 1.3 connections (measured) closed without having received a ticket
    /// while one was waited for.
    pub no_ticket: u64,
}

impl HsResult {
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    pub fn merge(&mut self, o: HsResult) {
        self.done += o.done;
        self.full += o.full;
        self.resumed += o.resumed;
        for (k, v) in o.failures {
            *self.failures.entry(k).or_insert(0) += v;
        }
        self.no_ticket += o.no_ticket;
        self.tls_hist.merge(&o.tls_hist);
        self.conn_hist.merge(&o.conn_hist);
        if self.negotiated.is_none() {
            self.negotiated = o.negotiated;
        }
    }
}

pub struct HsWorker {
    tid: usize,
    cfg: Arc<Config>,
    shared: Arc<Shared>,
    poll: Poll,
    slots: Vec<Slot>,
    /// Slots to (re)start at the end of the event batch.
    free: Vec<usize>,
    scratch: Vec<u8>,
    rng: Rng,
    epoch: Instant,
    measuring: bool,
    /// Progress for the coordinator (all phases): `ready` = completed,
    /// `failed` = failed.
    progress: Counters,
    res: HsResult,
    /// Identity numbering for the upgrade requests.
    next_gid: u64,
    wait_ticket: bool,
    /// Slots in [`St::AwaitTicket`].
    awaiting: u32,
    /// Connections in a row that waited for a ticket in vain; whether any
    /// ticket ever came.
    no_ticket_run: u32,
    ticket_seen: bool,
}

impl HsWorker {
    pub fn new(tid: usize, cfg: Arc<Config>, shared: Arc<Shared>) -> io::Result<HsWorker> {
        let threads = cfg.args.threads as usize;
        // This thread's share of the concurrency (the first threads take the remainder).
        let n = cfg.args.concurrency as usize / threads + usize::from(tid < cfg.args.concurrency as usize % threads);
        let slots = (0..n)
            .map(|_| Slot {
                client: cfg.tls.as_ref().map(Tls::emulated_client),
                stream: None,
                tls: None,
                state: St::Free,
                started_us: 0,
                tls_done_us: 0,
                key: String::new(),
                buf: Vec::new(),
                out: Vec::new(),
            })
            .collect();
        let wait_ticket = cfg.tls.is_some() && !cfg.args.upgrade && cfg.args.tls_resume == OnOff::On;
        Ok(HsWorker {
            tid,
            poll: Poll::new()?,
            slots,
            free: (0..n).rev().collect(),
            scratch: vec![0; tls::HEADROOM + 64 * 1024],
            rng: Rng::new(tid as u64 + 101),
            epoch: Instant::now(),
            measuring: false,
            progress: Counters::default(),
            res: HsResult::default(),
            next_gid: tid as u64,
            wait_ticket,
            awaiting: 0,
            no_ticket_run: 0,
            ticket_seen: false,
            cfg,
            shared,
        })
    }

    fn mono_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Runs until the coordinator sets [`Phase::Done`].
    pub fn run(mut self) -> HsResult {
        let mut events = Events::with_capacity(1024);
        let mut next_expiry = Instant::now();
        let mut backoff = false;
        loop {
            let phase = self.shared.phase();
            if phase == Phase::Done {
                break;
            }
            self.measuring = phase == Phase::Measure;
            if phase.publishing() {
                backoff = self.start_free();
            }
            let now = Instant::now();
            if now >= next_expiry {
                self.expire();
                next_expiry = now + Duration::from_millis(100);
            }
            if self.awaiting > 0 {
                self.end_ticket_waits();
            }
            self.progress.publish_to(&self.shared.counters[self.tid]);
            // Short sleeps while starting failed (e.g. no local port free), so
            // the slots retry soon but do not spin, and while ticket waits run.
            let timeout = Duration::from_millis(if backoff || self.awaiting > 0 { 1 } else { 10 });
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    eprintln!("gw-load: thread {}: poll failed: {e}", self.tid);
                    break;
                }
            }
            for ev in events.iter() {
                let i = ev.token().0;
                if i < self.slots.len() && self.slots[i].state != St::Free {
                    let r = self.on_event(i, ev.is_readable() || ev.is_read_closed() || ev.is_error());
                    if let Err(cause) = r {
                        self.fail(i, cause);
                    }
                }
            }
        }
        for i in 0..self.slots.len() {
            self.close(i);
        }
        self.progress.publish_to(&self.shared.counters[self.tid]);
        self.res
    }

    /// Starts every free slot. Returns true if one could not start.
    fn start_free(&mut self) -> bool {
        let mut failed = false;
        let mut retry = Vec::new();
        while let Some(i) = self.free.pop() {
            if let Err(cause) = self.start(i) {
                self.count_failure(cause);
                retry.push(i);
                failed = true;
            }
        }
        self.free = retry;
        failed
    }

    fn start(&mut self, i: usize) -> Result<(), String> {
        let cfg = &self.cfg;
        let err = |e: io::Error| format!("connect_{:?}", e.kind());
        let mut stream = worker::open_socket(cfg, self.next_gid as usize, 0).map_err(err)?;
        let tls = match &self.slots[i].client {
            Some(t) => Some(t.connect().map_err(|e| format!("tls_{}", tls::error_key(&e)))?),
            None => None,
        };
        self.poll.registry().register(&mut stream, Token(i), Interest::READABLE | Interest::WRITABLE).map_err(err)?;
        let started_us = self.mono_us();
        let key = if cfg.args.upgrade { ws::make_key(self.rng.bytes16()) } else { String::new() };
        let s = &mut self.slots[i];
        s.stream = Some(stream);
        s.tls = tls;
        s.state = St::Connecting;
        s.started_us = started_us;
        s.tls_done_us = 0;
        s.key = key;
        s.buf.clear();
        s.out.clear();
        Ok(())
    }

    fn on_event(&mut self, i: usize, readable: bool) -> Result<(), String> {
        if self.slots[i].state == St::Connecting {
            // Completion is a writable event; a refused connect may come as an
            // error only: look at every event.
            if !self.on_connected(i)? {
                return Ok(()); // spurious wake-up
            }
        }
        if readable {
            self.read(i)?;
        }
        if self.slots[i].state != St::Free {
            self.advance(i)?;
        }
        Ok(())
    }

    /// The TCP connect finished: start the TLS handshake and queue the
    /// upgrade request. Returns false on a spurious wake-up.
    fn on_connected(&mut self, i: usize) -> Result<bool, String> {
        let s = &mut self.slots[i];
        let stream = s.stream.as_mut().expect("connecting slot has a socket");
        match stream.take_error() {
            Ok(Some(e)) | Err(e) => return Err(format!("connect_{:?}", e.kind())),
            Ok(None) => {}
        }
        match stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(false),
            Err(e) => return Err(format!("connect_{:?}", e.kind())),
        }
        let req = if self.cfg.args.upgrade {
            let path = self.cfg.request_path(self.next_gid, sys::unix_secs());
            self.next_gid += self.cfg.args.threads as u64;
            ws::upgrade_request(&self.cfg.host_header, &path, &s.key, &self.cfg.args.subprotocol)
        } else {
            String::new()
        };
        match s.tls.as_mut() {
            Some(t) => {
                // The request waits for the handshake; this sends the ClientHello.
                s.out.extend_from_slice(req.as_bytes());
                tls::flush(t, stream, &[]).map_err(|e| format!("io_{:?}", e.kind()))?;
                s.state = St::Handshaking;
            }
            None if self.cfg.args.upgrade => {
                // A fresh socket takes a few hundred bytes at once.
                let n = stream.write(req.as_bytes()).map_err(|e| format!("io_{:?}", e.kind()))?;
                if n < req.len() {
                    return Err("io_short_write".into());
                }
                s.state = St::Upgrading;
            }
            None => s.state = St::Upgrading, // plain TCP connect: done (see advance)
        }
        Ok(true)
    }

    /// Reads what the socket has, through TLS when wss://.
    fn read(&mut self, i: usize) -> Result<(), String> {
        let s = &mut self.slots[i];
        let at = if s.tls.is_some() { tls::HEADROOM } else { 0 };
        loop {
            let Some(stream) = s.stream.as_mut() else { return Ok(()) };
            let n = match stream.read(&mut self.scratch[at..]) {
                Ok(0) => return Err("eof".into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("io_{:?}", e.kind())),
            };
            match s.tls.as_mut() {
                Some(t) => {
                    let buf = &mut s.buf;
                    let read = t.read(
                        &mut self.scratch[..at + n],
                        at,
                        |e| format!("tls_{}", tls::error_key(&e)),
                        |p| {
                            buf.extend_from_slice(p);
                            Ok(())
                        },
                    );
                    match read {
                        Err(e) => {
                            // Send rustls's alert before dropping.
                            let _ = tls::flush(t, stream, &[]);
                            return Err(e);
                        }
                        Ok(Progress::PeerClosed) => return Err("tls_closed".into()),
                        Ok(Progress::Handshaking | Progress::Open) => {}
                    }
                }
                None => s.buf.extend_from_slice(&self.scratch[..n]),
            }
            if at + n < self.scratch.len() {
                return Ok(());
            }
        }
    }

    /// Moves a slot on after new input: handshake done? ticket there? `101`?
    fn advance(&mut self, i: usize) -> Result<(), String> {
        let now = self.mono_us();
        let upgrade = self.cfg.args.upgrade;
        let wait_ticket = self.wait_ticket;
        let s = &mut self.slots[i];
        if let (Some(t), Some(stream)) = (s.tls.as_mut(), s.stream.as_mut()) {
            if s.state == St::Handshaking && !t.is_handshaking() {
                s.tls_done_us = now;
                s.state = if upgrade {
                    St::Upgrading
                } else if wait_ticket && t.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
                    self.awaiting += 1;
                    St::AwaitTicket
                } else {
                    St::Free // done
                };
            }
            if s.state == St::AwaitTicket && t.tickets() > 0 {
                self.awaiting -= 1;
                self.ticket_seen = true;
                self.no_ticket_run = 0;
                s.state = St::Free;
            }
            // Our Finished (and the held upgrade request). A connection that is
            // done sends it together with close_notify in `close`: one write.
            if s.state != St::Free && (!t.wire.is_empty() || !s.out.is_empty()) {
                let took = tls::flush(t, stream, &s.out).map_err(|e| format!("io_{:?}", e.kind()))?;
                s.out.drain(..took);
            }
        }
        if s.state == St::Upgrading {
            if upgrade {
                match ws::check_upgrade_response(&s.buf, &s.key) {
                    Ok(None) => return Ok(()),
                    Ok(Some(_)) => s.state = St::Free,
                    Err(ws::UpgradeError::Status(code)) => return Err(format!("http_{code}")),
                    Err(e) => return Err(format!("upgrade_{e:?}")),
                }
            } else {
                s.state = St::Free; // plain TCP connect
            }
        }
        if s.state == St::Free {
            self.finish(i, now);
        }
        Ok(())
    }

    /// Finishes the connections whose ticket wait is over.
    fn end_ticket_waits(&mut self) {
        let now = self.mono_us();
        for i in 0..self.slots.len() {
            let s = &mut self.slots[i];
            if s.state != St::AwaitTicket || now.saturating_sub(s.tls_done_us) < TICKET_WAIT_US {
                continue;
            }
            s.state = St::Free;
            self.awaiting -= 1;
            if self.measuring {
                self.res.no_ticket += 1;
            }
            self.no_ticket_run += 1;
            if self.wait_ticket && !self.ticket_seen && self.no_ticket_run >= NO_TICKET_GIVE_UP {
                self.wait_ticket = false;
                eprintln!(
                    "gw-load: thread {}: the server sent no TLS 1.3 session ticket to {NO_TICKET_GIVE_UP} connections \
                     in a row; not waiting for tickets any more",
                    self.tid
                );
            }
            self.finish(i, now);
        }
    }

    /// A connection is done: count it, close it, free the slot.
    fn finish(&mut self, i: usize, now: u64) {
        self.progress.ready += 1;
        let s = &self.slots[i];
        if self.measuring {
            self.res.done += 1;
            self.res.conn_hist.record(now.saturating_sub(s.started_us));
            if let Some(t) = s.tls.as_deref() {
                self.res.tls_hist.record(s.tls_done_us.saturating_sub(s.started_us));
                match t.resumed() {
                    Some(true) => self.res.resumed += 1,
                    _ => self.res.full += 1,
                }
                if self.res.negotiated.is_none() {
                    self.res.negotiated = Some(t.negotiated());
                }
            }
        }
        self.close(i);
    }

    fn fail(&mut self, i: usize, cause: String) {
        if self.slots[i].state == St::AwaitTicket {
            self.awaiting -= 1;
        }
        self.count_failure(cause);
        self.close(i);
    }

    fn count_failure(&mut self, cause: String) {
        self.progress.failed += 1;
        if self.measuring {
            *self.res.failures.entry(cause).or_insert(0) += 1;
        }
    }

    /// Closes the slot's connection (TLS: `close_notify` first) and queues
    /// the slot for a new one.
    fn close(&mut self, i: usize) {
        let s = &mut self.slots[i];
        if s.state == St::Free && s.stream.is_none() {
            return;
        }
        if let (Some(t), Some(stream)) = (s.tls.as_mut(), s.stream.as_mut()) {
            t.close_notify();
            let _ = tls::flush(t, stream, &[]);
        }
        // Dropping the socket closes the descriptor, which also removes it
        // from epoll.
        s.stream = None;
        s.tls = None;
        s.state = St::Free;
        self.free.push(i);
    }

    /// Fails connections older than --connect-timeout.
    fn expire(&mut self) {
        let limit = self.cfg.connect_timeout.as_micros() as u64;
        let now = self.mono_us();
        for i in 0..self.slots.len() {
            let s = &self.slots[i];
            if s.state != St::Free && now.saturating_sub(s.started_us) > limit {
                let cause = match s.state {
                    St::AwaitTicket => "no_ticket",
                    _ => "connect_timeout",
                };
                self.fail(i, cause.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Args;
    use clap::Parser as _;
    use rustls::ServerConnection;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A sequential TLS server (rustls, tickets on): handshake, answer the
    /// upgrade if one comes, read until the client closes.
    fn server(pki: &crate::tls::testing::Pki, stop: Arc<AtomicBool>) -> (u16, std::thread::JoinHandle<u32>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = pki.server.clone();
        let h = std::thread::spawn(move || {
            let mut served = 0;
            while !stop.load(Ordering::Relaxed) {
                let mut sock = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                };
                sock.set_nonblocking(false).unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut c = ServerConnection::new(config.clone()).unwrap();
                let mut req = Vec::new();
                let mut answered = false;
                loop {
                    match c.complete_io(&mut sock) {
                        Ok((0, 0)) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let _ = c.reader().read_to_end(&mut req);
                    if !answered && req.ends_with(b"\r\n\r\n") {
                        let text = String::from_utf8_lossy(&req).into_owned();
                        let key = text.lines().find_map(|l| l.strip_prefix("Sec-WebSocket-Key: ")).unwrap_or("");
                        let resp = format!(
                            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                            ws::accept_for(key.trim())
                        );
                        c.writer().write_all(resp.as_bytes()).unwrap();
                        answered = true;
                    }
                }
                served += 1;
            }
            served
        });
        (port, h)
    }

    fn run(pki: &crate::tls::testing::Pki, extra: &[&str]) -> HsResult {
        let stop = Arc::new(AtomicBool::new(false));
        let (port, srv) = server(pki, stop.clone());
        let url = format!("wss://127.0.0.1:{port}/ws");
        let ca = pki.ca_path.to_str().unwrap().to_string();
        let mut argv = vec!["gw-load", "--mode", "handshake", "--url", &url, "--ca", &ca, "--concurrency", "1"];
        argv.extend_from_slice(extra);
        let cfg = Arc::new(Config::from_args(Args::try_parse_from(argv).unwrap()).unwrap());
        let shared = Arc::new(Shared::new(1));
        let w = HsWorker::new(0, cfg, shared.clone()).unwrap();
        shared.set_phase(Phase::Measure);
        let h = std::thread::spawn(move || w.run());
        std::thread::sleep(Duration::from_millis(400));
        shared.set_phase(Phase::Done);
        let r = h.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        let served = srv.join().unwrap();
        assert!(served as u64 >= r.done, "server saw {served}, client counted {}", r.done);
        r
    }

    #[test]
    fn resumes_when_asked_and_counts_kinds() {
        let pki = crate::tls::testing::pki();
        for (extra, resumes) in [
            (&["--tls-version", "1.3"][..], true),
            (&["--tls-version", "1.3", "--tls-resume", "off"][..], false),
            (&["--tls-version", "1.2", "--upgrade"][..], true),
            (&["--upgrade", "--tls-verify-once", "--tls-resume", "off"][..], false),
        ] {
            let r = run(&pki, extra);
            assert!(r.done >= 5, "{extra:?}: only {} handshakes", r.done);
            assert!(r.failures.is_empty(), "{extra:?}: {:?}", r.failures);
            assert_eq!(r.full + r.resumed, r.done);
            assert_eq!(r.no_ticket, 0, "{extra:?}: tickets are sent");
            if resumes {
                assert_eq!(r.full, 1, "{extra:?}: only the first is full");
            } else {
                assert_eq!(r.resumed, 0, "{extra:?}");
            }
            assert!(r.tls_hist.count() == r.done && r.conn_hist.count() == r.done);
        }
    }

    #[test]
    fn refused_connects_are_failures() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let url = format!("ws://127.0.0.1:{port}/ws");
        let argv = ["gw-load", "--mode", "handshake", "--url", &url, "--concurrency", "2"];
        let cfg = Arc::new(Config::from_args(Args::try_parse_from(argv).unwrap()).unwrap());
        let shared = Arc::new(Shared::new(1));
        let w = HsWorker::new(0, cfg, shared.clone()).unwrap();
        shared.set_phase(Phase::Measure);
        let h = std::thread::spawn(move || w.run());
        std::thread::sleep(Duration::from_millis(100));
        shared.set_phase(Phase::Done);
        let r = h.join().unwrap();
        assert_eq!(r.done, 0);
        assert!(r.failures.get("connect_ConnectionRefused").copied().unwrap_or(0) > 0, "{:?}", r.failures);
    }
}
