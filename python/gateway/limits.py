"""Rate limits: token buckets, alone or keyed by string with bounded memory.

Synchronous and allocation-light, for the per-message hot path; use them from the event
loop thread (nothing here is thread-safe).
"""

from __future__ import annotations

from itertools import islice

__all__ = ["RateLimiter", "TokenBucket"]

# Tolerance for float drift when refills add up to exactly one token.
_EPS = 1e-9
_ONE = 1.0 - _EPS


class TokenBucket:
    """A single token bucket: ``rate`` tokens per second, at most ``burst`` stored.

    Starts full. Use :class:`RateLimiter` for many keys.
    """

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        """Create a full bucket at time ``now`` (any monotonic clock, seconds)."""
        self.rate = rate
        self.burst = max(1, burst)
        self.tokens = float(self.burst)
        self.last = now

    def allow(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if available; ``rate <= 0`` always allows."""
        if self.rate <= 0:
            return True
        t = self.tokens + (now - self.last) * self.rate
        if t > self.burst:
            t = self.burst
        self.last = now
        if t >= cost - _EPS:
            self.tokens = t - cost
            return True
        self.tokens = t
        return False


class RateLimiter:
    """Token buckets keyed by string with bounded memory.

    Each key's bucket remembers its rate and burst. When a new key arrives and the
    table is full, or at most every ``sweep_interval`` seconds, buckets that have
    refilled completely are dropped (a full bucket is equivalent to no bucket, so this
    is lossless); if the table is still full, the oldest keys are dropped.
    """

    __slots__ = ("_b", "_last_sweep", "max_keys", "sweep_interval")

    def __init__(self, max_keys: int = 100_000, sweep_interval: float = 60.0) -> None:
        """``max_keys`` bounds the number of buckets kept."""
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.max_keys = max_keys
        self.sweep_interval = sweep_interval
        # key -> [tokens, last, rate, burst]
        self._b: dict[str, list[float]] = {}
        self._last_sweep: float | None = None

    def __len__(self) -> int:
        return len(self._b)

    def allow(self, key: str, rate: float, burst: int, now: float) -> bool:
        """Take one token from ``key``'s bucket; ``rate <= 0`` always allows.

        ``now`` is a monotonic time in seconds; ``burst`` < 1 is treated as 1.
        """
        if rate <= 0:
            return True
        b = self._b.get(key)
        if b is None:
            if burst < 1:
                burst = 1
            self._insert(key, [burst - 1.0, now, rate, burst], now)
            return True
        t = b[0] + (now - b[1]) * rate
        if t > burst:
            t = burst
        b[1] = now
        b[2] = rate
        b[3] = burst
        if t >= _ONE:
            b[0] = t - 1.0
            return True
        b[0] = t
        return False

    def _insert(self, key: str, bucket: list[float], now: float) -> None:
        b = self._b
        if self._last_sweep is None:
            self._last_sweep = now
        if len(b) >= self.max_keys or now - self._last_sweep >= self.sweep_interval:
            self.sweep(now)
            if len(b) >= self.max_keys:
                drop = max(1, self.max_keys // 10)
                for k in list(islice(b, drop)):
                    del b[k]
        b[key] = bucket

    def sweep(self, now: float) -> int:
        """Drop buckets that are full again at ``now``; return how many were dropped."""
        self._last_sweep = now
        b = self._b
        idle = [k for k, (tok, last, rate, burst) in b.items() if tok + (now - last) * rate >= burst]
        for k in idle:
            del b[k]
        return len(idle)
