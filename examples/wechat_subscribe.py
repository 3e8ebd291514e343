"""WeChat subscribe messages (订阅消息) for shoppers with unread customer-service replies.

A shopper asks a question and leaves the mini-program; the agent answers. The answer
waits in the conversation, but the shopper does not know. WeChat lets a mini-program
send one *subscribe message* per subscription the user granted (``wx.requestSubscribeMessage``
in the mini-program, typically when they open the chat): a card in the WeChat service
notifications that opens the chat page when tapped.

The desk calls ``on_unread_reply(session, unread, since_ms)`` once a shopper has had
unread agent replies for ``[plugins.desk] reminder_minutes``; :class:`WeChatSubscribe`
is such a callable. It sends

    POST {api_base}/cgi-bin/message/subscribe/send?access_token=TOKEN
    {"touser": openid, "template_id": ..., "page": ..., "data": {...}, "miniprogram_state": ...}

with an access token from ``POST {api_base}/cgi-bin/stable_token`` (the *stable* token:
fetching it does not invalidate the token other services of the company hold, unlike
``/cgi-bin/token``), cached until five minutes before it expires and fetched again
(``force_refresh``) when WeChat says it is invalid (errcode 40001, 42001).

WeChat's answers it handles: 0 sent; 43101 the user has no subscription left (they did
not accept, or used it up): logged at info, not retried, and not sent again for that
session; 40003 not an openid of this app: logged; 45009 the daily limit: logged; other
errors and network failures are logged and counted, never raised into the desk.

Run it (the desk enabled in the config, see docs/customer-service.md)::

    WECHAT_APPID=wx123 WECHAT_SECRET=... WECHAT_TEMPLATE_ID=abc \\
        gateway run --config gateway.toml --app examples.wechat_subscribe:make_app

Settings (environment):

==========================  ======================================================================
``WECHAT_APPID``            the mini-program's AppID
``WECHAT_SECRET``           its AppSecret
``WECHAT_TEMPLATE_ID``      the subscribe-message template (e.g. 客服消息回复通知)
``WECHAT_API_BASE``         default ``https://api.weixin.qq.com`` (tests point it at a local server)
``WECHAT_PAGE``             the page the card opens; ``{session}`` and ``{room}`` are filled in
                            (default ``pages/service/chat?session={session}``)
``WECHAT_STATE``            ``formal`` (default), ``trial`` or ``developer``
``WECHAT_DATA``             the template's fields as JSON, values with ``{unread}``, ``{agent}``,
                            ``{department}``, ``{time}``, ``{session}`` placeholders; default
                            ``{"thing1": "您有{unread}条客服回复未读", "time2": "{time}"}``
==========================  ======================================================================

User ids are taken to be openids (the usual choice for a WeChat mini-program's
``wx.login`` flow); pass ``openid_of`` for another mapping.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import aiohttp

log = logging.getLogger("gateway.examples.wechat_subscribe")

__all__ = ["WeChatSettings", "WeChatSubscribe", "make_app"]

#: WeChat's ``thing`` fields take at most 20 characters; longer values are refused (47003).
THING_MAX = 20
_TOKEN_INVALID = (40001, 42001, 40014)
_NO_SUBSCRIPTION = 43101
_CHINA = timezone(timedelta(hours=8))
#: The template fields sent when ``WECHAT_DATA`` is not set.
DEFAULT_DATA = {"thing1": "您有{unread}条客服回复未读", "time2": "{time}"}


@dataclass(frozen=True)
class WeChatSettings:
    appid: str
    secret: str
    template_id: str
    api_base: str = "https://api.weixin.qq.com"
    page: str = "pages/service/chat?session={session}"
    state: str = "formal"
    data: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_DATA))
    timeout: float = 5.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> WeChatSettings:
        env = dict(os.environ if env is None else env)
        missing = [k for k in ("WECHAT_APPID", "WECHAT_SECRET", "WECHAT_TEMPLATE_ID") if not env.get(k)]
        if missing:
            raise ValueError(f"wechat_subscribe: set {', '.join(missing)}")
        state = env.get("WECHAT_STATE", "formal")
        if state not in ("formal", "trial", "developer"):
            raise ValueError("wechat_subscribe: WECHAT_STATE must be formal, trial or developer")
        data: Any = dict(DEFAULT_DATA)
        if env.get("WECHAT_DATA"):
            try:
                data = json.loads(env["WECHAT_DATA"])
            except ValueError as e:
                raise ValueError(f"wechat_subscribe: WECHAT_DATA is not JSON: {e}") from None
            if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
                raise ValueError('wechat_subscribe: WECHAT_DATA must be an object of strings, e.g. {"thing1": "{unread} replies"}')
        return cls(
            env["WECHAT_APPID"], env["WECHAT_SECRET"], env["WECHAT_TEMPLATE_ID"],
            api_base=env.get("WECHAT_API_BASE", cls.api_base).rstrip("/"),
            page=env.get("WECHAT_PAGE", cls.page), state=state, data=data,
        )


class WeChatSubscribe:
    """``on_unread_reply`` for the desk: one subscribe message per reminder.

    ``sent``, ``refused`` (no subscription) and ``failed`` count the outcomes."""

    def __init__(self, settings: WeChatSettings, openid_of: Callable[[str], str | Awaitable[str]] | None = None) -> None:
        self.settings = settings
        self.openid_of = openid_of
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None
        #: Sessions whose shopper has no subscription left: not tried again.
        self._refused: set[str] = set()
        self.sent = self.refused = self.failed = 0

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.timeout))
        return self._http

    async def _access_token(self, force: bool = False) -> str:
        async with self._token_lock:
            if not force and self._token is not None and time.monotonic() < self._token_expires:
                return self._token
            s = self.settings
            body = {"grant_type": "client_credential", "appid": s.appid, "secret": s.secret, "force_refresh": force}
            async with self._session().post(f"{s.api_base}/cgi-bin/stable_token", json=body) as r:
                answer = await r.json(content_type=None)
            token = answer.get("access_token") if isinstance(answer, dict) else None
            if not isinstance(token, str) or not token:
                raise RuntimeError(f"no access token: {answer!r}"[:300])
            expires_in = answer.get("expires_in", 7200)
            # Five minutes early: a token that expires in flight costs a retry.
            self._token_expires = time.monotonic() + max(60.0, float(expires_in) - 300.0)
            self._token = token
            return token

    def _fields(self, session: Any, unread: int, since_ms: int) -> dict[str, dict[str, str]]:
        when = datetime.fromtimestamp(since_ms / 1000, _CHINA).strftime("%Y-%m-%d %H:%M")
        values = {
            "unread": str(unread), "agent": str(getattr(session, "agent", "") or ""), "department": str(getattr(session, "department", "") or ""),
            "time": when, "session": str(getattr(session, "session", "") or getattr(session, "id", "")),
        }
        out: dict[str, dict[str, str]] = {}
        for key, template in self.settings.data.items():
            value = template.format(**values)
            if key.startswith("thing") and len(value) > THING_MAX:
                value = value[: THING_MAX - 1] + "…"
            out[key] = {"value": value}
        return out

    async def __call__(self, session: Any, unread: int, since_ms: int) -> None:
        """Send the reminder for ``session`` (its ``shopper``, ``session`` id, ``room``,
        ``agent``, ``department``). Never raises: failures are logged and counted."""
        sid = str(getattr(session, "session", "") or getattr(session, "id", ""))
        if sid in self._refused:
            return
        try:
            user = str(session.shopper)
            openid = self.openid_of(user) if self.openid_of is not None else user
            if not isinstance(openid, str):
                openid = await openid
            s = self.settings
            body = {
                "touser": openid, "template_id": s.template_id,
                "page": s.page.format(session=sid, room=getattr(session, "room", "")),
                "data": self._fields(session, unread, since_ms), "miniprogram_state": s.state, "lang": "zh_CN",
            }
            for attempt in (0, 1):
                token = await self._access_token(force=attempt == 1)
                async with self._session().post(f"{s.api_base}/cgi-bin/message/subscribe/send", params={"access_token": token}, json=body) as r:
                    answer = await r.json(content_type=None)
                code = answer.get("errcode", -1) if isinstance(answer, dict) else -1
                if code in _TOKEN_INVALID and attempt == 0:
                    continue  # the cached token was revoked: fetch a fresh one, once
                break
        except Exception as e:  # the desk must never see a notifier's failure
            self.failed += 1
            log.warning("subscribe message for session %s failed: %s", sid, e)
            return
        if code == 0:
            self.sent += 1
        elif code == _NO_SUBSCRIPTION:
            self.refused += 1
            self._refused.add(sid)
            log.info("session %s: the shopper has no subscription left (43101); not reminded again", sid)
        else:
            self.failed += 1
            log.warning("subscribe message for session %s refused: %s", sid, answer)


def make_app(config: Any) -> Any:
    """``gateway run --app examples.wechat_subscribe:make_app``: the desk with this
    notifier as its ``on_unread_reply``."""
    from gateway.app import Gateway, Plugin
    from gateway.desk import Desk

    notifier = WeChatSubscribe(WeChatSettings.from_env())

    class CloseHttp(Plugin):
        name = "wechat-subscribe"

        async def teardown(self) -> None:
            await notifier.close()

    return Gateway(config, plugins=[Desk(on_unread_reply=notifier), CloseHttp()])
