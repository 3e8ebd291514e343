"""Pub/sub of the Redis broker: one connection per Redis server (per shard owner in
cluster mode) that holds this node's channels across reconnects, parsing of the room
message envelope, and the ``(S)SUBSCRIBE`` commands of a batch.

A connection reads with RESP2 (pub/sub messages are plain arrays), PINGs every
``ping_interval`` or at once when a command failed (:meth:`PubSubConn.probe`), and takes
the server for dead when no reply comes within ``probe_timeout``. It reconnects with
jittered exponential backoff and re-subscribes everything in :attr:`PubSubConn.channels`.
What a connection receives goes to its broker (``_on_message``, ``_on_subscribed``,
``_on_pubsub_up``/``_down``, ``_topology_changed``).
"""

from __future__ import annotations

import asyncio
import math
import random
import socket
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from redis.asyncio.connection import Connection
from redis.crc import key_slot
from redis.exceptions import ResponseError

from ..base import BrokerError

if TYPE_CHECKING:
    from .broker import RedisBroker


def sub_commands(chans: list[bytes], *, cluster: bool, sub: bool, batch_max: int) -> list[tuple[Any, ...]]:
    """``SUBSCRIBE``/``UNSUBSCRIBE`` commands for ``chans``, at most ``batch_max``
    channels each; in cluster mode ``SSUBSCRIBE``/``SUNSUBSCRIBE``, one slot per command."""
    if cluster:
        cmd = "SSUBSCRIBE" if sub else "SUNSUBSCRIBE"
        by_slot: dict[int, list[bytes]] = {}
        for ch in chans:
            by_slot.setdefault(key_slot(ch), []).append(ch)
        groups: Iterable[list[bytes]] = by_slot.values()
    else:
        cmd = "SUBSCRIBE" if sub else "UNSUBSCRIBE"
        groups = [chans]
    out: list[tuple[Any, ...]] = []
    for g in groups:
        for i in range(0, len(g), batch_max):
            out.append((cmd, *g[i : i + batch_max]))
    return out


def parse_room_message(data: bytes) -> tuple[bytes, int, int, bytes, bytes] | None:
    """``node|prio|seq|epoch|frame`` (published by ``publish.lua`` and
    ``publish_frame``) as (node, prio, seq, epoch, frame); None when malformed."""
    try:
        node, prio, seq, epoch, frame = data.split(b"|", 4)
        return node, int(prio), int(seq), epoch, frame
    except ValueError:
        return None


def frame_lag(frame: bytes, now: float) -> float | None:
    """Seconds since the publishing node's clock stamped ``frame`` (the envelope ends
    with ``,"ts":<ms>}``), or None without a stamp."""
    at = frame.rfind(b'"ts":')
    if at <= 0:
        return None
    try:
        return max(0.0, now - int(frame[at + 5 : -1]) / 1000)
    except ValueError:
        return None


