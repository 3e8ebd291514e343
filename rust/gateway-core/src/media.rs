//! The media relay: an HTTP request whose path starts with `media_prefix` (any method,
//! on the plain or the TLS port, after the PROXY header) is passed to the node's media
//! server on loopback (`media_upstream`), and its answer back. One request per
//! connection: the upstream gets `Connection: close` and the client connection ends with
//! the upstream's answer.
//!
//! What the engine enforces before the upstream sees a byte: `Content-Length` is required
//! for a body (chunked: 411) and at most `media_max_body` (else 413 without reading the
//! body), at most `media_max_inflight` relays at once (503), nothing while draining
//! (503). While relaying: a deadline for the whole exchange (`media_timeout`) and an idle
//! timeout (`media_idle_timeout`: no byte either way). The upstream is told who asked
//! (`X-Forwarded-For`, `X-Forwarded-Proto`) and that the request came through the engine
//! (`X-Gateway-Media-Secret`); a client's own copies of those headers are removed.
//!
//! NOTE: memory per relay is bounded by two buffers of at most `CHUNK` (64 KiB) each:
//! request bytes read from the client and not yet taken by the upstream (the client is not
//! read while they wait: backpressure reaches it through TCP), and response bytes read
//! from the upstream and not yet taken by the client (the upstream is not read meanwhile).
//! TLS adds the ciphertext of one read and one partial record. The request body is read
//! 64 KiB per syscall (the handshake's reads are 2 KiB). Measured on 2 cores over
//! loopback, one 100 MiB POST to a sink upstream (one engine I/O thread, the client and
//! the sink in the same box): 1.1 GB/s plain, 0.75 GB/s TLS 1.3 (AES-256-GCM), against
//! 2.2 GB/s from the client straight to the sink.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::BufMut;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};

use crate::limits;
use crate::metrics::{self, Counters};
use crate::protocol::handshake::Request;
use crate::server::{Pull, Shared, Wire};

/// Most bytes per read, either side, and per buffer.
const CHUNK: usize = 64 * 1024;
/// After the answer, what the client still sends (the rest of a body refused early) is
/// read and discarded, up to `media_max_body` bytes, for at most this long (and 5 s
/// between reads: `Wire::drain`) before the socket closes: a client still writing its
/// body then reads the answer instead of a connection reset (nginx's lingering close).
const DRAIN_TIME: Duration = Duration::from_secs(30);
const DRAIN_BYTES: usize = 1 << 20;

fn drain_bytes(sh: &Shared) -> usize {
    usize::try_from(sh.cfg.media_max_body).unwrap_or(usize::MAX).max(DRAIN_BYTES)
}

/// Request headers not passed on: hop-by-hop ones (RFC 9110 §7.6.1; any `Proxy-*` too),
/// the ones the engine sets itself, and `Expect` (the engine answers `100-continue`).
const NOT_FORWARDED: [&str; 15] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "transfer-encoding",
    "content-length",
    "expect",
    "x-gateway-media-secret",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "forwarded",
    "via",
];

/// Why a relay was refused or cut; each is counted under its own reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Draining,
    LengthRequired,
    BadRequest,
    TooLarge,
    Busy,
    Upstream,
    /// Deadline or idle timeout; `client`: the relay was waiting for the client's body.
    Timeout {
        client: bool,
    },
}

impl Refusal {
    fn counter(self, c: &Counters) -> &AtomicU64 {
        match self {
            Self::Draining => &c.media_relay_refused_draining,
            Self::LengthRequired => &c.media_relay_refused_length_required,
            Self::BadRequest => &c.media_relay_refused_bad_request,
            Self::TooLarge => &c.media_relay_refused_too_large,
            Self::Busy => &c.media_relay_refused_busy,
            Self::Upstream => &c.media_relay_refused_upstream,
            Self::Timeout { .. } => &c.media_relay_refused_timeout,
        }
    }

