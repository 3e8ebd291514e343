"""Room routing, permissions, rate limits and moderation.

* :class:`Router` maps a room name (``prefix:rest``) to the :class:`RouteConfig` whose
  pattern matches it, extracting ``{placeholder}`` parameters.
* :class:`Policy` decides whether an :class:`~gateway.auth.Identity` may join a room or
  publish into it and returns a :class:`Verdict` carrying the protocol error code
  (see ``docs/protocol.md``) and the message priority.
* :class:`RateLimiter` (token buckets keyed by string, bounded memory) and
  :class:`Moderation` (mutes and bans with wall-clock expiry) back the policy.

Everything here is synchronous, allocation-light and meant for the per-message hot
path. None of it is thread-safe; use it from the event loop thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, NamedTuple

from .auth import ConfigError, Identity

__all__ = [
    "PRIO_HIGH",
    "PRIO_LOW",
    "PRIO_NORMAL",
    "MAX_ROOM_LEN",
    "Moderation",
    "Policy",
    "RateLimiter",
    "Route",
    "RouteConfig",
    "Router",
    "TokenBucket",
    "Verdict",
    "valid_room_name",
]

log = logging.getLogger("gateway.routing")

PRIO_LOW, PRIO_NORMAL, PRIO_HIGH = 0, 1, 2

MAX_ROOM_LEN = 128
_ROOM_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789:_-.@"
_RULES = ("all", "authenticated", "owner", "acl", "none")

# Protocol error codes (docs/protocol.md).
E_FORBIDDEN = 4003
E_NO_ROUTE = 4005
E_TOO_LARGE = 4009
E_MUTED = 4010
E_RATE = 4029

JoinRule = Callable[[Identity, "Route"], bool]
PublishRule = Callable[[Identity, "Route", str], bool]


def valid_room_name(room: str) -> bool:
    """Whether ``room`` is a valid room name.

    At most 128 characters from ``[A-Za-z0-9:_\\-.@]``, at least two ``:``-separated
    segments (``prefix:rest``) and no empty segment.
    """
    if type(room) is not str or not room or len(room) > MAX_ROOM_LEN or room.strip(_ROOM_CHARS):
        return False
    parts = room.split(":")
    return len(parts) >= 2 and "" not in parts


def _default_priorities() -> dict[str, int]:
    return {"chat": PRIO_NORMAL, "like": PRIO_LOW, "enter": PRIO_LOW, "gift": PRIO_HIGH, "admin": PRIO_HIGH}


@dataclass
class RouteConfig:
    """Settings for the rooms matching ``pattern``.

    ``pattern`` is ``*`` (catch-all) or ``:``-separated segments, each a literal or a
    ``{name}`` placeholder matching exactly one non-empty segment (``live:{room_id}``).

    Join rules (``join``): ``"all"`` anyone, guests included; ``"authenticated"``
    non-guests, plus guests when ``guests_read`` is true; ``"owner"`` the ``{user_id}``
    parameter must equal the user (never guests); ``"acl"`` the token's rooms claim must
    list the room (a token *without* the claim is refused; never guests); ``"none"``
    nobody. Publish rules (``publish``) use the same words plus ``"role:<name>"``
    (``meta["role"]`` equals ``<name>`` or is a list containing it); guests never
    publish, whatever the rule.

    Rates are messages per second with a token-bucket ``burst``; ``0`` = unlimited.
    ``user_rate`` applies per user across all rooms of this route.
    """

    pattern: str
    join: str = "authenticated"
    publish: str = "authenticated"
    guests_read: bool = True
    priorities: dict[str, int] = field(default_factory=_default_priorities)
    default_priority: int = PRIO_NORMAL
    types: list[str] | None = None
    room_rate: float = 40.0
    room_burst: int = 80
    user_rate: float = 5.0
    user_burst: int = 10
    max_message_bytes: int = 12288
    history_size: int = 50
    history_ttl: float = 300.0
    recoverable_types: list[str] = field(default_factory=lambda: ["chat", "gift", "admin"])
    merge_ms: int = 0
    merge_max: int = 20
    presence_events_max_members: int = 100
    single_session: bool = False

    def check(self, prefix: str) -> None:
        """Validate the settings; raise :class:`ConfigError` naming ``<prefix>.<field>``."""

        def err(name: str, msg: str) -> ConfigError:
            return ConfigError(f"{prefix}.{name}", msg)

        try:
            _, params, _ = _parse_pattern(self.pattern)
        except ValueError as e:
            raise err("pattern", str(e)) from None
        if self.join not in _RULES:
            raise err("join", f"must be one of {', '.join(_RULES)}, got {self.join!r}")
        if self.publish not in _RULES and not (
            isinstance(self.publish, str) and self.publish.startswith("role:") and len(self.publish) > 5
        ):
            raise err("publish", f"must be one of {', '.join(_RULES)} or 'role:<name>', got {self.publish!r}")
        for name in ("join", "publish"):
            if getattr(self, name) == "owner" and "user_id" not in params:
                raise err(name, "'owner' needs a {user_id} placeholder in the pattern")
        if not isinstance(self.priorities, dict):
            raise err("priorities", "must be a mapping of message type to 0, 1 or 2")
        for t, p in self.priorities.items():
            if not isinstance(t, str) or not _is_int(p) or not PRIO_LOW <= p <= PRIO_HIGH:
                raise err("priorities", f"priority of {t!r} must be 0, 1 or 2")
        if not _is_int(self.default_priority) or not PRIO_LOW <= self.default_priority <= PRIO_HIGH:
            raise err("default_priority", "must be 0, 1 or 2")
        if self.types is not None and (
            not isinstance(self.types, (list, tuple)) or not all(isinstance(t, str) and t for t in self.types)
        ):
            raise err("types", "must be null or a list of non-empty strings")
        for rate, burst in (("room_rate", "room_burst"), ("user_rate", "user_burst")):
            r, b = getattr(self, rate), getattr(self, burst)
            if not _is_num(r) or r < 0:
                raise err(rate, "must be a number >= 0 (0 = unlimited)")
            if not _is_int(b) or (r > 0 and b < 1) or b < 0:
                raise err(burst, "must be an integer >= 1")
        if not _is_int(self.max_message_bytes) or self.max_message_bytes <= 0:
            raise err("max_message_bytes", "must be an integer > 0")
        if not _is_int(self.history_size) or self.history_size < 0:
            raise err("history_size", "must be an integer >= 0")
        if not _is_num(self.history_ttl) or self.history_ttl < 0:
            raise err("history_ttl", "must be a number >= 0")
        if not isinstance(self.recoverable_types, (list, tuple)) or not all(
            isinstance(t, str) for t in self.recoverable_types
        ):
            raise err("recoverable_types", "must be a list of strings")
        if not _is_int(self.merge_ms) or self.merge_ms < 0:
            raise err("merge_ms", "must be an integer >= 0")
        if not _is_int(self.merge_max) or self.merge_max < 1:
            raise err("merge_max", "must be an integer >= 1")
        if not _is_int(self.presence_events_max_members) or self.presence_events_max_members < 0:
            raise err("presence_events_max_members", "must be an integer >= 0")
        if not isinstance(self.single_session, bool):
            raise err("single_session", "must be true or false")
        if not isinstance(self.guests_read, bool):
            raise err("guests_read", "must be true or false")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _parse_pattern(pattern: str) -> tuple[tuple[str | None, ...], dict[str, int], bool]:
    """Split a pattern into per-segment literals (``None`` for placeholders), the
    placeholder positions by name, and whether it is the catch-all. Raises ValueError."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("must be a non-empty string")
    if pattern == "*":
        return (), {}, True
    segs: list[str | None] = []
    params: dict[str, int] = {}
    for i, seg in enumerate(pattern.split(":")):
        if seg.startswith("{") and seg.endswith("}"):
            name = seg[1:-1]
            if not name.isidentifier():
                raise ValueError(f"bad placeholder {seg!r} in {pattern!r}")
            if name in params:
                raise ValueError(f"placeholder {seg!r} used twice in {pattern!r}")
            params[name] = i
            segs.append(None)
        elif not seg or seg.strip(_ROOM_CHARS) or ":" in seg:
            raise ValueError(
                f"segment {seg!r} of {pattern!r} must be a literal of [A-Za-z0-9_-.@] or a {{name}} placeholder"
            )
        else:
            segs.append(seg)
    if len(segs) < 2:
        raise ValueError(f"{pattern!r} must have at least two ':'-separated segments (or be '*')")
    if len(pattern) > MAX_ROOM_LEN:
        raise ValueError(f"longer than {MAX_ROOM_LEN} characters")
    return tuple(segs), params, False


