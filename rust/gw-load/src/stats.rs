//! Statistics: a cheap log-linear histogram and the per-thread counters the
//! event loops publish for the coordinator.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Sub-buckets per power of two: values are kept with a relative error of
/// at most 1/32 (~3%), which is plenty for latency percentiles.
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
/// Enough buckets for any u64 value.
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

/// Log-linear histogram of u64 values (we record microseconds).
/// Recording is a couple of integer operations and one increment.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: vec![0; BUCKETS].into_boxed_slice(), total: 0, max: 0 }
    }
}

#[inline]
fn bucket_of(v: u64) -> usize {
    if v < SUB {
        v as usize
    } else {
        let msb = 63 - v.leading_zeros(); // >= SUB_BITS
        let shift = msb - SUB_BITS;
        let sub = (v >> shift) & (SUB - 1);
        ((shift as u64 + 1) * SUB + sub) as usize
    }
}

/// Lowest value that falls into bucket `b`.
fn bucket_low(b: usize) -> u64 {
    let b = b as u64;
    if b < SUB {
        b
    } else {
        let shift = b / SUB - 1;
        let sub = b % SUB;
        (SUB + sub) << shift
    }
}

/// Highest value that falls into bucket `b`.
fn bucket_high(b: usize) -> u64 {
    if b + 1 >= BUCKETS {
        u64::MAX
    } else {
        bucket_low(b + 1) - 1
    }
}

impl Histogram {
    #[inline]
    pub fn record(&mut self, v: u64) {
        self.counts[bucket_of(v)] += 1;
        self.total += 1;
        if v > self.max {
            self.max = v;
        }
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += *b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// Value at quantile `q` (0..=1): the midpoint of the bucket holding the
    /// q-th value, capped at the exact maximum (which q = 1 returns). 0 for
    /// an empty histogram.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        if rank == self.total {
            return self.max;
        }
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let lo = bucket_low(b);
                let hi = bucket_high(b);
                return (lo + (hi - lo) / 2).min(self.max);
            }
        }
        self.max
    }
}

/// Counters one event-loop thread publishes (relaxed stores, once per loop
/// iteration) so the coordinator can follow progress. Padded to its own
/// cache line(s) to avoid false sharing between threads.
#[derive(Default)]
#[repr(align(128))]
pub struct SharedCounters {
    /// Receiver connections that became established (joined); never
    /// decremented, see `lost`.
    pub ready: AtomicU64,
    /// Publisher connections fully established (joined).
    pub pub_ready: AtomicU64,
    /// Slow-consumer receivers (--slow) that joined.
    pub slow_ready: AtomicU64,
    /// Connection attempts that failed before becoming ready.
    pub failed: AtomicU64,
    /// Receiver connections lost after becoming ready.
    pub lost: AtomicU64,
    /// Publisher connections lost after becoming ready.
    pub pub_lost: AtomicU64,
    /// Room messages received by receivers (all phases).
    pub received_total: AtomicU64,
    /// Publishes sent (all phases).
    pub published_total: AtomicU64,
    /// Publish acks received (all phases).
    pub acks_total: AtomicU64,
}

/// Plain per-thread counters; mirrored into [`SharedCounters`].
#[derive(Default, Clone, Debug)]
pub struct Counters {
    pub ready: u64,
    pub pub_ready: u64,
    pub slow_ready: u64,
    pub failed: u64,
    pub lost: u64,
    pub pub_lost: u64,
    pub received_total: u64,
    pub published_total: u64,
    pub acks_total: u64,
    /// Bytes read from slow consumers at the end (what the server had sent).
    pub slow_bytes: u64,
    // Measured phase only:
    /// Room messages received by receiver connections.
    pub received: u64,
    /// Room messages received by publisher connections (their own echo).
    pub pub_received: u64,
    /// Publishes sent.
    pub published: u64,
    pub acks: u64,
    pub errors: u64,
    /// Latency samples without a parsable `"t"`.
    pub no_t: u64,
}

impl Counters {
    pub fn publish_to(&self, s: &SharedCounters) {
        s.ready.store(self.ready, Relaxed);
        s.pub_ready.store(self.pub_ready, Relaxed);
        s.slow_ready.store(self.slow_ready, Relaxed);
        s.failed.store(self.failed, Relaxed);
        s.lost.store(self.lost, Relaxed);
        s.pub_lost.store(self.pub_lost, Relaxed);
        s.received_total.store(self.received_total, Relaxed);
        s.published_total.store(self.published_total, Relaxed);
        s.acks_total.store(self.acks_total, Relaxed);
    }

    pub fn add(&mut self, o: &Counters) {
        self.ready += o.ready;
        self.pub_ready += o.pub_ready;
        self.slow_ready += o.slow_ready;
        self.slow_bytes += o.slow_bytes;
        self.failed += o.failed;
        self.lost += o.lost;
        self.pub_lost += o.pub_lost;
        self.received_total += o.received_total;
        self.published_total += o.published_total;
        self.acks_total += o.acks_total;
        self.received += o.received;
        self.pub_received += o.pub_received;
        self.published += o.published;
        self.acks += o.acks;
        self.errors += o.errors;
        self.no_t += o.no_t;
    }
}

/// Sum of the shared counters of all threads, as read by the coordinator.
#[derive(Default, Debug, Clone, Copy)]
pub struct Snapshot {
    pub ready: u64,
    pub pub_ready: u64,
    pub slow_ready: u64,
    pub failed: u64,
    pub lost: u64,
    pub pub_lost: u64,
    pub received_total: u64,
    pub published_total: u64,
    pub acks_total: u64,
}

impl Snapshot {
    pub fn read(all: &[SharedCounters]) -> Snapshot {
        let mut s = Snapshot::default();
        for c in all {
            s.ready += c.ready.load(Relaxed);
            s.pub_ready += c.pub_ready.load(Relaxed);
            s.slow_ready += c.slow_ready.load(Relaxed);
            s.failed += c.failed.load(Relaxed);
            s.lost += c.lost.load(Relaxed);
            s.pub_lost += c.pub_lost.load(Relaxed);
            s.received_total += c.received_total.load(Relaxed);
            s.published_total += c.published_total.load(Relaxed);
            s.acks_total += c.acks_total.load(Relaxed);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_monotonic() {
        for b in 0..BUCKETS - 1 {
            assert_eq!(bucket_high(b) + 1, bucket_low(b + 1), "bucket {b}");
            assert_eq!(bucket_of(bucket_low(b)), b);
            assert_eq!(bucket_of(bucket_high(b)), b);
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_within_relative_error() {
        let mut h = Histogram::default();
        for v in 1..=100_000u64 {
            h.record(v);
        }
        for (q, exact) in [(0.5, 50_000.0), (0.9, 90_000.0), (0.99, 99_000.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - exact).abs() / exact < 0.035, "q{q}: {got} vs {exact}");
        }
        assert_eq!(h.quantile(1.0), 100_000);
        assert_eq!(h.max(), 100_000);
        let mut h2 = Histogram::default();
        h2.record(0);
        h2.merge(&h);
        assert_eq!(h2.count(), 100_001);
        assert_eq!(h2.quantile(0.0), 0);
        assert_eq!(Histogram::default().quantile(0.5), 0);
    }
}
