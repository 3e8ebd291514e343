"""The outbox: stored messages and room events delivered to the company's HTTP endpoints,
in order per room, at least once, signed, retried, with dead letters.

Where events come from. The store keeps an *outbox log* (see
:meth:`gateway.store.Store.outbox_read`): every message the store writes adds an entry
in the message's own transaction (durable and archive routes, client and server
publishes alike), and :meth:`Outbox.record` adds room events (join, leave, kick, ban)
through the store's writer. Nothing is kept in this process's memory alone: a restart,
a crash or an endpoint that is down for a day loses nothing that reached the log.

Who delivers. One node at a time: the holder of the store's ``outbox`` lease
(:meth:`~gateway.store.Store.lead`: a file lock for SQLite, an advisory lock for
PostgreSQL). The others stand by and take over when the holder dies. Each endpoint has
its own cursor in the store, saved after every delivered batch: a new leader goes on
from there (so an event may be delivered twice, never skipped).

How. Per endpoint, a loop reads the log after its cursor, picks what the endpoint asked
for (``rooms`` patterns, ``types``, ``events``), and POSTs it in batches of up to
``batch`` events::

    POST <url>
    Content-Type: application/json
    X-Gateway-Delivery: <endpoint>:<id of the first event>   (the same on every retry)
    X-Gateway-Attempt: 1, 2, ...
    X-Gateway-Timestamp: <unix seconds>
    X-Gateway-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>

    {"events": [{"id": "msg:cs:42:17", "event": "message", "room": "cs:42", "seq": 17, ...}, ...]}

A 2xx answer delivers the batch. 400, 413 and 422 say the payload itself is refused: the
batch is split until the refused event is alone, and that one becomes a dead letter at
once (the endpoint said it will never take it). Anything else (a connection error, a
timeout, 5xx, 429, 401...) is retried, after ``Retry-After`` when the answer has one,
else after a delay doubling from ``backoff_min`` to ``backoff_max``; once the endpoint
has been failing for ``dead_letter_after`` seconds, each batch that fails again goes to
the dead letters, and the next one is tried.

Order. Events of one room reach an endpoint in the room's order: messages by ``seq``
(a batch carries them sorted), events where they were logged. Messages of one room
committed by two nodes at once can enter the log out of seq order; the deliverer holds a
room's message back while an earlier seq is missing, for up to ``gap_wait`` seconds
(the earlier one is still being committed elsewhere), then sends what it has: a seq that
never came (a failed durable publish, an archive message dropped under overload) costs
that wait once.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import fnmatch
import functools
import hashlib
import hmac
import itertools
import logging
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from ..config import OutboxConfig, OutboxEndpoint
from ..store import OutboxEntry, StoreUnavailable

if TYPE_CHECKING:
    import aiohttp

    from ..store import Lease, Store

__all__ = ["Outbox"]

log = logging.getLogger("gateway.outbox")

#: Answers that refuse the payload itself: split the batch, bury the event at fault.
REFUSED = frozenset((400, 413, 422))
#: Log entries read at a time.
READ_LIMIT = 500
#: Rooms whose last delivered seq an endpoint remembers (for the gap wait).
LAST_SEQS = 100_000
#: Seconds between checks that the lease is still held, and between trims of the log.
LEASE_CHECK, TRIM_INTERVAL = 2.0, 30.0
#: Seconds a standing-by node waits before it tries to take the lease again.
STANDBY_RETRY = 5.0

#: An event to send: (id, room, the JSON object).
Event = tuple[str, str, bytes]


@dataclass
class EndpointStats:
    """Per-endpoint figures for ``/metrics`` (``gateway_outbox_*{endpoint}``)."""

    delivered: int = 0
    dead: int = 0
    #: Failed attempts by reason (``timeout``, ``connect``, ``http_5xx``, ``http_429``...).
    failures: dict[str, int] = field(default_factory=dict)
    #: Entries after the cursor (about), and seconds since the oldest of them was logged.
    backlog: int = 0
    lag: float = 0.0
    last_error: str = ""
    #: Since when (monotonic seconds) every attempt failed; None while it works.
    failing_since: float | None = None


class _Endpoint:
    def __init__(self, cfg: OutboxEndpoint) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.key = cfg.signing_key().encode()
        self.all_rooms = "*" in cfg.rooms
        self.types = frozenset(cfg.types)
        self.events = frozenset(cfg.events)
        self.stats = EndpointStats()
        self.cursor: str | None = None
        #: room -> the highest seq delivered (or passed over): the gap wait's reference.
        self.last_seq: OrderedDict[str, int] = OrderedDict()

    def wants_room(self, room: str) -> bool:
        return self.all_rooms or any(fnmatch.fnmatchcase(room, p) for p in self.cfg.rooms)

    def wants(self, e: OutboxEntry) -> bool:
        if e.endpoint is not None:
            return e.endpoint == self.name
        if e.kind == "message":
            m = e.message
            if m is None or "message" not in self.events or (self.types and m.type not in self.types):
                return False
        elif e.kind not in self.events:
            return False
        return self.wants_room(e.room) if e.room else True


class Outbox:
    """The node's outbox: :meth:`record` room events; :meth:`run` delivers while this
    node holds the lease. See the module docstring."""

    def __init__(self, cfg: OutboxConfig, store: Store | None, node_id: str) -> None:
        self.cfg = cfg
        self.store = store if cfg.endpoints else None
        self.node_id = node_id
        self.endpoints = [_Endpoint(ep) for ep in cfg.endpoints]
        kinds = {k for ep in self.endpoints for k in ep.events}
        #: Room events some endpoint asked for.
        self.kinds = frozenset(kinds - {"message"})
        #: True while this node delivers.
        self.leader = False
        self._ids = itertools.count(1)
        self._boot = secrets.token_hex(3)
        self._session: aiohttp.ClientSession | None = None
        self._lease: Lease | None = None

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def wants(self, kind: str) -> bool:
        """Whether some endpoint gets room events of ``kind``."""
        return kind in self.kinds

    # ---- recording -------------------------------------------------------------------

    def record(self, room: str, kind: str, **fields: Any) -> bool:
        """Log a room event (``kind``: ``join``, ``leave``, ``kick``, ``ban``; ``room``
        empty for events about a user everywhere, which every endpoint that asked for the
        kind gets, whatever its ``rooms``) for the endpoints that asked for it.
        Never blocks; False when nobody asked or the store refused it (its backlog is
        full: counted in ``gateway_store_events_dropped_total``)."""
        store = self.store
        if store is None or kind not in self.kinds:
            return False
        if not any(kind in ep.events and (ep.wants_room(room) if room else True) for ep in self.endpoints):
            return False
        body = {**fields, "id": f"evt:{self.node_id}:{self._boot}:{next(self._ids)}", "event": kind, "room": room,
                "ts": int(time.time() * 1000), "node": self.node_id}
        return store.event(room, kind, orjson.dumps(body))

    # ---- delivering ------------------------------------------------------------------

    async def run(self) -> None:
        """Take the lease when it is free, deliver while it is held, stand by otherwise.
        Runs until cancelled."""
        store = self.store
        if store is None:
            return
        import aiohttp

        self._session = aiohttp.ClientSession(auto_decompress=False, connector=aiohttp.TCPConnector(limit=len(self.endpoints) * 2))
        try:
            while True:
                try:
                    lease = await store.lead("outbox")
                except StoreUnavailable as e:
                    log.warning("outbox: cannot reach the store to take the lease (%s)", e)
                    lease = None
                if lease is None:
                    await asyncio.sleep(STANDBY_RETRY)
                    continue
                self._lease, self.leader = lease, True
                log.info("outbox: this node delivers to %s", ", ".join(ep.name for ep in self.endpoints))
                try:
                    await self._lead(lease)
                finally:
                    self.leader = False
                    self._lease = None
                    await lease.release()
                log.warning("outbox: lease lost; standing by")
        finally:
            await self._session.close()
            self._session = None

    async def _lead(self, lease: Lease) -> None:
        """Serve every endpoint until the lease is lost (returns) or cancelled."""
        tasks = [asyncio.create_task(self._serve(ep), name=f"outbox-{ep.name}") for ep in self.endpoints]
        tasks.append(asyncio.create_task(self._trim_loop(), name="outbox-trim"))
        try:
            while await lease.alive():
                await asyncio.sleep(LEASE_CHECK)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    async def _store_call(self, what: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the store, retried (backing off) while it is unavailable."""
        delay = 0.1
        while True:
            try:
                return await fn(*args)
            except StoreUnavailable as e:
                log.warning("outbox: %s failed (%s), retried in %.1f s", what, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _serve(self, ep: _Endpoint) -> None:
        """Deliver to ``ep`` until cancelled; a bug in one round is logged and the round
        is tried again (from the saved cursor) a second later."""
        while True:
            try:
                await self._serve_rounds(ep)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox %s: delivery round failed; trying again", ep.name)
                await asyncio.sleep(1.0)

    async def _serve_rounds(self, ep: _Endpoint) -> None:
        store = self.store
        assert store is not None
        ep.cursor = await self._store_call("reading the cursor", store.outbox_cursor, ep.name)
        ep.last_seq.clear()
        idle = self.cfg.poll_interval
        next_lag = 0.0
        while True:
            now = time.monotonic()
            if now >= next_lag:
                next_lag = now + 1.0
                await self._measure(ep)
            entries: list[OutboxEntry] = await self._store_call("reading the log", store.outbox_read, ep.cursor, READ_LIMIT)
            await self._learn_rooms(ep, entries)
            take = self._ready(ep, entries)
            if take == 0:
                await asyncio.sleep(idle if not entries else min(idle, 0.05))
                continue
            batch = entries[:take]
            events = [self._event(e) for e in _in_room_order(batch) if ep.wants(e)]
            for i in range(0, len(events), ep.cfg.batch):
                await self._deliver(ep, events[i:i + ep.cfg.batch])
            for e in batch:
                if e.kind == "message" and e.seq is not None and e.seq > ep.last_seq.get(e.room, 0):
                    ep.last_seq[e.room] = e.seq
                    ep.last_seq.move_to_end(e.room)
            while len(ep.last_seq) > LAST_SEQS:
                ep.last_seq.popitem(last=False)
            ep.cursor = batch[-1].position
            await self._store_call("saving the cursor", store.outbox_save, ep.name, ep.cursor)
            if take == len(entries) and len(entries) < READ_LIMIT:
                await self._measure(ep)

    async def _learn_rooms(self, ep: _Endpoint, entries: Sequence[OutboxEntry]) -> None:
        """Give each room of ``entries`` this endpoint has no last seq for (a new room, or
        every room after a start or a takeover) the gap wait's base: the highest seq the
        store holds below the lowest one read. Two nodes may log seq 2 before seq 1 is
        committed; the first seq read is not a safe base."""
        store = self.store
        assert store is not None
        lowest: dict[str, int] = {}
        for e in entries:
            if e.kind == "message" and e.seq is not None and e.room not in ep.last_seq:
                lowest[e.room] = min(lowest.get(e.room, e.seq), e.seq)
        rooms = list(lowest.items())
        for i in range(0, len(rooms), 16):
            chunk = rooms[i:i + 16]
            found = await asyncio.gather(*(
                self._store_call("reading a room's last seq", functools.partial(store.messages, room, before_seq=seq, limit=1))
                for room, seq in chunk))
            for (room, _), below in zip(chunk, found, strict=True):
                ep.last_seq[room] = below[-1].seq if below else 0

    def _ready(self, ep: _Endpoint, entries: Sequence[OutboxEntry]) -> int:
        """How many of ``entries`` (from the front) can go now: the longest prefix in
        which no room misses a seq that may still come (see ``gap_wait``)."""
        wait_ms = self.cfg.gap_wait * 1000.0
        now_ms = time.time() * 1000.0
        # room -> [base (last delivered), count of seqs above it, highest seq, oldest ts]
        rooms: dict[str, list[int]] = {}
        young_gaps: set[str] = set()
        ok = 0
        for i, e in enumerate(entries):
            if e.kind == "message" and e.seq is not None:
                st = rooms.get(e.room)
                if st is None:
                    last = ep.last_seq.get(e.room)
                    st = rooms[e.room] = [last if last is not None else e.seq - 1, 0, 0, e.ts]
                if e.seq > st[0]:  # at or below it: late, sent as it is
                    st[1] += 1
                    st[2] = max(st[2], e.seq)
                    st[3] = min(st[3], e.ts)
                    # Seqs above the base the batch lacks, while its oldest is young: wait.
                    if st[2] - st[0] != st[1] and now_ms - st[3] < wait_ms:
                        young_gaps.add(e.room)
                    else:
                        young_gaps.discard(e.room)
            if not young_gaps:
                ok = i + 1
        return ok

    def _event(self, e: OutboxEntry) -> Event:
        """(id, room, JSON object) of a log entry."""
        m = e.message
        if m is not None:
            eid = f"msg:{m.room}:{m.seq}"
            body = orjson.dumps({
                "id": eid, "event": "message", "room": m.room, "seq": m.seq, "ts": m.ts, "type": m.type, "prio": m.prio,
                "from": m.sender, "cid": m.cid, "route": m.route, "data": orjson.Fragment(m.data),
            })
            return eid, m.room, body
        body = e.body or b"{}"
        try:
            eid = str(orjson.loads(body).get("id", ""))
        except (orjson.JSONDecodeError, AttributeError):
            eid = ""
        return eid or f"log:{e.position}", e.room, body

    async def _deliver(self, ep: _Endpoint, events: list[Event]) -> None:
        """POST ``events`` until they are delivered or dead letters (see the module
        docstring). Returns once every one of them is either."""
        attempt = 0
        delay = self.cfg.backoff_min
        while True:
            attempt += 1
            status, retry_after, error = await self._post(ep, events, attempt)
            st = ep.stats
            if 200 <= status < 300:
                st.delivered += len(events)
                st.failing_since = None
                return
            reason = f"http_{status}" if status else error.split(":", 1)[0]
            st.failures[reason] = st.failures.get(reason, 0) + 1
            st.last_error = error
            if status in REFUSED:
                if len(events) > 1:
                    half = len(events) // 2
                    await self._deliver(ep, events[:half])
                    await self._deliver(ep, events[half:])
                else:
                    await self._bury(ep, events, error)
                return
            now = time.monotonic()
            if st.failing_since is None:
                st.failing_since = now
                log.warning("outbox %s: delivery failing (%s); retrying", ep.name, error)
            if now - st.failing_since >= self.cfg.dead_letter_after:
                await self._bury(ep, events, error)
                return
            wait = min(retry_after, self.cfg.retry_after_max) if retry_after is not None else delay * random.uniform(0.8, 1.2)
            delay = min(delay * 2, self.cfg.backoff_max)
            await asyncio.sleep(wait)

    async def _post(self, ep: _Endpoint, events: list[Event], attempt: int) -> tuple[int, float | None, str]:
        """One attempt: (HTTP status or 0, Retry-After seconds or None, error text)."""
        import aiohttp

        assert self._session is not None
        body = b'{"events":[' + b",".join(e[2] for e in events) + b"]}"
        ts = str(int(time.time()))
        headers = {
            **ep.cfg.headers,
            "Content-Type": "application/json",
            "User-Agent": "livegate-outbox",
            "X-Gateway-Delivery": f"{ep.name}:{events[0][0]}",
            "X-Gateway-Attempt": str(attempt),
            "X-Gateway-Timestamp": ts,
        }
        if ep.key:
            digest = hmac.new(ep.key, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
            headers["X-Gateway-Signature"] = f"sha256={digest}"
        try:
            async with self._session.post(ep.cfg.url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=ep.cfg.timeout)) as resp:
                await resp.content.read(65536)  # the answer is not used; bounded
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
                return status, retry_after, f"HTTP {status} from {ep.cfg.url}"
        except TimeoutError:
            return 0, None, f"timeout: no answer from {ep.cfg.url} within {ep.cfg.timeout:g} s"
        except aiohttp.ClientError as e:
            return 0, None, f"connect: {ep.cfg.url}: {e}"

    async def _bury(self, ep: _Endpoint, events: list[Event], error: str) -> None:
        assert self.store is not None
        await self._store_call("keeping dead letters", self.store.outbox_bury, ep.name, events, error)
        ep.stats.dead += len(events)
        log.error("outbox %s: %d event(s) moved to the dead letters (%s)", ep.name, len(events), error)

    async def _measure(self, ep: _Endpoint) -> None:
        """Refresh the endpoint's backlog and lag figures."""
        assert self.store is not None
        try:
            n, ts = await self.store.outbox_backlog(ep.cursor)
        except StoreUnavailable:
            return
        ep.stats.backlog = n
        ep.stats.lag = max(0.0, time.time() - ts / 1000.0) if ts else 0.0

    async def _trim_loop(self) -> None:
        """Delete log entries every endpoint is past, every :data:`TRIM_INTERVAL`."""
        store = self.store
        assert store is not None
        while True:
            await asyncio.sleep(TRIM_INTERVAL)
            cursors = [ep.cursor for ep in self.endpoints]
            if any(c is None for c in cursors):
                continue
            upto = min((c for c in cursors if c is not None), key=store.outbox_order)
            try:
                n = await store.outbox_trim(upto)
            except StoreUnavailable as e:
                log.warning("outbox: trimming the log failed (%s)", e)
                continue
            except Exception:
                log.exception("outbox: trimming the log failed")
                continue
            if n:
                log.debug("outbox: %d delivered entries trimmed", n)


def _in_room_order(entries: Sequence[OutboxEntry]) -> list[OutboxEntry]:
    """``entries`` with each room's messages sorted by seq, in the slots its messages
    held (other entries keep their place)."""
    slots: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        if e.kind == "message" and e.seq is not None:
            slots.setdefault(e.room, []).append(i)
    out = list(entries)
    for idx in slots.values():
        if len(idx) > 1:
            ordered = sorted((entries[i] for i in idx), key=lambda e: e.seq or 0)
            for i, e in zip(idx, ordered, strict=True):
                out[i] = e
    return out


def _retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