class _Compiled:
    """Precomputed matching and policy data of one route (internal)."""

    __slots__ = (
        "cfg",
        "nseg",
        "literals",
        "params",
        "catch_all",
        "join",
        "publish",
        "role",
        "prio",
        "default_prio",
        "ok",
        "types",
        "join_rules",
        "publish_rules",
    )

    def __init__(self, cfg: RouteConfig) -> None:
        segs, params, catch_all = _parse_pattern(cfg.pattern)
        self.cfg = cfg
        self.catch_all = catch_all
        self.nseg = len(segs)
        self.literals = tuple((i, s) for i, s in enumerate(segs) if s is not None)
        self.params = tuple(params.items())
        self.join = cfg.join
        self.publish = "role" if cfg.publish.startswith("role:") else cfg.publish
        self.role = cfg.publish[5:] if self.publish == "role" else ""
        self.prio = dict(cfg.priorities)
        self.default_prio = cfg.default_priority
        self.ok = {p: Verdict(True, 0, "", p) for p in (PRIO_LOW, PRIO_NORMAL, PRIO_HIGH)}
        self.types = frozenset(cfg.types) if cfg.types is not None else None
        self.join_rules: list[JoinRule] = []
        self.publish_rules: list[PublishRule] = []


@dataclass(slots=True)
class Route:
    """A matched route: its config and the placeholder values (``{"room_id": "42"}``).

    Treat it as read-only: the router caches and shares matches.
    """

    cfg: RouteConfig
    params: dict[str, str]
    compiled: _Compiled = field(repr=False, compare=False, default=None)  # type: ignore[assignment]


