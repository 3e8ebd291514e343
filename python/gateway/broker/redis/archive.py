"""The archive log: ``archive`` messages (see :mod:`gateway.app.storage`) kept in Redis
streams until a node has written them to the store, so that a node that dies right after
a publish loses none of them, and each is stored exactly once across the nodes.

Keys (``P`` = ``broker.prefix``, ``N`` = ``broker.archive_streams``)::

    P:{archive}:<i>   stream  f = msg frame, r = route[, c = cid]   (i = crc32(room) % N)
                      consumer group "store"; one consumer per node, named by its node id

**Writing** is the publish itself: ``lua/publish.lua`` appends the numbered frame to the
room's stream in the step that numbers and publishes it (a message is published and
logged, or neither; an idempotent retry is not logged again), trimming the stream to
about ``archive_maxlen / N`` entries (``MAXLEN ~``). A room always uses the same stream,
so its entries are in publish order there.

NOTE: an entry is the frame as published plus route and cid, not the message's fields
one by one: the script has built the frame already (for the history stream and the
channel), so the publish sends nothing twice (``data``, up to 12 KB, would otherwise
cross the network again: two copies in the script's arguments) and the entry costs Redis
one ``XADD`` of bytes it holds: the publish script went from 11.8 to 14.0 us of Redis
CPU (``INFO commandstats``, 3 x 20,000 chat messages each way). The consumer parses the
frame back instead (:func:`parse_entry`: 2.1 us for a 219-byte chat frame, 17 us for a
10 KB one on this machine), off the publish path.

**Reading** (:class:`ArchiveLog`, one per node with a store): rounds of ``XREADGROUP``
(``archive_batch`` entries over the streams, blocking up to :attr:`ArchiveLog.block`
seconds), each batch written with :meth:`gateway.store.Store.write_archive` (one
transaction, committed when it returns), then ``XACK``'d. A redelivered entry is a
duplicate by ``(room, seq)`` that the store skips, so an entry is stored once even when
two nodes write it. While the store fails, the batch in hand is retried with backoff
(nothing else is read meanwhile, so the backlog stays in Redis, not in memory). Entries
a node read but did not acknowledge for ``archive_claim_after`` seconds (the node died,
or cannot reach the store) are taken over by the others with ``XAUTOCLAIM``. A node
starting again under the same id first re-reads its own pending entries.

NOTE: a round costs about as much as a batch of 20 messages, whatever it carries: with
20 rooms over 4 streams, 123 us of CPU for 1 entry, 258 us for 14, 539 us for 100
(``XREADGROUP``, parse, ``XACK``; redis-py). Read as soon as entries arrive, a node fed
at 700 messages/s ran a round per message or two: 208 us of consumer CPU per message
(120 us at 2,500/s). So after a round that was not full the consumer waits
:attr:`ArchiveLog.linger` (50 ms) before reading again: 24 us per message at 700/s and
10 us at 2,500/s (10 ms: 64 and 16 us; 20 ms: 54 and 16 us), for at most 50 ms more
before a message is in the store; a backlog is read in full rounds without waiting.
(Consumer process alone, store a no-op, ``getrusage``; on this VM a wake-up after a
sleep of 20 ms or more costs ~120 us of CPU by itself, which a busy node does not pay.)

**Bounds.** Every :attr:`ArchiveLog.check_interval` seconds (a task beside the consumer,
so the figures stay fresh while it retries a batch) ``lua/archive_check.lua`` trims, per
stream, what the group has acknowledged (so the streams hold only the backlog),
reads the lag and pending counts for the metrics, and counts entries ``MAXLEN`` trimmed
before any node read them: those are lost to the store
(``gateway_archive_log_lost_total{reason="trimmed_unread"}``; Redis 7.0 tells it exactly
while the group is behind the first entry left, or once it has read everything). Pending
entries trimmed before their node wrote them are reported by ``XAUTOCLAIM`` (reason
``trimmed_pending``; the node that held them may still have written them). Entries that
cannot be parsed are acknowledged and counted (``malformed``), as are messages the
database refuses (``refused``): nothing in the log can stop it.

**Failures** never reach the publish path or crash the node: Redis errors and store
errors are counted (``gateway_archive_log_errors_total``), logged at most every 10 s per
kind, and retried with jittered exponential backoff. Redis Cluster is not supported (the
publish script can only write keys of the room's slot): there the broker does not
archive (:attr:`RedisBroker.archives` is False) and nodes write behind from memory.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import zlib
from typing import TYPE_CHECKING, Any

import orjson
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ...store import StoredMessage, StoreUnavailable
from ..base import ArchiveLogStats, ArchiveWriter
from . import scripts

if TYPE_CHECKING:
    from .broker import RedisBroker

__all__ = ["GROUP", "ArchiveLog", "parse_entry", "stream_index", "stream_keys"]

log = logging.getLogger("gateway.broker.redis")

#: The consumer group every node reads the log in.
GROUP = b"store"

#: One entry as read: (stream, id, fields; None when the entry was trimmed while pending).
_Entry = tuple[bytes, bytes, "dict[bytes, bytes] | None"]


def stream_keys(prefix: str, streams: int) -> list[bytes]:
    """The archive log's streams (``P:{archive}:<i>``)."""
    return [f"{prefix}:{{archive}}:{i}".encode() for i in range(streams)]


