"""Rooms on one node: publishing into them, leaving them, presence counts and events,
member listings. Membership itself is the engine's: nothing here keeps a copy."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from .._core import Engine
from ..broker import Broker, BrokerError, HistoryPolicy, PublishResult
from ..config import Config
from ..protocol import frames
from ..protocol.codes import Priority
from ..routing import Route, Router
from ..store import StoredMessage, StoreUnavailable
from .members import Members
from .stats import Stats
from .storage import Storage

if TYPE_CHECKING:
    from .session import Client

__all__ = ["Rooms"]

log = logging.getLogger("gateway")


class Rooms:
    def __init__(
        self, config: Config, router: Router, broker: Broker, engine: Callable[[], Engine], members: Members, stats: Stats,
        storage: Storage,
    ) -> None:
        self.config = config
        self.storage = storage
        self.router = router
        self.broker = broker
        self.engine = engine
        self.members = members
        self.stats = stats
        #: Counts of the last presence tick, per local room (cluster-wide when shared).
        self._presence_last: dict[str, tuple[int, int]] = {}
        self._rates_at = time.monotonic()

    # ---- publishing ------------------------------------------------------------------------

    async def publish(
        self, room: str, route: Route, mtype: str, data: Any, prio: int, sender: str | None, idem: str | None = None,
        cid: str | None = None, live: Any = None,
    ) -> PublishResult:
        """Encode once and hand to the broker (one call per message per node), then keep it
        as the route says (:mod:`gateway.app.storage`): a durable message returns once it
        is committed; an archive message is marked for the broker's archive log when it
        keeps one (:attr:`Storage.log_archive`), else queued for the store's writer.
        Raises BrokerError (counted) after local delivery when the broker is down,
        StoreUnavailable when a durable message could not be committed (it was published;
        a retry with the same ``idem``/``cid`` commits it under the same seq)."""
        keep = self.storage.mode(route, mtype) if self.storage.enabled else "none"
        if keep == "durable":
            with self.storage.durable_publish(room):  # (Storage.settled waits for it)
                return await self._publish(room, route, mtype, data, prio, sender, idem, cid, keep, live)
        return await self._publish(room, route, mtype, data, prio, sender, idem, cid, keep, live)

    async def _publish(
        self, room: str, route: Route, mtype: str, data: Any, prio: int, sender: str | None, idem: str | None, cid: str | None, keep: str,
        live: Any = None,
    ) -> PublishResult:
        ts = frames.now_ms()
        cfg = route.cfg
        logged = keep == "archive" and self.storage.log_archive
        # The store's copy of the data (the JSON text); a logged message's is in the frame.
        data_json = orjson.dumps(data) if keep != "none" and not logged else None
        # ``live``: the data as delivered when it differs from what is kept (a media
        # message's URLs, signed for this delivery only).
        shown = live if live is not None else data if data_json is None else orjson.Fragment(data_json)
        head, tail = frames.message_parts(room, mtype, prio, sender, shown, ts)
        recoverable = mtype in cfg.recoverable_types or cfg.conversation
        key = (mtype if mtype in cfg.priorities else "other", prio)
        published = self.stats.published
        published[key] = published.get(key, 0) + 1
        # A kept message needs a seq, and brokers number only what their history holds:
        # a route that keeps messages but shows no history still gets a ring of one.
        policy = HistoryPolicy(max(cfg.history_size, 1) if keep != "none" else cfg.history_size, cfg.history_ttl)
        if keep == "durable" and cid is not None:
            # A retry later than the broker's idempotency window (a phone offline with an
            # unacknowledged send): the store still knows the cid. Answer with the stored
            # message instead of publishing it again under a new seq.
            stored = await self.storage.find_cid(room, sender, cid)
            if stored is not None:
                self.stats.duplicates += 1
                return PublishResult(stored.seq, self.storage.epoch, True)
        for attempt in range(3):
            if keep != "none":
                policy.floor = await self.storage.floor(room, fresh=attempt > 0)
                policy.epoch = self.storage.epoch
            try:
                res = await self.broker.publish(room, head, tail, int(prio), recoverable, policy, idem, (cfg.pattern, cid) if logged else None)
            except BrokerError:
                self.stats.broker_publish_errors += 1
                raise
            if res.duplicate:
                self.stats.duplicates += 1
            if keep == "none" or res.seq <= 0:
                return res
            self.storage.advance(room, res.seq)
            if data_json is None:
                return res  # in the broker's archive log: its consumers store it
            msg = StoredMessage(room, res.seq, ts, mtype, int(prio), sender, data_json, cid, cfg.pattern)
            stored = await self.storage.keep(keep, msg)
            if stored.seq != res.seq:
                # A retry whose first attempt was stored under another seq (the broker's
                # idempotency window had passed): answer with the stored one.
                return PublishResult(stored.seq, res.epoch, True)
            if stored is msg or stored == msg or (cid is not None and stored.cid == cid and stored.sender == sender):
                return res
            # The seq was already taken by a message this node did not know of: the
            # broker started the room afresh (Redis lost its state) from this node's
            # floor, which was older than what another node had stored meanwhile. Number
            # the message again from the store's own last seq (it was delivered under the
            # taken seq: clients that have that seq drop it as a repeat).
            self.stats.seq_collisions += 1
            log.warning("room %s: seq %d was already stored by another node; publishing again after the store's last seq", room, res.seq)
            if idem is not None:
                idem = f"{idem}\x00{attempt + 1}"
        raise StoreUnavailable(f"room {room}: the broker's sequence keeps colliding with stored messages")

    # ---- leaving ---------------------------------------------------------------------------

    async def leave(self, client: Client, room: str, notify: str | None = None) -> bool:
        """Remove ``client`` from ``room`` (client request, ban or room close). With
        ``notify`` (``"banned"``, ``"closed"``) the client is told first, with a presence
        event ``{"op":"presence","room":…,"event":notify,"user":…}``. False when it was
        not a member."""
        eng = self.engine()
        if not eng.is_member(client.conn, room):
            return False
        if notify:
            eng.send(client.conn, frames.presence_event(room, notify, client.user), Priority.HIGH)
        if not eng.leave(client.conn, room):
            return False
        await self.after_leave(client, room)
        return True

    async def after_leave(self, client: Client, room: str) -> None:
        """Bookkeeping once ``client`` is out of ``room`` (a leave or its disconnect)."""
        conns, _ = self.engine().room_counts(room)
        if conns == 0:
            await self.broker.unsubscribe(room)
        route = self.router.match(room)
        if route is not None and route.cfg.conversation:
            return  # attached by sync, not joined: no presence event, no leave to report
        if route is not None:
            await self.presence_change(room, route, "leave", client.user)
        self.members.on_leave(client, room)

    # ---- presence --------------------------------------------------------------------------

    async def presence_change(self, room: str, route: Route, event: str, user: str) -> None:
        """A join/leave event to the room's members, in rooms up to the route's
        ``presence_events_max_members``."""
        limit = route.cfg.presence_events_max_members
        if limit and self.engine().room_counts(room)[0] <= limit:
            try:
                await self.broker.publish_frame(room, frames.presence_event(room, event, user), Priority.LOW)
            except BrokerError:
                self.stats.broker_publish_errors += 1

    def join_counts(self, room: str) -> tuple[int, int]:
        """(conns, users) for a join ack, without a broker round trip: this node's exact
        counts; with shared presence, at least the cluster-wide counts of the last
        presence tick (``presence.interval`` old at most)."""
        conns, users = self.engine().room_counts(room)
        last = self._presence_last.get(room)
        if last is not None and self.broker.presence.shared:
            conns, users = max(conns, last[0]), max(users, last[1])
        return conns, users

    async def counts(self, room: str) -> tuple[int, int]:
        """(connections, users) in ``room`` across nodes."""
        return await self.broker.presence.counts(room)

    async def presence_loop(self) -> None:
        interval = self.config.presence.interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.presence_tick()
            except Exception:
                log.exception("presence tick failed")

    async def presence_tick(self) -> None:
        """Report this node's counts, send changed counts to each local room, share the
        member lists of small rooms."""
        eng = self.engine()
        local = {room: (c, u) for room, c, u in eng.rooms()}
        presence = self.broker.presence
        shared = presence.shared
        try:
            await presence.report(local)
        except BrokerError:
            shared = False  # Redis unreachable (logged by the broker): local counts meanwhile
        last = self._presence_last
        fresh: dict[str, tuple[int, int]] = {}
        for room, counts in local.items():
            if shared:
                try:
                    counts = await presence.counts(room)
                except BrokerError:
                    shared = False
            fresh[room] = counts
            if last.get(room) != counts:
                eng.publish(room, frames.presence_counts(room, *counts), Priority.LOW)
        self._presence_last = fresh
        self._update_room_rates(local)
        if shared:
            await self._report_members(local)

    async def _report_members(self, local: dict[str, tuple[int, int]]) -> None:
        """Share the member lists of small rooms (route ``presence_events_max_members``)
        with the other nodes, so member listings of those rooms cover the cluster."""
        eng = self.engine()
        small: dict[str, list[dict[str, Any]]] = {}
        for room, (conns, _users) in local.items():
            route = self.router.match(room)
            limit = route.cfg.presence_events_max_members if route is not None else 0
            if 0 < conns <= limit:
                small[room] = [{"user": user, "meta": orjson.loads(meta) if meta else {}} for _conn, user, meta in eng.room_members(room, 0, limit)]
        try:
            await self.broker.presence.report_members(small)
        except BrokerError:
            pass  # counted and logged by the broker; listings fall back to local members

    def _update_room_rates(self, local: dict[str, tuple[int, int]]) -> None:
        """Messages/s per local room since the last tick (for the top-rooms metrics);
        rooms without local members are forgotten, so this stays bounded."""
        now = time.monotonic()
        elapsed = max(now - self._rates_at, 1e-3)
        counts = self.stats.room_messages
        self.stats.room_rates = {r: n / elapsed for r, n in counts.items() if r in local}
        counts.clear()
        self._rates_at = now

    # ---- member listings -------------------------------------------------------------------

    def local_members(self, room: str, offset: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Local members of ``room`` (user ids and meta), paged."""
        return [
            {"conn": conn, "user": user, "meta": orjson.loads(meta) if meta else {}}
            for conn, user, meta in self.engine().room_members(room, offset, limit)
        ]

    async def members_everywhere(self, room: str, offset: int = 0, limit: int = 100) -> tuple[list[dict[str, Any]], str]:
        """Members of ``room`` on every node when presence is shared and the room is small
        (its route's ``presence_events_max_members``), else this node's. Returns
        ``(members, scope)`` with scope ``"cluster"`` or ``"node"``."""
        try:
            shared = await self.broker.presence.members(room)
        except BrokerError:
            shared = None
        if shared:
            return shared[offset : offset + limit], "cluster"
        return self.local_members(room, offset, limit), "node"
