"""examples/wechat_subscribe.py against a local server that speaks WeChat's two endpoints
(``/cgi-bin/stable_token``, ``/cgi-bin/message/subscribe/send``) and records the calls."""

# ruff: noqa: RUF001 (Chinese text with its own punctuation)
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from support.desk import DESK_ROUTES

from examples.wechat_subscribe import WeChatSettings, WeChatSubscribe


class FakeWeChat:
    """Records every call; ``answers`` scripts the errcodes of the next sends."""

    def __init__(self) -> None:
        self.tokens: list[dict[str, Any]] = []
        self.sends: list[tuple[str, dict[str, Any]]] = []
        self.answers: list[int] = []
        self.issued = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def token(self, req: web.Request) -> web.Response:
        self.tokens.append(await req.json())
        self.issued += 1
        return web.json_response({"access_token": f"T{self.issued}", "expires_in": 7200})

    async def send(self, req: web.Request) -> web.Response:
        self.sends.append((req.query.get("access_token", ""), await req.json()))
        code = self.answers.pop(0) if self.answers else 0
        return web.json_response({"errcode": code, "errmsg": "ok" if code == 0 else "scripted"})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/cgi-bin/stable_token", self.token)
        app.router.add_post("/cgi-bin/message/subscribe/send", self.send)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


@dataclass
class Session:
    session: str
    shopper: str
    room: str
    agent: str | None = "alice"
    department: str = "presales"


@pytest.fixture
async def wechat() -> AsyncIterator[FakeWeChat]:
    w = FakeWeChat()
    await w.start()
    yield w
    assert w.runner is not None
    await w.runner.cleanup()


def settings(url: str, **kw: Any) -> WeChatSettings:
    env = {"WECHAT_APPID": "wxapp", "WECHAT_SECRET": "s3cret", "WECHAT_TEMPLATE_ID": "tpl-1", "WECHAT_API_BASE": url, **kw}
    return WeChatSettings.from_env(env)


async def test_a_reminder_is_a_subscribe_message_with_a_cached_stable_token(wechat: FakeWeChat) -> None:
    n = WeChatSubscribe(settings(wechat.url))
    try:
        await n(Session("s1", "openid-ann", "cs:s1"), 3, 1_800_000_000_000)
        await n(Session("s2", "openid-bob", "cs:s2"), 1, 1_800_000_000_000)
    finally:
        await n.close()
    assert wechat.tokens == [{"grant_type": "client_credential", "appid": "wxapp", "secret": "s3cret", "force_refresh": False}]
    assert [t for t, _ in wechat.sends] == ["T1", "T1"], "one token for both"
    body = wechat.sends[0][1]
    assert body == {
        "touser": "openid-ann", "template_id": "tpl-1", "page": "pages/service/chat?session=s1", "miniprogram_state": "formal",
        "lang": "zh_CN", "data": {"thing1": {"value": "您有3条客服回复未读"}, "time2": {"value": "2027-01-15 16:00"}},
    }
    assert (n.sent, n.refused, n.failed) == (2, 0, 0)


async def test_a_revoked_token_is_fetched_again_once(wechat: FakeWeChat) -> None:
    wechat.answers = [40001, 0]
    n = WeChatSubscribe(settings(wechat.url))
    try:
        await n(Session("s1", "openid-ann", "cs:s1"), 1, 1_800_000_000_000)
    finally:
        await n.close()
    assert [t["force_refresh"] for t in wechat.tokens] == [False, True]
    assert [t for t, _ in wechat.sends] == ["T1", "T2"]
    assert n.sent == 1


async def test_no_subscription_left_is_not_retried_for_that_session(wechat: FakeWeChat) -> None:
    wechat.answers = [43101]
    n = WeChatSubscribe(settings(wechat.url))
    try:
        await n(Session("s1", "openid-ann", "cs:s1"), 1, 1_800_000_000_000)
        await n(Session("s1", "openid-ann", "cs:s1"), 2, 1_800_000_000_000)
        await n(Session("s2", "openid-bob", "cs:s2"), 1, 1_800_000_000_000)
    finally:
        await n.close()
    assert [b["touser"] for _, b in wechat.sends] == ["openid-ann", "openid-bob"]
    assert (n.sent, n.refused) == (1, 1)


