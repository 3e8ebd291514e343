"""The Redis broker: many nodes share rooms, users, presence and history through Redis 7+.

Keys and channels (``P`` = ``broker.prefix``; ``{room}`` is a Redis Cluster hash tag, so
every key of a room and its channel live in one slot)::

    P:{room}:s        hash  seq, epoch            (TTL: 1 day after the last message)
    P:{room}:h        stream  <seq>-0 -> frame     (MAXLEN history.size, TTL history.ttl)
    P:{room}:m        channel  node|prio|seq|epoch|frame
    P:{room}:p        hash  node -> "conns users deadline_ms"   (TTL presence_ttl)
    P:{room}:c:USER   hash  node instance -> connections of USER in room (hook debounce)
    P:{room}:g:USER   pending-leave marker (hook debounce)
    P:{nodes}:hb      hash  node instance -> heartbeat deadline_ms (hook debounce)
    P:ctl             channel  node|json  (send_user, kick, mute, ban, close_room, ...)

Hook debounce: a user's connections in a room are counted per node instance; every node
beats ``P:{nodes}:hb`` every ``node_timeout / 4`` and learns from the same call which
instances missed their deadline. Counts of such a gone instance (a crashed node) are
ignored and removed by the next join or leave of that user, so they cannot hold back the
user's leaves for good. A graceful stop removes its instance from the hash (its clients'
leaves went through the debounce during the drain), so only crashed instances are listed
(for a day, the lifetime of the counts).

A room message costs ONE round trip: ``EVALSHA`` of :data:`PUBLISH_LUA`, which assigns the
seq (a new random epoch whenever the seq key was lost), splices it into the frame,
appends it to the stream and publishes it on the room channel (``SPUBLISH`` with
``cluster = true``). The publishing node delivers locally from the reply (the same bytes,
via :func:`gateway.protocol.splice`) and ignores its own echo. Every node re-orders what it
delivers by seq (waiting at most :attr:`RedisBroker.reorder_wait` for a gap), so a room's
messages reach local members in seq order even when two nodes publish at once.

A node subscribes to a room channel only while it has local members; subscribe and
unsubscribe requests are coalesced for :attr:`RedisBroker.batch_delay` into one
``SUBSCRIBE``/``UNSUBSCRIBE`` per connection (per slot in cluster mode), and
:meth:`RedisBroker.subscribe` returns once Redis confirmed the subscription.

Failure: while the pub/sub connection is down the broker is "open" (``ready`` is False):
publishes deliver locally and raise :class:`BrokerError` at once, without touching the
network; everything else raises :class:`BrokerError` at once. Commands use short socket
timeouts and no retries. The pub/sub connection reconnects with jittered exponential
backoff and re-subscribes every channel this node needs. See docs/scaling.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import random
import socket
import time
from collections.abc import Iterable
from typing import Any

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..config import BrokerConfig
from ..protocol import splice
from .base import (
    Broker,
    BrokerError,
    BrokerHandler,
    BrokerStats,
    HistoryPolicy,
    HistoryResult,
    PublishResult,
)

log = logging.getLogger("gateway.broker.redis")

__all__ = ["HISTORY_LUA", "PRESENCE_LUA", "PUBLISH_LUA", "RedisBroker"]

# ---- Lua scripts -------------------------------------------------------------------------

#: KEYS: state hash, stream, channel. ARGV: head, tail, origin node, prio, recoverable
#: ("1"/"0"), maxlen, history ttl ms, epoch candidate, state ttl ms, sharded ("1"/"0").
#: Returns {seq, epoch}; publishes ``node|prio|seq|epoch|frame``.
PUBLISH_LUA = r"""
local seq = 0
local epoch
if ARGV[5] == '1' then
  seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  epoch = redis.call('HGET', KEYS[1], 'epoch')
  if seq == 1 or not epoch then
    -- the room is new or its state was lost: history is gone, start a new epoch
    epoch = ARGV[8]
    redis.call('HSET', KEYS[1], 'epoch', epoch)
    redis.call('DEL', KEYS[2])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[9])
else
  epoch = redis.call('HGET', KEYS[1], 'epoch') or ''
end
local frame = ARGV[1] .. seq .. ',"epoch":"' .. epoch .. '"' .. ARGV[2]
if seq > 0 then
  local id = seq .. '-0'
  local ok = redis.pcall('XADD', KEYS[2], 'MAXLEN', ARGV[6], id, 'f', frame)
  if type(ok) == 'table' and ok.err then
    redis.call('DEL', KEYS[2])
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[6], id, 'f', frame)
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
end
local msg = ARGV[3] .. '|' .. ARGV[4] .. '|' .. seq .. '|' .. epoch .. '|' .. frame
if ARGV[10] == '1' then
  redis.call('SPUBLISH', KEYS[3], msg)
else
  redis.call('PUBLISH', KEYS[3], msg)
end
return {seq, epoch}
"""

#: KEYS: state hash, stream. ARGV: limit, since ("" = last K), client epoch.
#: Returns {seq, epoch, recovered (-1 none, 0, 1, -2 no state), frames...}.
HISTORY_LUA = r"""
local st = redis.call('HMGET', KEYS[1], 'seq', 'epoch')
local seq = tonumber(st[1])
local epoch = st[2]
if not seq or not epoch then
  return {0, '', -2}
