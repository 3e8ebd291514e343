//! Engine configuration. The Python layer validates user config (`Config.check()`) and
//! builds this; each field is named after its config key, `<section>_<key>`
//! (`limits.queue_bytes` -> `limits_queue_bytes`). Fields without a config key
//! (`static_files`, `app_ping`, `close_timeout`) are engine-only.
//!
//! The engine does not validate ranges; it clamps only where a value would otherwise be
//! unsafe (each clamp says why where it is applied). The media relay's settings are the
//! exception: `EngineConfig::check_media` refuses values it cannot serve (at `Engine::new`).

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;

use crate::protocol::deflate::DeflateConfig;
use crate::protocol::frame::DecoderConfig;

/// Everything the engine needs to know; defaults match docs/operations.md.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// `0.0.0.0` (IPv4), `::` (IPv6 and, dual-stack, IPv4) or a specific address.
    pub server_host: String,
    /// 0 picks a free port (see `Engine::local_addr`).
    pub server_port: u16,
    /// SO_REUSEPORT, so several worker processes can share one port.
    pub server_reuse_port: bool,
    pub server_backlog: u32,
    /// Tokio I/O threads; 0 = the CPU count.
    pub server_io_threads: usize,
    /// The plain listener expects a PROXY protocol (v1/v2) header on every connection.
    pub server_proxy_protocol: bool,
    /// CIDRs of proxies whose `X-Forwarded-For` / `X-Real-IP` are believed (and, when
    /// set, the only peers a PROXY-protocol listener accepts).
    pub server_trusted_proxies: Vec<String>,
    /// PEM certificate chain and key of the TLS listener; empty = no TLS listener.
    pub server_tls_cert_file: String,
    pub server_tls_key_file: String,
    /// Address of the TLS listener; empty host = `server_host`; port 0 picks a free one.
    pub server_tls_host: String,
    pub server_tls_port: u16,
    pub server_tls_proxy_protocol: bool,
    /// Path that accepts WebSocket upgrades; empty = any path.
    pub server_ws_path: String,
    /// Answered by the engine without Python: 200 while running, 503 while draining.
    pub server_health_path: String,
    /// Plain HTTP GET paths served from memory: path -> (content type, body).
    pub static_files: HashMap<String, (String, Bytes)>,
    /// Time for the client to send a complete request head.
    pub limits_handshake_timeout: Duration,
    /// Time for the application to accept or reject an upgrade (then 503).
    pub auth_deadline: Duration,
    pub limits_max_headers: usize,
    pub limits_max_header_bytes: usize,
    pub limits_max_frame_bytes: usize,
    pub limits_max_message_bytes: usize,
    pub deflate_enabled: bool,
    /// Messages shorter than this are sent uncompressed.
    pub deflate_min_size: usize,
    /// zlib level for server messages (0..=9).
    pub deflate_level: u32,
    /// Upper bound of the client's compression window (9..=15).
    pub deflate_client_max_window_bits: u8,
    /// Close a connection that sent nothing for this long (code 4000).
    pub heartbeat_idle_timeout: Duration,
    /// Quiet time after which a connection gets a WebSocket ping (with `heartbeat_ws_ping`).
    pub heartbeat_interval: Duration,
    pub heartbeat_ws_ping: bool,
    /// Answer `{"op":"ping"}` text messages with `{"op":"pong",...}` in the engine.
    pub app_ping: bool,
    /// Bound of everything queued for one connection, in bytes (data and control replies).
    pub limits_queue_bytes: usize,
    /// SO_SNDBUF for client sockets; 0 leaves the kernel's autotuning.
    pub limits_socket_send_buffer: usize,
    /// Members per fan-out task: larger rooms are split across worker threads.
    pub limits_fanout_chunk: usize,
    /// Events waiting for the application: client messages over this count are shed.
    pub limits_event_queue: usize,
    /// Bytes of events waiting for the application (node-wide): client messages over
    /// this are shed (error 4029 "overloaded").
    pub limits_event_queue_bytes: usize,
    /// Bytes of one connection's events waiting for the application: over it, the
    /// connection is not read until the application has taken them (backpressure).
    pub limits_conn_event_bytes: usize,
    /// Client data messages per second per connection (token bucket); 0 = unlimited.
    pub limits_client_rate: f64,
    /// Bucket size: messages a connection may send at once; also the number of refusals
    /// in a row after which the connection is closed (4029).
    pub limits_client_burst: u32,
    /// Connections (sockets, including handshakes in progress) per node; never more
    /// than the open-files limit minus `limits_reserved_fds`.
    pub limits_max_conns: usize,
    /// File descriptors kept free for everything else in the process (Redis, the API,
    /// logs).
    pub limits_reserved_fds: usize,
    /// Connections per client IP address (IPv4-mapped IPv6 counts as IPv4).
    pub limits_max_conns_per_ip: usize,
    /// Connections per client IP still in their HTTP handshake or auth decision.
    pub limits_max_handshakes_per_ip: usize,
    /// Connections per user, enforced when the application accepts (HTTP 429).
    pub limits_max_conns_per_user: usize,
    /// Rooms one connection may be in.
    pub limits_max_rooms_per_conn: usize,
    /// Rooms with local members on this node.
    pub limits_max_rooms: usize,
    /// How long a closing connection waits for the peer's close frame.
    pub close_timeout: Duration,
    /// HTTP requests whose path starts with this are relayed to `media_upstream` (any
    /// method; never an upgrade); empty = off. See `media.rs`.
    pub media_prefix: String,
    /// `ip:port` of the HTTP upstream (the node's media server on loopback).
    pub media_upstream: String,
    /// Sent to the upstream as `X-Gateway-Media-Secret` (a client's own is removed).
    pub media_secret: String,
    /// Largest request body (Content-Length) relayed; over it: 413 before reading it.
    pub media_max_body: u64,
    /// Deadline of one relayed request, from its head read to the end of the response.
    pub media_timeout: Duration,
    /// Nothing moved either way for this long: the relay is cut (408/504 when nothing
    /// was answered yet).
    pub media_idle_timeout: Duration,
    /// Relays in flight on this node; over it: 503.
    pub media_max_inflight: usize,
    /// Request-body bytes per second one relay reads from its client (0: no limit).
    pub media_rate: u64,
    /// Request-body bytes per second all relays together read (0: no limit): the share
    /// of the node's CPU that uploads may take from the fan-out.
    pub media_node_rate: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            server_host: "0.0.0.0".into(),
            server_port: 8080,
            server_reuse_port: false,
            server_backlog: 4096,
            server_io_threads: 0,
            server_proxy_protocol: false,
            server_trusted_proxies: Vec::new(),
            server_tls_cert_file: String::new(),
            server_tls_key_file: String::new(),
            server_tls_host: String::new(),
            server_tls_port: 8443,
            server_tls_proxy_protocol: false,
            server_ws_path: "/ws".into(),
            server_health_path: "/healthz".into(),
            static_files: HashMap::new(),
            limits_handshake_timeout: Duration::from_secs(5),
            auth_deadline: Duration::from_secs(5),
            limits_max_headers: 64,
            limits_max_header_bytes: 8192,
            limits_max_frame_bytes: 64 * 1024,
            limits_max_message_bytes: 64 * 1024,
            deflate_enabled: true,
            deflate_min_size: 128,
            deflate_level: 5,
            deflate_client_max_window_bits: 15,
            heartbeat_idle_timeout: Duration::from_secs(90),
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_ws_ping: true,
            app_ping: true,
            limits_queue_bytes: 1 << 20,
            limits_socket_send_buffer: 0,
            limits_fanout_chunk: 1024,
            limits_event_queue: 1 << 20,
            limits_event_queue_bytes: 64 << 20,
            limits_conn_event_bytes: 256 << 10,
            limits_client_rate: 50.0,
            limits_client_burst: 100,
            limits_max_conns: 100_000,
            limits_reserved_fds: 256,
            limits_max_conns_per_ip: 10_000,
            limits_max_handshakes_per_ip: 1000,
            limits_max_conns_per_user: 10,
            limits_max_rooms_per_conn: 100,
            limits_max_rooms: 100_000,
            close_timeout: Duration::from_secs(2),
            media_prefix: String::new(),
            media_upstream: String::new(),
            media_secret: String::new(),
            media_max_body: 100 << 20,
            media_timeout: Duration::from_secs(300),
            media_idle_timeout: Duration::from_secs(30),
            media_max_inflight: 64,
            media_rate: 0,
            media_node_rate: 0,
        }
    }
}

