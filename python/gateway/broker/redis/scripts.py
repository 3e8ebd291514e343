"""The Lua scripts of the Redis broker, one ``.lua`` file each in ``lua/`` (package data,
read with :mod:`importlib.resources`). ``sum_live.lua`` is a shared fragment prepended to
the three ``member_*`` scripts, not a script of its own."""

from __future__ import annotations

import hashlib
from importlib import resources


def _read(name: str) -> str:
    return resources.files(__name__.rpartition(".")[0]).joinpath("lua", name).read_text(encoding="utf-8")


class Script:
    """A script's text and SHA1 (for ``EVALSHA``)."""

    __slots__ = ("name", "sha", "text")

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    @classmethod
    def load(cls, name: str, *, prelude: str = "") -> Script:
        return cls(name, (_read(prelude) if prelude else "") + _read(name))


PUBLISH = Script.load("publish.lua")
HISTORY = Script.load("history.lua")
PRESENCE = Script.load("presence.lua")
MEMBER_JOIN = Script.load("member_join.lua", prelude="sum_live.lua")
MEMBER_LEAVE = Script.load("member_leave.lua", prelude="sum_live.lua")
MEMBER_CONFIRM = Script.load("member_confirm.lua", prelude="sum_live.lua")
HEARTBEAT = Script.load("heartbeat.lua")
SEND_USER = Script.load("send_user.lua")
ARCHIVE_CHECK = Script.load("archive_check.lua")

#: Every script, loaded with ``SCRIPT LOAD`` after each (re)connect.
ALL = (PUBLISH, HISTORY, PRESENCE, MEMBER_JOIN, MEMBER_LEAVE, MEMBER_CONFIRM, HEARTBEAT, SEND_USER, ARCHIVE_CHECK)

# Texts under the names the single-module broker exported.
PUBLISH_LUA = PUBLISH.text
HISTORY_LUA = HISTORY.text
PRESENCE_LUA = PRESENCE.text
