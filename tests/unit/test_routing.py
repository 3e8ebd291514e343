"""Unit tests for gateway.routing, gateway.policy, gateway.limits and gateway.moderation
(no sockets).

Run as a script for the check_publish micro-benchmark::

    PYTHONPATH=python python tests/unit/test_routing.py
"""

from __future__ import annotations

import logging

import pytest
from gateway import ConfigError, Identity
from gateway.limits import RateLimiter, TokenBucket
from gateway.moderation import Moderation
from gateway.policy import Policy, Verdict
from gateway.protocol.codes import Priority
from gateway.routing import Route, RouteConfig, Router, valid_room_name

PRIO_LOW, PRIO_NORMAL, PRIO_HIGH = Priority.LOW, Priority.NORMAL, Priority.HIGH


class Clock:
    """A settable clock for rate limits and moderation."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


U1 = Identity("u1", {"role": "user"})
GUEST = Identity("guest:1", {}, None, True)


def policy(routes: list[RouteConfig] | None = None) -> tuple[Policy, Clock, Clock]:
    mono, wall = Clock(), Clock(1_700_000_000.0)
    router = Router(routes if routes is not None else Router.default_routes())
    return Policy(router, RateLimiter(), Moderation(), mono, wall_clock=wall), mono, wall


# --- room names and matching --------------------------------------------------------


@pytest.mark.parametrize("room", ["live:42", "a:b:c", "user:u-1.x@y_z", "x:" + "a" * 126])
def test_valid_room_names(room: str) -> None:
    assert valid_room_name(room)


@pytest.mark.parametrize(
    "room", ["", "live", "live:", ":42", "live::1", "live:4 2", "live:é", "x:" + "a" * 127, "live:42/x", 42, None]
)
def test_invalid_room_names(room: object) -> None:
    assert not valid_room_name(room)  # type: ignore[arg-type]
    assert Router(Router.default_routes()).match(room) is None  # type: ignore[arg-type]


def test_router_matching_and_params() -> None:
    r = Router(Router.default_routes())
    m = r.match("live:42")
    assert m is not None and m.cfg.pattern == "live:{room_id}" and m.params == {"room_id": "42"}
    assert r.match("user:u1").params == {"user_id": "u1"}  # type: ignore[union-attr]
    assert r.match("cs:7").cfg.pattern == "cs:{session_id}"  # type: ignore[union-attr]
    # a longer name under a known prefix: the last placeholder takes the rest (it used to
    # fall through to the public catch-all); an unknown prefix -> catch-all
    assert r.match("live:42:x").cfg.pattern == "live:{room_id}"  # type: ignore[union-attr]
    assert r.match("live:42:x").params == {"room_id": "42:x"}  # type: ignore[union-attr]
    assert r.match("other:1").cfg.pattern == "*"  # type: ignore[union-attr]
    assert r.match("other:1").params == {}  # type: ignore[union-attr]
    assert r.match("live:42") is m  # cached


def test_router_without_catch_all_and_precedence() -> None:
    r = Router(
        [
            RouteConfig("{kind}:special"),
            RouteConfig("live:{room_id}:{part}"),
            RouteConfig("live:vip:{part}"),
            RouteConfig("live:{room_id}"),
        ]
    )
    assert r.match("zzz:1") is None
    assert r.match("live:1").params == {"room_id": "1"}  # type: ignore[union-attr]
    # literal-first routes before placeholder-first; first declared wins within a bucket
    assert r.match("live:vip:a").cfg.pattern == "live:{room_id}:{part}"  # type: ignore[union-attr]
    assert r.match("live:special").cfg.pattern == "live:{room_id}"  # type: ignore[union-attr]
    assert r.match("foo:special").params == {"kind": "foo"}  # type: ignore[union-attr]
    assert [c.pattern for c in r.routes][0] == "{kind}:special"


def test_router_cache_is_bounded() -> None:
    r = Router(Router.default_routes())
    r._CACHE_MAX = 100  # type: ignore[misc]
    for i in range(1000):
        assert r.match(f"live:{i}") is not None
    assert len(r._cache) <= 100


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        (RouteConfig("live"), "r.pattern"),
        (RouteConfig("live:{}"), "r.pattern"),
        (RouteConfig("live:{a}:{a}"), "r.pattern"),
        (RouteConfig("live:x{id}"), "r.pattern"),
        (RouteConfig("live:{id}", join="everyone"), "r.join"),
        (RouteConfig("live:{id}", join="owner"), "r.join"),
        (RouteConfig("live:{id}", publish="role:"), "r.publish"),
        (RouteConfig("live:{id}", publish="nobody"), "r.publish"),
        (RouteConfig("live:{id}", priorities={"chat": 3}), "r.priorities"),
        (RouteConfig("live:{id}", default_priority=5), "r.default_priority"),
        (RouteConfig("live:{id}", types=[""]), "r.types"),
        (RouteConfig("live:{id}", room_rate=-1), "r.room_rate"),
        (RouteConfig("live:{id}", user_burst=0), "r.user_burst"),
        (RouteConfig("live:{id}", max_message_bytes=0), "r.max_message_bytes"),
        (RouteConfig("live:{id}", history_size=-1), "r.history_size"),
        (RouteConfig("live:{id}", merge_max=0), "r.merge_max"),
        (RouteConfig("live:{id}", merge_ms=-5), "r.merge_ms"),
        (RouteConfig("live:{id}", single_session="yes"), "r.single_session"),  # type: ignore[arg-type]
    ],
)
def test_route_config_errors(cfg: RouteConfig, key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        cfg.check("r")
    assert ei.value.key == key


def test_router_config_errors_name_index() -> None:
    with pytest.raises(ConfigError) as ei:
        Router([RouteConfig("live:{id}"), RouteConfig("cs:{id}", join="bogus")])
    assert ei.value.key == "routes[1].join"
    with pytest.raises(ConfigError) as ei:
        Router([RouteConfig("live:{id}"), RouteConfig("live:{id}")])
    assert ei.value.key == "routes[1].pattern"


def test_valid_configs_pass() -> None:
    for cfg in Router.default_routes():
        cfg.check("r")
    RouteConfig("live:{id}", room_rate=0, room_burst=0, publish="role:admin", types=["chat"]).check("r")


# --- priorities ---------------------------------------------------------------------


def test_priorities() -> None:
    r = Router([RouteConfig("live:{id}"), RouteConfig("x:{id}", priorities={"chat": 2}, default_priority=0)])
    live = r.match("live:1")
    assert live is not None
    assert r.priority(live, "chat") == PRIO_NORMAL
    assert r.priority(live, "like") == PRIO_LOW
    assert r.priority(live, "gift") == PRIO_HIGH
    assert r.priority(live, "unknown") == PRIO_NORMAL
    x = r.match("x:1")
    assert r.priority(x, "chat") == 2 and r.priority(x, "gift") == 0  # type: ignore[arg-type]
    p = Policy(r, clock=Clock())
    assert p.check_publish(U1, "live:1", "gift", 10)[0] == Verdict(True, 0, "", PRIO_HIGH)
    assert p.check_publish(U1, "live:1", "like", 10)[0].priority == PRIO_LOW


# --- join rules ---------------------------------------------------------------------


def test_join_rules() -> None:
    p, _, _ = policy(
        [
            RouteConfig("all:{id}", join="all", guests_read=False),
            RouteConfig("auth:{id}", guests_read=False),
            RouteConfig("read:{id}"),  # authenticated + guests_read
            RouteConfig("user:{user_id}", join="owner", publish="none"),
            RouteConfig("cs:{id}", join="acl"),
            RouteConfig("closed:{id}", join="none"),
        ]
    )
    ok = lambda ident, room: p.check_join(ident, room)[0].ok  # noqa: E731
    assert ok(GUEST, "all:1") and ok(U1, "all:1")
    assert ok(U1, "auth:1") and not ok(GUEST, "auth:1")
    assert ok(U1, "read:1") and ok(GUEST, "read:1")
    assert ok(U1, "user:u1") and not ok(U1, "user:u2") and not ok(GUEST, "user:guest")
    acl = Identity("u2", {}, ("cs:7", "cs:8*"))
    assert ok(acl, "cs:7") and ok(acl, "cs:81") and not ok(acl, "cs:9")
    assert not ok(U1, "cs:7")  # no rooms claim -> refused on acl routes
    assert not ok(GUEST, "cs:7")
    assert not ok(U1, "closed:1")
    v, route = p.check_join(U1, "user:u2")
    assert v == Verdict(False, 4003, "not allowed to join user:u2") and route is not None


def test_join_codes() -> None:
    p, _, wall = policy()
    assert p.check_join(U1, "bad room")[0][:2] == (False, 4005)
    assert p.check_join(U1, "bad room") == (Verdict(False, 4005, "invalid room name"), None)
    p2, _, _ = policy([RouteConfig("live:{id}")])
    assert p2.check_join(U1, "x:1")[0] == Verdict(False, 4005, "no route for room x:1")
    p.moderation.ban("live:1", "u1", wall.t + 60)
    assert p.check_join(U1, "live:1")[0].code == 4010
    # ban is checked before the join rule
    p.moderation.ban("user:u2", "u1", None)
    assert p.check_join(U1, "user:u2")[0].code == 4010
    wall.t += 61
    assert p.check_join(U1, "live:1")[0].ok


# --- publish rules ------------------------------------------------------------------


def test_publish_rules() -> None:
    p, _, _ = policy(
        [
            RouteConfig("all:{id}", publish="all"),
            RouteConfig("user:{user_id}", join="owner", publish="owner"),
            RouteConfig("cs:{id}", join="acl", publish="acl"),
            RouteConfig("stage:{id}", publish="role:host"),
            RouteConfig("feed:{id}", publish="none"),
        ]
    )
    ok = lambda ident, room: p.check_publish(ident, room, "chat", 10)[0].ok  # noqa: E731
    assert ok(U1, "all:1") and not ok(GUEST, "all:1")
    assert p.check_publish(GUEST, "all:1", "chat", 10)[0] == Verdict(False, 4003, "guests may not publish")
    assert ok(U1, "user:u1") and not ok(U1, "user:u2")
    assert ok(Identity("a", {}, ("cs:*",)), "cs:1") and not ok(U1, "cs:1")
    assert ok(Identity("h", {"role": "host"}), "stage:1")
    assert ok(Identity("h", {"role": ["mod", "host"]}), "stage:1")
    assert not ok(U1, "stage:1") and not ok(Identity("n"), "stage:1")
    assert not ok(U1, "feed:1")


def test_python_rules() -> None:
    router = Router(Router.default_routes())
    calls: list[tuple[str, ...]] = []

    def join_rule(ident: Identity, route: Route) -> bool:
        calls.append(("join", ident.user, route.params["room_id"]))
        return route.params["room_id"] != "secret"

    def publish_rule(ident: Identity, route: Route, msg_type: str) -> bool:
        calls.append(("publish", ident.user, msg_type))
        return msg_type != "gift" or ident.meta.get("role") == "vip"

    def broken(ident: Identity, route: Route, msg_type: str) -> bool:
        raise RuntimeError("boom")

    router.add_rule("live:{room_id}", join=join_rule, publish=publish_rule)
    p = Policy(router, clock=Clock())
    assert p.check_join(U1, "live:1")[0].ok
    assert p.check_join(U1, "live:secret")[0].code == 4003
    assert p.check_publish(U1, "live:1", "chat", 1)[0].ok
    assert p.check_publish(U1, "live:1", "gift", 1)[0].code == 4003
    assert p.check_publish(Identity("v", {"role": "vip"}), "live:1", "gift", 1)[0].ok
    # Python rules run only after the declarative ones passed
    calls.clear()
    assert p.check_publish(GUEST, "live:1", "chat", 1)[0].code == 4003
    assert p.check_join(U1, "user:u2")[0].code == 4003
    assert calls == []
    # a raising rule denies
    router.add_rule("*", publish=broken)
    logging.getLogger("gateway.routing").disabled = True
    try:
        assert p.check_publish(U1, "other:1", "chat", 1)[0].code == 4003
    finally:
        logging.getLogger("gateway.routing").disabled = False
    with pytest.raises(KeyError):
        router.add_rule("nope:{x}", join=join_rule)


# --- check_publish order and codes -------------------------------------------------


def test_publish_check_order() -> None:
    p, mono, wall = policy(
        [
            RouteConfig(
                "live:{id}",
                types=["chat", "like"],
                max_message_bytes=100,
                user_rate=1,
                user_burst=1,
                room_rate=2,
                room_burst=2,
            )
        ]
    )
    mod = p.moderation
    mod.ban("live:1", "u1", None)
    mod.mute_user("live:1", "u1", None)
    # route first
    assert p.check_publish(U1, "nope:1", "gift", 10**6)[0].code == 4005
    assert p.check_publish(U1, "bad name", "gift", 10**6)[0].code == 4005
    # guest before type/size
    assert p.check_publish(GUEST, "live:1", "gift", 10**6)[0].code == 4003
    # type before size
    v = p.check_publish(U1, "live:1", "gift", 10**6)[0]
    assert v.code == 4003 and "gift" in v.message
    # size before moderation
    assert p.check_publish(U1, "live:1", "chat", 101)[0] == Verdict(False, 4009, "message too large: 101 > 100 bytes")
    # ban, then mute
    assert p.check_publish(U1, "live:1", "chat", 100)[0] == Verdict(False, 4010, "banned from live:1")
    mod.unban("live:1", "u1")
    assert p.check_publish(U1, "live:1", "chat", 100)[0] == Verdict(False, 4010, "muted in live:1")
    mod.unmute_user("live:1", "u1")
    # user rate, then room rate
    assert p.check_publish(U1, "live:1", "chat", 100)[0].ok
    v = p.check_publish(U1, "live:1", "chat", 100)[0]
    assert v.code == 4029 and v.message == "rate limited: you may send 1 msgs/s in live:1"
    u2 = Identity("u2")
    assert p.check_publish(u2, "live:1", "chat", 1)[0].ok
    v = p.check_publish(Identity("u3"), "live:1", "chat", 1)[0]
    assert v == Verdict(False, 4029, "rate limited: room live:1 allows 2 msgs/s")
    # other rooms have their own room bucket; user bucket is per route
    assert p.check_publish(Identity("u4"), "live:2", "chat", 1)[0].ok
    assert p.check_publish(u2, "live:2", "chat", 1)[0].code == 4029
    mono.t += 1.0
    assert p.check_publish(U1, "live:1", "chat", 1)[0].ok


def test_rejected_messages_do_not_consume_rate() -> None:
    p, _, _ = policy([RouteConfig("live:{id}", user_rate=1, user_burst=1, max_message_bytes=10)])
    for _ in range(5):
        assert p.check_publish(U1, "live:1", "chat", 11)[0].code == 4009
    assert p.check_publish(U1, "live:1", "chat", 1)[0].ok


def test_unlimited_rates() -> None:
    p, _, _ = policy([RouteConfig("live:{id}", user_rate=0, room_rate=0)])
    for _ in range(1000):
        assert p.check_publish(U1, "live:1", "chat", 1)[0].ok
    assert len(p.limiter) == 0


# --- rate limiter -------------------------------------------------------------------


def test_token_bucket_rate_and_burst() -> None:
    lim = RateLimiter()
    t = 100.0
    assert [lim.allow("k", 2.0, 3, t) for _ in range(4)] == [True, True, True, False]
    assert not lim.allow("k", 2.0, 3, t + 0.25)  # half a token
    assert lim.allow("k", 2.0, 3, t + 0.5)  # one token after 0.5 s
    assert not lim.allow("k", 2.0, 3, t + 0.5)
    # refills to burst at most
    assert [lim.allow("k", 2.0, 3, t + 100) for _ in range(4)] == [True, True, True, False]
    # keys are independent; rate <= 0 always allows
    assert lim.allow("other", 2.0, 3, t)
    assert all(lim.allow("free", 0, 0, t) for _ in range(100))
    # sustained rate: 10 msgs/s over 10 s with burst 1
    lim2 = RateLimiter()
    allowed = sum(lim2.allow("s", 10.0, 1, 200.0 + i * 0.01) for i in range(1000))
    assert 100 <= allowed <= 101


def test_single_token_bucket() -> None:
    b = TokenBucket(1.0, 2, now=0.0)
    assert b.allow(0.0) and b.allow(0.0) and not b.allow(0.0)
    assert b.allow(1.0) and not b.allow(1.5)
    assert TokenBucket(0, 0, 0.0).allow(0.0)


def test_rate_limiter_bounded_keys() -> None:
    lim = RateLimiter(max_keys=1000)
    t = 0.0
    for i in range(10_000):
        lim.allow(f"k{i}", 1.0, 5, t)  # never refilled: nothing idle to sweep
        assert len(lim) <= 1000
    # idle full buckets are swept first (lossless), before busy ones are dropped
    lim = RateLimiter(max_keys=100)
    for i in range(99):
        lim.allow(f"idle{i}", 1.0, 1, 0.0)
    for _ in range(5):
        lim.allow("busy", 0.001, 5, 10.0)
    lim.allow("new", 1.0, 1, 10.0)  # 100th key: fine
    lim.allow("new2", 1.0, 1, 10.0)  # full -> sweep the refilled idle buckets
    assert len(lim) == 3
    assert not lim.allow("busy", 0.001, 5, 10.0)  # busy bucket kept its state


def test_rate_limiter_periodic_sweep() -> None:
    lim = RateLimiter(max_keys=1000, sweep_interval=60)
    for i in range(50):
        lim.allow(f"k{i}", 1.0, 1, 0.0)
    assert len(lim) == 50
    lim.allow("late", 1.0, 1, 61.0)
    assert len(lim) == 1
    assert lim.sweep(1000.0) == 1


# --- moderation ---------------------------------------------------------------------


def test_mute_expiry_and_pruning() -> None:
    m = Moderation()
    m.mute_user("live:1", "u1", 100.0)
    assert m.is_muted("live:1", "u1", 99.0)
    assert not m.is_muted("live:2", "u1", 99.0)
    assert not m.is_muted("live:1", "u2", 99.0)
    assert not m.is_muted("live:1", "u1", 100.0)
    assert m.snapshot(0.0)["mutes"] == []  # pruned
    m.mute_user("live:1", "u1", None)
    assert m.is_muted("live:1", "u1", 1e12)
    m.unmute_user("live:1", "u1")
    assert not m.is_muted("live:1", "u1", 0)
    m.unmute_user("live:1", "nobody")


def test_room_mute_whitelist_and_global_mute() -> None:
    m = Moderation()
    m.mute_room("live:1", 500.0, whitelist=["host", "mod"])
    assert m.is_muted("live:1", "u1", 10) and not m.is_muted("live:1", "host", 10)
    assert not m.is_muted("live:2", "u1", 10)
    assert not m.is_muted("live:1", "u1", 500)
    m.mute_room("live:1", None)
    m.unmute_room("live:1")
    assert not m.is_muted("live:1", "u1", 10)
    m.mute_user("*", "spammer", None)
    assert m.is_muted("any:room", "spammer", 10)
    m.mute_room("*", None, ["admin"])
    assert m.is_muted("x:1", "u1", 10) and not m.is_muted("x:1", "admin", 10)


def test_bans_and_global_ban() -> None:
    m = Moderation()
    m.ban("live:1", "u1", 100.0)
    assert m.is_banned("live:1", "u1", 50) and not m.is_banned("live:2", "u1", 50)
    assert not m.is_banned("live:1", "u1", 150)
    m.ban("*", "troll", None)
    assert m.is_banned("live:9", "troll", 1e12) and m.is_banned("cs:1", "troll", 0)
    m.unban("*", "troll")
    assert not m.is_banned("live:9", "troll", 0)
    assert not m.is_muted("live:1", "troll", 0)


def test_moderation_snapshot() -> None:
    m = Moderation()
    m.mute_user("live:1", "a", 200.0)
    m.mute_user("live:1", "old", 50.0)
    m.ban("*", "b", None)
    m.mute_room("live:2", 300.0, ["z", "y"])
    m.mute_room("live:3", 10.0)
    snap = m.snapshot(100.0)
    assert snap == {
        "mutes": [{"room": "live:1", "user": "a", "until": 200.0}],
        "bans": [{"room": "*", "user": "b", "until": None}],
        "room_mutes": [{"room": "live:2", "until": 300.0, "whitelist": ["y", "z"]}],
    }


def test_policy_uses_wall_clock_for_moderation() -> None:
    p, mono, wall = policy()
    p.moderation.mute_user("live:1", "u1", wall.t + 10)
    assert p.check_publish(U1, "live:1", "chat", 1)[0].code == 4010
    mono.t += 1e6  # monotonic time does not lift mutes
    assert p.check_publish(U1, "live:1", "chat", 1)[0].code == 4010
    wall.t += 10
    assert p.check_publish(U1, "live:1", "chat", 1)[0].ok


# --- micro-benchmark (not a test) --------------------------------------------------


def _bench() -> None:
    import time

    def run(label: str, p: Policy, n: int = 500_000) -> None:
        users = [Identity(f"u{i}", {"role": "user"}) for i in range(10_000)]
        rooms = [f"live:{i}" for i in range(1_000)]
        for i in range(2_000):
            p.check_publish(users[i % 10_000], rooms[i % 1_000], "chat", 100)
        ok = 0
        t0 = time.perf_counter()
        for i in range(n):
            ok += p.check_publish(users[i % 10_000], rooms[i % 1_000], "chat", 100)[0].ok
        dt = time.perf_counter() - t0
        print(f"{label:<44} {n / dt:>12,.0f} calls/s  {dt / n * 1e6:5.2f} us/call  ({ok / n:.0%} allowed)")

    step = [0.0]

    def fast_clock() -> float:  # advances 1 s per call so every bucket refills
        step[0] += 1.0
        return step[0]

    run("default routes, limits mostly hit", Policy(Router(Router.default_routes())))
    run("default routes, limits pass (fake clock)", Policy(Router(Router.default_routes()), clock=fast_clock))
    run("no rate limits", Policy(Router([RouteConfig("live:{id}", user_rate=0, room_rate=0)])))
    m = Moderation()
    m.mute_user("live:1", "someone", None)
    m.ban("*", "troll", None)
    p = Policy(Router(Router.default_routes()), moderation=m, clock=fast_clock)
    run("limits pass + active moderation entries", p)


if __name__ == "__main__":
    _bench()


def test_known_prefixes_never_fall_through_to_the_catch_all() -> None:
    r = Router(Router.default_routes())
    route = r.match("user:tenant:42")
    assert route is not None and route.cfg.pattern == "user:{user_id}"
    assert route.params == {"user_id": "tenant:42"}, "the last placeholder takes the rest"
    assert r.match("user:a|b").params == {"user_id": "a|b"}  # type: ignore[union-attr]
    assert r.match("other:thing").cfg.pattern == "*"  # type: ignore[union-attr]
    strict = Router([RouteConfig("live:{room_id}:hd"), RouteConfig("*")])
    assert strict.match("live:1:hd").cfg.pattern == "live:{room_id}:hd"  # type: ignore[union-attr]
    assert strict.match("live:1") is None, "live: has routes of its own: no public catch-all room"
    exact = Router([RouteConfig("live:{room_id}"), RouteConfig("live:{room_id}:{part}")])
    assert exact.match("live:1:x").cfg.pattern == "live:{room_id}:{part}", "an exact-length match beats a tail match"  # type: ignore[union-attr]


def test_owner_routes_work_for_user_ids_with_colons_and_bars() -> None:
    p = Policy(Router(Router.default_routes()))
    for user in ("tenant:42", "corp|7", "a:b|c"):
        ident = Identity(user, {"role": "user"})
        assert p.check_join(ident, f"user:{user}")[0].ok, user
        assert not p.check_join(Identity("other"), f"user:{user}")[0].ok
