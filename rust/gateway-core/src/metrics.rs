//! Counters as relaxed atomics: written on the hot path, read at scrape time.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Engine counters. Every field is monotonic except the `*_current` gauges.
        #[derive(Default)]
        pub struct Counters { $($(#[$doc])* pub $name: AtomicU64,)* }

        impl Counters {
            /// (name, value) pairs, for the metrics collector.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Relaxed)),)*]
            }
        }
    };
}

counters! {
    /// Open WebSocket connections (gauge).
    connections_current,
    /// Rooms with at least one local member (gauge).
    rooms_current,
    /// TCP connections accepted.
    tcp_accepted,
    /// accept() failed (EMFILE and friends).
    accept_errors,
    /// Upgrades completed (101 sent).
    connects,
    /// Upgrades the application rejected (auth and the like).
    connects_rejected,
    /// The application did not decide within the auth deadline.
    connects_auth_timeout,
    handshake_timeout,
    handshake_bad_request,
    handshake_too_large,
    handshake_not_found,
    /// TLS handshakes completed: full, and resumed from a ticket or session id.
    tls_handshakes_full,
    tls_handshakes_resumed,
    /// TLS handshakes failed, by reason (see `tls::Failure`).
    tls_fail_timeout,
    tls_fail_eof,
    tls_fail_http,
    tls_fail_not_tls,
    tls_fail_version,
    tls_fail_params,
    tls_fail_alert,
    tls_fail_alpn,
    tls_fail_other,
    /// Records that failed on an established TLS connection (it is closed).
    tls_errors,
    /// Certificate reloads that took effect / failed (the old certificate stays).
    tls_reloads_ok,
    tls_reloads_error,
    /// PROXY protocol: malformed headers, and connections from peers not in
    /// `server.trusted_proxies` on a listener that expects one.
    proxy_bad_header,
    proxy_untrusted,
    /// Plain HTTP requests answered (health, static files).
    http_requests,
    disconnects,
    /// Disconnects by reason.
    close_client,
    close_protocol_error,
    close_too_big,
    close_invalid_utf8,
    close_idle,
    close_slow_consumer,
    close_server,
    close_io_error,
    messages_in,
    bytes_in,
    /// Client messages handed to the application.
    messages_to_app,
    /// Client messages shed because the application's event queue was full.
    messages_shed,
    app_pings,
    publishes,
    /// Frames queued to connections (one per recipient; a batch frame counts once).
    deliveries,
    /// Logical messages delivered (a batch of 20 counts 20 per recipient).
    deliveries_logical,
    frames_out,
    bytes_out,
    /// Socket writes (vectored), by I/O tasks and by fan-outs writing directly.
    writev_calls,
    /// The subset of `writev_calls` made by a fan-out straight into an idle member's socket.
    direct_writes,
    /// Direct writes the socket took only partly; the I/O task sends the rest.
    direct_partial,
    dropped_low,
    dropped_normal,
    dropped_high,
    /// Frames discarded because their connection was already closing.
    dropped_closed,
    batches,
    /// Server messages compressed (once per window size, shared by recipients).
    deflate_compressions,
    pings_sent,
    /// Sockets the engine holds: handshakes, plain HTTP requests and open connections
    /// (gauge; the node cap `limits_max_conns` applies to it).
    sockets_current,
    /// Pongs (WebSocket and `{"op":"pong"}`) that replaced one still waiting to be sent.
    pongs_coalesced,
    /// Client messages refused by the per-connection rate limit (error 4029).
    rate_limited,
    /// Connections closed with 4029 for going on over the rate limit.
    closed_abuse,
    /// Times a connection stopped being read: its events waited for the application over
    /// its share, or a reply could not be written (TCP backpressure to the client).
    read_paused,
    /// Queued messages of connections already gone, dropped at poll.
    events_discarded,
    /// Connect requests older than the auth deadline, dropped at poll (already answered 503).
    connects_expired,
    /// Sockets refused (HTTP 503) because the node holds `limits_max_conns` sockets.
    conns_refused_node,
    /// Sockets refused (HTTP 429) over `limits_max_conns_per_ip`.
    conns_refused_ip,
    /// Sockets refused (HTTP 429) over `limits_max_handshakes_per_ip`.
    handshakes_refused_ip,
    /// Upgrades refused (HTTP 429) at accept over `limits_max_conns_per_user`.
    conns_refused_user,
    /// Times the accept loop paused because refused sockets would eat the reserved fds.
    accept_paused,
    /// Joins refused over `limits_max_rooms_per_conn` / `limits_max_rooms`.
    rooms_refused_conn,
    rooms_refused_node,
    /// HTTP requests under `media_prefix` (relayed or refused).
    media_relay_requests,
    /// Media requests refused, by reason: Content-Length over `media_max_body` (413),
    /// chunked / Transfer-Encoding (411), a bad Content-Length (400), over
    /// `media_max_inflight` (503), upstream unreachable or closed without an answer (502),
    /// the deadline or idle timeout (408/504, or cut once answering), draining (503).
    media_relay_refused_too_large,
    media_relay_refused_length_required,
    media_relay_refused_bad_request,
    media_relay_refused_busy,
    media_relay_refused_upstream,
    media_relay_refused_timeout,
    media_relay_refused_draining,
    /// Relays ended because the client went away (the upstream connection is dropped).
    media_relay_client_gone,
    /// Request body bytes passed to the upstream / response bytes passed to the client.
    media_relay_bytes_in,
    media_relay_bytes_out,
    /// Relays in flight (gauge; `media_max_inflight` applies to it).
    media_relay_inflight_current,
}

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