end
local limit = tonumber(ARGV[1])
if ARGV[2] == '' then
  local out = {seq, epoch, -1}
  if limit > 0 then
    local items = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', limit)
    for i = #items, 1, -1 do out[#out + 1] = items[i][2][2] end
  end
  return out
end
local since = tonumber(ARGV[2])
if ARGV[3] ~= epoch or since > seq or since < 0 then
  return {seq, epoch, 0}
end
if since == seq then
  return {seq, epoch, 1}
end
local items = redis.call('XRANGE', KEYS[2], (since + 1) .. '-0', '+')
local n = #items
local complete = 0
if n > 0 and tonumber(string.match(items[1][1], '^(%d+)')) == since + 1 then
  complete = 1
end
local first = 1
if limit <= 0 then
  first = n + 1
elseif n > limit then
  first = n - limit + 1
end
if first > 1 then complete = 0 end
local out = {seq, epoch, complete}
for i = first, n do out[#out + 1] = items[i][2][2] end
return out
"""

#: KEYS: presence hash. ARGV: node ("" = read only), conns, users, ttl ms.
#: Returns {conns, users} summed over live nodes (deadline judged by Redis' clock).
PRESENCE_LUA = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] ~= '' then
  if tonumber(ARGV[2]) > 0 then
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. (now + tonumber(ARGV[4])))
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
  else
    redis.call('HDEL', KEYS[1], ARGV[1])
  end
end
local all = redis.call('HGETALL', KEYS[1])
local c, u = 0, 0
for i = 1, #all, 2 do
  local a, b, d = string.match(all[i + 1], '^(%d+) (%d+) (%d+)$')
  if d and tonumber(d) >= now then
    c = c + tonumber(a)
    u = u + tonumber(b)
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return {c, u}
"""

#: Shared by the debounce scripts: sum KEYS[1]'s per-instance counts, removing those of
#: gone instances (ARGV from index ``first`` on).
_SUM_LIVE = r"""
local function live_total(first)
  local gone = {}
  for i = first, #ARGV do gone[ARGV[i]] = true end
  local total = 0
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if gone[all[i]] then redis.call('HDEL', KEYS[1], all[i]) else total = total + tonumber(all[i + 1]) end
  end
  return total
end
"""

#: KEYS: counts, marker. ARGV: instance, safety ttl ms, gone instances... 1 = a real join,
#: 0 = already present or a reconnect within the grace period.
MEMBER_JOIN_LUA = _SUM_LIVE + r"""
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if live_total(3) == 1 then
  if redis.call('DEL', KEYS[2]) == 1 then return 0 end
  return 1
end
return 0
"""

#: KEYS: counts, marker. ARGV: instance, marker ttl ms, token, gone instances... 1 = the
#: last connection left: the caller owns the pending leave (confirm after the grace period).
MEMBER_LEAVE_LUA = _SUM_LIVE + r"""
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
if live_total(4) > 0 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
return 1
"""

#: KEYS: counts, marker. ARGV: token, gone instances... 1 = the leave is real (nobody
#: came back).
MEMBER_CONFIRM_LUA = _SUM_LIVE + r"""
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
if live_total(2) > 0 then return 0 end
return 1
"""

#: KEYS: heartbeat hash. ARGV: instance, timeout ms, forget ms. Renews
#: this instance's deadline (Redis' clock) and returns the instances past theirs; entries
#: gone for longer than ``forget`` are dropped (debounce counts expire before that).
HEARTBEAT_LUA = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], now + tonumber(ARGV[2]))
local gone = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local d = tonumber(all[i + 1])
  if d < now - tonumber(ARGV[3]) then
    redis.call('HDEL', KEYS[1], all[i])
  elseif d < now and all[i] ~= ARGV[1] then
    gone[#gone + 1] = all[i]
  end
end
return gone
"""


class _Script:
    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


_PUBLISH = _Script(PUBLISH_LUA)
_HISTORY = _Script(HISTORY_LUA)
_PRESENCE = _Script(PRESENCE_LUA)
_M_JOIN = _Script(MEMBER_JOIN_LUA)
_M_LEAVE = _Script(MEMBER_LEAVE_LUA)
_M_CONFIRM = _Script(MEMBER_CONFIRM_LUA)
_HEARTBEAT = _Script(HEARTBEAT_LUA)

_STATE_TTL_MS = 86_400_000  # seq/epoch survive a day of silence
_MEMBER_TTL_MS = 86_400_000
_USER_KIND = "__user__"


class _Order:
    """Per-room re-ordering state: deliver recoverable messages in seq order. ``last``
    is None until the room's position was read after subscribing."""

    __slots__ = ("epoch", "held", "last", "timer")

    def __init__(self, epoch: bytes | None, last: int | None) -> None:
        self.epoch = epoch
        self.last = last
        self.held: dict[int, tuple[bytes, bytes, int]] = {}
        self.timer: asyncio.TimerHandle | None = None


class _PubSub:
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
        await conn.connect()
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
            except asyncio.TimeoutError:
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


class RedisBroker(Broker):
    """Cross-node broker on Redis 7+ (single server or Redis Cluster with sharded pub/sub)."""

    #: Seconds subscribe/unsubscribe requests are coalesced.
    batch_delay = 0.002
    #: Channels per SUBSCRIBE command.
    batch_max = 1000
    #: Longest wait of :meth:`subscribe` for Redis' confirmation.
    subscribe_timeout = 2.0
    #: Socket timeouts of commands (override with ``?socket_timeout=`` in the URL).
    socket_timeout = 1.0
    connect_timeout = 1.0
    #: Pub/sub reconnect backoff (seconds, jittered, doubling).
    backoff_min = 0.05
    backoff_max = 2.0
    #: PING on the pub/sub connection this often (and right after a command failed); no
    #: reply within ``probe_timeout`` = dead: the circuit opens and the node reconnects.
    ping_interval = 5.0
    probe_timeout = 1.0
    #: How long a message waits for an earlier seq of its room before being delivered.
    reorder_wait = 0.05
    #: How long :meth:`presence` reuses the sums fetched by :meth:`report_presence`.
    presence_cache = 1.0
    #: Seconds between rate-limited log lines of one kind.
    log_every = 10.0

    def __init__(self, cfg: BrokerConfig) -> None:
        self.cfg = cfg
        self.cluster = bool(cfg.cluster)
        self.stats = BrokerStats(connected=False)
        self.stats.extra.update(pubsub_messages=0, subscribed_rooms=0, reorder_holds=0, reorder_timeouts=0, commands_failed=0)
        p = cfg.prefix
        if "{" in p or "}" in p or "|" in p:
            raise BrokerError("broker.prefix must not contain '{', '}' or '|'")
        self._p = p
        self._url_kwargs = dict(parse_url(cfg.url))
        self._handler: BrokerHandler | None = None
        self._node = ""
        self._node_b = b""
        #: This process's identity for the hook debounce (node id + a random suffix: a
        #: node restarted under the same id is another instance) and the instances seen
        #: gone at the last heartbeat.
        self._inst = b""
        self._gone: list[bytes] = []
        self._hb_task: asyncio.Task[None] | None = None
        self._hb_key = f"{p}:{{nodes}}:hb".encode()
        self._members_sent: set[str] = set()
        self._redis: Any = None
        self._ps: dict[str, _PubSub] = {}
        self._ch_conn: dict[bytes, _PubSub] = {}
        self._ctl = f"{p}:ctl".encode()
        self._wanted: dict[bytes, str] = {}  # channel -> room, rooms with local members
        self._dirty: set[bytes] = set()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self._order: dict[str, _Order] = {}
        self._need_base: set[bytes] = set()
        self._base_task: asyncio.Task[None] | None = None
        self._keys: dict[str, tuple[bytes, bytes, bytes]] = {}
        self._pres_sent: set[str] = set()
        self._pres_cache: dict[str, tuple[float, tuple[int, int]]] = {}
        self._log_last: dict[str, tuple[float, int]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._topo_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._sharded = b"1" if self.cluster else b"0"

    # ---- lifecycle -----------------------------------------------------------------------

    def _timeouts(self) -> dict[str, Any]:
        kw = self._url_kwargs
        return dict(
            socket_timeout=kw.get("socket_timeout", self.socket_timeout),
            socket_connect_timeout=kw.get("socket_connect_timeout", self.connect_timeout),
        )

    def _make_connection(self, host: str | None, port: int | None) -> Connection:
        kw: dict[str, Any] = {k: v for k, v in self._url_kwargs.items() if k not in ("connection_class", "max_connections")}
        cls = self._url_kwargs.get("connection_class", Connection)
        kw.update(self._timeouts())
        if host is not None:
            kw["host"], kw["port"] = host, port
        if self.cluster:
            kw.pop("db", None)
        # RESP2: pub/sub messages are plain arrays (RESP3 routes them through redis-py's
        # push-notification handlers, which cost a str() of every message).
        kw.update(retry=Retry(NoBackoff(), 0), health_check_interval=0, protocol=2, client_name=f"gw-ps-{self._node}"[:60])
        return cls(**kw)  # type: ignore[no-any-return]

    async def start(self, handler: BrokerHandler, node_id: str) -> None:
        from ._compat import HandlerShim

        handler = HandlerShim(handler)  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        self._handler = handler
        self._node = node_id.replace("|", "_")
        self._node_b = self._node.encode()
        self._inst = self._node_b + b"/" + os.urandom(4).hex().encode()
        to = self._timeouts()
        if self.cluster:
            self._redis = RedisCluster.from_url(
                self.cfg.url, retry=Retry(NoBackoff(), 1), **to,
            )
            try:
                await asyncio.wait_for(self._redis.initialize(), 2 * to["socket_connect_timeout"] + 1)
            except Exception as e:
                self._warn("start", "redis cluster %s unreachable at start (will keep trying): %s", self.cfg.url, e)
                self._topology_changed()
        else:
            pool = BlockingConnectionPool.from_url(
                self.cfg.url, max_connections=self._url_kwargs.get("max_connections", 64), timeout=to["socket_timeout"],
                retry=Retry(NoBackoff(), 0), health_check_interval=0, **to,
            )
            self._redis = Redis(connection_pool=pool)
            ps = self._ps[""] = _PubSub(self, "redis", None, None)
            ps.channels.add(self._ctl)
            self._ch_conn[self._ctl] = ps
            ps.start()
        if self.cluster and self._redis is not None and self._redis.nodes_manager.slots_cache:
            self._place_all()
        # Wait briefly for the first connection so a healthy start is ready at once.
        deadline = time.monotonic() + to["socket_connect_timeout"] + 0.5
        while not self.ready and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if not self.ready:
            log.error("redis broker %s not reachable: starting degraded (local delivery only) and retrying", self._safe_url())
        self._hb_task = asyncio.ensure_future(self._heartbeat_loop())

    def _safe_url(self) -> str:
        kw = self._url_kwargs
        return f"{kw.get('host', kw.get('path', '?'))}:{kw.get('port', '')}"

    async def close(self) -> None:
        if self._closed:
            return
        if self.ready:
            # A graceful stop drained its clients (their leaves went through the debounce):
            # leave the heartbeat hash, so this instance is never listed as gone.
            try:
                await self._redis.hdel(self._hb_key, self._inst)
            except (TimeoutError, RedisError, OSError):
                pass
        self._closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        for t in list(self._tasks) + [x for x in (self._topo_task, self._base_task, self._hb_task) if x is not None]:
            t.cancel()
        for ps in list(self._ps.values()):
            await ps.close()
        self._ps.clear()
        for o in self._order.values():
            if o.timer is not None:
                o.timer.cancel()
        self._wake_all()
        if self._redis is not None:
            try:
                await self._redis.aclose()
            except Exception:
                pass
        self._handler = None
        self.stats.connected = False

    @property
    def ready(self) -> bool:
        ps = self._ch_conn.get(self._ctl)
        return ps is not None and ps.up and not self._closed

    # ---- logging and accounting ----------------------------------------------------------

    def _warn(self, key: str, msg: str, *args: Any) -> None:
        """Log at most once per :attr:`log_every` seconds per ``key``."""
        now = time.monotonic()
        last, suppressed = self._log_last.get(key, (0.0, 0))
        if now - last >= self.log_every:
            if suppressed:
                msg += f" ({suppressed} similar messages suppressed)"
            log.warning(msg, *args)
            self._log_last[key] = (now, 0)
        else:
            self._log_last[key] = (last, suppressed + 1)

    def _fail(self, what: str, e: BaseException | None) -> BrokerError:
        self.stats.extra["commands_failed"] += 1
        if e is None:
            return BrokerError("redis unavailable")
        if isinstance(e, (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)):
            # Is Redis gone (no RST: partition, hung server)? Check now rather than at
            # the next PING, so that later calls fail fast instead of each timing out.
            for ps in list(self._ps.values()):
                ps.probe()
        self._warn(f"cmd:{what}", "redis %s failed: %s: %s", what, type(e).__name__, e)
        return BrokerError(f"redis {what} failed: {type(e).__name__}")

    # ---- pub/sub bookkeeping -------------------------------------------------------------

    def _on_pubsub_up(self, ps: _PubSub, first: bool) -> None:
        if not first:
            self.stats.reconnects += 1
            log.info("redis pub/sub %s reconnected; resubscribed %d channels", ps.name, len(ps.channels))
        if ps is self._ch_conn.get(self._ctl) or not self.cluster:
            self._spawn(self._load_scripts(drop_pool=not first and not self.cluster))
        self.stats.connected = self.ready

    def _on_pubsub_down(self, ps: _PubSub) -> None:
        self.stats.connected = self.ready
        if self._closed:
            return
        self._warn(f"down:{ps.name}", "redis pub/sub %s down: cross-node delivery paused, local delivery continues", ps.name)
        # Nobody waits for a confirmation that cannot come; the reconnect resubscribes.
        for ch in list(self._waiters):
            if self._ch_conn.get(ch) is ps:
                self._wake(ch)
        if self.cluster:
            self._topology_changed()

    def _wake(self, ch: bytes) -> None:
        for f in self._waiters.pop(ch, ()):
            if not f.done():
                f.set_result(None)

    def _wake_all(self) -> None:
        for ch in list(self._waiters):
            self._wake(ch)

    def _sub_commands(self, chans: list[bytes], sub: bool) -> list[tuple[Any, ...]]:
        if self.cluster:
            cmd = "SSUBSCRIBE" if sub else "SUNSUBSCRIBE"
            by_slot: dict[int, list[bytes]] = {}
            for ch in chans:
                by_slot.setdefault(key_slot(ch), []).append(ch)
            groups: Iterable[list[bytes]] = by_slot.values()
        else:
            cmd = "SUBSCRIBE" if sub else "UNSUBSCRIBE"
            groups = [chans]
        out: list[tuple[Any, ...]] = []
        n = self.batch_max
        for g in groups:
            for i in range(0, len(g), n):
                out.append((cmd, *g[i:i + n]))
        return out

    def _owner(self, ch: bytes) -> _PubSub | None:
        """The pub/sub connection that must hold ``ch`` (cluster: the slot's primary)."""
        if not self.cluster:
            return self._ps[""]
        try:
            node = self._redis.get_node_from_key(ch)
        except Exception:
            return None
        if node is None:
            return None
        ps = self._ps.get(node.name)
        if ps is None:
            ps = self._ps[node.name] = _PubSub(self, node.name, node.host, int(node.port))
            if not self._closed:
                ps.start()
        return ps

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and self._loop is not None and not self._closed:
            self._flush_handle = self._loop.call_later(self.batch_delay, self._flush)

    def _flush(self) -> None:
        """Send the coalesced subscription changes: one command per connection (per slot)."""
        self._flush_handle = None
        dirty, self._dirty = self._dirty, set()
        subs: dict[_PubSub, list[bytes]] = {}
        unsubs: dict[_PubSub, list[bytes]] = {}
        for ch in dirty:
            cur = self._ch_conn.get(ch)
            if ch in self._wanted or ch == self._ctl:
                owner = self._owner(ch)
                if owner is None:
                    continue  # cluster slot unknown: placed on the next topology refresh
                if cur is not None and cur is not owner:
                    cur.channels.discard(ch)
                    unsubs.setdefault(cur, []).append(ch)
                if ch not in owner.channels:
                    owner.channels.add(ch)
                    subs.setdefault(owner, []).append(ch)
                elif ch in owner.active:
                    self._on_subscribed(ch)  # re-subscribed within the batch window
                self._ch_conn[ch] = owner
            elif cur is not None:
                del self._ch_conn[ch]
                if ch in cur.channels:
                    cur.channels.discard(ch)
                    unsubs.setdefault(cur, []).append(ch)
        for ps, chans in unsubs.items():
            if ps.up:
                for ch in chans:
                    ps.pending_unsub[ch] = ps.pending_unsub.get(ch, 0) + 1
        for ps in set(subs) | set(unsubs):
            cmds = self._sub_commands(unsubs.get(ps, []), sub=False) + self._sub_commands(subs.get(ps, []), sub=True)
            if ps.up and cmds:
                self._spawn(ps.send(cmds))
            elif not ps.up and ps.connected_once:
                # Reconnecting: nobody waits; the reconnect subscribes (a fresh connection
                # still being opened confirms as usual).
                for ch in subs.get(ps, ()):
                    self._wake(ch)
        self.stats.extra["subscribed_rooms"] = len(self._wanted)

    def _place_all(self) -> None:
        self._dirty.update(self._wanted)
        self._dirty.add(self._ctl)
        self._flush()

    def _topology_changed(self) -> None:
        """Cluster: refresh the slot map, then move channels to their current owners."""
        if not self.cluster or self._closed or (self._topo_task is not None and not self._topo_task.done()):
            return
        self._topo_task = asyncio.ensure_future(self._refresh_topology())

    async def _refresh_topology(self) -> None:
        delay = self.backoff_min
        while not self._closed:
            try:
                await asyncio.sleep(delay * (0.5 + random.random()))
                await self._redis.nodes_manager.initialize()
                self._place_all()
                # Close connections that hold nothing any more.
                for name, ps in list(self._ps.items()):
                    if not ps.channels and not any(c is ps for c in self._ch_conn.values()):
                        del self._ps[name]
                        self._spawn(ps.close())
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._warn("topology", "redis cluster topology refresh failed: %s", e)
                delay = min(delay * 2, self.backoff_max)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ---- receiving -----------------------------------------------------------------------

    def _on_message(self, ch: bytes, data: bytes) -> None:
        h = self._handler
        if h is None:
            return
        self.stats.extra["pubsub_messages"] += 1
        if ch == self._ctl:
            self._on_control(data)
            return
        room = self._wanted.get(ch)
        if room is None:
            return  # unsubscribing: no local members any more
        try:
            node, prio, seq, epoch, frame = data.split(b"|", 4)
        except ValueError:
            return
        if node == self._node_b:
            return  # our own echo: delivered locally already
        # Lag from the publishing node's clock: the envelope ends with ,"ts":<ms>}.
        at = frame.rfind(b'"ts":')
        if at > 0:
            try:
                self.stats.observe_lag(max(0.0, time.time() - int(frame[at + 5 : -1]) / 1000))
            except ValueError:
                pass
        try:
            self._sequenced(room, int(seq), epoch, frame, int(prio))
        except Exception:
            log.exception("delivering a message of %s failed", room)

    def _on_control(self, data: bytes) -> None:
        node, _, body = data.partition(b"|")
        if node == self._node_b:
            return
        try:
            m = orjson.loads(body)
            kind, d = m["k"], m["d"]
            self._apply_control(kind, d)
        except Exception:
            log.exception("bad or failing control message")

    def _apply_control(self, kind: str, d: dict[str, Any]) -> None:
        h = self._handler
        if h is None:
            return
        if kind == _USER_KIND:
            h.deliver_user(d["user"], d["frame"].encode(), int(d["prio"]))
        else:
            h.control(kind, d)

    def _sequenced(self, room: str, seq: int, epoch: bytes, frame: bytes, prio: int) -> None:
        """Deliver a room's recoverable messages in seq order.

        The order starts from the room's seq read right after the subscription became
        active (:meth:`_fetch_bases`); until then messages are held. A gap (a message
        still on its way on the other connection, or lost while Redis was unreachable)
        holds later messages for at most :attr:`reorder_wait`."""
        h = self._handler
        if h is None:
            return
        if seq == 0:
            h.deliver_room(room, frame, prio)
            return
        o = self._order.get(room)
        if o is None:
            o = self._order[room] = _Order(None, None)
        if o.last is None:
            self._hold(room, o, seq, epoch, frame, prio)
            return
        if o.epoch != epoch:
            if o.epoch is not None:
                # History was lost (new epoch): the new epoch counts from 1.
                self._release(room, o)
                o.last = 0
            o.epoch = epoch
        last = o.last
        if seq == last + 1:
            o.last = seq
            h.deliver_room(room, frame, prio)
            if o.held:
                self._drain(room, o)
            return
        if seq <= last:
            h.deliver_room(room, frame, prio)  # late (after a gap timeout): still delivered once
            return
        self._hold(room, o, seq, epoch, frame, prio)

    def _hold(self, room: str, o: _Order, seq: int, epoch: bytes, frame: bytes, prio: int) -> None:
        o.held[seq] = (epoch, frame, prio)
        self.stats.extra["reorder_holds"] += 1
        if o.timer is None and self._loop is not None:
            o.timer = self._loop.call_later(self.reorder_wait, self._gap_timeout, room)

    def _drain(self, room: str, o: _Order) -> None:
        """Deliver held messages that are due: late ones, then consecutive ones."""
        h = self._handler
        held = o.held
        assert h is not None and o.last is not None
        for s in sorted(held):
            ep, f, p = held[s]
            if ep != o.epoch:
                continue
            if s <= o.last:
                del held[s]
                h.deliver_room(room, f, p)
            elif s == o.last + 1:
                del held[s]
                o.last = s
                h.deliver_room(room, f, p)
            else:
                break
        if not held and o.timer is not None:
            o.timer.cancel()
            o.timer = None

    def _release(self, room: str, o: _Order) -> None:
        """Deliver everything held, in seq order, whatever the gaps."""
        h = self._handler
        if o.timer is not None:
            o.timer.cancel()
            o.timer = None
        held, o.held = o.held, {}
        if h is None:
            return
        for s in sorted(held):
            ep, f, p = held[s]
            h.deliver_room(room, f, p)
            if ep == o.epoch or o.epoch is None:
                o.epoch = ep
                o.last = s if o.last is None else max(o.last, s)

    def _gap_timeout(self, room: str) -> None:
        o = self._order.get(room)
        if o is None:
            return
        o.timer = None
        if o.held:
            self.stats.extra["reorder_timeouts"] += 1
            self._release(room, o)

    def _set_base(self, room: str, seq: int, epoch: bytes | None) -> None:
        o = self._order.get(room)
        if o is None:
            o = self._order[room] = _Order(None, None)
        if o.last is None or epoch is None or o.epoch != epoch or seq > o.last:
            if epoch is not None and o.epoch is not None and epoch != o.epoch:
                # Messages held from an older epoch go first.
                for s in sorted(o.held):
                    if o.held[s][0] != epoch and self._handler is not None:
                        _, f, p = o.held.pop(s)
                        self._handler.deliver_room(room, f, p)
            o.epoch, o.last = epoch, seq
        if o.held:
            if o.epoch is None:
                # The room had no state when read: adopt the epoch of what arrived.
                o.epoch = o.held[min(o.held)][0]
            self._drain(room, o)

    def _on_subscribed(self, ch: bytes) -> None:
        if ch == self._ctl or ch not in self._wanted:
            self._wake(ch)
            return
        self._need_base.add(ch)
        if self._base_task is None or self._base_task.done():
            self._base_task = asyncio.ensure_future(self._fetch_bases())

    async def _fetch_bases(self) -> None:
        """Read the seq of rooms whose subscription just became active (one pipelined
        round trip per batch), then release :meth:`subscribe` callers."""
        await asyncio.sleep(0)
        while self._need_base and not self._closed:
            chans, self._need_base = list(self._need_base), set()
            rooms = [(ch, r) for ch in chans if (r := self._wanted.get(ch)) is not None]
            try:
                pipe = self._redis.pipeline(transaction=False)
                for _, room in rooms:
                    pipe.hmget(self._room_keys(room)[0], "seq", "epoch")
                res = await pipe.execute(raise_on_error=False)
            except Exception as e:
                self._warn("base", "reading room positions failed: %s", e)
                res = [e] * len(rooms)
            for (ch, room), r in zip(rooms, res, strict=False):
                if ch in self._wanted:
                    if isinstance(r, Exception):
                        o = self._order.get(room)
                        if o is not None and o.last is None:
                            self._release(room, o)
                    else:
                        seq, ep = r
                        self._set_base(room, int(seq) if seq is not None else 0, ep)
                self._wake(ch)
            for ch in chans:
                self._wake(ch)

    # ---- keys ----------------------------------------------------------------------------

    def _room_keys(self, room: str) -> tuple[bytes, bytes, bytes]:
        k = self._keys.get(room)
        if k is None:
            if len(self._keys) > 200_000:
                self._keys = {r: v for r, v in self._keys.items() if v[2] in self._wanted}
            base = f"{self._p}:{{{room}}}:"
            k = self._keys[room] = ((base + "s").encode(), (base + "h").encode(), (base + "m").encode())
        return k

    async def _load_scripts(self, drop_pool: bool = False) -> None:
        """SCRIPT LOAD everything (after a connect: a restarted Redis forgot them), so
        publishes never pay a NOSCRIPT round trip. Failures are harmless (EVAL fallback)."""
        try:
            if drop_pool:
                # Pooled command connections to the old server are stale: drop them.
                await self._redis.connection_pool.disconnect(inuse_connections=False)
            for sc in (_PUBLISH, _HISTORY, _PRESENCE, _M_JOIN, _M_LEAVE, _M_CONFIRM, _HEARTBEAT):
                await self._redis.script_load(sc.text)  # cluster: sent to every primary
        except Exception as e:
            self._warn("script-load", "SCRIPT LOAD failed: %s", e)

    def _check(self, what: str) -> None:
        if not self.ready:
            raise self._fail(what, None)

    async def _eval(self, script: _Script, keys: list[bytes] | tuple[bytes, ...], args: list[Any]) -> Any:
        r = self._redis
        try:
            return await r.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await r.eval(script.text, len(keys), *keys, *args)

    # ---- Broker interface ----------------------------------------------------------------

    async def publish(self, room: str, head: bytes, tail: bytes, prio: int, recoverable: bool, history: HistoryPolicy, idem: str | None = None) -> PublishResult:
        h = self._handler
        rec = recoverable and history.size > 0
        err: BaseException | None = None
        if self.ready:
            keys = self._room_keys(room)
            args = [
                head, tail, self._node_b, prio, b"1" if rec else b"0", history.size,
                max(1, int(history.ttl * 1000)), os.urandom(4).hex(), _STATE_TTL_MS, self._sharded,
            ]
            try:
                seq, epoch = await self._eval(_PUBLISH, keys, args)
            except (TimeoutError, RedisError, OSError) as e:
                err = e
            else:
                seq = int(seq)
                ep = epoch.decode()
                frame = splice(head, seq, ep, tail)
                if h is not None:
                    if keys[2] in self._wanted:
                        self._sequenced(room, seq, epoch, frame, prio)
                    else:
                        h.deliver_room(room, frame, prio)
                return PublishResult(seq, ep)
        # Redis unavailable: local members still get the message (not recoverable).
        if h is not None:
            h.deliver_room(room, splice(head, 0, "", tail), prio)
        self.stats.publish_errors += 1
        raise self._fail("publish", err)

    async def publish_frame(self, room: str, frame: bytes, prio: int) -> None:
        h = self._handler
        if h is not None:
            h.deliver_room(room, frame, prio)
        err: BaseException | None = None
        if self.ready:
            ch = self._room_keys(room)[2]
            msg = b"%s|%d|0||%s" % (self._node_b, prio, frame)
            try:
                await (self._redis.spublish(ch, msg) if self.cluster else self._redis.publish(ch, msg))
                return
            except (TimeoutError, RedisError, OSError) as e:
                err = e
        self.stats.publish_errors += 1
        raise self._fail("publish_frame", err)

    async def history(self, room: str, *, limit: int, since: int | None = None, epoch: str | None = None) -> HistoryResult:
        self._check("history")
        keys = self._room_keys(room)[:2]
        try:
            r = await self._eval(_HISTORY, keys, [max(0, limit), "" if since is None else int(since), epoch or ""])
        except (TimeoutError, RedisError, OSError) as e:
            raise self._fail("history", e) from None
        seq, ep, rec = int(r[0]), r[1].decode(), int(r[2])
        if rec == -2:  # nothing kept for this room
            if since is None:
                return HistoryResult([], 0, "", None)
            return HistoryResult([], 0, "", since == 0 and not epoch)
        return HistoryResult(list(r[3:]), seq, ep, None if rec == -1 else rec == 1)

    async def subscribe(self, room: str) -> None:
        ch = self._room_keys(room)[2]
        if ch not in self._wanted:
            self._wanted[ch] = room
            self._dirty.add(ch)
            self._schedule_flush()
        ps = self._ch_conn.get(ch)
        if ps is not None and ch in ps.active and ch not in self._dirty and ch not in self._need_base:
            return
        if not self.ready or self._loop is None:
            return  # degraded: the reconnect subscribes
        fut = self._loop.create_future()
        self._waiters.setdefault(ch, []).append(fut)
        done, _ = await asyncio.wait([fut], timeout=self.subscribe_timeout)
        if not done:
            self._warn("subscribe-slow", "redis subscription of %s not confirmed within %.1fs", room, self.subscribe_timeout)

    async def unsubscribe(self, room: str) -> None:
        ch = self._room_keys(room)[2]
        if self._wanted.pop(ch, None) is None:
            return
        self._dirty.add(ch)
        o = self._order.pop(room, None)
        if o is not None and o.timer is not None:
            o.timer.cancel()
        self._schedule_flush()

    async def _publish_ctl(self, what: str, body: bytes) -> None:
        err: BaseException | None = None
        if self.ready:
            msg = self._node_b + b"|" + body
            try:
                await (self._redis.spublish(self._ctl, msg) if self.cluster else self._redis.publish(self._ctl, msg))
                return
            except (TimeoutError, RedisError, OSError) as e:
                err = e
        self.stats.publish_errors += 1
        raise self._fail(what, err)

    async def send_user(self, user: str, payload: bytes, prio: int, idem: str | None = None) -> bool:  # type: ignore[override]
        h = self._handler
        if h is not None:
            h.deliver_user(user, payload, prio)
        await self._publish_ctl("send_user", orjson.dumps({"k": _USER_KIND, "d": {"user": user, "prio": prio, "frame": payload.decode()}}))
        return True

    async def control(self, kind: str, data: dict[str, Any]) -> None:
        if self._handler is not None:
            self._apply_control(kind, data)
        await self._publish_ctl("control", orjson.dumps({"k": kind, "d": data}))

    def _pres_key(self, room: str) -> bytes:
        return f"{self._p}:{{{room}}}:p".encode()

    async def report_presence(self, counts: dict[str, tuple[int, int]]) -> None:
        self._check("report_presence")
        ttl = max(1, int(self.cfg.presence_ttl * 1000))
        gone = self._pres_sent - counts.keys()
        rooms = list(counts) + list(gone)
        now = time.monotonic()
        try:
            pipe = self._redis.pipeline(transaction=False)
            for room in rooms:
                c, u = counts.get(room, (0, 0))
                pipe.eval(PRESENCE_LUA, 1, self._pres_key(room), self._node_b, c, u, ttl)
            res = await pipe.execute(raise_on_error=False)
        except (TimeoutError, RedisError, OSError) as e:
            raise self._fail("report_presence", e) from None
        failed = 0
        for room, r in zip(rooms, res, strict=False):
            if isinstance(r, Exception):
                failed += 1
                continue
            self._pres_cache[room] = (now, (int(r[0]), int(r[1])))
        self._pres_sent = set(counts)
        for room in gone:
            self._pres_cache.pop(room, None)
        if len(self._pres_cache) > 4 * len(counts) + 1000:
            self._pres_cache = {r: v for r, v in self._pres_cache.items() if now - v[0] < self.presence_cache}
        if failed:
            raise self._fail("report_presence", RedisError(f"{failed} of {len(rooms)} rooms failed"))

    def _members_key(self, room: str) -> bytes:
        return f"{self._p}:{{{room}}}:ml".encode()

    async def report_members(self, members: dict[str, list[dict[str, Any]]]) -> None:
        """One hash per small room, one field per node: ``{"exp": <unix s>, "m": [...]}``.
        Readers skip fields whose ``exp`` passed, so a dead node's members vanish within
        ``presence_ttl``; rooms this node no longer reports are removed from the hash."""
        self._check("report_members")
        ttl = self.cfg.presence_ttl
        gone = self._members_sent - members.keys()
        exp = time.time() + ttl
        try:
            pipe = self._redis.pipeline(transaction=False)
            for room, ms in members.items():
                key = self._members_key(room)
                pipe.hset(key, self._node_b, orjson.dumps({"exp": exp, "m": ms}))
                pipe.pexpire(key, max(1, int(ttl * 1000)))
            for room in gone:
                pipe.hdel(self._members_key(room), self._node_b)
            await pipe.execute()
        except (TimeoutError, RedisError, OSError) as e:
            raise self._fail("report_members", e) from None
        self._members_sent = set(members)

    async def members(self, room: str) -> list[dict[str, Any]] | None:
        self._check("members")
        try:
            fields = await self._redis.hgetall(self._members_key(room))
        except (TimeoutError, RedisError, OSError) as e:
            raise self._fail("members", e) from None
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

    async def presence_counts(self, room: str) -> tuple[int, int]:
        hit = self._pres_cache.get(room)
        if hit is not None and time.monotonic() - hit[0] < self.presence_cache:
            return hit[1]
        self._check("presence")
        try:
            r = await self._eval(_PRESENCE, [self._pres_key(room)], ["", 0, 0, 0])
        except (TimeoutError, RedisError, OSError) as e:
            raise self._fail("presence", e) from None
        return int(r[0]), int(r[1])

    # ---- join/leave debounce for hooks (not part of the Broker interface) -----------------

    def _member_keys(self, room: str | None, user: str) -> list[bytes]:
        scope = room if room is not None else "~" + user
        base = f"{self._p}:{{{scope}}}:"
        return [(base + "c:" + user).encode(), (base + "g:" + user).encode()]

    async def _heartbeat(self, timeout_ms: int) -> None:
        gone = await self._eval(_HEARTBEAT, [self._hb_key], [self._inst, timeout_ms, _MEMBER_TTL_MS])
        self._gone = [g for g in gone if g != self._inst]

    async def _heartbeat_loop(self) -> None:
        """Renew this instance's deadline every ``node_timeout / 4`` and learn which
        instances are gone (their debounce counts are then ignored)."""
        timeout = max(0.05, self.cfg.node_timeout)
        while not self._closed:
            if self.ready:
                try:
                    await self._heartbeat(int(timeout * 1000))
                except (TimeoutError, RedisError, OSError) as e:
                    self._warn("heartbeat", "node heartbeat failed: %s", e)
            await asyncio.sleep(timeout / 4)

    async def member_join(self, room: str | None, user: str) -> bool:
        """A connection of ``user`` joined ``room`` (``None``: connected at all). True when
        this is a real join for hooks: the user was nowhere in the room, and did not just
        leave it (within ``leave_grace``, on any node). Raises :class:`BrokerError`."""
        self._check("member_join")
        try:
            args = [self._inst, _MEMBER_TTL_MS, *self._gone]
            return int(await self._eval(_M_JOIN, self._member_keys(room, user), args)) == 1
        except (TimeoutError, RedisError, OSError) as e:
            raise self._fail("member_join", e) from None

    async def member_leave(self, room: str | None, user: str) -> bool:
        """A connection of ``user`` left ``room`` (``None``: disconnected). Waits
        ``leave_grace`` when it was the user's last one, then returns True on exactly one
        node when the user did not come back anywhere. Raises :class:`BrokerError`."""
        self._check("member_leave")
        keys = self._member_keys(room, user)
        token = os.urandom(8).hex()
        grace = max(0.0, self.cfg.leave_grace)
        try:
            pending = await self._eval(_M_LEAVE, keys, [self._inst, int(grace * 1000) + 60_000, token, *self._gone])
        except (TimeoutError, RedisError, OSError) as e:
            raise self._fail("member_leave", e) from None
        if int(pending) != 1:
            return False
        await asyncio.sleep(grace)
        self._check("member_leave")
        try:
            return int(await self._eval(_M_CONFIRM, keys, [token, *self._gone])) == 1
        except (TimeoutError, RedisError, OSError) as e:
            raise self._fail("member_leave", e) from None
