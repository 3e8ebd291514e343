//! Socket I/O: the listener, the HTTP upgrade, and one task per connection that reads,
//! answers heartbeats and writes coalesced frames.
//!
//! Memory per idle connection is kept small on purpose: reads go into a per-thread
//! scratch buffer and only an incomplete frame is copied into the connection; the write
//! queue is empty when idle; one task (not a reader and a writer) serves both directions.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};

use crate::client_ip::{forwarded_client, TrustedProxies};
use crate::config::EngineConfig;
use crate::conn::{gathered, Conn, Frame, Reply, TlsState, PRIO_HIGH, PRIO_NORMAL, TLS_SCRATCH};
use crate::events::{Event, EventQueue};
use crate::hub::Hub;
use crate::limits::{self, Bucket, IpRefusal, IpTable};
use crate::metrics::{self, Counters};
use crate::protocol::deflate::{negotiate, DeflateConfig, Inflater};
use crate::protocol::frame::{self, Decoder, DecoderConfig, Event as WsEvent};
use crate::protocol::handshake::{self, Kind, Parsed};
use crate::protocol::{close, error, frames, proxy};
use crate::tls::{self, Acceptor, Progress};

/// The application's answer to a connect request.
#[derive(Debug)]
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

/// A decision on its way to the connection's task. An accept holds the user's place
/// under the per-user cap until the connection is registered (or the verdict is dropped).
pub enum Verdict {
    Accept {
        user: Option<String>,
        meta: Option<String>,
        protocol: Option<String>,
        first: Option<Vec<u8>>,
        slot: Option<UserSlot>,
    },
    Reject {
        status: u16,
        reason: String,
    },
}

/// One place under `limits_max_conns_per_user`, given back when dropped.
pub struct UserSlot {
    hub: Arc<Hub>,
    user: Arc<str>,
}

impl UserSlot {
    /// Wrap a place already taken with `Hub::reserve_user`.
    pub fn new(hub: Arc<Hub>, user: Arc<str>) -> Self {
        Self { hub, user }
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        self.hub.unreserve_user(&self.user);
    }
}

/// State shared by every task of one engine.
pub struct Shared {
    pub cfg: EngineConfig,
    /// Built once from `cfg`.
    pub decoder: DecoderConfig,
    pub deflate: DeflateConfig,
    pub hub: Arc<Hub>,
    pub events: EventQueue,
    pub counters: Arc<Counters>,
    pub ips: IpTable,
    /// Peers whose `X-Forwarded-For` / `X-Real-IP` (and PROXY headers) are believed.
    pub trusted: TrustedProxies,
    /// The TLS listener's certificate, when one is configured.
    pub tls: Option<Acceptor>,
    /// Where requests under `media_prefix` are relayed (None: the relay is off).
    pub media_upstream: Option<SocketAddr>,
    /// The relays' shared budget of request-body bytes per second (`media_node_rate`).
    pub media_pace: Mutex<crate::media::Pace>,
    /// Handshake crypto (a signature, a key exchange: up to about a millisecond each)
    /// runs on at most I/O threads - 1 at once, so a storm of handshakes never takes
    /// every thread from established connections.
    pub handshake_cpu: tokio::sync::Semaphore,
    /// Sockets this node holds at most (`limits_max_conns`, lowered to the open-files
    /// limit minus `limits_reserved_fds` at start).
    pub conn_cap: AtomicUsize,
    pub pending: Mutex<HashMap<u64, oneshot::Sender<Verdict>>>,
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
/// The writer takes at most this many bytes (and 4 x IOV_MAX frames) off its queue at
/// a time: what is taken no longer counts against the queue bound, so this is all a
/// connection holds beyond it.
const WRITE_BATCH: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH]);
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    /// TLS (`wss://`) rather than plain `ws://`.
    pub tls: bool,
    /// Every connection starts with a PROXY protocol (v1 or v2) header.
    pub proxy: bool,
}

pub async fn accept_loop(sh: Arc<Shared>, listener: TcpListener, l: Listen) {
    let c = &sh.counters;
    loop {
        // A refused socket still holds a descriptor while it gets its 503: past the cap
        // plus half the reserve, stop accepting for a moment (the kernel backlog holds
        // the rest) rather than eat the descriptors kept for Redis, the API and logs.
        let ceiling = sh.conn_cap.load(Relaxed) + sh.cfg.limits_reserved_fds / 2;
        if c.sockets_current.load(Relaxed) as usize >= ceiling {
            metrics::inc(&c.accept_paused);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => continue,
                _ = sh.stop_accepting.notified() => return,
            }
        }
        let res = tokio::select! {
            r = listener.accept() => r,
            _ = sh.stop_accepting.notified() => return,
        };
        match res {
            Ok((stream, peer)) => {
                metrics::inc(&c.tcp_accepted);
                metrics::inc(&c.sockets_current);
                tokio::spawn(handle(sh.clone(), stream, peer, l));
            }
            Err(e) => {
                metrics::inc(&c.accept_errors);
                // EMFILE/ENFILE: back off instead of spinning; the backlog holds the rest.
                if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOMEM)) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

/// Heartbeats for every connection, from one task: WebSocket pings after the heartbeat
/// interval of silence, close (4000) after `heartbeat_idle_timeout`. Cheaper than a
/// timer per connection.
pub async fn sweeper(sh: Arc<Shared>) {
    let ticks = |d: Duration| (d.as_millis() as u64 / TICK_MS).min(u64::from(u32::MAX)) as u32;
    let idle = ticks(sh.cfg.heartbeat_idle_timeout).max(1);
    let ping = sh.cfg.ping_interval().map_or(0, ticks);
    // Check ten times per idle timeout (at most every second, at least every 50 ms).
    let tick = Duration::from_millis((sh.cfg.heartbeat_idle_timeout.as_millis() as u64 / 10).clamp(50, 1000));
    let ping_frame = Frame::control(frames::ws_ping());
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
                if c.ping(&ping_frame, &sh.counters) {
                    metrics::inc(&sh.counters.pings_sent);
                }
            }
        });
    }
}

