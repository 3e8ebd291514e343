"""The Redis broker: many nodes share rooms, users, presence, history and moderation
through Redis 7+.

Keys and channels (``P`` = ``broker.prefix``; ``{room}`` is a Redis Cluster hash tag, so
every key of a room and its channel live in one slot)::

    P:{room}:s        hash  seq, epoch            (TTL: 1 day after the last message)
    P:{room}:h        stream  <seq>-0 -> frame     (MAXLEN history.size, TTL history.ttl)
    P:{room}:m        channel  node|prio|seq|epoch|frame
    P:{room}:i:KEY    "seq epoch" of a publish with idempotency key KEY (TTL idempotency_ttl)
    P:{room}:p        hash  node -> "conns users deadline_ms"   (TTL presence_ttl; presence.py)
    P:{room}:ml       hash  node -> member list of a small room  (TTL presence_ttl; presence.py)
    P:{room}:c:USER   hash  node instance -> connections of USER in room (debounce.py)
    P:{room}:g:USER   pending-leave marker (debounce.py)
    P:{nodes}:hb      hash  node instance -> heartbeat deadline_ms (debounce.py)
    P:{mod}:state     hash  ["mute"|"ban", room, user] -> encoded command (no TTL)
    P:{P:ctl}:u:...   send_user idempotency key (TTL idempotency_ttl)
    P:ctl             channel  node|command  (commands.encode; send_user frames)
    P:{archive}:N     stream  the archive log (archive.py; N < broker.archive_streams)

A room message costs ONE round trip: ``EVALSHA`` of ``lua/publish.lua``, which checks the
idempotency key (when given), assigns the seq (a new random epoch whenever the seq key
was lost), splices it into the frame, appends it to the stream and publishes it on the
room channel (``SPUBLISH`` with ``cluster = true``); a message the store archives is
also appended to the archive log in that step (:mod:`.archive`). The publishing node delivers locally
from the reply (the same bytes, via :func:`gateway.protocol.splice`) and ignores its own
echo. Every node re-orders what it delivers by seq (:mod:`.reorder`, waiting at most
:attr:`RedisBroker.reorder_wait` for a gap), so a room's messages reach local members in
seq order even when two nodes publish at once.

A node subscribes to a room channel only while it has local members; subscribe and
unsubscribe requests are coalesced for :attr:`RedisBroker.batch_delay` into one
``SUBSCRIBE``/``UNSUBSCRIBE`` per connection (per slot in cluster mode), and
:meth:`RedisBroker.subscribe` returns once Redis confirmed the subscription.

Mutes and bans are recorded in ``P:{mod}:state`` before they are published, and lifted
from it by unmute/unban, so a node that starts later gets them from
:meth:`RedisBroker.moderation`; expired entries are skipped and pruned there.

Failure: while the pub/sub connection is down the broker is "open" (``ready`` is False):
publishes deliver locally and raise :class:`BrokerError` at once, without touching the
network; everything else raises :class:`BrokerError` at once. Commands use short socket
timeouts and no retries. The pub/sub connection reconnects with jittered exponential
backoff and re-subscribes every channel this node needs. See docs/scaling.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ...config import BrokerConfig
from ...protocol import splice
from ..base import (
    ArchiveWriter,
    Broker,
    BrokerError,
    BrokerHandler,
    BrokerStats,
    HistoryPolicy,
    HistoryResult,
    PublishResult,
)
from ..commands import Command, UserFrame, decode, decode_message, encode, encode_user
from ..idem import IdempotencyMap
from ..moderation import in_force, sets_state, state_key
from . import scripts
from .archive import ArchiveLog, stream_index, stream_keys
from .debounce import RedisDebounce
from .presence import RedisPresence
from .pubsub import PubSubConn, frame_lag, parse_room_message, sub_commands
from .reorder import Reorder, Timer

#: Seconds between measurements of the Redis clock offset (publish deadlines), and the
#: longest round trip a measurement may take to count (its error is half of it).
CLOCK_SYNC_S = 10.0
CLOCK_MAX_RTT_S = 0.05

log = logging.getLogger("gateway.broker.redis")

__all__ = ["RedisBroker"]

_STATE_TTL_MS = 86_400_000  # seq/epoch survive a day of silence


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
        #: Key and channel prefix; this node's id (``|`` replaced) as bytes, set at start.
        self.prefix = p
        self.node_b = b""
        self._url_kwargs: dict[str, Any] = dict(parse_url(cfg.url))
        self._handler: BrokerHandler | None = None
        self._node = ""
        self._redis: Any = None
        self._ps: dict[str, PubSubConn] = {}
        self._ch_conn: dict[bytes, PubSubConn] = {}
        self._ctl = f"{p}:ctl".encode()
        self._mod_key = f"{p}:{{mod}}:state".encode()
        self._wanted: dict[bytes, str] = {}  # channel -> room, rooms with local members
        self._dirty: set[bytes] = set()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self._reorder = Reorder(self._deliver_room, self._call_later, self.reorder_wait, self.stats.extra)
        self._need_base: set[bytes] = set()
        self._base_task: asyncio.Task[None] | None = None
        self._keys: dict[str, tuple[bytes, bytes, bytes]] = {}
        self._log_last: dict[str, tuple[float, int]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._topo_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # Redis' clock minus ours (ms), measured every CLOCK_SYNC_S; None until known.
        self._clock_offset_ms: float | None = None
        self._clock_task: asyncio.Future[None] | None = None
        self._sharded = b"1" if self.cluster else b"0"
        self._idem_ttl_ms = max(1, int(cfg.idempotency_ttl * 1000))
        #: Idempotency keys of what was delivered on this node only, while Redis was
        #: unreachable: a retry while still unreachable is not delivered here again.
        self._local_idem: IdempotencyMap[PublishResult | bool] = IdempotencyMap(cfg.idempotency_ttl, 10_000)
        self.presence: RedisPresence = RedisPresence(self)
        self.debounce: RedisDebounce = RedisDebounce(self)
        #: The archive log's streams and the ``MAXLEN ~`` of each (publish.lua's arguments).
        self.archive_keys = stream_keys(p, cfg.archive_streams)
        self._archive_maxlen = str(-(-cfg.archive_maxlen // max(1, cfg.archive_streams))).encode()
        #: This node's consumer of the archive log, once :meth:`consume_archive` was called.
        self.archive_log: ArchiveLog | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def _deliver_room(self, room: str, frame: bytes, prio: int) -> None:
        h = self._handler
        if h is not None:
            h.deliver_room(room, frame, prio)

    def _call_later(self, delay: float, cb: Callable[[], None]) -> Timer:
        """The reorder buffer's timers, on the event loop."""
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        return loop.call_later(delay, cb)

    # ---- lifecycle -----------------------------------------------------------------------

    def _timeouts(self) -> dict[str, Any]:
        kw = self._url_kwargs
        return {
            "socket_timeout": kw.get("socket_timeout", self.socket_timeout),
            "socket_connect_timeout": kw.get("socket_connect_timeout", self.connect_timeout),
        }

    def _make_connection(self, host: str | None, port: int | None) -> Connection:
        kw: dict[str, Any] = {k: v for k, v in self._url_kwargs.items() if k not in ("connection_class", "max_connections")}
        cls = cast("type[Connection]", self._url_kwargs.get("connection_class", Connection))
        kw.update(self._timeouts())
        if host is not None:
            kw["host"], kw["port"] = host, port
        if self.cluster:
            kw.pop("db", None)
        # RESP2: pub/sub messages are plain arrays (RESP3 routes them through redis-py's
        # push-notification handlers, which cost a str() of every message).
        kw.update(retry=Retry(NoBackoff(), 0), health_check_interval=0, protocol=2, client_name=f"gw-ps-{self._node}"[:60])
        return cls(**kw)

    async def start(self, handler: BrokerHandler, node_id: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._handler = handler
        self._node = node_id.replace("|", "_")
        self.node_b = self._node.encode()
        self._reorder.wait = self.reorder_wait
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
            ps = self._ps[""] = PubSubConn(self, "redis", None, None)
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
        self.debounce.start(self.node_b)
        self._clock_task = asyncio.ensure_future(self._clock_loop())
        if self.archive_log is not None:
            self.archive_log.start(self.node_b)

    async def _clock_loop(self) -> None:
        """Keep ``_clock_offset_ms`` (Redis ``TIME`` minus this host's clock) so publish
        deadlines are stated in Redis' clock. A sample is off by up to half its round trip
        (a busy event loop stretches it), so only quick samples count and the quickest of
        the recent ones wins."""
        best: tuple[float, float] | None = None  # (round trip s, offset ms)
        while not self._closed:
            if self.ready:
                try:
                    t0 = time.time()
                    r: Any = await self._redis.time()
                    t1 = time.time()
                    if isinstance(r, dict):  # cluster: one node's answer
                        r = next(iter(r.values()))
                    rtt, off = t1 - t0, int(r[0]) * 1000 + int(r[1]) / 1000 - (t0 + t1) * 500
                    if rtt <= CLOCK_MAX_RTT_S and (best is None or rtt <= best[0] * 2):
                        best = (rtt, off) if best is None or rtt < best[0] else (best[0], off)
                        self._clock_offset_ms = best[1]
                except (TimeoutError, RedisError, OSError, ValueError, IndexError, StopIteration) as e:
                    self._warn("clock", "redis TIME failed: %s", e)
            await asyncio.sleep(CLOCK_SYNC_S if self._clock_offset_ms is not None else 0.5)

    def _deadline(self) -> int | str:
        """The Redis time after which a publish must not run any more: this node gives up
        waiting at ``socket_timeout`` and acks ``degraded`` (local members only, seq 0), so
        a script Redis runs later (it was stopped, or slow) must publish nothing. 80 % of
        the timeout leaves room for the reply's way back."""
        off = self._clock_offset_ms
        if off is None:
            return ""
        return int(time.time() * 1000 + off + 800 * float(self._timeouts()["socket_timeout"]))

    def _safe_url(self) -> str:
        kw = self._url_kwargs
        return f"{kw.get('host', kw.get('path', '?'))}:{kw.get('port', '')}"

    async def close(self) -> None:
        if self._closed:
            return
        if self.archive_log is not None:
            # First, while the store is still open: the batch in hand is written and acked.
            await self.archive_log.close()
        # A graceful stop drained its clients (their leaves went through the debounce):
        # leave the heartbeat hash, so this instance is never listed as gone.
        await self.debounce.close()
        self._closed = True
        if self._clock_task is not None:
            self._clock_task.cancel()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        for t in list(self._tasks) + [x for x in (self._topo_task, self._base_task) if x is not None]:
            t.cancel()
        for ps in list(self._ps.values()):
            await ps.close()
        self._ps.clear()
        self._reorder.close()
        self._wake_all()
        if self._redis is not None:
            try:
                await self._redis.aclose()
                pool = getattr(self._redis, "connection_pool", None)
                if pool is not None:
                    # A client built on a pool we passed does not close that pool itself.
                    await pool.disconnect()
            except Exception:
                pass
        self._handler = None
        self.stats.connected = False

    @property
    def ready(self) -> bool:
        ps = self._ch_conn.get(self._ctl)
        return ps is not None and ps.up and not self._closed

    @property
    def archives(self) -> bool:
        """See :attr:`Broker.archives`: True unless ``broker.archive_streams`` is 0, or in
        cluster mode (the publish script can only write keys of the room's slot)."""
        return self.cfg.archive_streams > 0 and not self.cluster

    def consume_archive(self, write: ArchiveWriter) -> None:
        """See :meth:`Broker.consume_archive` and :mod:`.archive`."""
        if self.archives and self.archive_log is None:
            self.archive_log = ArchiveLog(self, write)
            self.stats.archive = self.archive_log.stats

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

    def _on_pubsub_up(self, ps: PubSubConn, first: bool) -> None:
        if not first:
            self.stats.reconnects += 1
            log.info("redis pub/sub %s reconnected; resubscribed %d channels", ps.name, len(ps.channels))
        if ps is self._ch_conn.get(self._ctl) or not self.cluster:
            self._spawn(self._load_scripts(drop_pool=not first and not self.cluster))
        self.stats.connected = self.ready

    def _on_pubsub_down(self, ps: PubSubConn) -> None:
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
        return sub_commands(chans, cluster=self.cluster, sub=sub, batch_max=self.batch_max)

    def _owner(self, ch: bytes) -> PubSubConn | None:
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
            ps = self._ps[node.name] = PubSubConn(self, node.name, node.host, int(node.port))
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
        subs: dict[PubSubConn, list[bytes]] = {}
        unsubs: dict[PubSubConn, list[bytes]] = {}
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

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
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
        m = parse_room_message(data)
        if m is None:
            return
        node, prio, seq, epoch, frame = m
        if node == self.node_b:
            return  # our own echo: delivered locally already
        lag = frame_lag(frame, time.time())
        if lag is not None:
            self.stats.observe_lag(lag)
        try:
            self._reorder.sequenced(room, seq, epoch, frame, prio)
        except Exception:
            log.exception("delivering a message of %s failed", room)

    def _on_control(self, data: bytes) -> None:
        node, _, body = data.partition(b"|")
        if node == self.node_b:
            return
        try:
            msg = decode_message(body)
        except ValueError as e:
            self._warn("bad-command", "ignoring a bad control message: %s", e)
            return
        try:
            self._apply(msg)
        except Exception:
            log.exception("applying a control message failed")

    def _apply(self, msg: Command | UserFrame) -> None:
        h = self._handler
        if h is None:
            return
        if isinstance(msg, UserFrame):
            h.deliver_user(msg.user, msg.frame, msg.prio)
        else:
            h.apply(msg)

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
                        self._reorder.release_unbased(room)
                    else:
                        seq, ep = r
                        self._reorder.set_base(room, int(seq) if seq is not None else 0, ep)
                self._wake(ch)
            for ch in chans:
                self._wake(ch)

    # ---- keys ----------------------------------------------------------------------------

    def _room_keys(self, room: str) -> tuple[bytes, bytes, bytes]:
        k = self._keys.get(room)
        if k is None:
            if len(self._keys) > 200_000:
                self._keys = {r: v for r, v in self._keys.items() if v[2] in self._wanted}
            base = f"{self.prefix}:{{{room}}}:"
            k = self._keys[room] = ((base + "s").encode(), (base + "h").encode(), (base + "m").encode())
        return k

    async def _load_scripts(self, drop_pool: bool = False) -> None:
        """SCRIPT LOAD everything (after a connect: a restarted Redis forgot them), so
        publishes never pay a NOSCRIPT round trip. Failures are harmless (EVAL fallback)."""
        try:
            if drop_pool:
                # Pooled command connections to the old server are stale: drop them.
                await self._redis.connection_pool.disconnect(inuse_connections=False)
            for sc in scripts.ALL:
                await self._redis.script_load(sc.text)  # cluster: sent to every primary
        except Exception as e:
            self._warn("script-load", "SCRIPT LOAD failed: %s", e)

    def _check(self, what: str) -> None:
        if not self.ready:
            raise self._fail(what, None)

    async def _eval(self, script: scripts.Script, keys: list[bytes] | tuple[bytes, ...], args: list[Any]) -> Any:
        r = self._redis
        try:
            return await r.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await r.eval(script.text, len(keys), *keys, *args)

    # ---- Broker interface ----------------------------------------------------------------

    async def publish(
        self, room: str, head: bytes, tail: bytes, prio: int, recoverable: bool, history: HistoryPolicy, idem: str | None = None,
        archive: tuple[str, str | None] | None = None,
    ) -> PublishResult:
        """See :meth:`Broker.publish`. With ``idem``, the key ``P:{room}:i:<idem>`` is
        checked and set inside the same script (per room, across nodes). While Redis is
        unreachable keys are remembered on this node only (a retry then is not delivered
        here again, but still raises); once Redis is back a retry is published. With
        ``archive`` (and :attr:`archives`), the script appends the message to the room's
        archive stream (:mod:`.archive`)."""
        h = self._handler
        rec = recoverable and history.size > 0
        err: BaseException | None = None
        if self.ready:
            keys: tuple[bytes, ...] = self._room_keys(room)
            args: list[Any] = [
                head, tail, self.node_b, prio, b"1" if rec else b"0", history.size,
                max(1, int(history.ttl * 1000)), os.urandom(4).hex(), _STATE_TTL_MS, self._sharded, self._deadline(),
                self._idem_ttl_ms, history.floor,
            ]
            if idem is not None:
                keys = (*keys, f"{self.prefix}:{{{room}}}:i:{idem}".encode())
            if archive is not None and rec and self.archives:
                keys = (*keys, self.archive_keys[stream_index(room, len(self.archive_keys))])
                args += (self._archive_maxlen, archive[0]) if archive[1] is None else (self._archive_maxlen, archive[0], archive[1])
            try:
                reply = await self._eval(scripts.PUBLISH, keys, args)
            except (TimeoutError, RedisError, OSError) as e:
                err = e
            else:
                seq, epoch = int(reply[0]), reply[1]
                ep = epoch.decode()
                if seq < 0:
                    # Redis ran it after its deadline (it was stopped, or slow): nothing
                    # was published; answered like a timeout.
                    err = TimeoutError("redis ran the publish after its deadline")
                elif len(reply) > 2:  # the idempotency key was used: nothing published
                    return PublishResult(seq, ep, True)
                else:
                    frame = splice(head, seq, ep, tail)
                    if h is not None:
                        if keys[2] in self._wanted:
                            self._reorder.sequenced(room, seq, epoch, frame, prio)
                        else:
                            h.deliver_room(room, frame, prio)
                    return PublishResult(seq, ep)
        # Redis unavailable: local members still get the message (not recoverable).
        local_key = ("r", room, idem)
        if idem is None or self._local_idem.get(local_key) is None:
            if idem is not None:
                self._local_idem.add(local_key, True)
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
            msg = b"%s|%d|0||%s" % (self.node_b, prio, frame)
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
            r = await self._eval(scripts.HISTORY, keys, [max(0, limit), "" if since is None else int(since), epoch or ""])
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
        self._reorder.forget(room)
        self._schedule_flush()

    async def _publish_ctl(self, what: str, body: bytes) -> None:
        err: BaseException | None = None
        if self.ready:
            msg = self.node_b + b"|" + body
            try:
                await (self._redis.spublish(self._ctl, msg) if self.cluster else self._redis.publish(self._ctl, msg))
                return
            except (TimeoutError, RedisError, OSError) as e:
                err = e
        self.stats.publish_errors += 1
        raise self._fail(what, err)

    async def send_user(self, user: str, payload: bytes, prio: int, idem: str | None = None) -> bool:
        """See :meth:`Broker.send_user`. With ``idem``: one ``EVALSHA`` (``send_user.lua``)
        sets the key ``P:{P:ctl}:u:<len(user)>:<user>:<idem>`` and publishes only if it was
        new; this node delivers after that answer. Without Redis, as :meth:`publish`."""
        h = self._handler
        body = encode_user(user, payload, prio)
        if idem is None:
            if h is not None:
                h.deliver_user(user, payload, prio)
            await self._publish_ctl("send_user", body)
            return True
        err: BaseException | None = None
        if self.ready:
            key = f"{self.prefix}:{{{self._ctl.decode()}}}:u:{len(user)}:{user}:{idem}".encode()
            try:
                sent = await self._eval(scripts.SEND_USER, [key, self._ctl], [self.node_b + b"|" + body, self._idem_ttl_ms, self._sharded])
            except (TimeoutError, RedisError, OSError) as e:
                err = e
            else:
                if int(sent) != 1:
                    return False
                if h is not None:
                    h.deliver_user(user, payload, prio)
                return True
        local_key = ("u", user, idem)
        if self._local_idem.get(local_key) is None:
            self._local_idem.add(local_key, True)
            if h is not None:
                h.deliver_user(user, payload, prio)
        self.stats.publish_errors += 1
        raise self._fail("send_user", err)

    async def command(self, cmd: Command) -> None:
        """See :meth:`Broker.command`. Applied here first (an exception of the handler
        propagates to the caller); a mute or ban is then recorded in ``P:{mod}:state``
        (an unmute or unban removes its entry) before it is published on ``P:ctl``."""
        body = encode(cmd)
        if self._handler is not None:
            self._handler.apply(cmd)
        err: BaseException | None = None
        if self.ready:
            key = state_key(cmd)
            try:
                if key is not None:
                    field = orjson.dumps(list(key))
                    if sets_state(cmd):
                        await self._redis.hset(self._mod_key, field, body)
                    else:
                        await self._redis.hdel(self._mod_key, field)
                await (self._redis.spublish(self._ctl, self.node_b + b"|" + body) if self.cluster else self._redis.publish(self._ctl, self.node_b + b"|" + body))
                return
            except (TimeoutError, RedisError, OSError) as e:
                err = e
        self.stats.publish_errors += 1
        raise self._fail("command", err)

    async def moderation(self) -> list[Command]:
        """Mutes and bans in force from ``P:{mod}:state`` (judged by this node's wall
        clock); expired and unreadable entries are removed."""
        self._check("moderation")
        try:
            entries = await self._redis.hgetall(self._mod_key)
        except (TimeoutError, RedisError, OSError) as e:
            raise self._fail("moderation", e) from None
        now = time.time()
        out: list[Command] = []
        stale: list[bytes] = []
        for field, raw in entries.items():
            try:
                cmd = decode(raw)
            except ValueError:
                stale.append(field)
                continue
            if in_force(cmd, now):
                out.append(cmd)
            else:
                stale.append(field)
        if stale:
            try:
                await self._redis.hdel(self._mod_key, *stale)
            except (TimeoutError, RedisError, OSError) as e:
                self._warn("moderation-prune", "pruning expired mutes and bans failed: %s", e)
        return out
