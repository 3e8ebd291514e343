"""A bounded map of idempotency keys with a time to live (used by the memory broker, and
by the Redis broker for what it delivered locally while Redis was unreachable)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")

#: Default cap on the number of keys kept.
MAX_KEYS = 100_000


class IdempotencyMap(Generic[V]):
    """Keys seen within ``ttl`` seconds and the value stored with each.

    Bounded: at most ``max_keys`` keys; when full, the oldest key is evicted first (it
    may not have expired yet, so a retry later than ``max_keys`` newer keys is no longer
    recognised). Expired keys are removed as new ones are added (oldest first, so the
    cost per call is constant on average). ``clock`` is injectable for tests.
    """

    __slots__ = ("_clock", "_items", "max_keys", "ttl")

    def __init__(self, ttl: float, max_keys: int = MAX_KEYS, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl <= 0 or max_keys <= 0:
            raise ValueError("ttl and max_keys must be > 0")
        self.ttl = ttl
        self.max_keys = max_keys
        self._clock = clock
        self._items: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> V | None:
        """The value stored with ``key`` if it was added less than ``ttl`` ago."""
        hit = self._items.get(key)
        if hit is None:
            return None
        if hit[0] <= self._clock():
            del self._items[key]
            return None
        return hit[1]

    def add(self, key: Hashable, value: V) -> None:
        """Remember ``key`` for ``ttl`` seconds from now (a present key is renewed)."""
        now = self._clock()
        items = self._items
        items.pop(key, None)
        while items:
            oldest = next(iter(items.values()))
            if oldest[0] > now and len(items) < self.max_keys:
                break
            items.popitem(last=False)
        items[key] = (now + self.ttl, value)

    def discard(self, key: Hashable) -> None:
        self._items.pop(key, None)