/// Refuse a socket over a cap: a short HTTP answer with `Retry-After`, then close. The
/// request is read (briefly) after the answer so that closing does not reset the
/// connection before the client has read it.
async fn refuse(stream: &mut TcpStream, status: u16, body: &'static [u8]) {
    let resp = handshake::response(status, "text/plain", body, &[("Retry-After", "1")]);
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(&resp)).await;
    let _ = stream.shutdown().await;
    discard(stream, Duration::from_millis(500), 16 * 1024).await;
}

/// Read and throw away input until EOF, for at most `time` (and 5 s without a byte) or
/// `bytes`: a socket closed with unread input is reset, and a reset can destroy the
/// answer before the client has read it.
async fn discard(stream: &mut TcpStream, time: Duration, bytes: usize) {
    let _ = tokio::time::timeout(time, async {
        let mut sink = vec![0u8; bytes.min(64 * 1024)];
        let mut left = bytes;
        while left > 0 {
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut sink)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

async fn handle(sh: Arc<Shared>, mut stream: TcpStream, peer: SocketAddr, l: Listen) {
    let ip = limits::canonical(peer.ip());
    // Behind a proxy the client's address is known only from the PROXY header or the
    // forwarded headers: the per-IP caps are applied to it then, not to the proxy's.
    let deferred = l.proxy || sh.trusted.contains(ip);
    let admitted = admit_node(&sh).and_then(|()| if deferred { Ok(None) } else { admit_ip(&sh, ip).map(Some) });
    match admitted {
        Ok(counted) => serve(sh, stream, peer, l, counted).await,
        Err(status) => {
            if !l.tls {
                let body: &'static [u8] = if status == 503 { b"server full\n" } else { b"too many connections\n" };
                Box::pin(refuse(&mut stream, status, body)).await;
            }
            // A TLS client cannot read a plain answer: it sees the connection close.
            drop(stream);
            metrics::dec(&sh.counters.sockets_current);
        }
    }
}

/// Check a new socket against the node cap (`sockets_current` already counts it).
fn admit_node(sh: &Shared) -> Result<(), u16> {
    if sh.counters.sockets_current.load(Relaxed) as usize > sh.conn_cap.load(Relaxed) {
        metrics::inc(&sh.counters.conns_refused_node);
        return Err(503);
    }
    Ok(())
}

/// Count a connection from `ip` under the per-IP caps; Err(429) over them.
fn admit_ip(sh: &Shared, ip: IpAddr) -> Result<IpAddr, u16> {
    let c = &sh.counters;
    match sh.ips.open(ip) {
        Ok(()) => Ok(ip),
        Err(IpRefusal::Conns) => {
            metrics::inc(&c.conns_refused_ip);
            Err(429)
        }
        Err(IpRefusal::Handshakes) => {
            metrics::inc(&c.handshakes_refused_ip);
            Err(429)
        }
    }
}

/// Serve an admitted socket; gives its place under the caps back at the end. `counted`
/// is the address counted under the per-IP caps (set during the handshake when deferred).
async fn serve(sh: Arc<Shared>, mut stream: TcpStream, peer: SocketAddr, l: Listen, mut counted: Option<IpAddr>) {
    let _ = stream.set_nodelay(true);
    if sh.cfg.limits_socket_send_buffer > 0 {
        // A fixed kernel send buffer (no autotuning): backpressure reaches the
        // connection's own queue sooner and the kernel holds less per slow client.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(sh.cfg.limits_socket_send_buffer);
    }
    // Everything the handshake allocated is gone once `upgrade` returns: only what the
    // connection needs for its whole life is kept (see the idle-memory NOTE in
    // docs/architecture.md).
    // The handshake future is boxed: its timers and buffers are freed when it ends
    // instead of sizing the task for the connection's whole life.
    let up = Box::pin(upgrade(&sh, &mut stream, peer, l, &mut counted)).await;
    if let Some(ip) = counted {
        sh.ips.handshake_done(ip);
    }
    let c = &sh.counters;
    let Some((conn, inp)) = up else {
        drop(stream);
        if let Some(ip) = counted {
            sh.ips.close(ip);
        }
        metrics::dec(&c.sockets_current);
        return;
    };
    conn.out.lock().fd = stream.as_raw_fd();
    let (code, reason) = run_ws(&sh, &stream, &conn, inp).await;
    {
        let mut q = conn.out.lock();
        // No direct write may reach this fd number once it is closed (and maybe reused).
        q.fd = -1;
        if let Some(mut t) = q.tls.take() {
            // Best effort: tell a TLS client the stream ends here (after our close frame).
            let mut out = std::mem::take(&mut t.pending);
            tls::close_notify(&mut t.sess, &mut out);
            let _ = stream.try_write(&out);
        }
    }
    conn.gone.store(true, Relaxed);
    drop(stream);
    let rooms = sh.hub.remove_conn(&conn);
    metrics::dec(&c.connections_current);
    metrics::inc(&c.disconnects);
    let user = conn.user.as_ref().map(|u| u.to_string());
    sh.events.push(Event::Closed { conn: conn.id, code, reason, rooms, user });
    if let Some(ip) = counted {
        sh.ips.close(ip);
    }
    metrics::dec(&c.sockets_current);
}

/// The client's byte stream while the connection is set up: plain, or through a TLS
/// session. Performance does not matter here; everything it holds is freed once the
/// connection is upgraded (except the session and a partial record, which move on).
pub(crate) struct Wire<'a> {
    stream: &'a mut TcpStream,
    tls: Option<Box<TlsState>>,
    /// Bytes received and not used yet: after a PROXY header, the start of the TLS or
    /// HTTP stream; with TLS, an incomplete record.
    raw: Vec<u8>,
    /// TLS: application data decrypted along with the end of the handshake (the
    /// request can arrive in the same segment as the client's Finished).
    early: Vec<u8>,
}

/// What one non-blocking read of the client gave (`Wire::try_pull`).
pub(crate) enum Pull {
    /// Bytes appended (0: input that did not complete a TLS record).
    Data(usize),
    /// The client closed its side (TLS: close_notify or a bare TCP EOF).
    Eof,
    /// Nothing to read now.
    Empty,
}

/// A TLS handshake failed, or timed out.
enum HsFail {
    Timeout,
    /// The client went away.
    Eof,
    /// A plain HTTP request on the TLS port (answered with 400).
    Http,
    Tls(tls::Failure),
}

impl Wire<'_> {
    /// Read more from the socket onto `raw`. Ok(false) on EOF.
    async fn read_raw(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 2048];
        loop {
            self.stream.readable().await?;
            match self.stream.try_read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.raw.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Read the PROXY protocol header; the address it carries (None: a health check
    /// from the proxy itself, LOCAL or UNKNOWN).
    async fn read_proxy_header(&mut self) -> Result<Option<SocketAddr>, &'static str> {
        loop {
            match proxy::parse(&self.raw) {
                proxy::Parsed::Done { source, consumed } => {
                    self.raw.drain(..consumed);
                    return Ok(source);
                }
                proxy::Parsed::Error(why) => return Err(why),
                proxy::Parsed::Partial => {}
            }
            match self.read_raw().await {
                Ok(true) => {}
                Ok(false) | Err(_) => return Err("connection closed in the PROXY header"),
            }
        }
    }

    /// Run the TLS handshake (the session is in `tls`); its crypto runs under a permit
    /// of `cpu`.
    async fn tls_handshake(&mut self, cpu: &tokio::sync::Semaphore) -> Result<(), HsFail> {
        let mut out = Vec::new();
        let mut sniffed = false;
        loop {
            if self.raw.is_empty() && !self.read_raw().await.map_err(|_| HsFail::Eof)? {
                return Err(HsFail::Eof);
            }
            // The connection's first bytes: a plain HTTP request, or a hello too old, get
            // an answer they understand.
            let sniff = !sniffed && (self.raw.len() >= 11 || self.raw[0] != 0x16);
            sniffed |= sniff;
            if sniff && tls::looks_like_http(&self.raw) {
                let body = b"This port speaks TLS: use https:// or wss://\n";
                let resp = handshake::response(400, "text/plain", body, &[]);
                let _ = tokio::time::timeout(Duration::from_secs(2), self.stream.write_all(&resp)).await;
                return Err(HsFail::Http);
            }
            if sniff && tls::offers_only_old_versions(&self.raw) {
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), self.stream.write_all(&tls::PROTOCOL_VERSION_ALERT))
                        .await;
                return Err(HsFail::Tls(tls::Failure::Version));
            }
            let t = self.tls.as_mut().expect("TLS wire");
            let permit = cpu.acquire().await;
            let res = tls::process(&mut t.sess, &mut self.raw, &mut self.early, &mut out);
            drop(permit);
            let used = match &res {
                Ok((used, _)) => *used,
                Err(_) => 0,
            };
            self.raw.drain(..used);
            if !out.is_empty() {
                let w = self.stream.write_all(&out).await;
                out.clear();
                if w.is_err() {
                    return Err(HsFail::Eof);
                }
            }
            match res {
                Err(e) => return Err(HsFail::Tls(tls::Failure::of(&e))),
                Ok((_, Progress::Open)) => return Ok(()),
                Ok((_, Progress::PeerClosed)) => return Err(HsFail::Eof),
                Ok((_, Progress::Handshaking)) => {
                    if !self.read_raw().await.map_err(|_| HsFail::Eof)? {
                        return Err(HsFail::Eof);
                    }
                }
            }
        }
    }

    /// Append decrypted (or plain) bytes to `buf`. Ok(0) on EOF.
    async fn read(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        if !self.early.is_empty() {
            let n = self.early.len();
            buf.append(&mut self.early);
            return Ok(n);
        }
        loop {
            let Some(t) = self.tls.as_mut() else {
                if !self.raw.is_empty() {
                    let n = self.raw.len();
                    buf.append(&mut self.raw);
                    return Ok(n);
                }
                if !self.read_raw().await? {
                    return Ok(0);
                }
                continue;
            };
            let before = buf.len();
            let mut out = Vec::new();
            let res = tls::process(&mut t.sess, &mut self.raw, buf, &mut out);
            if let Ok((used, _)) = &res {
                self.raw.drain(..*used);
            }
            if !out.is_empty() {
                self.stream.write_all(&out).await?;
            }
            match res {
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                Ok(_) if buf.len() > before => return Ok(buf.len() - before),
                Ok((_, Progress::PeerClosed)) => return Ok(0),
                Ok(_) => {
                    if !self.read_raw().await? {
                        return Ok(0);
                    }
                }
            }
        }
    }

    /// The socket, for readiness (the media relay waits on it beside its upstream).
    pub(crate) fn socket(&self) -> &TcpStream {
        self.stream
    }

    pub(crate) fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// One non-blocking read of up to `max` bytes, for bulk transfer (the media relay):
    /// plain, straight into `dst`; TLS, up to `max` bytes of ciphertext whose plaintext
    /// is appended to `dst` (a partial record waits in `raw`), and records the session
    /// wants sent (an alert, a key update) appended to `out` for the caller to send.
    /// `Ok(Pull::Data(0))` when ciphertext came without a complete record.
    pub(crate) fn try_pull(&mut self, dst: &mut Vec<u8>, max: usize, out: &mut Vec<u8>) -> io::Result<Pull> {
        use bytes::BufMut;
        let Some(t) = self.tls.as_mut() else {
            if !self.raw.is_empty() {
                let n = self.raw.len();
                dst.append(&mut self.raw);
                return Ok(Pull::Data(n));
            }
            dst.reserve(max);
            return match self.stream.try_read_buf(&mut (&mut *dst).limit(max)) {
                Ok(0) => Ok(Pull::Eof),
                Ok(n) => Ok(Pull::Data(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Pull::Empty),
                Err(e) => Err(e),
            };
        };
        self.raw.reserve(max);
        match self.stream.try_read_buf(&mut (&mut self.raw).limit(max)) {
            Ok(0) => return Ok(Pull::Eof),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Pull::Empty),
            Err(e) => return Err(e),
        }
        let before = dst.len();
        let (used, progress) = tls::process(&mut t.sess, &mut self.raw, dst, out)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.raw.drain(..used);
        if self.raw.is_empty() {
            self.raw = Vec::new();
        }
        match progress {
            Progress::PeerClosed if dst.len() == before => Ok(Pull::Eof),
            _ => Ok(Pull::Data(dst.len() - before)),
        }
    }

    /// TLS: encrypt `data` onto `out` (plain: nothing to do, send `data` itself).
    pub(crate) fn seal(&mut self, data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        match self.tls.as_mut() {
            None => Ok(()),
            Some(t) => tls::encrypt(&mut t.sess, data, out).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }

    /// End the stream (TLS: close_notify first), then read and discard what the client
    /// still sends, for at most `time` or `bytes`: closing with unread input would reset
    /// the connection, and a reset can destroy the answer before the client has read it.
    pub(crate) async fn close_and_drain(&mut self, time: Duration, bytes: usize) {
        self.respond_and_end(&[]).await;
        self.drain(time, bytes).await;
    }

    /// Write `resp` (may be empty), then end the stream (TLS: close_notify first), within 2 s.
    async fn respond_and_end(&mut self, resp: &[u8]) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            if !resp.is_empty() {
                self.write_all(resp).await?;
            }
            if let Some(t) = self.tls.as_mut() {
                let mut out = Vec::new();
                tls::close_notify(&mut t.sess, &mut out);
                self.stream.write_all(&out).await?;
            }
            self.stream.shutdown().await
        })
        .await;
    }

    /// Read and discard input until EOF (see [`discard`]).
    pub(crate) async fn drain(&mut self, time: Duration, bytes: usize) {
        discard(self.stream, time, bytes).await;
    }

    /// Write `data` (TLS: sealed first).
    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        if self.tls.is_none() {
            return self.stream.write_all(data).await;
        }
        let mut out = Vec::new();
        self.seal(data, &mut out)?;
        self.write_raw(&out).await
    }

    /// Write bytes as they are (records already sealed, on a TLS wire).
    pub(crate) async fn write_raw(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream.write_all(data).await
    }

    /// Answer with a short HTTP response and end the stream.
    pub(crate) async fn respond(&mut self, status: u16, ctype: &str, body: &[u8], extra: &[(&str, &str)]) {
        let resp = handshake::response(status, ctype, body, extra);
        self.respond_and_end(&resp).await;
    }

    /// Read the request head. Errors carry the status to answer with.
    async fn read_head(
        &mut self,
        buf: &mut Vec<u8>,
        cfg: &EngineConfig,
    ) -> Result<(handshake::Request, usize), (u16, &'static str)> {
        loop {
            match self.read(buf).await {
                Ok(0) => return Err((400, "connection closed")),
                Ok(_) => {}
                Err(_) => return Err((400, "read error")),
            }
            match handshake::parse_request(buf, cfg.limits_max_headers, cfg.limits_max_header_bytes) {
                Parsed::Partial => continue,
                Parsed::Done(r, n) => return Ok((r, n)),
                Parsed::Error(s, why) => return Err((s, why)),
            }
        }
    }
}

