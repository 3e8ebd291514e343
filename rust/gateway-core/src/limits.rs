//! Per-client limits the engine enforces itself: sockets and handshakes per IP address,
//! the node's connection cap and the per-connection token bucket for client messages.

use std::collections::HashMap;
use std::net::IpAddr;

use parking_lot::Mutex;

const SHARDS: usize = 16;

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, what a dual-stack listener reports for
/// IPv4 clients) count as the IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[derive(Default, Clone, Copy)]
struct PerIp {
    /// Sockets held for this address (handshakes and open connections).
    socks: u32,
    /// Of those, still in their HTTP handshake or waiting for the auth decision.
    handshakes: u32,
}

/// Why a new socket is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum IpRefusal {
    Conns,
    Handshakes,
}

/// Sockets and handshakes per client address. An entry lives only while its address
/// holds a socket, so the table never outgrows the node's socket cap.
pub struct IpTable {
    shards: Box<[Mutex<HashMap<IpAddr, PerIp>>]>,
    max_socks: u32,
    max_handshakes: u32,
}

impl IpTable {
    pub fn new(max_socks: usize, max_handshakes: usize) -> Self {
        let cap = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            max_socks: cap(max_socks),
            max_handshakes: cap(max_handshakes),
        }
    }

    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, PerIp>> {
        let h = match ip {
            IpAddr::V4(a) => u32::from(*a) as usize,
            IpAddr::V6(a) => (u128::from(*a) ^ (u128::from(*a) >> 64)) as usize,
        };
        &self.shards[h.wrapping_mul(0x9E37_79B9) >> 7 & (SHARDS - 1)]
    }

    /// Admit a new socket (in its handshake) from `ip`, or say which cap it is over.
    pub fn open(&self, ip: IpAddr) -> Result<(), IpRefusal> {
        let mut m = self.shard(&ip).lock();
        let cur = m.get(&ip).copied().unwrap_or_default();
        if cur.socks >= self.max_socks {
            return Err(IpRefusal::Conns);
        }
        if cur.handshakes >= self.max_handshakes {
            return Err(IpRefusal::Handshakes);
        }
        let e = m.entry(ip).or_default();
        e.socks += 1;
        e.handshakes += 1;
        Ok(())
    }

    /// The socket's handshake ended (upgraded or not).
    pub fn handshake_done(&self, ip: IpAddr) {
        if let Some(e) = self.shard(&ip).lock().get_mut(&ip) {
            e.handshakes = e.handshakes.saturating_sub(1);
        }
    }

    /// The socket is closed.
    pub fn close(&self, ip: IpAddr) {
        let mut m = self.shard(&ip).lock();
        if let Some(e) = m.get_mut(&ip) {
            e.socks = e.socks.saturating_sub(1);
            if e.socks == 0 {
                m.remove(&ip);
            }
        }
    }

    /// (sockets, handshakes) held by `ip`.
    pub fn get(&self, ip: IpAddr) -> (u32, u32) {
        self.shard(&ip).lock().get(&ip).map_or((0, 0), |e| (e.socks, e.handshakes))
    }

    /// Addresses with at least one socket.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Token bucket for one connection's data messages, refilled on the engine's 10 ms
/// clock. Lives in the connection task (no lock, no atomics).
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f32,
    last_tick: u32,
    /// Refusals since the last admitted message.
    pub refused: u32,
}

impl Bucket {
    pub fn new(burst: u32, now_tick: u32) -> Self {
        Self { tokens: burst as f32, last_tick: now_tick, refused: 0 }
    }

    /// Take a token for one message: true = admitted. `rate` <= 0 means no limit.
    pub fn admit(&mut self, rate: f64, burst: u32, now_tick: u32) -> bool {
        if rate <= 0.0 {
            return true;
        }
        let dt = now_tick.wrapping_sub(self.last_tick);
        if dt > 0 {
            self.last_tick = now_tick;
            self.tokens = (self.tokens + (f64::from(dt) * rate / 100.0) as f32).min(burst as f32);
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused = 0;
            true
        } else {
            self.refused += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_caps_and_ipv4_mapped_addresses() {
        let t = IpTable::new(3, 2);
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped = canonical("::ffff:10.0.0.1".parse().unwrap());
        assert_eq!(mapped, v4);
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(canonical(v6), v6);
        assert_eq!(t.open(v4), Ok(()));
        assert_eq!(t.open(mapped), Ok(()));
        assert_eq!(t.open(v4), Err(IpRefusal::Handshakes));
        t.handshake_done(v4);
        assert_eq!(t.open(v4), Ok(()));
        assert_eq!(t.get(v4), (3, 2));
        t.handshake_done(v4);
        t.handshake_done(v4);
        assert_eq!(t.open(v4), Err(IpRefusal::Conns));
        assert_eq!(t.open(v6), Ok(()), "other addresses are not affected");
        for _ in 0..3 {
            t.close(v4);
        }
        t.close(v6);
        assert!(t.is_empty(), "no entry outlives its sockets");
    }

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let mut b = Bucket::new(10, 0);
        assert!((0..10).all(|_| b.admit(50.0, 10, 0)));
        assert!(!b.admit(50.0, 10, 0));
        assert!(!b.admit(50.0, 10, 1)); // 10 ms at 50/s = half a token
        assert_eq!(b.refused, 2);
        assert!(b.admit(50.0, 10, 2)); // 20 ms = one token
        assert_eq!(b.refused, 0);
        assert!((0..10).all(|_| b.admit(50.0, 10, 1000)), "refilled up to the burst only");
        assert!(!b.admit(50.0, 10, 1000));
        assert!((0..1000).all(|_| b.admit(0.0, 10, 1000)), "rate 0: no limit");
    }
}
