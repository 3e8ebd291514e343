"""Room routing: which :class:`RouteConfig` governs a room name.

:class:`Router` maps a room name (``prefix:rest``) to the route whose pattern matches
it, extracting ``{placeholder}`` parameters. The decisions built on routes live in
:mod:`gateway.policy`; rate limits in :mod:`gateway.limits`; mutes and bans in
:mod:`gateway.moderation`. Synchronous and allocation-light, for the hot path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .auth import Identity
from .errors import ConfigError
from .protocol.codes import Priority

__all__ = [
    "MAX_ROOM_LEN",
    "MEDIA_KINDS",
    "JoinRule",
    "PublishRule",
    "Route",
    "RouteConfig",
    "Router",
    "valid_room_name",
]

log = logging.getLogger("gateway.routing")

# Plain ints (they travel to Redis and the engine as numbers).
PRIO_LOW, PRIO_NORMAL, PRIO_HIGH = int(Priority.LOW), int(Priority.NORMAL), int(Priority.HIGH)

MAX_ROOM_LEN = 128
_ROOM_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789:_-.@|"
_RULES = ("all", "authenticated", "owner", "acl", "none")
#: Route kinds: live rooms and the conversation kinds.
KINDS = ("room", "dm", "group", "notice")
#: Message types that carry an uploaded file (docs/media.md); the type is the file's kind.
MEDIA_KINDS = ("image", "voice", "video", "file")

JoinRule = Callable[[Identity, "Route"], bool]
PublishRule = Callable[[Identity, "Route", str], bool]


def valid_room_name(room: str) -> bool:
    """Whether ``room`` is a valid room name.

    At most 128 characters from ``[A-Za-z0-9:_\\-.@|]``, at least two ``:``-separated
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
    #: What the store keeps of this route's rooms (only recoverable types have a seq to
    #: be kept under): ``"none"``; ``"archive"`` (written behind, in batches; the publish
    #: never waits); ``"durable"`` (the ``durable_types`` are committed before the
    #: publisher's ack, the other recoverable types archived).
    store: str = "none"
    #: With ``store = "durable"``: the types committed before the ack; None = every
    #: recoverable type.
    durable_types: list[str] | None = None
    #: Days stored messages of this route are kept; 0 = forever.
    retention_days: float = 0.0
    #: ``"room"``: members are the connections that joined (live rooms). A conversation
    #: kind (docs/protocol.md, "Conversations"): ``"dm"`` (pattern ``<prefix>:{a}:{b}``,
    #: the two users), ``"group"``, ``"notice"`` (pattern ``<prefix>:{user_id}``): members
    #: kept in the store, every message stored (``store = "durable"``), no ``join``.
    kind: str = "room"
    #: Conversations: most active members (groups); seconds a sender may recall a message
    #: (owners and admins of a group: any time); whether a dm's peer gets read receipts.
    members_max: int = 2000
    recall_seconds: float = 120.0
    read_receipts: bool = True
    #: Groups: who may create one with the ``create`` op (a rule as for ``join``; "none":
    #: the HTTP API only), and who may ``invite``: ``"admin"`` (owners and admins),
    #: ``"member"`` (any member) or ``"none"`` (the API only).
    create: str = "authenticated"
    invite: str = "admin"
    #: Media messages (docs/media.md): the kinds (``image``, ``voice``, ``video``, ``file``)
    #: that may be published here; None = all four on conversations and on routes with
    #: ``store = "durable"`` (customer-service sessions), none on other live rooms. ``media_limits``: bytes per kind, lower than ``[media.limits]`` for this
    #: route (checked while the upload streams in when it names the room, and at publish).
    #: ``media_reuse``: a file may be sent in more than one message (forwarding).
    media: list[str] | None = None
    media_limits: dict[str, int] = field(default_factory=dict)
    media_reuse: bool = False

    @property
    def conversation(self) -> bool:
        """Whether the route's rooms are conversations (members kept in the store)."""
        return self.kind != "room"

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
        if self.store not in ("none", "archive", "durable"):
            raise err("store", f"must be 'none', 'archive' or 'durable', got {self.store!r}")
        if self.durable_types is not None and (
            not isinstance(self.durable_types, (list, tuple)) or not all(isinstance(t, str) and t for t in self.durable_types)
        ):
            raise err("durable_types", "must be null or a list of message types")
        if self.durable_types and self.store != "durable":
            raise err("durable_types", "needs store = 'durable'")
        if not _is_num(self.retention_days) or self.retention_days < 0:
            raise err("retention_days", "must be a number of days >= 0 (0 = forever)")
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
        self._check_conversation(err, params)
        self._check_media(err)

    def media_kinds(self) -> tuple[str, ...]:
        """The media kinds this route takes (``media``, or its default)."""
        if self.media is not None:
            return tuple(self.media)
        return MEDIA_KINDS if self.conversation or self.store == "durable" else ()

    def _check_media(self, err: Callable[[str, str], ConfigError]) -> None:
        if self.media is not None and (not isinstance(self.media, (list, tuple)) or not all(k in MEDIA_KINDS for k in self.media)):
            raise err("media", f"must be null or a list of {', '.join(MEDIA_KINDS)}")
        if not isinstance(self.media_limits, dict) or not all(
            k in MEDIA_KINDS and _is_int(v) and v > 0 for k, v in self.media_limits.items()
        ):
            raise err("media_limits", f"must map {', '.join(MEDIA_KINDS)} to a byte count > 0")
        if not isinstance(self.media_reuse, bool):
            raise err("media_reuse", "must be true or false")
        if self.media_kinds() and self.types is not None and not set(self.media_kinds()) <= set(self.types):
            raise err("media", "the media kinds must also be in types")

    def _check_conversation(self, err: Callable[[str, str], ConfigError], params: dict[str, int]) -> None:
        if self.kind not in KINDS:
            raise err("kind", f"must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not _is_int(self.members_max) or self.members_max < 1:
            raise err("members_max", "must be an integer >= 1")
        if not _is_num(self.recall_seconds) or self.recall_seconds < 0:
            raise err("recall_seconds", "must be a number of seconds >= 0")
        if not isinstance(self.read_receipts, bool):
            raise err("read_receipts", "must be true or false")
        if self.create not in _RULES:
            raise err("create", f"must be one of {', '.join(_RULES)}, got {self.create!r}")
        if self.invite not in ("admin", "member", "none"):
            raise err("invite", f"must be 'admin', 'member' or 'none', got {self.invite!r}")
        if self.kind == "room":
            return
        if self.store != "durable":
            raise err("store", f"a {self.kind} conversation keeps its messages: store must be 'durable'")
        if self.pattern == "*":
            raise err("pattern", "a conversation route needs a literal prefix (e.g. 'group:{group_id}')")
        segs = self.pattern.split(":")
        prefix_then_placeholders = len(segs) == len(params) + 1 and not segs[0].startswith("{")
        if not prefix_then_placeholders or len(params) != {"dm": 2, "notice": 1}.get(self.kind, max(1, len(params))):
            shape = {"dm": "'<prefix>:{a}:{b}'", "notice": "'<prefix>:{user_id}'", "group": "'<prefix>:{id}'"}[self.kind]
            raise err("pattern", f"a {self.kind} route's pattern is {shape}")
        if self.kind == "notice" and "user_id" not in params:
            raise err("pattern", "a notice route's pattern is '<prefix>:{user_id}'")


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
        "catch_all",
        "cfg",
        "default_prio",
        "join",
        "join_rules",
        "literals",
        "nseg",
        "params",
        "prio",
        "publish",
        "publish_rules",
        "role",
        "tail",
        "types",
    )

    def __init__(self, cfg: RouteConfig) -> None:
        segs, params, catch_all = _parse_pattern(cfg.pattern)
        self.cfg = cfg
        self.catch_all = catch_all
        self.nseg = len(segs)
        #: The last segment is a placeholder: it may take the rest of a longer name
        #: (``user:{user_id}`` matches ``user:tenant:42`` with user_id ``tenant:42``).
        self.tail = bool(segs) and segs[-1] is None
        self.literals = tuple((i, s) for i, s in enumerate(segs) if s is not None)
        self.params = tuple(params.items())
        self.join = cfg.join
        self.publish = "role" if cfg.publish.startswith("role:") else cfg.publish
        self.role = cfg.publish[5:] if self.publish == "role" else ""
        self.prio = dict(cfg.priorities)
        self.default_prio = cfg.default_priority
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
    wins; literal-first patterns are tried before placeholder-first ones. A pattern whose
    last segment is a placeholder also matches longer names, the placeholder taking the
    rest (``user:{user_id}`` matches ``user:tenant:42``), after every exact-length match.
    The catch-all ``*`` only takes names whose first segment no route names: a room under
    a known prefix that matches none of its routes has no route (4005). Results are
    cached per room name (bounded).
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
        groups = [g for g in (bucket, self._var_first) if g]
        # Exact segment counts first, then patterns whose last placeholder takes the rest
        # of the name (ids that contain ':').
        for group in groups:
            for c in group:
                if c.nseg == n and self._literals_match(c, parts):
                    return Route(c.cfg, {name: parts[i] for name, i in c.params}, c)
        for group in groups:
            for c in group:
                if c.tail and c.nseg < n and self._literals_match(c, parts):
                    last = c.nseg - 1
                    params = {name: (":".join(parts[last:]) if i == last else parts[i]) for name, i in c.params}
                    return Route(c.cfg, params, c)
        if bucket:
            # A prefix with routes of its own never falls through to the catch-all:
            # ``user:a:b`` must not become a public ``*`` room when ``user:{user_id}`` exists.
            return None
        ca = self._catch_all
        return Route(ca.cfg, {}, ca) if ca is not None else None

    @staticmethod
    def _literals_match(c: _Compiled, parts: list[str]) -> bool:
        return all(parts[i] == lit for i, lit in c.literals)

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
        room), the conversations ``dm:{a}:{b}``, ``group:{group_id}`` and
        ``notice:{user_id}``, and the catch-all ``*`` (authenticated users)."""
        return [
            RouteConfig("live:{room_id}"),
            RouteConfig("user:{user_id}", join="owner", publish="none"),
            RouteConfig("cs:{session_id}", join="acl", publish="acl", room_rate=20.0, room_burst=40, store="durable"),
            RouteConfig("dm:{a}:{b}", kind="dm", join="none", store="durable", members_max=2),
            RouteConfig("group:{group_id}", kind="group", join="none", store="durable"),
            RouteConfig("notice:{user_id}", kind="notice", join="none", publish="none", store="durable", members_max=1),
            RouteConfig("*", join="authenticated"),
        ]


_MISS: Any = object()
