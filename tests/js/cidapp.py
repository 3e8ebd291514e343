"""Test-only gateway app for the JS SDK tests (``--app tests.js.cidapp:make_app``).

It records every ``publish`` request the gateway receives, before anything handles it, as
one JSON line ``{"cid", "room", "user", "id", "type", "data"}`` in the file named by the
``[plugins.cidlog] path`` setting, so a test can assert on what reached the server (e.g.
that a publish was sent again after a reconnect with the same ``cid``). Nothing else
changes: the frame then goes through the gateway's normal handling.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.app import Gateway
from gateway.config import Config


class RecordingGateway(Gateway):
    def __init__(self, config: Config, path: str) -> None:
        super().__init__(config)
        self._cid_log = path

    async def _handle(self, c: Any, data: bytes) -> None:
        if b'"publish"' in data:
            try:
                msg = orjson.loads(data)
            except orjson.JSONDecodeError:
                msg = None
            if isinstance(msg, dict) and msg.get("op") == "publish":
                line = {k: msg.get(k) for k in ("cid", "room", "id", "type", "data")}
                line["user"] = c.user
                with open(self._cid_log, "ab") as f:  # test only: tiny synchronous appends
                    f.write(orjson.dumps(line) + b"\n")
        return await super()._handle(c, data)


def make_app(config: Config) -> Gateway:
    path = config.plugins.get("cidlog", {}).get("path")
    if not isinstance(path, str) or not path:
        raise ValueError("set plugins.cidlog.path")
    return RecordingGateway(config, path)
