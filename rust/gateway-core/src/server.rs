//! Socket I/O: the listener, the HTTP upgrade, and one task per connection that reads,
//! answers heartbeats and writes coalesced frames.
//!
//! Memory per idle connection is kept small on purpose: reads go into a per-thread
//! scratch buffer and only an incomplete frame is copied into the connection; the write
//! queue is empty when idle; one task (not a reader and a writer) serves both directions.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};

use crate::config::EngineConfig;
use crate::conn::{Conn, Frame, PRIO_HIGH};
use crate::events::{Event, EventQueue};
use crate::hub::Hub;
use crate::metrics::{self, Counters};
use crate::protocol::close;
use crate::protocol::deflate::{negotiate, Inflater};
use crate::protocol::frame::{self, Decoder, Event as WsEvent, OP_PONG};
use crate::protocol::handshake::{self, Kind, Parsed};

/// The application's answer to a connect request.
pub enum Decision {
    Accept {
        user: Option<String>,
        meta: Option<String>,
        protocol: Option<String>,
        /// Sent as the first text frame (the `connected` reply).
        first: Option<Vec<u8>>,
    },
    Reject {
        status: u16,
        reason: String,
    },
}

/// State shared by every task of one engine.
pub struct Shared {
    pub cfg: EngineConfig,
    pub hub: Arc<Hub>,
    pub events: EventQueue,
    pub counters: Arc<Counters>,
    pub pending: Mutex<HashMap<u64, oneshot::Sender<Decision>>>,
    pub next_id: AtomicU64,
    pub draining: AtomicBool,
    pub stop_accepting: Notify,
    pub started: Instant,
}

impl Shared {
    /// Coarse engine clock for heartbeats, in ticks of 10 ms (wraps after 497 days).
    pub fn now_ticks(&self) -> u32 {
        (self.started.elapsed().as_millis() / TICK_MS as u128) as u32
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Heartbeat clock resolution.
const TICK_MS: u64 = 10;
const SCRATCH: usize = 64 * 1024;
/// Most bytes read from one connection before yielding to other tasks.
const READ_BUDGET: usize = 256 * 1024;
/// Most frames per writev.
const IOV_MAX: usize = 64;

thread_local! {
    static SCRATCH_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH]);
}

