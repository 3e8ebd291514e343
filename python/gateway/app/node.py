"""The ``Gateway``: one node. It composes the parts, owns the engine and the broker, pumps
engine events to the sessions, applies broker commands, and runs start and stop.

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
import contextlib
import inspect
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .._core import EV_CLOSED, EV_CONNECT, EV_MESSAGE, Engine, raise_fd_limit
from ..auth import Authenticator
from ..broker import Broker, MemoryBroker, PublishResult
from ..broker.commands import Ban, Broadcast, CloseRoom, Command, ConvMember, Kick, Mute, Unban, Unmute
from ..config import Config
from ..errors import NotRunning
from ..limits import RateLimiter
from ..media.service import Media
from ..moderation import Moderation
from ..policy import Policy
from ..protocol import frames
from ..protocol.codes import CloseCode, Priority
from ..routing import Router
from .certs import CertWatcher
from .conversations import Conversations
from .hooks import Hooks
from .members import Members
from .outbox import Outbox
from .plugins import Plugin
from .rooms import Rooms
from .session import Client, Sessions
from .stats import Stats
from .storage import Storage
from .tasks import Tasks

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Gateway", "make_broker"]

log = logging.getLogger("gateway")

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _prefix_of(pattern: str) -> str | None:
    """Literal room-name prefix of a route pattern (``live:{id}`` -> ``live:``, ``*`` ->
    ``""``); None when the pattern starts with a placeholder (no usable prefix)."""
    if pattern == "*":
        return ""
    if pattern.startswith("{"):
        return None
    return pattern.split("{", 1)[0] if "{" in pattern else pattern


def make_broker(config: Config) -> Broker:
    """The broker ``broker.kind`` names."""
    if config.broker.kind == "redis":
        from ..broker.redis import RedisBroker

        return RedisBroker(config.broker)
    return MemoryBroker(config.broker.idempotency_ttl)


class Gateway:
    """The application. ``Gateway(config, plugins=[...])``, then ``run()`` or ``await serve()``."""

    def __init__(self, config: Config | None = None, plugins: Iterable[Plugin] = (), broker: Broker | None = None) -> None:
        if config is None:
            config = Config()
            config.auth.mode = "dev"
            config.server.host = "127.0.0.1"
            config.check()
        self.config = config
        self.node_id = config.node_id
        self.router = Router(config.routes)
        self.moderation = Moderation()
        self.policy = Policy(self.router, RateLimiter(), self.moderation)
        self.auth = Authenticator(config.auth)
        self.broker: Broker = broker or make_broker(config)
        self.stats = Stats()
        self._engine: Engine | None = None
        #: The TLS certificate's reloader, while a TLS listener runs.
        self.certs: CertWatcher | None = None
        self.tasks = Tasks()
        self.hooks = Hooks(config.hooks, self.stats)
        #: The message store and what routes keep in it (no store when none keeps anything).
        self.storage = Storage(config, self.router, self.broker)
        #: Stored messages and room events to the company's endpoints (``[outbox]``).
        self.outbox = Outbox(config.outbox, self.storage.store, self.node_id)
        self._outbox_task: asyncio.Future[Any] | None = None
        self.member_events = Members(self.broker, self.hooks, self.tasks, self.outbox)
        self.rooms = Rooms(config, self.router, self.broker, self.engine_or_raise, self.member_events, self.stats, self.storage)
        #: Conversations (dm, group, notice routes; protocol 1.1).
        self.conversations = Conversations(
            config, self.router, self.storage, self.broker, self.engine_or_raise, self.rooms, self.stats, self.outbox, self.tasks, self.hooks,
        )
        self.sessions = Sessions(
            config, self.engine_or_raise, self.auth, self.policy, self.broker, self.hooks, self.rooms, self.member_events, self.tasks, self.stats,
            self.conversations,
        )
        self.plugins: list[Plugin] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._api_runner: Any = None
        self._metrics_registry: CollectorRegistry | None = None
        self._plugin_metrics: dict[str, Any] = {}
        #: HTTP routes plugins added (:meth:`http_route`), served by the HTTP API.
        self.http_routes: list[tuple[str, str, Callable[[Any], Awaitable[Any]]]] = []
        #: Images, voice, video and files (``[media]``, docs/media.md).
        self.media = Media(self)
        self.sessions.media = self.media
        self.conversations.media = self.media
        for p in plugins:
            self.use(p)
        self._use_desk()

    def _use_desk(self) -> None:
        """``[plugins.desk]``: validated now (a ``ConfigError`` at start-up, never later);
        the desk is added when ``enabled`` and no ``Desk`` was given."""
        table = self.config.plugins.get("desk")
        if table is None:
            return
        from ..desk import Desk
        from ..desk.settings import parse_settings

        given = next((p for p in self.plugins if isinstance(p, Desk)), None)
        if given is not None:
            if not given.configured:
                given.configure(table)
            return
        settings = parse_settings(table)
        if settings.enabled:
            self.use(Desk(settings=settings))

    # ---- the engine ----------------------------------------------------------------------

    @property
    def engine(self) -> Engine | None:
        """The running engine, or None before start and after stop."""
        return self._engine

    @engine.setter
    def engine(self, eng: Engine | None) -> None:
        self._engine = eng

    def engine_or_raise(self) -> Engine:
        """The running engine; raises :class:`NotRunning` (HTTP 503 in the API) when none."""
        if self._engine is None:
            raise NotRunning("the gateway is not running")
        return self._engine

    @property
    def clients(self) -> dict[int, Client]:
        """Connected clients of this node by engine connection id (read-only)."""
        return self.sessions.clients

    # ---- composition ---------------------------------------------------------------------

    def use(self, plugin: Plugin) -> Plugin:
        """Add a plugin: every hook method it overrides is registered, in plugin order."""
        self.plugins.append(plugin)
        self.hooks.add_plugin(plugin)
        return plugin

    def _decorator(self, name: str) -> Decorator:
        return lambda fn: self.hooks.add(name, fn)

    on_connect = property(lambda self: self._decorator("on_connect"), doc="Decorator: ``on_connect(req, identity)``.")
    on_join = property(lambda self: self._decorator("on_join"), doc="Decorator: ``on_join(client, room)``.")
    on_message = property(lambda self: self._decorator("on_message"), doc="Decorator: ``on_message(client, msg)``.")
    on_leave = property(lambda self: self._decorator("on_leave"), doc="Decorator: ``on_leave(client, room)``.")
    on_disconnect = property(lambda self: self._decorator("on_disconnect"), doc="Decorator: ``on_disconnect(client, code, reason)``.")
    after_publish = property(lambda self: self._decorator("after_publish"), doc="Decorator: ``after_publish(msg, result)``.")
    after_join = property(lambda self: self._decorator("after_join"), doc="Decorator: ``after_join(client, room)``.")
    after_connect = property(lambda self: self._decorator("after_connect"), doc="Decorator: ``after_connect(client)``.")
    on_member = property(lambda self: self._decorator("on_member"), doc="Decorator: ``on_member(client, change)``.")
    on_media = property(lambda self: self._decorator("on_media"), doc="Decorator: ``on_media(info)`` (docs/media.md, moderation).")

    def http_route(self, method: str, path: str, handler: Callable[[Any], Awaitable[Any]]) -> None:
        """Serve ``handler(request) -> aiohttp.web.StreamResponse`` on the HTTP API at
        ``method`` ``path`` (aiohttp route syntax, e.g. ``/v1/cs/sessions/{id}``). Call it
        in ``setup()``. Paths under ``/v1/`` need the API key like every other; a handler
        may raise :class:`~gateway.Reject` (its code picks the HTTP status: 4003 -> 403,
        4004 -> 404, 409x -> 409, else 400), ``ValueError`` (400) or
        ``gateway.api.BadRequest(message, status)``."""
        if self._api_runner is not None:
            raise RuntimeError("http_route() after start: add routes in setup()")
        self.http_routes.append((method.upper(), path, handler))

    def op(self, name: str) -> Decorator:
        """Decorator: ``fn(client, op, msg)`` answers the client op ``name`` (see
        ``Plugin.on_request``)."""
        return lambda fn: self.hooks.add_op(name, fn)

    # ---- helpers for plugins and the HTTP API --------------------------------------------

    async def publish(
        self, room: str, data: Any, type: str = "chat", priority: int | None = None, sender: str | None = None, idempotency_key: str | None = None
    ) -> PublishResult:
        """Publish into a room from the server side (no rate limits, no hooks). With
        ``idempotency_key``, a retry within ``broker.idempotency_ttl`` returns the first
        result (``duplicate=True``) instead of publishing again."""
        route = self.router.match(room)
        if route is None:
            raise ValueError(f"no route for room {room!r}")
        prio = self.router.priority(route, type) if priority is None else priority
        idem = None if idempotency_key is None else f"a\x00{idempotency_key}"
        return await self.rooms.publish(room, route, type, data, prio, sender, idem, None if idempotency_key is None else f"api:{idempotency_key}")

    async def send_user(self, user: str, data: Any, type: str = "push", priority: int = Priority.HIGH, idempotency_key: str | None = None) -> bool:
        """Push to every connection of ``user`` on every node (e.g. an order status).
        False when ``idempotency_key`` was already used (nothing sent again)."""
        idem = None if idempotency_key is None else f"s\x00{idempotency_key}"
        return await self.broker.send_user(user, frames.push(type, data), int(priority), idem)

    async def notify(self, user: str, data: Any, type: str = "notice", priority: int = Priority.HIGH, idempotency_key: str | None = None) -> dict[str, Any]:
        """A notice to ``user`` from the system (an order status...): stored in their
        notice conversation (``notice:{user_id}``) and delivered to their connections that
        sync conversations, on any node, now or on their next sync; connections of older
        clients get it as a ``push`` frame (with ``room`` and ``seq``). Returns ``{"room",
        "seq", "delivered": "live" | "stored", "duplicate"}``: "live" when one of the
        user's connections had it (other nodes as of their last presence report).
        Without a notice route or a store: :meth:`send_user` alone (``room`` None)."""
        cv = self.conversations
        room = cv.notice_room(user) if cv.enabled else None
        if room is None:
            first = await self.send_user(user, data, type, priority, idempotency_key)
            return {"room": None, "seq": 0, "delivered": "live", "duplicate": not first}
        seq, duplicate = await cv.post(room, type, data, None, idempotency_key)
        live = await cv.online(room, user)
        if not duplicate:
            await self.broker.send_user(user, frames.push(type, data, room=room, seq=seq), int(priority))
        return {"room": room, "seq": seq, "delivered": "live" if live else "stored", "duplicate": duplicate}

    async def broadcast(self, data: Any, type: str = "broadcast", priority: int = Priority.NORMAL) -> None:
        """Push to every connection on every node."""
        await self.broker.command(Broadcast(frames.push(type, data), int(priority)))

    async def kick(self, user: str, reason: str = "kicked", code: int = CloseCode.KICKED) -> None:
        """Close every connection of ``user`` on every node."""
        await self.broker.command(Kick(user, int(code), reason[:120]))
        self.outbox.record("", "kick", user=user, code=int(code), reason=reason[:120])

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
        self.outbox.record(room, "ban", user=user, until=until)

    async def unban(self, room: str, user: str) -> None:
        """Lift a ban set with the same ``room`` (``*`` = the everywhere ban), on every node."""
        await self.broker.command(Unban(room, user))

    async def close_room(self, room: str, reason: str = "room closed") -> None:
        """Remove every member from ``room`` on every node (they get a presence notice)."""
        await self.broker.command(CloseRoom(room, reason))

    async def presence(self, room: str) -> tuple[int, int]:
        """(connections, users) in ``room`` across nodes."""
        return await self.rooms.counts(room)

    async def members_everywhere(self, room: str, offset: int = 0, limit: int = 100) -> tuple[list[dict[str, Any]], str]:
        """Members of ``room`` across nodes when shared, else this node's: ``(members, scope)``."""
        return await self.rooms.members_everywhere(room, offset, limit)

    def members(self, room: str, offset: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Local members of ``room`` (user ids and meta), paged."""
        return self.rooms.local_members(room, offset, limit)

    # ---- metrics for plugins ---------------------------------------------------------------

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """The Prometheus registry served at ``/metrics`` on the API port. Register your
        own collectors here, or use :meth:`counter`, :meth:`gauge`, :meth:`histogram`."""
        if self._metrics_registry is None:
            from ..metrics import make_registry

            self._metrics_registry = make_registry(self)
        return self._metrics_registry

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

        c: Counter = self._metric(Counter, name, doc, labels)
        return c

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        """A ``prometheus_client.Gauge`` served on ``/metrics`` (same name: same gauge)."""
        from prometheus_client import Gauge

        g: Gauge = self._metric(Gauge, name, doc, labels)
        return g

    def histogram(self, name: str, doc: str, labels: Sequence[str] = (), buckets: Sequence[float] | None = None) -> Histogram:
        """A ``prometheus_client.Histogram`` served on ``/metrics`` (same name: same one)."""
        from prometheus_client import Histogram

        kw = {"buckets": tuple(buckets)} if buckets is not None else {}
        h: Histogram = self._metric(Histogram, name, doc, labels, **kw)
        return h

    # ---- BrokerHandler: what arrives from the broker for this node -------------------------

    def deliver_room(self, room: str, payload: bytes, prio: int) -> int:
        rm = self.stats.room_messages
        rm[room] = rm.get(room, 0) + 1
        # Seqs other nodes took in a room whose messages are kept (one dict lookup).
        self.storage.seen(room, payload)
        return self.engine_or_raise().publish(room, payload, prio)

    def deliver_user(self, user: str, payload: bytes, prio: int) -> int:
        return self.engine_or_raise().send_user(user, payload, prio)

    def local_counts(self, room: str) -> tuple[int, int]:
        return self.engine_or_raise().room_counts(room)

    def apply(self, cmd: Command) -> None:
        """Apply a cluster-wide command on this node."""
        mod = self.moderation
        match cmd:
            case Kick(user, code, reason):
                self.engine_or_raise().disconnect_user(user, code, reason[:120])
            case Broadcast(frame, prio):
                self.engine_or_raise().broadcast(frame, prio)
            case Mute(room, user, until, whitelist):
                if user:
                    mod.mute_user(room, user, until)
                else:
                    mod.mute_room(room, until, whitelist)
            case Unmute(room, user):
                if user:
                    mod.unmute_user(room, user)
                else:
                    mod.unmute_room(room)
            case Ban(room, user, until):
                mod.ban(room, user, until)
                eng = self._engine
                for conn in eng.user_conns(user) if eng is not None else ():
                    c = self.clients.get(conn)
                    if c is None:
                        continue
                    for r in c.rooms:
                        if room in ("*", r):
                            self.tasks.spawn(self.rooms.leave(c, r, notify="banned"))
            case Unban(room, user):
                mod.unban(room, user)
            case ConvMember():
                self.conversations.apply(cmd)
            case CloseRoom(room, _reason):
                eng = self.engine_or_raise()
                for conn, _user, _meta in eng.room_members(room, 0, 1 << 30):
                    c = self.clients.get(conn)
                    if c is not None:
                        self.tasks.spawn(self.rooms.leave(c, room, notify="closed"))

    # ---- the event pump ------------------------------------------------------------------

    def _on_readable(self) -> None:
        eng = self._engine
        if eng is None:
            return
        events, more = eng.poll(1024)
        sessions = self.sessions
        for ev in events:
            try:
                kind = ev[0]
                if kind == EV_MESSAGE:
                    sessions.on_message(ev[1], ev[2], ev[3])  # type: ignore[arg-type]
                elif kind == EV_CONNECT:
                    sessions.on_connect(ev)
                elif kind == EV_CLOSED:
                    sessions.on_closed(ev)
            except Exception:
                log.exception("event handling failed")
        if more:
            assert self._loop is not None
            self._loop.call_soon(self._on_readable)

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        """Start the engine, the broker, plugins and the HTTP API. Returns the client
        listener's (host, port)."""
        self._loop = asyncio.get_running_loop()
        soft, hard = raise_fd_limit()
        log.info("open files limit raised to %d (hard limit %d)", soft, hard)
        for p in self.plugins:
            r = p.setup(self)
            if inspect.isawaitable(r):
                await r
        await self.storage.start()
        await self.broker.start(self, self.node_id)
        for cmd in await self.broker.moderation():
            self.apply(cmd)
        for p in self.plugins:
            started = getattr(p, "started", None)
            if started is not None:
                r = started()
                if inspect.isawaitable(r):
                    await r
        settings = self.config.engine_settings()
        if self.media.enabled:
            settings.update(await self.media.start())
        static: dict[str, tuple[str, bytes]] = {}
        if self.config.server.demo:
            from ..demo import static_files

            static = static_files(self.config.server.ws_path)
        # A certificate that cannot be served fails here with the key to blame.
        self.config.tls_certificate()
        eng = Engine(static_files=static, **settings)
        self._set_room_options(eng)
        self._engine = eng
        addr = eng.start()
        self._loop.add_reader(eng.fd, self._on_readable)
        self.tasks.start(self.rooms.presence_loop())
        if self.storage.enabled:
            self.tasks.start(self.storage.retention_loop())
        if self.outbox.enabled:
            self._outbox_task = self.tasks.start(self.outbox.run())
        tls_addr = eng.tls_address
        if tls_addr is not None:
            self.certs = CertWatcher(eng, self.config.server.tls)
            self.certs.warn_expiry()
            self.tasks.start(self.certs.run())
            log.info("gateway %s listening on wss://%s:%d%s", self.node_id, tls_addr[0], tls_addr[1], self.config.server.ws_path)
        if self.config.api.enabled:
            from ..api import start_api

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

    @property
    def ready(self) -> bool:
        """True while serving and the broker is usable: ``/readyz``."""
        eng = self._engine
        return eng is not None and eng.running and not eng.draining and self.broker.ready

    async def stop(self, code: int = CloseCode.RESTART, reason: str = "restarting") -> int:
        """Graceful stop: readiness goes false, clients get a ``drain`` frame and a close
        with ``code``; waits up to ``drain.timeout``. Returns connections dropped."""
        eng = self._engine
        if eng is None:
            return 0
        eng.drain(code, reason, frames.drain(self.config.drain.retry_ms))
        left = await asyncio.to_thread(eng.wait_closed, self.config.drain.timeout)
        # Let close events reach the hooks before the engine goes.
        self._on_readable()
        dropped = eng.stop(code, reason, 0.5)
        if self._loop is not None:
            self._loop.remove_reader(eng.fd)
        self.sessions.expiry.stop()
        # on_leave/on_disconnect of the drained clients: with a debouncing broker they are
        # due leave_grace from now (a client that reconnected elsewhere meanwhile is no
        # leave); then each hook may take hooks.timeout.
        await self.tasks.settle(self.member_events.grace + self.config.hooks.timeout)
        self.tasks.cancel_all()
        if self._api_runner is not None:
            await self._api_runner.cleanup()
            self._api_runner = None
        await self.broker.close()
        await self.conversations.close()
        await self.media.close()
        if self._outbox_task is not None:  # cancelled above: let it give the lease up
            await asyncio.wait((self._outbox_task,), timeout=5.0)
            self._outbox_task = None
        await self.storage.close()
        for p in self.plugins:
            r = p.teardown()
            if inspect.isawaitable(r):
                await r
        self._engine = None
        self.certs = None
        log.info("gateway stopped (%d connections dropped after the drain deadline)", left + dropped)
        return left

    def reload_tls(self) -> bool:
        """Reload the TLS certificate and key from their files for new connections (as on
        SIGHUP). False, with the reason logged, if the files cannot be served: the
        current certificate stays. False without TLS."""
        if self.certs is None:
            log.info("SIGHUP: no TLS listener, nothing to reload")
            return False
        return self.certs.reload("SIGHUP")

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
        # SIGHUP: reload the TLS certificate (certbot deploy hooks, `systemctl reload`).
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self.reload_tls)
        await stop.wait()
        log.info("signal received: draining")
        await self.stop()

    def run(self) -> None:
        """Run on uvloop until a signal stops it."""
        import uvloop

        uvloop.run(self.serve())

