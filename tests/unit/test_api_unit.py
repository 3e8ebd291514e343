"""The HTTP API in-process against a recording fake gateway: argument mapping that the
integration tests cannot observe (priorities) and the not-running answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from gateway.api import build_app
from gateway.app import NotRunning
from gateway.broker import BrokerError, PublishResult
from gateway.config import Config

KEY = "unit-key"


class FakeGateway:
    def __init__(self) -> None:
        self.config = Config()
        self.config.api.api_key = KEY
        self.calls: list[tuple[Any, ...]] = []

    async def send_user(self, user: str, data: Any, type: str = "push", priority: int = 2) -> None:
        self.calls.append(("send_user", user, type, priority))

    async def notify(self, user: str, data: Any, type: str = "push", priority: int = 2) -> dict[str, Any]:
        await self.send_user(user, data, type, priority)  # no notice conversation here: a push
        return {"room": None, "seq": 0, "delivered": "live", "duplicate": False}

    async def broadcast(self, data: Any, type: str = "broadcast", priority: int = 1) -> None:
        self.calls.append(("broadcast", type, priority))

    async def publish(self, room: str, data: Any, type: str = "chat", priority: int | None = None, sender: str | None = None) -> PublishResult:
        self.calls.append(("publish", room, type, priority))
        return PublishResult(3, "ep")

    async def kick(self, user: str, reason: str = "kicked", code: int = 4003) -> None:
        self.calls.append(("kick", user))
        raise BrokerError("redis unavailable")  # applied locally, other nodes unreachable

    def engine_or_raise(self) -> Any:
        raise NotRunning("the gateway is not running")


@pytest.fixture
async def client() -> AsyncIterator[tuple[TestClient, FakeGateway]]:
    gw = FakeGateway()
    async with TestClient(TestServer(build_app(gw))) as c:  # type: ignore[arg-type]
        yield c, gw


async def _post(c: TestClient, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    r = await c.post(path, json=body, headers={"X-API-Key": KEY})
    return r.status, await r.json()


@pytest.mark.parametrize(("given", "expected"), [(None, 2), (0, 0), ("low", 0), (1, 1), ("normal", 1), ("high", 2)])
async def test_send_priority(client: tuple[TestClient, FakeGateway], given: Any, expected: int) -> None:
    c, gw = client
    body: dict[str, Any] = {"user": "u1", "data": {}}
    if given is not None:
        body["priority"] = given
    status, _ = await _post(c, "/v1/send", body)
    assert status == 200
    assert gw.calls == [("send_user", "u1", "push", expected)]


@pytest.mark.parametrize(("given", "expected"), [(None, 1), (0, 0), ("low", 0), (2, 2)])
async def test_broadcast_priority(client: tuple[TestClient, FakeGateway], given: Any, expected: int) -> None:
    c, gw = client
    body: dict[str, Any] = {"data": {}}
    if given is not None:
        body["priority"] = given
    status, _ = await _post(c, "/v1/broadcast", body)
    assert status == 200
    assert gw.calls == [("broadcast", "broadcast", expected)]


async def test_publish_passes_type_and_priority(client: tuple[TestClient, FakeGateway]) -> None:
    c, gw = client
    status, body = await _post(c, "/v1/publish", {"room": "live:1", "data": 1, "type": "gift", "priority": "low"})
    assert (status, body) == (200, {"room": "live:1", "seq": 3, "epoch": "ep"})
    assert gw.calls == [("publish", "live:1", "gift", 0)]
    status, _ = await _post(c, "/v1/publish", {"room": "live:1", "data": 1})
    assert gw.calls[-1] == ("publish", "live:1", "chat", None), "None = the route's priority for the type"


async def test_not_running_is_503(client: tuple[TestClient, FakeGateway]) -> None:
    c, _ = client
    r = await c.get("/v1/stats", headers={"X-API-Key": KEY})
    assert r.status == 503
    assert await r.json() == {"error": "the gateway is not running"}


async def test_broker_unavailable_is_503_local(client: tuple[TestClient, FakeGateway]) -> None:
    c, gw = client
    status, body = await _post(c, "/v1/kick", {"user": "u1"})
    assert status == 503 and body["local"] is True and "broker unavailable" in body["error"]
    assert gw.calls == [("kick", "u1")]
