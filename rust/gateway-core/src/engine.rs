//! The engine object: owns its tokio runtime (no global one), the listener and the hub.
//! Every method is non-blocking except `start` and `stop`.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::runtime::Runtime;
use tokio::sync::Notify;

use crate::client_ip::TrustedProxies;
use crate::config::EngineConfig;
use crate::conn::{Frame, CONTROL_RESERVE, PRIO_HIGH};
use crate::events::{Event, EventLimits, EventQueue};
use crate::hub::{Hub, Join, MemberInfo, RoomOptions};
use crate::limits::IpTable;
use crate::metrics::Counters;
use crate::protocol::frame::{OP_BINARY, OP_TEXT};
use crate::protocol::CloseCode;
use crate::server::{self, Decision, Listen, Shared, UserSlot, Verdict};
use crate::tls::{Acceptor, CertInfo, TlsError};

pub use crate::server::Decision as ConnectDecision;

/// Cumulative histogram buckets: (upper bound in seconds, count), +Inf last.
pub type Buckets = Vec<(f64, u64)>;

pub struct Engine {
    sh: Arc<Shared>,
    rt: Mutex<Option<Runtime>>,
    addr: Mutex<Option<SocketAddr>>,
    tls_addr: Mutex<Option<SocketAddr>>,
}

/// Engine I/O threads: `server_io_threads`, 0 = the CPU count.
fn io_threads(cfg: &EngineConfig) -> usize {
    match cfg.server_io_threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// RLIMIT_NOFILE: (soft, hard).
pub fn nofile_limit() -> (u64, u64) {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit with a valid rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return (u64::MAX, u64::MAX);
    }
    (r.rlim_cur, r.rlim_max)
}

/// The bound data frames are admitted up to: the queue bound less the reply reserve.
fn data_bound(queue_bytes: usize) -> usize {
    queue_bytes.saturating_sub(CONTROL_RESERVE).max(1)
}

/// Raise RLIMIT_NOFILE's soft limit to the hard limit. Returns (soft, hard) after.
pub fn raise_nofile_limit() -> (u64, u64) {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            let want = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                r = want;
            }
        }
    }
    (r.rlim_cur, r.rlim_max)
}

