"""Conversations: rooms whose members and messages outlive the sockets (docs/protocol.md,
"Conversations").

What lives where:

- **Members** are rows in the store (:meth:`gateway.store.Store.members`), cached here
  for a short while per (conversation, user); every node forgets a cached row when the
  :class:`~gateway.broker.commands.ConvMember` command says it changed.
- **Messages** are room messages of routes whose ``kind`` is ``dm``, ``group`` or
  ``notice``: published through :meth:`Rooms.publish <gateway.app.rooms.Rooms.publish>`
  (one broker publish per message per node, committed before the ack), numbered per
  conversation.
- **Delivery without join**: after its first ``sync`` a connection is *attached*: put in
  the engine room of each of its user's conversations (the most recently active
  ``conversations.max_attached``), and the node subscribes to them in the broker once,
  not once per member. A user added to a conversation later is attached on every node
  by the ``ConvMember`` command; a removed one detached.
- **Unread** is arithmetic (last seq minus read seq). A sender's own messages count as
  read: their read position moves with each message, written in batches
  (``conversations.read_flush_interval``), never on the path of the ack.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from .._core import Engine
from .._eager import run_eager
from ..broker import Broker, BrokerError, ConvMember
from ..config import Config
from ..errors import Reject
from ..protocol import frames
from ..protocol.codes import ErrorCode, Priority
from ..protocol.requests import Create, History, Invite, Read, Recall, Remove, Sync, Typing
from ..routing import Route, Router, valid_room_name
from ..store import ConversationState, Member, Store, StoreUnavailable, TooManyMembers
from .plugins import MemberChange
from .storage import Storage

if TYPE_CHECKING:
    from ..media.service import Media
    from .hooks import Hooks
    from .outbox import Outbox
    from .rooms import Rooms
    from .session import Client
    from .stats import Stats
    from .tasks import Tasks

__all__ = ["Conversations", "dm_room"]

log = logging.getLogger("gateway")

#: (conversation, user) rows cached, and for how long (seconds): a row changed on another
#: node is forgotten at once (ConvMember), this only bounds a lost command's effect.
_MEMBERS, _MEMBER_TTL = 100_000, 30.0
#: Conversations known to exist (a dm's first message creates it).
_KNOWN = 100_000
#: Conversations one sync reads at most (changed since its cursor), and how long its list
#: serves the next pages (seconds).
_SYNC_CAP, _PAGES_TTL = 10_000, 60.0
#: Least seconds between two typing frames of one user in one conversation.
_TYPING_EVERY = 1.0
_ADMINS = ("owner", "admin")


def dm_room(prefix: str, a: str, b: str) -> str:
    """The id of the dm between ``a`` and ``b`` (``<prefix>:<lower>:<higher>``)."""
    lo, hi = sorted((a, b))
    return f"{prefix}:{lo}:{hi}"


class _Attached:
    """What a connection that follows conversations is attached to."""

    __slots__ = ("ready", "rooms")

    def __init__(self) -> None:
        #: Attached rooms, the least recently attached first (evicted first at the cap).
        self.rooms: dict[str, None] = {}
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class Conversations:
    """The node's conversations: membership checks, attaching connections, the 1.1 ops,
    and the server-side helpers the HTTP API and plugins use."""

    def __init__(
        self, config: Config, router: Router, storage: Storage, broker: Broker, engine: Callable[[], Engine], rooms: Rooms,
        stats: Stats, outbox: Outbox, tasks: Tasks, hooks: Hooks | None = None,
    ) -> None:
        self.config = config
        self.cfg = config.conversations
        self.router = router
        self.storage = storage
        self.broker = broker
        self.engine = engine
        self.rooms = rooms
        self.stats = stats
        self.outbox = outbox
        self.tasks = tasks
        self.hooks = hooks
        #: The node's media service (set by the Gateway): signs the URLs of paged messages.
        self.media: Media | None = None
        self._members: OrderedDict[tuple[str, str], tuple[Member | None, float]] = OrderedDict()
        self._known: OrderedDict[str, None] = OrderedDict()
        #: dm creations in flight (ensure_dm): later callers wait for the first one.
        self._creating: dict[str, asyncio.Future[None]] = {}
        #: conn -> what it is attached to (connections that sent sync).
        self._attached: dict[int, _Attached] = {}
        self._typing: OrderedDict[tuple[str, str], float] = OrderedDict()
        #: (room, user) -> seq: senders' read positions waiting to be written.
        self._reads: dict[tuple[str, str], int] = {}
        #: conn -> (since, when, the changed list): later pages of a sync read from it.
        self._pages: dict[int, tuple[int, float, list[ConversationState]]] = {}
        self._flush: asyncio.TimerHandle | None = None
        self._writing = False

    @property
    def enabled(self) -> bool:
        return self.storage.store is not None and any(r.conversation for r in self.config.routes)

    @property
    def store(self) -> Store:
        store = self.storage.store
        if store is None:
            raise Reject(ErrorCode.NO_CONVERSATION, "conversations need the message store")
        return store

    # ---- routes and members -------------------------------------------------------------

    def route(self, room: str) -> Route:
        """The conversation route of ``room``; 4033 when ``room`` is not a conversation."""
        route = self.router.match(room)
        if route is None or not route.cfg.conversation:
            raise Reject(ErrorCode.NO_CONVERSATION, f"{room} is not a conversation")
        return route

    def dm_users(self, route: Route, room: str) -> tuple[str, str]:
        """The two users of a dm id; 4033 unless they are distinct and in order."""
        a, b = _dm_pair(route)
        if a >= b or ":" in b:
            raise Reject(ErrorCode.NO_CONVERSATION, f"{room}: a dm id names two different users (without ':') in ascending order")
        return a, b

    async def member(self, room: str, user: str) -> Member | None:
        """``user``'s row (cached up to :data:`_MEMBER_TTL` s; ConvMember forgets it)."""
        key = (room, user)
        hit = self._members.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[1] < _MEMBER_TTL:
            return hit[0]
        m = await self.store.member(room, user)
        self._members[key] = (m, now)
        self._members.move_to_end(key)
        if len(self._members) > _MEMBERS:
            self._members.popitem(last=False)
        return m

    def forget(self, room: str, user: str) -> None:
        self._members.pop((room, user), None)

    async def require_member(self, room: str, user: str) -> Member:
        """The active membership, or 4031 (4033 when the conversation does not exist)."""
        m = await self.member(room, user)
        if m is None or not m.active:
            if m is None and await self.store.conversation(room) is None:
                raise Reject(ErrorCode.NO_CONVERSATION, f"no conversation {room}")
            raise Reject(ErrorCode.NOT_MEMBER, f"not a member of {room}")
        return m

    async def ensure_dm(self, route: Route, room: str, creator: str | None) -> None:
        """Create the dm (both users members) unless it is known to exist. Both users'
        first messages usually arrive together: the second waits for the first's creation
        instead of making its own."""
        pending = self._creating.get(room)
        if pending is not None:
            await asyncio.wait((pending,))  # never raises; a failed creation is retried below
        if room in self._known:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._creating[room] = fut
        try:
            a, b = self.dm_users(route, room)
            _, created = await self.store.create_conversation(room, "dm", creator, b"{}", [(a, "member"), (b, "member")], 2)
            self._remember(room)
            if created:
                for u in (a, b):
                    await self._announce(ConvMember(room, u, "added", "member"))
        finally:
            del self._creating[room]
            fut.set_result(None)

    async def ensure_notice(self, route: Route, room: str) -> None:
        if room in self._known:
            return
        user = route.params["user_id"]
        _, created = await self.store.create_conversation(room, "notice", None, b"{}", [(user, "member")], 1)
        self._remember(room)
        if created:
            await self._announce(ConvMember(room, user, "added", "member"))

    def _remember(self, room: str) -> None:
        self._known[room] = None
        self._known.move_to_end(room)
        if len(self._known) > _KNOWN:
            self._known.popitem(last=False)

    async def _announce(self, cmd: ConvMember) -> None:
        """Run ``cmd`` on every node (this one at once); a broker failure is logged: the
        change is in the store, and sync shows it."""
        try:
            await self.broker.command(cmd)
        except BrokerError as e:
            log.warning("conversation %s: other nodes were not told that %s was %s (%s)", cmd.room, cmd.user, cmd.event, e)

    # ---- publishing ---------------------------------------------------------------------

    async def check_publish(self, c: Client, room: str, route: Route) -> None:
        """May ``c`` post into conversation ``room`` (rules and rates already checked)?
        Creates a dm on its first message."""
        if route.cfg.kind == "dm":
            a, b = self.dm_users(route, room)
            if c.user not in (a, b):
                raise Reject(ErrorCode.NOT_MEMBER, f"not a member of {room}")
            await self.ensure_dm(route, room, c.user)
            return
        m = await self.require_member(room, c.user)
        if m.muted(frames.now_ms()):
            raise Reject(ErrorCode.MUTED, f"muted in {room}")

    def published(self, room: str, user: str, seq: int) -> None:
        """``user`` posted ``seq``: it counts as read for them (written in a batch)."""
        if seq <= 0:
            return
        key = (room, user)
        if self._reads.get(key, 0) < seq:
            self._reads[key] = seq
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(self.cfg.read_flush_interval, self._flush_reads)

    def _flush_reads(self) -> None:
        self._flush = None
        if self._writing:  # one batch at a time: the next one waits for this one
            self._flush = asyncio.get_running_loop().call_later(self.cfg.read_flush_interval, self._flush_reads)
            return
        items = [(room, user, seq) for (room, user), seq in self._reads.items()]
        self._reads.clear()
        if items:
            self.tasks.spawn(self._write_reads(items))

    async def _write_reads(self, items: list[tuple[str, str, int]]) -> None:
        self._writing = True
        try:
            await self.store.mark_read_many(items)
        except Exception as e:  # a sender's badge is a convenience: logged, not retried
            log.warning("conversations: %d read position(s) of senders not written (%s)", len(items), e)
        finally:
            self._writing = False

    async def close(self) -> None:
        """Write the pending read positions."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        items = [(room, user, seq) for (room, user), seq in self._reads.items()]
        self._reads.clear()
        if items and self.storage.store is not None:
            await self._write_reads(items)

    # ---- attaching connections ----------------------------------------------------------

    def attached_rooms(self, conn: int) -> int:
        """How many conversations ``conn`` is attached to (they do not count against the
        rooms a client may join)."""
        a = self._attached.get(conn)
        return len(a.rooms) if a is not None else 0

    def _cap(self, conn: int) -> int:
        return self.config.limits.max_rooms_per_conn + self.cfg.max_attached

    async def attach(self, c: Client) -> None:
        """Attach ``c`` to its user's ``max_attached`` most active conversations (once per
        connection; a second call waits for the first)."""
        a = self._attached.get(c.conn)
        if a is not None:
            await asyncio.shield(a.ready)
            return
        a = self._attached[c.conn] = _Attached()
        try:
            rooms = await self.store.user_rooms(c.user, self.cfg.max_attached) if self.cfg.max_attached else []
            # The least active first: they are the first to go when new ones come. Joined
            # in one pass, subscribed eagerly: only subscriptions that must wait for the
            # broker become tasks (a user in 1,000 conversations, one node: none).
            waits = [t for t in (self._attach_now(c.conn, room, a)[1] for room in reversed(rooms)) if t is not None]
            if waits:
                await asyncio.gather(*waits)
        except BaseException as e:
            if not a.ready.done():  # (cancelled when the connection closed meanwhile)
                a.ready.set_exception(e if isinstance(e, Exception) else RuntimeError("cancelled"))
                a.ready.exception()  # retrieved: waiters get it through their own await
            if self._attached.get(c.conn) is a:
                del self._attached[c.conn]
            raise
        if not a.ready.done():
            a.ready.set_result(None)

    def _attach_now(self, conn: int, room: str, a: _Attached, *, evict: bool = False) -> tuple[bool, asyncio.Future[None] | None]:
        """Attach ``conn`` to ``room``: (attached, the broker subscription still to wait
        for, if any). At ``max_attached``: refused, or with ``evict`` (a new membership)
        the least recently attached room is detached to make room (sync still reports it;
        an agent's closed sessions go this way)."""
        if room in a.rooms:
            return False, None
        eng = self.engine()
        if len(a.rooms) >= self.cfg.max_attached:
            if not evict or not a.rooms:
                return False, None
            old = next(iter(a.rooms))
            del a.rooms[old]
            if eng.leave(conn, old) and eng.room_counts(old)[0] == 0:
                self.tasks.spawn(self.broker.unsubscribe(old))
        if eng.join(conn, room, self._cap(conn)) != 1:
            return False, None
        a.rooms[room] = None
        _, task = run_eager(self.broker.subscribe(room))
        return True, task

    async def _attach_one(self, conn: int, room: str, a: _Attached, *, evict: bool = False) -> bool:
        attached, task = self._attach_now(conn, room, a, evict=evict)
        if task is not None:
            await task
        return attached

    def detach_conn(self, conn: int) -> None:
        """``conn`` closed (the engine took it out of its rooms)."""
        self._pages.pop(conn, None)
        a = self._attached.pop(conn, None)
        if a is not None and not a.ready.done():
            a.ready.cancel()

    def apply(self, cmd: ConvMember) -> None:
        """A membership changed (on any node): forget the cached row, attach or detach
        the user's connections here that follow conversations, and tell them."""
        self.forget(cmd.room, cmd.user)
        if cmd.event == "updated":
            return
        eng = self.engine()
        for conn in eng.user_conns(cmd.user):
            a = self._attached.get(conn)
            if a is None:
                continue
            if cmd.event == "added":
                self.tasks.spawn(self._added(conn, cmd, a))
            elif cmd.room in a.rooms:
                del a.rooms[cmd.room]
                eng.send(conn, frames.conv_event(cmd.room, "removed"), Priority.HIGH)
                if eng.leave(conn, cmd.room) and eng.room_counts(cmd.room)[0] == 0:
                    self.tasks.spawn(self.broker.unsubscribe(cmd.room))

    async def _added(self, conn: int, cmd: ConvMember, a: _Attached) -> None:
        try:
            await asyncio.shield(a.ready)
            if await self._attach_one(conn, cmd.room, a, evict=True):
                self.engine().send(conn, frames.conv_event(cmd.room, "added", cmd.role or None), Priority.HIGH)
        except Exception as e:
            log.debug("attaching conn %d to %s failed: %s", conn, cmd.room, e)

    # ---- the 1.1 ops --------------------------------------------------------------------

    async def sync(self, c: Client, req: Sync) -> None:
        """The ack of ``sync``: conversations changed since ``req.since``, each with its
        unread count, last message, newest unread messages and recalls.

        NOTE: the first page reads the whole changed list (one query: a row per
        membership and a probe of the ``(room, seq)`` index each) and keeps it for the
        connection's next pages (:data:`_PAGES_TTL`); the unread messages of a page come
        in one more round trip, whatever the number of conversations. Measured with
        ``loadtest/bench/conversations.py sync`` (1,000 conversations, 50 unread)."""
        store = self.store
        cursor = frames.now_ms()
        margin = int(self.cfg.sync_margin * 1000)
        since = max(0, req.since - margin) if req.since else 0
        # Attached (subscribed) before the snapshot is read: a message committed while this
        # sync runs is then delivered live, or is in the snapshot, or both (clients keep
        # one per seq); read first, it could be in neither (seen: bench/sync_gap.py).
        await self.attach(c)
        a = self._attached.get(c.conn)
        if a is not None:
            # Durable messages are fanned out before their commit: this node's ones fanned
            # out before the attach are in the snapshot once they are committed.
            await self.storage.settled(a.rooms)
        states = await self._changed(c, since, req.before, req.limit)
        more = len(states) > req.limit
        states = states[: req.limit]
        recalled = await store.recalled_since([s.conv.room for s in states], since) if req.since else {}
        unread_of = {st.conv.room: max(0, st.last_seq - st.member.read_seq) for st in states}
        wanted = [(st.conv.room, st.member.read_seq, min(unread_of[st.conv.room], req.msgs))
                  for st in states if req.msgs and unread_of[st.conv.room] and st.member.active]
        pages = await store.newest_messages(wanted)
        epoch = self.storage.epoch
        # Each conversation's last message, then its unread ones: media URLs signed now.
        groups = [[st.last.frame(epoch)] if st.last is not None else [] for st in states]
        groups += [[x.frame(epoch) for x in pages.get(st.conv.room, ())] for st in states]
        if self.media is not None:
            groups = await self.media.fresh_groups(groups)
        convs: list[bytes] = []
        for i, st in enumerate(states):
            room = st.conv.room
            m = st.member
            unread = unread_of[room]
            msgs = groups[len(states) + i]
            last = groups[i][0] if groups[i] else None
            route = self.router.match(room)
            receipts = route is not None and route.cfg.kind == "dm" and route.cfg.read_receipts
            convs.append(orjson.dumps({
                "room": room, "kind": st.conv.kind, "meta": orjson.Fragment(st.conv.meta), "role": m.role, "member": m.active,
                "last_seq": st.last_seq, "read_seq": m.read_seq, "unread": unread, "muted_until": m.muted_until,
                "updated": st.activity, "last": orjson.Fragment(last) if last is not None else None,
                "msgs": [orjson.Fragment(x) for x in msgs], "more_msgs": unread > len(msgs),
                "recalled": recalled.get(room, []), "peer_read_seq": (st.peer_read_seq or 0) if receipts else None,
            }))
        nxt = [states[-1].activity, states[-1].conv.room] if more else None
        body = orjson.dumps({"op": "ack", "id": req.id, "cursor": cursor, "more": more, "next": nxt, "convs": [orjson.Fragment(x) for x in convs]})
        self.engine().send(c.conn, body, Priority.HIGH)

    async def _changed(self, c: Client, since: int, before: tuple[int, str] | None, limit: int) -> list[ConversationState]:
        """The user's conversations changed since ``since`` after ``before`` (most recent
        first): from the list the first page read, while it is fresh."""
        if before is not None:
            cached = self._pages.get(c.conn)
            if cached is not None and cached[0] == since and time.monotonic() - cached[1] < _PAGES_TTL:
                states = cached[2]
                key = (-before[0], before[1])
                lo, hi = 0, len(states)
                while lo < hi:  # the first entry after ``before`` in (activity desc, room) order
                    mid = (lo + hi) // 2
                    if (-states[mid].activity, states[mid].conv.room) <= key:
                        lo = mid + 1
                    else:
                        hi = mid
                return states[lo:]
            return await self.store.user_conversations(c.user, since_ms=since, limit=_SYNC_CAP, before=before)
        states = await self.store.user_conversations(c.user, since_ms=since, limit=_SYNC_CAP)
        if len(states) > limit:  # more pages will be asked for
            self._pages[c.conn] = (since, time.monotonic(), states)
        else:
            self._pages.pop(c.conn, None)
        return states

    async def history(self, c: Client, req: History, route: Route) -> None:
        """A page of a conversation for a member (a removed one: up to their removal)."""
        room = req.room
        m = await self.member(room, c.user)
        if m is None:
            if route.cfg.kind == "dm" and c.user in self.dm_users(route, room):
                # A dm nobody has written in yet: empty.
                self.engine().send(c.conn, frames.history_ack(req.id, room, self.storage.epoch, [], False), Priority.HIGH)
                return
            if await self.store.conversation(room) is None:
                raise Reject(ErrorCode.NO_CONVERSATION, f"no conversation {room}")
            raise Reject(ErrorCode.NOT_MEMBER, f"not a member of {room}")
        store = self.store
        top = (m.left_seq + 1) if m.left_seq is not None else None
        before = req.before_seq if top is None or (req.before_seq is not None and req.before_seq < top) else top
        if req.after_seq is not None:
            page = await store.messages(room, after_seq=req.after_seq, before_seq=before, limit=req.limit + 1)
            more = len(page) > req.limit
            page = page[: req.limit]
        else:
            page = await store.messages(room, before_seq=before, limit=req.limit + 1)
            more = len(page) > req.limit
            page = page[-req.limit:] if more else page
        epoch = self.storage.epoch
        msgs = [x.frame(epoch) for x in page]
        if self.media is not None:
            msgs = await self.media.fresh(msgs)
        self.engine().send(c.conn, frames.history_ack(req.id, room, epoch, msgs, more), Priority.HIGH)

    async def _unwritten_dm(self, route: Route, room: str, user: str) -> bool:
        """Whether ``room`` is a dm of ``user`` that nobody has written in yet."""
        return route.cfg.kind == "dm" and user in self.dm_users(route, room) and await self.member(room, user) is None

    async def read(self, c: Client, req: Read) -> None:
        route = self.route(req.room)
        if await self._unwritten_dm(route, req.room, c.user):
            self.engine().send(c.conn, frames.ack(req.id, room=req.room, read_seq=0, unread=0), Priority.HIGH)
            return
        await self.require_member(req.room, c.user)
        m, last = await self.mark_read(req.room, c.user, req.seq)
        self.engine().send(c.conn, frames.ack(req.id, room=req.room, read_seq=m.read_seq, unread=max(0, last - m.read_seq)), Priority.HIGH)

    async def mark_read(self, room: str, user: str, seq: int) -> tuple[Member, int]:
        """Move ``user``'s read position; tell their other devices (and a dm's peer when
        the route sends read receipts). Returns (the row, the conversation's last seq)."""
        store = self.store
        m = await store.mark_read(room, user, seq)
        if m is None:
            raise Reject(ErrorCode.NOT_MEMBER, f"not a member of {room}")
        self._members[(room, user)] = (m, time.monotonic())
        last = await store.last_seq(room)
        frame = frames.read_event(room, user, m.read_seq)
        try:
            await self.broker.send_user(user, frame, Priority.HIGH)
            route = self.router.match(room)
            if route is not None and route.cfg.kind == "dm" and route.cfg.read_receipts:
                a, b = _dm_pair(route)
                await self.broker.send_user(b if user == a else a, frame, Priority.NORMAL)
        except BrokerError as e:
            log.debug("read event of %s in %s reached this node only: %s", user, room, e)
        return m, last

    async def recall(self, c: Client, req: Recall) -> None:
        route = self.route(req.room)
        m = await self.require_member(req.room, c.user)
        msgs = await self.store.messages(req.room, after_seq=req.seq - 1, limit=1)
        target = msgs[0] if msgs and msgs[0].seq == req.seq else None
        if target is None:
            raise Reject(ErrorCode.RECALL_DENIED, f"no message {req.seq} in {req.room}")
        admin = route.cfg.kind == "group" and m.role in _ADMINS
        if not admin:
            if target.sender != c.user:
                raise Reject(ErrorCode.RECALL_DENIED, "only the sender (or a group's owner or admin) may recall a message")
            if frames.now_ms() - target.ts > route.cfg.recall_seconds * 1000:
                raise Reject(ErrorCode.RECALL_DENIED, f"too late to recall: the limit is {route.cfg.recall_seconds:g} s")
        if not await self.do_recall(req.room, req.seq, c.user):
            raise Reject(ErrorCode.RECALL_DENIED, f"message {req.seq} was already recalled")
        self.engine().send(c.conn, frames.ack(req.id, room=req.room, seq=req.seq), Priority.HIGH)

    async def do_recall(self, room: str, seq: int, by: str) -> bool:
        """Recall without checks (the API, plugins, moderation): tombstone in the store,
        a ``recall`` frame to the members online, an outbox event. False when there was
        nothing to recall."""
        at = frames.now_ms()
        old = await self.store.recall(room, seq, by, at)
        if old is None:
            return False
        try:
            await self.broker.publish_frame(room, frames.recall_event(room, seq, by, at), Priority.HIGH)
        except BrokerError as e:
            log.warning("recall of %s#%d reached this node's members only (%s); the others see it on sync", room, seq, e)
        self.outbox.record(room, "recall", seq=seq, by=by, sender=old.sender)
        return True

    async def typing(self, c: Client, req: Typing) -> None:
        route = self.route(req.room)
        if await self._unwritten_dm(route, req.room, c.user):
            return  # nobody follows it yet
        await self.require_member(req.room, c.user)
        key = (req.room, c.user)
        now = time.monotonic()
        last = self._typing.get(key)
        if last is not None and now - last < _TYPING_EVERY:
            return
        self._typing[key] = now
        self._typing.move_to_end(key)
        if len(self._typing) > _KNOWN:
            self._typing.popitem(last=False)
        try:
            await self.broker.publish_frame(req.room, frames.typing_event(req.room, c.user), Priority.LOW)
        except BrokerError:
            pass  # ephemeral: lost with the broker

    async def create(self, c: Client, req: Create) -> None:
        """A group created by a client (the route's ``create`` rule decides who may)."""
        prefix = self.group_prefix()
        room = req.room or f"{prefix}:{secrets.token_hex(8)}"
        route = self.route(room)
        if route.cfg.kind != "group":
            raise Reject(ErrorCode.NO_CONVERSATION, f"{room} is not a group")
        if not _rule_allows(route.cfg.create, c, route, room):
            raise Reject(ErrorCode.FORBIDDEN, f"not allowed to create {room}")
        await self._hook(c, MemberChange(room, "group", "create", tuple(req.members), req.meta))
        created = await self.create_group(room, c.user, req.meta, req.members, route)
        if not created:
            raise Reject(ErrorCode.FORBIDDEN, f"{room} exists already")
        self.engine().send(c.conn, frames.ack(req.id, room=room), Priority.HIGH)

    async def _hook(self, c: Client, change: MemberChange) -> None:
        """Run the ``on_member`` hooks: False or :class:`Reject` denies (4003)."""
        if self.hooks is None or not self.hooks.has("on_member"):
            return

        def check(ch: MemberChange, r: Any) -> MemberChange:
            if r is False:
                raise Reject(ErrorCode.FORBIDDEN, f"{ch.action} refused in {ch.room}")
            return ch

        await self.hooks.chain("on_member", c, change, check)

    def group_prefix(self) -> str:
        for r in self.config.routes:
            if r.kind == "group":
                return r.pattern.split(":", 1)[0]
        raise Reject(ErrorCode.NO_CONVERSATION, "no group route is configured")

    async def create_group(self, room: str, creator: str | None, meta: bytes, members: list[str], route: Route | None = None) -> bool:
        """Create group ``room`` (``creator`` its owner, the others members); False when
        it exists (nothing changes). 4034 beyond the route's ``members_max``."""
        route = route or self.route(room)
        owners = [(creator, "owner")] if creator else []
        try:
            _, created = await self.store.create_conversation(
                room, "group", creator, meta, owners + [(u, "member") for u in members if u != creator], route.cfg.members_max,
            )
        except TooManyMembers as e:
            raise Reject(ErrorCode.TOO_MANY_MEMBERS, str(e)) from None
        if not created:
            return False
        self._remember(room)
        for u, role in owners + [(u, "member") for u in members if u != creator]:
            await self._announce(ConvMember(room, u, "added", role))
        self.outbox.record(room, "member", change="created", by=creator, users=[creator, *members] if creator else members)
        return True

    async def invite(self, c: Client, req: Invite) -> None:
        route = self.route(req.room)
        m = await self.require_member(req.room, c.user)
        rule = route.cfg.invite
        if rule == "none" or (rule == "admin" and m.role not in _ADMINS) or route.cfg.kind != "group":
            raise Reject(ErrorCode.FORBIDDEN, f"not allowed to add members to {req.room}")
        await self._hook(c, MemberChange(req.room, route.cfg.kind, "invite", tuple(req.users)))
        added = await self.add_members(req.room, req.users, by=c.user, route=route)
        self.engine().send(c.conn, frames.ack(req.id, room=req.room, added=added), Priority.HIGH)

    async def add_members(self, room: str, users: list[str], *, by: str | None, role: str = "member", route: Route | None = None) -> list[str]:
        """Add ``users`` (the API, plugins, ``invite``): a system message in the
        conversation, their connections attached everywhere. Returns the new ones."""
        route = route or self.route(room)
        try:
            added = await self.store.add_members(room, [(u, role) for u in users], route.cfg.members_max)
        except TooManyMembers as e:
            raise Reject(ErrorCode.TOO_MANY_MEMBERS, str(e)) from None
        except KeyError:
            raise Reject(ErrorCode.NO_CONVERSATION, f"no conversation {room}") from None
        for u in added:
            await self._announce(ConvMember(room, u, "added", role))
        if added:
            await self._system(room, route, {"event": "added", "users": added, "by": by})
            self.outbox.record(room, "member", change="added", users=added, by=by)
        return added

    async def remove(self, c: Client, req: Remove) -> None:
        route = self.route(req.room)
        if route.cfg.kind != "group":
            raise Reject(ErrorCode.FORBIDDEN, f"members of a {route.cfg.kind} cannot be removed")
        m = await self.require_member(req.room, c.user)
        if req.user != c.user:
            target = await self.member(req.room, req.user)
            if m.role not in _ADMINS or (target is not None and target.role == "owner"):
                raise Reject(ErrorCode.FORBIDDEN, f"not allowed to remove {req.user} from {req.room}")
        await self._hook(c, MemberChange(req.room, route.cfg.kind, "remove", (req.user,)))
        if not await self.remove_member(req.room, req.user, by=c.user, route=route):
            raise Reject(ErrorCode.NOT_MEMBER, f"{req.user} is not a member of {req.room}")
        self.engine().send(c.conn, frames.ack(req.id, room=req.room), Priority.HIGH)

    async def remove_member(self, room: str, user: str, *, by: str | None, route: Route | None = None) -> bool:
        """End ``user``'s membership (a system message first, so they see it)."""
        route = route or self.route(room)
        if (await self.member(room, user)) is None:
            return False
        await self._system(room, route, {"event": "removed", "users": [user], "by": by})
        gone = await self.store.remove_member(room, user)
        if gone is None:
            return False
        await self._announce(ConvMember(room, user, "removed"))
        self.outbox.record(room, "member", change="removed", users=[user], by=by)
        return True

    async def update_member(self, room: str, user: str, *, role: str | None = None, muted_until: int | bool | None = False) -> Member | None:
        m = await self.store.update_member(room, user, role=role, muted_until=muted_until)
        if m is not None:
            await self._announce(ConvMember(room, user, "updated", m.role))
            self.outbox.record(room, "member", change="updated", users=[user], role=m.role, muted_until=m.muted_until)
        return m

    async def _system(self, room: str, route: Route, data: dict[str, Any]) -> None:
        """A ``system`` message in the conversation (stored, counted, seen by members)."""
        try:
            await self.rooms.publish(room, route, "system", data, Priority.HIGH, None)
        except (BrokerError, StoreUnavailable) as e:
            log.warning("conversation %s: the system message %s was not published (%s)", room, data.get("event"), e)

    # ---- the system's messages ----------------------------------------------------------

    async def post(self, room: str, mtype: str, data: Any, sender: str | None, idempotency_key: str | None = None) -> tuple[int, bool]:
        """Post into a conversation from the server side (the API, plugins): as
        ``sender`` (a member; None: the system). Returns (seq, duplicate)."""
        route = self.route(room)
        if route.cfg.kind == "dm":
            await self.ensure_dm(route, room, sender)
        elif route.cfg.kind == "notice":
            await self.ensure_notice(route, room)
        elif await self.store.conversation(room) is None:
            raise Reject(ErrorCode.NO_CONVERSATION, f"no conversation {room}")
        if sender is not None and route.cfg.kind != "dm":
            await self.require_member(room, sender)
        idem = None if idempotency_key is None else f"a\x00{idempotency_key}"
        cid = None if idempotency_key is None else f"api:{idempotency_key}"
        media, mfile, live = self.media, None, None
        if media is not None and media.enabled and media.applies(route, mtype, data):
            # A file posted by the system may be anyone's upload (the backend's bot);
            # as a member, only the member's own.
            mfile, data = await media.check_publish(sender, room, route, mtype, data)
            mfile = await media.attach(mfile, sender, room, route)
            live = media.live_data(mfile, data)
        res = await self.rooms.publish(room, route, mtype, data, self.router.priority(route, mtype), sender, idem, cid, live=live)
        if mfile is not None and media is not None:
            await media.sent(mfile, room, res.seq, True)
        if sender is not None:
            self.published(room, sender, res.seq)
        return res.seq, res.duplicate

    def notice_room(self, user: str) -> str | None:
        """The notice conversation of ``user``, or None without a notice route."""
        for r in self.config.routes:
            if r.kind == "notice":
                room = r.pattern.replace("{user_id}", user)
                return room if valid_room_name(room) and self.router.match(room) is not None else None
        return None

    async def online(self, room: str, user: str) -> bool:
        """Whether ``user`` got ``room``'s message live: a connection of theirs on this node
        (attached, or an older client that gets the ``push``), or one attached to
        ``room`` on another node as of that node's last presence report."""
        eng = self.engine()
        if eng.user_conns(user):
            return True
        if self.broker.presence.shared:
            try:
                return (await self.broker.presence.counts(room))[0] > 0
            except BrokerError:
                return False
        return False


def _dm_pair(route: Route) -> tuple[str, str]:
    """The two user ids of a dm route's room, in the pattern's order."""
    names = [seg[1:-1] for seg in route.cfg.pattern.split(":")[1:]]
    return route.params[names[0]], route.params[names[1]]


def _rule_allows(rule: str, c: Client, route: Route, room: str) -> bool:
    ident = c.identity
    if rule == "all":
        return True
    if rule == "authenticated":
        return not ident.guest
    if rule == "owner":
        return not ident.guest and route.params.get("user_id") == ident.user
    if rule == "acl":
        return not ident.guest and ident.rooms is not None and ident.may_join(room)
    return False
