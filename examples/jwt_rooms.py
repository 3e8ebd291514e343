"""JWT authentication with a room access list, VIP rooms and token-expiry enforcement.

What it shows:

1. **Built-in JWT auth** (``auth.mode = "jwt"``, HS256 with ``auth.secret``): the gateway
   verifies the token during the HTTP upgrade (``?token=``, ``Authorization: Bearer`` or a
   ``token.<JWT>`` subprotocol entry); a missing, bad or expired token is refused with
   HTTP 401 and no WebSocket is opened.
2. **A room access list from the token**: rooms matching ``JWT_ROOMS_PATTERN`` (default
   ``team:{room_id}``) use the declarative ``acl`` rule for join and publish, so a user may
   only enter the rooms listed in the token's ``rooms`` claim (exact names or globs such
   as ``"team:*"``); anything else gets error ``4003``. :func:`make_app` adds that route
   when the config does not declare it; in production declare it in ``gateway.toml``::

       [[routes]]
       pattern = "team:{room_id}"
       join = "acl"
       publish = "acl"

3. **An ``on_join`` hook with a per-room VIP list**: some rooms additionally admit only
   listed users (or users whose token ``role`` is in ``JWT_ROOMS_VIP_ROLES``), even when
   the token's rooms claim matches (``"team:*"``). Others get ``4003`` "VIP members only".
4. **Token expiry on open connections**: the gateway itself closes a connection with
   ``4001`` when its token's ``exp`` passes. This plugin keeps its own timer-driven check
   as an example of a plugin that closes connections on a schedule, with its own counter;
   its ``JWT_ROOMS_EXPIRY_GRACE`` cannot extend a session past ``exp``, since the
   built-in check closes first. Either way a client must reconnect with a fresh token.

Tokens carry ``sub`` (user id), ``exp``, ``rooms`` and optionally ``role``::

    {"sub": "alice", "exp": 1732266000, "rooms": ["team:red", "team:gold"], "role": "member"}

Run it (``gateway token alice --rooms 'team:*'`` mints a test token with the same secret)::

    JWT_ROOMS_VIP='{"team:gold": ["alice"]}' \\
        gateway run --app examples.jwt_rooms:make_app --set auth.secret=$SECRET

Settings (environment variables; auth itself is the gateway's ``auth.*`` config):

============================  ==================================================================
``JWT_ROOMS_PATTERN``         room pattern guarded by the token's rooms claim (``team:{room_id}``)
``JWT_ROOMS_VIP``             JSON object: room name or glob -> list of admitted user ids
``JWT_ROOMS_VIP_FILE``        the same JSON in a file (merged with ``JWT_ROOMS_VIP``)
``JWT_ROOMS_VIP_ROLES``       token roles admitted to every VIP room, comma separated (``admin``)
``JWT_ROOMS_ENFORCE_EXPIRY``  ``1`` (default): close connections whose token expired (4001)
``JWT_ROOMS_EXPIRY_GRACE``    seconds tolerated after ``exp`` before closing (default 0)
============================  ==================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from gateway import (
    Client,
    Config,
    ConfigError,
    ConnectRequest,
    Gateway,
    Identity,
    Plugin,
    Reject,
)
from gateway.routing import RouteConfig

__all__ = ["RoomAccess", "RoomAccessSettings", "ensure_acl_route", "make_app"]

log = logging.getLogger("gateway.jwt_rooms")

E_FORBIDDEN = 4003
CLOSE_AUTH_EXPIRED = 4001
#: Seconds between checks for expired tokens.
EXPIRY_CHECK_INTERVAL = 0.5


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _parse_vip(text: str, origin: str) -> dict[str, frozenset[str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(origin, f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(origin, 'must be a JSON object {"room": ["user", ...]}')
    out: dict[str, frozenset[str]] = {}
    for room, users in data.items():
        if not isinstance(users, list) or not all(isinstance(u, str) and u for u in users):
            raise ConfigError(origin, f"the value of {room!r} must be a list of user ids")
        out[room] = frozenset(users)
    return out


@dataclass
class RoomAccessSettings:
    """Settings of :class:`RoomAccess`; see the module docstring."""

    pattern: str = "team:{room_id}"
    vip: dict[str, frozenset[str]] = field(default_factory=dict)
    vip_roles: frozenset[str] = frozenset({"admin"})
    enforce_expiry: bool = True
    expiry_grace: float = 0.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RoomAccessSettings:
        """Read ``JWT_ROOMS_*`` variables (raises :class:`ConfigError` naming the variable)."""
        env = os.environ if environ is None else environ
        vip: dict[str, frozenset[str]] = {}
        path = env.get("JWT_ROOMS_VIP_FILE")
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    vip.update(_parse_vip(f.read(), "JWT_ROOMS_VIP_FILE"))
            except OSError as e:
                raise ConfigError("JWT_ROOMS_VIP_FILE", f"cannot read {path!r}: {e.strerror}") from None
        if env.get("JWT_ROOMS_VIP"):
            for room, users in _parse_vip(env["JWT_ROOMS_VIP"], "JWT_ROOMS_VIP").items():
                vip[room] = vip.get(room, frozenset()) | users
        enforce = env.get("JWT_ROOMS_ENFORCE_EXPIRY", "1").strip().lower()
        if enforce not in ("0", "1", "true", "false", "yes", "no"):
            raise ConfigError("JWT_ROOMS_ENFORCE_EXPIRY", f"must be 0 or 1, got {enforce!r}")
        try:
            grace = float(env.get("JWT_ROOMS_EXPIRY_GRACE", "0"))
        except ValueError:
            raise ConfigError("JWT_ROOMS_EXPIRY_GRACE", "must be a number of seconds") from None
        if grace < 0:
            raise ConfigError("JWT_ROOMS_EXPIRY_GRACE", "must be >= 0")
        roles = env.get("JWT_ROOMS_VIP_ROLES")
        return cls(
            pattern=env.get("JWT_ROOMS_PATTERN", cls.pattern),
            vip=vip,
            vip_roles=frozenset(_split(roles)) if roles is not None else frozenset({"admin"}),
            enforce_expiry=enforce in ("1", "true", "yes"),
            expiry_grace=grace,
        )


def ensure_acl_route(config: Config, pattern: str) -> RouteConfig:
    """Return the route declared for ``pattern``, adding an ``acl`` one (join and publish
    by the token's rooms claim) before the catch-all when the config has none."""
    for r in config.routes:
        if r.pattern == pattern:
            if r.join != "acl":
                log.warning("route %s has join=%r: the token's rooms claim is not enforced", pattern, r.join)
            return r
    route = RouteConfig(pattern, join="acl", publish="acl")
    route.check(f"routes[{pattern}]")
    idx = next((i for i, r in enumerate(config.routes) if r.pattern == "*"), len(config.routes))
    config.routes.insert(idx, route)
    return route


def _roles(meta: Mapping[str, Any]) -> set[str]:
    role = meta.get("role")
    if isinstance(role, str):
        return {role}
    if isinstance(role, (list, tuple)):
        return {r for r in role if isinstance(r, str)}
    return set()


class RoomAccess(Plugin):
    """VIP lists checked in ``on_join`` and token expiry enforced on open connections.

    The token's rooms claim itself is enforced by the route's ``acl`` rule before any
    hook runs; this plugin adds what a claim cannot express. The VIP lists can be
    changed at run time with :meth:`set_vip` (e.g. from your admin backend).
    """

    name = "jwt_rooms"

    def __init__(self, settings: RoomAccessSettings | None = None) -> None:
        self.settings = settings or RoomAccessSettings()
        self._vip_exact: dict[str, frozenset[str]] = {}
        self._vip_globs: list[tuple[str, frozenset[str]]] = []
        for room, users in self.settings.vip.items():
            self.set_vip(room, users)
        self._gateway: Gateway | None = None
        # Token expiry: conn -> deadline, plus a heap of (deadline, conn) with lazy deletion.
        self._deadline: dict[int, float] = {}
        self._heap: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None
        self.expired = 0
        self.vip_denied = 0

    # -- VIP rooms ---------------------------------------------------------------------------

    def set_vip(self, room: str, users: Iterable[str] | None) -> None:
        """Make ``room`` (a name or a glob like ``team:vip-*``) VIP-only for ``users``;
        ``None`` removes the restriction."""
        is_glob = any(c in room for c in "*?[")
        self._vip_globs = [(p, u) for p, u in self._vip_globs if p != room]
        self._vip_exact.pop(room, None)
        if users is None:
            return
        if is_glob:
            self._vip_globs.append((room, frozenset(users)))
        else:
            self._vip_exact[room] = frozenset(users)

    def vip_list(self, room: str) -> frozenset[str] | None:
        """The users admitted to ``room`` if it is VIP-only, else ``None``."""
        users = self._vip_exact.get(room)
        if users is not None:
            return users
        for pattern, u in self._vip_globs:
            if fnmatchcase(room, pattern):
                return u
        return None

    def on_join(self, client: Client, room: str) -> None:
        # Sync on purpose: an in-memory lookup costs less than scheduling a coroutine. If
        # the list lived in a database, make this ``async`` and cache the answer.
        vip = self.vip_list(room)
        if vip is None or client.user in vip:
            return
        if self.settings.vip_roles and _roles(client.identity.meta) & self.settings.vip_roles:
            return
        self.vip_denied += 1
        raise Reject(E_FORBIDDEN, f"{room} is for VIP members only")

    # -- token expiry ------------------------------------------------------------------------

    def on_connect(self, req: ConnectRequest, identity: Identity) -> None:
        """Remember when the token expires; returning None keeps the built-in identity."""
        if self.settings.enforce_expiry and identity.expires_at is not None:
            deadline = identity.expires_at + self.settings.expiry_grace
            self._deadline[req.conn] = deadline
            heapq.heappush(self._heap, (deadline, req.conn))

    def on_disconnect(self, client: Client, code: int, reason: str) -> None:
        self._deadline.pop(client.conn, None)
        # Disconnected entries stay in the heap until due; compact when they dominate.
        if len(self._heap) > 1024 and len(self._heap) > 2 * len(self._deadline):
            self._heap = [(d, c) for c, d in self._deadline.items()]
            heapq.heapify(self._heap)

    def close_expired(self, now: float | None = None) -> int:
        """Close (4001) every connection whose token expired; returns how many."""
        gw = self._gateway
        eng = gw.engine if gw is not None else None
        if eng is None:
            return 0
        now = time.time() if now is None else now
        heap, deadlines = self._heap, self._deadline
        closed = 0
        while heap and heap[0][0] <= now:
            deadline, conn = heapq.heappop(heap)
            if deadlines.get(conn) != deadline:
                continue  # gone already
            del deadlines[conn]
            if eng.disconnect(conn, CLOSE_AUTH_EXPIRED, "token expired"):
                closed += 1
        self.expired += closed
        return closed

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_CHECK_INTERVAL)
            try:
                n = self.close_expired()
                if n:
                    log.info("closed %d connection(s) whose token expired", n)
            except Exception:
                log.exception("token expiry check failed")

    # -- lifecycle ---------------------------------------------------------------------------

    async def setup(self, gateway: Gateway) -> None:
        self._gateway = gateway
        if self.settings.enforce_expiry:
            self._task = asyncio.create_task(self._expiry_loop())

    async def teardown(self) -> None:
        t, self._task = self._task, None
        if t is not None:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t


def make_app(config: Config) -> Gateway:
    """``gateway run --app examples.jwt_rooms:make_app --set auth.secret=...``."""
    if config.auth.mode != "jwt":
        raise ConfigError("auth.mode", "examples.jwt_rooms needs auth.mode = 'jwt' (and auth.secret)")
    settings = RoomAccessSettings.from_env()
    ensure_acl_route(config, settings.pattern)
    return Gateway(config, plugins=[RoomAccess(settings)])
