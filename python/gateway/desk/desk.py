"""The desk plugin: client ops, the session lifecycle, bot, presence, reminders, metrics.

Every session is the conversation ``cs:<id>`` (the shopper with role ``shopper``, the
assigned agent with role ``agent``, supervisors with role ``observer``; after the close
everybody's role is ``closed``) plus the internal channel ``csi:<id>`` (agents and
supervisors). Write access is decided from the member's role (cached by the
conversations layer, forgotten on every node when it changes), so ``on_message`` costs
no store round trip; the old agent of a transferred session is removed from ``cs:<id>``.

State changes are control events: each is one conditional store update (the durable
record), an engine call (who gets what, arbitrated atomically), a ``cs.state`` message
in the conversation and an outbox event.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from ..app.hooks import consume_result
from ..app.plugins import Message, Plugin
from ..broker import BrokerError
from ..errors import Reject
from ..store import CsSession, CsTicket, Store, StoreUnavailable
from .bot import Bot, BotReply, FaqBot
from .engine import OK, STATUSES, AgentState, Assigner, MemoryAssigner, RedisAssigner
from .settings import DeskSettings, parse_settings

if TYPE_CHECKING:
    from ..app.node import Gateway
    from ..app.session import Client
    from ..broker import PublishResult

__all__ = ["Actor", "Desk"]

log = logging.getLogger("gateway.desk")

NOT_AGENT, NO_SESSION, BAD, TAKEN, FULL, CLOSED = 4003, 4004, 4000, 4090, 4091, 4092
AGENT_ROLES = ("agent", "supervisor")
#: Wait buckets (seconds) of gateway_cs_wait_seconds / handle_seconds.
_WAIT_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1800, 3600)
#: Seconds a department's queue changes are gathered before its agents are told.
QUEUE_PUSH_DELAY = 0.2
_HANDLE_BUCKETS = (30, 60, 180, 300, 600, 1200, 1800, 3600, 7200)

ContextHook = Callable[[CsSession], "Awaitable[dict[str, Any]] | dict[str, Any]"]
ReminderHook = Callable[[CsSession, int, int], "Awaitable[None] | None"]
RouteHook = Callable[[str, Any], "Awaitable[str | None] | str | None"]


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asks: a shopper, an agent, a supervisor, or the HTTP API (``api``: may do what
    a supervisor may)."""

    user: str
    role: str

    @property
    def is_agent(self) -> bool:
        return self.role in ("agent", "supervisor", "api")

    @property
    def is_supervisor(self) -> bool:
        return self.role in ("supervisor", "api")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _sid(msg: dict[str, Any]) -> str:
    s = msg.get("session")
    if not isinstance(s, str) or not s or len(s) > 64:
        raise Reject(BAD, "field 'session' must be a session id")
    return s


def _text(msg: dict[str, Any], key: str, *, required: bool = True, cap: int = 4000) -> str | None:
    v = msg.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v.strip() or len(v) > cap:
        raise Reject(BAD, f"field {key!r} must be a non-empty string of at most {cap} characters")
    return v


def session_json(s: CsSession) -> dict[str, Any]:
    return {
        "session": s.id, "room": s.room, "note_room": s.note_room, "shopper": s.shopper, "department": s.department, "state": s.state,
        "agent": s.agent, "opened_at": s.opened_at, "queued_at": s.queued_at, "assigned_at": s.assigned_at,
        "first_response_at": s.first_response_at, "closed_at": s.closed_at, "closed_by": s.closed_by, "card": orjson.Fragment(s.card),
        "rating": s.rating, "rating_comment": s.rating_comment, "transfers": s.transfers, "bot_turns": s.bot_turns,
    }


