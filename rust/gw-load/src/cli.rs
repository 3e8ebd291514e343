//! Command-line flags and the validated run configuration derived from them.

use crate::tls::Tls;
use clap::Parser;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// High-scale WebSocket load client for the live-chat gateway.
///
/// Opens --conns receiver connections (plus --publishers publisher
/// connections) with one mio event loop per thread, joins --room on each,
/// publishes at --rate during --warmup + --duration and measures fan-out
/// throughput, delivery ratio and latency with little client CPU. Prints
/// progress to stderr and one JSON summary to stdout.
///
/// Phases: connect all -> [warmup, then a quiet --drain-wait] -> measured
/// --duration -> stop publishing, wait --drain-wait -> report.
/// With --hold S: connect, print `READY <n>`, keep the connections (and
/// heartbeats) for S seconds, report.
///
/// --mode handshake: keep --concurrency connections in flight, each a TCP
/// connect + TLS handshake (+ the WebSocket upgrade with --upgrade), closed as
/// soon as it is done, for --warmup + --duration; report handshakes/s, full
/// vs resumed, failures.
///
/// wss:// URLs need --ca (the only certificate trusted).
#[derive(Parser, Debug, Clone)]
#[command(name = "gw-load", version, about, long_about)]
pub struct Args {
    /// Gateway endpoint, ws://host:port/path[?query] or wss://... (TLS, needs --ca).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,

    /// `load` (connect, join, publish or --hold) or `handshake` (connect,
    /// handshake, close, repeat: handshakes/s).
    #[arg(long, value_enum, default_value_t = Mode::Load)]
    pub mode: Mode,

    /// PEM file with the CA certificate(s) to trust for wss:// (no other
    /// roots are trusted; required for wss://).
    #[arg(long)]
    pub ca: Option<String>,

    /// TLS session resumption: `on` keeps a client session cache (tickets,
    /// TLS 1.2 session ids) shared by all connections; `off` makes every
    /// connection a full handshake.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub tls_resume: OnOff,

    /// Offer only this TLS version (default: 1.2 and 1.3).
    #[arg(long, value_enum)]
    pub tls_version: Option<TlsVersion>,

    /// Verify the server's certificate and handshake signature fully only
    /// the first time a certificate is seen; later handshakes with the same
    /// certificate skip both (a benchmark shortcut: with ECDSA certificates
    /// the client's verifications cost more than the server's signature).
    #[arg(long)]
    pub tls_verify_once: bool,

    /// Who decrypts records once the handshake is done: `direct` (in place in
    /// the read buffer, with the AEAD and keys rustls negotiated; no copy or
    /// allocation per record) or `rustls` (its unbuffered connection: a copy
    /// and an allocation per record). The handshake is rustls's either way;
    /// handshake mode always uses `rustls`.
    #[arg(long, value_enum, default_value_t = RecordLayer::Direct)]
    pub tls_record_layer: RecordLayer,

    /// Handshake mode: connections in flight at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,

    /// Handshake mode: after the TLS handshake also do the WebSocket upgrade
    /// (a connection counts once the `101` arrived).
    #[arg(long)]
    pub upgrade: bool,

    /// Number of receiver connections.
    #[arg(long, default_value_t = 1000)]
    pub conns: u32,

    /// Event-loop threads (connections are spread round-robin).
    #[arg(long, default_value_t = 1)]
    pub threads: u32,

    /// Bind connections round-robin to 127.0.0.1 .. 127.0.0.N before
    /// connecting, so ephemeral ports don't run out (loopback targets only;
    /// 1 = don't bind).
    #[arg(long, default_value_t = 1)]
    pub sources: u32,

    /// Connection attempts started per second (0 = unlimited).
    #[arg(long, default_value_t = 0.0)]
    pub connect_rate: f64,

    /// Maximum handshakes in flight (TCP connect + upgrade + join).
    #[arg(long, default_value_t = 512)]
    pub connect_inflight: u32,

    /// Seconds a connection may take to become ready before it counts as
    /// failed.
    #[arg(long, default_value_t = 15.0)]
    pub connect_timeout: f64,

