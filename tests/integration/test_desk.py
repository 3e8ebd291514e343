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
from support.desk import DESK_ROUTES
from support.gateway import GatewayProcess, uniq
from support.wait import eventually

from gateway.client import GatewayClient, GatewayError

APP = "tests.integration.desk_app:make_app"

ROUTES = DESK_ROUTES + """
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
card_kinds = ["order", "refund"]
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
        _dashboard_metrics_exported(g)
        await a.close()
        await s.close()
    finally:
        assert not g.finish()


def _dashboard_metrics_exported(g: GatewayProcess) -> None:
    """Every gateway_cs_* series the Grafana dashboard and the alerts query is exported."""
    import re

    from prometheus_client.parser import text_string_to_metric_families
    from support.gateway import ROOT

    text = (ROOT / "deploy" / "grafana" / "gateway-dashboard.json").read_text() + (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    referenced = set(re.findall(r"gateway_cs_[a-z_]+", text))
    assert len(referenced) >= 6
    names = set()
    for f in text_string_to_metric_families(g.metrics()):
        names |= {s.name for s in f.samples}
    missing = sorted(referenced - names)
    assert not missing, missing


async def _has(c: GatewayClient, room: str, type: str, text: str) -> bool:
    for m in await msgs(c, room):
        if m["type"] == type and text in orjson.dumps(m["data"]).decode():
            return True
    return False


async def test_transfer_moves_write_access_and_history(tmp_path: Path) -> None:
    g = gateway(tmp_path, config(), "plugins.desk.bot_turns=0").start()
    shopper, alice, bob, sup = uniq("shop"), uniq("alice"), uniq("bob"), uniq("sup")
    try:
        a = await agent(g, alice)
        b = await agent(g, bob, status="away")  # away: not picked automatically
        boss = await agent(g, sup, role="supervisor", status=None)
        s = await g.client(shopper)
        assigned = pushes(a, "cs.assigned")
        ack = await s.request("cs.open", card={"kind": "order", "title": "订单 42"})
        assert ack["state"] in ("queued", "assigned")
        sid, room = ack["session"], ack["room"]
        assert (await assigned)["data"]["session"] == sid
        await a.publish(room, {"text": "hi from alice"})
        # Others cannot accept or write; a shopper cannot use agent ops.
        with pytest.raises(GatewayError) as e:
            await b.request("cs.accept", session=sid)
        assert e.value.code == 4090
        with pytest.raises(GatewayError) as e:
            await b.publish(room, {"text": "intruder"})
        assert e.value.code == 4031
        with pytest.raises(GatewayError) as e:
            await s.request("cs.queue")
        assert e.value.code == 4003
        with pytest.raises(GatewayError) as e:
            await s.request("cs.accept", session=sid)
        assert e.value.code == 4003
        with pytest.raises(GatewayError) as e:
            await a.request("cs.transfer", session=sid)
        assert e.value.code == 4000
        with pytest.raises(GatewayError) as e:
            await a.request("cs.accept", session="nope")
        assert e.value.code == 4004
        # The supervisor watches: reads, cannot write to the shopper.
        w = await boss.request("cs.watch", session=sid)
        assert w["room"] == room
        with pytest.raises(GatewayError) as e:
            await boss.publish(room, {"text": "boss here"})
        assert e.value.code == 4003
        assert any(m["data"] == {"text": "hi from alice"} for m in await msgs(boss, room))
        # Transfer to bob with a note: alice loses write access, bob sees everything.
        gone, got = pushes(a, "cs.unassigned"), pushes(b, "cs.assigned")
        t = await a.request("cs.transfer", session=sid, agent=bob, note="wants a refund")
        assert t["state"] == "assigned" and t["agent"] == bob
        assert (await gone)["data"] == {"session": sid, "reason": "transfer"}
        assert (await got)["data"]["session"] == sid
        with pytest.raises(GatewayError) as e:
            await a.publish(room, {"text": "still me"})
        assert e.value.code == 4031
        hist = await msgs(b, room)
        assert any(m["data"] == {"text": "hi from alice"} for m in hist), "the new agent sees the whole history"
        notes = await msgs(b, f"csi:{sid}")
        assert any(m["type"] == "cs.note" and m["data"]["text"] == "wants a refund" for m in notes)
        await b.publish(room, {"text": "bob here"})
        # Transfer to a department: queued again there (nobody online), then the supervisor closes it.
        await a.request("cs.status", status="away")
        t = await b.request("cs.transfer", session=sid, department="aftersales")
        assert t["state"] == "queued" and t["department"] == "aftersales"
        q = await a.request("cs.queue", department="aftersales")
        assert [x["session"] for x in q["sessions"]] == [sid] and q["sessions"][0]["card"]["title"] == "订单 42"
        c = await boss.request("cs.close", session=sid)
        assert c["state"] == "closed"
        with pytest.raises(GatewayError) as e:
            await a.request("cs.accept", session=sid)
        assert e.value.code == 4092
        got_s = await api(g, "GET", f"/v1/cs/sessions/{sid}")
        assert got_s["transfers"] == 2 and got_s["state"] == "closed" and got_s["closed_by"] == sup
        for c_ in (a, b, boss, s):
            await c_.close()
    finally:
        assert not g.finish()


async def test_an_agent_blip_keeps_the_chats_and_a_departure_requeues_them(tmp_path: Path) -> None:
    g = gateway(tmp_path, config(grace=1.5), "plugins.desk.bot_turns=0").start()
    shopper, alice = uniq("shop"), uniq("alice")
    try:
        a = await agent(g, alice)
        s = await g.client(shopper)
        ack = await s.request("cs.open")
        sid = ack["session"]
        await eventually(lambda: _state(g, sid, "assigned"), timeout=10, what="assigned")
        # A blip: gone for 0.3 s, well within grace.
        await a.close()
        await asyncio.sleep(0.3)
        a = await g.client(alice, params={"role": "agent"})
        await asyncio.sleep(2.5)
        assert await _state(g, sid, "assigned"), "a blip must not re-queue the agent's chats"
        mine = await a.request("cs.mine")
        assert [x["session"] for x in mine["sessions"]] == [sid]
        # Really gone: after grace the session is queued again and alice is offline.
        await a.close()
        await eventually(lambda: _state(g, sid, "queued"), timeout=10, what="re-queued after grace")
        agents = (await api(g, "GET", "/v1/cs/agents"))["agents"]
        assert [(x["user"], x["status"], x["load"]) for x in agents] == [(alice, "offline", 0)]
        await eventually(lambda: _last_state_by(s, ack["room"], "requeue"), timeout=10, what="the requeue's cs.state")
        # Back online: she gets it again (sticky and least busy).
        a = await agent(g, alice)
        await eventually(lambda: _state(g, sid, "assigned"), timeout=10, what="assigned again")
        await a.close()
        await s.close()
    finally:
        assert not g.finish()


async def _last_state_by(c: GatewayClient, room: str, by: str) -> bool:
    return [m["data"]["by"] for m in await msgs(c, room) if m["type"] == "cs.state"][-1] == by


async def _state(g: GatewayProcess, sid: str, state: str) -> bool:
    status, body = await g.api("GET", f"/v1/cs/sessions/{sid}")
    return status == 200 and body["state"] == state


async def test_outside_business_hours_the_shopper_gets_the_form(tmp_path: Path) -> None:
    # aftersales opens only tomorrow (UTC): now it is closed.
    tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).strftime("%a").lower()
    hours = f'hours = {{ tz = "UTC", {tomorrow} = "00:00-24:00" }}\noffline_message = "下班了，请留言"'
    g = gateway(tmp_path, config(after_hours=hours)).start()
    shopper = uniq("shop")
    try:
        s = await g.client(shopper)
        ack = await s.request("cs.open", department="aftersales")
        assert ack["state"] == "offline" and ack["offline"]["message"] == "下班了，请留言"
        assert ack["offline"]["form"] == ["name", "phone", "message"] and "room" not in ack
        with pytest.raises(GatewayError) as e:
            await s.request("cs.form", department="aftersales", fields="no")
        assert e.value.code == 4000
        t = await s.request("cs.form", department="aftersales", fields={"phone": "138", "message": "退货"})
        assert t["ticket"].startswith("t")
        tickets = (await api(g, "GET", "/v1/cs/tickets?from=0"))["tickets"]
        assert [(x["ticket"], x["shopper"], x["fields"]["message"]) for x in tickets] == [(t["ticket"], shopper, "退货")]
        # presales has no hours: open.
        ack = await s.request("cs.open", department="presales")
        assert ack["state"] == "bot"
        with pytest.raises(GatewayError) as e:
            await s.request("cs.open", department="nope")
        assert e.value.code == 4000
        await s.close()
    finally:
        assert not g.finish()


async def test_http_api_and_the_unread_reply_hook(tmp_path: Path) -> None:
    g = gateway(tmp_path, config(reminder=0.02), "plugins.desk.bot_turns=0", "plugins.desk.strategy=manual").start()
    shopper, alice = uniq("vipshop"), uniq("alice")
    try:
        r = await api(g, "POST", "/v1/cs/sessions", {"shopper": shopper, "department": "presales", "card": {"kind": "page", "title": "首页"}},
                      expect=201)
        sid = r["session"]
        assert r["state"] == "queued" and r["resumed"] is False
        r2 = await api(g, "POST", "/v1/cs/sessions", {"shopper": shopper})
        assert r2["session"] == sid and r2["resumed"] is True
        await api(g, "POST", "/v1/cs/sessions", {"shopper": ""}, expect=400)
        await api(g, "POST", "/v1/cs/sessions", {"shopper": "x", "card": "nope"}, expect=400)
        await api(g, "GET", "/v1/cs/sessions/nope", expect=404)
        await api(g, "GET", "/v1/cs/report?from=10&to=5", expect=400)
        status, _ = await g.api("GET", "/v1/cs/sessions", key=False)
        assert status == 401
        listed = (await api(g, "GET", "/v1/cs/sessions?state=queued"))["sessions"]
        assert [x["session"] for x in listed] == [sid]
        # manual: nothing is assigned by itself; the API accepts for alice.
        a = await agent(g, alice)
        await asyncio.sleep(0.3)
        assert (await api(g, "GET", f"/v1/cs/sessions/{sid}"))["state"] == "queued"
        got = await api(g, "POST", f"/v1/cs/sessions/{sid}/accept", {"agent": alice})
        assert got["agent"] == alice and got["state"] == "assigned"
        await api(g, "POST", f"/v1/cs/sessions/{sid}/accept", {"agent": "zed", "force": True}, expect=409)
        info = await api(g, "GET", f"/v1/cs/sessions/{sid}")
        assert info["context"] == {"tier": "vip", "orders": 3}
        await api(g, "PUT", f"/v1/cs/agents/{alice}", {"status": "nonsense"}, expect=400)
        ag = await api(g, "PUT", f"/v1/cs/agents/{alice}", {"capacity": 9})
        assert ag["capacity"] == 9 and ag["load"] == 1
        n = await api(g, "POST", f"/v1/cs/sessions/{sid}/notes", {"text": "from the CRM"})
        assert n["seq"] >= 1
        # The shopper does not read alice's replies: on_unread_reply fires once for the burst.
        s = await g.client(shopper)
        remind = pushes(s, "cs.remind")
        await a.publish(f"cs:{sid}", {"text": "在吗？"})
        await a.publish(f"cs:{sid}", {"text": "还需要帮助吗？"})
        got_r = (await remind)["data"]
        assert got_r["session"] == sid and got_r["unread"] == 2
        second = pushes(s, "cs.remind")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(second), 3.0)
        second.cancel()
        closed = await api(g, "POST", f"/v1/cs/sessions/{sid}/close", {})
        assert closed["state"] == "closed"
        await api(g, "POST", f"/v1/cs/sessions/{sid}/rate", {"score": 0}, expect=400)
        rated = await api(g, "POST", f"/v1/cs/sessions/{sid}/rate", {"score": 3})
        assert rated["rating"] == 3
        await a.close()
        await s.close()
    finally:
        assert not g.finish()


@pytest.mark.parametrize(("setting", "needle"), [
    ("plugins.desk.strategy=fastest", "plugins.desk.strategy"),
    ("plugins.desk.grace=-1", "plugins.desk.grace"),
    ("plugins.desk.bogus=1", "plugins.desk.bogus"),
])
def test_a_bad_desk_setting_is_a_message_at_start_up(tmp_path: Path, setting: str, needle: str) -> None:
    import subprocess
    import sys

    from support.gateway import ROOT

    cfg = tmp_path / "g.toml"
    cfg.write_text(config())
    r = subprocess.run([sys.executable, "-m", "gateway", "run", "--config", str(cfg), "--set", setting, "--set", "auth.mode=dev", "--set", "server.host=127.0.0.1", "--set", "server.port=0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=30,
                       env={"PYTHONPATH": str(ROOT / "python"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert needle in r.stderr + r.stdout and "Traceback" not in r.stderr + r.stdout


async def test_shopper_messages_cost_no_store_read_once_past_the_bot(tmp_path: Path) -> None:
    """After the ack, each shopper chat message checks whether the bot answers: once the
    session is past the bot (it never goes back) that costs no store read."""
    g = gateway(tmp_path, config(), app="tests.integration.desk_app:make_counting_app").start()
    shopper, alice = uniq("shop"), uniq("alice")
    try:
        a = await agent(g, alice)
        s = await g.client(shopper)
        ack = await s.request("cs.open")
        room = ack["room"]
        assert ack["state"] == "bot"
        await s.publish(room, {"text": "发货多久？"})  # the bot answers (a store read and a write)
        await s.publish(room, {"text": "人工"})       # handoff word: queued, then assigned to alice
        await eventually(lambda: _state(g, ack["session"], "assigned"), timeout=10, what="assigned")
        before = (await a.request("test.reads"))["cs_session"]
        for i in range(20):
            await s.publish(room, {"text": f"还在吗 {i}"})
        await a.publish(room, {"text": "在的"})
        await asyncio.sleep(0.3)  # after_publish runs after the acks
        after = (await a.request("test.reads"))["cs_session"]
        assert after - before <= 1, f"{after - before} cs_session reads for 21 messages"
        await a.close()
        await s.close()
    finally:
        assert not g.finish()


GARBAGE: list[Any] = [None, 0, -1, 1.5, True, "", "x" * 70, [], ["a"], {}, {"a": 1}, "no-such-session", "x" * 5000]


async def _code(c: GatewayClient, op: str, **fields: Any) -> int | str:
    try:
        await c.request(op, timeout=10, **fields)
        return "ok"
    except GatewayError as e:
        return e.code


async def test_garbage_to_every_op_is_a_clear_4xxx_error(tmp_path: Path) -> None:
    """A shopper (and an agent, and a supervisor) sending bad fields to every cs.* op gets
    a 4xxx error, never a 5000 or a traceback in the log (g.finish checks)."""
    g = gateway(tmp_path, config(), "plugins.desk.bot_turns=0", "limits.max_errors=1000000").start()
    shopper, alice, sup = uniq("shop"), uniq("alice"), uniq("sup")
    try:
        a = await agent(g, alice)
        boss = await agent(g, sup, role="supervisor", status="away")
        s = await g.client(shopper)
        sid = (await s.request("cs.open"))["session"]
        fields = ("session", "department", "card", "score", "comment", "fields", "status", "capacity", "agent", "note", "text")
        bad: list[tuple[str, str, str, Any, Any]] = []
        for c, who in ((s, "shopper"), (a, "agent"), (boss, "supervisor")):
            for op in ("cs.open", "cs.handoff", "cs.close", "cs.rate", "cs.form", "cs.status", "cs.queue", "cs.mine", "cs.accept",
                       "cs.transfer", "cs.note", "cs.info", "cs.watch"):
                for field in fields:
                    for v in GARBAGE:
                        extra: dict[str, Any] = {"session": sid} if field != "session" else {}
                        if op in ("cs.open", "cs.close", "cs.status"):
                            extra = {}  # these change state: garbage alone
                        code = await _code(c, op, **{**extra, field: v})
                        if code == "ok" or not (isinstance(code, int) and 4000 <= code < 5000):
                            bad.append((who, op, field, v if not isinstance(v, str) or len(v) < 80 else f"str*{len(v)}", code))
        # What is fine to succeed with garbage in a field the op does not read, or with a
        # value it ignores: keep only the answers that are wrong.
        wrong = [b for b in bad if b[4] != "ok" or not _ignorable(*b[:4])]
        assert not wrong, "\n".join(map(repr, wrong))
        for c in (s, a, boss):
            await c.close()
    finally:
        assert not g.finish()


def _ignorable(who: str, op: str, field: str, v: Any) -> bool:
    reads = {
        "cs.open": {"department", "card"}, "cs.handoff": {"session"}, "cs.close": {"session"}, "cs.rate": {"session", "score", "comment"},
        "cs.form": {"department", "fields", "session"}, "cs.status": {"status", "capacity"}, "cs.queue": {"department"}, "cs.mine": set(),
        "cs.accept": {"session"}, "cs.transfer": {"session", "agent", "department", "note"}, "cs.note": {"session", "text"},
        "cs.info": {"session"}, "cs.watch": {"session"},
    }
    if field not in reads[op]:
        return True
    if field in ("card", "fields") and isinstance(v, dict) and (v or field == "card"):
        return True  # a valid card / form
    if field in ("text", "note") and isinstance(v, str) and v.strip() and len(v) <= 4000:
        return True  # a valid note
    if field == "capacity" and type(v) is int and 0 <= v <= 1000:
        return True
    if v is None and (op, field) in {("cs.open", "department"), ("cs.open", "card"), ("cs.rate", "comment"), ("cs.form", "session"),
                                      ("cs.status", "status"), ("cs.status", "capacity"), ("cs.queue", "department"),
                                      ("cs.transfer", "note")}:
        return True  # optional: absent
    return False


async def test_transfers_racing_closes_leak_no_capacity(tmp_path: Path) -> None:
    """A transfer and a close of the same session at once: whichever wins, the engine's
    load of each agent equals their assigned sessions in the store afterwards (a lost
    transfer must not give a closed session back to its agent)."""
    g = gateway(tmp_path, config(), "plugins.desk.bot_turns=0", "plugins.desk.capacity=100").start()
    alice, bob, sup = uniq("alice"), uniq("bob"), uniq("sup")
    try:
        a = await agent(g, alice)
        boss = await agent(g, sup, role="supervisor", status="away")
        shoppers = [await g.client(uniq("shop")) for _ in range(12)]
        sids = [(await c.request("cs.open"))["session"] for c in shoppers]
        for sid in sids:
            await eventually(lambda sid=sid: _state(g, sid, "assigned"), timeout=10, what="assigned")
        b = await agent(g, bob)
        # Sent together, the close first: both read the session, the close writes first.
        results = await asyncio.gather(*(asyncio.gather(
            _code(boss, "cs.close", session=sid),
            _code(a, "cs.transfer", session=sid, **({"department": "aftersales"} if i % 2 else {"agent": bob}))) for i, sid in enumerate(sids)))
        assert all(r[0] == "ok" for r in results), results
        await asyncio.sleep(0.5)
        for sid in sids:
            assert await _state(g, sid, "closed")
        agents = {x["user"]: x["load"] for x in (await api(g, "GET", "/v1/cs/agents"))["agents"]}
        assert agents[alice] == 0 and agents[bob] == 0, agents
        assert all(r[1] in ("ok", 4092) for r in results), results  # a transfer that lost to the close: 4092 closed
        # Later sessions still reach alice: her capacity was not eaten up.
        assert (await a.request("cs.status", status="online", capacity=1))["load"] == 0
        for c in [a, b, boss, *shoppers]:
            await c.close()
    finally:
        assert not g.finish()


async def test_who_may_rate_close_watch_and_form(tmp_path: Path) -> None:
    g = gateway(tmp_path, config(), "plugins.desk.bot_turns=0").start()
    shopper, other, alice, bob, sup = uniq("shop"), uniq("other"), uniq("alice"), uniq("bob"), uniq("sup")
    try:
        a = await agent(g, alice)
        s = await g.client(shopper)
        ack = await s.request("cs.open")
        sid, room = ack["session"], ack["room"]
        await eventually(lambda: _state(g, sid, "assigned"), timeout=10, what="assigned")
        b = await agent(g, bob)
        o = await g.client(other)
        # Rating: the shopper's own session, once it is closed.
        assert await _code(s, "cs.rate", session=sid, score=5) == 4000, "not closed yet"
        assert await _code(o, "cs.rate", session=sid, score=1) == 4003, "not theirs"
        # Closing: not by another agent, nor another shopper.
        assert await _code(b, "cs.close", session=sid) == 4003
        assert await _code(o, "cs.close", session=sid) == 4003
        # Watching: supervisors only; a watcher reads but does not write to the shopper.
        assert await _code(b, "cs.watch", session=sid) == 4003
        boss = await agent(g, sup, role="supervisor", status="away")
        w = await boss.request("cs.watch", session=sid)
        assert (w["session"], w["room"], w["note_room"]) == (sid, room, f"csi:{sid}")
        with pytest.raises(GatewayError) as e:
            await boss.publish(room, {"text": "hi"})
        assert e.value.code == 4003
        assert await _code(boss, "cs.note", session=sid, text="watching") == "ok"
        # Notes and details: the session's agent and supervisors; not another agent.
        assert await _code(b, "cs.note", session=sid, text="not mine") == 4003
        assert await _code(b, "cs.info", session=sid) == 4003
        assert await _code(a, "cs.info", session=sid) == "ok"
        assert await _code(boss, "cs.info", session=sid) == "ok"
        # The offline form: the department must be a department's name, a session the shopper's.
        assert await _code(o, "cs.form", department="presales", fields={"phone": "1"}, session=sid) == 4004
        assert await _code(s, "cs.form", department=5, fields={"phone": "1"}) == 4000
        assert await _code(s, "cs.form", department="nope", fields={"phone": "1"}) == 4000
        assert await _code(s, "cs.open", department="nope") == 4000
        assert await _code(s, "cs.open", department="presales", card={"kind": "product", "title": "x" * 5000}) == 4000
        await s.request("cs.close", session=sid)
        assert await _code(s, "cs.rate", session=sid, score=5) == "ok"
        assert await _code(s, "cs.rate", session=sid, score=1) == 4000, "rated once"
        for c in (a, b, s, o, boss):
            await c.close()
    finally:
        assert not g.finish()


async def test_an_open_cut_by_the_hook_deadline_still_completes(tmp_path: Path) -> None:
    """``hooks.timeout`` answers 4080 before a slow ``cs.open`` is done; the open runs to
    its end anyway, so the retry resumes a whole session: queued, assigned, writable."""
    g = gateway(tmp_path, config(), "plugins.desk.bot_turns=0", "hooks.timeout=0.03", "store.batch_ms=20").start()
    shopper, alice = uniq("shop"), uniq("alice")
    try:
        a = await g.client(alice, params={"role": "agent"})
        assert await _code(a, "cs.status", status="online") in ("ok", 4080)
        s = await g.client(shopper)
        assert await _code(s, "cs.open", department="presales", card={"kind": "page", "title": "x"}) == 4080, "slower than the deadline"
        sid = None
        for _ in range(100):
            status, body = await g.api("GET", "/v1/cs/sessions?state=assigned")
            if status == 200 and body["sessions"]:
                sid = body["sessions"][0]["session"]
                break
            await asyncio.sleep(0.05)
        assert sid is not None, "the cut-off open was queued and assigned"
        for _ in range(50):
            try:
                ack = await s.request("cs.open", department="presales")
                break
            except GatewayError as e:
                assert e.code == 4080
        assert ack["session"] == sid and ack["resumed"] is True and ack["agent"] == alice
        await s.publish(ack["room"], {"text": "still there?"})
        await a.close()
        await s.close()
    finally:
        assert not g.finish()


async def test_the_department_comes_from_the_shopper_the_rules_or_the_card(tmp_path: Path) -> None:
    g = gateway(tmp_path, config()).start()
    try:
        async def opened(user: str, **kw: Any) -> str:
            c = await g.client(user)
            try:
                return str((await c.request("cs.open", **kw))["department"])
            finally:
                await c.close()

        assert await opened(uniq("shop"), card={"kind": "order", "id": "o1"}) == "aftersales", "the card's kind"
        assert await opened(uniq("shop"), card={"kind": "product", "id": "p1"}) == "presales", "no rule: the first"
        assert await opened(uniq("ret"), card={"kind": "product", "id": "p1"}) == "aftersales", "the company's route hook"
        assert await opened(uniq("shop"), department="presales", card={"kind": "order"}) == "presales", "the shopper's choice wins"
    finally:
        assert not g.finish()


async def test_least_busy_within_capacity_then_sticky_to_the_last_agent(tmp_path: Path) -> None:
    """Through real sockets: sessions go to the least busy agent with room (capacity 2 and
    1), the rest wait; a returning shopper goes back to their last agent (sticky) when
    that agent has room, even though another is less busy."""
    g = gateway(tmp_path, config(), "plugins.desk.bot_turns=0").start()
    alice, bob = uniq("alice"), uniq("bob")
    shoppers = [uniq(f"shop{i}") for i in range(4)]
    clients: list[GatewayClient] = []
    try:
        a = await g.client(alice, params={"role": "agent"})
        b = await g.client(bob, params={"role": "agent"})
        clients += [a, b]
        assert (await a.request("cs.status", status="online", capacity=2))["capacity"] == 2
        assert (await b.request("cs.status", status="online", capacity=1))["capacity"] == 1
        sids = []
        for sh in shoppers:
            c = await g.client(sh)
            clients.append(c)
            sids.append((await c.request("cs.open", department="presales"))["session"])
        await eventually(lambda: _loads(g, {alice: 2, bob: 1}), timeout=10, what="alice 2 (her capacity), bob 1 (his)")
        states = {s: (await api(g, "GET", f"/v1/cs/sessions/{s}"))["state"] for s in sids}
        assert sorted(states.values()) == ["assigned", "assigned", "assigned", "queued"], states
        waiting = next(s for s, st in states.items() if st == "queued")
        assert waiting == sids[3], "the last to come waits"
        # Bob's shopper closes; the waiting session goes to bob (the only one with room).
        agents = {s: (await api(g, "GET", f"/v1/cs/sessions/{s}"))["agent"] for s in sids[:3]}
        bobs = next(s for s in sids[:3] if agents[s] == bob)
        i = sids.index(bobs)
        await clients[2 + i].request("cs.close", session=bobs)
        await eventually(lambda: _state(g, waiting, "assigned"), timeout=10, what="the waiting one assigned")
        assert (await api(g, "GET", f"/v1/cs/sessions/{waiting}"))["agent"] == bob
        # One of alice's shoppers closes and comes back: alice has room (1 of 2), bob has none.
        alices = next(s for s in sids[:3] if s != bobs)
        j = sids.index(alices)
        await clients[2 + j].request("cs.close", session=alices)
        await eventually(lambda: _loads(g, {alice: 1, bob: 1}), timeout=10, what="alice 1")
        # Bob gets room again (his session closes): now bob is less busy (0) than alice (1),
        # but the returning shopper is sticky to alice.
        await clients[5].request("cs.close", session=waiting)
        await eventually(lambda: _loads(g, {alice: 1, bob: 0}), timeout=10, what="bob free")
        again = (await clients[2 + j].request("cs.open", department="presales"))["session"]
        await eventually(lambda: _state(g, again, "assigned"), timeout=10, what="the return assigned")
        assert (await api(g, "GET", f"/v1/cs/sessions/{again}"))["agent"] == alice, "sticky: her last agent"
    finally:
        for c in clients:
            await c.close()
        assert not g.finish()


async def _loads(g: GatewayProcess, want: dict[str, int]) -> bool:
    status, body = await g.api("GET", "/v1/cs/agents")
    if status != 200:
        return False
    got = {x["user"]: x["load"] for x in body["agents"] if x["user"] in want}
    return got == want