def stream_index(room: str, streams: int) -> int:
    """The archive stream of ``room`` (0 .. ``streams`` - 1)."""
    return zlib.crc32(room.encode()) % streams


def parse_entry(fields: dict[bytes, bytes]) -> StoredMessage | None:
    """The stored message an entry describes, or None when it is malformed (anything
    publish.lua did not write: missing fields, not a ``msg`` frame, wrong types)."""
    frame, route, cid = fields.get(b"f"), fields.get(b"r"), fields.get(b"c")
    if frame is None or route is None:
        return None
    try:
        d = orjson.loads(frame)
        room, seq, ts, mtype, prio, sender = d["room"], d["seq"], d["ts"], d["type"], d["prio"], d["from"]
        ok = (
            d["op"] == "msg" and isinstance(room, str) and type(seq) is int and seq > 0 and type(ts) is int
            and isinstance(mtype, str) and type(prio) is int and (sender is None or isinstance(sender, str))
        )
        if not ok:
            return None
        # The same bytes as the publisher's orjson.dumps(data): it produced this JSON.
        data = orjson.dumps(d["data"])
        return StoredMessage(room, seq, ts, mtype, prio, sender, data, None if cid is None else cid.decode(), route.decode())
    except (orjson.JSONDecodeError, orjson.JSONEncodeError, KeyError, TypeError, UnicodeDecodeError):
        return None


def _raw(response: Any, **options: Any) -> Any:
    """Replies as Redis sent them (RESP2): the stream replies are parsed here."""
    return response