class Desk(Plugin):
    """The customer-service desk (docs/customer-service.md). ``Gateway`` adds one by
    itself when ``[plugins.desk] enabled = true`` and none was given.

    ``bot``: answers first (default: the keyword FAQ bot of ``[[plugins.desk.faq]]``,
    none without entries). ``context(session) -> dict``: the company's data shown to
    agents (not stored). ``on_unread_reply(session, unread, since_ms)``: the shopper
    has had unread agent replies for ``reminder_minutes``. ``route(shopper, card) ->
    department | None``: the company's rules for a session opened without a department
    (before the departments' ``card_kinds``). ``clock``: Unix seconds
    (business hours; tests inject one). ``engine``: an :class:`Assigner` (default:
    Redis when the broker is Redis, else memory)."""

    name = "desk"
    #: Its room hooks (on_message, after_publish) are about sessions only: live rooms'
    #: messages never reach them.
    rooms = ("cs:",)
    ops = (
        "cs.open", "cs.handoff", "cs.close", "cs.rate", "cs.form",
        "cs.status", "cs.queue", "cs.mine", "cs.accept", "cs.transfer", "cs.note", "cs.info", "cs.watch",
    )

    def __init__(
        self, *, bot: Bot | None = None, context: ContextHook | None = None, on_unread_reply: ReminderHook | None = None,
        route: RouteHook | None = None,
        clock: Callable[[], float] = time.time, engine: Assigner | None = None, settings: DeskSettings | None = None,
    ) -> None:
        self.bot = bot
        self.context_hook = context
        self.reminder_hook = on_unread_reply
        self.route_hook = route
        self.clock = clock
        self.engine: Assigner | None = engine
        self.settings = settings or DeskSettings(enabled=True)
        self.configured = settings is not None
        self.gw: Gateway | None = None
        self._gone: dict[str, asyncio.Future[Any]] = {}
        #: Agents whose connection on this node the engine was told of (refreshed each round).
        self._reported: set[str] = set()
        #: Every agent as this node last saw them (restored after a Redis wipe), and the
        #: engine's build mark it saw then.
        self._snapshot: list[AgentState] = []
        self._build: str | None = None
        self._responded: OrderedDict[str, None] = OrderedDict()
        #: Sessions known to be past the bot (a session never goes back to ``bot``, so this
        #: holds on every node without invalidation): their shopper's messages cost no
        #: store read (docs/customer-service.md, "The bot").
        self._past_bot: OrderedDict[str, None] = OrderedDict()
        self._reminded: dict[str, int] = {}
        self._tasks: list[asyncio.Future[Any]] = []
        self._queue_pending: set[str] = set()

    # ---- set-up --------------------------------------------------------------------------

    def configure(self, table: Any) -> None:
        """Validate ``[plugins.desk]`` (a :class:`ConfigError` on a bad value)."""
        self.settings = parse_settings(table)
        self.configured = True

    def setup(self, gateway: Gateway) -> Awaitable[None]:
        return self._setup(gateway)

    async def _setup(self, gw: Gateway) -> None:
        self.gw = gw
        if not self.configured:
            self.configure(gw.config.plugins.get("desk"))
        st = self.settings
        from ..errors import ConfigError

        for pattern in ("cs:", "csi:"):
            route = gw.router.match(pattern + "x")
            if route is None or route.cfg.kind != "group" or route.cfg.store != "durable":
                raise ConfigError("routes", f"the desk needs a group route {pattern}{{session}} with store = \"durable\" (docs/customer-service.md, Set-up)")
        if gw.storage.store is None:
            raise ConfigError("store", "the desk needs the message store")
        if self.bot is None and st.faq and st.bot_turns > 0:
            self.bot = FaqBot(st.faq, st.bot_fallback)
        if self.engine is None:
            kind = st.engine if st.engine != "auto" else ("redis" if gw.config.broker.kind == "redis" else "memory")
            if kind == "redis":
                b = gw.config.broker
                self.engine = RedisAssigner(b.url, b.prefix, cluster=b.cluster)
            else:
                self.engine = MemoryAssigner()
        from .api import add_routes

        add_routes(self, gw)
        self._metrics(gw)

    def _metrics(self, gw: Gateway) -> None:
        self.m_waiting = gw.gauge("gateway_cs_waiting", "Desk sessions waiting in a department's queue (as this node saw last)", ["department"])
        self.m_wait = gw.histogram("gateway_cs_wait_seconds", "Seconds from queued to the first agent reply", ["department"], buckets=_WAIT_BUCKETS)
        self.m_handle = gw.histogram("gateway_cs_handle_seconds", "Seconds from assigned to closed", ["department"], buckets=_HANDLE_BUCKETS)
        self.m_abandoned = gw.counter("gateway_cs_abandoned", "Sessions the shopper closed (or left) while waiting for an agent", ["department"])
        self.m_ratings = gw.counter("gateway_cs_ratings", "Ratings by score", ["department", "score"])
        self.m_sessions = gw.counter("gateway_cs_sessions", "Closed sessions by outcome (answered, unanswered, abandoned, bot, offline)",
                                     ["department", "outcome"])
        self.m_agents = gw.gauge("gateway_cs_agents", "Agents by status (as this node saw last)", ["status"])
        for d in self.settings.departments:
            self.m_waiting.labels(d.name).set(0)
            self.m_abandoned.labels(d.name)
        for s in STATUSES:
            self.m_agents.labels(s).set(0)

    @property
    def store(self) -> Store:
        assert self.gw is not None and self.gw.storage.store is not None
        return self.gw.storage.store

    @property
    def eng(self) -> Assigner:
        assert self.engine is not None
        return self.engine

    async def started(self) -> None:
        """After the gateway started (the store is open): connect the engine, rebuild it
        from the store if it is empty, start the loops."""
        await self.eng.start()
        if await self.eng.take_rebuild():
            await self._rebuild()
        assert self.gw is not None
        self._tasks.append(self.gw.tasks.start(self._gauges_loop()))
        self._tasks.append(self.gw.tasks.start(self._presence_loop()))
        if self.reminder_hook is not None and self.settings.reminder_minutes > 0:
            self._tasks.append(self.gw.tasks.start(self._reminder_loop()))

    async def _rebuild(self, agents: Sequence[AgentState] = ()) -> None:
        """Load the engine's hot state from the store (the caller won
        :meth:`Assigner.take_rebuild`): ``agents`` (status, capacity, departments, gone
        mark: as this node last saw them) first, then the queues, owners and loads."""
        for a in agents:
            await self.eng.set_agent(a.user, status=a.status, capacity=a.capacity, departments=a.departments)
            if a.gone:
                await self.eng.mark_gone(a.user, a.gone)
        queued = await self.store.cs_sessions(states=("queued",), limit=100_000)
        assigned = await self.store.cs_sessions(states=("assigned",), limit=100_000)
        await self.eng.rebuild([(s.id, s.department, s.queued_at or s.opened_at, s.last_agent) for s in queued],
                               [(s.id, s.agent) for s in assigned if s.agent])
        for a_, cfg in self.settings.agents.items():
            if await self.eng.agent(a_) is None:
                await self.eng.set_agent(a_, capacity=cfg.capacity, departments=cfg.departments)
        log.info("desk: engine rebuilt from the store (%d queued, %d assigned, %d agents)", len(queued), len(assigned), len(agents))

    async def teardown(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._gone.values():
            t.cancel()
        if self.engine is not None:
            await self.engine.close()

    # ---- helpers -------------------------------------------------------------------------

    def actor(self, client: Client) -> Actor:
        role = client.identity.meta.get("role") if client.identity.meta else None
        if self.settings.agents_from == "config":
            return Actor(client.user, "agent" if client.user in self.settings.agents else "shopper")
        return Actor(client.user, role if role in AGENT_ROLES else "shopper")

    async def _session(self, sid: str) -> CsSession:
        s = await self.store.cs_session(sid)
        if s is None:
            raise Reject(NO_SESSION, f"no session {sid}")
        return s

    async def _post(self, room: str, mtype: str, data: Any, sender: str | None = None) -> int:
        assert self.gw is not None
        seq, _ = await self.gw.conversations.post(room, mtype, data, sender)
        return seq

    async def _state_changed(self, s: CsSession, by: str, **extra: Any) -> None:
        data = {"session": s.id, "state": s.state, "agent": s.agent, "department": s.department, "by": by, **extra}
        try:
            await self._post(s.room, "cs.state", data)
        except (BrokerError, StoreUnavailable, Reject) as e:
            log.warning("desk: the cs.state message of %s was not posted: %s", s.id, e)
        assert self.gw is not None
        self.gw.outbox.record(s.room, "cs.state", session=s.id, state=s.state, agent=s.agent, department=s.department, shopper=s.shopper, by=by, **extra)

    async def _push(self, user: str, type: str, data: dict[str, Any]) -> None:
        assert self.gw is not None
        try:
            await self.gw.send_user(user, data, type=type)
        except BrokerError as e:
            log.warning("desk: push %s to %s failed: %s", type, user, e)

    def _queue_changed(self, department: str) -> None:
        """Tell the department's agents its queue changed: at most one ``cs.queue`` push
        per agent every :data:`QUEUE_PUSH_DELAY` (an open and its assignment, or a burst
        of opens, make one)."""
        if department in self._queue_pending:
            return
        self._queue_pending.add(department)
        assert self.gw is not None
        self.gw.tasks.spawn(self._queue_push(department))

    async def _queue_push(self, department: str) -> None:
        await asyncio.sleep(QUEUE_PUSH_DELAY)
        self._queue_pending.discard(department)
        try:
            q = await self.eng.queue(department)
            self.m_waiting.labels(department).set(len(q))
            for a in await self.eng.agents():
                if department in a.departments and a.status != "offline":
                    await self._push(a.user, "cs.queue", {"department": department, "waiting": len(q)})
        except (BrokerError, StoreUnavailable) as e:
            log.warning("desk: the queue of %s was not pushed: %s", department, e)

    async def context(self, s: CsSession) -> dict[str, Any] | None:
        if self.context_hook is None:
            return None
        try:
            r = self.context_hook(s)
            if inspect.isawaitable(r):
                r = await asyncio.wait_for(r, 5.0)
            return r if isinstance(r, dict) else None
        except Exception:
            log.exception("desk: the context hook failed for %s", s.id)
            return None

    async def _ensure_internal(self, s: CsSession, users: list[str]) -> None:
        assert self.gw is not None
        cv = self.gw.conversations
        await cv.create_group(s.note_room, None, orjson.dumps({"session": s.id, "internal": True}), [])
        await cv.add_members(s.note_room, users, by=None)

    # ---- the lifecycle -------------------------------------------------------------------

    async def open(self, shopper: str, department: str | None, card: Any, *, via: str = "client") -> tuple[CsSession, bool, dict[str, Any] | None]:
        """Open (or resume) the shopper's session: (session, resumed, offline info)."""
        st = self.settings
        if department is None and self.route_hook is not None:
            # The company's rules (its code) first, then the card's kind, then the first.
            try:
                r = self.route_hook(shopper, card)
                if inspect.isawaitable(r):
                    r = await asyncio.wait_for(r, 5.0)
                department = r if isinstance(r, str) else None
            except Exception:
                log.exception("desk: the route hook failed for %s: the card's department is used", shopper)
        dept = st.department(department) if department is not None else (st.department_for_card(card) or st.department(None))
        if dept is None:
            raise Reject(BAD, f"no department {department!r} (departments: {', '.join(d.name for d in st.departments)})")
        card_bytes = orjson.dumps(card) if card is not None else b"null"
        if card is not None and (not isinstance(card, dict) or len(card_bytes) > st.max_card_bytes):
            raise Reject(BAD, f"card must be an object of at most {st.max_card_bytes} bytes")
        existing = await self.store.cs_open_session(shopper)
        if existing is not None:
            return existing, True, None
        now = _now_ms()
        sid = secrets.token_hex(8)
        if not dept.open_at(self.clock()):
            s, _ = await self.store.cs_open(CsSession(sid, shopper, dept.name, "offline", now, card=card_bytes, closed_at=now, closed_by="hours"))
            self.m_sessions.labels(dept.name, "offline").inc()
            assert self.gw is not None
            self.gw.outbox.record("", "cs.state", session=sid, state="offline", shopper=shopper, department=dept.name, by="hours")
            return s, False, {"message": dept.offline_message, "form": list(st.form)}
        last = await self.store.cs_last_agent(shopper) if st.sticky else None
        bot = self.bot is not None and st.bot_turns > 0
        state = "bot" if bot else "queued"
        s, created = await self.store.cs_open(CsSession(sid, shopper, dept.name, state, now, queued_at=None if bot else now,
                                                        card=card_bytes, last_agent=last))
        if not created:
            return s, True, None
        assert self.gw is not None
        cv = self.gw.conversations
        await cv.create_group(s.room, None, orjson.dumps({"session": s.id, "department": s.department}), [])
        await cv.add_members(s.room, [shopper], by=None, role="shopper")
        if card is not None:
            await self._post(s.room, "cs.card", card, shopper)
        await self._state_changed(s, "open" if via == "client" else via)
        if state == "queued":
            self._no_bot(s.id)
            await self.eng.enqueue(s.id, s.department, now, last)
            self._queue_changed(s.department)
            await self.dispatch(s.department)
        return s, False, None

    async def handoff(self, s: CsSession, by: str) -> CsSession:
        """bot -> queued (a no-op in any other state)."""
        now = _now_ms()
        q = await self.store.cs_update(s.id, {"state": "queued", "queued_at": now}, states=("bot",))
        self._no_bot(s.id)  # queued now, or already past the bot
        if q is None:
            return await self._session(s.id)
        await self._state_changed(q, by)
        await self.eng.enqueue(q.id, q.department, now, q.last_agent)
        self._queue_changed(q.department)
        await self.dispatch(q.department)
        return await self._session(q.id)

    async def dispatch(self, department: str) -> None:
        """Assign queued sessions of ``department`` while agents have room."""
        if self.settings.strategy == "manual" and not self.settings.sticky:
            return
        picked = False
        while True:
            r = await self.eng.pick(department, self.settings.strategy, self.settings.sticky)
            if r is None:
                break
            picked = True
            await self._assigned(r[0], r[1], "assign")
        if picked:
            self._queue_changed(department)

    async def _assigned(self, sid: str, agent: str, by: str) -> CsSession | None:
        """The engine gave ``sid`` to ``agent``: record it (or undo it if the session
        closed meanwhile), add the agent to both rooms, tell both sides."""
        now = _now_ms()
        s = await self.store.cs_update(sid, {"state": "assigned", "agent": agent, "assigned_at": now}, states=("queued", "bot"))
        if s is None:
            cur = await self.store.cs_session(sid)
            if cur is None or cur.agent != agent:
                await self.eng.release(sid, agent)
            return cur
        assert self.gw is not None
        await self.gw.conversations.add_members(s.room, [agent], by=None, role="agent")
        await self._ensure_internal(s, [agent])
        await self._state_changed(s, by)
        info = session_json(s)
        ctx = await self.context(s)
        if ctx is not None:
            info["context"] = ctx
        await self._push(agent, "cs.assigned", info)
        return s

    async def accept(self, actor: Actor, sid: str, *, force: bool = False) -> CsSession:
        if not actor.is_agent:
            raise Reject(NOT_AGENT, "only agents accept sessions")
        s = await self._session(sid)
        if not s.open:
            raise Reject(CLOSED, f"session {sid} is {s.state}")
        if s.state == "assigned":
            if s.agent == actor.user:
                return s
            raise Reject(TAKEN, f"session {sid} is taken by another agent")
        r = await self.eng.claim(sid, actor.user, s.department, force=force)
        if r == "taken":
            raise Reject(TAKEN, f"session {sid} is taken by another agent")
        if r == "full":
            raise Reject(FULL, "at capacity: close a session first")
        if r == "offline":
            raise Reject(NOT_AGENT, "set your status online or away first (cs.status)")
        got = await self._assigned(sid, actor.user, "accept")
        if got is None or got.agent != actor.user:
            raise Reject(CLOSED if got is not None and not got.open else TAKEN, f"session {sid} is no longer waiting")
        self._queue_changed(s.department)
        return got

    async def transfer(self, actor: Actor, sid: str, to_agent: str | None, to_dept: str | None, note: str | None) -> CsSession:
        if not actor.is_agent:
            raise Reject(NOT_AGENT, "only agents transfer sessions")
        if (to_agent is None) == (to_dept is None):
            raise Reject(BAD, "give 'agent' or 'department'")
        s = await self._session(sid)
        if not s.open:
            raise Reject(CLOSED, f"session {sid} is {s.state}")
        if s.agent != actor.user and not actor.is_supervisor:
            raise Reject(NOT_AGENT, f"session {sid} is not yours")
        if to_dept is not None and self.settings.department(to_dept) is None:
            raise Reject(BAD, f"no department {to_dept!r}")
        if to_agent is not None and to_agent == s.agent:
            raise Reject(BAD, f"session {sid} is already {to_agent}'s")
        old = s.agent
        assert self.gw is not None
        cv = self.gw.conversations
        if old is not None:
            await self.eng.release(sid, old)
        if to_agent is not None:
            r = await self.eng.claim(sid, to_agent, s.department)
            if r != OK:
                await self._give_back(sid, old)
                raise Reject(FULL if r == "full" else NOT_AGENT if r == "offline" else TAKEN, f"{to_agent} cannot take it ({r})")
            t = await self.store.cs_update(sid, {"agent": to_agent, "state": "assigned", "assigned_at": _now_ms(), "transfers": s.transfers + 1,
                                                 "last_agent": old}, states=(s.state,), agent=old)
            if t is None:
                await self.eng.release(sid, to_agent)
                raise await self._changed(sid, old)
        else:
            now = _now_ms()
            assert to_dept is not None
            t = await self.store.cs_update(sid, {"agent": None, "state": "queued", "department": to_dept, "queued_at": now, "transfers": s.transfers + 1,
                                                 "last_agent": old}, states=(s.state,), agent=old)
            if t is None:
                raise await self._changed(sid, old)
            await self.eng.dequeue(sid, s.department)
            await self.eng.enqueue(sid, to_dept, now, None)
        if note:
            await self._ensure_internal(t, [actor.user] if actor.role != "api" else [])
            await self._post(t.note_room, "cs.note", {"text": note, "transfer": True, "to": to_agent or to_dept},
                             actor.user if actor.role != "api" else None)
        if old is not None:
            await cv.remove_member(t.room, old, by=None)
            await self._push(old, "cs.unassigned", {"session": sid, "reason": "transfer"})
        if to_agent is not None:
            await cv.add_members(t.room, [to_agent], by=None, role="agent")
            await self._ensure_internal(t, [to_agent])
            await self._state_changed(t, "transfer", **{"from": old})
            info = session_json(t)
            ctx = await self.context(t)
            if ctx is not None:
                info["context"] = ctx
            await self._push(to_agent, "cs.assigned", info)
        else:
            await self._state_changed(t, "transfer", **{"from": old})
            self._queue_changed(t.department)
            await self.dispatch(t.department)
        if old is not None:
            await self.dispatch(s.department)
        return await self._session(sid)

    async def _give_back(self, sid: str, old: str | None) -> None:
        """A transfer failed after releasing ``sid`` from ``old`` in the engine: give it
        back, unless the store says it is no longer ``old``'s (closed or re-queued
        meanwhile: giving it back would hold a slot of ``old`` for good)."""
        if old is None:
            return
        cur = await self.store.cs_session(sid)
        if cur is not None and cur.state == "assigned" and cur.agent == old:
            await self.eng.claim(sid, old, None, force=True)

    async def _changed(self, sid: str, old: str | None) -> Reject:
        await self._give_back(sid, old)
        cur = await self.store.cs_session(sid)
        if cur is not None and not cur.open:
            return Reject(CLOSED, f"session {sid} is {cur.state}")
        return Reject(TAKEN, f"session {sid} changed meanwhile: try again")

    async def close(self, actor: Actor, sid: str, *, reason: str | None = None) -> CsSession:
        s = await self._session(sid)
        if actor.role == "shopper" and s.shopper != actor.user:
            raise Reject(NOT_AGENT, f"session {sid} is not yours")
        if actor.role == "agent" and s.agent != actor.user:
            raise Reject(NOT_AGENT, f"session {sid} is not yours")
        if not s.open:
            if s.state == "closed":
                return s
            raise Reject(CLOSED, f"session {sid} is {s.state}")
        now = _now_ms()
        c = await self.store.cs_update(sid, {"state": "closed", "closed_at": now, "closed_by": reason or actor.user}, states=(s.state,), agent=s.agent)
        if c is None:
            return await self.close(actor, sid, reason=reason)  # it changed meanwhile: once more on the new state
        if s.agent is not None:
            await self.eng.release(sid, s.agent)
        if s.state == "queued":
            await self.eng.dequeue(sid, s.department)
        assert self.gw is not None
        cv = self.gw.conversations
        await self._state_changed(c, "close" if reason is None else reason)
        for u in (c.shopper, c.agent):
            if u is not None:
                await cv.update_member(c.room, u, role="closed")
        await self._post(c.room, "cs.rating", {"session": sid, "scale": 5})
        outcome = "answered" if c.first_response_at else "bot" if s.state == "bot" else "abandoned" if s.state == "queued" else "unanswered"
        self.m_sessions.labels(c.department, outcome).inc()
        if outcome == "abandoned":
            self.m_abandoned.labels(c.department).inc()
        if c.assigned_at is not None:
            self.m_handle.labels(c.department).observe(max(0.0, (now - c.assigned_at) / 1000))
        if s.agent is not None:
            await self._push(s.agent, "cs.unassigned", {"session": sid, "reason": "closed"})
            await self.dispatch(s.department)
        if s.state == "queued":
            self._queue_changed(s.department)
        return c

    async def rate(self, actor: Actor, sid: str, score: Any, comment: Any) -> CsSession:
        if not isinstance(score, int) or isinstance(score, bool) or not 1 <= score <= 5:
            raise Reject(BAD, "score must be an integer 1..5")
        if comment is not None and (not isinstance(comment, str) or len(comment) > 1000):
            raise Reject(BAD, "comment must be a string of at most 1000 characters")
        s = await self._session(sid)
        if actor.role != "api" and s.shopper != actor.user:
            raise Reject(NOT_AGENT, "only the shopper rates a session")
        if s.state == "offline":
            raise Reject(CLOSED, "an offline session cannot be rated")
        if s.state != "closed":
            raise Reject(BAD, f"session {sid} is {s.state}: it is rated once closed")
        if s.rating is not None:
            raise Reject(BAD, f"session {sid} is already rated")
        r = await self.store.cs_update(sid, {"rating": score, "rating_comment": comment, "rated_at": _now_ms()})
        assert r is not None and self.gw is not None
        self.m_ratings.labels(r.department, str(score)).inc()
        await self._post(r.room, "cs.rated", {"session": sid, "score": score, "comment": comment})
        self.gw.outbox.record(r.room, "cs.rating", session=sid, score=score, comment=comment, agent=r.agent or r.last_agent, department=r.department,
                              shopper=r.shopper)
        return r

    async def form(self, shopper: str, department: Any, fields: Any, session: str | None = None) -> str:
        if department is not None and not isinstance(department, str):
            raise Reject(BAD, "department must be a string")
        dept = self.settings.department(department)
        if dept is None:
            raise Reject(BAD, f"no department {department!r}")
        raw = orjson.dumps(fields) if isinstance(fields, dict) else b""
        if not isinstance(fields, dict) or not fields or len(raw) > self.settings.max_card_bytes:
            raise Reject(BAD, f"fields must be a non-empty object of at most {self.settings.max_card_bytes} bytes")
        if session is not None:
            own = await self.store.cs_session(session)
            if own is None or own.shopper != shopper:
                raise Reject(NO_SESSION, f"no session {session} of yours")
        tid = "t" + secrets.token_hex(8)
        await self.store.cs_add_ticket(CsTicket(tid, shopper, dept.name, raw, _now_ms(), session))
        assert self.gw is not None
        self.gw.outbox.record("", "cs.ticket", ticket=tid, shopper=shopper, department=dept.name, fields=orjson.Fragment(raw), session=session)
        return tid

    async def note(self, actor: Actor, sid: str, text: str) -> int:
        if not actor.is_agent:
            raise Reject(NOT_AGENT, "only agents write notes")
        s = await self._session(sid)
        if not actor.is_supervisor and s.agent != actor.user:
            raise Reject(NOT_AGENT, f"session {sid} is not yours (supervisors may note any session)")
        await self._ensure_internal(s, [actor.user] if actor.role != "api" else [])
        return await self._post(s.note_room, "cs.note", {"text": text}, actor.user if actor.role != "api" else None)

    async def watch(self, actor: Actor, sid: str) -> CsSession:
        if not actor.is_supervisor:
            raise Reject(NOT_AGENT, "only supervisors watch sessions")
        s = await self._session(sid)
        assert self.gw is not None
        cv = self.gw.conversations
        m = await cv.member(s.room, actor.user)
        if m is None or not m.active:
            await cv.add_members(s.room, [actor.user], by=None, role="observer")
        await self._ensure_internal(s, [actor.user])
        return s

    async def set_status(self, user: str, status: Any, capacity: Any) -> AgentState:
        if status is not None and status not in STATUSES:
            raise Reject(BAD, f"status must be one of {', '.join(STATUSES)}")
        if capacity is not None and (not isinstance(capacity, int) or isinstance(capacity, bool) or not 0 <= capacity <= 1000):
            raise Reject(BAD, "capacity must be an integer 0..1000")
        st = self.settings
        prev = await self.eng.agent(user)
        a = await self.eng.set_agent(user, status=status, capacity=capacity if capacity is not None else (None if prev else st.agent_capacity(user)),
                                     departments=None if prev and prev.departments else st.agent_departments(user))
        if status == "offline" and (prev is None or prev.status != "offline"):
            await self.requeue_agent(user, "offline")
        if a.has_room():
            for d in a.departments:
                await self.dispatch(d)
            a = await self.eng.agent(user) or a
        return a

    async def requeue_agent(self, user: str, reason: str) -> int:
        """Put ``user``'s sessions back in their queues (ahead of newer ones: they keep
        their first queue time); returns how many."""
        n = 0
        for sid in await self.eng.sessions_of(user):
            if await self.eng.release(sid, user) is None:
                continue
            s = await self.store.cs_session(sid)
            if s is None or s.state != "assigned" or s.agent != user:
                continue
            now = _now_ms()
            q = await self.store.cs_update(sid, {"state": "queued", "agent": None, "last_agent": user}, states=("assigned",), agent=user)
            if q is None:
                continue
            n += 1
            assert self.gw is not None
            with contextlib.suppress(Reject, BrokerError, StoreUnavailable):
                await self.gw.conversations.remove_member(q.room, user, by=None)
            await self.eng.enqueue(sid, q.department, q.queued_at or now, None)
            await self._state_changed(q, "requeue", reason=reason)
            await self._push(user, "cs.unassigned", {"session": sid, "reason": "requeue"})
            self._queue_changed(q.department)
            await self.dispatch(q.department)
        return n

    # ---- hooks ---------------------------------------------------------------------------

    def on_message(self, client: Client, msg: Message) -> Awaitable[Message | None] | None:
        room = msg.room
        if room.startswith("cs:"):
            return self._check_write(client, room)
        return None

    async def _check_write(self, client: Client, room: str) -> None:
        assert self.gw is not None
        m = await self.gw.conversations.member(room, client.user)
        role = m.role if m is not None and m.active else None
        if role in ("shopper", "agent"):
            return None
        if role == "closed":
            raise Reject(CLOSED, "this session is closed")
        raise Reject(NOT_AGENT, "only the shopper and the assigned agent write here")

    async def after_publish(self, msg: Message, result: PublishResult) -> None:
        room = msg.room
        if not room.startswith("cs:") or msg.sender is None:
            return
        sid = room[3:]
        user = msg.sender.user
        actor = self.actor(msg.sender)
        if actor.is_agent:
            if sid in self._responded:
                return
            if await self.store.cs_first_response(sid, _now_ms()):
                s = await self.store.cs_session(sid)
                if s is not None and s.first_response_at is not None:
                    self.m_wait.labels(s.department).observe(max(0.0, (s.first_response_at - (s.queued_at or s.assigned_at or s.opened_at)) / 1000))
            self._responded[sid] = None
            if len(self._responded) > 10_000:
                self._responded.popitem(last=False)
            return
        text = msg.data.get("text") if isinstance(msg.data, dict) and msg.type == "chat" else None
        if not isinstance(text, str) or sid in self._past_bot:
            return
        s = await self.store.cs_session(sid)
        if s is None:
            return
        if s.state != "bot":
            self._no_bot(sid)
            return
        if s.shopper != user:
            return
        if text.strip().lower() in self.settings.handoff_words:
            await self.handoff(s, "handoff")
            return
        bot = self.bot
        if bot is None:
            return
        try:
            reply = await asyncio.wait_for(bot.answer(s, text), 10.0)
        except Exception:
            log.exception("desk: the bot failed on %s: handing off", sid)
            reply = BotReply(None, handoff=True)
        turns = s.bot_turns + 1
        s2 = await self.store.cs_update(sid, {"bot_turns": turns}, states=("bot",))
        if s2 is None:
            return  # a human took over meanwhile
        if reply.text:
            await self._post(s.room, "cs.bot", {"text": reply.text})
        if reply.handoff or turns >= self.settings.bot_turns:
            await self.handoff(s2, "bot" if reply.handoff else "turns")

    @property
    def _presence_every(self) -> float:
        """Seconds between two rounds of the presence loop."""
        return min(5.0, max(0.2, self.settings.grace / 3))

    @property
    def _presence_ttl_ms(self) -> int:
        """How long a node's report of an agent's connection holds without a refresh."""
        return int(max(2.0, 3 * self._presence_every) * 1000)

    def _node(self) -> str:
        assert self.gw is not None
        return self.gw.node_id

    def after_connect(self, client: Client) -> Awaitable[None] | None:
        if not self.actor(client).is_agent:
            return None
        t = self._gone.pop(client.user, None)
        if t is not None:
            t.cancel()
        self._reported.add(client.user)
        return self.eng.conn_up(client.user, self._node(), _now_ms() + self._presence_ttl_ms)

    def on_disconnect(self, client: Client, code: int, reason: str) -> Awaitable[None] | None:
        if not self.actor(client).is_agent:
            return None
        assert self.gw is not None
        eng = self.gw.engine
        if eng is not None and eng.user_conns(client.user):
            return None  # another connection of theirs on this node
        return self._went(client.user)

    async def _went(self, user: str) -> None:
        """``user``'s last connection closed. With the Redis broker this hook runs once,
        on one node, when the user has had no connection on any node for
        ``broker.leave_grace`` (a reconnect on another node, a second device: no call)."""
        self._reported.discard(user)
        await self.eng.conn_down(user, self._node())
        await self._mark_gone(user, _now_ms())

    async def _mark_gone(self, user: str, at: int) -> None:
        a = await self.eng.agent(user)
        if a is None or a.status == "offline":
            return
        await self.eng.mark_gone(user, at)
        old = self._gone.pop(user, None)
        if old is not None:
            old.cancel()
        assert self.gw is not None
        self._gone[user] = self.gw.tasks.start(self._gone_after(user, at))

    async def _gone_after(self, user: str, at: int) -> None:
        await asyncio.sleep(self.settings.grace)
        self._gone.pop(user, None)
        await self._take_gone(user, at)

    async def _take_gone(self, user: str, at: int) -> None:
        if not await self.eng.take_gone(user, at, _now_ms()):
            return  # back meanwhile (on any node), or another node took it
        n = await self.requeue_agent(user, "gone")
        log.info("desk: agent %s gone for %gs: offline, %d sessions re-queued", user, self.settings.grace, n)

    # ---- client ops ----------------------------------------------------------------------

    def on_request(self, client: Client, op: str, msg: dict[str, Any]) -> Awaitable[dict[str, Any] | None]:
        """A desk op. It runs to its end even when ``hooks.timeout`` answers the client
        first (4080): a session is never left half opened, half assigned or half closed
        (the client's retry finds it done)."""
        task = asyncio.ensure_future(self._request(client, op, msg))
        task.add_done_callback(consume_result)
        return asyncio.shield(task)

    async def _request(self, client: Client, op: str, msg: dict[str, Any]) -> dict[str, Any] | None:
        actor = self.actor(client)
        match op:
            case "cs.open":
                dept = msg.get("department")
                if dept is not None and not isinstance(dept, str):
                    raise Reject(BAD, "department must be a string")
                s, resumed, offline = await self.open(client.user, dept, msg.get("card"))
                out: dict[str, Any] = {"session": s.id, "room": s.room, "state": s.state, "department": s.department, "resumed": resumed}
                if s.agent:
                    out["agent"] = s.agent
                if offline is not None:
                    out["offline"] = offline
                    del out["room"]
                return out
            case "cs.handoff":
                s = await self._session(_sid(msg))
                if s.shopper != client.user and not actor.is_agent:
                    raise Reject(NOT_AGENT, "not your session")
                if not s.open:
                    raise Reject(CLOSED, f"session {s.id} is {s.state}")
                s = await self.handoff(s, "handoff")
                return {"state": s.state}
            case "cs.close":
                s = await self.close(actor, _sid(msg))
                return {"state": s.state}
            case "cs.rate":
                await self.rate(Actor(client.user, "shopper"), _sid(msg), msg.get("score"), msg.get("comment"))
                return {}
            case "cs.form":
                sid = msg.get("session") if isinstance(msg.get("session"), str) else None
                return {"ticket": await self.form(client.user, msg.get("department"), msg.get("fields"), sid)}
        if not actor.is_agent:
            raise Reject(NOT_AGENT, "agents only (token role agent or supervisor)")
        match op:
            case "cs.status":
                a = await self.set_status(client.user, msg.get("status"), msg.get("capacity"))
                if msg.get("status") == "online":
                    await self.eng.conn_up(client.user, self._node(), _now_ms() + self._presence_ttl_ms)
                return {"status": a.status, "capacity": a.capacity, "load": a.load, "departments": list(a.departments)}
            case "cs.queue":
                dept = msg.get("department")
                if dept is not None and self.settings.department(dept) is None:
                    raise Reject(BAD, f"no department {dept!r}")
                now = _now_ms()
                rows = await self.store.cs_sessions(states=("queued",), department=dept, limit=200)
                return {"sessions": [{"session": s.id, "department": s.department, "shopper": s.shopper, "state": s.state,
                                      "waiting_ms": max(0, now - (s.queued_at or s.opened_at)), "card": orjson.Fragment(s.card)} for s in rows]}
            case "cs.mine":
                rows = await self.store.cs_sessions(states=("assigned",), agent=client.user, limit=1000)
                return {"sessions": [session_json(s) for s in rows]}
            case "cs.accept":
                s = await self.accept(actor, _sid(msg))
                return {"session": s.id, "room": s.room, "note_room": s.note_room}
            case "cs.transfer":
                to_agent, to_dept = msg.get("agent"), msg.get("department")
                if to_agent is not None and (not isinstance(to_agent, str) or not to_agent):
                    raise Reject(BAD, "agent must be a user id")
                if to_dept is not None and not isinstance(to_dept, str):
                    raise Reject(BAD, "department must be a string")
                s = await self.transfer(actor, _sid(msg), to_agent, to_dept, _text(msg, "note", required=False))
                return {"state": s.state, "agent": s.agent, "department": s.department}
            case "cs.note":
                text = _text(msg, "text")
                assert text is not None
                return {"seq": await self.note(actor, _sid(msg), text)}
            case "cs.info":
                s = await self._session(_sid(msg))
                if not actor.is_supervisor and s.agent != actor.user and s.state not in ("bot", "queued"):
                    raise Reject(NOT_AGENT, f"session {s.id} is not yours (agents see their own and waiting ones)")
                info = session_json(s)
                info["context"] = await self.context(s)
                dept = self.settings.department(s.department)
                info["canned"] = list(dept.canned) if dept is not None else []
                return info
            case "cs.watch":
                s = await self.watch(actor, _sid(msg))
                return {"session": s.id, "room": s.room, "note_room": s.note_room}
        raise Reject(4001, f"unknown op {op}")

    # ---- loops ---------------------------------------------------------------------------

    async def _gauges_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                counts = dict.fromkeys(STATUSES, 0)
                for a in await self.eng.agents():
                    counts[a.status] = counts.get(a.status, 0) + 1
                for k, v in counts.items():
                    self.m_agents.labels(k).set(v)
                for d in self.settings.departments:
                    self.m_waiting.labels(d.name).set(len(await self.eng.queue(d.name)))
            await asyncio.sleep(5.0)

    async def _presence_loop(self) -> None:
        while True:
            await asyncio.sleep(self._presence_every)
            try:
                await self._presence_once()
            except Exception as e:
                log.warning("desk: presence round failed: %s", e)

    async def _presence_once(self) -> None:
        """One round: notice a wiped engine (rebuild it, one node at a time); refresh this
        node's reports of its agents' connections; take care of agents whose node died
        (its reports expired: gone as of now) or whose gone mark outlived its node's timer."""
        eng = self.eng
        build = await eng.built()
        if build is None:
            if await eng.take_rebuild():
                log.warning("desk: the engine's hot state is gone (Redis wiped?): rebuilding it from the store")
                await self._rebuild(self._snapshot)
                self._build = await eng.built()
                for d in self.settings.departments:
                    await self.dispatch(d.name)
            return
        if build != self._build:
            if self._build is not None:
                # Another node rebuilt it: add the agents it did not know of as this node saw them.
                restored = 0
                for a in self._snapshot:
                    if await eng.agent(a.user) is None:
                        await eng.set_agent(a.user, status=a.status, capacity=a.capacity, departments=a.departments)
                        if a.gone:
                            await eng.mark_gone(a.user, a.gone)
                        restored += 1
                if restored:
                    log.info("desk: %d agents restored after a rebuild of the engine by another node", restored)
                    for d in self.settings.departments:
                        await self.dispatch(d.name)
            self._build = build
        now = _now_ms()
        node, until = self._node(), now + self._presence_ttl_ms
        assert self.gw is not None
        local = {c.user for c in list(self.gw.clients.values()) if self.actor(c).is_agent}
        for user in self._reported - local:
            await eng.conn_down(user, node)
        for user in local:
            await eng.conn_up(user, node, until)
        self._reported = local
        agents = await eng.agents()
        for a in agents:
            if a.status == "offline" or a.user in local or a.user in self._gone:
                continue
            conns = await eng.conns(a.user)
            if any(u > now for u in conns.values()):
                continue
            if not a.gone and conns:
                for n in conns:
                    await eng.conn_down(a.user, n)
                log.info("desk: agent %s: the node of their connection went silent: gone", a.user)
                await self._mark_gone(a.user, now)
            elif a.gone and now - a.gone > self.settings.grace * 1000 + self._presence_ttl_ms:
                await self._take_gone(a.user, a.gone)
        self._snapshot = agents

    async def _reminder_loop(self) -> None:
        """On the node holding the ``desk.reminder`` lease: fire ``on_unread_reply`` for
        sessions whose shopper has had an unread agent reply for ``reminder_minutes``,
        once per burst (a burst starts at the first unread agent message)."""
        every = max(0.2, min(30.0, self.settings.reminder_minutes * 60 / 4))
        lease = None
        try:
            while True:
                await asyncio.sleep(every)
                try:
                    if lease is None or not await lease.alive():
                        lease = await self.store.lead("desk.reminder")
                    if lease is None:
                        continue
                    await self._remind_once()
                except StoreUnavailable as e:
                    log.warning("desk: reminder round failed: %s", e)
                except Exception:
                    log.exception("desk: reminder round failed")
        finally:
            if lease is not None:
                await lease.release()

    def _no_bot(self, sid: str) -> None:
        self._past_bot[sid] = None
        self._past_bot.move_to_end(sid)
        if len(self._past_bot) > 100_000:
            self._past_bot.popitem(last=False)

    async def _remind_once(self) -> None:
        """One round: one store query (:meth:`Store.cs_unread_replies`) for every assigned
        session whose shopper's oldest unread agent message is due."""
        now = _now_ms()
        due = self.settings.reminder_minutes * 60_000
        seen: set[str] = set()
        for u in await self.store.cs_unread_replies(first_before_ms=int(now - due) + 1, limit=10_000):
            s = u.session
            seen.add(s.id)
            if self._reminded.get(s.id) == u.first_seq:
                continue
            self._reminded[s.id] = u.first_seq
            hook = self.reminder_hook
            assert hook is not None
            try:
                r = hook(s, u.unread, u.first_ts)
                if inspect.isawaitable(r):
                    await r
            except Exception:
                log.exception("desk: on_unread_reply failed for %s", s.id)
        for k in [k for k in self._reminded if k not in seen]:
            del self._reminded[k]
