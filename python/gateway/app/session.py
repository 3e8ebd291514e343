"""Per-connection work: the connect decision, client requests, the close.

One :class:`Sessions` per node handles every connection's events; a :class:`Client` is
what hooks see of one connection. A client's requests are handled in order: while one
waits on a slow hook, later ones queue behind it (bounded, then shed with 4029).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson

from .._core import Engine
from .._eager import run_eager
from ..auth import Authenticator, ConnectRequest, Identity
from ..broker import Broker, BrokerError, HistoryResult
from ..config import Config
from ..errors import AuthError, HookTimeout, Reject
from ..policy import Policy
from ..protocol import frames
from ..protocol.codes import CloseCode, ErrorCode, Priority
from ..protocol.requests import (
    MAX_PAGE,
    BadRequest,
    Create,
    Custom,
    History,
    Invite,
    Join,
    Leave,
    Ping,
    Publish,
    Read,
    Recall,
    Remove,
    Request,
    Sync,
    Typing,
    parse,
    request_id,
)
from ..routing import Route
from ..store import StoreUnavailable
from .expiry import TokenExpiry
from .hooks import Hooks
from .members import Members
from .plugins import DROP, Message
from .rooms import Rooms
from .stats import Stats
from .tasks import Tasks

if TYPE_CHECKING:
    from ..media.service import Media
    from .conversations import Conversations

__all__ = ["MAX_BACKLOG", "Client", "Sessions"]

log = logging.getLogger("gateway")

#: Client messages held behind one that waits on a slow hook; more are refused (4029).
MAX_BACKLOG = 256


class Client:
    """One connected client, as hooks see it. Treat it as read-only.

    ``rooms``: the rooms the connection is in, asked of the engine (which owns
    membership); in ``on_disconnect``, the rooms it was in when it closed.
    ``session`` is ``<node>-<conn>`` (derived on access, not stored per connection).

    Kept small on purpose (one per idle connection): slots only, no per-connection
    containers until needed (the backlog exists only while a slow hook holds messages).
    """

    __slots__ = ("_engine", "_rooms", "_session", "backlog", "busy", "conn", "connected_at", "errors", "identity", "node", "peer")

    def __init__(
        self,
        conn: int,
        identity: Identity,
        session: str | None = None,
        peer: str = "",
        rooms: Iterable[str] = (),
        connected_at: float | None = None,
        *,
        node: str = "",
        engine: Callable[[], Engine | None] | None = None,
    ) -> None:
        self.conn = conn
        self.identity = identity
        self._session = session
        #: The node id of the gateway holding the connection.
        self.node = node
        self.peer = peer
        # Rooms as of the close (None while open: the engine answers); also what a client
        # built by hand (tests, examples) reports.
        self._rooms: tuple[str, ...] | None = tuple(rooms) if rooms else None
        self._engine = engine
        self.connected_at: float = time.time() if connected_at is None else connected_at
        # Internal: per-connection ordering of messages whose handling had to wait.
        self.busy = False
        self.backlog: deque[tuple[bytes, bool]] | None = None
        self.errors = 0

    @property
    def user(self) -> str:
        return self.identity.user

    @property
    def session(self) -> str:
        s = self._session
        return s if s is not None else f"{self.node}-{self.conn}"

    @property
    def rooms(self) -> tuple[str, ...]:
        if self._rooms is not None:
            return self._rooms
        eng = self._engine() if self._engine is not None else None
        return tuple(eng.conn_rooms(self.conn) or ()) if eng is not None else ()

    def closed(self, rooms: Iterable[str]) -> None:
        """The connection is gone: freeze ``rooms`` for ``on_disconnect``."""
        self._rooms = tuple(rooms)
        self._engine = None
        self.backlog = None

    def __repr__(self) -> str:
        return f"Client(conn={self.conn}, user={self.user!r}, session={self.session!r}, peer={self.peer!r}, rooms={self.rooms!r})"


def _keep(ident: Identity, r: Any) -> Identity:
    """``on_connect`` results: an Identity replaces, False refuses, None keeps."""
    if isinstance(r, Identity):
        return r
    if r is False:
        raise AuthError(403, "connection refused")
    return ident


#: Requests of protocol 1.1 and the :class:`~gateway.app.conversations.Conversations`
#: method that answers each.
_CONVERSATION_OPS: dict[type, str] = {
    Sync: "sync", Read: "read", Recall: "recall", Typing: "typing", Create: "create", Invite: "invite", Remove: "remove",
}


def _check_join(room: str, r: Any) -> str:
    if r is False:
        raise Reject(ErrorCode.FORBIDDEN, f"not allowed to join {room}")
    return room


def _message(m: Message, r: Any) -> Message:
    if r is DROP:
        return DROP  # type: ignore[no-any-return]
    return r if isinstance(r, Message) else m


class Sessions:
    """Every connection of the node: ``clients`` by engine connection id."""

    def __init__(
        self,
        config: Config,
        engine: Callable[[], Engine],
        auth: Authenticator,
        policy: Policy,
        broker: Broker,
        hooks: Hooks,
        rooms: Rooms,
        members: Members,
        tasks: Tasks,
        stats: Stats,
        conversations: Conversations | None = None,
    ) -> None:
        self.config = config
        #: Conversations (protocol 1.1); None in tests that build sessions alone.
        self.conversations = conversations
        #: The node's media service (set by the Gateway): media publishes and paged URLs.
        self.media: Media | None = None
        self.engine = engine
        self.auth = auth
        self.policy = policy
        self.router = policy.router
        self.broker = broker
        self.hooks = hooks
        self.rooms = rooms
        self.storage = rooms.storage
        self.members = members
        self.tasks = tasks
        self.stats = stats
        self.node_id = config.node_id
        self.clients: dict[int, Client] = {}
        # One bound method shared by every Client (not one per connection).
        self._engine_ref: Callable[[], Engine | None] = self._engine_or_none
        self.expiry = TokenExpiry(self.clients, self._engine_ref, config.auth.leeway, stats)

    def _engine_or_none(self) -> Engine | None:
        try:
            return self.engine()
        except RuntimeError:
            return None

    # ---- connect ---------------------------------------------------------------------------

    def on_connect(self, ev: tuple[Any, ...]) -> None:
        _, conn, peer, path, query, headers, protocols = ev
        req = ConnectRequest(conn, peer, path, query, tuple(headers), tuple(protocols))
        self.tasks.spawn(self.connect(req))

    async def connect(self, req: ConnectRequest) -> None:
        eng = self.engine()
        try:
            ident = self.auth.authenticate(req)
            try:
                ident = await self.hooks.chain("on_connect", req, ident, _keep)
            except HookTimeout:
                raise AuthError(503, "authentication timed out") from None
        except AuthError as e:
            self.stats.auth_rejects += 1
            if self.config.log.access_log:
                log.info("connect rejected", extra={"conn": req.conn, "peer": req.peer, "status": e.status, "reason": e.reason})
            eng.reject(req.conn, e.status, e.reason)
            return
        except Reject as e:
            self.stats.auth_rejects += 1
            eng.reject(req.conn, e.status, e.message)
            return
        except Exception:
            log.exception("on_connect failed")
            eng.reject(req.conn, 500, "internal error")
            return
        if self.config.server.single_session:
            for old in eng.user_conns(ident.user):
                eng.disconnect(old, CloseCode.REPLACED, "replaced by a new login")
        client = Client(req.conn, ident, None, req.peer, node=self.node_id, engine=self._engine_ref)
        self.clients[req.conn] = client
        proto = self.auth.choose_subprotocol(req, self.config.server.subprotocols)
        meta = orjson.dumps(ident.meta).decode() if ident.meta else None
        hb = self.config.heartbeat
        first = frames.connected(client.session, ident.user, hb.interval, self.node_id, hb.idle_timeout)
        if not eng.accept(req.conn, user=ident.user, meta=meta, protocol=proto, first=first):
            # The engine gave up waiting (auth deadline) or refused it (a cap); its close
            # event, if any, finds nothing to clean up.
            self.clients.pop(req.conn, None)
            return
        if ident.expires_at is not None:
            self.expiry.watch(req.conn, ident.expires_at)
        if self.config.log.access_log:
            log.info("connected", extra={"conn": req.conn, "peer": req.peer, "user": ident.user})
        if self.hooks.has("on_disconnect", "after_connect"):
            self.members.joined(None, client)

    # ---- close -----------------------------------------------------------------------------

    def on_closed(self, ev: tuple[Any, ...]) -> None:
        _, conn, code, reason, rooms, _user = ev
        client = self.clients.pop(conn, None)
        if client is None:
            return
        self.stats.count_disconnect(code)
        if self.config.log.access_log:
            log.info("disconnected", extra={"conn": conn, "user": client.user, "code": code, "reason": reason})
        client.closed(rooms)
        if self.conversations is not None:
            self.conversations.detach_conn(conn)
        for room in rooms:
            self.tasks.spawn(self.rooms.after_leave(client, room))
        self.members.on_disconnect(client, code, reason)

    # ---- requests --------------------------------------------------------------------------

    def on_message(self, conn: int, data: bytes, binary: bool) -> None:
        c = self.clients.get(conn)
        if c is None:
            return
        if c.busy:
            backlog = c.backlog
            if backlog is None:
                backlog = c.backlog = deque()  # only while a slow hook holds this client
            elif len(backlog) >= MAX_BACKLOG:
                # A hook of this client is slow and it keeps sending: shed, tell it why.
                self.error(c, request_id(data), ErrorCode.RATE_LIMITED, "too many requests waiting for a slow handler")
                return
            backlog.append((data, binary))
            return
        self._run(c, data, binary)

    def _run(self, c: Client, data: bytes, binary: bool) -> None:
        """Handle ``data`` now; if it must wait, hold the client's later messages behind it."""
        _, task = run_eager(self.handle(c, data, binary))
        if task is not None:
            c.busy = True
            self.tasks.keep(task)  # cancelled at stop
            task.add_done_callback(lambda _t: self._resume(c))

    def _resume(self, c: Client) -> None:
        c.busy = False
        backlog = c.backlog
        if backlog is None:
            return
        if self.clients.get(c.conn) is not c:
            c.backlog = None  # closed meanwhile: nobody to answer
            return
        while backlog and not c.busy:
            self._run(c, *backlog.popleft())
        if not backlog and c.backlog is backlog:
            c.backlog = None  # later waits start a new one: no idle deque per connection

    def error(self, c: Client, rid: Any, code: int, message: str) -> None:
        """An error frame; ``limits.max_errors`` in a row close the connection with 4029."""
        st = self.stats
        st.errors_sent[code] = st.errors_sent.get(code, 0) + 1
        eng = self.engine()
        eng.send(c.conn, frames.error(rid, code, message), Priority.HIGH)
        c.errors += 1
        if c.errors >= self.config.limits.max_errors:
            eng.disconnect(c.conn, CloseCode.ABUSE, "too many errors")

    async def handle(self, c: Client, data: bytes, binary: bool = False) -> None:
        """Parse (shape checks first, always), then run the op: policy, hooks, action."""
        try:
            req = parse(data, binary)
        except BadRequest as e:
            return self.error(c, e.id, e.code, e.message)
        try:
            if isinstance(req, Publish):
                await self.publish(c, req)
            elif isinstance(req, Join):
                await self.join(c, req)
            elif isinstance(req, Leave):
                await self.leave(c, req)
            elif isinstance(req, History):
                await self.history(c, req)
            elif isinstance(req, Ping):
                pass  # answered by the engine (its frame, its rate limit); never sent here
            elif isinstance(req, Custom):
                await self.custom(c, req)
            else:
                await self._conversation_op(c, req)
            c.errors = 0
        except Reject as r:
            self.error(c, req.id, r.code, r.message)
        except HookTimeout:
            self.error(c, req.id, ErrorCode.HOOK_TIMEOUT, "timed out")
        except BrokerError as e:
            # Publishes and joins handle broker failures themselves (degraded); this is
            # whatever else could not reach the broker.
            self.error(c, req.id, ErrorCode.INTERNAL, f"temporarily unavailable: {e}")
        except Exception:
            log.exception("handling %s failed", type(req).__name__.lower())
            self.error(c, req.id, ErrorCode.INTERNAL, "internal error")

    # ---- ops ---------------------------------------------------------------------------------

    async def custom(self, c: Client, req: Custom) -> None:
        """A plugin's op: its ``on_request(client, op, msg)`` answers with the ack's fields
        (a dict), None (an empty ack) or :class:`Reject`."""
        fn = self.hooks.ops.get(req.op)
        if fn is None:
            raise Reject(ErrorCode.UNKNOWN_OP, f"unknown op {req.op!r}")
        counts = self.stats.plugin_requests
        outcome = "error"
        try:
            body = await self.hooks.call("on_request", fn, c, req.op, req.msg)
            if body is not None and not isinstance(body, dict):
                raise TypeError(f"on_request for {req.op!r} returned {type(body).__name__}, not a dict or None")
            outcome = "ok"
        except Reject:
            outcome = "rejected"
            raise
        except HookTimeout:
            outcome = "timeout"
            raise
        finally:
            counts[(req.op, outcome)] = counts.get((req.op, outcome), 0) + 1
        fields = {k: v for k, v in body.items() if k not in ("op", "id")} if body else {}
        self.engine().send(c.conn, frames.ack(req.id, **fields), Priority.HIGH)

    async def _conversation_op(self, c: Client, req: Request) -> None:
        """The ops of protocol 1.1 (docs/protocol.md, "Conversations")."""
        cv = self.conversations
        if cv is None or not cv.enabled:
            raise Reject(ErrorCode.UNKNOWN_OP, "conversations are not enabled on this gateway (no conversation route, or no store)")
        if c.identity.guest:
            raise Reject(ErrorCode.FORBIDDEN, "guests have no conversations")
        op = _CONVERSATION_OPS.get(type(req))
        if op is None:
            raise Reject(ErrorCode.UNKNOWN_OP, f"unknown op {type(req).__name__.lower()}")
        try:
            await getattr(cv, op)(c, req)
        except StoreUnavailable:
            self.stats.store_unavailable += 1
            raise Reject(ErrorCode.STORE_UNAVAILABLE, "the message store is unavailable: retry later") from None

    async def join(self, c: Client, req: Join) -> None:
        room = req.room
        cv = self.conversations
        match = self.router.match(room)
        if match is not None and match.cfg.conversation:
            raise Reject(ErrorCode.FORBIDDEN, f"{room} is a conversation: members receive it after sync, without join")
        verdict, route = self.policy.check_join(c.identity, room)
        if not verdict.ok or route is None:
            raise Reject(verdict.code, verdict.message)
        await self.hooks.chain("on_join", c, room, _check_join)
        eng = self.engine()
        # Conversations attached to the connection do not count against its rooms.
        attached = cv.attached_rooms(c.conn) if cv is not None else 0
        joined = eng.join(c.conn, room, self.config.limits.max_rooms_per_conn + attached) if attached else eng.join(c.conn, room)
        if joined == -1:
            return  # the connection is gone
        if joined < -1:
            limit = self.config.limits
            what = f"rooms per connection ({limit.max_rooms_per_conn})" if joined == -2 else f"rooms on this node ({limit.max_rooms})"
            raise Reject(ErrorCode.LIMIT_REACHED, f"too many {what}")
        if joined == 1:
            if route.cfg.single_session:
                self._replace_older_sessions(c, room)
            if self.members.counts_rooms:
                self.members.joined(room, c)
            # Every first join of a connection, not only the room's first member: the
            # broker's subscribe is idempotent and returns once this node receives the
            # room, so the history read below leaves no gap (a second joiner arriving
            # while the first one's subscription is pending waits for it too).
            await self.broker.subscribe(room)
        h, degraded = await self._history(room, route, req)
        conns, users = self.rooms.join_counts(room)
        eng.send(c.conn, frames.join_ack(req.id, room, h.seq, h.epoch, h.messages, conns, users, h.recovered, degraded), Priority.HIGH)
        if joined == 1:
            await self.rooms.presence_change(room, route, "join", c.user)

    async def history(self, c: Client, req: History) -> None:
        """A page of a room's messages before ``before_seq`` (the newest page without it),
        for anyone who may join the room: from the store for rooms that keep messages
        (no limit on how far back), from the broker's ring otherwise."""
        match = self.router.match(req.room)
        if match is not None and match.cfg.conversation and self.conversations is not None and self.conversations.enabled:
            try:
                return await self.conversations.history(c, req, match)
            except StoreUnavailable:
                raise Reject(ErrorCode.STORE_UNAVAILABLE, "the message store is unavailable: retry later") from None
        verdict, route = self.policy.check_join(c.identity, req.room)
        if not verdict.ok or route is None:
            raise Reject(verdict.code, verdict.message)
        if self.storage.keeps(route):
            try:
                msgs, epoch, more = await self.storage.page(req.room, req.before_seq, req.limit, req.after_seq)
            except StoreUnavailable:
                raise Reject(ErrorCode.STORE_UNAVAILABLE, "the message store is unavailable: retry later") from None
        else:
            h = await self.broker.history(req.room, limit=route.cfg.history_size)
            ring = h.messages
            if req.before_seq is not None:
                ring = [f for f in ring if frames.seq_of(f) < req.before_seq]
            if req.after_seq is not None:
                ring = [f for f in ring if frames.seq_of(f) > req.after_seq]
                more = len(ring) > req.limit
                msgs, epoch = ring[: req.limit], h.epoch
            else:
                more = len(ring) > req.limit
                msgs, epoch = ring[-req.limit:], h.epoch
        if self.media is not None:
            msgs = await self.media.fresh(msgs)
        self.engine().send(c.conn, frames.history_ack(req.id, req.room, epoch, msgs, more), Priority.NORMAL)

    async def _history(self, room: str, route: Route, req: Join) -> tuple[HistoryResult, bool]:
        """The messages for a join ack: the last ``history`` or those after ``resume``,
        capped by the route's ``history_size`` and by ``limits.max_history_bytes``."""
        history = req.history
        cap = min(history, route.cfg.history_size)
        try:
            if req.resume is not None:
                h = await self.broker.history(room, limit=route.cfg.history_size, since=req.resume.seq, epoch=req.resume.epoch)
                if self.storage.keeps(route):
                    h = await self.storage.complete(room, h, limit=MAX_PAGE, since=req.resume.seq, epoch=req.resume.epoch)
                if h.recovered is False and history > 0:
                    # The client must resync: give it the room's last messages instead
                    # of a partial gap.
                    last = await self.broker.history(room, limit=cap)
                    if self.storage.keeps(route):
                        last = await self.storage.complete(room, last, limit=history, since=None, epoch=None)
                    h = HistoryResult(last.messages, last.seq, last.epoch, False)
            else:
                h = await self.broker.history(room, limit=cap)
                if self.storage.keeps(route):
                    h = await self.storage.complete(room, h, limit=history, since=None, epoch=None)
        except StoreUnavailable:
            # The join stands; the history the store would have added is missing.
            return HistoryResult([], 0, "", None if req.resume is None else False), True
        except BrokerError:
            # Redis unreachable: the join stands (local delivery works), without history.
            return HistoryResult([], 0, "", None if req.resume is None else False), True
        budget = self.config.limits.max_history_bytes
        size = sum(len(m) for m in h.messages)
        if size > budget:
            # Keep the newest that fit; a resume that no longer reaches back is not recovered.
            msgs = h.messages
            while msgs and size > budget:
                size -= len(msgs[0])
                msgs = msgs[1:]
            h = HistoryResult(msgs, h.seq, h.epoch, False if h.recovered else h.recovered)
        if self.media is not None and h.messages:
            h = HistoryResult(await self.media.fresh(h.messages), h.seq, h.epoch, h.recovered)
        return h, False

    def _replace_older_sessions(self, c: Client, room: str) -> None:
        """``single_session`` routes: the user's other connections in ``room`` (older
        logins, on this node) are closed with 4004."""
        eng = self.engine()
        for conn in eng.user_conns(c.user):
            if conn != c.conn and eng.is_member(conn, room):
                eng.disconnect(conn, CloseCode.REPLACED, "replaced by a newer login")

    async def leave(self, c: Client, req: Leave) -> None:
        if not await self.rooms.leave(c, req.room):
            raise Reject(ErrorCode.NOT_JOINED, f"not in room {req.room}")
        self.engine().send(c.conn, frames.ack(req.id, room=req.room), Priority.HIGH)

    def _store_down(self) -> Reject:
        """The refusal of a publish whose store was unreachable (counted)."""
        self.stats.store_unavailable += 1
        return Reject(ErrorCode.STORE_UNAVAILABLE, "the message could not be stored: retry with the same cid")

    async def publish(self, c: Client, req: Publish) -> None:
        room = req.room
        eng = self.engine()
        cv = self.conversations
        match = self.router.match(room)
        conversation = match is not None and match.cfg.conversation and cv is not None and cv.enabled
        if not conversation and not eng.is_member(c.conn, room):
            raise Reject(ErrorCode.NOT_JOINED, f"join {room} before publishing")
        verdict, route = self.policy.check_publish(c.identity, room, req.type, req.size)
        if not verdict.ok or route is None:
            self.stats.count_drop(verdict.code)
            raise Reject(verdict.code, verdict.message)
        if conversation:
            assert cv is not None
            try:
                await cv.check_publish(c, room, route)
            except StoreUnavailable:
                raise self._store_down() from None
        data, media = req.data, self.media
        mfile = None
        if media is not None and media.enabled and media.applies(route, req.type, data):
            try:
                mfile, data = await media.check_publish(c.user, room, route, req.type, data)
            except StoreUnavailable:
                raise self._store_down() from None
        m = await self.hooks.chain("on_message", c, Message(room, req.type, data, c, verdict.priority, cid=req.cid), _message)
        if m is DROP:
            self.stats.dropped["filter"] += 1
            eng.send(c.conn, frames.ack(req.id, seq=0), Priority.HIGH)
            return
        if mfile is not None:
            assert media is not None
            try:
                mfile = await media.attach(mfile, c.user, room, route)
            except StoreUnavailable:
                raise self._store_down() from None
        idem = f"c\x00{c.user}\x00{req.cid}" if req.cid is not None else None
        seq = 0
        degraded = dup = False
        for target in m.rooms or [m.room]:
            troute = route if target == room else self.router.match(target)
            if troute is None:
                raise Reject(ErrorCode.NO_ROUTE, f"no route for room {target}")
            try:
                res = await self.rooms.publish(
                    target, troute, m.type, m.data, m.priority, c.user, None if idem is None else f"{idem}\x00{target}", req.cid,
                    live=None if mfile is None else media.live_data(mfile, m.data),  # type: ignore[union-attr]
                )
                if mfile is not None:
                    await media.sent(mfile, target, res.seq, self.storage.mode(troute, m.type) != "none")  # type: ignore[union-attr]
            except StoreUnavailable:
                raise self._store_down() from None
            except BrokerError:
                # Delivered to this node's members only (seq 0, not recoverable); counted
                # by Rooms.publish. after_publish does not run: nothing was published.
                degraded = True
                continue
            if target == room or not seq:
                seq = res.seq
            dup = dup or res.duplicate
            if cv is not None and troute.cfg.conversation:
                cv.published(target, c.user, res.seq)
            if not res.duplicate and self.hooks.wants("after_publish", target):
                # The message as published into ``target`` (a copy when re-routed), so
                # the hook can tell which room ``res`` belongs to.
                pm = m if m.room == target else dataclasses.replace(m, room=target)
                self.tasks.spawn(self.hooks.notify("after_publish", pm, res))
        extra: dict[str, Any] = {}
        if degraded:
            extra["degraded"] = True
        if dup:
            extra["dup"] = True
        eng.send(c.conn, frames.ack(req.id, seq=seq, **extra), Priority.HIGH)