class Router:
    """Maps room names to routes.

    Routes are indexed by their literal first segment (one dict lookup per match); within
    a bucket and among patterns starting with a placeholder the first declared match
    wins; literal-first patterns are tried before placeholder-first ones, and the
    catch-all ``*`` comes last. Results are cached per room name (bounded).
    """

    _CACHE_MAX = 65536

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        """Validate the routes (:class:`ConfigError` naming ``routes[i].<field>``) and index them."""
        self._by_first: dict[str, list[_Compiled]] = {}
        self._var_first: list[_Compiled] = []
        self._catch_all: _Compiled | None = None
        self._by_pattern: dict[str, _Compiled] = {}
        for i, cfg in enumerate(routes):
            cfg.check(f"routes[{i}]")
            if cfg.pattern in self._by_pattern:
                raise ConfigError(f"routes[{i}].pattern", f"duplicate pattern {cfg.pattern!r}")
            c = _Compiled(cfg)
            self._by_pattern[cfg.pattern] = c
            if c.catch_all:
                self._catch_all = c
            elif c.literals and c.literals[0][0] == 0:
                self._by_first.setdefault(c.literals[0][1], []).append(c)
            else:
                self._var_first.append(c)
        self._cache: dict[str, Route | None] = {}

    @property
    def routes(self) -> list[RouteConfig]:
        """The configured routes, in declaration order."""
        return [c.cfg for c in self._by_pattern.values()]

    def match(self, room: str) -> Route | None:
        """The route for ``room``, or ``None`` when no route matches or the name is invalid."""
        if type(room) is not str:
            return None
        cache = self._cache
        r: Route | None = cache.get(room, _MISS)
        if r is not _MISS:
            return r
        r = self._match(room) if valid_room_name(room) else None
        if len(cache) >= self._CACHE_MAX:
            cache.clear()
        cache[room] = r
        return r

    def _match(self, room: str) -> Route | None:
        parts = room.split(":")
        n = len(parts)
        bucket = self._by_first.get(parts[0])
        for group in (bucket, self._var_first):
            if not group:
                continue
            for c in group:
                if c.nseg != n:
                    continue
                for i, lit in c.literals:
                    if parts[i] != lit:
                        break
                else:
                    return Route(c.cfg, {name: parts[i] for name, i in c.params}, c)
        ca = self._catch_all
        return Route(ca.cfg, {}, ca) if ca is not None else None

    def priority(self, route: Route, msg_type: str) -> int:
        """The priority (0 low, 1 normal, 2 high) of ``msg_type`` messages on ``route``."""
        c = route.compiled
        return c.prio.get(msg_type, c.default_prio)

    def add_rule(
        self,
        pattern: str,
        *,
        join: JoinRule | None = None,
        publish: PublishRule | None = None,
    ) -> None:
        """Attach Python rules to the route declared with ``pattern``.

        ``join(ident, route) -> bool`` and ``publish(ident, route, msg_type) -> bool``
        run after the declarative rules allowed the action; all attached rules must
        return true. A rule that raises denies (and is logged). Raises ``KeyError`` if
        no route has this pattern.
        """
        c = self._by_pattern.get(pattern)
        if c is None:
            raise KeyError(f"no route with pattern {pattern!r}")
        if join is not None:
            c.join_rules.append(join)
        if publish is not None:
            c.publish_rules.append(publish)

    @staticmethod
    def default_routes() -> list[RouteConfig]:
        """The built-in routes: ``live:{room_id}`` (public live rooms), ``user:{user_id}``
        (per-user push channel: owner joins, nobody publishes), ``cs:{session_id}``
        (customer service: join and publish by the token's rooms claim, 20 msgs/s per
        room) and the catch-all ``*`` (authenticated users)."""
        return [
            RouteConfig("live:{room_id}"),
            RouteConfig("user:{user_id}", join="owner", publish="none"),
            RouteConfig("cs:{session_id}", join="acl", publish="acl", room_rate=20.0, room_burst=40),
            RouteConfig("*", join="authenticated"),
        ]


