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
from gateway.auth import mint_token
from gateway.client import GatewayClient, GatewayError
from support.gateway import GatewayProcess

SECRET = "example-tests-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
VIP = {"team:gold": ["alice"], "team:vip-*": ["dora"]}


@pytest.fixture
def gw(example_gateway: Any) -> GatewayProcess:
    return example_gateway(
        "examples.jwt_rooms:make_app", "auth.mode=jwt", f"auth.secret={SECRET}",
        env={"JWT_ROOMS_VIP": json.dumps(VIP), "JWT_ROOMS_VIP_ROLES": "admin"},
    )


def token(user: str, rooms: list[str] | None = None, ttl: float | None = 600, **claims: Any) -> str:
    if rooms is not None:
        claims["rooms"] = rooms
    return mint_token(SECRET, user, ttl=ttl, **claims)


async def test_allowed_join_is_acked_and_messages_flow(gw: GatewayProcess, clients: Any) -> None:
    bob = await clients(gw, token=token('bob', ['team:red']))
    alice = await clients(gw, token=token('alice', ['team:*']))
    assert bob.user == "bob" and alice.user == "alice"

    ack = await bob.join("team:red")
    assert ack["op"] == "ack" and ack["room"] == "team:red" and isinstance(ack["seq"], int)
    assert (await alice.join("team:red"))["op"] == "ack"  # glob in the rooms claim

    pub = await bob.publish("team:red", {"text": "hello team"})
    assert pub["op"] == "ack" and pub["seq"] == ack["seq"] + 1
    msg = await alice.recv(5)
    assert msg["room"] == "team:red" and msg["from"] == "bob" and msg["data"] == {"text": "hello team"}
    assert msg["seq"] == pub["seq"]


async def test_room_missing_from_token_is_refused_4003(gw: GatewayProcess, clients: Any) -> None:
    bob = await clients(gw, token=token('bob', ['team:red']))
    with pytest.raises(GatewayError) as err:
        await bob.join("team:blue")
    assert err.value.code == 4003, err.value
    # A token without any rooms claim gets no acl room at all.
    carl = await clients(gw, token=token('carl'))
    with pytest.raises(GatewayError) as err:
        await carl.join("team:red")
    assert err.value.code == 4003
    # The connection stays open and usable after a refusal.
    assert (await bob.join("team:red"))["op"] == "ack"
    # Rooms outside the acl pattern follow their own rules (live: is open to users).
    assert (await carl.join("live:1"))["op"] == "ack"


async def test_vip_rooms_checked_by_on_join_hook(gw: GatewayProcess, clients: Any) -> None:
    everyone = ["team:*"]
    alice = await clients(gw, token=token('alice', everyone))
    bob = await clients(gw, token=token('bob', everyone))
    root = await clients(gw, token=token('root', everyone, role='admin'))
    dora = await clients(gw, token=token('dora', everyone))

    assert (await alice.join("team:gold"))["op"] == "ack"
    with pytest.raises(GatewayError) as err:
        await bob.join("team:gold")
    assert err.value.code == 4003 and "VIP" in err.value.message, err.value
    assert (await root.join("team:gold"))["op"] == "ack"  # admin role bypasses VIP lists
    # Glob VIP lists.
    assert (await dora.join("team:vip-lounge"))["op"] == "ack"
    with pytest.raises(GatewayError) as err:
        await bob.join("team:vip-lounge")
    assert err.value.code == 4003
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
    c = GatewayClient(gw.ws_url(), token=tokens[case] or None)
    with pytest.raises(websockets.InvalidStatus) as exc:
        await c.connect()
    assert exc.value.response.status_code == 401


async def test_token_in_header_or_subprotocol(gw: GatewayProcess, clients: Any) -> None:
    t = token("erin", ["team:red"])
    by_header = await clients(gw, token=t, token_in="header")  # Authorization: Bearer <t>
    assert by_header.user == "erin"
    by_proto = await clients(gw, token=t, token_in="protocol")  # Sec-WebSocket-Protocol: gateway.v1, token.<t>
    assert by_proto.user == "erin"
    assert by_proto.subprotocol == "gateway.v1"  # the token is not echoed
    assert (await by_proto.join("team:red"))["op"] == "ack"


async def test_connection_closed_4001_when_token_expires(gw: GatewayProcess, clients: Any) -> None:
    short = await clients(gw, token=token('fay', ['team:red'], ttl=2))
    long = await clients(gw, token=token('gus', ['team:red'], ttl=600))
    assert (await short.join("team:red"))["op"] == "ack"
    code, reason = await short.wait_closed(6)
    assert code == 4001 and reason == "token expired"
    # Other connections are untouched.
    await asyncio.sleep(0.6)
    assert (await long.join("team:red"))["op"] == "ack"
