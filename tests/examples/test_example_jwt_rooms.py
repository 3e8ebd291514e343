"""examples/jwt_rooms.py on a real gateway: JWT at the upgrade, the rooms claim as an
access list, the VIP on_join hook and token expiry on open connections."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import jwt
import pytest
import websockets
from examples_support import SECRET, GatewayProcess, WsClient
from gateway.auth import mint_token

VIP = {"team:gold": ["alice"], "team:vip-*": ["dora"]}


@pytest.fixture
def gw(start_gateway: Any) -> GatewayProcess:
    return start_gateway(
        "examples.jwt_rooms:make_app",
        sets=["auth.mode=jwt", f"auth.secret={SECRET}"],
        env={"JWT_ROOMS_VIP": json.dumps(VIP), "JWT_ROOMS_VIP_ROLES": "admin"},
    )


def token(user: str, rooms: list[str] | None = None, ttl: float | None = 600, **claims: Any) -> str:
    if rooms is not None:
        claims["rooms"] = rooms
    return mint_token(SECRET, user, ttl=ttl, **claims)


async def test_allowed_join_is_acked_and_messages_flow(gw: GatewayProcess, clients: Any) -> None:
    bob = await clients(f"{gw.ws_url}?token={token('bob', ['team:red'])}")
    alice = await clients(f"{gw.ws_url}?token={token('alice', ['team:*'])}")
    assert bob.hello["user"] == "bob" and alice.hello["user"] == "alice"

    ack = await bob.join("team:red")
    assert ack["op"] == "ack" and ack["room"] == "team:red" and isinstance(ack["seq"], int)
    assert (await alice.join("team:red"))["op"] == "ack"  # glob in the rooms claim

    pub = await bob.publish("team:red", {"text": "hello team"})
    assert pub["op"] == "ack" and pub["seq"] == ack["seq"] + 1
    msg = await alice.next("msg")
    assert msg["room"] == "team:red" and msg["from"] == "bob" and msg["data"] == {"text": "hello team"}
    assert msg["seq"] == pub["seq"]


async def test_room_missing_from_token_is_refused_4003(gw: GatewayProcess, clients: Any) -> None:
    bob = await clients(f"{gw.ws_url}?token={token('bob', ['team:red'])}")
    err = await bob.join("team:blue")
    assert err["op"] == "error" and err["code"] == 4003, err
    # A token without any rooms claim gets no acl room at all.
    carl = await clients(f"{gw.ws_url}?token={token('carl')}")
    assert (await carl.join("team:red"))["code"] == 4003
    # The connection stays open and usable after a refusal.
    assert (await bob.join("team:red"))["op"] == "ack"
    # Rooms outside the acl pattern follow their own rules (live: is open to users).
    assert (await carl.join("live:1"))["op"] == "ack"


async def test_vip_rooms_checked_by_on_join_hook(gw: GatewayProcess, clients: Any) -> None:
    everyone = ["team:*"]
    alice = await clients(f"{gw.ws_url}?token={token('alice', everyone)}")
    bob = await clients(f"{gw.ws_url}?token={token('bob', everyone)}")
    root = await clients(f"{gw.ws_url}?token={token('root', everyone, role='admin')}")
    dora = await clients(f"{gw.ws_url}?token={token('dora', everyone)}")

    assert (await alice.join("team:gold"))["op"] == "ack"
    err = await bob.join("team:gold")
    assert err["op"] == "error" and err["code"] == 4003 and "VIP" in err["message"], err
    assert (await root.join("team:gold"))["op"] == "ack"  # admin role bypasses VIP lists
    # Glob VIP lists.
    assert (await dora.join("team:vip-lounge"))["op"] == "ack"
    assert (await bob.join("team:vip-lounge"))["code"] == 4003
    # Non-VIP rooms are unaffected, and the rooms claim still applies before the hook.
    assert (await bob.join("team:red"))["op"] == "ack"


@pytest.mark.parametrize(
    "case",
    ["bad_signature", "expired", "malformed", "missing", "not_yet_valid"],
)
async def test_bad_tokens_are_refused_with_401_at_upgrade(gw: GatewayProcess, case: str) -> None:
    now = int(time.time())
    tokens = {
        "bad_signature": jwt.encode({"sub": "eve", "exp": now + 600, "rooms": ["team:*"]}, "x" * 40, algorithm="HS256"),
        "expired": token("eve", ["team:*"], ttl=-30),
        "malformed": "not.a.jwt",
        "missing": "",
        "not_yet_valid": token("eve", ["team:*"], nbf=now + 600),
    }
    url = f"{gw.ws_url}?token={tokens[case]}" if tokens[case] else gw.ws_url
    with pytest.raises(websockets.InvalidStatus) as exc:
        await WsClient.connect(url)
    assert exc.value.response.status_code == 401


async def test_token_in_header_or_subprotocol(gw: GatewayProcess, clients: Any) -> None:
    t = token("erin", ["team:red"])
    by_header = await clients(gw.ws_url, headers={"Authorization": f"Bearer {t}"})
    assert by_header.hello["user"] == "erin"
    by_proto = await clients(gw.ws_url, subprotocols=["gateway.v1", f"token.{t}"])
    assert by_proto.hello["user"] == "erin"
    assert by_proto.ws.subprotocol == "gateway.v1"  # the token is not echoed
    assert (await by_proto.join("team:red"))["op"] == "ack"


async def test_connection_closed_4001_when_token_expires(gw: GatewayProcess, clients: Any) -> None:
    short = await clients(f"{gw.ws_url}?token={token('fay', ['team:red'], ttl=2)}")
    long = await clients(f"{gw.ws_url}?token={token('gus', ['team:red'], ttl=600)}")
    assert (await short.join("team:red"))["op"] == "ack"
    code, reason = await short.closed(timeout=6)
    assert code == 4001 and reason == "token expired"
    # Other connections are untouched.
    await asyncio.sleep(0.6)
    assert (await long.join("team:red"))["op"] == "ack"
