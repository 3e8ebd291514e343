"""The embedded single-node broker: history in memory rings, delivery straight to the engine.

Nothing of it survives a restart of the process: history (a new random epoch per room, so
resumes answer ``recovered: false``), idempotency keys, and the mutes and bans returned
by :meth:`MemoryBroker.moderation` (kept for the life of the broker object only).
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from typing import Any

from ..protocol import splice
from .base import (
    Broker,
    BrokerHandler,
    BrokerStats,
    HistoryPolicy,
    HistoryResult,
    MemberDebounce,
    Presence,
    PublishResult,
)
from .commands import Command
from .idem import MAX_KEYS, IdempotencyMap
from .moderation import StateKey, in_force, sets_state, state_key


class _Ring:
    """One room's position (``epoch``, ``seq``) and its recent recoverable messages."""

    __slots__ = ("epoch", "items", "seq", "size", "touched", "ttl")

    def __init__(self, size: int) -> None:
        self.epoch = secrets.token_hex(4)
        self.seq = 0
        self.size = size
        self.items: deque[tuple[int, float, bytes]] = deque(maxlen=max(size, 1))
        self.ttl = 0.0
        self.touched = _monotonic()

    def resize(self, size: int) -> None:
        self.size = size
        self.items = deque(self.items, maxlen=max(size, 1))


_monotonic = time.monotonic

#: History size of a ring created by a join, before the room's first publish sets it.
_DEFAULT_SIZE = 50
#: Seconds between sweeps for rings of rooms without members and without live history.
_SWEEP_INTERVAL = 60.0


class MemoryPresence(Presence):
    """One node: counts are the handler's local counts (nothing is shared); member lists
    are not shared (:meth:`members` is None: use the local engine)."""

    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker
        self._reported: dict[str, tuple[int, int]] = {}

    @property
    def shared(self) -> bool:
        return False

    async def report(self, counts: dict[str, tuple[int, int]]) -> None:
        self._reported = counts

    async def counts(self, room: str) -> tuple[int, int]:
        """The handler's :meth:`~gateway.broker.base.BrokerHandler.local_counts`; before
        start and after close, the last reported counts."""
        h = self._broker._handler
        if h is not None:
            return h.local_counts(room)
        return self._reported.get(room, (0, 0))

    async def report_members(self, members: dict[str, list[dict[str, Any]]]) -> None:
        return None

    async def members(self, room: str) -> list[dict[str, Any]] | None:
        return None


class MemoryDebounce(MemberDebounce):
    """One node, no debounce: every join and every leave is a change (returns True at
    once), as the gateway reported them before there was a debounce. A user's second
    tab therefore runs ``after_join`` again, and a quick reconnect is a leave and a
    join."""

    @property
    def grace(self) -> float:
        return 0.0

    async def join(self, room: str | None, user: str) -> bool:
        return True

    async def leave(self, room: str | None, user: str) -> bool:
        return True