async def test_custom_fields_are_filled_and_things_cut_to_twenty_characters(wechat: FakeWeChat) -> None:
    data = {"thing1": "{department} 客服 {agent} 回复了您的咨询，共 {unread} 条，请尽快查看哦", "character_string2": "{session}"}
    n = WeChatSubscribe(settings(wechat.url, WECHAT_DATA=json.dumps(data, ensure_ascii=False), WECHAT_PAGE="pages/cs?room={room}"))
    try:
        await n(Session("s9", "openid-ann", "cs:s9"), 12, 1_800_000_000_000)
    finally:
        await n.close()
    body = wechat.sends[0][1]
    assert body["page"] == "pages/cs?room=cs:s9"
    thing = body["data"]["thing1"]["value"]
    assert len(thing) == 20 and thing.startswith("presales 客服 alice") and thing.endswith("…")
    assert body["data"]["character_string2"] == {"value": "s9"}


async def test_an_unreachable_wechat_is_counted_never_raised() -> None:
    n = WeChatSubscribe(settings("http://127.0.0.1:9"))
    try:
        await n(Session("s1", "openid-ann", "cs:s1"), 1, 1_800_000_000_000)
    finally:
        await n.close()
    assert n.failed == 1


@pytest.mark.parametrize(("env", "message"), [
    ({"WECHAT_APPID": ""}, "WECHAT_APPID"),
    ({"WECHAT_STATE": "prod"}, "WECHAT_STATE"),
    ({"WECHAT_DATA": "{nope"}, "not JSON"),
    ({"WECHAT_DATA": '{"thing1": 3}'}, "object of strings"),
])
def test_bad_settings_are_clear_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings("http://127.0.0.1:1", **env)


DESK_CONFIG = DESK_ROUTES + """
[[routes]]
pattern = "*"

[plugins.desk]
enabled = true
bot_turns = 0
reminder_minutes = 0.02

[[plugins.desk.departments]]
name = "presales"
"""


async def test_the_desk_reminds_an_offline_shopper_through_wechat(wechat: FakeWeChat, example_gateway: Any) -> None:
    """The example app end to end: a shopper asks and leaves; the agent answers; after
    ``reminder_minutes`` one subscribe message names the shopper and their session."""
    g = example_gateway("examples.wechat_subscribe:make_app", "limits.client_rate=0", config=DESK_CONFIG, env={
        "WECHAT_APPID": "wxapp", "WECHAT_SECRET": "s3cret", "WECHAT_TEMPLATE_ID": "tpl-1", "WECHAT_API_BASE": wechat.url,
    })
    agent = await g.client("alice", params={"role": "agent"})
    shopper = await g.client("openid-ann")
    try:
        assert (await agent.request("cs.status", status="online"))["status"] == "online"
        opened = await shopper.request("cs.open", department="presales", card={"kind": "product", "title": "保温杯"})
        sid = opened["session"]
        await shopper.close()  # the mini-program goes to the background
        mine: list[Any] = []
        for _ in range(100):
            mine = (await agent.request("cs.mine"))["sessions"]
            if mine:
                break
            await asyncio.sleep(0.05)
        assert [m["session"] for m in mine] == [sid], "assigned to the only agent online"
        await agent.publish(f"cs:{sid}", {"text": "您好，有货的"})
        for _ in range(200):
            if wechat.sends:
                break
            await asyncio.sleep(0.05)
        assert len(wechat.sends) == 1, wechat.sends
        body = wechat.sends[0][1]
        assert (body["touser"], body["page"], body["data"]["thing1"]["value"]) == ("openid-ann", f"pages/service/chat?session={sid}", "您有1条客服回复未读")
        await asyncio.sleep(2.0)
        assert len(wechat.sends) == 1, "once per burst of replies"
    finally:
        await agent.close()
