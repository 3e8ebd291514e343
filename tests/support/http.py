"""The one HTTP helper of the tests: ``request()`` (blocking, for fixtures, launchers and
polling conditions) and ``arequest()`` (the same from a coroutine, in a thread). It never
raises for an HTTP status: a status of 0 means nothing answered."""

from __future__ import annotations

import asyncio
import json as jsonlib
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self) -> Any:
        return jsonlib.loads(self.body)

    def decoded(self) -> Any:
        """The JSON body, else the text."""
        try:
            return self.json()
        except ValueError:
            return self.text


def request(method: str, url: str, json: Any = None, *, data: bytes | None = None, headers: Mapping[str, str] | None = None,
            timeout: float = 10.0) -> Reply:
    """One request. ``json`` is sent as a JSON body (``data`` as raw bytes)."""
    h = dict(headers or {})
    if json is not None:
        data = jsonlib.dumps(json).encode()
        h.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Reply(int(r.status), r.read(), {k.lower(): v for k, v in r.headers.items()})
    except urllib.error.HTTPError as e:
        with e:
            return Reply(int(e.code), e.read(), {k.lower(): v for k, v in e.headers.items()})
    except (OSError, ValueError):  # refused, reset, timed out, malformed answer
        return Reply(0)


async def arequest(method: str, url: str, json: Any = None, *, data: bytes | None = None, headers: Mapping[str, str] | None = None,
                   timeout: float = 10.0) -> Reply:
    """:func:`request` without blocking the event loop."""
    return await asyncio.to_thread(request, method, url, json, data=data, headers=headers, timeout=timeout)
