"""The customer-service desk through real gateways (docs/customer-service.md): the
shopper's and agents' client ops over real WebSockets, the bot, transfers and write
access, presence (a blip keeps the chats, a real departure re-queues them), business
hours, ratings and the HTTP API. Two nodes on Redis: test_desk_cluster.py."""

# ruff: noqa: RUF001 (Chinese text with its own punctuation)
from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import orjson
import pytest
from support.gateway import GatewayProcess, uniq
from support.wait import eventually

from gateway.client import GatewayClient, GatewayError

APP = "tests.integration.desk_app:make_app"

ROUTES = """
[[routes]]
pattern = "cs:{session}"
kind = "group"
join = "none"
store = "durable"
members_max = 20
create = "none"
invite = "none"
user_rate = 0
room_rate = 0

[[routes]]
pattern = "csi:{session}"
kind = "group"
join = "none"
store = "durable"
create = "none"
invite = "none"
user_rate = 0
room_rate = 0

[[routes]]
pattern = "notice:{user_id}"
kind = "notice"
join = "none"
publish = "none"
store = "durable"
members_max = 1

[[routes]]
pattern = "*"
"""

DESK = """
[plugins.desk]
enabled = true
strategy = "least_busy"
sticky = true
grace = {grace}
bot_turns = 2
reminder_minutes = {reminder}

[[plugins.desk.departments]]
name = "presales"
title = "售前咨询"
canned = ["您好，请问有什么可以帮您？"]

[[plugins.desk.departments]]
name = "aftersales"
{after_hours}

[[plugins.desk.faq]]
keywords = ["发货", "shipping"]
answer = "下单后 48 小时内发货。"
"""


def config(*, grace: float = 1.0, reminder: float = 0, after_hours: str = "") -> str:
    return ROUTES + DESK.format(grace=grace, reminder=reminder, after_hours=after_hours)


def gateway(path: Path, cfg: str, *sets: str, app: str | None = APP, **kw: Any) -> GatewayProcess:
    return GatewayProcess(path, ["limits.client_rate=0", *sets], config=cfg, app=app, **kw)


async def agent(g: GatewayProcess, user: str, role: str = "agent", status: str | None = "online") -> GatewayClient:
    c = await g.client(user, params={"role": role})
    if status is not None:
        ack = await c.request("cs.status", status=status)
        assert ack["status"] == status
    return c


def pushes(c: GatewayClient, type: str) -> asyncio.Future[dict[str, Any]]:
    return c.wait_event(lambda f: f.get("op") == "push" and f.get("type") == type, timeout=15)


async def msgs(c: GatewayClient, room: str) -> list[dict[str, Any]]:
    page = await c.request("history", room=room, limit=100)
    return list(page["msgs"])


async def api(g: GatewayProcess, method: str, path: str, json: Any = None, *, expect: int = 200) -> Any:
    status, body = await g.api(method, path, json)
    assert status == expect, (status, body)
    return body


async def test_bot_then_agent_then_close_and_rate(tmp_path: Path) -> None:
    g = gateway(tmp_path, config()).start()
    shopper, alice = uniq("shop"), uniq("alice")
    try:
        a = await agent(g, alice)
        s = await g.client(shopper)
        await s.sync()
        card = {"kind": "product", "title": "保温杯", "price": "¥99", "id": "p1"}
        ack = await s.request("cs.open", department="presales", card=card)
        assert ack["state"] == "bot" and ack["resumed"] is False and ack["room"] == f"cs:{ack['session']}"
        sid, room = ack["session"], ack["room"]
        again = await s.request("cs.open", department="presales")
        assert again["session"] == sid and again["resumed"] is True
        # The bot answers what it knows, and hands off after bot_turns (2) answers.
        await s.publish(room, {"text": "什么时候发货？"})
        await eventually(lambda: _has(s, room, "cs.bot", "48 小时"), timeout=10, what="the FAQ answer")
        assigned = pushes(a, "cs.assigned")
        await s.publish(room, {"text": "还有别的问题"})  # no FAQ match: the fallback hands off
        got = (await assigned)["data"]
        assert got["session"] == sid and got["state"] == "assigned" and got["agent"] == alice
        assert got["context"] == {"tier": "normal", "orders": 3}, "the context hook enriches for agents"
        assert got["card"] == card
        # The agent sees the whole transcript, card first.
        hist = await msgs(a, room)
        types = [m["type"] for m in hist]
        assert types.index("cs.card") < types.index("cs.bot") and "chat" in types
        assert [m["data"]["state"] for m in hist if m["type"] == "cs.state"] == ["bot", "queued", "assigned"]
        assert hist[[m["type"] for m in hist].index("cs.card")]["from"] == shopper
        # Both sides write; a note goes to the internal channel only.
        await a.publish(room, {"text": "您好，我是 alice"})
        await s.publish(room, {"text": "你好"})
        n = await a.request("cs.note", session=sid, text="VIP, be nice")
        assert n["seq"] >= 1
        with pytest.raises(GatewayError) as e:
            await s.request("history", room=f"csi:{sid}")
        assert e.value.code == 4031, e.value  # not a member
        mine = await a.request("cs.mine")
        assert [x["session"] for x in mine["sessions"]] == [sid]
        info = await a.request("cs.info", session=sid)
        assert info["first_response_at"] and info["context"]["orders"] == 3
        # Shopper closes; gets the rating card; rates; writes are refused after.
        ack = await s.request("cs.close", session=sid)
        assert ack == {"state": "closed"} or ack.get("state") == "closed"
        await eventually(lambda: _has(s, room, "cs.rating", ""), timeout=10, what="the rating card")
        with pytest.raises(GatewayError) as e:
            await s.publish(room, {"text": "one more"})
        assert e.value.code == 4092
        with pytest.raises(GatewayError) as e:
            await a.publish(room, {"text": "one more"})
        assert e.value.code == 4092
        with pytest.raises(GatewayError) as e:
            await s.request("cs.rate", session=sid, score=9)
        assert e.value.code == 4000
        with pytest.raises(GatewayError) as e:
            await a.request("cs.rate", session=sid, score=5)
        assert e.value.code == 4003, "only the shopper rates"
        await s.request("cs.rate", session=sid, score=5, comment="很好")
        # Export of ratings (JSON lines) and the report.
        status, body = await g.api("GET", "/v1/cs/ratings?from=0")
        assert status == 200
        lines = [orjson.loads(x) for x in body.splitlines()] if isinstance(body, (bytes, str)) else [body]
        assert [(x["session"], x["score"], x["comment"], x["agent"]) for x in lines] == [(sid, 5, "很好", alice)]
        rep = await api(g, "GET", "/v1/cs/report?from=0")
        assert rep["departments"]["presales"]["sessions"] == 1 and rep["departments"]["presales"]["answered"] == 1
        assert rep["agents"][alice]["rating_avg"] == 5 and rep["agents"][alice]["handle_avg_s"] is not None
        assert g.metric('gateway_cs_ratings_total{department="presales",score="5"}') == 1
        assert g.metric('gateway_cs_sessions_total{department="presales",outcome="answered"}') == 1
        await a.close()
        await s.close()
    finally:
        assert not g.finish()


async def _has(c: GatewayClient, room: str, type: str, text: str) -> bool:
    for m in await msgs(c, room):
        if m["type"] == type and text in orjson.dumps(m["data"]).decode():
            return True
    return False