    /// Mint an HS256 JWT per connection ({"sub":"<prefix><i>","exp":now+3600})
    /// with this secret and pass it as ?token=. Without it: ?user=<prefix><i>
    /// (gateway dev auth mode).
    #[arg(long)]
    pub jwt_secret: Option<String>,

    /// User id prefix; connection i is user <prefix><i> (publishers continue
    /// the numbering after the receivers).
    #[arg(long, default_value = "u")]
    pub user_prefix: String,

    /// Value of the Sec-WebSocket-Protocol header ("" = none).
    #[arg(long, default_value = "gateway.v1")]
    pub subprotocol: String,

    /// Room every connection joins and publishers publish to.
    #[arg(long, default_value = "bench")]
    pub room: String,

    /// Don't join a room: a connection is ready after the `connected` frame
    /// (idle-connection tests).
    #[arg(long)]
    pub no_join: bool,

    /// Conversations (protocol 1.1): instead of `join`, every connection sends
    /// `{"op":"sync","id":1,"limit":1,"msgs":0}` after `connected` and is ready
    /// at its ack. The first sync attaches the connection to its user's
    /// conversations (no join); publishers post into --room (or their dm with
    /// --dm-pairs) as members.
    #[arg(long)]
    pub sync: bool,

    /// Number of the first connection's user: connection i is user
    /// <prefix><offset + i> (several gw-load processes, e.g. one per node, can
    /// then share one user numbering).
    #[arg(long, default_value_t = 0)]
    pub user_offset: u64,

    /// Direct messages: publishers come in pairs (publisher 2k with 2k+1) and
    /// each publishes into the dm of its pair, `<--dm-prefix>:<lo>:<hi>` (the two
    /// user ids in byte order), instead of --room. A publisher counts the
    /// messages its peer sent it as deliveries (`received`, latency) and its own
    /// copies as `publisher_received`. Needs an even --publishers; use with
    /// --sync (and usually --conns 0).
    #[arg(long)]
    pub dm_pairs: bool,

    /// Room prefix of the dm route for --dm-pairs.
    #[arg(long, default_value = "dm")]
    pub dm_prefix: String,

    /// Track every message's last delivery: for each message (keyed by its
    /// publisher timestamp `t`), the latest receive time and the number of
    /// receivers of this process that got it, over all phases. Reported as
    /// `per_message` ([t, last receive unix µs, receivers]) with the
    /// publisher's measured range `measured_publish_t_us` and, over the
    /// measured messages, `last_delivery_ms` (publish to the last receiver of
    /// this process). Every received message's latency is then recorded
    /// (--lat-sample is ignored). For fixed, moderate rates.
    #[arg(long)]
    pub per_message: bool,

    /// Record the latency of every K-th received message (bounds the cost).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub lat_sample: u32,

    /// Send {"op":"ping"} on each connection every S seconds, spread evenly
    /// over the interval (0 = off).
    #[arg(long, default_value_t = 20.0)]
    pub ping_interval: f64,

    /// Publisher connections (they join the room too; 0 = no publishing).
    #[arg(long, default_value_t = 1)]
    pub publishers: u32,

    /// Total publish rate across publishers in msgs/s, or `max` (keep up to
    /// --window unacked publishes per publisher).
    #[arg(long, default_value = "100")]
    pub rate: String,

    /// Unacked publishes per publisher with --rate max.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub window: u32,

    /// Message `type` of each publish (the route maps it to a priority, e.g.
    /// `gift` is high priority by default).
    #[arg(long, default_value = "chat")]
    pub msg_type: String,

    /// Slow consumers: the first N receivers (users <prefix>0 ..) stop
    /// reading once joined (they still send heartbeats). They are not counted
    /// as receivers; at the end their pending input is read to see whether
    /// the server closed them (`slow_closes_by_code`).
    #[arg(long, default_value_t = 0)]
    pub slow: u32,

    /// SO_RCVBUF in bytes for the slow consumers' sockets (0 = the OS default,
    /// which lets loopback buffer several MB before the server's queue fills).
    #[arg(long, default_value_t = 0)]
    pub slow_rcvbuf: usize,

