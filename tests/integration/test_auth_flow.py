"""Authentication at the upgrade and join ACLs, through real sockets (JWT HS256)."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from gateway.auth import mint_token
from gateway.client import GatewayClient, GatewayError
from support.gateway import JWT_SECRET, GatewayProcess, uniq
from support.ws import RawWS


@pytest.mark.parametrize("where", ["query", "header", "protocol"])
async def test_token_accepted_from_query_header_and_subprotocol(jwt_gw: GatewayProcess, where: str) -> None:
    user = uniq("jwt")
    c = GatewayClient(jwt_gw.ws_url(), token=mint_token(JWT_SECRET, user), token_in=where)
    hello = await c.connect()
    try:
        assert hello["user"] == user == c.user
        assert c.subprotocol == "gateway.v1", "the token entry is never echoed when gateway.v1 was offered"
        room = f"live:{uniq('a')}"
        await c.join(room)
        assert (await c.publish(room, "hi"))["seq"] == 1
    finally:
        await c.close()


async def test_integer_subject_becomes_the_user_id(jwt_gw: GatewayProcess) -> None:
    c = GatewayClient(jwt_gw.ws_url(), token=mint_token(JWT_SECRET, 4242))
    hello = await c.connect()
    assert hello["user"] == "4242"
    await c.close()


def _bad_tokens() -> dict[str, str]:
    now = int(time.time())
    return {
        "expired": mint_token(JWT_SECRET, "late", ttl=-30),
        "not yet valid": jwt.encode({"sub": "early", "nbf": now + 3600, "exp": now + 7200}, JWT_SECRET, algorithm="HS256"),
        "wrong secret": mint_token("another-secret-another-secret-another-secret!", "x"),
        "alg none": jwt.encode({"sub": "x", "exp": now + 60}, None, algorithm="none"),  # type: ignore[arg-type]
        "no subject": jwt.encode({"exp": now + 60}, JWT_SECRET, algorithm="HS256"),
        "garbage": "not.a.jwt",
    }


@pytest.mark.parametrize("case", sorted(_bad_tokens()))
async def test_bad_tokens_are_refused_with_401(jwt_gw: GatewayProcess, case: str) -> None:
    token = _bad_tokens()[case]
    before = (await jwt_gw.stats())["auth_rejects"]
    for kw in ({"path": f"/ws?token={token}"}, {"path": "/ws", "headers": (("Authorization", f"Bearer {token}"),)}):
        ws = await RawWS.connect(jwt_gw.host, jwt_gw.port, **kw)  # type: ignore[arg-type]
        assert ws.status == 401, (case, ws.status)
        assert await ws.at_eof(), "no WebSocket is opened"
        ws.close()
    assert (await jwt_gw.stats())["auth_rejects"] == before + 2


async def test_missing_token_is_refused_when_guests_are_off(jwt_gw: GatewayProcess) -> None:
    ws = await RawWS.connect(jwt_gw.host, jwt_gw.port, "/ws", protocols=("gateway.v1",))
    assert ws.status == 401
    ws.close()


async def test_a_refused_client_sees_the_status(jwt_gw: GatewayProcess) -> None:
    from websockets.exceptions import InvalidStatus

    c = GatewayClient(jwt_gw.ws_url(), token=mint_token(JWT_SECRET, "x", ttl=-5))
    with pytest.raises(InvalidStatus) as e:
        await c.connect()
    assert e.value.response.status_code == 401


# ---- join ACL ------------------------------------------------------------------------------------


async def test_join_acl_follows_the_rooms_claim(jwt_gw: GatewayProcess) -> None:
    sid = uniq("s")
    token = mint_token(JWT_SECRET, uniq("agent"), rooms=[f"cs:{sid}", "cs:team*"])
    c = GatewayClient(jwt_gw.ws_url(), token=token)
    await c.connect()
    try:
        ack = await c.join(f"cs:{sid}")
        assert ack["room"] == f"cs:{sid}"
        assert (await c.publish(f"cs:{sid}", {"text": "how can I help?"}))["seq"] == 1
        await c.join("cs:team42")  # glob in the claim
        with pytest.raises(GatewayError) as e:
            await c.join(f"cs:{sid}x")
        assert e.value.code == 4003
    finally:
        await c.close()
    # A token without a rooms claim may not join ACL rooms at all, but public ones.
    plain = GatewayClient(jwt_gw.ws_url(), token=mint_token(JWT_SECRET, uniq("nobody")))
    await plain.connect()
    try:
        with pytest.raises(GatewayError) as e:
            await plain.join(f"cs:{sid}")
        assert e.value.code == 4003
        await plain.join(f"live:{uniq('pub')}")
    finally:
        await plain.close()


async def test_user_channel_is_owner_only(jwt_gw: GatewayProcess) -> None:
    user = uniq("own")
    c = GatewayClient(jwt_gw.ws_url(), token=mint_token(JWT_SECRET, user))
    await c.connect()
    try:
        await c.join(f"user:{user}")
        with pytest.raises(GatewayError) as e:
            await c.publish(f"user:{user}", "nobody publishes here")
        assert e.value.code == 4003
        with pytest.raises(GatewayError) as e:
            await c.join(f"user:{user}x")
        assert e.value.code == 4003
    finally:
        await c.close()


# ---- guests ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guest_gw(module_gateway_factory: Any) -> GatewayProcess:
    return module_gateway_factory("auth.mode=jwt", f"auth.secret={JWT_SECRET}", "auth.allow_guests=true")  # type: ignore[no-any-return]


async def test_guests_read_but_do_not_publish(guest_gw: GatewayProcess) -> None:
    room = f"live:{uniq('g')}"
    guest = GatewayClient(guest_gw.ws_url())
    hello = await guest.connect()
    try:
        assert hello["user"].startswith("guest:")
        await guest.join(room)
        with pytest.raises(GatewayError) as e:
            await guest.publish(room, "hello?")
        assert e.value.code == 4003 and "guest" in e.value.message
        await guest_gw.publish(room, {"x": 1})
        assert (await guest.recv(10))["data"] == {"x": 1}
        # A present but invalid token is still refused (no silent downgrade to guest).
        ws = await RawWS.connect(guest_gw.host, guest_gw.port, f"/ws?token={mint_token(JWT_SECRET, 'x', ttl=-5)}")
        assert ws.status == 401
        ws.close()
    finally:
        await guest.close()