_MISS: Any = object()


# Tolerance for float drift when refills add up to exactly one token.
_EPS = 1e-9
_ONE = 1.0 - _EPS


class TokenBucket:
    """A single token bucket: ``rate`` tokens per second, at most ``burst`` stored.

    Starts full. Use :class:`RateLimiter` for many keys.
    """

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        """Create a full bucket at time ``now`` (any monotonic clock, seconds)."""
        self.rate = rate
        self.burst = max(1, burst)
        self.tokens = float(self.burst)
        self.last = now

    def allow(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if available; ``rate <= 0`` always allows."""
        if self.rate <= 0:
            return True
        t = self.tokens + (now - self.last) * self.rate
        if t > self.burst:
            t = self.burst
        self.last = now
        if t >= cost - _EPS:
            self.tokens = t - cost
            return True
        self.tokens = t
        return False


class RateLimiter:
    """Token buckets keyed by string with bounded memory.

    Each key's bucket remembers its rate and burst. When a new key arrives and the
    table is full, or at most every ``sweep_interval`` seconds, buckets that have
    refilled completely are dropped (a full bucket is equivalent to no bucket, so this
    is lossless); if the table is still full, the oldest keys are dropped.
    """

    __slots__ = ("max_keys", "sweep_interval", "_b", "_last_sweep")

    def __init__(self, max_keys: int = 100_000, sweep_interval: float = 60.0) -> None:
        """``max_keys`` bounds the number of buckets kept."""
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.max_keys = max_keys
        self.sweep_interval = sweep_interval
        # key -> [tokens, last, rate, burst]
        self._b: dict[str, list[float]] = {}
        self._last_sweep: float | None = None

    def __len__(self) -> int:
        return len(self._b)

    def allow(self, key: str, rate: float, burst: int, now: float) -> bool:
        """Take one token from ``key``'s bucket; ``rate <= 0`` always allows.

        ``now`` is a monotonic time in seconds; ``burst`` < 1 is treated as 1.
        """
        if rate <= 0:
            return True
        b = self._b.get(key)
        if b is None:
            if burst < 1:
                burst = 1
            self._insert(key, [burst - 1.0, now, rate, burst], now)
            return True
        t = b[0] + (now - b[1]) * rate
        if t > burst:
            t = burst
        b[1] = now
        b[2] = rate
        b[3] = burst
        if t >= _ONE:
            b[0] = t - 1.0
            return True
        b[0] = t
        return False

    def _insert(self, key: str, bucket: list[float], now: float) -> None:
        b = self._b
        if self._last_sweep is None:
            self._last_sweep = now
        if len(b) >= self.max_keys or now - self._last_sweep >= self.sweep_interval:
            self.sweep(now)
            if len(b) >= self.max_keys:
                drop = max(1, self.max_keys // 10)
                for k in list(islice(b, drop)):
                    del b[k]
        b[key] = bucket

    def sweep(self, now: float) -> int:
        """Drop buckets that are full again at ``now``; return how many were dropped."""
        self._last_sweep = now
        b = self._b
        idle = [k for k, (tok, last, rate, burst) in b.items() if tok + (now - last) * rate >= burst]
        for k in idle:
            del b[k]
        return len(idle)


class Moderation:
    """Mutes and bans, per room or everywhere (room ``"*"``).

    ``until`` values are wall-clock Unix timestamps (``time.time()``; they travel over
    the HTTP API and Redis), ``None`` = until lifted. Expired entries are ignored and
    pruned when seen. A muted user may still join and read; a banned user may do neither.
    """

    __slots__ = ("_mutes", "_room_mutes", "_bans")

    def __init__(self) -> None:
        """Start with no mutes and no bans."""
        self._mutes: dict[str, dict[str, float | None]] = {}
        self._room_mutes: dict[str, tuple[float | None, frozenset[str]]] = {}
        self._bans: dict[str, dict[str, float | None]] = {}

    def mute_user(self, room: str, user: str, until: float | None = None) -> None:
        """Mute ``user`` in ``room`` (``"*"`` = everywhere) until ``until``."""
        self._mutes.setdefault(room, {})[user] = until

    def unmute_user(self, room: str, user: str) -> None:
        """Lift a user mute set with the same ``room`` (no-op if none)."""
        _discard(self._mutes, room, user)

    def mute_room(self, room: str, until: float | None = None, whitelist: Iterable[str] = ()) -> None:
        """Mute everybody in ``room`` (``"*"`` = everywhere) except the ``whitelist`` users."""
        self._room_mutes[room] = (until, frozenset(whitelist))

    def unmute_room(self, room: str) -> None:
        """Lift a room mute (no-op if none)."""
        self._room_mutes.pop(room, None)

    def ban(self, room: str, user: str, until: float | None = None) -> None:
        """Ban ``user`` from ``room`` (``"*"`` = everywhere) until ``until``."""
        self._bans.setdefault(room, {})[user] = until

    def unban(self, room: str, user: str) -> None:
        """Lift a ban set with the same ``room`` (no-op if none)."""
        _discard(self._bans, room, user)

    def is_muted(self, room: str, user: str, now: float) -> bool:
        """Whether ``user`` may not publish in ``room`` at wall-clock time ``now``
        (user mute in the room or everywhere, or a room mute without whitelisting)."""
        mutes = self._mutes
        if mutes and (_active(mutes, room, user, now) or _active(mutes, "*", user, now)):
            return True
        rm = self._room_mutes
        if rm:
            for r in (room, "*"):
                e = rm.get(r)
                if e is not None:
                    until, wl = e
                    if until is not None and until <= now:
                        del rm[r]
                    elif user not in wl:
                        return True
        return False

    def is_banned(self, room: str, user: str, now: float) -> bool:
        """Whether ``user`` is banned from ``room`` (or everywhere) at wall-clock time ``now``."""
        bans = self._bans
        return bool(bans) and (_active(bans, room, user, now) or _active(bans, "*", user, now))

    def snapshot(self, now: float | None = None) -> dict[str, list[dict[str, Any]]]:
        """The active entries as JSON-ready lists (expired entries are pruned first)::

        {"mutes": [{"room", "user", "until"}], "bans": [{"room", "user", "until"}],
         "room_mutes": [{"room", "until", "whitelist": [...]}]}
        """
        if now is None:
            now = time.time()
        out: dict[str, list[dict[str, Any]]] = {}
        for name, table in (("mutes", self._mutes), ("bans", self._bans)):
            rows: list[dict[str, Any]] = []
            for room in list(table):
                users = table[room]
                for user, until in list(users.items()):
                    if until is not None and until <= now:
                        del users[user]
                    else:
                        rows.append({"room": room, "user": user, "until": until})
                if not users:
                    del table[room]
            out[name] = rows
        room_rows: list[dict[str, Any]] = []
        for room, (until, wl) in list(self._room_mutes.items()):
            if until is not None and until <= now:
                del self._room_mutes[room]
            else:
                room_rows.append({"room": room, "until": until, "whitelist": sorted(wl)})
        out["room_mutes"] = room_rows
        return out


def _active(table: dict[str, dict[str, float | None]], room: str, user: str, now: float) -> bool:
    users = table.get(room)
    if users is None or user not in users:
        return False
    until = users[user]
    if until is None or until > now:
        return True
    del users[user]
    if not users:
        del table[room]
    return False


def _discard(table: dict[str, dict[str, float | None]], room: str, user: str) -> None:
    users = table.get(room)
    if users is not None:
        users.pop(user, None)
        if not users:
            del table[room]


class Verdict(NamedTuple):
    """The outcome of a policy check: ``ok``, the protocol error ``code`` (0 when ok),
    a client-safe ``message`` and the message ``priority`` (publish only)."""

    ok: bool
    code: int
    message: str
    priority: int = PRIO_NORMAL


_JOIN_OK = Verdict(True, 0, "", PRIO_NORMAL)


class Policy:
    """Join and publish decisions for one node.

    ``clock`` (monotonic seconds) drives rate limits; ``wall_clock`` (Unix seconds)
    is compared with moderation ``until`` values. Both are injectable for tests.
    """

    def __init__(
        self,
        router: Router,
        limiter: RateLimiter | None = None,
        moderation: Moderation | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """Create a policy; a fresh :class:`RateLimiter` and :class:`Moderation` are
        made when not given."""
        self.router = router
        self.limiter = limiter if limiter is not None else RateLimiter()
        self.moderation = moderation if moderation is not None else Moderation()
        self.clock = clock
        self.wall_clock = wall_clock

    def _no_route(self, room: str) -> Verdict:
        if not valid_room_name(room):
            return Verdict(False, E_NO_ROUTE, "invalid room name")
        return Verdict(False, E_NO_ROUTE, f"no route for room {room}")

    def check_join(self, ident: Identity, room: str) -> tuple[Verdict, Route | None]:
        """May ``ident`` join ``room``? Codes: 4005 invalid name or no route, 4010 banned,
        4003 forbidden by the route's join rule or a Python rule."""
        route = self.router.match(room)
        if route is None:
            return self._no_route(room), None
        if self.moderation.is_banned(room, ident.user, self.wall_clock()):
            return Verdict(False, E_MUTED, f"banned from {room}"), route
        c = route.compiled
        rule = c.join
        if rule == "authenticated":
            ok = not ident.guest or c.cfg.guests_read
        elif rule == "all":
            ok = True
        elif rule == "owner":
            ok = not ident.guest and route.params.get("user_id") == ident.user
        elif rule == "acl":
            ok = not ident.guest and ident.rooms is not None and ident.may_join(room)
        else:
            ok = False
        if ok and c.join_rules:
            ok = _run_rules(c.join_rules, (ident, route), room)
        if not ok:
            return Verdict(False, E_FORBIDDEN, f"not allowed to join {room}"), route
        return _JOIN_OK, route

    def check_publish(self, ident: Identity, room: str, msg_type: str, size: int) -> tuple[Verdict, Route | None]:
        """May ``ident`` publish a ``msg_type`` message of ``size`` bytes into ``room``?

        Checked in order: route (4005), guest / publish rule / Python rules (4003),
        message type allowed (4003), size (4009), ban then mute (4010), per-user then
        per-room rate (4029). On success the verdict carries the route's priority for
        ``msg_type``. Rate tokens are only taken when everything before passed.
        """
        route = self.router.match(room)
        if route is None:
            return self._no_route(room), None
        c = route.compiled
        if ident.guest:
            return Verdict(False, E_FORBIDDEN, "guests may not publish"), route
        rule = c.publish
        if rule == "authenticated" or rule == "all":
            ok = True
        elif rule == "owner":
            ok = route.params.get("user_id") == ident.user
        elif rule == "acl":
            ok = ident.rooms is not None and ident.may_join(room)
        elif rule == "role":
            role = ident.meta.get("role")
            ok = role == c.role or (isinstance(role, (list, tuple)) and c.role in role)
        else:
            ok = False
        if ok and c.publish_rules:
            ok = _run_rules(c.publish_rules, (ident, route, msg_type), room)
        if not ok:
            return Verdict(False, E_FORBIDDEN, f"not allowed to publish in {room}"), route
        if c.types is not None and msg_type not in c.types:
            return Verdict(False, E_FORBIDDEN, f"message type {msg_type!r} not allowed in {room}"), route
        cfg = c.cfg
        if size > cfg.max_message_bytes:
            return Verdict(False, E_TOO_LARGE, f"message too large: {size} > {cfg.max_message_bytes} bytes"), route
        mod = self.moderation
        if mod._bans or mod._mutes or mod._room_mutes:
            now_w = self.wall_clock()
            if mod.is_banned(room, ident.user, now_w):
                return Verdict(False, E_MUTED, f"banned from {room}"), route
            if mod.is_muted(room, ident.user, now_w):
                return Verdict(False, E_MUTED, f"muted in {room}"), route
        if cfg.user_rate > 0 or cfg.room_rate > 0:
            now = self.clock()
            lim = self.limiter
            if cfg.user_rate > 0 and not lim.allow(
                f"u\x00{cfg.pattern}\x00{ident.user}", cfg.user_rate, cfg.user_burst, now
            ):
                return Verdict(False, E_RATE, f"rate limited: you may send {cfg.user_rate:g} msgs/s in {room}"), route
            if cfg.room_rate > 0 and not lim.allow(f"r\x00{room}", cfg.room_rate, cfg.room_burst, now):
                return Verdict(False, E_RATE, f"rate limited: room {room} allows {cfg.room_rate:g} msgs/s"), route
        return c.ok[c.prio.get(msg_type, c.default_prio)], route


def _run_rules(rules: list[Any], args: tuple[Any, ...], room: str) -> bool:
    for rule in rules:
        try:
            if not rule(*args):
                return False
        except Exception:
            log.exception("routing rule %r failed for room %s; denying", rule, room)
            return False
    return True
