"""The ``Gateway`` app: owns the engine, runs on uvloop, composed of plugins.

Python sees control events only (connects, client messages, closes) and makes decisions;
the engine does every socket operation and every per-recipient delivery. A room message
costs one broker publish and one engine call on each node, whatever the room size.

Backend teams customise it with plugins (subclasses of :class:`Plugin`) or decorators::

    gw = Gateway(load_config("gateway.toml"))

    @gw.on_message
    async def moderate(client, msg):
        if "spam" in str(msg.data):
            raise Reject(4050, "no spam")
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import heapq
import inspect
import logging
import math
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from . import protocol as P
from ._core import EV_CLOSED, EV_CONNECT, EV_MESSAGE, Engine, raise_fd_limit
from ._eager import run_eager
from .auth import Authenticator, AuthError, ConnectRequest, Identity
from .broker import Broker, BrokerError, HistoryPolicy, HistoryResult, MemoryBroker, PublishResult
from .broker.commands import Ban, Broadcast, CloseRoom, Command, Kick, Mute, Unban, Unmute
from .config import Config
from .routing import Moderation, Policy, RateLimiter, Route, Router

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger("gateway")

#: Returned by an ``on_message`` hook: drop the message silently (the sender still gets an ack).
DROP = object()

#: Client messages held behind one that waits on a slow hook; more are refused (4029).
MAX_BACKLOG = 256

HOOKS = ("on_connect", "on_join", "on_message", "on_leave", "on_disconnect", "after_publish", "after_connect", "after_join")


class Reject(Exception):
    """Raise from a hook to refuse: the client gets an error frame with ``code``
    (or, from ``on_connect``, the upgrade is refused with HTTP ``status``)."""

    def __init__(self, code: int = P.E_REJECTED, message: str = "rejected", status: int = 403) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class NotRunning(RuntimeError):
    """The gateway is not started (or already stopped)."""


class HookTimeout(Exception):
    """An async hook did not finish within ``hooks.timeout``."""


class Client:
    """One connected client, as hooks see it. Treat it as read-only.

    ``rooms`` is a tuple of the rooms the connection is in (``()`` when none); on
    ``on_disconnect`` it still holds the rooms the connection was in when it closed.
    ``session`` is ``<node>-<conn>`` (derived on access, not stored per connection).

    Kept small on purpose (one per idle connection): slots only, no per-connection
    containers until needed (the backlog exists only while a slow hook holds messages).
    """

    __slots__ = ("_session", "backlog", "busy", "conn", "connected_at", "errors", "identity", "node", "peer", "rooms")

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
    ) -> None:
        self.conn = conn
        self.identity = identity
        self._session = session
        #: The node id of the gateway holding the connection.
        self.node = node
        self.peer = peer
        self.rooms: tuple[str, ...] = tuple(rooms) if rooms else ()
        self.connected_at: float = time.time() if connected_at is None else connected_at
        # Internal: per-connection ordering of messages whose handling had to wait.
        self.busy = False
        self.backlog: deque[bytes] | None = None
        self.errors = 0

    @property
    def user(self) -> str:
        return self.identity.user

    @property
    def session(self) -> str:
        s = self._session
        return s if s is not None else f"{self.node}-{self.conn}"

    def __repr__(self) -> str:
        return f"Client(conn={self.conn}, user={self.user!r}, session={self.session!r}, peer={self.peer!r}, rooms={self.rooms!r})"


def _with(rooms: tuple[str, ...], room: str) -> tuple[str, ...]:
    return rooms if room in rooms else (*rooms, room)


def _without(rooms: tuple[str, ...], room: str) -> tuple[str, ...]:
    return tuple(r for r in rooms if r != room) if room in rooms else rooms


@dataclass(slots=True)
class Message:
    """A client message on its way into a room. Hooks may change ``data``, ``type`` and
    ``priority``, or set ``rooms`` to re-route it (to one or several rooms).

    ``after_publish`` gets it with ``room`` = the room the result belongs to: for a
    re-routed message, a copy per target with ``room`` set to that target (``rooms``
    still lists every target); otherwise the message itself."""

    room: str
    type: str
    data: Any
    sender: Client | None
    priority: int = P.PRIO_NORMAL
    rooms: list[str] | None = None


class Plugin:
    """Base class for plugins. Override any hook; each may be sync or ``async``.

    - ``on_connect(req, identity)``: return an :class:`Identity` (replace), None (keep) or
      raise :class:`Reject` (refused with ``status``).
    - ``on_join(client, room)``: return False or raise :class:`Reject` to deny.
    - ``on_message(client, msg)``: return None (as is), a :class:`Message` (modified),
      :data:`DROP`, or raise :class:`Reject`. Set ``msg.rooms`` to re-route.
    - ``on_leave(client, room)``, ``on_disconnect(client, code, reason)``: notifications
      (``client.rooms`` in ``on_disconnect``: the rooms it was in when it closed).
    - ``after_publish(msg, result)``: after a message was published (``result.seq``), once
      per target room, with ``msg.room`` = that room.

    ``setup(gateway)`` runs once at start (async allowed) and ``teardown()`` at stop.
    Settings: ``gateway.config.plugins.get(self.name, {})`` (the ``[plugins.<name>]``
    table); metrics: ``gateway.counter(...)`` / ``gauge`` / ``histogram``.
    """

    name = "plugin"

    def setup(self, gateway: Gateway) -> Any:
        return None

    def teardown(self) -> Any:
        return None


def _prefix_of(pattern: str) -> str | None:
    """Literal room-name prefix of a route pattern (``live:{id}`` -> ``live:``, ``*`` ->
    ``""``); None when the pattern starts with a placeholder (no usable prefix)."""
    if pattern == "*":
        return ""
    if pattern.startswith("{"):
        return None
    return pattern.split("{", 1)[0] if "{" in pattern else pattern


def _request_id(data: bytes) -> Any:
    """The ``id`` of a raw request, or None (slow path only)."""
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return msg.get("id") if isinstance(msg, dict) else None


def _consume_result(t: asyncio.Future[Any]) -> None:
    """Done callback for abandoned tasks (timed-out hooks): retrieve the outcome so
    asyncio does not log "exception was never retrieved"."""
    if not t.cancelled():
        t.exception()


#: Close codes reported under their own label in ``gateway_disconnects_by_code_total``.
_KNOWN_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1011, 1012, 4000, 4001, 4003, 4004, 4008, 4029})

#: Upper bounds (seconds) of the hook duration histogram buckets.
HOOK_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0)


class Stats:
    """Python-side counters, exported as metrics."""

    def __init__(self) -> None:
        self.hook_calls: dict[str, int] = dict.fromkeys(HOOKS, 0)
        self.hook_timeouts: dict[str, int] = dict.fromkeys(HOOKS, 0)
        self.hook_errors: dict[str, int] = dict.fromkeys(HOOKS, 0)
        #: Hook durations: cumulative-free bucket counts per hook (see HOOK_BUCKETS) and sums.
        self.hook_buckets: dict[str, list[int]] = {h: [0] * (len(HOOK_BUCKETS) + 1) for h in HOOKS}
        self.hook_seconds_sum: dict[str, float] = dict.fromkeys(HOOKS, 0.0)
        #: Room messages delivered on this node per room since the last presence tick, and
        #: the resulting messages/s (for the top-rooms view).
        self.room_messages: dict[str, int] = {}
        self.room_rates: dict[str, float] = {}
        #: Disconnects of accepted clients by close code (label), see _KNOWN_CLOSE_CODES.
        self.disconnects_by_code: dict[str, int] = {}
        self.auth_rejects = 0
        self.errors_sent: dict[int, int] = {}
        self.published: dict[tuple[str, int], int] = {}
        self.dropped: dict[str, int] = {"rate_limit": 0, "mute": 0, "filter": 0, "forbidden": 0, "too_large": 0}
        self.broker_publish_errors = 0
        self.tokens_expired = 0


class Gateway:
    """The application. ``Gateway(config, plugins=[...])``, then ``run()`` or ``await serve()``."""

    def __init__(self, config: Config | None = None, plugins: Iterable[Plugin] = (), broker: Broker | None = None) -> None:
        if config is None:
            config = Config()
            config.auth.mode = "dev"
            config.check()
        self.config = config
        self.node_id = config.node_id
        self.router = Router(config.routes)
        self.moderation = Moderation()
        self.policy = Policy(self.router, RateLimiter(), self.moderation)
        self.auth = Authenticator(config.auth)
        self.broker: Broker = broker or self._make_broker()
        self.stats = Stats()
        self.engine: Engine | None = None
        self.clients: dict[int, Client] = {}
        self._hooks: dict[str, list[Callable[..., Any]]] = {h: [] for h in HOOKS}
        self.plugins: list[Plugin] = []
        self._tasks: set[asyncio.Future[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._rates_at = time.monotonic()
        self._presence_last: dict[str, tuple[int, int]] = {}
        self._api_runner: Any = None
        # Hook debounce (brokers with member_join/member_leave): joins in flight, so a
        # leave of the same (room, user) is counted after its join.
        self._member_pending: dict[tuple[str | None, str], asyncio.Future[Any]] = {}
        # Token expiry: a heap of (deadline, conn), lazily cleaned, and one timer armed
        # at the earliest deadline.
        self._expiry: list[tuple[float, int]] = []
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._expiry_at = math.inf
        self._notifications: set[asyncio.Future[Any]] = set()
        self._metrics_registry: CollectorRegistry | None = None
        self._plugin_metrics: dict[str, Any] = {}
        for p in plugins:
            self.use(p)

    def _make_broker(self) -> Broker:
        if self.config.broker.kind == "redis":
            try:
                from .broker.redis import RedisBroker  # type: ignore[import-not-found]
            except ImportError:
                from .auth import ConfigError

                raise ConfigError("broker.kind", "the redis broker is not available in this build yet") from None
            return RedisBroker(self.config.broker)  # type: ignore[no-any-return]
        return MemoryBroker(self.config.broker.idempotency_ttl)

    # ---- composition ---------------------------------------------------------------------

    def use(self, plugin: Plugin) -> Plugin:
        """Add a plugin: every hook method it overrides is registered, in plugin order."""
        self.plugins.append(plugin)
        for h in HOOKS:
            fn = getattr(plugin, h, None)
            if fn is not None and callable(fn):
                self._hooks[h].append(fn)
        return plugin

    def _decorator(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self._hooks[name].append(fn)
            return fn

        return register

    @property
    def on_connect(self) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return self._decorator("on_connect")

    @property
    def on_join(self) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return self._decorator("on_join")

    @property
    def on_message(self) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return self._decorator("on_message")

    @property
    def on_leave(self) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return self._decorator("on_leave")

    @property
    def on_disconnect(self) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return self._decorator("on_disconnect")

    @property
    def after_publish(self) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return self._decorator("after_publish")

    @property
    def after_join(self) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return self._decorator("after_join")

    @property
    def after_connect(self) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return self._decorator("after_connect")

    # ---- helpers for plugins and the HTTP API --------------------------------------------

    async def publish(self, room: str, data: Any, type: str = "chat", priority: int | None = None, sender: str | None = None) -> PublishResult:
        """Publish into a room from the server side (no rate limits, no hooks)."""
        route = self.router.match(room)
        if route is None:
            raise ValueError(f"no route for room {room!r}")
        prio = self.router.priority(route, type) if priority is None else priority
        return await self._publish(room, route, type, data, prio, sender)

    async def send_user(self, user: str, data: Any, type: str = "push", priority: int = P.PRIO_HIGH) -> None:
        """Push to every connection of ``user`` on every node (e.g. an order status)."""
        await self.broker.send_user(user, P.push(type, data), priority)

    async def broadcast(self, data: Any, type: str = "broadcast", priority: int = P.PRIO_NORMAL) -> None:
        """Push to every connection on every node."""
        await self.broker.command(Broadcast(P.push(type, data), priority))

    async def kick(self, user: str, reason: str = "kicked", code: int = P.CLOSE_KICKED) -> None:
        """Close every connection of ``user`` on every node."""
        await self.broker.command(Kick(user, code, reason))

    async def mute(self, room: str, user: str | None = None, seconds: float | None = None, whitelist: Iterable[str] = ()) -> None:
        """Mute ``user`` in ``room`` (or the whole room, except ``whitelist``), on every node."""
        until = time.time() + seconds if seconds else None
        await self.broker.command(Mute(room, user, until, tuple(whitelist)))

    async def unmute(self, room: str, user: str | None = None) -> None:
        await self.broker.command(Unmute(room, user))

    async def ban(self, room: str, user: str, seconds: float | None = None) -> None:
        """Ban ``user`` from ``room`` (``*`` = everywhere) and remove them from it."""
        until = time.time() + seconds if seconds else None
        await self.broker.command(Ban(room, user, until))

    async def unban(self, room: str, user: str) -> None:
        """Lift a ban set with the same ``room`` (``*`` = the everywhere ban), on every node."""
        await self.broker.command(Unban(room, user))

    async def close_room(self, room: str, reason: str = "room closed") -> None:
        """Remove every member from ``room`` on every node (they get a presence notice)."""
        await self.broker.command(CloseRoom(room, reason))

    async def presence(self, room: str) -> tuple[int, int]:
        """(connections, users) in ``room`` across nodes."""
        return await self.broker.presence.counts(room)

    async def members_everywhere(self, room: str, offset: int = 0, limit: int = 100) -> tuple[list[dict[str, Any]], str]:
        """Members of ``room`` on every node when the broker shares member lists and the
        room is small (its route's ``presence_events_max_members``), else this node's.
        Returns ``(members, scope)`` with scope ``"cluster"`` or ``"node"``."""
        shared: list[dict[str, Any]] | None = None
        try:
            shared = await self.broker.presence.members(room)
        except BrokerError:
            shared = None
        if shared:
            return shared[offset : offset + limit], "cluster"
        return self.members(room, offset, limit), "node"

    def members(self, room: str, offset: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Local members of ``room`` (user ids and meta), paged."""
        out = []
        for conn, user, meta in self._engine().room_members(room, offset, limit):
            out.append({"conn": conn, "user": user, "meta": orjson.loads(meta) if meta else {}})
        return out

    def _engine(self) -> Engine:
        if self.engine is None:
            raise NotRunning("the gateway is not running")
        return self.engine

    # ---- metrics for plugins ---------------------------------------------------------------

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """The Prometheus registry served at ``/metrics`` on the API port. Register your
        own collectors here, or use :meth:`counter`, :meth:`gauge`, :meth:`histogram`."""
        from .metrics import registry_for

        return registry_for(self)

    def _metric(self, cls: Any, name: str, doc: str, labels: Sequence[str], **kw: Any) -> Any:
        m = self._plugin_metrics.get(name)
        if m is not None:
            if type(m) is not cls or tuple(m._labelnames) != tuple(labels):
                raise ValueError(f"metric {name!r} already exists with another type or labels")
            return m
        m = cls(name, doc, labelnames=tuple(labels), registry=self.metrics_registry, **kw)
        self._plugin_metrics[name] = m
        return m

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        """A ``prometheus_client.Counter`` served on ``/metrics`` (exported as
        ``<name>_total``). Calling it again with the same name returns the same counter."""
        from prometheus_client import Counter

        return self._metric(Counter, name, doc, labels)  # type: ignore[no-any-return]

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        """A ``prometheus_client.Gauge`` served on ``/metrics`` (same name: same gauge)."""
        from prometheus_client import Gauge

        return self._metric(Gauge, name, doc, labels)  # type: ignore[no-any-return]

    def histogram(self, name: str, doc: str, labels: Sequence[str] = (), buckets: Sequence[float] | None = None) -> Histogram:
        """A ``prometheus_client.Histogram`` served on ``/metrics`` (same name: same one)."""
        from prometheus_client import Histogram

        kw = {"buckets": tuple(buckets)} if buckets is not None else {}
        return self._metric(Histogram, name, doc, labels, **kw)  # type: ignore[no-any-return]

    # ---- BrokerHandler ---------------------------------------------------------------------

    def deliver_room(self, room: str, payload: bytes, prio: int) -> int:
        rm = self.stats.room_messages
        rm[room] = rm.get(room, 0) + 1
        return self._engine().publish(room, payload, prio)

    def deliver_user(self, user: str, payload: bytes, prio: int) -> int:
        return self._engine().send_user(user, payload, prio)

    def local_counts(self, room: str) -> tuple[int, int]:
        return self._engine().room_counts(room)

    def apply(self, cmd: Command) -> None:
        eng = self._engine()
        if isinstance(cmd, Kick):
            eng.disconnect_user(cmd.user, cmd.code, cmd.reason[:120])
        elif isinstance(cmd, Broadcast):
            eng.broadcast(cmd.frame, cmd.prio)
        elif isinstance(cmd, Mute):
            if cmd.user:
                self.moderation.mute_user(cmd.room, cmd.user, cmd.until)
            else:
                self.moderation.mute_room(cmd.room, cmd.until, cmd.whitelist)
        elif isinstance(cmd, Unmute):
            if cmd.user:
                self.moderation.unmute_user(cmd.room, cmd.user)
            else:
                self.moderation.unmute_room(cmd.room)
        elif isinstance(cmd, Ban):
            room, user = cmd.room, cmd.user
            self.moderation.ban(room, user, cmd.until)
            for conn in eng.user_conns(user):
                c = self.clients.get(conn)
                if c is None:
                    continue
                for r in list(c.rooms):
                    if room in ("*", r):
                        self._spawn(self._leave(c, r, notify="banned"))
        elif isinstance(cmd, Unban):
            self.moderation.unban(cmd.room, cmd.user)
        elif isinstance(cmd, CloseRoom):
            room = cmd.room
            for conn, _user, _meta in eng.room_members(room, 0, 1 << 30):
                c = self.clients.get(conn)
                if c is not None:
                    self._spawn(self._leave(c, room, notify="closed"))
        else:
            log.warning("unknown command %r", cmd)

    # ---- hooks ---------------------------------------------------------------------------

    async def _call(self, hook: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call a hook, sync or async, with the configured timeout for async ones."""
        st = self.stats
        st.hook_calls[hook] += 1
        t0 = time.perf_counter()
        try:
            r = fn(*args)
            if inspect.isawaitable(r):
                if inspect.iscoroutine(r):
                    value, task = run_eager(r)
                else:
                    value, task = None, asyncio.ensure_future(r)
                if task is not None:
                    # Not asyncio.wait_for: it waits for the cancelled hook to finish
                    # unwinding, so a hook that ignores cancellation would never time out.
                    try:
                        done, _ = await asyncio.wait((task,), timeout=self.config.hooks.timeout)
                    except asyncio.CancelledError:
                        task.cancel()
                        raise
                    if not done:
                        task.cancel()
                        task.add_done_callback(_consume_result)
                        st.hook_timeouts[hook] += 1
                        log.warning("hook %s (%s) timed out after %.1fs", hook, getattr(fn, "__qualname__", fn), self.config.hooks.timeout)
                        raise HookTimeout(hook)
                    value = task.result()
                r = value
            return r
        except (Reject, HookTimeout):
            raise
        except Exception:
            st.hook_errors[hook] += 1
            log.exception("hook %s failed", hook)
            raise
        finally:
            elapsed = time.perf_counter() - t0
            st.hook_buckets[hook][bisect.bisect_left(HOOK_BUCKETS, elapsed)] += 1
            st.hook_seconds_sum[hook] += elapsed

    def _fallback_allows(self) -> bool:
        return self.config.hooks.fallback == "allow"

    # ---- the event pump ------------------------------------------------------------------

    def _on_readable(self) -> None:
        eng = self.engine
        if eng is None:
            return
        events, more = eng.poll(1024)
        for ev in events:
            try:
                kind = ev[0]
                if kind == EV_MESSAGE:
                    self._on_message(ev[1], ev[2], ev[3])
                elif kind == EV_CONNECT:
                    self._on_connect(ev)
                elif kind == EV_CLOSED:
                    self._on_closed(ev)
            except Exception:
                log.exception("event handling failed")
        if more:
            assert self._loop is not None
            self._loop.call_soon(self._on_readable)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Future[Any] | None:
        value, task = run_eager(coro) if inspect.iscoroutine(coro) else (None, asyncio.ensure_future(coro))
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
        return task

    def _spawn_notification(self, coro: Awaitable[Any]) -> None:
        """A leave/disconnect notification: :meth:`stop` gives these time to finish
        (debounced ones wait ``broker.leave_grace``) before cancelling what is left."""
        task = self._spawn(coro)
        if task is not None:
            self._notifications.add(task)
            task.add_done_callback(self._notifications.discard)

    def _task_done(self, t: asyncio.Future[Any]) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("background task failed", exc_info=t.exception())

    # ---- connect ---------------------------------------------------------------------------

    def _on_connect(self, ev: tuple[Any, ...]) -> None:
        _, conn, peer, path, query, headers, protocols = ev
        req = ConnectRequest(conn, peer, path, query, tuple(headers), tuple(protocols))
        self._spawn(self._connect(req))

    async def _connect(self, req: ConnectRequest) -> None:
        eng = self._engine()
        try:
            ident = self.auth.authenticate(req)
            for fn in self._hooks["on_connect"]:
                try:
                    r = await self._call("on_connect", fn, req, ident)
                except HookTimeout:
                    if self._fallback_allows():
                        continue
                    raise AuthError(503, "authentication timed out") from None
                if isinstance(r, Identity):
                    ident = r
                elif r is False:
                    raise AuthError(403, "connection refused")
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
                eng.disconnect(old, P.CLOSE_REPLACED, "replaced by a new login")
        client = Client(req.conn, ident, None, req.peer, node=self.node_id)
        self.clients[req.conn] = client
        proto = self.auth.choose_subprotocol(req, self.config.server.subprotocols)
        meta = orjson.dumps(ident.meta).decode() if ident.meta else None
        hb = self.config.heartbeat
        first = P.connected(client.session, ident.user, hb.interval, self.node_id, hb.idle_timeout)
        if not eng.accept(req.conn, user=ident.user, meta=meta, protocol=proto, first=first):
            # The engine gave up waiting (auth deadline); its close event cleans up.
            self.clients.pop(req.conn, None)
            return
        if ident.expires_at is not None:
            self._watch_expiry(req.conn, ident.expires_at)
        if self.config.log.access_log:
            log.info("connected", extra={"conn": req.conn, "peer": req.peer, "user": ident.user})
        if self._hooks["on_disconnect"] or self._hooks["after_connect"]:
            self._member_join(None, ident.user, client)

    # ---- token expiry on open connections ----------------------------------------------------

    def _watch_expiry(self, conn: int, expires_at: float) -> None:
        """Close ``conn`` with 4001 "token expired" at ``expires_at`` (+ ``auth.leeway``)."""
        deadline = expires_at + self.config.auth.leeway
        heap = self._expiry
        heapq.heappush(heap, (deadline, conn))
        if len(heap) > 1024 and len(heap) > 2 * len(self.clients):
            # Entries of closed connections pile up until due: rebuild from the live ones.
            lw = self.config.auth.leeway
            heap[:] = [(c.identity.expires_at + lw, k) for k, c in self.clients.items() if c.identity.expires_at is not None]
            heapq.heapify(heap)
        if heap and heap[0][0] < self._expiry_at:
            self._arm_expiry(heap[0][0])

    def _arm_expiry(self, deadline: float) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        self._expiry_at = deadline
        if self._loop is None:
            return
        # Re-checked at least every minute: the wall clock may be adjusted meanwhile.
        delay = min(max(0.0, deadline - time.time()), 60.0)
        self._expiry_timer = self._loop.call_later(delay, self._expire_tokens)

    def _expire_tokens(self) -> None:
        self._expiry_timer = None
        self._expiry_at = math.inf
        eng = self.engine
        if eng is None:
            return
        now = time.time()
        heap = self._expiry
        closed = 0
        while heap and heap[0][0] <= now:
            _, conn = heapq.heappop(heap)
            c = self.clients.get(conn)
            if c is not None and c.identity.expires_at is not None:
                if eng.disconnect(conn, P.CLOSE_AUTH, "token expired"):
                    closed += 1
        if closed:
            self.stats.tokens_expired += closed
            log.info("closed %d connection(s) whose token expired", closed)
        if heap:
            self._arm_expiry(heap[0][0])

    # ---- close -----------------------------------------------------------------------------

    def _on_closed(self, ev: tuple[Any, ...]) -> None:
        _, conn, code, reason, rooms, _user = ev
        client = self.clients.pop(conn, None)
        if client is None:
            return
        # One count per disconnect (not per message), by close code; codes nobody here
        # sends or documents are folded into "other" so the label set stays bounded.
        label = str(code) if code in _KNOWN_CLOSE_CODES else "other"
        by_code = self.stats.disconnects_by_code
        by_code[label] = by_code.get(label, 0) + 1
        if self.config.log.access_log:
            log.info("disconnected", extra={"conn": conn, "user": client.user, "code": code, "reason": reason})
        # The engine's list is authoritative; it stays on the client for on_disconnect.
        client.rooms = tuple(rooms)
        client.backlog = None
        for room in rooms:
            self._spawn(self._after_leave(client, room))
        if self._hooks["on_disconnect"]:
            self._spawn_notification(self._disconnect_hook(client, code, reason))

    async def _disconnect_hook(self, client: Client, code: int, reason: str) -> None:
        if await self._member_left(None, client.user):
            await self._notify("on_disconnect", client, code, reason)

    # ---- join/leave debounce across nodes (RedisBroker.member_join / member_leave) ---------

    def _member_join(self, room: str | None, user: str, client: Client) -> None:
        """Count a connection of ``user`` in ``room`` (None: connected) for the debounce,
        in the background, and run ``after_join``/``after_connect`` when it is a real
        change; a later leave of the same (room, user) waits for it."""
        fn = self.broker.debounce.join
        key = (room, user)
        task = asyncio.ensure_future(self._member_join_run(fn, room, user, client))
        self._member_pending[key] = task
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        task.add_done_callback(lambda t, key=key: self._member_pending.pop(key) if self._member_pending.get(key) is t else None)

    async def _member_join_run(self, fn: Callable[..., Awaitable[Any]], room: str | None, user: str, client: Client) -> None:
        try:
            real = bool(await fn(room, user))
        except BrokerError:
            real = True  # Redis unreachable: report it (at least once) rather than lose it
        if real:
            await self._join_notice(client, room)

    async def _join_notice(self, client: Client, room: str | None) -> None:
        if room is None:
            await self._notify("after_connect", client)
        else:
            await self._notify("after_join", client, room)

    async def _member_left(self, room: str | None, user: str) -> bool:
        """Whether hooks hear of this leave: with a broker that debounces (Redis), once
        per real leave, ``broker.leave_grace`` later, on one node (a reconnect within the
        grace period, on any node, is no leave); otherwise at once."""
        fn = self.broker.debounce.leave
        pending = self._member_pending.get((room, user))
        if pending is not None:
            await asyncio.wait((pending,))
        try:
            return bool(await fn(room, user))
        except BrokerError:
            return True  # Redis unreachable: report it (at least once) rather than lose it

    async def _notify(self, hook: str, *args: Any) -> None:
        for fn in self._hooks[hook]:
            try:
                await self._call(hook, fn, *args)
            except Exception:
                pass  # counted and logged in _call; notifications cannot be refused

    # ---- client messages -------------------------------------------------------------------

    def _on_message(self, conn: int, data: bytes, binary: bool) -> None:
        c = self.clients.get(conn)
        if c is None:
            return
        if c.busy:
            backlog = c.backlog
            if backlog is None:
                backlog = c.backlog = deque()  # only while a slow hook holds this client
            elif len(backlog) >= MAX_BACKLOG:
                # A hook of this client is slow and it keeps sending: shed, tell it why.
                self._error(c, _request_id(data), P.E_RATE, "too many requests waiting for a slow handler")
                return
            backlog.append(data if not binary else b"\x00")
            return
        self._run_for(c, data if not binary else b"\x00")

    def _run_for(self, c: Client, data: bytes) -> None:
        """Handle ``data`` now; if it must wait, hold the client's later messages behind it."""
        value, task = run_eager(self._handle(c, data))
        if task is not None:
            c.busy = True
            self._tasks.add(task)  # cancelled at stop
            task.add_done_callback(self._task_done)
            task.add_done_callback(lambda _t, c=c: self._resume(c))

    def _resume(self, c: Client) -> None:
        c.busy = False
        backlog = c.backlog
        if backlog is None:
            return
        if self.engine is None or self.clients.get(c.conn) is not c:
            c.backlog = None  # closed meanwhile: nobody to answer
            return
        while backlog and not c.busy:
            self._run_for(c, backlog.popleft())
        if not backlog and c.backlog is backlog:
            c.backlog = None  # later waits start a new one: no idle deque per connection

    def _error(self, c: Client, rid: Any, code: int, message: str) -> None:
        st = self.stats
        st.errors_sent[code] = st.errors_sent.get(code, 0) + 1
        eng = self._engine()
        eng.send(c.conn, P.error(rid, code, message), P.PRIO_HIGH)
        c.errors += 1
        if c.errors >= self.config.limits.max_errors:
            eng.disconnect(c.conn, P.CLOSE_ABUSE, "too many errors")

    async def _handle(self, c: Client, data: bytes) -> None:
        if data == b"\x00":
            return self._error(c, None, P.E_BAD_REQUEST, "binary frames are not supported; send JSON text")
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            return self._error(c, None, P.E_BAD_REQUEST, "invalid JSON")
        if not isinstance(msg, dict):
            return self._error(c, None, P.E_BAD_REQUEST, "a request must be a JSON object")
        rid = msg.get("id")
        op = msg.get("op")
        try:
            if op == "publish":
                await self._op_publish(c, msg, rid, len(data))
            elif op == "join":
                await self._op_join(c, msg, rid)
            elif op == "leave":
                await self._op_leave(c, msg, rid)
            elif op == "ping":  # only reaches Python when the engine's app_ping is off
                self._engine().send(c.conn, orjson.dumps({"op": "pong", "ts": P.now_ms()}), P.PRIO_HIGH)
            elif not isinstance(op, str):
                return self._error(c, rid, P.E_BAD_REQUEST, "missing field: op")
            else:
                return self._error(c, rid, P.E_UNKNOWN_OP, f"unknown op {op[:32]!r}")
            c.errors = 0
        except Reject as r:
            self._error(c, rid, r.code, r.message)
        except HookTimeout:
            self._error(c, rid, P.E_HOOK_TIMEOUT, "timed out")
        except BrokerError as e:
            # Publishes and joins handle broker failures themselves (degraded); this is
            # whatever else could not reach the broker. Publish failures are counted in _publish.
            self._error(c, rid, P.E_INTERNAL, f"temporarily unavailable: {e}")
        except Exception:
            log.exception("handling %s failed", op)
            self._error(c, rid, P.E_INTERNAL, "internal error")

    @staticmethod
    def _room_of(msg: dict[str, Any]) -> str:
        room = msg.get("room")
        if not isinstance(room, str) or not room:
            raise Reject(P.E_BAD_REQUEST, "missing field: room")
        return room

    async def _op_join(self, c: Client, msg: dict[str, Any], rid: Any) -> None:
        room = self._room_of(msg)
        verdict, route = self.policy.check_join(c.identity, room)
        if not verdict.ok or route is None:
            raise Reject(verdict.code, verdict.message)
        for fn in self._hooks["on_join"]:
            try:
                r = await self._call("on_join", fn, c, room)
            except HookTimeout:
                if self._fallback_allows():
                    continue
                raise
            if r is False:
                raise Reject(P.E_FORBIDDEN, f"not allowed to join {room}")
        history = msg.get("history", 0)
        resume = msg.get("resume")
        if not isinstance(history, int) or isinstance(history, bool) or history < 0:
            raise Reject(P.E_BAD_REQUEST, "history must be a non-negative integer")
        if resume is not None and not (isinstance(resume, dict) and isinstance(resume.get("seq"), int) and isinstance(resume.get("epoch", ""), str)):
            raise Reject(P.E_BAD_REQUEST, "resume must be {\"seq\": int, \"epoch\": str}")
        eng = self._engine()
        joined = eng.join(c.conn, room)
        if joined < 0:
            return  # the connection is gone
        c.rooms = _with(c.rooms, room)
        if joined == 1:
            if route.cfg.single_session:
                self._replace_older_sessions(c, room)
            if self._hooks["on_leave"] or self._hooks["after_join"]:
                self._member_join(room, c.user, c)
            # Every first join of a connection, not only the room's first member: the
            # broker's subscribe is idempotent and returns once this node receives the
            # room, so the history read below leaves no gap (a second joiner arriving
            # while the first one's subscription is pending waits for it too).
            await self.broker.subscribe(room)
        cap = min(50, route.cfg.history_size)
        degraded = False
        try:
            if resume is not None:
                h = await self.broker.history(room, limit=route.cfg.history_size, since=resume["seq"], epoch=resume.get("epoch", ""))
                if h.recovered is False and history > 0:
                    # The client must resync: give it the room's last messages instead
                    # of a partial gap.
                    last = await self.broker.history(room, limit=min(history, cap))
                    h = HistoryResult(last.messages, last.seq, last.epoch, False)
            else:
                h = await self.broker.history(room, limit=min(history, cap))
        except BrokerError:
            # Redis unreachable: the join stands (local delivery works), without history.
            degraded = True
            h = HistoryResult([], 0, "", None if resume is None else False)
        conns, users = self._join_counts(room)
        reply: dict[str, Any] = {
            "op": "ack", "id": rid, "room": room, "seq": h.seq, "epoch": h.epoch,
            "msgs": [orjson.Fragment(m) for m in h.messages], "conns": conns, "users": users,
        }
        if h.recovered is not None:
            reply["recovered"] = h.recovered
        if degraded:
            reply["degraded"] = True
        eng.send(c.conn, orjson.dumps(reply), P.PRIO_HIGH)
        if joined == 1:
            await self._presence_change(room, route, "join", c.user)

    def _join_counts(self, room: str) -> tuple[int, int]:
        """(conns, users) for a join ack, without a broker round trip: this node's exact
        counts; with a shared broker, at least the cluster-wide counts of the last
        presence tick (``presence.interval`` old at most)."""
        conns, users = self._engine().room_counts(room)
        if self.broker.presence.shared:
            last = self._presence_last.get(room)
            if last is not None:
                conns, users = max(conns, last[0]), max(users, last[1])
        return conns, users

    def _replace_older_sessions(self, c: Client, room: str) -> None:
        """``single_session`` routes: the user's other connections in ``room`` (older
        logins, on this node) are closed with 4004."""
        eng = self._engine()
        for conn in eng.user_conns(c.user):
            if conn != c.conn:
                other = self.clients.get(conn)
                if other is not None and room in other.rooms:
                    eng.disconnect(conn, P.CLOSE_REPLACED, "replaced by a newer login")

    async def _op_leave(self, c: Client, msg: dict[str, Any], rid: Any) -> None:
        room = self._room_of(msg)
        if room not in c.rooms:
            raise Reject(P.E_NOT_JOINED, f"not in room {room}")
        await self._leave(c, room)
        self._engine().send(c.conn, P.ack(rid, room=room), P.PRIO_HIGH)

    async def _leave(self, c: Client, room: str, notify: str | None = None) -> None:
        """Remove ``c`` from ``room`` (client request, ban or room close). With
        ``notify`` (``"banned"``, ``"closed"``) the client is told first, with a presence
        event ``{"op":"presence","room":…,"event":notify,"user":…}``."""
        if room not in c.rooms:
            return
        c.rooms = _without(c.rooms, room)
        eng = self._engine()
        if notify:
            eng.send(c.conn, P.presence_event(room, notify, c.user), P.PRIO_HIGH)
        eng.leave(c.conn, room)
        await self._after_leave(c, room)

    async def _after_leave(self, c: Client, room: str) -> None:
        conns, _ = self._engine().room_counts(room)
        if conns == 0:
            await self.broker.unsubscribe(room)
        route = self.router.match(room)
        if route is not None:
            await self._presence_change(room, route, "leave", c.user)
        if self._hooks["on_leave"]:
            self._spawn_notification(self._leave_hook(c, room))

    async def _leave_hook(self, c: Client, room: str) -> None:
        if await self._member_left(room, c.user):
            await self._notify("on_leave", c, room)

    async def _presence_change(self, room: str, route: Route, event: str, user: str) -> None:
        limit = route.cfg.presence_events_max_members
        if limit and self._engine().room_counts(room)[0] <= limit:
            try:
                await self.broker.publish_frame(room, P.presence_event(room, event, user), P.PRIO_LOW)
            except BrokerError:
                self.stats.broker_publish_errors += 1

    async def _op_publish(self, c: Client, msg: dict[str, Any], rid: Any, size: int) -> None:
        room = self._room_of(msg)
        mtype = msg.get("type", "chat")
        if not isinstance(mtype, str) or not mtype or len(mtype) > 64:
            raise Reject(P.E_BAD_REQUEST, "type must be a short string")
        if "data" not in msg:
            raise Reject(P.E_BAD_REQUEST, "missing field: data")
        if room not in c.rooms:
            raise Reject(P.E_NOT_JOINED, f"join {room} before publishing")
        verdict, route = self.policy.check_publish(c.identity, room, mtype, size)
        if not verdict.ok or route is None:
            self._count_drop(verdict.code)
            raise Reject(verdict.code, verdict.message)
        m = Message(room, mtype, msg["data"], c, verdict.priority)
        for fn in self._hooks["on_message"]:
            try:
                r = await self._call("on_message", fn, c, m)
            except HookTimeout:
                if self._fallback_allows():
                    continue
                raise
            if r is DROP:
                self.stats.dropped["filter"] += 1
                self._engine().send(c.conn, P.ack(rid, seq=0), P.PRIO_HIGH)
                return
            if isinstance(r, Message):
                m = r
        seq = 0
        degraded = False
        for target in m.rooms or [m.room]:
            troute = route if target == room else self.router.match(target)
            if troute is None:
                raise Reject(P.E_NO_ROUTE, f"no route for room {target}")
            try:
                res = await self._publish(target, troute, m.type, m.data, m.priority, c.user)
            except BrokerError:
                # Delivered to this node's members only (seq 0, not recoverable); counted
                # in _publish. after_publish does not run: nothing was published.
                degraded = True
                continue
            if target == room or not seq:
                seq = res.seq
            if self._hooks["after_publish"]:
                # The message as published into ``target`` (a copy when re-routed), so
                # the hook can tell which room ``res`` belongs to.
                pm = m if m.room == target else dataclasses.replace(m, room=target)
                self._spawn(self._notify("after_publish", pm, res))
        if degraded:
            self._engine().send(c.conn, P.ack(rid, seq=seq, degraded=True), P.PRIO_HIGH)
        else:
            self._engine().send(c.conn, P.ack(rid, seq=seq), P.PRIO_HIGH)

    def _count_drop(self, code: int) -> None:
        d = self.stats.dropped
        key = {P.E_RATE: "rate_limit", P.E_MUTED: "mute", P.E_TOO_LARGE: "too_large", P.E_FORBIDDEN: "forbidden"}.get(code)
        if key:
            d[key] += 1

    async def _publish(self, room: str, route: Route, mtype: str, data: Any, prio: int, sender: str | None) -> PublishResult:
        head, tail = P.message_parts(room, mtype, prio, sender, data, P.now_ms())
        recoverable = mtype in route.cfg.recoverable_types
        key = (mtype if mtype in route.cfg.priorities else "other", prio)
        self.stats.published[key] = self.stats.published.get(key, 0) + 1
        try:
            return await self.broker.publish(room, head, tail, prio, recoverable, HistoryPolicy(route.cfg.history_size, route.cfg.history_ttl))
        except BrokerError:
            self.stats.broker_publish_errors += 1
            raise

    # ---- presence counts -----------------------------------------------------------------

    async def _presence_loop(self) -> None:
        interval = self.config.presence.interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self._presence_tick()
            except Exception:
                log.exception("presence tick failed")

    async def _presence_tick(self) -> None:
        eng = self._engine()
        local = {room: (c, u) for room, c, u in eng.rooms()}
        shared = self.broker.presence.shared
        try:
            await self.broker.presence.report(local)
        except BrokerError:
            shared = False  # Redis unreachable (logged by the broker): local counts meanwhile
        last = self._presence_last
        fresh: dict[str, tuple[int, int]] = {}
        for room in local:
            counts = local[room]
            if shared:
                try:
                    counts = await self.broker.presence.counts(room)
                except BrokerError:
                    shared = False
            fresh[room] = counts
            if last.get(room) != counts:
                eng.publish(room, P.presence_counts(room, *counts), P.PRIO_LOW)
        self._presence_last = fresh
        self._update_room_rates(local)
        if shared:
            await self._report_members(local)

    async def _report_members(self, local: dict[str, tuple[int, int]]) -> None:
        """Share the member lists of small rooms (route ``presence_events_max_members``)
        with the other nodes, so member listings of those rooms cover the cluster."""
        eng = self._engine()
        small: dict[str, list[dict[str, Any]]] = {}
        for room, (conns, _users) in local.items():
            route = self.router.match(room)
            limit = route.cfg.presence_events_max_members if route is not None else 0
            if 0 < conns <= limit:
                small[room] = [
                    {"user": user, "meta": orjson.loads(meta) if meta else {}}
                    for _conn, user, meta in eng.room_members(room, 0, limit)
                ]
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

    # ---- lifecycle -------------------------------------------------------------------------

    def _engine_kwargs(self) -> dict[str, Any]:
        cfg = self.config
        s, lim, hb, d = cfg.server, cfg.limits, cfg.heartbeat, cfg.deflate
        static: dict[str, tuple[str, bytes]] = {}
        if s.demo:
            from .demo import static_files

            static = static_files(s.ws_path)
        return dict(
            host=s.host, port=s.port, reuse_port=s.reuse_port or s.workers > 1, backlog=s.backlog, workers=s.threads,
            ws_path=s.ws_path, health_path=s.health_path, static_files=static,
            handshake_timeout=lim.handshake_timeout, auth_timeout=cfg.auth.deadline,
            max_headers=lim.max_headers, max_header_bytes=lim.max_header_bytes,
            max_frame_size=lim.max_frame_bytes, max_message_size=lim.max_message_bytes,
            deflate=d.enabled, deflate_min_size=d.min_size, deflate_level=d.level,
            deflate_client_max_window_bits=d.client_max_window_bits,
            idle_timeout=hb.idle_timeout, ping_interval=float(hb.interval) if hb.ws_ping else 0.0,
            queue_bytes=lim.queue_bytes, fanout_chunk=lim.fanout_chunk, event_queue_cap=lim.event_queue,
            send_buffer=lim.socket_send_buffer,
        )

    async def start(self) -> tuple[str, int]:
        """Start the engine, the broker, plugins and the HTTP API. Returns the client
        listener's (host, port)."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        soft, hard = raise_fd_limit()
        log.info("open files limit raised to %d (hard limit %d)", soft, hard)
        for p in self.plugins:
            r = p.setup(self)
            if inspect.isawaitable(r):
                await r
        await self.broker.start(self, self.node_id)
        eng = Engine(**self._engine_kwargs())
        self._set_room_options(eng)
        self.engine = eng
        addr = eng.start()
        self._loop.add_reader(eng.fd, self._on_readable)
        self._spawn_task(self._presence_loop())
        if self.config.api.enabled:
            from .api import start_api

            self._api_runner = await start_api(self)
        log.info("gateway %s listening on ws://%s:%d%s", self.node_id, addr[0], addr[1], self.config.server.ws_path)
        return addr

    def _set_room_options(self, eng: Engine) -> None:
        """Merge windows by room-name prefix. The engine picks the longest matching
        prefix, so once any route merges, every route with a prefix states its own
        setting (``live:vip:{id}`` without merging must not inherit ``live:{id}``'s)."""
        routes = self.config.routes
        if not any(r.merge_ms > 0 for r in routes):
            return
        for route in routes:
            prefix = _prefix_of(route.pattern)
            if prefix is None:
                if route.merge_ms > 0:
                    log.warning("routes: merge_ms of %r is ignored: the engine matches merge windows by a literal room-name prefix", route.pattern)
                continue
            eng.set_room_options(prefix, route.merge_ms, route.merge_max)

    def _spawn_task(self, coro: Awaitable[Any]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)

    @property
    def ready(self) -> bool:
        """True while serving and the broker is usable: ``/readyz``."""
        eng = self.engine
        return eng is not None and eng.running and not eng.draining and self.broker.ready

    async def stop(self, code: int = P.CLOSE_RESTART, reason: str = "restarting") -> int:
        """Graceful stop: readiness goes false, clients get a ``drain`` frame and a close
        with ``code``; waits up to ``drain.timeout``. Returns connections dropped."""
        eng = self.engine
        if eng is None:
            return 0
        eng.drain(code, reason, P.drain(self.config.drain.retry_ms))
        left = await asyncio.to_thread(eng.wait_closed, self.config.drain.timeout)
        # Let close events reach the hooks before the engine goes.
        self._on_readable()
        dropped = eng.stop(code, reason, 0.5)
        if self._loop is not None:
            self._loop.remove_reader(eng.fd)
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        self._expiry.clear()
        self._expiry_at = math.inf
        if self._notifications:
            # on_leave/on_disconnect of the drained clients: with a debouncing broker they
            # are due leave_grace from now (a client that reconnected elsewhere meanwhile
            # is no leave); then each hook may take hooks.timeout.
            grace = self.broker.debounce.grace
            await asyncio.wait(list(self._notifications), timeout=grace + self.config.hooks.timeout)
        for t in list(self._tasks):
            t.cancel()
        if self._api_runner is not None:
            await self._api_runner.cleanup()
            self._api_runner = None
        await self.broker.close()
        for p in self.plugins:
            r = p.teardown()
            if inspect.isawaitable(r):
                await r
        self.engine = None
        if self._stopping is not None:
            self._stopping.set()
        log.info("gateway stopped (%d connections dropped after the drain deadline)", left + dropped)
        return left

    async def serve(self) -> None:
        """Start, run until SIGINT/SIGTERM, then stop gracefully."""
        await self.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        await stop.wait()
        log.info("signal received: draining")
        await self.stop()

    def run(self) -> None:
        """Run on uvloop until a signal stops it."""
        import uvloop

        uvloop.run(self.serve())
