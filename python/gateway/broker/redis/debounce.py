"""The cross-node join/leave debounce of the hooks, on Redis.

Keys (``P`` = prefix; ``scope`` is the room, or ``~user`` for connect/disconnect)::

    P:{scope}:c:USER  hash  node instance -> connections of USER (TTL a day)
    P:{scope}:g:USER  pending-leave marker (TTL leave_grace + 60 s)
    P:{nodes}:hb      hash  node instance -> heartbeat deadline_ms

A user's connections are counted per node instance (node id + a random suffix: a node
restarted under the same id is another instance). Every node beats ``P:{nodes}:hb``
every ``node_timeout / 4`` and learns from the same call which instances missed their
deadline; counts of such a gone instance (a crashed node) are ignored and removed by the
next join or leave of that user, so they cannot hold back the user's leaves for good. A
graceful stop removes its instance from the hash (its clients' leaves went through the
debounce during the drain), so only crashed instances are listed (for a day, the
lifetime of the counts).
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from ..base import MemberDebounce
from . import scripts

if TYPE_CHECKING:
    from .broker import RedisBroker

#: Lifetime of the counts and of a gone instance's heartbeat entry (ms).
MEMBER_TTL_MS = 86_400_000


class RedisDebounce(MemberDebounce):
    """Join and leave counted across nodes; a leave waits ``broker.leave_grace``."""

    def __init__(self, broker: RedisBroker) -> None:
        self._b = broker
        #: This process's instance id (set at start) and the instances seen gone at the
        #: last heartbeat.
        self.instance = b""
        self.gone: list[bytes] = []
        self.hb_task: asyncio.Task[None] | None = None
        self._hb_key = f"{broker.prefix}:{{nodes}}:hb".encode()

    @property
    def grace(self) -> float:
        return max(0.0, self._b.cfg.leave_grace)

    def start(self, node: bytes) -> None:
        self.instance = node + b"/" + os.urandom(4).hex().encode()
        self.hb_task = asyncio.ensure_future(self._heartbeat_loop())

    async def close(self) -> None:
        """Leave the heartbeat hash (a graceful stop is never listed as gone); stop beating."""
        b = self._b
        if b.ready and self.instance:
            try:
                await b._redis.hdel(self._hb_key, self.instance)
            except (TimeoutError, RedisError, OSError):
                pass
        if self.hb_task is not None:
            self.hb_task.cancel()

    def _keys(self, room: str | None, user: str) -> list[bytes]:
        scope = room if room is not None else "~" + user
        base = f"{self._b.prefix}:{{{scope}}}:"
        return [(base + "c:" + user).encode(), (base + "g:" + user).encode()]

    async def heartbeat(self, timeout_ms: int) -> None:
        gone = await self._b._eval(scripts.HEARTBEAT, [self._hb_key], [self.instance, timeout_ms, MEMBER_TTL_MS])
        self.gone = [g for g in gone if g != self.instance]

    async def _heartbeat_loop(self) -> None:
        """Renew this instance's deadline every ``node_timeout / 4`` and learn which
        instances are gone (their debounce counts are then ignored)."""
        b = self._b
        timeout = max(0.05, b.cfg.node_timeout)
        while not b.closed:
            if b.ready:
                try:
                    await self.heartbeat(int(timeout * 1000))
                except (TimeoutError, RedisError, OSError) as e:
                    b._warn("heartbeat", "node heartbeat failed: %s", e)
            await asyncio.sleep(timeout / 4)

    async def join(self, room: str | None, user: str) -> bool:
        """True when this is a real join for hooks: the user was nowhere in the room, and
        did not just leave it (within ``leave_grace``, on any node). One round trip.
        Raises :class:`~gateway.broker.base.BrokerError`."""
        b = self._b
        b._check("member_join")
        try:
            args = [self.instance, MEMBER_TTL_MS, *self.gone]
            return int(await b._eval(scripts.MEMBER_JOIN, self._keys(room, user), args)) == 1
        except (TimeoutError, RedisError, OSError) as e:
            raise b._fail("member_join", e) from None

    async def leave(self, room: str | None, user: str) -> bool:
        """Waits ``leave_grace`` when it was the user's last connection, then returns True
        on exactly one node when the user did not come back anywhere. Raises
        :class:`~gateway.broker.base.BrokerError`."""
        b = self._b
        b._check("member_leave")
        keys = self._keys(room, user)
        token = os.urandom(8).hex()
        grace = self.grace
        try:
            pending = await b._eval(scripts.MEMBER_LEAVE, keys, [self.instance, int(grace * 1000) + 60_000, token, *self.gone])
        except (TimeoutError, RedisError, OSError) as e:
            raise b._fail("member_leave", e) from None
        if int(pending) != 1:
            return False
        await asyncio.sleep(grace)
        b._check("member_leave")
        try:
            return int(await b._eval(scripts.MEMBER_CONFIRM, keys, [token, *self.gone])) == 1
        except (TimeoutError, RedisError, OSError) as e:
            raise b._fail("member_leave", e) from None