    /// Status and JSON body, shaped like the media server's own errors
    /// (`{"error": ..., "code": ...}`, docs: contract/media.md).
    fn answer(self, limit: u64) -> (u16, String) {
        let (status, code, msg) = match self {
            Self::Draining => (503, "busy", "server restarting, try again"),
            Self::LengthRequired => (411, "bad_request", "Content-Length required (no chunked uploads)"),
            Self::BadRequest => (400, "bad_request", "bad Content-Length"),
            Self::TooLarge => {
                return (
                    413,
                    format!("{{\"error\":\"request body too large\",\"code\":\"too_large\",\"limit\":{limit}}}"),
                );
            }
            Self::Busy => (503, "busy", "too many uploads in progress, try again"),
            Self::Upstream => (502, "busy", "media service unavailable"),
            Self::Timeout { client: true } => (408, "timeout", "request timed out"),
            Self::Timeout { client: false } => (504, "timeout", "media service timed out"),
        };
        (status, format!("{{\"error\":\"{msg}\",\"code\":\"{code}\"}}"))
    }
}

/// Answer a refusal, then close and drain (the client may be sending a body).
async fn refuse(sh: &Shared, wire: &mut Wire<'_>, r: Refusal) {
    metrics::inc(r.counter(&sh.counters));
    let (status, body) = r.answer(sh.cfg.media_max_body);
    let retry: &[(&str, &str)] = if status == 503 || status == 502 { &[("Retry-After", "1")] } else { &[] };
    wire.respond(status, "application/json", body.as_bytes(), retry).await;
    wire.drain(DRAIN_TIME, drain_bytes(sh)).await;
}

/// The request body's length: `Content-Length` (0 without one). Err: a `Transfer-Encoding`
/// (411), or a malformed or ambiguous `Content-Length` (400). An overflowing length is
/// u64::MAX (over any cap).
fn body_len(req: &Request) -> Result<u64, Refusal> {
    if req.headers.iter().any(|(k, _)| k == "transfer-encoding") {
        return Err(Refusal::LengthRequired);
    }
    let mut len = None;
    for v in req.headers.iter().filter(|(k, _)| k == "content-length").flat_map(|(_, v)| v.split(',')) {
        let v = v.trim();
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Refusal::BadRequest);
        }
        let n = v.parse::<u64>().unwrap_or(u64::MAX);
        if len.is_some_and(|l| l != n) {
            return Err(Refusal::BadRequest);
        }
        len = Some(n);
    }
    Ok(len.unwrap_or(0))
}

/// The request head for the upstream: the client's request line and end-to-end headers,
/// then the engine's own.
fn upstream_head(req: &Request, len: Option<u64>, secret: &str, client: IpAddr, tls: bool) -> Vec<u8> {
    // Headers the client's Connection header names are hop-by-hop too.
    let named: Vec<String> = req
        .headers
        .iter()
        .filter(|(k, _)| k == "connection")
        .flat_map(|(_, v)| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut h = String::with_capacity(256 + req.headers.iter().map(|(k, v)| k.len() + v.len() + 4).sum::<usize>());
    h.push_str(&req.method);
    h.push(' ');
    h.push_str(&req.path);
    if !req.query.is_empty() {
        h.push('?');
        h.push_str(&req.query);
    }
    h.push_str(" HTTP/1.1\r\n");
    for (k, v) in &req.headers {
        if NOT_FORWARDED.contains(&k.as_str()) || k.starts_with("proxy-") || named.iter().any(|n| n == k) {
            continue;
        }
        h.push_str(k);
        h.push_str(": ");
        h.push_str(v);
        h.push_str("\r\n");
    }
    if let Some(n) = len {
        h.push_str(&format!("Content-Length: {n}\r\n"));
    }
    h.push_str("X-Gateway-Media-Secret: ");
    h.push_str(secret);
    h.push_str(&format!(
        "\r\nX-Forwarded-For: {client}\r\nX-Forwarded-Proto: {}\r\nConnection: close\r\n\r\n",
        if tls { "https" } else { "http" }
    ));
    h.into_bytes()
}

/// One place under `media_max_inflight`, given back when dropped.
struct Inflight<'a>(&'a AtomicU64);

impl<'a> Inflight<'a> {
    fn take(c: &'a Counters, max: usize) -> Option<Self> {
        let g = &c.media_relay_inflight_current;
        if g.fetch_add(1, Relaxed) >= max as u64 {
            g.fetch_sub(1, Relaxed);
            return None;
        }
        Some(Self(g))
    }
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// The relay's two timers: the deadline, and the idle timeout from the last byte moved.
struct Clock {
    deadline: Instant,
    idle: Duration,
    last: Instant,
}

impl Clock {
    fn at(&self) -> Instant {
        (self.last + self.idle).min(self.deadline)
    }