class MemoryBroker(Broker):
    """One node, no network. Epochs are random per process, so history never survives a
    restart and resumes after one answer ``recovered: false``.

    A room gets its epoch the first time it is joined or published to, so the epoch in a
    join ack is the one later messages carry (a client that joined an empty room and was
    then disconnected can still resume). Rooms nobody is in and whose history has expired
    are forgotten (bounded memory); their next epoch differs, which makes a late resume
    answer ``recovered: false`` as it must.

    Idempotency keys (:meth:`publish`, :meth:`send_user`) are kept in a bounded map:
    ``idempotency_ttl`` seconds, at most ``max_idempotency_keys`` (100,000) keys, the
    oldest evicted first when full.
    """

    def __init__(self, idempotency_ttl: float = 600.0, max_idempotency_keys: int = MAX_KEYS) -> None:
        self.stats = BrokerStats()
        self.presence: Presence = MemoryPresence(self)
        self.debounce: MemberDebounce = MemoryDebounce()
        self._idem: IdempotencyMap[PublishResult | bool] = IdempotencyMap(idempotency_ttl, max_idempotency_keys, lambda: _monotonic())
        self._moderation: dict[StateKey, Command] = {}
        self._handler: BrokerHandler | None = None
        self._rings: dict[str, _Ring] = {}
        self._counts: dict[str, tuple[int, int]] = {}
        self._subscribed: set[str] = set()
        self._next_sweep = _monotonic() + _SWEEP_INTERVAL

    async def start(self, handler: BrokerHandler, node_id: str) -> None:
        self._handler = handler

    async def close(self) -> None:
        self._handler = None

    def _ring(self, room: str, size: int | None) -> _Ring:
        """The room's ring, created on first use; ``size`` (when known) resizes it."""
        r = self._rings.get(room)
        if r is None:
            r = self._rings[room] = _Ring(_DEFAULT_SIZE if size is None else size)
        elif size is not None and r.size != size:
            r.resize(size)
        return r

    def _maybe_sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_INTERVAL
        subscribed = self._subscribed
        drop = []
        for room, r in self._rings.items():
            if room in subscribed:
                continue
            newest = r.items[-1][1] if r.items else r.touched + r.ttl
            if newest < now and r.touched + _SWEEP_INTERVAL < now:
                drop.append(room)
        for room in drop:
            del self._rings[room]

    async def publish(
        self, room: str, head: bytes, tail: bytes, prio: int, recoverable: bool, history: HistoryPolicy, idem: str | None = None,
        archive: tuple[str, str | None] | None = None,
    ) -> PublishResult:
        """See :meth:`Broker.publish`; ``archive`` is ignored (no archive log: the caller
        archives through the store's write-behind)."""
        if idem is not None:
            first = self._idem.get(("r", room, idem))
            if isinstance(first, PublishResult):
                return PublishResult(first.seq, first.epoch, True)
        handler = self._handler
        now = _monotonic()
        ring = self._rings.get(room)
        if ring is None or ring.size != history.size:
            ring = self._ring(room, history.size)
        ring.touched = now
        ring.ttl = history.ttl
        if history.epoch and ring.seq == 0:
            # A room whose messages are stored, new to this ring: the store's epoch...
            ring.epoch = history.epoch
        if history.floor > ring.seq:
            # ... and its numbering goes on from what the store holds.
            ring.seq = history.floor
            ring.items.clear()
        if recoverable and history.size > 0:
            ring.seq += 1
            frame = splice(head, ring.seq, ring.epoch, tail)
            ring.items.append((ring.seq, now + history.ttl, frame))
            result = PublishResult(ring.seq, ring.epoch)
        else:
            frame = splice(head, 0, ring.epoch, tail)
            result = PublishResult(0, ring.epoch)
        if idem is not None:
            self._idem.add(("r", room, idem), result)
        if handler is not None:
            handler.deliver_room(room, frame, prio)
        if now >= self._next_sweep:
            self._maybe_sweep(now)
        return result

    async def publish_frame(self, room: str, frame: bytes, prio: int) -> None:
        if self._handler is not None:
            self._handler.deliver_room(room, frame, prio)

    async def history(self, room: str, *, limit: int, since: int | None = None, epoch: str | None = None) -> HistoryResult:
        now = _monotonic()
        if now >= self._next_sweep:
            self._maybe_sweep(now)
        ring = self._ring(room, None)
        ring.touched = now
        items = ring.items
        while items and items[0][1] < now:
            items.popleft()
        if since is None:
            if limit <= 0 or not items:
                return HistoryResult([], ring.seq, ring.epoch, None)
            n = len(items)
            msgs = [items[i][2] for i in range(max(0, n - limit), n)]
            return HistoryResult(msgs, ring.seq, ring.epoch, None)
        if epoch != ring.epoch or since > ring.seq or since < 0:
            return HistoryResult([], ring.seq, ring.epoch, False)
        missed = [(s, f) for s, _, f in items if s > since]
        # Complete when nothing recoverable happened since, or the ring still holds the
        # message right after the client's position (seqs in the ring are consecutive).
        complete = since == ring.seq or (bool(missed) and missed[0][0] == since + 1)
        msgs = [f for _, f in missed[-limit:]] if limit > 0 else []
        return HistoryResult(msgs, ring.seq, ring.epoch, complete and len(msgs) == len(missed))

    async def subscribe(self, room: str) -> None:
        self._subscribed.add(room)

    async def unsubscribe(self, room: str) -> None:
        self._subscribed.discard(room)
        ring = self._rings.get(room)
        if ring is not None:
            ring.touched = _monotonic()

    async def send_user(self, user: str, payload: bytes, prio: int, idem: str | None = None) -> bool:
        if idem is not None:
            if self._idem.get(("u", user, idem)) is not None:
                return False
            self._idem.add(("u", user, idem), True)
        if self._handler is not None:
            self._handler.deliver_user(user, payload, prio)
        return True

    async def command(self, cmd: Command) -> None:
        key = state_key(cmd)
        if key is not None:
            if sets_state(cmd):
                self._moderation[key] = cmd
            else:
                self._moderation.pop(key, None)
        if self._handler is not None:
            self._handler.apply(cmd)

    async def moderation(self) -> list[Command]:
        """Mutes and bans issued through this broker object that are still in force
        (expired ones are pruned). Nothing survives a restart of the process."""
        now = time.time()
        for key in [k for k, c in self._moderation.items() if not in_force(c, now)]:
            del self._moderation[key]
        return list(self._moderation.values())
