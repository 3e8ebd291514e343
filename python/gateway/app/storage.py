"""What the node keeps of its rooms: the bridge between publishing and the store.

Each route says what is kept (``store = "none" | "archive" | "durable"``, see
:class:`~gateway.routing.RouteConfig`). A kept message is stored under the ``seq`` the
broker gave it:

- ``durable`` types are committed before the publisher's ack (:meth:`Storage.keep`
  awaits the store's group commit); the fan-out does not wait for the commit, the ack
  does. A publish whose commit fails is answered with error 5030: the client retries with
  the same ``cid`` and gets the same ``seq``;
- ``archive`` types (and the recoverable types of a durable route that are not durable)
  never hold up the publish. With a broker that keeps an archive log (the Redis broker,
  :attr:`~gateway.broker.Broker.archives`) the publish itself appends them to the log,
  and every node's consumer writes the log to the store (exactly once across the nodes,
  whichever node dies: :mod:`gateway.broker.redis.archive`); otherwise (the memory
  broker) they are queued in this node's memory for the store's writer
  (:meth:`~gateway.store.Store.archive`).

Rooms that keep messages continue their sequence from the store when the broker starts
them afresh: every publish into them carries the room's floor (:meth:`Storage.floor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING

from ..broker import HistoryResult
from ..config import Config, StoreConfig
from ..protocol import frames
from ..routing import Route, Router
from ..store import Store, StoredMessage, StoreUnavailable

if TYPE_CHECKING:
    from ..broker import Broker

__all__ = ["Storage", "open_store"]

log = logging.getLogger("gateway")

#: Rooms whose floor is remembered (about 150 bytes each).
_FLOORS = 100_000
#: Seconds a floor read from the store is trusted (other nodes number the room too).
_FLOOR_TTL = 30.0


def open_store(cfg: StoreConfig) -> Store:
    """The configured store, not started yet."""
    if cfg.kind == "postgres":
        from ..store.postgres import PostgresStore

        return PostgresStore(
            cfg.dsn, batch_ms=cfg.batch_ms, max_batch=cfg.max_batch, max_backlog=cfg.max_backlog, pool_size=cfg.pool_size,
            writers=cfg.writers, timeout=cfg.timeout,
        )
    from ..store.sqlite import SqliteStore

    return SqliteStore(
        cfg.path, batch_ms=cfg.batch_ms, max_batch=cfg.max_batch, max_backlog=cfg.max_backlog, readers=cfg.pool_size,
        synchronous=cfg.synchronous.upper(),
    )


class Storage:
    """The node's store, if a route keeps messages, and the decisions about it."""

    def __init__(self, config: Config, router: Router, broker: Broker) -> None:
        self.config = config
        self.router = router
        self.broker = broker
        self.store: Store | None = open_store(config.store) if config.needs_store else None
        if self.store is not None:
            self.store.outbox = bool(config.outbox.endpoints)
        #: Archive messages go through the broker's archive log (marked in the publish),
        #: not through :meth:`Store.archive`.
        self.log_archive = self.store is not None and broker.archives
        #: cid look-ups waiting for the next batch (see :meth:`find_cid`).
        self._cid_wanted: list[tuple[tuple[str, str, str], str | None, asyncio.Future[StoredMessage | None]]] = []
        self._cid_busy = False
        self._cid_task: asyncio.Future[None] | None = None
        #: room -> (highest seq known taken, when read from the store): a bounded LRU; a
        #: miss or an old entry asks the store.
        self._floors: OrderedDict[str, tuple[int, float]] = OrderedDict()
        #: room -> this node's durable publishes in flight (published, or about to be,
        #: and not committed yet): see :meth:`settled`.
        self._inflight: dict[str, list[asyncio.Future[None]]] = {}

    @property
    def enabled(self) -> bool:
        return self.store is not None

    @property
    def epoch(self) -> str:
        """The epoch a room that keeps messages takes when the broker starts it afresh."""
        return self.store.epoch if self.store is not None else ""

    async def start(self) -> None:
        """Start the store; before the broker starts, so that it consumes its archive log."""
        if self.store is not None:
            await self.store.start()
            log.info("message store: %s (%s); archive messages %s", self.store.kind,
                     self.config.store.path if self.store.kind == "sqlite" else "postgres",
                     "through the broker's archive log" if self.log_archive else "written behind from this node's memory")
            if self.log_archive:
                self.broker.consume_archive(self.store.write_archive)

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()

    @staticmethod
    def mode(route: Route, mtype: str) -> str:
        """``"none"``, ``"archive"`` or ``"durable"`` for a message of ``mtype`` in a room of
        ``route``. Only recoverable types (those with a ``seq``) are kept; in a
        conversation every type is."""
        cfg = route.cfg
        if cfg.store == "none" or (mtype not in cfg.recoverable_types and not cfg.conversation):
            return "none"
        if cfg.store == "durable" and (cfg.durable_types is None or mtype in cfg.durable_types):
            return "durable"
        return "archive"

    async def floor(self, room: str, *, fresh: bool = False) -> int:
        """The highest ``seq`` known to be taken in ``room`` (what the store holds, or this
        node published since): the broker numbers on from there when it starts the room
        afresh (see :class:`~gateway.broker.HistoryPolicy`). Re-read from the store every
        :data:`_FLOOR_TTL` seconds (other nodes publish into the room too), or now with
        ``fresh``."""
        known = self._floors.get(room)
        now = time.monotonic()
        if known is not None and now - known[1] < _FLOOR_TTL and not fresh:
            self._floors.move_to_end(room)
            return known[0]
        assert self.store is not None
        try:
            last = await self.store.last_seq(room)
        except StoreUnavailable:
            # The database is down: number on from what this node knows (archive and
            # none routes keep working; the store is asked again next time).
            return known[0] if known is not None else 0
        self._remember(room, max(last, known[0] if known else 0), now)
        return self._floors[room][0]

    def advance(self, room: str, seq: int) -> None:
        """``seq`` is taken in ``room`` (published by this node)."""
        known = self._floors.get(room)
        if known is not None and seq > known[0]:
            self._floors[room] = (seq, known[1])

    def seen(self, room: str, frame: bytes) -> None:
        """A room message arrived from the broker (from any node): its seq is taken. Only
        rooms this node numbers from (in its floors) pay for reading it."""
        known = self._floors.get(room)
        if known is not None and frame.startswith(b'{"op":"msg"'):
            seq = frames.seq_of(frame)
            if seq > known[0]:
                self._floors[room] = (seq, known[1])

    def _remember(self, room: str, seq: int, at: float) -> None:
        floors = self._floors
        floors[room] = (seq, at)
        floors.move_to_end(room)
        if len(floors) > _FLOORS:
            floors.popitem(last=False)

    def keeps(self, route: Route) -> bool:
        """Whether rooms of ``route`` have their messages in the store."""
        return self.store is not None and route.cfg.store != "none"

    async def position(self, room: str, h: HistoryResult) -> tuple[int, str]:
        """The room's (seq, epoch), given what the broker knows (``h``): the broker's when
        it has numbered past the store, else the store's, read afresh (other nodes may
        have stored more since this node last looked; a room the broker starts afresh
        continues from the store under :attr:`epoch`)."""
        known = self._floors.get(room)
        if h.seq > 0 and known is not None and h.seq >= known[0]:
            return h.seq, h.epoch
        assert self.store is not None
        last = await self.store.last_seq(room)
        self._remember(room, max(last, known[0] if known else 0), time.monotonic())
        floor = self._floors[room][0]
        if h.seq >= floor and h.seq > 0:
            return h.seq, h.epoch
        return floor, self.epoch

    async def complete(self, room: str, h: HistoryResult, *, limit: int, since: int | None, epoch: str | None) -> HistoryResult:
        """``h`` (the broker's answer to a join's history or resume) completed from the
        store: older messages the ring no longer holds, a resume the ring cannot serve."""
        assert self.store is not None
        seq, cur_epoch = await self.position(room, h)
        ring = [(frames.seq_of(f), f) for f in h.messages]
        if since is None:
            if len(ring) >= limit or limit <= 0:
                return HistoryResult(h.messages, seq, cur_epoch, None)
            first = ring[0][0] if ring else seq + 1
            older = await self.store.messages(room, before_seq=first, limit=limit - len(ring))
            return HistoryResult([m.frame(cur_epoch) for m in older] + h.messages, seq, cur_epoch, None)
        if h.recovered or epoch != cur_epoch or since > seq:
            # Served by the ring, or another numbering: the client must resync.
            return HistoryResult(h.messages, seq, cur_epoch, h.recovered if h.recovered else False)
        stored = await self.store.messages(room, after_seq=since, limit=limit)
        msgs = [m.frame(cur_epoch) for m in stored]
        top = stored[-1].seq if stored else since
        msgs += [f for s, f in ring if s > top]
        have = [m.seq for m in stored] + [s for s, _ in ring if s > top]
        # Recovered: every seq after the client's position, up to the room's, is here.
        recovered = have == list(range(since + 1, seq + 1))
        return HistoryResult(msgs, seq, cur_epoch, recovered)

    async def page(self, room: str, before_seq: int | None, limit: int, after_seq: int | None = None) -> tuple[list[bytes], str, bool]:
        """Messages before ``before_seq`` (newest first page when None), or the first ones
        after ``after_seq`` (paging forward), oldest first; the epoch they are framed with
        (the room's current one), and whether more remain in the paging direction."""
        assert self.store is not None
        _, epoch = await self.position(room, await self.broker.history(room, limit=0))
        msgs = await self.store.messages(room, before_seq=before_seq, after_seq=after_seq, limit=limit + 1)
        more = len(msgs) > limit
        if more:
            msgs = msgs[:limit] if after_seq is not None else msgs[-limit:]
        return [m.frame(epoch) for m in msgs], epoch, more

    async def find_cid(self, room: str, sender: str | None, cid: str) -> StoredMessage | None:
        """The message stored in ``room`` with ``(sender, cid)``, or None (also when the
        store cannot say: the publish then goes on, and its commit catches a duplicate).

        NOTE: asked before every durable publish with a cid, so look-ups are batched like
        commits: those asked while a batch is out go in the next one, one store round trip
        each (one query per batch rather than a pooled connection per publish: with one
        per publish, 9,000 dm publishes/s on PostgreSQL queued behind the pool for
        seconds)."""
        assert self.store is not None
        key = (room, sender or "", cid)
        fut: asyncio.Future[StoredMessage | None] = asyncio.get_running_loop().create_future()
        self._cid_wanted.append((key, sender, fut))
        if not self._cid_busy:
            self._cid_busy = True
            self._cid_task = asyncio.ensure_future(self._find_cids())
        return await fut

    async def _find_cids(self) -> None:
        assert self.store is not None
        try:
            while self._cid_wanted:
                batch, self._cid_wanted = self._cid_wanted, []
                try:
                    found = await self.store.find_cids([(k[0], sender, k[2]) for k, sender, _f in batch])
                except Exception as e:  # unavailable (or a bug): the commit still catches a duplicate
                    if not isinstance(e, StoreUnavailable):
                        log.exception("looking up cids failed")
                    found = {}
                for key, _sender, fut in batch:
                    if not fut.done():
                        fut.set_result(found.get(key))
        finally:
            self._cid_busy = False

    @contextlib.contextmanager
    def durable_publish(self, room: str) -> Iterator[None]:
        """Around a durable publish, from before the broker sees it until its commit
        ended (either way): what :meth:`settled` waits for."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pending = self._inflight.setdefault(room, [])
        pending.append(fut)
        try:
            yield
        finally:
            fut.set_result(None)
            pending.remove(fut)
            if not pending:
                del self._inflight[room]

    async def settled(self, rooms: Collection[str]) -> None:
        """Wait until this node's durable publishes into ``rooms`` that are in flight now
        are committed (or failed), at most ``store.timeout``. A connection attached to
        ``rooms`` gets later messages live; a snapshot read after this has every message
        this node fanned out before (they are fanned out before the commit)."""
        if not self._inflight:
            return
        waits = [f for room, fs in self._inflight.items() if room in rooms for f in fs]
        if waits:
            await asyncio.wait(waits, timeout=self.config.store.timeout)

    async def keep(self, mode: str, msg: StoredMessage) -> StoredMessage:
        """Store ``msg`` as ``mode`` says. Durable: returns the stored message once
        committed (its ``seq`` is the first one when this was a retry); raises
        StoreUnavailable. Archive: queues it and returns it (not called for archive
        messages when :attr:`log_archive`: the broker's log has them)."""
        assert self.store is not None
        if mode == "durable":
            return await self.store.commit(msg)
        self.store.archive(msg)
        return msg

    async def retention_loop(self) -> None:
        """Delete messages older than their route's ``retention_days``, in batches, every
        ``store.retention_interval`` seconds."""
        store = self.store
        if store is None:
            return
        routes = [r for r in self.config.routes if r.store != "none" and r.retention_days > 0]
        if not routes:
            return
        while True:
            for r in routes:
                before = int((time.time() - r.retention_days * 86400) * 1000)
                try:
                    while await store.expire(r.pattern, before) >= 5000:
                        await asyncio.sleep(0)
                except Exception as e:  # logged; the next round tries again
                    log.warning("retention of %s failed: %s", r.pattern, e)
            await asyncio.sleep(self.config.store.retention_interval)