pub fn dec(c: &AtomicU64) {
    c.fetch_sub(1, Relaxed);
}

/// Upper bounds (seconds) of the latency histogram buckets: 10 µs .. 10 s.
pub const LATENCY_BUCKETS: [f64; 18] =
    [1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// A fixed-bucket histogram of durations, lock-free. Observations are made per fan-out
/// round or per socket write, never per delivery.
pub struct Histogram {
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { counts: std::array::from_fn(|_| AtomicU64::new(0)), sum_ns: AtomicU64::new(0) }
    }
}

fn bucket_of(ns: u64) -> usize {
    let s = ns as f64 * 1e-9;
    LATENCY_BUCKETS.iter().position(|b| s <= *b).unwrap_or(LATENCY_BUCKETS.len())
}

impl Histogram {
    pub fn observe_ns(&self, ns: u64) {
        self.counts[bucket_of(ns)].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// Add what a thread gathered on its own (one atomic per touched bucket).
    pub fn merge(&self, local: &LocalHistogram) {
        for (c, n) in self.counts.iter().zip(local.counts) {
            if n > 0 {
                c.fetch_add(n, Relaxed);
            }
        }
        if local.sum_ns > 0 {
            self.sum_ns.fetch_add(local.sum_ns, Relaxed);
        }
    }

    /// (cumulative counts per bucket bound incl. +Inf last, sum in seconds).
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, f64) {
        let mut acc = 0;
        let mut out = Vec::with_capacity(self.counts.len());
        for (i, c) in self.counts.iter().enumerate() {
            acc += c.load(Relaxed);
            out.push((LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), acc));
        }
        (out, self.sum_ns.load(Relaxed) as f64 * 1e-9)
    }
}

/// Observations gathered without atomics during one loop, then merged into a
/// [`Histogram`] at once (a fan-out samples once per socket write).
#[derive(Default)]
pub struct LocalHistogram {
    counts: [u64; LATENCY_BUCKETS.len() + 1],
    sum_ns: u64,
}

impl LocalHistogram {
    pub fn observe_ns(&mut self, ns: u64) {
        self.counts[bucket_of(ns)] += 1;
        self.sum_ns += ns;
    }
}

/// Engine histograms.
#[derive(Default)]
pub struct Histograms {
    /// Duration of one fan-out round of a room (queueing to every member).
    pub fanout: Histogram,
    /// Lag from publish (frame built) to the socket write that sent it, sampled per write.
    pub flush_lag: Histogram,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe_ns(5_000); // 5 µs -> first bucket
        h.observe_ns(2_000_000); // 2 ms -> the 2.5 ms bucket
        h.observe_ns(60_000_000_000); // 60 s -> +Inf
        let (b, sum) = h.snapshot();
        assert_eq!(b[0], (1e-5, 1));
        assert_eq!(b.iter().find(|(le, _)| *le == 2.5e-3).unwrap().1, 2);
        assert_eq!(b.last().unwrap(), &(f64::INFINITY, 3));
        assert!((sum - 60.002005).abs() < 1e-6);
    }
}