class ArchiveLog:
    """This node's consumer of the archive log (see the module docstring).

    ``broker``: the Redis broker (its URL, prefix, timeouts and rate-limited logging).
    ``write``: :meth:`gateway.store.Store.write_archive` of this node's store.
    """

    #: Seconds an XREADGROUP waits for entries; a stop waits at most this for the read.
    block = 1.0
    #: Seconds to wait after a round that was not full, so that the next one gathers more
    #: (fewer round trips and transactions per message; see the NOTE in the module).
    linger = 0.05
    #: Seconds between upkeep rounds (archive_check.lua: trim, lag, lost entries).
    check_interval = 1.0
    #: Seconds between sweeps (in the upkeep) of consumers that hold nothing: the old ids
    #: of restarted nodes.
    sweep_interval = 300.0
    #: A consumer with nothing pending, not seen for this long, leaves the group.
    forget_after = 3600.0
    #: Backoff while Redis or the store fails: first delay and cap (seconds, jittered).
    backoff = (0.05, 2.0)
    #: Longest wait of :meth:`close` for the batch in hand.
    stop_timeout = 5.0

    def __init__(self, broker: RedisBroker, write: ArchiveWriter) -> None:
        cfg = broker.cfg
        self.broker = broker
        self.write = write
        self.keys = broker.archive_keys
        n = len(self.keys)
        self.claim_after_ms = max(1, int(cfg.archive_claim_after * 1000))
        self.count = max(1, -(-cfg.archive_batch // n))  # per stream and read
        self.stats = ArchiveLogStats()
        self.consumer = b""
        self._redis: Any = None
        self._task: asyncio.Task[None] | None = None
        self._upkeep: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._groups_ok = False
        self._own = True  # re-read this consumer's own pending entries first
        self._cursors: list[bytes] = [b"0-0"] * n
        self._next_claim = 0.0

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self, consumer: bytes) -> None:
        """Start consuming as ``consumer`` (the node id) on its own connection."""
        self.consumer = consumer
        kw = self.broker._timeouts()
        pool = ConnectionPool.from_url(
            self.broker.cfg.url, max_connections=2, retry=Retry(NoBackoff(), 0), health_check_interval=0, protocol=2,
            socket_timeout=self.block + float(kw["socket_timeout"]), socket_connect_timeout=kw["socket_connect_timeout"],
            client_name=f"gw-arch-{consumer.decode()}"[:60],
        )
        self._redis = Redis(connection_pool=pool)
        for cmd in ("XREADGROUP", "XAUTOCLAIM"):
            self._redis.set_response_callback(cmd, _raw)
        self._next_claim = time.monotonic()
        self._task = asyncio.ensure_future(self._run())
        self._upkeep = asyncio.ensure_future(self._upkeep_loop())

    async def close(self) -> None:
        """Stop: the batch in hand is written and acknowledged (for up to
        :attr:`stop_timeout` seconds); entries read but not written stay pending for
        another node (or this one, restarted under the same id)."""
        self._stopping = True
        self._wake.set()
        if self._upkeep is not None:
            self._upkeep.cancel()
            try:
                await self._upkeep
            except (asyncio.CancelledError, Exception):
                pass
        t = self._task
        if t is not None and not t.done():
            done, _ = await asyncio.wait([t], timeout=self.stop_timeout)
            if not done:
                log.warning("archive log: stopping without waiting any longer for the batch in hand (it stays pending in Redis)")
                t.cancel()
            try:
                await t
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("archive log consumer failed")
        if self._redis is not None:
            try:
                await self._redis.aclose()
                await self._redis.connection_pool.disconnect()
            except Exception:
                pass
            self._redis = None

    async def _sleep(self, seconds: float) -> None:
        """Wait ``seconds``, less when :meth:`close` is called."""
        if self._stopping:
            return
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass

    def _delay(self, fails: int) -> float:
        lo, hi = self.backoff
        return min(hi, lo * (1 << min(fails, 16))) * (0.5 + random.random())

    # ---- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        fails = 0
        while not self._stopping:
            try:
                if not self._groups_ok:
                    await self._create_groups()
                await self._round()
                fails = 0
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as e:
                if isinstance(e, ResponseError) and str(e).startswith("NOGROUP"):
                    self._groups_ok = False  # Redis lost them (restart, FLUSHALL): create them again
                self._own = True  # entries read but not acknowledged: read them again first
                self.stats.errors["redis"] = self.stats.errors.get("redis", 0) + 1
                self.broker._warn("archive-redis", "archive log: redis failed: %s: %s (retrying)", type(e).__name__, e)
                fails += 1
                await self._sleep(self._delay(fails))
            except Exception as e:
                self.stats.errors["other"] = self.stats.errors.get("other", 0) + 1
                self.broker._warn("archive-bug", "archive log: unexpected %s: %s (retrying)", type(e).__name__, e)
                fails += 1
                await self._sleep(self._delay(fails))

    async def _create_groups(self) -> None:
        r = self._redis
        for key in self.keys:
            try:
                await r.execute_command("XGROUP", "CREATE", key, GROUP, "0", "MKSTREAM", "ENTRIESREAD", "0")
            except ResponseError as e:
                if not str(e).startswith("BUSYGROUP"):
                    raise
        self._groups_ok = True

    async def _round(self) -> None:
        now = time.monotonic()
        if self._own:
            entries = await self._read(b"0")
            if not entries:
                self._own = False
        elif now >= self._next_claim:
            entries = await self._claim()
            if not entries and all(c == b"0-0" for c in self._cursors):
                self._next_claim = now + max(0.1, self.claim_after_ms / 2000)
        else:
            entries = await self._read(b">", block=True)
            if entries:
                await self._handle(entries)
                if len(entries) < self.count * len(self.keys) and self.linger > 0:
                    await self._sleep(self.linger)
            return
        if entries:
            await self._handle(entries)

    async def _read(self, start: bytes, block: bool = False) -> list[_Entry]:
        """``XREADGROUP`` from every stream: new entries (``>``) or this consumer's own
        pending ones (``0``)."""
        args: list[Any] = ["XREADGROUP", "GROUP", GROUP, self.consumer, "COUNT", self.count]
        if block:
            args += ["BLOCK", int(self.block * 1000)]
        args += ["STREAMS", *self.keys, *([start] * len(self.keys))]
        reply = await self._redis.execute_command(*args)
        out: list[_Entry] = []
        for key, items in reply or ():
            for eid, flat in items:
                out.append((key, eid, None if flat is None else dict(zip(flat[::2], flat[1::2], strict=False))))
        return out

    async def _claim(self) -> list[_Entry]:
        """``XAUTOCLAIM`` entries pending for ``archive_claim_after`` (another node's, or
        this node's own from before a restart), continuing each stream's scan."""
        out: list[_Entry] = []
        for i, key in enumerate(self.keys):
            cursor, items, deleted = (await self._redis.execute_command(
                "XAUTOCLAIM", key, GROUP, self.consumer, self.claim_after_ms, self._cursors[i], "COUNT", self.count,
            ))[:3]
            self._cursors[i] = cursor
            for eid, flat in items:
                out.append((key, eid, None if flat is None else dict(zip(flat[::2], flat[1::2], strict=False))))
            if deleted:
                # Pending entries trimmed (MAXLEN) before their node wrote them; XAUTOCLAIM
                # already removed them from the group.
                self._lost("trimmed_pending", len(deleted))
        if out:
            self.stats.claimed += len(out)
            log.info("archive log: took over %d entries pending for more than %.0f s", len(out), self.claim_after_ms / 1000)
        return out

    async def _handle(self, entries: list[_Entry]) -> None:
        """Write the batch (retrying while the store fails), then acknowledge it."""
        msgs: list[StoredMessage] = []
        for key, eid, fields in entries:
            if fields is None:
                self._lost("trimmed_pending", 1)
                continue
            m = parse_entry(fields)
            if m is None:
                self._lost("malformed", 1)
                self.broker._warn("archive-bad", "archive log: skipping a malformed entry %s of %s", eid.decode(errors="replace"), key.decode())
                continue
            msgs.append(m)
        if msgs and not await self._write(msgs):
            return  # stopping before the store took them: they stay pending
        by_key: dict[bytes, list[bytes]] = {}
        for key, eid, _f in entries:
            by_key.setdefault(key, []).append(eid)
        pipe = self._redis.pipeline(transaction=False)
        for key, ids in by_key.items():
            pipe.execute_command("XACK", key, GROUP, *ids)
        # A failed ack leaves them pending: claimed later, found in the store as duplicates.
        await pipe.execute()

    async def _write(self, msgs: list[StoredMessage]) -> bool:
        """Write ``msgs`` until the store took them (True), or the node stops (False)."""
        fails = 0
        while True:
            try:
                refused = await self.write(msgs)
            except StoreUnavailable as e:
                kind, what = "store", str(e)
            except Exception as e:
                kind, what = "store", f"{type(e).__name__}: {e}"
            else:
                if refused:
                    self._lost("refused", refused)
                self.stats.written += len(msgs) - refused
                return True
            self.stats.errors[kind] = self.stats.errors.get(kind, 0) + 1
            self.broker._warn("archive-store", "archive log: writing %d messages failed (%s); kept in Redis, retrying", len(msgs), what)
            if self._stopping:
                return False
            fails += 1
            await self._sleep(self._delay(fails))

    def _lost(self, reason: str, n: int) -> None:
        lost = self.stats.lost
        lost[reason] = lost.get(reason, 0) + n
        if reason.startswith("trimmed"):
            self.broker._warn("archive-lost", "archive log: %d entries trimmed (broker.archive_maxlen) before they were written (%s)", n, reason)

    # ---- upkeep --------------------------------------------------------------------------

    async def _upkeep_loop(self) -> None:
        """:meth:`_check` every :attr:`check_interval`, beside the consumer (which may be
        busy retrying a batch while the store is down: the lag is worth watching then)."""
        next_sweep = time.monotonic() + 60.0
        while not self._stopping:
            now = time.monotonic()
            forget = now >= next_sweep
            if forget:
                next_sweep = now + self.sweep_interval
            try:
                await self._check(forget)
            except (RedisError, OSError, TimeoutError) as e:
                self.stats.errors["redis"] = self.stats.errors.get("redis", 0) + 1
                self.broker._warn("archive-redis", "archive log: redis failed: %s: %s (retrying)", type(e).__name__, e)
            except Exception as e:
                self.stats.errors["other"] = self.stats.errors.get("other", 0) + 1
                self.broker._warn("archive-bug", "archive log: unexpected %s: %s (retrying)", type(e).__name__, e)
            await self._sleep(self.check_interval)

    async def _check(self, forget: bool) -> None:
        """archive_check.lua on every stream: trim, lag, pending, lost entries; with
        ``forget``, also remove consumers that hold nothing and were not seen for
        :attr:`forget_after` seconds."""
        lag = pending = 0
        args = (GROUP, self.consumer, int(self.forget_after * 1000) if forget else 0)
        for key in self.keys:
            try:
                r = await self._redis.evalsha(scripts.ARCHIVE_CHECK.sha, 1, key, *args)
            except NoScriptError:
                r = await self._redis.eval(scripts.ARCHIVE_CHECK.text, 1, key, *args)
            s_lag, s_pending, s_lost = int(r[0]), int(r[1]), int(r[2])
            if s_lag == -2:
                self._groups_ok = False  # no stream or no group (a FLUSHALL): create again
                continue
            lag += max(0, s_lag)
            pending += s_pending
            if s_lost:
                self._lost("trimmed_unread", s_lost)
        self.stats.lag, self.stats.pending = lag, pending
