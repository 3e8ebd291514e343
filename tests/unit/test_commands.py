"""Typed broker commands and their wire form (the Redis control channel)."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest
from gateway.broker.commands import (
    VERSION,
    BadCommand,
    Ban,
    Broadcast,
    CloseRoom,
    ConvMember,
    Command,
    Kick,
    Mute,
    Unban,
    Unmute,
    UserFrame,
    decode,
    decode_message,
    encode,
    encode_user,
)

ALL: list[Command] = [
    Kick("u1", 4003, "bye"),
    Broadcast(b'{"op":"push","type":"notice","data":{"t":"\xc3\xa9"},"ts":1}', 2),
    Mute("live:1", "u1", 1700000000.5, ()),
    Mute("live:1", None, None, ("mod", "host")),
    Mute("*", "u2"),
    Unmute("live:1", "u1"),
    Unmute("live:1"),
    Ban("live:1", "u1", 1700000000.0),
    Ban("*", "u2"),
    Unban("*", "u2"),
    CloseRoom("live:1", "the show is over"),
    ConvMember("group:1", "u1", "added", "admin"),
    ConvMember("dm:a:b", "b", "removed"),
]


@pytest.mark.parametrize("cmd", ALL, ids=lambda c: type(c).__name__)
def test_round_trip(cmd: Command) -> None:
    raw = encode(cmd)
    assert orjson.loads(raw)["v"] == VERSION
    assert decode(raw) == cmd


def test_commands_are_frozen_slotted_values() -> None:
    k = Kick("u1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        k.user = "u2"  # type: ignore[misc]  # the point of the test: frozen
    assert not hasattr(k, "__dict__")
    assert Kick("u1") == Kick("u1", 4003, "kicked") and hash(Mute("r")) == hash(Mute("r", None, None, ()))


def test_the_untyped_messages_of_the_previous_version_decode() -> None:
    """Same kinds and field names as ``control(kind, dict)`` had: nodes of both versions
    understand each other during a rolling upgrade (no ``v``: version 1)."""
    old = [
        ({"k": "kick", "d": {"user": "u7", "code": 4003, "reason": "bye"}}, Kick("u7", 4003, "bye")),
        ({"k": "mute", "d": {"room": "r", "user": "u1", "until": None, "whitelist": []}}, Mute("r", "u1")),
        ({"k": "mute", "d": {"room": "r", "user": None, "until": 5, "whitelist": ["a"]}}, Mute("r", None, 5.0, ("a",))),
        ({"k": "unmute", "d": {"room": "r", "user": None}}, Unmute("r")),
        ({"k": "ban", "d": {"room": "*", "user": "u", "until": None}}, Ban("*", "u")),
        ({"k": "unban", "d": {"room": "*", "user": "u"}}, Unban("*", "u")),
        ({"k": "close_room", "d": {"room": "r", "reason": "x"}}, CloseRoom("r", "x")),
        ({"k": "broadcast", "d": {"frame": "{}", "prio": 1}}, Broadcast(b"{}", 1)),
    ]
    for msg, cmd in old:
        assert decode(orjson.dumps(msg)) == cmd
        # and what this version writes is what the previous one read
        new = orjson.loads(encode(cmd))
        assert new["k"] == msg["k"] and set(msg["d"]) <= set(new["d"])


def test_send_user_frames_share_the_channel_but_are_no_command() -> None:
    raw = encode_user("u1", b'{"op":"push"}', 2)
    assert orjson.loads(raw) == {"v": 1, "k": "__user__", "d": {"user": "u1", "prio": 2, "frame": '{"op":"push"}'}}
    assert decode_message(raw) == UserFrame("u1", b'{"op":"push"}', 2)
    with pytest.raises(ValueError):
        decode(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1,2]",
        b'{"k":"kick"}',
        b'{"d":{}}',
        b'{"v":2,"k":"kick","d":{"user":"u"}}',
        b'{"k":"explode","d":{}}',
        b'{"k":"kick","d":{"user":5}}',
        b'{"k":"kick","d":{"user":"u","code":"4003"}}',
        b'{"k":"kick","d":{"user":"u","code":true}}',
        b'{"k":"kick","d":{"user":"u","reason":null}}',
        b'{"k":"mute","d":{"user":"u"}}',
        b'{"k":"mute","d":{"room":"r","until":"soon"}}',
        b'{"k":"mute","d":{"room":"r","whitelist":"abc"}}',
        b'{"k":"mute","d":{"room":"r","whitelist":[1]}}',
        b'{"k":"ban","d":{"room":"r"}}',
        b'{"k":"unban","d":{"room":"r","user":null}}',
        b'{"k":"broadcast","d":{"frame":{}}}',
        b'{"k":"close_room","d":{"room":"r","reason":1}}',
        b'{"k":"__user__","d":{"user":"u","frame":"x","prio":"high"}}',
        b'{"k":"kick","d":[]}',
    ],
)
def test_bad_messages_raise_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError) as e:
        decode_message(raw)
    assert isinstance(e.value, BadCommand)


def test_encode_rejects_other_objects() -> None:
    bad: Any = {"k": "kick"}
    with pytest.raises(TypeError):
        encode(bad)