    /// Approximate size in bytes of each publish's `data` object
    /// ({"t":<micros>,"p":"<padding>"}).
    #[arg(long, default_value_t = 128)]
    pub payload_bytes: usize,

    /// Seconds of unmeasured publishing before the measurement.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,

    /// Measured seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,

    /// Seconds to wait for in-flight messages after publishing stops (also
    /// the quiet gap between warmup and measurement).
    #[arg(long, default_value_t = 1.0)]
    pub drain_wait: f64,

    /// Idle mode: connect, then hold the connections S seconds (heartbeats
    /// only, progress every second on stderr), then report. No publishing.
    #[arg(long)]
    pub hold: Option<f64>,

    /// Also measure this server process: its CPU time (from /proc/PID/stat) over the
    /// measured phase, reported as server_cpu_s and server_cpu_ns_per_delivery, and its
    /// RSS at the end of the connect and measured phases.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Hard stop after this many seconds (default: warmup + duration + hold
    /// + 2 x drain-wait + 60).
    #[arg(long)]
    pub timeout: Option<f64>,

    /// End the measured phase (or --hold) early once stdin reaches EOF (the
    /// caller closes it when another process's run is over), then drain and
    /// report as usual.
    #[arg(long)]
    pub stop_on_stdin_eof: bool,

    /// Don't print progress lines to stderr (READY is still printed).
    #[arg(long)]
    pub quiet: bool,
}

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Load,
    Handshake,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsVersion {
    #[value(name = "1.2")]
    V12,
    #[value(name = "1.3")]
    V13,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RecordLayer {
    Direct,
    Rustls,
}

/// Publishing mode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// Total messages per second across all publishers.
    Fixed(f64),
    /// Window-limited: as fast as acks come back.
    Max,
}

/// Validated configuration shared (read-only) by all threads.
#[derive(Debug, Clone)]
pub struct Config {
    pub args: Args,
    pub target: SocketAddr,
    /// Set for wss:// URLs.
    pub tls: Option<Tls>,
    /// `Host` header value.
    pub host_header: String,
    /// Request path with the query the user gave (without the identity).
    pub path: String,
    /// Source addresses to bind before connecting (empty = don't bind).
    pub sources: Vec<Ipv4Addr>,
    pub rate: Rate,
    pub ping_interval: Option<Duration>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
}

impl Config {
    pub fn from_args(args: Args) -> Result<Config, String> {
        let (rest, secure) = match (args.url.strip_prefix("ws://"), args.url.strip_prefix("wss://")) {
            (Some(r), _) => (r, false),
            (_, Some(r)) => (r, true),
            _ => return Err(format!("--url must start with ws:// or wss:// (got {})", args.url)),
        };
        let default_port = if secure { 443 } else { 80 };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        if authority.is_empty() {
            return Err("--url has no host".into());
        }
        let with_port = if authority.starts_with('[') {
            if authority.contains("]:") {
                authority.to_string()
            } else {
                format!("{authority}:{default_port}")
            }
        } else if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:{default_port}")
        };
        let target = with_port
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {authority}: {e}"))?
            .min_by_key(|a| !a.is_ipv4()) // prefer IPv4
            .ok_or_else(|| format!("{authority} resolves to no address"))?;

