"""Test-only gateway app for the JS SDK tests (``--app tests.js.cidapp:make_app``).

It records every ``publish`` the gateway accepts, in an ``on_message`` hook (so before it
is published), as one JSON line ``{"cid", "room", "user", "type", "data"}`` in the file
named by the ``[plugins.cidlog] path`` setting, so a test can assert on what reached the
server (e.g. that a publish was sent again after a reconnect with the same ``cid``).
Nothing else changes.
"""

from __future__ import annotations

import orjson

from gateway import Client, Config, Gateway, Message, Plugin


class CidLog(Plugin):
    name = "cidlog"

    def __init__(self, path: str) -> None:
        self.path = path

    def on_message(self, client: Client, msg: Message) -> None:
        line = {"cid": msg.cid, "room": msg.room, "type": msg.type, "data": msg.data, "user": client.user}
        with open(self.path, "ab") as f:  # test only: tiny synchronous appends
            f.write(orjson.dumps(line) + b"\n")


def make_app(config: Config) -> Gateway:
    path = config.plugins.get("cidlog", {}).get("path")
    if not isinstance(path, str) or not path:
        raise ValueError("set plugins.cidlog.path")
    return Gateway(config, plugins=[CidLog(path)])