    fn moved(&mut self) {
        self.last = Instant::now();
    }
}

/// A budget of bytes per second, paid after the bytes were read: a debt makes the reader
/// wait before its next read (TCP backpressure then slows the client). Holds up to a
/// quarter second of bytes (at least one read) for bursts. Rate 0: no limit.
pub(crate) struct Pace {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Pace {
    pub(crate) fn new(rate: u64) -> Self {
        let rate = rate as f64;
        let burst = (rate / 4.0).max(CHUNK as f64);
        Pace { rate, burst, tokens: burst, at: Instant::now() }
    }

    /// Pay for `n` bytes read at `now`; how long to wait before reading more.
    pub(crate) fn pay(&mut self, n: usize, now: Instant) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst) - n as f64;
        self.at = now;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// How a relay stopped early.
enum Stop {
    /// The client went away (or broke its TLS stream): drop everything.
    ClientGone,
    Timeout,
}

/// Relay one request. `early`: bytes that arrived behind the request head (the start of
/// the body). `client`: the client's address as the prelude determined it.
pub(crate) async fn relay(
    sh: &Shared,
    wire: &mut Wire<'_>,
    req: &Request,
    early: &[u8],
    client: SocketAddr,
    upstream: SocketAddr,
) {
    let c = &sh.counters;
    let cfg = &sh.cfg;
    metrics::inc(&c.media_relay_requests);
    if sh.draining.load(Relaxed) {
        return refuse(sh, wire, Refusal::Draining).await;
    }
    let len = match body_len(req) {
        Ok(n) if n > cfg.media_max_body => return refuse(sh, wire, Refusal::TooLarge).await,
        Ok(n) => n,
        Err(r) => return refuse(sh, wire, r).await,
    };
    let Some(_slot) = Inflight::take(c, cfg.media_max_inflight) else {
        return refuse(sh, wire, Refusal::Busy).await;
    };
    let now = Instant::now();
    let mut clock = Clock { deadline: now + cfg.media_timeout, idle: cfg.media_idle_timeout, last: now };
    let up = match tokio::time::timeout_at(clock.at(), TcpStream::connect(upstream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) | Err(_) => return refuse(sh, wire, Refusal::Upstream).await,
    };
    let _ = up.set_nodelay(true);
    let has_len = req.headers.iter().any(|(k, _)| k == "content-length");
    let tls = wire.is_tls();
    let ip = limits::canonical(client.ip());
    let mut to_up = upstream_head(req, has_len.then_some(len), &cfg.media_secret, ip, tls);
    let head_len = to_up.len();
    let first = early.len().min(usize::try_from(len).unwrap_or(usize::MAX));
    to_up.extend_from_slice(&early[..first]);
    let mut body_left = len - first as u64;
    let mut tls_out = Vec::new();
    if body_left > 0
        && req.header("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
        && to_client(wire, b"HTTP/1.1 100 Continue\r\n\r\n", &mut tls_out, &mut clock).await.is_err()
    {
        metrics::inc(&c.media_relay_client_gone);
        return;
    }

    // Send: the head and body to the upstream, reading the client only when the upstream
    // has taken everything read so far. An answer from the upstream (early: a 413 from
    // the media server mid-body) or its EOF ends this phase.
    let mut resp: Vec<u8> = Vec::new();
    let mut off = 0;
    let mut head_rem = head_len;
    // Upload pacing (media_rate per relay, media_node_rate for all): when set, the
    // client is not read again before `resume`.
    let mut pace = Pace::new(cfg.media_rate);
    let mut resume: Option<Instant> = None;
    loop {
        if off == to_up.len() {
            if body_left == 0 {
                break;
            }
            to_up.clear();
            off = 0;
        }
        let want_write = off < to_up.len();
        enum Ev {
            Up(std::io::Result<tokio::io::Ready>),
            Client(std::io::Result<()>),
            Resume,
            Timer,
        }
        let interest = if want_write { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
        let paced = resume.is_some();
        let ev = tokio::select! {
            biased;
            r = up.ready(interest) => Ev::Up(r),
            r = wire.socket().readable(), if !want_write && !paced => Ev::Client(r),
            _ = sleep_until(resume.unwrap_or(clock.deadline)), if paced => Ev::Resume,
            _ = sleep_until(clock.at()) => Ev::Timer,
        };
        match ev {
            Ev::Resume => {
                resume = None;
                // Waiting on the budget is not the client being idle.
                clock.moved();
            }
            Ev::Up(Err(_)) => break,
            Ev::Up(Ok(r)) => {
                if r.is_readable() || r.is_read_closed() {
                    match up.try_read_buf(&mut (&mut resp).limit(CHUNK)) {
                        Ok(_) => break, // an answer (or EOF) before the request was all sent
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => break,
                    }
                }
                if want_write && r.is_writable() {
                    match up.try_write(&to_up[off..]) {
                        Ok(n) => {
                            off += n;
                            let body = n.saturating_sub(head_rem);
                            head_rem = head_rem.saturating_sub(n);
                            metrics::add(&c.media_relay_bytes_in, body as u64);
                            clock.moved();
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        // The upstream is gone: what it answered, if anything, is read next.
                        Err(_) => break,
                    }
                }
            }
            Ev::Client(Err(_)) => return gone(c),
            Ev::Client(Ok(())) => {
                // The TLS path reads a whole chunk of ciphertext; more plaintext than the
                // body's rest (a client sending past its Content-Length) is discarded.
                let max = if tls { CHUNK } else { CHUNK.min(usize::try_from(body_left).unwrap_or(CHUNK)) };
                match wire.try_pull(&mut to_up, max, &mut tls_out) {
                    Ok(Pull::Data(n)) => {
                        if n > 0 {
                            clock.moved();
                            let now = Instant::now();
                            let wait = pace.pay(n, now).max(sh.media_pace.lock().pay(n, now));
                            if !wait.is_zero() {
                                resume = Some(now + wait);
                            }
                        }
                        to_up.truncate(usize::try_from(body_left).unwrap_or(usize::MAX).min(to_up.len()));
                        body_left -= to_up.len() as u64;
                    }
                    Ok(Pull::Empty) => {}
                    Ok(Pull::Eof) | Err(_) => {
                        flush_tls_out(wire, &mut tls_out).await;
                        return gone(c);
                    }
                }
                if !tls_out.is_empty() {
                    flush_tls_out(wire, &mut tls_out).await;
                }
            }
            Ev::Timer => {
                if Instant::now() >= clock.at() {
                    return refuse(sh, wire, Refusal::Timeout { client: !want_write }).await;
                }
            }
        }
    }

    // Answer: the upstream's bytes to the client until the upstream's EOF. The client is
    // watched meanwhile: its EOF drops the upstream; what it still sends (the rest of a
    // body the upstream refused early) is discarded.
    to_up = Vec::new();
    let mut answered = false;
    // The answer ends at its Content-Length (the upstream may keep its end open, e.g.
    // aiohttp lingering to read a body it refused), else at the upstream's EOF.
    let head_only = req.method == "HEAD";
    let mut resp_head: Vec<u8> = Vec::new();
    let mut resp_total: Option<Option<u64>> = None;
    let mut resp_sent: u64 = 0;
    loop {
        if !resp.is_empty() {
            metrics::add(&c.media_relay_bytes_out, resp.len() as u64);
            clock.moved();
            if resp_total.is_none() {
                resp_head
                    .extend_from_slice(&resp[..resp.len().min(RESP_HEAD_MAX - resp_head.len().min(RESP_HEAD_MAX))]);
                resp_total = response_total(&resp_head, head_only);
                if resp_total.is_none() && resp_head.len() >= RESP_HEAD_MAX {
                    resp_total = Some(None);
                }
            }
            match to_client(wire, &resp, &mut tls_out, &mut clock).await {
                Ok(()) => answered = true,
                Err(Stop::ClientGone) => return gone(c),
                Err(Stop::Timeout) => {
                    metrics::inc(&c.media_relay_refused_timeout);
                    return;
                }
            }
            resp_sent += resp.len() as u64;
            resp.clear();
            if let Some(Some(total)) = resp_total {
                if resp_sent >= total {
                    break;
                }
            }
        }
        enum Ev {
            Up(std::io::Result<()>),
            Client(std::io::Result<()>),
            Timer,
        }
        let ev = tokio::select! {
            biased;
            r = up.readable() => Ev::Up(r),
            r = wire.socket().readable() => Ev::Client(r),
            _ = sleep_until(clock.at()) => Ev::Timer,
        };
        match ev {
            Ev::Up(r) => {
                let got = r.and_then(|()| up.try_read_buf(&mut (&mut resp).limit(CHUNK)));
                match got {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) if answered => {
                        // Cut mid-answer: the client sees the connection end early.
                        metrics::inc(&c.media_relay_refused_upstream);
                        return;
                    }
                    Err(_) => break,
                }
            }
            Ev::Client(Err(_)) => return gone(c),
            Ev::Client(Ok(())) => {
                match wire.try_pull(&mut to_up, CHUNK, &mut tls_out) {
                    Ok(Pull::Data(_)) | Ok(Pull::Empty) => {}
                    Ok(Pull::Eof) | Err(_) => return gone(c),
                }
                to_up.clear();
                if !tls_out.is_empty() {
                    flush_tls_out(wire, &mut tls_out).await;
                }
            }
            Ev::Timer => {
                if Instant::now() >= clock.at() {
                    if answered {
                        metrics::inc(&c.media_relay_refused_timeout);
                        return;
                    }
                    return refuse(sh, wire, Refusal::Timeout { client: false }).await;
                }
            }
        }
    }
    drop(up);
    if !answered {
        // The upstream closed without a byte of answer.
        return refuse(sh, wire, Refusal::Upstream).await;
    }
    wire.close_and_drain(DRAIN_TIME, drain_bytes(sh)).await;
}

/// Longest answer head looked at for its Content-Length.
const RESP_HEAD_MAX: usize = 16 * 1024;

/// The length of an answer (head and body) from its head: None while the head is
/// incomplete; Some(None) when only the upstream's EOF ends it (no Content-Length).
fn response_total(head: &[u8], head_only: bool) -> Option<Option<u64>> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = std::str::from_utf8(&head[..end]).ok()?;
    let mut lines = text.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
        // No body (1xx answers are not expected: the engine strips Expect).
        return Some(Some(end as u64));
    }
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                return Some(v.trim().parse::<u64>().ok().map(|n| end as u64 + n));
            }
        }
    }
    Some(None)
}