        let tls = if secure {
            let ca = args.ca.as_deref().ok_or("wss:// needs --ca <pem> (the CA certificate to trust)")?;
            let host = match authority.rfind(':') {
                Some(i) if !authority[i..].contains(']') => &authority[..i],
                _ => authority,
            };
            let direct = args.tls_record_layer == RecordLayer::Direct;
            Some(Tls::new(host, ca, args.tls_resume == OnOff::On, args.tls_version, args.tls_verify_once, direct)?)
        } else {
            if args.ca.is_some() || args.tls_version.is_some() || args.tls_verify_once {
                return Err("--ca, --tls-version and --tls-verify-once need a wss:// URL".into());
            }
            None
        };
        if args.threads == 0 {
            return Err("--threads must be >= 1".into());
        }
        if args.mode == Mode::Handshake && args.hold.is_some() {
            return Err("--hold and --mode handshake exclude each other".into());
        }
        if args.slow > args.conns {
            return Err("--slow must be <= --conns".into());
        }
        if args.slow > 0 && args.no_join {
            return Err("--slow needs joined receivers (not --no-join)".into());
        }
        if args.sync && args.no_join {
            return Err("--sync and --no-join exclude each other".into());
        }
        if args.dm_pairs && (args.publishers == 0 || args.publishers % 2 != 0) {
            return Err("--dm-pairs needs an even, non-zero --publishers".into());
        }
        if args.sources == 0 || args.sources > 254 {
            return Err("--sources must be between 1 and 254".into());
        }
        let sources = if args.sources > 1 {
            match target.ip() {
                IpAddr::V4(ip) if ip.is_loopback() => {}
                _ => return Err("--sources > 1 needs an IPv4 loopback target (127.x.x.x)".into()),
            }
            (1..=args.sources).map(|i| Ipv4Addr::new(127, 0, 0, i as u8)).collect()
        } else {
            Vec::new()
        };
        let rate = match args.rate.as_str() {
            "max" => Rate::Max,
            s => {
                let r: f64 = s.parse().map_err(|_| format!("--rate must be a number or `max` (got {s})"))?;
                if !(r >= 0.0 && r.is_finite()) {
                    return Err("--rate must be >= 0".into());
                }
                Rate::Fixed(r)
            }
        };
        for (name, v) in [
            ("--warmup", args.warmup),
            ("--duration", args.duration),
            ("--drain-wait", args.drain_wait),
            ("--ping-interval", args.ping_interval),
            ("--connect-rate", args.connect_rate),
            ("--hold", args.hold.unwrap_or(0.0)),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("{name} must be a finite number >= 0"));
            }
        }
        if !(args.connect_timeout > 0.0 && args.connect_timeout.is_finite()) {
            return Err("--connect-timeout must be > 0".into());
        }
        let timeout = args
            .timeout
            .unwrap_or(args.warmup + args.duration + args.hold.unwrap_or(0.0) + 2.0 * args.drain_wait + 60.0);
        if !(timeout > 0.0 && timeout.is_finite()) {
            return Err("--timeout must be > 0".into());
        }
        Ok(Config {
            tls,
            host_header: authority.to_string(),
            path,
            target,
            sources,
            rate,
            ping_interval: (args.ping_interval > 0.0).then(|| Duration::from_secs_f64(args.ping_interval)),
            connect_timeout: Duration::from_secs_f64(args.connect_timeout),
            timeout: Duration::from_secs_f64(timeout),
            args,
        })
    }

    /// Total connections (receivers + publishers; no publishers in hold mode).
    pub fn total_conns(&self) -> u64 {
        self.args.conns as u64 + self.publishers() as u64
    }

    pub fn publishers(&self) -> u32 {
        if self.args.hold.is_some() {
            0
        } else {
            self.args.publishers
        }
    }

    /// Request path for connection `i`, carrying its identity.
    pub fn request_path(&self, i: u64, now_secs: u64) -> String {
        let sep = if self.path.contains('?') { '&' } else { '?' };
        let user = self.user(i);
        match &self.args.jwt_secret {
            Some(secret) => {
                let token = crate::jwt::mint(secret.as_bytes(), &user, now_secs + 3600);
                format!("{}{sep}token={token}", self.path)
            }
            None => format!("{}{sep}user={}", self.path, url_encode(&user)),
        }
    }
}

impl Config {
    /// The user id of connection `i` (receivers 0..N, publishers after them).
    pub fn user(&self, i: u64) -> String {
        format!("{}{}", self.args.user_prefix, self.args.user_offset + i)
    }

