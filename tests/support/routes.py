"""``[[routes]]`` tables for test configs, without the rate limits tests do not test:
``routes(conversation("dm:{a}:{b}", "dm", members_max=2), ...)``."""

from __future__ import annotations

import json
from typing import Any


def route(pattern: str, **settings: Any) -> str:
    """One ``[[routes]]`` table: ``pattern`` and ``settings`` (strings, numbers, booleans,
    lists, flat tables), with ``user_rate`` and ``room_rate`` 0 unless given."""
    settings = {"user_rate": 0, "room_rate": 0, **settings}
    lines = ["[[routes]]", f"pattern = {json.dumps(pattern)}"]
    for k, v in settings.items():
        lines.append(f"{k} = {_toml(v)}")
    return "\n".join(lines) + "\n"


def conversation(pattern: str, kind: str, **settings: Any) -> str:
    """A conversation route (members only, every message stored durably)."""
    return route(pattern, kind=kind, join="none", store="durable", **settings)


def routes(*tables: str) -> str:
    """The tables, then the catch-all ``*``."""
    return "\n".join((*tables, '[[routes]]\npattern = "*"\n'))


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(v)
