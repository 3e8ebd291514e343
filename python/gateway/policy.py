"""Join and publish decisions: a route's rules, Python rules, moderation and rate limits.

:class:`Policy` decides whether an :class:`~gateway.auth.Identity` may join a room or
publish into it and returns a :class:`Verdict` carrying the protocol error code
(``docs/protocol.md``) and the message priority. Synchronous, for the hot path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from .auth import Identity
from .limits import RateLimiter
from .moderation import Moderation
from .protocol.codes import ErrorCode, Priority
from .routing import Route, Router, valid_room_name

__all__ = ["Policy", "Verdict"]

log = logging.getLogger("gateway.policy")

class Verdict(NamedTuple):
    """The outcome of a policy check: ``ok``, the protocol error ``code`` (0 when ok),
    a client-safe ``message`` and the message ``priority`` (publish only)."""

    ok: bool
    code: int
    message: str
    priority: int = int(Priority.NORMAL)


_JOIN_OK = Verdict(True, 0, "", int(Priority.NORMAL))
#: The verdict of an allowed publish, per priority (no allocation on the hot path).
_OK = {int(p): Verdict(True, 0, "", int(p)) for p in Priority}


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
            return Verdict(False, ErrorCode.NO_ROUTE, "invalid room name")
        return Verdict(False, ErrorCode.NO_ROUTE, f"no route for room {room}")

    def check_join(self, ident: Identity, room: str) -> tuple[Verdict, Route | None]:
        """May ``ident`` join ``room``? Codes: 4005 invalid name or no route, 4010 banned,
        4003 forbidden by the route's join rule or a Python rule."""
        route = self.router.match(room)
        if route is None:
            return self._no_route(room), None
        if self.moderation.is_banned(room, ident.user, self.wall_clock()):
            return Verdict(False, ErrorCode.MUTED, f"banned from {room}"), route
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
            return Verdict(False, ErrorCode.FORBIDDEN, f"not allowed to join {room}"), route
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
            return Verdict(False, ErrorCode.FORBIDDEN, "guests may not publish"), route
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
            return Verdict(False, ErrorCode.FORBIDDEN, f"not allowed to publish in {room}"), route
        if c.types is not None and msg_type not in c.types:
            return Verdict(False, ErrorCode.FORBIDDEN, f"message type {msg_type!r} not allowed in {room}"), route
        cfg = c.cfg
        if size > cfg.max_message_bytes:
            return Verdict(False, ErrorCode.TOO_LARGE, f"message too large: {size} > {cfg.max_message_bytes} bytes"), route
        mod = self.moderation
        if mod.active:
            now_w = self.wall_clock()
            if mod.is_banned(room, ident.user, now_w):
                return Verdict(False, ErrorCode.MUTED, f"banned from {room}"), route
            if mod.is_muted(room, ident.user, now_w):
                return Verdict(False, ErrorCode.MUTED, f"muted in {room}"), route
        if cfg.user_rate > 0 or cfg.room_rate > 0:
            now = self.clock()
            lim = self.limiter
            if cfg.user_rate > 0 and not lim.allow(
                f"u\x00{cfg.pattern}\x00{ident.user}", cfg.user_rate, cfg.user_burst, now
            ):
                return Verdict(False, ErrorCode.RATE_LIMITED, f"rate limited: you may send {cfg.user_rate:g} msgs/s in {room}"), route
            if cfg.room_rate > 0 and not lim.allow(f"r\x00{room}", cfg.room_rate, cfg.room_burst, now):
                return Verdict(False, ErrorCode.RATE_LIMITED, f"rate limited: room {room} allows {cfg.room_rate:g} msgs/s"), route
        return _OK[c.prio.get(msg_type, c.default_prio)], route


def _run_rules(rules: list[Any], args: tuple[Any, ...], room: str) -> bool:
    for rule in rules:
        try:
            if not rule(*args):
                return False
        except Exception:
            log.exception("routing rule %r failed for room %s; denying", rule, room)
            return False
    return True
