//! Engine configuration. The Python layer validates user config and builds this.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;

use crate::protocol::deflate::DeflateConfig;
use crate::protocol::frame::DecoderConfig;

/// Everything the engine needs to know; defaults match docs/operations.md.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// `0.0.0.0` (IPv4), `::` (IPv6 and, dual-stack, IPv4) or a specific address.
    pub host: String,
    /// 0 picks a free port (see `Engine::local_addr`).
    pub port: u16,
    /// SO_REUSEPORT, so several worker processes can share one port.
    pub reuse_port: bool,
    pub backlog: u32,
    /// Tokio worker threads; 0 = the CPU count.
    pub workers: usize,
    /// Path that accepts WebSocket upgrades; empty = any path.
    pub ws_path: String,
    /// Answered by the engine without Python: 200 while running, 503 while draining.
    pub health_path: String,
    /// Plain HTTP GET paths served from memory: path -> (content type, body).
    pub static_files: HashMap<String, (String, Bytes)>,
    /// Time for the client to send a complete request head.
    pub handshake_timeout: Duration,
    /// Time for the application to accept or reject an upgrade (the auth deadline).
    pub auth_timeout: Duration,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    pub decoder: DecoderConfig,
    pub deflate: DeflateConfig,
    /// Close a connection that sent nothing for this long (code 4000).
    pub idle_timeout: Duration,
    /// Send a WebSocket ping to a connection quiet for this long.
    pub ping_interval: Duration,
    /// Answer `{"op":"ping"}` text messages with `{"op":"pong",...}` in the engine.
    pub app_ping: bool,
    /// Bound of each connection's outbound queue, in bytes.
    pub queue_bytes: usize,
    /// SO_SNDBUF for client sockets; 0 leaves the kernel's autotuning.
    pub send_buffer: usize,
    /// Members per fan-out task: larger rooms are split across worker threads.
    pub fanout_chunk: usize,
    /// Events waiting for the application above this are shed (client messages first).
    pub event_queue_cap: usize,
    /// How long a closing connection waits for the peer's close frame.
    pub close_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".into(),
            port: 8080,
            reuse_port: false,
            backlog: 4096,
            workers: 0,
            ws_path: "/ws".into(),
            health_path: "/healthz".into(),
            static_files: HashMap::new(),
            handshake_timeout: Duration::from_secs(5),
            auth_timeout: Duration::from_secs(5),
            max_headers: 64,
            max_header_bytes: 8192,
            decoder: DecoderConfig::default(),
            deflate: DeflateConfig::default(),
            idle_timeout: Duration::from_secs(90),
            ping_interval: Duration::from_secs(30),
            app_ping: true,
            queue_bytes: 1 << 20,
            send_buffer: 0,
            fanout_chunk: 1024,
            event_queue_cap: 1 << 20,
            close_timeout: Duration::from_secs(2),
        }
    }
}