/// Count a failed TLS handshake by reason.
fn count_tls_failure(c: &Counters, f: &HsFail) {
    metrics::inc(match f {
        HsFail::Timeout => &c.tls_fail_timeout,
        HsFail::Eof => &c.tls_fail_eof,
        HsFail::Http => &c.tls_fail_http,
        HsFail::Tls(tls::Failure::NotTls) => &c.tls_fail_not_tls,
        HsFail::Tls(tls::Failure::Version) => &c.tls_fail_version,
        HsFail::Tls(tls::Failure::Params) => &c.tls_fail_params,
        HsFail::Tls(tls::Failure::Alert) => &c.tls_fail_alert,
        HsFail::Tls(tls::Failure::Alpn) => &c.tls_fail_alpn,
        HsFail::Tls(tls::Failure::Other) => &c.tls_fail_other,
    });
}

/// Everything before the application is asked: the PROXY header, the TLS handshake and
/// the request head, under one deadline (`limits.handshake_timeout`). Returns the request,
/// the bytes of `buf` it used, and the client's address; None when the connection was
/// answered (or dropped) already.
async fn prelude(
    sh: &Shared,
    wire: &mut Wire<'_>,
    peer: SocketAddr,
    l: Listen,
    counted: &mut Option<IpAddr>,
    buf: &mut Vec<u8>,
) -> Option<(handshake::Request, usize, SocketAddr)> {
    let c = &sh.counters;
    let mut client = peer;
    if l.proxy {
        if !sh.trusted.is_empty() && !sh.trusted.contains(limits::canonical(peer.ip())) {
            // Only the configured proxies may say who the client is.
            metrics::inc(&c.proxy_untrusted);
            return None;
        }
        match wire.read_proxy_header().await {
            Ok(source) => client = source.unwrap_or(peer),
            Err(_) => {
                metrics::inc(&c.proxy_bad_header);
                return None;
            }
        }
        let ip = limits::canonical(client.ip());
        if counted.is_none() && !sh.trusted.contains(ip) {
            match admit_ip(sh, ip) {
                Ok(ip) => *counted = Some(ip),
                Err(status) => {
                    if !l.tls {
                        wire.respond(status, "text/plain", b"too many connections\n", &[("Retry-After", "1")]).await;
                    }
                    return None;
                }
            }
        }
    }
    if l.tls {
        let sess = match sh.tls.as_ref().map(|a| a.session()) {
            Some(Ok(s)) => s,
            _ => {
                metrics::inc(&c.tls_fail_other);
                return None;
            }
        };
        wire.tls = Some(TlsState::new(sess));
        if let Err(f) = wire.tls_handshake(&sh.handshake_cpu).await {
            count_tls_failure(c, &f);
            return None;
        }
        let resumed = wire.tls.as_ref().is_some_and(|t| tls::resumed(&t.sess));
        metrics::inc(if resumed { &c.tls_handshakes_resumed } else { &c.tls_handshakes_full });
    }
    let (req, used) = match wire.read_head(buf, &sh.cfg).await {
        Ok(x) => x,
        Err((status, why)) => {
            metrics::inc(if status == 431 { &c.handshake_too_large } else { &c.handshake_bad_request });
            wire.respond(status, "text/plain", format!("{why}\n").as_bytes(), &[]).await;
            return None;
        }
    };
    if counted.is_none() {
        // The peer is a trusted proxy: the client is who its forwarded headers say.
        let ip = forwarded_client(&req.headers, limits::canonical(client.ip()), &sh.trusted);
        if ip != limits::canonical(client.ip()) {
            client = SocketAddr::new(ip, 0);
        }
        match admit_ip(sh, ip) {
            Ok(ip) => *counted = Some(ip),
            Err(status) => {
                wire.respond(status, "text/plain", b"too many connections\n", &[("Retry-After", "1")]).await;
                return None;
            }
        }
    }
    Some((req, used, client))
}