fn gone(c: &Counters) {
    metrics::inc(&c.media_relay_client_gone);
}

/// Records the TLS session wants sent in answer to the client's (best effort).
async fn flush_tls_out(wire: &mut Wire<'_>, out: &mut Vec<u8>) {
    if !out.is_empty() {
        let _ = tokio::time::timeout(Duration::from_secs(2), wire.write_raw(out)).await;
        out.clear();
    }
}

/// Write `data` to the client (through TLS on a TLS listener), each byte the socket
/// takes counting as activity for the idle timeout.
async fn to_client(wire: &mut Wire<'_>, data: &[u8], sealed: &mut Vec<u8>, clock: &mut Clock) -> Result<(), Stop> {
    let bytes: &[u8] = if wire.is_tls() {
        // `sealed` is empty here (records answering the client's are flushed right after
        // the read that caused them); rustls puts anything it queued itself first.
        wire.seal(data, sealed).map_err(|_| Stop::ClientGone)?;
        sealed
    } else {
        data
    };
    let sock = wire.socket();
    let mut off = 0;
    let res = loop {
        if off == bytes.len() {
            break Ok(());
        }
        tokio::select! {
            r = sock.writable() => if r.is_err() { break Err(Stop::ClientGone) },
            _ = sleep_until(clock.at()) => if Instant::now() >= clock.at() { break Err(Stop::Timeout) },
        }
        match sock.try_write(&bytes[off..]) {
            Ok(n) => {
                off += n;
                clock.moved();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break Err(Stop::ClientGone),
        }
    };
    sealed.clear();
    res
}

#[cfg(test)]
mod tests;