impl EngineConfig {
    /// The codec's limits.
    pub fn decoder(&self) -> DecoderConfig {
        DecoderConfig {
            max_frame: self.limits_max_frame_bytes,
            max_message: self.limits_max_message_bytes,
            require_mask: true,
        }
    }

    /// What permessage-deflate may negotiate and how server messages are compressed.
    pub fn deflate(&self) -> DeflateConfig {
        DeflateConfig {
            enabled: self.deflate_enabled,
            client_max_window_bits: self.deflate_client_max_window_bits,
            min_size: self.deflate_min_size,
            level: self.deflate_level,
        }
    }

    /// WebSocket ping interval: `heartbeat_interval` when `heartbeat_ws_ping`, else none.
    pub fn ping_interval(&self) -> Option<Duration> {
        (self.heartbeat_ws_ping && !self.heartbeat_interval.is_zero()).then_some(self.heartbeat_interval)
    }
}

impl EngineConfig {
    /// Check the media relay's settings: Ok(None) when it is off (`media_prefix` empty),
    /// else the upstream's address. Each error names its key.
    pub fn check_media(&self) -> Result<Option<std::net::SocketAddr>, String> {
        let p = self.media_prefix.as_str();
        if p.is_empty() {
            return Ok(None);
        }
        if !p.starts_with('/') || p == "/" || p.bytes().any(|b| !b.is_ascii_graphic() || b == b'?' || b == b'#') {
            return Err(format!("media_prefix: {p:?} must be a path prefix such as \"/media/\" (not \"/\")"));
        }
        let taken = [("server_ws_path", &self.server_ws_path), ("server_health_path", &self.server_health_path)]
            .into_iter()
            .chain(self.static_files.keys().map(|k| ("static_files", k)))
            .find(|(_, path)| !path.is_empty() && path.starts_with(p));
        if let Some((key, path)) = taken {
            return Err(format!("media_prefix: {p:?} would take {key} {path:?}"));
        }
        let up: std::net::SocketAddr = self.media_upstream.parse().map_err(|_| {
            format!("media_upstream: {:?} is not an ip:port address (such as \"127.0.0.1:8091\")", self.media_upstream)
        })?;
        if up.port() == 0 || up.ip().is_unspecified() {
            return Err(format!("media_upstream: {up} is not an address to connect to"));
        }
        if self.media_secret.is_empty() || !self.media_secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("media_secret: must be set, visible ASCII without spaces".into());
        }
        if self.media_max_body == 0 {
            return Err("media_max_body: must be at least 1 byte".into());
        }
        if self.media_timeout.is_zero() {
            return Err("media_timeout: must be more than 0 s".into());
        }
        if self.media_idle_timeout.is_zero() {
            return Err("media_idle_timeout: must be more than 0 s".into());
        }
        if self.media_max_inflight == 0 {
            return Err("media_max_inflight: must be at least 1".into());
        }
        Ok(Some(up))
    }
}
