"""The embedded single-node broker: history in memory rings, delivery straight to the engine."""

from __future__ import annotations

import secrets
import time
from collections import deque
from typing import Any

from ..protocol import splice
from .base import Broker, BrokerHandler, BrokerStats, HistoryPolicy, HistoryResult, PublishResult


class _Ring:
    __slots__ = ("epoch", "seq", "items")

    def __init__(self, size: int) -> None:
        self.epoch = secrets.token_hex(4)
        self.seq = 0
        self.items: deque[tuple[int, float, bytes]] = deque(maxlen=max(size, 1))


class MemoryBroker(Broker):
    """One node, no network. Epochs are random per process, so history never survives a
    restart and resumes after one answer ``recovered: false``."""

    def __init__(self) -> None:
        self.stats = BrokerStats()
        self._handler: BrokerHandler | None = None
        self._rings: dict[str, _Ring] = {}
        self._counts: dict[str, tuple[int, int]] = {}

    async def start(self, handler: BrokerHandler, node_id: str) -> None:
        self._handler = handler

    async def close(self) -> None:
        self._handler = None

    def _ring(self, room: str, size: int) -> _Ring:
        r = self._rings.get(room)
        if r is None:
            r = self._rings[room] = _Ring(size)
        elif r.items.maxlen != max(size, 1):
            r.items = deque(r.items, maxlen=max(size, 1))
        return r

    async def publish(self, room: str, head: bytes, tail: bytes, prio: int, recoverable: bool, history: HistoryPolicy) -> PublishResult:
        handler = self._handler
        if recoverable and history.size > 0:
            ring = self._ring(room, history.size)
            ring.seq += 1
            frame = splice(head, ring.seq, ring.epoch, tail)
            ring.items.append((ring.seq, time.monotonic() + history.ttl, frame))
            result = PublishResult(ring.seq, ring.epoch)
        else:
            ring = self._rings.get(room)
            epoch = ring.epoch if ring else ""
            frame = splice(head, 0, epoch, tail)
            result = PublishResult(0, epoch)
        if handler is not None:
            handler.deliver_room(room, frame, prio)
        return result

    async def publish_frame(self, room: str, frame: bytes, prio: int) -> None:
        if self._handler is not None:
            self._handler.deliver_room(room, frame, prio)

    async def history(self, room: str, *, limit: int, since: int | None = None, epoch: str | None = None) -> HistoryResult:
        ring = self._rings.get(room)
        if ring is None:
            if since is None:
                return HistoryResult([], 0, "", None)
            # Nothing was ever kept here: only a client that saw nothing is complete.
            return HistoryResult([], 0, "", since == 0 and not epoch)
        now = time.monotonic()
        while ring.items and ring.items[0][1] < now:
            ring.items.popleft()
        if since is None:
            msgs = [f for _, _, f in list(ring.items)[-limit:]] if limit > 0 else []
            return HistoryResult(msgs, ring.seq, ring.epoch, None)
        if epoch != ring.epoch or since > ring.seq:
            return HistoryResult([], ring.seq, ring.epoch, False)
        missed = [(s, f) for s, _, f in ring.items if s > since]
        complete = since == ring.seq or (bool(missed) and missed[0][0] == since + 1)
        msgs = [f for _, f in missed[-limit:]] if limit > 0 else []
        return HistoryResult(msgs, ring.seq, ring.epoch, complete and len(msgs) == len(missed))

    async def subscribe(self, room: str) -> None:
        return None

    async def unsubscribe(self, room: str) -> None:
        return None

    async def send_user(self, user: str, payload: bytes, prio: int) -> None:
        if self._handler is not None:
            self._handler.deliver_user(user, payload, prio)

    async def control(self, kind: str, data: dict[str, Any]) -> None:
        if self._handler is not None:
            self._handler.control(kind, data)

    async def report_presence(self, counts: dict[str, tuple[int, int]]) -> None:
        self._counts = counts

    async def presence(self, room: str) -> tuple[int, int]:
        return self._counts.get(room, (0, 0))