pub async fn accept_loop(sh: Arc<Shared>, listener: TcpListener) {
    loop {
        let res = tokio::select! {
            r = listener.accept() => r,
            _ = sh.stop_accepting.notified() => return,
        };
        match res {
            Ok((stream, peer)) => {
                metrics::inc(&sh.counters.tcp_accepted);
                tokio::spawn(handle(sh.clone(), stream, peer));
            }
            Err(e) => {
                metrics::inc(&sh.counters.accept_errors);
                // EMFILE/ENFILE: back off instead of spinning; the backlog holds the rest.
                if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOMEM)) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

/// Heartbeats for every connection, from one task: WebSocket pings after `ping_interval`
/// of silence, close (4000) after `idle_timeout`. Cheaper than a timer per connection.
pub async fn sweeper(sh: Arc<Shared>) {
    let ticks = |d: Duration| (d.as_millis() as u64 / TICK_MS).min(u64::from(u32::MAX)) as u32;
    let idle = ticks(sh.cfg.idle_timeout).max(1);
    let ping = ticks(sh.cfg.ping_interval);
    // Check ten times per idle timeout (at most every second, at least every 50 ms).
    let tick = Duration::from_millis((sh.cfg.idle_timeout.as_millis() as u64 / 10).clamp(50, 1000));
    let ping_frame = Frame::control(frame::encode(frame::OP_PING, false, b""));
    loop {
        tokio::time::sleep(tick).await;
        let now = sh.now_ticks();
        sh.hub.for_each_conn(|c| {
            let rx = c.last_rx.load(Relaxed);
            if now.saturating_sub(rx) >= idle {
                metrics::inc(&sh.counters.close_idle);
                c.close(close::IDLE_TIMEOUT, "heartbeat timeout", true);
            } else if ping > 0 && now.saturating_sub(rx.max(c.last_ping.load(Relaxed))) >= ping {
                c.last_ping.store(now, Relaxed);
                metrics::inc(&sh.counters.pings_sent);
                c.push(&ping_frame, PRIO_HIGH, usize::MAX, &sh.counters);
            }
        });
    }
}

async fn write_plain(stream: &mut TcpStream, status: u16, ctype: &str, body: &[u8], extra: &[(&str, &str)]) {
    let resp = handshake::response(status, ctype, body, extra);
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(&resp)).await;
    let _ = stream.shutdown().await;
}

/// Read the request head. Errors carry the status to answer with.
async fn read_head(
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    cfg: &EngineConfig,
) -> Result<(handshake::Request, usize), (u16, &'static str)> {
    loop {
        stream.readable().await.map_err(|_| (400, "read error"))?;
        let mut chunk = [0u8; 2048];
        match stream.try_read(&mut chunk) {
            Ok(0) => return Err((400, "connection closed")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err((400, "read error")),
        }
        match handshake::parse_request(buf, cfg.max_headers, cfg.max_header_bytes) {
            Parsed::Partial => continue,
            Parsed::Done(r, n) => return Ok((r, n)),
            Parsed::Error(s, why) => return Err((s, why)),
        }
    }
}

async fn handle(sh: Arc<Shared>, mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    if sh.cfg.send_buffer > 0 {
        // A fixed kernel send buffer (no autotuning): backpressure reaches the
        // connection's own queue sooner and the kernel holds less per slow client.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(sh.cfg.send_buffer);
    }
    // Everything the handshake allocated is gone once `upgrade` returns: only what the
    // connection needs for its whole life is kept (see the idle-memory NOTE in
    // docs/architecture.md).
    // The handshake future is boxed: its timers and buffers are freed when it ends
    // instead of sizing the task for the connection's whole life.
    let Some((conn, decoder, leftover)) = Box::pin(upgrade(&sh, &mut stream, peer)).await else { return };
    conn.out.lock().fd = stream.as_raw_fd();
    let (code, reason) = run_ws(&sh, &stream, &conn, decoder, leftover).await;
    // No direct write may reach this fd number once it is closed (and maybe reused).
    conn.out.lock().fd = -1;
    drop(stream);
    let c = &sh.counters;
    let rooms = sh.hub.remove_conn(&conn);
    metrics::dec(&c.connections_current);
    metrics::inc(&c.disconnects);
    let user = conn.user.as_ref().map(|u| u.to_string());
    sh.events.push(Event::Closed { conn: conn.id, code, reason, rooms, user }, c);
}

/// Read and answer the HTTP request; for an accepted upgrade return the registered
/// connection, its decoder and any bytes that arrived behind the request head.
async fn upgrade(sh: &Arc<Shared>, stream: &mut TcpStream, peer: SocketAddr) -> Option<(Arc<Conn>, Decoder, Vec<u8>)> {
    let cfg = &sh.cfg;
    let c = &sh.counters;
    let mut buf = Vec::with_capacity(1024);
    let (req, used) = match tokio::time::timeout(cfg.handshake_timeout, read_head(stream, &mut buf, cfg)).await {
        Err(_) => {
            metrics::inc(&c.handshake_timeout);
            write_plain(stream, 408, "text/plain", b"request timeout\n", &[]).await;
            return None;
        }
        Ok(Err((status, why))) => {
            metrics::inc(if status == 431 { &c.handshake_too_large } else { &c.handshake_bad_request });
            write_plain(stream, status, "text/plain", format!("{why}\n").as_bytes(), &[]).await;
            return None;
        }
        Ok(Ok(x)) => x,
    };
    let (key, protocols, extensions) = match req.kind() {
        Kind::Plain => {
            serve_plain(sh, stream, &req).await;
            return None;
        }
        Kind::Bad(status, why) => {
            metrics::inc(&c.handshake_bad_request);
            let extra: &[(&str, &str)] = if status == 426 { &[("Sec-WebSocket-Version", "13")] } else { &[] };
            write_plain(stream, status, "text/plain", format!("{why}\n").as_bytes(), extra).await;
            return None;
        }
        Kind::Upgrade { key, protocols, extensions } => (key, protocols, extensions),
    };
    if !cfg.ws_path.is_empty() && req.path != cfg.ws_path {
        metrics::inc(&c.handshake_not_found);
        write_plain(stream, 404, "text/plain", b"no WebSocket endpoint here\n", &[]).await;
        return None;
    }
    if sh.draining.load(Relaxed) {
        write_plain(stream, 503, "text/plain", b"draining\n", &[("Retry-After", "1")]).await;
        return None;
    }
    // Ask the application.
    let id = sh.next_id.fetch_add(1, Relaxed);
    let (tx, rx) = oneshot::channel();
    sh.pending.lock().insert(id, tx);
    let deflate = negotiate(extensions.iter().map(String::as_str), &cfg.deflate);
    let event = Event::Connect {
        conn: id,
        peer: peer.to_string(),
        path: req.path,
        query: req.query,
        headers: req.headers,
        protocols,
    };
    sh.events.push(event, c);
    let decision = tokio::time::timeout(cfg.auth_timeout, rx).await;
    sh.pending.lock().remove(&id);
    let (user, meta, protocol, first) = match decision {
        Ok(Ok(Decision::Accept { user, meta, protocol, first })) => (user, meta, protocol, first),
        Ok(Ok(Decision::Reject { status, reason })) => {
            metrics::inc(&c.connects_rejected);
            write_plain(stream, status, "text/plain", format!("{reason}\n").as_bytes(), &[]).await;
            return None;
        }
        Ok(Err(_)) | Err(_) => {
            // Tell the app this pending connection is gone, so per-connection state is freed.
            metrics::inc(&c.connects_auth_timeout);
            let closed =
                Event::Closed { conn: id, code: 1006, reason: "auth timeout".into(), rooms: vec![], user: None };
            sh.events.push(closed, c);
            write_plain(stream, 503, "text/plain", b"auth timeout\n", &[("Retry-After", "1")]).await;
            return None;
        }
    };
    let resp = handshake::response_101(&key, protocol.as_deref(), deflate.as_ref().map(|d| d.1.as_str()));
    if tokio::time::timeout(cfg.handshake_timeout, stream.write_all(&resp)).await.map_or(true, |r| r.is_err()) {
        let closed =
            Event::Closed { conn: id, code: 1006, reason: "handshake write failed".into(), rooms: vec![], user };
        sh.events.push(closed, c);
        return None;
    }
    metrics::inc(&c.connects);
    metrics::inc(&c.connections_current);
    let conn = Arc::new(Conn::new(
        id,
        user.map(Arc::from),
        meta.map(Arc::from),
        deflate.as_ref().map(|d| d.0.server_window_bits),
        sh.now_ticks(),
    ));
    sh.hub.add_conn(conn.clone());
    if let Some(first) = first {
        conn.push(&Frame::text(&first, usize::MAX), PRIO_HIGH, usize::MAX, c);
    }
    let decoder = Decoder::new(cfg.decoder.clone(), deflate.map(|d| Inflater::new(&d.0)));
    let mut leftover = buf.split_off(used);
    leftover.shrink_to_fit();
    Some((conn, decoder, leftover))
}

async fn serve_plain(sh: &Shared, stream: &mut TcpStream, req: &handshake::Request) {
    metrics::inc(&sh.counters.http_requests);
    let cfg = &sh.cfg;
    if req.method != "GET" && req.method != "HEAD" {
        return write_plain(stream, 405, "text/plain", b"method not allowed\n", &[]).await;
    }
    if req.path == cfg.health_path {
        return if sh.draining.load(Relaxed) {
            write_plain(stream, 503, "text/plain", b"draining\n", &[]).await
        } else {
            write_plain(stream, 200, "text/plain", b"ok\n", &[]).await
        };
    }
    if let Some((ctype, body)) = cfg.static_files.get(&req.path) {
        return write_plain(stream, 200, ctype, body, &[]).await;
    }
    if req.path == cfg.ws_path {
        return write_plain(
            stream,
            426,
            "text/plain",
            b"WebSocket upgrade required\n",
            &[("Sec-WebSocket-Version", "13")],
        )
        .await;
    }
    metrics::inc(&sh.counters.handshake_not_found);
    write_plain(stream, 404, "text/plain", b"not found\n", &[]).await
}

/// The application-level heartbeat `{"op":"ping"}` is answered here, never in Python.
fn is_app_ping(data: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe<'a> {
        #[serde(borrow)]
        op: &'a str,
    }
    data.len() <= 256
        && memchr::memmem::find(data, b"\"ping\"").is_some()
        && serde_json::from_slice::<Probe>(data).is_ok_and(|p| p.op == "ping")
}

/// Write as much of `wq` as the socket takes. Ok(true) when everything was written.
fn flush(
    stream: &TcpStream,
    conn: &Conn,
    wq: &mut VecDeque<Arc<Frame>>,
    off: &mut usize,
    sh: &Shared,
) -> io::Result<bool> {
    let c = &sh.counters;
    let level = sh.cfg.deflate.level;
    while !wq.is_empty() {
        let mut iov = [IoSlice::new(&[]); IOV_MAX];
        let mut k = 0;
        for (i, f) in wq.iter().take(IOV_MAX).enumerate() {
            let b = f.bytes_for(conn.deflate_bits, level, c);
            iov[k] = IoSlice::new(if i == 0 { &b[*off..] } else { &b[..] });
            k += 1;
        }
        let mut n = match stream.try_write_vectored(&iov[..k]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        };
        metrics::inc(&c.writev_calls);
        metrics::add(&c.bytes_out, n as u64);
        // One lag sample per write (not per frame): the oldest frame in this write.
        let born = wq[0].born_us;
        if born > 0 {
            sh.hub.hist.flush_lag.observe_ns(sh.hub.now_us().saturating_sub(born) * 1000);
        }
        while n > 0 {
            let len = wq[0].bytes_for(conn.deflate_bits, level, c).len() - *off;
            if n >= len {
                n -= len;
                *off = 0;
                wq.pop_front();
                metrics::inc(&c.frames_out);
            } else {
                *off += n;
                n = 0;
            }
        }
    }
    Ok(true)
}

/// Serve one upgraded connection until it closes. Returns the close code and reason to
/// report: the client's, ours, or 1006 when the TCP connection just went away.
async fn run_ws(
    sh: &Shared,
    stream: &TcpStream,
    conn: &Arc<Conn>,
    mut dec: Decoder,
    mut inbuf: Vec<u8>,
) -> (u16, String) {
    let c = &sh.counters;
    let mut wq: VecDeque<Arc<Frame>> = VecDeque::new();
    let mut off = 0usize;
    let mut evs: Vec<WsEvent> = Vec::new();
    let mut close_sent = false;
    let mut close_recv = false;
    let mut input_dead = false; // after a protocol error: discard input until EOF
    let mut result: Option<(u16, String)> = None;
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut close_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let mut write_shut = false;

    if !inbuf.is_empty() {
        // Bytes that arrived right behind the request head.
        let mut pending = std::mem::take(&mut inbuf);
        match dec.decode(&mut pending, &mut evs) {
            Ok(n) => inbuf = pending.split_off(n),
            Err(e) => protocol_error(conn, c, e, &mut input_dead),
        }
        handle_events(sh, conn, &mut evs, &mut close_recv, &mut result);
    }

    loop {
        // Take queued frames, or the close frame once the queue is done.
        if wq.is_empty() && !close_sent {
            let mut q = conn.out.lock();
            let q = &mut *q;
            if let Some((f, sent)) = q.head.take() {
                // The rest of a frame a fan-out wrote partly (off > 0 keeps it whole
                // through a discarding close below).
                wq.push_back(f);
                off = sent;
            }
            let n = q.items.len().min(IOV_MAX * 4);
            for it in q.items.drain(..n) {
                q.bytes -= it.frame.len();
                wq.push_back(it.frame);
            }
            if wq.is_empty() {
                if let Some(cl) = q.closing.clone() {
                    wq.push_back(Frame::control(frame::encode_close(cl.code, &cl.reason)));
                    close_sent = true;
                    result.get_or_insert((cl.code, cl.reason));
                    deadline = Some(tokio::time::Instant::now() + sh.cfg.close_timeout);
                } else {
                    // Idle: from now on a fan-out may write to the socket itself.
                    q.woken = false;
                }
            }
        } else if !close_sent && deadline.is_none() {
            let closing = conn.out.lock().closing.clone().filter(|cl| cl.discard);
            if let Some(cl) = closing {
                // Keep only a partly written frame, so the stream stays well-framed. The
                // close is reported with our code even if the peer never reads the frame
                // (a slow consumer's socket may stay full until the deadline).
                wq.truncate(usize::from(off > 0));
                result.get_or_insert((cl.code, cl.reason));
                deadline = Some(tokio::time::Instant::now() + sh.cfg.close_timeout);
            }
        }
        if !wq.is_empty() {
            match flush(stream, conn, &mut wq, &mut off, sh) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(_) => {
                    metrics::inc(&c.close_io_error);
                    return result.unwrap_or((1006, "write error".into()));
                }
            }
        }
        if close_sent && wq.is_empty() && (close_recv || input_dead && result.is_none()) {
            return result.unwrap_or((1006, String::new()));
        }
        if close_sent && close_recv && wq.is_empty() {
            return result.unwrap_or((1000, String::new()));
        }
        if close_sent && input_dead && wq.is_empty() && !write_shut {
            // Failing the connection (RFC 6455 §7.1.7): our close frame is out and the
            // peer's reply cannot be parsed, so close the TCP connection now (the server
            // closes first, §7.1.1). Half-close, then drain input until the peer's EOF
            // or the close deadline, so unread input does not turn the close into an RST
            // that could destroy the close frame in flight.
            write_shut = true;
            let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
        }
        if let (Some(d), None) = (deadline, close_timer.as_ref()) {
            close_timer = Some(Box::pin(tokio::time::sleep_until(d)));
        }
        let timer = async {
            match close_timer.as_mut() {
                Some(t) => t.as_mut().await,
                None => std::future::pending().await,
            }
        };
        // One readiness future for both directions keeps the task small (each is 152 bytes).
        let interest = match (!close_recv, !wq.is_empty()) {
            (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
            (true, false) => Some(Interest::READABLE),
            (false, true) => Some(Interest::WRITABLE),
            (false, false) => None,
        };
        tokio::select! {
            _ = conn.notify.notified(), if wq.is_empty() && !close_sent => {}
            r = stream.ready(interest.unwrap_or(Interest::READABLE)), if interest.is_some() => {
                let ready = match r {
                    Ok(r) => r,
                    Err(_) => return result.unwrap_or((1006, "socket error".into())),
                };
                if !close_recv && (ready.is_readable() || ready.is_read_closed()) {
                    match read_some(sh, stream, conn, &mut dec, &mut inbuf, &mut evs, &mut input_dead) {
                        Ok(true) => {}
                        Ok(false) => {
                            // EOF. A clean close already happened if close_recv; else the peer vanished.
                            if !close_recv {
                                metrics::inc(&c.close_io_error);
                            }
                            return result.unwrap_or((1006, "connection lost".into()));
                        }
                        Err(_) => {
                            metrics::inc(&c.close_io_error);
                            return result.unwrap_or((1006, "read error".into()));
                        }
                    }
                    handle_events(sh, conn, &mut evs, &mut close_recv, &mut result);
                }
                // Writable: the loop flushes.
            }
            _ = timer => {
                return result.unwrap_or((1006, "close timeout".into()));
            }
        }
    }
}

fn protocol_error(conn: &Conn, c: &Counters, e: frame::ProtoError, input_dead: &mut bool) {
    metrics::inc(match e.code {
        1009 => &c.close_too_big,
        1007 => &c.close_invalid_utf8,
        _ => &c.close_protocol_error,
    });
    conn.close(e.code, e.reason, true);
    *input_dead = true;
}

/// Read what the socket has (up to the budget) and decode it. Ok(false) on EOF.
fn read_some(
    sh: &Shared,
    stream: &TcpStream,
    conn: &Conn,
    dec: &mut Decoder,
    inbuf: &mut Vec<u8>,
    evs: &mut Vec<WsEvent>,
    input_dead: &mut bool,
) -> io::Result<bool> {
    let c = &sh.counters;
    SCRATCH_BUF.with(|s| {
        let mut scratch = s.borrow_mut();
        let mut total = 0;
        loop {
            let n = match stream.try_read(&mut scratch[..]) {
                Ok(0) => return Ok(false),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) => return Err(e),
            };
            total += n;
            metrics::add(&c.bytes_in, n as u64);
            conn.last_rx.store(sh.now_ticks(), Relaxed);
            if *input_dead || dec.is_closed() {
                continue; // discard until EOF
            }
            let res = if inbuf.is_empty() {
                dec.decode(&mut scratch[..n], evs).map(|used| {
                    if used < n {
                        inbuf.extend_from_slice(&scratch[used..n]);
                    }
                })
            } else {
                inbuf.extend_from_slice(&scratch[..n]);
                dec.decode(inbuf, evs).map(|used| {
                    inbuf.drain(..used);
                    if inbuf.is_empty() {
                        *inbuf = Vec::new(); // give the memory back while idle
                    }
                })
            };
            if let Err(e) = res {
                protocol_error(conn, c, e, input_dead);
                inbuf.clear();
            }
            if total >= READ_BUDGET || !evs.is_empty() && evs.len() >= 64 {
                return Ok(true);
            }
        }
    })
}