class PubSubConn:
    """One pub/sub connection (per Redis server; per shard owner in cluster mode).

    ``channels`` is the set this connection must hold on the server; it survives
    reconnects, and every (re)connect subscribes to all of it.
    """

    def __init__(self, broker: RedisBroker, name: str, host: str | None, port: int | None) -> None:
        self.broker = broker
        self.name = name
        self.host = host
        self.port = port
        self.channels: set[bytes] = set()
        self.active: set[bytes] = set()
        self.pending_unsub: dict[bytes, int] = {}
        self.conn: Connection | None = None
        self.up = False
        self.last_rx = 0.0
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.connected_once = False
        self.probe_evt = asyncio.Event()

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        self.closed = True
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
        await self._drop()

    async def _drop(self) -> None:
        conn, self.conn = self.conn, None
        was_up, self.up = self.up, False
        self.active.clear()
        self.pending_unsub.clear()
        if conn is not None:
            try:
                await conn.disconnect(nowait=True)
            except Exception:
                pass
        if was_up:
            self.broker._on_pubsub_down(self)

    async def _run(self) -> None:
        b = self.broker
        delay = b.backoff_min
        while not self.closed:
            started = time.monotonic()
            try:
                await self._connect()
                delay = b.backoff_min
                await self._read_loop()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # connection lost or refused
                b._warn(f"pubsub:{self.name}", "redis pub/sub connection %s lost or refused: %s", self.name, e)
            await self._drop()
            if self.closed:
                return
            if time.monotonic() - started > 10:
                delay = b.backoff_min
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, b.backoff_max)

    async def _connect(self) -> None:
        b = self.broker
        if b.cluster and self.host is None:
            raise BrokerError("cluster node unknown")
        conn = b._make_connection(self.host, self.port)
        self.conn = conn
        await conn.connect()  # type: ignore[no-untyped-call]  # redis-py leaves Connection.connect unannotated
        sock = conn._writer.get_extra_info("socket") if conn._writer is not None else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                if sock.getsockname() == sock.getpeername():
                    # TCP simultaneous open to a dead local port: connected to ourselves.
                    raise ConnectionError("connected to itself (redis down on a local ephemeral port)")
            except OSError:
                pass
        self.last_rx = time.monotonic()
        # Up before the snapshot: a flush from now on sends its own deltas.
        self.up = True
        chans = list(self.channels)
        if chans:
            await conn.send_packed_command(conn.pack_commands(b._sub_commands(chans, sub=True)), check_health=False)
        first = not self.connected_once
        self.connected_once = True
        b._on_pubsub_up(self, first)

    async def _read_loop(self) -> None:
        conn = self.conn
        assert conn is not None
        b = self.broker
        on_msg = b._on_message
        pinger = asyncio.ensure_future(self._pinger(conn))
        try:
            while True:
                try:
                    msg = await conn.read_response(timeout=math.inf)
                except ResponseError as e:  # e.g. MOVED for SSUBSCRIBE during a resharding
                    b._warn(f"pubsub-err:{self.name}", "redis pub/sub error on %s: %s", self.name, e)
                    if b.cluster:
                        b._topology_changed()
                    continue
                self.last_rx = time.monotonic()
                if not isinstance(msg, list) or len(msg) < 3:
                    continue
                kind = msg[0]
                if kind == b"message" or kind == b"smessage":
                    on_msg(msg[1], msg[2])
                elif kind == b"subscribe" or kind == b"ssubscribe":
                    self.active.add(msg[1])
                    b._on_subscribed(msg[1])
                elif kind == b"unsubscribe" or kind == b"sunsubscribe":
                    ch = msg[1]
                    self.active.discard(ch)
                    n = self.pending_unsub.get(ch, 0)
                    if n > 1:
                        self.pending_unsub[ch] = n - 1
                    elif n == 1:
                        del self.pending_unsub[ch]
                    elif ch in self.channels:
                        # Not asked for: the slot moved (cluster resharding/failover).
                        self.channels.discard(ch)
                        b._topology_changed()
        finally:
            pinger.cancel()

    async def _pinger(self, conn: Connection) -> None:
        """PING every :attr:`RedisBroker.ping_interval`, or at once when a command failed
        (:meth:`probe`); no reply within :attr:`RedisBroker.probe_timeout` = dead."""
        b = self.broker
        while True:
            try:
                await asyncio.wait_for(self.probe_evt.wait(), b.ping_interval)
            except TimeoutError:
                pass
            self.probe_evt.clear()
            sent = time.monotonic()
            try:
                await conn.send_packed_command(conn.pack_command("PING"), check_health=False)
            except Exception:
                return
            await asyncio.sleep(b.probe_timeout)
            if self.last_rx < sent:
                b._warn(f"pubsub-dead:{self.name}", "redis pub/sub connection %s silent: reconnecting", self.name)
                try:
                    # Breaks the read loop: the next read fails on the closed stream.
                    await conn.disconnect(nowait=True)
                except Exception:
                    pass
                return

    def probe(self) -> None:
        if self.up:
            self.probe_evt.set()

    async def send(self, commands: list[tuple[Any, ...]]) -> None:
        conn = self.conn
        if not self.up or conn is None or not commands:
            return
        try:
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        except Exception as e:
            self.broker._warn(f"pubsub-send:{self.name}", "redis pub/sub send failed on %s: %s", self.name, e)
            try:
                await conn.disconnect(nowait=True)
            except Exception:
                pass