/// Read and answer the HTTP request; for an accepted upgrade return the registered
/// connection, its decoder and any bytes that arrived behind the request head.
async fn upgrade(
    sh: &Arc<Shared>,
    stream: &mut TcpStream,
    peer: SocketAddr,
    l: Listen,
    counted: &mut Option<IpAddr>,
) -> Option<(Arc<Conn>, Box<Input>)> {
    let cfg = &sh.cfg;
    let c = &sh.counters;
    let mut wire = Wire { stream, tls: None, raw: Vec::new(), early: Vec::new() };
    let mut buf = Vec::with_capacity(1024);
    let (req, used, client) =
        match tokio::time::timeout(cfg.limits_handshake_timeout, prelude(sh, &mut wire, peer, l, counted, &mut buf))
            .await
        {
            Ok(Some(x)) => x,
            Ok(None) => return None,
            Err(_) => {
                if l.tls && wire.tls.as_ref().is_none_or(|t| t.sess.is_handshaking()) {
                    count_tls_failure(c, &HsFail::Timeout);
                    return None;
                }
                metrics::inc(&c.handshake_timeout);
                wire.respond(408, "text/plain", b"request timeout\n", &[]).await;
                return None;
            }
        };
    // The media relay comes before anything else: any method, never an upgrade. Boxed:
    // its buffers and timers are not part of every handshake's future.
    if let Some(up) = sh.media_upstream.filter(|_| req.path.starts_with(cfg.media_prefix.as_str())) {
        Box::pin(crate::media::relay(sh, &mut wire, &req, &buf[used..], client, up)).await;
        return None;
    }
    let (key, protocols, extensions) = match req.kind() {
        Kind::Plain => {
            serve_plain(sh, &mut wire, &req).await;
            return None;
        }
        Kind::Bad(status, why) => {
            metrics::inc(&c.handshake_bad_request);
            let extra: &[(&str, &str)] = if status == 426 { &[("Sec-WebSocket-Version", "13")] } else { &[] };
            wire.respond(status, "text/plain", format!("{why}\n").as_bytes(), extra).await;
            return None;
        }
        Kind::Upgrade { key, protocols, extensions } => (key, protocols, extensions),
    };
    if !cfg.server_ws_path.is_empty() && req.path != cfg.server_ws_path {
        metrics::inc(&c.handshake_not_found);
        wire.respond(404, "text/plain", b"no WebSocket endpoint here\n", &[]).await;
        return None;
    }
    if sh.draining.load(Relaxed) {
        wire.respond(503, "text/plain", b"draining\n", &[("Retry-After", "1")]).await;
        return None;
    }
    // Ask the application.
    let id = sh.next_id.fetch_add(1, Relaxed);
    let (tx, rx) = oneshot::channel();
    sh.pending.lock().insert(id, tx);
    let deflate = negotiate(extensions.iter().map(String::as_str), &sh.deflate);
    let event = Event::Connect {
        conn: id,
        peer: client.to_string(),
        path: req.path,
        query: req.query,
        headers: req.headers,
        protocols,
    };
    sh.events.push(event);
    let decision = tokio::time::timeout(cfg.auth_deadline, rx).await;
    sh.pending.lock().remove(&id);
    let (user, meta, protocol, first, slot) = match decision {
        Ok(Ok(Verdict::Accept { user, meta, protocol, first, slot })) => (user, meta, protocol, first, slot),
        Ok(Ok(Verdict::Reject { status, reason })) => {
            metrics::inc(&c.connects_rejected);
            wire.respond(status, "text/plain", format!("{reason}\n").as_bytes(), &[]).await;
            return None;
        }
        Ok(Err(_)) | Err(_) => {
            // Tell the app this pending connection is gone, so per-connection state is freed.
            metrics::inc(&c.connects_auth_timeout);
            let closed = Event::Closed {
                conn: id,
                code: close::ABNORMAL,
                reason: "auth timeout".into(),
                rooms: vec![],
                user: None,
            };
            sh.events.push(closed);
            wire.respond(503, "text/plain", b"auth timeout\n", &[("Retry-After", "1")]).await;
            return None;
        }
    };
    let resp = handshake::response_101(&key, protocol.as_deref(), deflate.as_ref().map(|d| d.1.as_str()));
    if tokio::time::timeout(cfg.limits_handshake_timeout, wire.write_all(&resp)).await.map_or(true, |r| r.is_err()) {
        let reason = "handshake write failed".into();
        sh.events.push(Event::Closed { conn: id, code: close::ABNORMAL, reason, rooms: vec![], user });
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
    // The session moves to the connection (its queue lock guards it from now on), with
    // an incomplete record that may have arrived behind the request.
    let mut tls_in = std::mem::take(&mut wire.raw);
    tls_in.shrink_to_fit();
    conn.out.lock().tls = wire.tls.take();
    sh.hub.add_conn(conn.clone());
    // Registered: the user's connections count it now.
    drop(slot);
    if let Some(first) = first {
        // The queue is empty: always admitted.
        conn.push(&Frame::text(&first, usize::MAX), PRIO_HIGH, sh.hub.queue_bytes, c);
    }
    let mut leftover = buf.split_off(used);
    leftover.shrink_to_fit();
    // Boxed: the connection task's future stays small (async fn arguments are kept in
    // it for its whole life).
    let inp = Box::new(Input {
        dec: Decoder::new(sh.decoder.clone(), deflate.map(|d| Inflater::new(&d.0))),
        // Bytes that arrived right behind the request head are decoded like a backlog.
        backlog: !leftover.is_empty(),
        buf: leftover,
        tls_in,
        evs: Vec::new(),
        dead: false,
        bucket: Bucket::new(sh.cfg.limits_client_burst, sh.now_ticks()),
    });
    Some((conn, inp))
}

async fn serve_plain(sh: &Shared, wire: &mut Wire<'_>, req: &handshake::Request) {
    metrics::inc(&sh.counters.http_requests);
    let cfg = &sh.cfg;
    if req.method != "GET" && req.method != "HEAD" {
        return wire.respond(405, "text/plain", b"method not allowed\n", &[]).await;
    }
    if req.path == cfg.server_health_path {
        return if sh.draining.load(Relaxed) {
            wire.respond(503, "text/plain", b"draining\n", &[]).await
        } else {
            wire.respond(200, "text/plain", b"ok\n", &[]).await
        };
    }
    if let Some((ctype, body)) = cfg.static_files.get(&req.path) {
        return wire.respond(200, ctype, body, &[]).await;
    }
    if req.path == cfg.server_ws_path {
        return wire
            .respond(426, "text/plain", b"WebSocket upgrade required\n", &[("Sec-WebSocket-Version", "13")])
            .await;
    }
    metrics::inc(&sh.counters.handshake_not_found);
    wire.respond(404, "text/plain", b"not found\n", &[]).await
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
    let level = sh.deflate.level;
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

/// TLS: write the connection's pending ciphertext, then encrypt frames from `wq` (up to
/// WRITE_BATCH bytes per record batch) and write them; what the socket does not take waits
/// in the session's pending bytes. Ok(true) when everything was written. Runs under the
/// queue lock, which orders it with direct writes by fan-outs.
fn flush_tls(stream: &TcpStream, conn: &Conn, wq: &mut VecDeque<Arc<Frame>>, sh: &Shared) -> io::Result<bool> {
    let c = &sh.counters;
    let level = sh.deflate.level;
    let mut q = conn.out.lock();
    let Some(t) = q.tls.as_deref_mut() else {
        return Err(io::Error::other("TLS state gone"));
    };
    loop {
        if !t.pending.is_empty() {
            match stream.try_write(&t.pending) {
                Ok(n) => {
                    metrics::inc(&c.writev_calls);
                    metrics::add(&c.bytes_out, n as u64);
                    t.written(n);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        if wq.is_empty() {
            return Ok(true);
        }
        let mut take = 0;
        let mut bytes = 0;
        for f in wq.iter() {
            if take > 0 && bytes + f.len() > WRITE_BATCH {
                break;
            }
            bytes += f.len();
            take += 1;
        }
        let born = wq[0].born_us;
        let res = TLS_SCRATCH.with(|s| {
            let (gather, out) = &mut *s.borrow_mut();
            out.clear();
            let plain = gathered(wq.iter().take(take).map(|f| f.bytes_for(conn.deflate_bits, level, c)), gather);
            tls::encrypt(&mut t.sess, plain, out).map_err(io::Error::other)?;
            let sent = match stream.try_write(out) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            t.keep(out, sent);
            Ok(sent)
        });
        let sent = res?;
        wq.drain(..take);
        metrics::add(&c.frames_out, take as u64);
        if sent > 0 {
            metrics::inc(&c.writev_calls);
            metrics::add(&c.bytes_out, sent as u64);
        }
        if born > 0 {
            sh.hub.hist.flush_lag.observe_ns(sh.hub.now_us().saturating_sub(born) * 1000);
        }
    }
}

/// Per-connection input state of the I/O task.
pub(crate) struct Input {
    dec: Decoder,
    /// The tail of input not decoded yet: an incomplete frame, or complete frames left
    /// when a decode budget ran out (`backlog`).
    buf: Vec<u8>,
    /// TLS: an incomplete record (ciphertext). Empty while idle.
    tls_in: Vec<u8>,
    evs: Vec<WsEvent>,
    /// `buf` holds complete frames not decoded yet.
    backlog: bool,
    /// After a protocol error or an abuse close: discard input until EOF.
    dead: bool,
    bucket: Bucket,
}

/// Serve one upgraded connection until it closes. Returns the close code and reason to
/// report: the client's, ours, or 1006 when the TCP connection just went away.
async fn run_ws(sh: &Shared, stream: &TcpStream, conn: &Arc<Conn>, mut inp: Box<Input>) -> (u16, String) {
    let c = &sh.counters;
    let mut wq: VecDeque<Arc<Frame>> = VecDeque::new();
    let mut off = 0usize;
    let mut close_sent = false;
    let mut close_recv = false;
    let mut paused = false;
    let mut result: Option<(u16, String)> = None;
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut close_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let mut write_shut = false;
    // TLS: encrypted bytes wait for the socket (under the queue lock; see TlsState).
    let mut tls_out = false;
    let is_tls = conn.out.lock().tls.is_some();

    loop {
        // Input left undecoded when a decode budget ran out, once the connection may
        // be read again.
        if inp.backlog && !paused && !close_recv {
            decode_backlog(sh, conn, &mut inp);
            handle_events(sh, conn, &mut inp, &mut close_recv, &mut result);
        }
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
            wq.extend(q.take_replies());
            let mut took = 0;
            while took < WRITE_BATCH && wq.len() < IOV_MAX * 4 {
                let Some(it) = q.items.pop_front() else { break };
                q.bytes -= it.frame.len();
                took += it.frame.len();
                wq.push_back(it.frame);
            }
            tls_out = q.tls_pending();
            if wq.is_empty() && !tls_out {
                if let Some(cl) = q.closing.clone() {
                    wq.push_back(Frame::control(frames::close(cl.code, &cl.reason)));
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
        if !wq.is_empty() || tls_out {
            let flushed =
                if is_tls { flush_tls(stream, conn, &mut wq, sh) } else { flush(stream, conn, &mut wq, &mut off, sh) };
            match flushed {
                Ok(true) => {
                    tls_out = false;
                    continue;
                }
                Ok(false) => tls_out = is_tls,
                Err(_) => {
                    metrics::inc(&c.close_io_error);
                    return result.unwrap_or((close::ABNORMAL, "write error".into()));
                }
            }
        }
        let out_empty = wq.is_empty() && !tls_out;
        if close_sent && out_empty && (close_recv || inp.dead && result.is_none()) {
            return result.unwrap_or((close::ABNORMAL, String::new()));
        }
        if close_sent && close_recv && out_empty {
            return result.unwrap_or((close::NORMAL, String::new()));
        }
        if close_sent && inp.dead && out_empty && !write_shut {
            // Failing the connection (RFC 6455 §7.1.7): our close frame is out and the
            // peer's reply cannot be parsed, so close the TCP connection now (the server
            // closes first, §7.1.1). Half-close, then drain input until the peer's EOF
            // or the close deadline, so unread input does not turn the close into an RST
            // that could destroy the close frame in flight.
            write_shut = true;
            let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
        }
        // Backpressure to the client: stop reading while its messages wait for the
        // application over its share, or while a reply waits behind a full socket (the
        // client does not read what we send; reading more would only make more replies).
        let was_paused = paused;
        paused = !close_sent
            && !inp.dead
            && (conn.ev_bytes.load(Relaxed) >= sh.cfg.limits_conn_event_bytes
                || (!wq.is_empty() || tls_out) && conn.out.lock().reply_waiting());
        if paused && !was_paused {
            metrics::inc(&c.read_paused);
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
        let read = !close_recv && !paused;
        let interest = match (read, !wq.is_empty() || tls_out) {
            (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
            (true, false) => Some(Interest::READABLE),
            (false, true) => Some(Interest::WRITABLE),
            (false, false) => None,
        };
        tokio::select! {
            _ = conn.notify.notified(), if wq.is_empty() && !tls_out && !close_sent => {}
            // A backlog to decode: come back after letting other tasks run.
            _ = tokio::task::yield_now(), if inp.backlog && read => {}
            r = stream.ready(interest.unwrap_or(Interest::READABLE)), if interest.is_some() => {
                let ready = match r {
                    Ok(r) => r,
                    Err(_) => return result.unwrap_or((close::ABNORMAL, "socket error".into())),
                };
                if read && !inp.backlog && (ready.is_readable() || ready.is_read_closed()) {
                    let got = if is_tls { read_some_tls(sh, stream, conn, &mut inp) } else { read_some(sh, stream, conn, &mut inp) };
                    match got {
                        Ok(true) => {}
                        Ok(false) => {
                            // EOF. A clean close already happened if close_recv; else the peer vanished.
                            if !close_recv {
                                metrics::inc(&c.close_io_error);
                            }
                            return result.unwrap_or((close::ABNORMAL, "connection lost".into()));
                        }
                        Err(_) => {
                            metrics::inc(&c.close_io_error);
                            return result.unwrap_or((close::ABNORMAL, "read error".into()));
                        }
                    }
                    handle_events(sh, conn, &mut inp, &mut close_recv, &mut result);
                }
                // Writable: the loop flushes.
            }
            _ = timer => {
                return result.unwrap_or((close::ABNORMAL, "close timeout".into()));
            }
        }
    }
}

fn protocol_error(conn: &Conn, c: &Counters, e: frame::ProtoError, inp: &mut Input) {
    metrics::inc(match e.code {
        close::TOO_BIG => &c.close_too_big,
        close::INVALID_PAYLOAD => &c.close_invalid_utf8,
        _ => &c.close_protocol_error,
    });
    conn.close(e.code, e.reason, true);
    inp.dead = true;
    inp.backlog = false;
    inp.buf = Vec::new();
}

/// What the events decoded from one read may cost (see `Decoder::decode_some`): the
/// connection's remaining share of the event queue, at least one message.
fn decode_budget(sh: &Shared, conn: &Conn) -> usize {
    sh.cfg.limits_conn_event_bytes.saturating_sub(conn.ev_bytes.load(Relaxed)).max(1)
}

/// Decode complete frames left in the input buffer, within the budget.
fn decode_backlog(sh: &Shared, conn: &Conn, inp: &mut Input) {
    let mut budget = decode_budget(sh, conn);
    let mut pending = std::mem::take(&mut inp.buf);
    match inp.dec.decode_some(&mut pending, &mut inp.evs, &mut budget) {
        Ok((n, more)) => {
            inp.backlog = more;
            pending.drain(..n);
            if pending.is_empty() {
                pending = Vec::new(); // give the memory back while idle
            }
            inp.buf = pending;
        }
        Err(e) => protocol_error(conn, &sh.counters, e, inp),
    }
}

/// One non-blocking read into `scratch`, counted (bytes in, the connection's last
/// sign of life): Some(n) (0 = EOF), None when the socket has nothing now.
fn read_chunk(sh: &Shared, stream: &TcpStream, conn: &Conn, scratch: &mut [u8]) -> io::Result<Option<usize>> {
    match stream.try_read(scratch) {
        Ok(n) => {
            if n > 0 {
                metrics::add(&sh.counters.bytes_in, n as u64);
                conn.last_rx.store(sh.now_ticks(), Relaxed);
            }
            Ok(Some(n))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// Read what the socket has (up to the budget) and decode it. Ok(false) on EOF.
fn read_some(sh: &Shared, stream: &TcpStream, conn: &Conn, inp: &mut Input) -> io::Result<bool> {
    let c = &sh.counters;
    let mut budget = decode_budget(sh, conn);
    SCRATCH_BUF.with(|s| {
        let mut scratch = s.borrow_mut();
        let mut total = 0;
        loop {
            let n = match read_chunk(sh, stream, conn, &mut scratch)? {
                Some(0) => return Ok(false),
                Some(n) => n,
                None => return Ok(true),
            };
            total += n;
            if inp.dead || inp.dec.is_closed() {
                continue; // discard until EOF
            }
            // The input buffer holds at most one incomplete frame (max frame + header)
            // plus one read, or one read's worth of frames left by the budget.
            if feed(conn, c, inp, &mut scratch[..n], &mut budget) {
                return Ok(true);
            }
            if total >= READ_BUDGET || inp.evs.len() >= 64 {
                return Ok(true);
            }
        }
    })
}

/// Decode `data` (plaintext read from the socket) behind what `inp.buf` holds. True when
/// the decode budget ran out: the rest waits until the application has taken this
/// connection's events.
fn feed(conn: &Conn, c: &Counters, inp: &mut Input, data: &mut [u8], budget: &mut usize) -> bool {
    let n = data.len();
    let res = if inp.buf.is_empty() {
        inp.dec.decode_some(data, &mut inp.evs, budget).map(|(used, more)| {
            if used < n {
                inp.buf.extend_from_slice(&data[used..]);
            }
            more
        })
    } else {
        inp.buf.extend_from_slice(data);
        inp.dec.decode_some(&mut inp.buf, &mut inp.evs, budget).map(|(used, more)| {
            inp.buf.drain(..used);
            if inp.buf.is_empty() {
                inp.buf = Vec::new(); // give the memory back while idle
            }
            more
        })
    };
    match res {
        Ok(true) => {
            inp.backlog = true;
            true
        }
        Ok(false) => false,
        Err(e) => {
            protocol_error(conn, c, e, inp);
            false
        }
    }
}

thread_local! {
    /// Plaintext decrypted from one read of a TLS connection.
    static TLS_PLAIN: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The TLS twin of `read_some`: read ciphertext, decrypt it under the queue lock (the
/// session is shared with writers), decode the plaintext. Records rustls has to send in
/// answer (a key update, an alert) join the pending ciphertext for the writer.
fn read_some_tls(sh: &Shared, stream: &TcpStream, conn: &Conn, inp: &mut Input) -> io::Result<bool> {
    let c = &sh.counters;
    let mut budget = decode_budget(sh, conn);
    SCRATCH_BUF.with(|s| {
        TLS_PLAIN.with(|p| {
            let mut scratch = s.borrow_mut();
            let mut plain = p.borrow_mut();
            let mut total = 0;
            loop {
                let n = match read_chunk(sh, stream, conn, &mut scratch)? {
                    Some(0) => return Ok(false),
                    Some(n) => n,
                    None => return Ok(true),
                };
                total += n;
                if inp.dead || inp.dec.is_closed() {
                    continue; // discard until EOF
                }
                plain.clear();
                let mut out = Vec::new();
                let res = {
                    let mut q = conn.out.lock();
                    let Some(t) = q.tls.as_deref_mut() else { return Err(io::Error::other("TLS state gone")) };
                    let res = if inp.tls_in.is_empty() {
                        tls::process(&mut t.sess, &mut scratch[..n], &mut plain, &mut out).map(|(used, p)| {
                            inp.tls_in.extend_from_slice(&scratch[used..n]);
                            p
                        })
                    } else {
                        inp.tls_in.extend_from_slice(&scratch[..n]);
                        tls::process(&mut t.sess, &mut inp.tls_in, &mut plain, &mut out).map(|(used, p)| {
                            inp.tls_in.drain(..used);
                            if inp.tls_in.is_empty() {
                                inp.tls_in = Vec::new();
                            }
                            p
                        })
                    };
                    t.pending.extend_from_slice(&out);
                    res
                };
                let progress = match res {
                    Ok(p) => p,
                    Err(_) => {
                        // A bad record, or one that fails authentication: nothing more can
                        // be read from this stream.
                        metrics::inc(&c.tls_errors);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "TLS error"));
                    }
                };
                if !plain.is_empty() && feed(conn, c, inp, &mut plain[..], &mut budget) {
                    return Ok(true);
                }
                if progress == Progress::PeerClosed {
                    return Ok(false);
                }
                if total >= READ_BUDGET || inp.evs.len() >= 64 {
                    return Ok(true);
                }
            }
        })
    })
}

/// Answer a refused client message with an error frame carrying the request's id.
fn refuse_message(sh: &Shared, conn: &Conn, data: &[u8], message: &str) {
    let id = frames::request_id(data);
    let f = Frame::text(&frames::error(id.as_deref(), error::RATE_LIMITED, message), usize::MAX);
    conn.push(&f, PRIO_NORMAL, sh.hub.queue_bytes, &sh.counters);
}

fn handle_events(
    sh: &Shared,
    conn: &Arc<Conn>,
    inp: &mut Input,
    close_recv: &mut bool,
    result: &mut Option<(u16, String)>,
) {
    let c = &sh.counters;
    let (rate, burst) = (sh.cfg.limits_client_rate, sh.cfg.limits_client_burst);
    for ev in inp.evs.drain(..) {
        match ev {
            WsEvent::Text(data) | WsEvent::Binary(data) if inp.dead => drop(data),
            ev @ (WsEvent::Text(_) | WsEvent::Binary(_)) => {
                let (data, binary) = match ev {
                    WsEvent::Text(d) => (d, false),
                    WsEvent::Binary(d) => (d, true),
                    _ => unreachable!("matched above"),
                };
                metrics::inc(&c.messages_in);
                // The 10 ms clock of the read that brought this message.
                if !inp.bucket.admit(rate, burst, conn.last_rx.load(Relaxed)) {
                    metrics::inc(&c.rate_limited);
                    if inp.bucket.refused > burst {
                        // Goes on without a pause: close, discarding what is queued.
                        metrics::inc(&c.closed_abuse);
                        conn.close(close::ABUSE, "rate limit exceeded", true);
                        inp.dead = true;
                        inp.backlog = false;
                    } else {
                        refuse_message(sh, conn, &data, "rate limited");
                    }
                    continue;
                }
                if !binary && sh.cfg.app_ping && frames::is_app_ping(&data) {
                    metrics::inc(&c.app_pings);
                    let pong = Frame::text(&frames::app_pong(unix_ms()), usize::MAX);
                    conn.reply(Reply::AppPong, &pong, c);
                    continue;
                }
                match sh.events.push_message(conn, data, binary, c) {
                    Ok(()) => metrics::inc(&c.messages_to_app),
                    Err(data) => refuse_message(sh, conn, &data, "overloaded"),
                }
            }
            WsEvent::Ping(p) => {
                conn.reply(Reply::Control, &Frame::control(frames::ws_pong(&p)), c);
            }
            WsEvent::Pong(_) => {}
            WsEvent::Close(code, reason) => {
                *close_recv = true;
                metrics::inc(&c.close_client);
                result.get_or_insert((code.unwrap_or(close::NO_STATUS), reason));
                // Echo the code (RFC 6455 §5.5.1); nothing more is sent after it.
                conn.close(code.unwrap_or(close::NORMAL), "", true);
            }
        }
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
            let fut = handle(sh, server, peer, Listen { tls: true, proxy: true });
            let size = std::mem::size_of_val(&fut);
            eprintln!("handle() future: {size} bytes");
            drop(client);
            assert!(size <= 1024, "connection future is {size} bytes");
        });
    }
}