    /// The room publisher `p` (0-based) posts into: --room, or with
    /// --dm-pairs the dm with publisher `p ^ 1`.
    pub fn publish_room(&self, p: u64) -> String {
        if !self.args.dm_pairs {
            return self.args.room.clone();
        }
        let n = self.args.conns as u64;
        let (a, b) = (self.user(n + p), self.user(n + (p ^ 1)));
        let (lo, hi) = if a.as_bytes() <= b.as_bytes() { (a, b) } else { (b, a) };
        format!("{}:{lo}:{hi}", self.args.dm_prefix)
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["gw-load"];
        argv.extend_from_slice(extra);
        Config::from_args(Args::try_parse_from(argv).map_err(|e| e.to_string())?)
    }

    #[test]
    fn url_and_identity() {
        let c = cfg(&["--url", "ws://127.0.0.1:9001/ws", "--sources", "3"]).unwrap();
        assert_eq!(c.target, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(c.host_header, "127.0.0.1:9001");
        assert_eq!(c.sources.len(), 3);
        assert_eq!(c.request_path(7, 0), "/ws?user=u7");
        let c = cfg(&["--url", "ws://127.0.0.1:9001/ws?x=1", "--jwt-secret", "k", "--rate", "max"]).unwrap();
        assert!(c.request_path(1, 0).starts_with("/ws?x=1&token=eyJ"));
        assert_eq!(c.rate, Rate::Max);
        assert!(cfg(&["--url", "http://x"]).is_err());
        assert!(cfg(&["--rate", "fast"]).is_err());
        assert!(cfg(&["--conns", "2", "--slow", "3"]).is_err());
        assert_eq!(cfg(&["--conns", "2", "--slow", "1"]).unwrap().args.slow, 1);
        assert_eq!(url_encode("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn conversations_identity_and_dm_rooms() {
        let c = cfg(&["--conns", "0", "--publishers", "12", "--dm-pairs", "--sync", "--user-offset", "5"]).unwrap();
        assert_eq!(c.request_path(0, 0), "/ws?user=u5");
        assert_eq!(c.publish_room(0), "dm:u5:u6");
        assert_eq!(c.publish_room(1), "dm:u5:u6");
        assert_eq!(c.publish_room(8), "dm:u13:u14");
        let c = cfg(&["--conns", "0", "--publishers", "6", "--dm-pairs", "--user-offset", "4"]).unwrap();
        assert_eq!(c.publish_room(4), "dm:u8:u9");
        assert!(cfg(&["--publishers", "3", "--dm-pairs"]).is_err());
        assert!(cfg(&["--sync", "--no-join"]).is_err());
        assert_eq!(cfg(&["--room", "group:g"]).unwrap().publish_room(0), "group:g");
    }

    #[test]
    fn wss_needs_a_ca() {
        assert!(cfg(&["--url", "wss://127.0.0.1:9443/ws"]).unwrap_err().contains("--ca"));
        assert!(cfg(&["--url", "ws://127.0.0.1:9000/ws", "--ca", "x.pem"]).is_err());
        assert!(cfg(&["--url", "ws://127.0.0.1:9000/ws", "--tls-verify-once"]).is_err());
        let pki = crate::tls::testing::pki();
        let ca = pki.ca_path.to_str().unwrap();
        let c = cfg(&["--url", "wss://localhost/ws", "--ca", ca, "--tls-version", "1.3"]).unwrap();
        assert_eq!(c.target.port(), 443);
        assert_eq!(c.host_header, "localhost");
        assert!(c.tls.is_some());
        assert_eq!(c.args.tls_record_layer, RecordLayer::Direct);
        let c = cfg(&["--url", "wss://localhost/ws", "--ca", ca, "--tls-record-layer", "rustls"]).unwrap();
        assert_eq!(c.args.tls_record_layer, RecordLayer::Rustls);
        let c = cfg(&["--url", "wss://127.0.0.1:9443/ws", "--ca", ca, "--mode", "handshake", "--upgrade"]).unwrap();
        assert_eq!(c.args.mode, Mode::Handshake);
        assert!(cfg(&["--mode", "handshake", "--hold", "1"]).is_err());
        assert!(cfg(&["--url", "wss://127.0.0.1/ws", "--ca", "/nonexistent.pem"]).is_err());
    }
}