fn handle_events(
    sh: &Shared,
    conn: &Arc<Conn>,
    evs: &mut Vec<WsEvent>,
    close_recv: &mut bool,
    result: &mut Option<(u16, String)>,
) {
    let c = &sh.counters;
    for ev in evs.drain(..) {
        match ev {
            WsEvent::Text(data) => {
                metrics::inc(&c.messages_in);
                if sh.cfg.app_ping && is_app_ping(&data) {
                    metrics::inc(&c.app_pings);
                    let pong = format!("{{\"op\":\"pong\",\"ts\":{}}}", unix_ms());
                    conn.push(&Frame::text(pong.as_bytes(), usize::MAX), PRIO_HIGH, usize::MAX, c);
                } else if sh.events.push(Event::Message { conn: conn.id, data, binary: false }, c) {
                    metrics::inc(&c.messages_to_app);
                }
            }
            WsEvent::Binary(data) => {
                metrics::inc(&c.messages_in);
                if sh.events.push(Event::Message { conn: conn.id, data, binary: true }, c) {
                    metrics::inc(&c.messages_to_app);
                }
            }
            WsEvent::Ping(p) => {
                conn.push(&Frame::control(frame::encode(OP_PONG, false, &p)), PRIO_HIGH, usize::MAX, c);
            }
            WsEvent::Pong(_) => {}
            WsEvent::Close(code, reason) => {
                *close_recv = true;
                metrics::inc(&c.close_client);
                result.get_or_insert((code.unwrap_or(1005), reason));
                // Echo the code (RFC 6455 §5.5.1); nothing more is sent after it.
                conn.close(code.unwrap_or(close::NORMAL), "", true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_app_ping;

    #[test]
    fn app_ping_detection() {
        assert!(is_app_ping(br#"{"op":"ping"}"#));
        assert!(is_app_ping(br#"{ "id": 3, "op" : "ping" }"#));
        assert!(!is_app_ping(br#"{"op":"publish","data":"ping"}"#));
        assert!(!is_app_ping(br#"{"op":"ping""#));
        assert!(!is_app_ping(b"ping"));
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// The connection task's future is allocated once per connection for its whole life:
    /// keep it small (see the idle-memory target in docs/architecture.md).
    #[test]
    fn connection_future_size() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let client = TcpStream::connect(addr).await.unwrap();
            let (server, peer) = l.accept().await.unwrap();
            let eng = crate::Engine::new(EngineConfig::default()).unwrap();
            let sh = eng.shared_for_tests();
            let fut = handle(sh, server, peer);
            let size = std::mem::size_of_val(&fut);
            eprintln!("handle() future: {size} bytes");
            drop(client);
            assert!(size <= 1024, "connection future is {size} bytes");
        });
    }
}
