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
    writev_calls,
    dropped_low,
    dropped_normal,
    dropped_high,
    /// Frames discarded because their connection was already closing.
    dropped_closed,
    batches,
    /// Server messages compressed (once per window size, shared by recipients).
    deflate_compressions,
    pings_sent,
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
