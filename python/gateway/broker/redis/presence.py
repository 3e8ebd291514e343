"""Presence on Redis: room counts and small rooms' member lists summed over live nodes.

Keys (``P`` = prefix)::

    P:{room}:p    hash  node -> "conns users deadline_ms"   (TTL presence_ttl)
    P:{room}:ml   hash  node -> {"exp": <unix s>, "m": [...]} (TTL presence_ttl)
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError

from ..base import Presence
from . import scripts

if TYPE_CHECKING:
    from .broker import RedisBroker


class RedisPresence(Presence):
    """Each node writes its counts per room with a deadline (``presence_ttl``, judged by
    Redis' clock) and reads the sum over nodes whose deadline has not passed; a dead
    node's counts vanish within ``presence_ttl``. Every method raises
    :class:`~gateway.broker.base.BrokerError` while Redis is unreachable."""

    #: How long :meth:`counts` reuses the sums fetched by :meth:`report` (seconds).
    cache_ttl = 1.0

    def __init__(self, broker: RedisBroker) -> None:
        self._b = broker
        self._sent: set[str] = set()
        self._cache: dict[str, tuple[float, tuple[int, int]]] = {}
        self._members_sent: set[str] = set()

    @property
    def shared(self) -> bool:
        return True

    def _key(self, room: str) -> bytes:
        return f"{self._b.prefix}:{{{room}}}:p".encode()

    def _members_key(self, room: str) -> bytes:
        return f"{self._b.prefix}:{{{room}}}:ml".encode()

    async def report(self, counts: dict[str, tuple[int, int]]) -> None:
        """One pipelined round trip for all rooms; a room this node no longer reports is
        removed from its hash at once. The sums read back serve :meth:`counts` for
        :attr:`cache_ttl`."""
        b = self._b
        b._check("report_presence")
        ttl = max(1, int(b.cfg.presence_ttl * 1000))
        gone = self._sent - counts.keys()
        rooms = list(counts) + list(gone)
        now = time.monotonic()
        try:
            pipe = b._redis.pipeline(transaction=False)
            for room in rooms:
                c, u = counts.get(room, (0, 0))
                pipe.eval(scripts.PRESENCE.text, 1, self._key(room), b.node_b, c, u, ttl)
            res = await pipe.execute(raise_on_error=False)
        except (TimeoutError, RedisError, OSError) as e:
            raise b._fail("report_presence", e) from None
        failed = 0
        for room, r in zip(rooms, res, strict=False):
            if isinstance(r, Exception):
                failed += 1
                continue
            self._cache[room] = (now, (int(r[0]), int(r[1])))
        self._sent = set(counts)
        for room in gone:
            self._cache.pop(room, None)
        if len(self._cache) > 4 * len(counts) + 1000:
            self._cache = {r: v for r, v in self._cache.items() if now - v[0] < self.cache_ttl}
        if failed:
            raise b._fail("report_presence", RedisError(f"{failed} of {len(rooms)} rooms failed"))

    async def counts(self, room: str) -> tuple[int, int]:
        hit = self._cache.get(room)
        if hit is not None and time.monotonic() - hit[0] < self.cache_ttl:
            return hit[1]
        b = self._b
        b._check("presence")
        try:
            r = await b._eval(scripts.PRESENCE, [self._key(room)], ["", 0, 0, 0])
        except (TimeoutError, RedisError, OSError) as e:
            raise b._fail("presence", e) from None
        return int(r[0]), int(r[1])

    async def report_members(self, members: dict[str, list[dict[str, Any]]]) -> None:
        """One hash per small room, one field per node: ``{"exp": <unix s>, "m": [...]}``.
        Readers skip fields whose ``exp`` passed, so a dead node's members vanish within
        ``presence_ttl``; rooms this node no longer reports are removed from the hash."""
        b = self._b
        b._check("report_members")
        ttl = b.cfg.presence_ttl
        gone = self._members_sent - members.keys()
        exp = time.time() + ttl
        try:
            pipe = b._redis.pipeline(transaction=False)
            for room, ms in members.items():
                key = self._members_key(room)
                pipe.hset(key, b.node_b, orjson.dumps({"exp": exp, "m": ms}))
                pipe.pexpire(key, max(1, int(ttl * 1000)))
            for room in gone:
                pipe.hdel(self._members_key(room), b.node_b)
            await pipe.execute()
        except (TimeoutError, RedisError, OSError) as e:
            raise b._fail("report_members", e) from None
        self._members_sent = set(members)

    async def members(self, room: str) -> list[dict[str, Any]] | None:
        b = self._b
        b._check("members")
        try:
            fields = await b._redis.hgetall(self._members_key(room))
        except (TimeoutError, RedisError, OSError) as e:
            raise b._fail("members", e) from None
        now = time.time()
        out: list[dict[str, Any]] = []
        for node, raw in sorted(fields.items()):
            try:
                entry = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if entry.get("exp", 0) < now:
                continue
            name = node.decode() if isinstance(node, bytes) else str(node)
            out.extend({**m, "node": name} for m in entry.get("m", ()))
        return out