fn bind(cfg: &EngineConfig, host: &str, port: u16) -> io::Result<std::net::TcpListener> {
    let addr: SocketAddr = (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("cannot resolve host {host:?}")))?;
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // "::" serves IPv4 too (dual stack).
        let _ = sock.set_only_v6(false);
    }
    sock.set_reuse_address(true)?;
    if cfg.server_reuse_port {
        sock.set_reuse_port(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    // listen() takes an int; the kernel caps it at somaxconn anyway.
    sock.listen(cfg.server_backlog.min(i32::MAX as u32) as i32)?;
    Ok(sock.into())
}

impl Engine {
    /// Errors: the listener settings that cannot work, each message naming its config key
    /// (a certificate that cannot be served, a bad `server.trusted_proxies` entry, media
    /// relay settings it cannot serve), or the event queue's eventfd.
    pub fn new(cfg: EngineConfig) -> io::Result<Self> {
        let trusted = TrustedProxies::parse(&cfg.server_trusted_proxies)
            .map_err(|e| invalid(format!("server.trusted_proxies: {e}")))?;
        let media_upstream = cfg.check_media().map_err(invalid)?;
        let tls = if cfg.server_tls_cert_file.is_empty() && cfg.server_tls_key_file.is_empty() {
            None
        } else {
            Some(
                Acceptor::new(&cfg.server_tls_cert_file, &cfg.server_tls_key_file)
                    .map_err(|e| invalid(e.to_string()))?,
            )
        };
        let counters = Arc::new(Counters::default());
        let hub = Arc::new(
            Hub::new(
                counters.clone(),
                data_bound(cfg.limits_queue_bytes),
                cfg.limits_fanout_chunk,
                cfg.deflate_min_size,
                cfg.deflate_level,
            )
            .with_room_caps(cfg.limits_max_rooms_per_conn, cfg.limits_max_rooms),
        );
        let events = EventQueue::new(EventLimits {
            max_events: cfg.limits_event_queue,
            max_bytes: cfg.limits_event_queue_bytes,
            conn_bytes: cfg.limits_conn_event_bytes,
            connect_ttl: cfg.auth_deadline,
        })?;
        let sh = Arc::new(Shared {
            ips: IpTable::new(cfg.limits_max_conns_per_ip, cfg.limits_max_handshakes_per_ip),
            trusted,
            tls,
            media_upstream,
            media_pace: parking_lot::Mutex::new(crate::media::Pace::new(cfg.media_node_rate)),
            handshake_cpu: tokio::sync::Semaphore::new(io_threads(&cfg).saturating_sub(1).max(1)),
            conn_cap: AtomicUsize::new(cfg.limits_max_conns),
            decoder: cfg.decoder(),
            deflate: cfg.deflate(),
            cfg,
            hub,
            events,
            counters,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            stop_accepting: Notify::new(),
            started: Instant::now(),
        });
        Ok(Self { sh, rt: Mutex::new(None), addr: Mutex::new(None), tls_addr: Mutex::new(None) })
    }

    #[cfg(test)]
    pub(crate) fn shared_for_tests(&self) -> Arc<Shared> {
        self.sh.clone()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.sh.cfg
    }

    /// Build the runtime, bind the listener and start serving. Returns the bound address.
    pub fn start(&self) -> io::Result<SocketAddr> {
        let mut rt_slot = self.rt.lock();
        if rt_slot.is_some() {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "engine already started"));
        }
        let workers = io_threads(&self.sh.cfg);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("gateway-io")
            .enable_all()
            .build()?;
        let cfg = &self.sh.cfg;
        let std_listener = bind(cfg, &cfg.server_host, cfg.server_port).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot listen on {}:{}: {e}", cfg.server_host, cfg.server_port))
        })?;
        let addr = std_listener.local_addr()?;
        let tls_listener = match self.sh.tls {
            None => None,
            Some(_) => {
                let host = if cfg.server_tls_host.is_empty() { &cfg.server_host } else { &cfg.server_tls_host };
                Some(bind(cfg, host, cfg.server_tls_port).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("server.tls.port: cannot listen on {host}:{}: {e}", cfg.server_tls_port),
                    )
                })?)
            }
        };
        let tls_addr = tls_listener.as_ref().map(|l| l.local_addr()).transpose()?;
        let (listener, tls_listener) = {
            let _guard = rt.enter();
            let tls = tls_listener.map(tokio::net::TcpListener::from_std).transpose()?;
            (tokio::net::TcpListener::from_std(std_listener)?, tls)
        };
        // The node cap: never more sockets than the open-files limit leaves after the
        // reserve (read now: the application may have raised the limit before start).
        let (soft, _) = nofile_limit();
        let fd_room = usize::try_from(soft).unwrap_or(usize::MAX).saturating_sub(self.sh.cfg.limits_reserved_fds);
        self.sh.conn_cap.store(self.sh.cfg.limits_max_conns.min(fd_room).max(1), Relaxed);
        self.sh.hub.set_runtime(rt.handle().clone());
        rt.spawn(server::accept_loop(
            self.sh.clone(),
            listener,
            Listen { tls: false, proxy: cfg.server_proxy_protocol },
        ));
        if let Some(l) = tls_listener {
            rt.spawn(server::accept_loop(
                self.sh.clone(),
                l,
                Listen { tls: true, proxy: cfg.server_tls_proxy_protocol },
            ));
        }
        rt.spawn(server::sweeper(self.sh.clone()));
        *rt_slot = Some(rt);
        *self.addr.lock() = Some(addr);
        *self.tls_addr.lock() = tls_addr;
        Ok(addr)
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        *self.addr.lock()
    }

    /// The TLS listener's address, once started with a certificate.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        *self.tls_addr.lock()
    }

    // ---- TLS certificate ----------------------------------------------------------------

    /// The certificate served, if TLS is configured.
    pub fn tls_info(&self) -> Option<CertInfo> {
        self.sh.tls.as_ref().map(Acceptor::info)
    }

    /// Read the certificate and key files again; new connections get the new pair, open
    /// ones keep theirs. On an error the current certificate stays. Counted either way.
    pub fn reload_tls(&self) -> Result<CertInfo, TlsError> {
        let Some(a) = self.sh.tls.as_ref() else {
            return Err(TlsError { key: "server.tls.cert_file", message: "TLS is not configured".into() });
        };
        let r = a.reload();
        let c = &self.sh.counters;
        c.tls_reloads_ok.fetch_add(u64::from(r.is_ok()), Relaxed);
        c.tls_reloads_error.fetch_add(u64::from(r.is_err()), Relaxed);
        r
    }

    pub fn is_running(&self) -> bool {
        self.rt.lock().is_some()
    }

    // ---- events -------------------------------------------------------------------------

    pub fn events_fd(&self) -> i32 {
        self.sh.events.fd()
    }

    pub fn drain_events(&self, max: usize) -> (Vec<Event>, bool) {
        self.sh.events.drain(max, &self.sh.counters)
    }

    // ---- connect decisions ------------------------------------------------------------------

    /// Decide a pending connect. False if it is no longer pending (timed out or gone),
    /// and for an accept over `limits_max_conns_per_user`: the upgrade is then refused
    /// with HTTP 429 instead.
    pub fn decide(&self, conn: u64, d: Decision) -> bool {
        let Some(tx) = self.sh.pending.lock().remove(&conn) else { return false };
        let v = match d {
            Decision::Accept { user, meta, protocol, first } => {
                let slot = match user.as_deref() {
                    Some(u) => {
                        let u: Arc<str> = Arc::from(u);
                        if !self.sh.hub.reserve_user(&u, self.sh.cfg.limits_max_conns_per_user) {
                            self.sh.counters.conns_refused_user.fetch_add(1, Relaxed);
                            let reason = "too many connections for this user".into();
                            let _ = tx.send(Verdict::Reject { status: 429, reason });
                            return false;
                        }
                        Some(UserSlot::new(self.sh.hub.clone(), u))
                    }
                    None => None,
                };
                Verdict::Accept { user, meta, protocol, first, slot }
            }
            Decision::Reject { status, reason } => Verdict::Reject { status, reason },
        };
        // A verdict that is not received (the deadline passed) gives its user slot back.
        tx.send(v).is_ok()
    }

    // ---- sending ----------------------------------------------------------------------

    fn frame(&self, data: &[u8], binary: bool) -> Arc<Frame> {
        let op = if binary { OP_BINARY } else { OP_TEXT };
        Frame::stamped(op, data, self.sh.cfg.deflate_min_size, 1, self.sh.hub.now_us())
    }

    /// Queue a message to one connection. False if unknown or not accepted by the queue.
    pub fn send(&self, conn: u64, data: &[u8], prio: u8, binary: bool) -> bool {
        match self.sh.hub.conn(conn) {
            Some(c) => {
                let f = self.frame(data, binary);
                let ok = matches!(
                    c.push(&f, prio, self.sh.hub.queue_bytes, &self.sh.counters),
                    crate::conn::Push::Wake | crate::conn::Push::Queued
                );
                if ok {
                    crate::metrics::inc(&self.sh.counters.deliveries);
                    crate::metrics::inc(&self.sh.counters.deliveries_logical);
                }
                ok
            }
            None => false,
        }
    }

    pub fn send_user(&self, user: &str, data: &[u8], prio: u8) -> usize {
        self.sh.hub.send_user(user, &self.frame(data, false), prio)
    }

    pub fn publish(&self, room: &str, data: &[u8], prio: u8) -> usize {
        self.sh.hub.publish(room, self.frame(data, false), prio)
    }

    pub fn broadcast(&self, data: &[u8], prio: u8) -> usize {
        self.sh.hub.broadcast(self.frame(data, false), prio)
    }

    // ---- rooms and presence ------------------------------------------------------------

    pub fn join(&self, conn: u64, room: &str) -> Join {
        self.sh.hub.join(conn, room)
    }

    /// [`Engine::join`] with another cap on the connection's rooms (see [`Hub::join_capped`]).
    pub fn join_capped(&self, conn: u64, room: &str, cap: usize) -> Join {
        self.sh.hub.join_capped(conn, room, cap)
    }

    pub fn is_member(&self, conn: u64, room: &str) -> bool {
        self.sh.hub.is_member(conn, room)
    }

    pub fn leave(&self, conn: u64, room: &str) -> bool {
        self.sh.hub.leave(conn, room)
    }

    pub fn set_room_options(&self, prefix: &str, opts: RoomOptions) {
        self.sh.hub.set_room_options(prefix, opts)
    }

    pub fn room_dropped(&self, room: &str) -> u64 {
        self.sh.hub.room_dropped(room)
    }

    pub fn room_counts(&self, room: &str) -> (usize, usize) {
        self.sh.hub.room_counts(room)
    }

    pub fn room_members(&self, room: &str, offset: usize, limit: usize) -> Vec<MemberInfo> {
        self.sh.hub.room_members(room, offset, limit)
    }

    pub fn rooms(&self) -> Vec<(String, usize, usize)> {
        self.sh.hub.rooms()
    }

    pub fn conn_rooms(&self, conn: u64) -> Option<Vec<String>> {
        self.sh.hub.conn(conn).map(|c| c.rooms.lock().iter().map(|r| r.to_string()).collect())
    }

    pub fn user_conns(&self, user: &str) -> Vec<u64> {
        self.sh.hub.user_conns(user).iter().map(|c| c.id).collect()
    }

    // ---- closing ----------------------------------------------------------------------

    /// Close one connection: frames already queued are flushed first.
    pub fn disconnect(&self, conn: u64, code: CloseCode, reason: &str) -> bool {
        match self.sh.hub.conn(conn) {
            Some(c) => {
                self.sh.counters.close_server.fetch_add(1, Relaxed);
                c.close(code, reason, false);
                true
            }
            None => false,
        }
    }

    pub fn disconnect_user(&self, user: &str, code: CloseCode, reason: &str) -> usize {
        let conns = self.sh.hub.user_conns(user);
        for c in &conns {
            self.sh.counters.close_server.fetch_add(1, Relaxed);
            c.close(code, reason, false);
        }
        conns.len()
    }

    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut v = self.sh.counters.snapshot();
        let (len, bytes) = self.sh.events.usage();
        v.push(("event_queue_len", len as u64));
        v.push(("event_queue_bytes", bytes as u64));
        v.push(("conns_cap", self.sh.conn_cap.load(Relaxed) as u64));
        v
    }

    /// Histograms: name -> (cumulative (le, count) buckets, sum of seconds).
    pub fn histograms(&self) -> Vec<(&'static str, Buckets, f64)> {
        let h = &self.sh.hub.hist;
        let (fb, fs) = h.fanout.snapshot();
        let (lb, ls) = h.flush_lag.snapshot();
        vec![("fanout_seconds", fb, fs), ("flush_lag_seconds", lb, ls)]
    }

    pub fn connection_count(&self) -> usize {
        self.sh.hub.conn_count()
    }

    pub fn is_draining(&self) -> bool {
        self.sh.draining.load(Relaxed)
    }

    /// Stop accepting (health answers 503), then ask every connection to close with
    /// `code`, after an optional last frame (e.g. `{"op":"drain","retry_ms":…}`).
    /// Returns immediately; see `wait_closed`.
    pub fn drain(&self, code: CloseCode, reason: &str, last: Option<&[u8]>) -> usize {
        self.sh.draining.store(true, Relaxed);
        self.sh.stop_accepting.notify_one();
        let conns = self.sh.hub.all_conns();
        let last = last.map(|d| self.frame(d, false));
        for c in &conns {
            if let Some(f) = &last {
                // One frame per connection, once: admitted even over the bound.
                c.push(f, PRIO_HIGH, usize::MAX, &self.sh.counters);
            }
            c.close(code, reason, false);
        }
        conns.len()
    }

    /// Block until no connection is left or `timeout` passed. Returns those left.
    pub fn wait_closed(&self, timeout: Duration) -> usize {
        let end = Instant::now() + timeout;
        loop {
            let n = self.connection_count();
            if n == 0 || Instant::now() >= end {
                return n;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Graceful stop: drain with `code`, wait up to `timeout`, then shut the runtime down
    /// (connections still open are dropped). Blocks the caller.
    pub fn stop(&self, code: CloseCode, reason: &str, timeout: Duration) -> usize {
        if !self.is_running() {
            return 0;
        }
        self.drain(code, reason, None);
        let left = self.wait_closed(timeout);
        if let Some(rt) = self.rt.lock().take() {
            rt.shutdown_timeout(Duration::from_millis(500));
        }
        left
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.get_mut().take() {
            rt.shutdown_background();
        }
    }
}
