# ruff: noqa: RUF001  (Chinese text with its own punctuation)
"""``[plugins.desk]``: validated at start-up into :class:`DeskSettings` (a bad value is a
:class:`~gateway.errors.ConfigError` naming the key, never a failure later), business
hours (:class:`Hours`), and the keyword FAQ bot's entries."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..errors import ConfigError
from .engine import STRATEGIES

__all__ = ["AgentConfig", "Department", "DeskSettings", "FaqEntry", "Hours", "parse_settings"]

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SPAN = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")
_FALLBACK = "抱歉，这个问题我暂时回答不了，正在为您转接人工客服。"
_KEYS = {
    "enabled", "strategy", "sticky", "grace", "bot_turns", "handoff_words", "reminder_minutes", "agents_from", "capacity",
    "departments", "agents", "faq", "bot_fallback", "engine", "form", "max_card_bytes",
}


@dataclass(frozen=True, slots=True)
class Hours:
    """Opening hours of a department: per weekday a list of (start, end) minutes of the
    day in ``tz`` (end may be 1440), and closed ``holidays`` (local dates)."""

    tz: ZoneInfo
    days: dict[int, tuple[tuple[int, int], ...]]
    holidays: frozenset[dt.date] = frozenset()

    def open_at(self, when: float) -> bool:
        """Whether the department is open at Unix time ``when``."""
        local = dt.datetime.fromtimestamp(when, self.tz)
        if local.date() in self.holidays:
            return False
        minute = local.hour * 60 + local.minute
        return any(a <= minute < b for a, b in self.days.get(local.weekday(), ()))


@dataclass(frozen=True, slots=True)
class Department:
    name: str
    title: str = ""
    canned: tuple[str, ...] = ()
    hours: Hours | None = None
    offline_message: str = "现在是非工作时间，请留言，我们会尽快联系您。"
    #: Context-card kinds (``card.kind``) whose sessions come here when the shopper names
    #: no department, e.g. ``["order", "refund"]`` for after-sales.
    card_kinds: tuple[str, ...] = ()

    def open_at(self, when: float) -> bool:
        return self.hours is None or self.hours.open_at(when)

    def json(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title or self.name, "canned": list(self.canned)}


@dataclass(frozen=True, slots=True)
class AgentConfig:
    user: str
    departments: tuple[str, ...]
    capacity: int


@dataclass(frozen=True, slots=True)
class FaqEntry:
    keywords: tuple[str, ...]
    answer: str


@dataclass(frozen=True, slots=True)
class DeskSettings:
    enabled: bool = False
    strategy: str = "least_busy"
    sticky: bool = True
    grace: float = 60.0
    bot_turns: int = 3
    handoff_words: tuple[str, ...] = ("人工", "转人工", "human", "agent")
    reminder_minutes: float = 10.0
    agents_from: str = "role"
    #: Sessions an agent takes at once unless ``[[plugins.desk.agents]]`` says otherwise.
    capacity: int = 5
    departments: tuple[Department, ...] = (Department("default"),)
    agents: dict[str, AgentConfig] = field(default_factory=dict)
    faq: tuple[FaqEntry, ...] = ()
    bot_fallback: str = _FALLBACK
    #: ``auto`` (Redis when the broker is Redis, else memory), ``memory`` or ``redis``.
    engine: str = "auto"
    #: The offline form's fields (names the app shows).
    form: tuple[str, ...] = ("name", "phone", "message")
    max_card_bytes: int = 4096

    def department(self, name: str | None) -> Department | None:
        if name is None:
            return self.departments[0]
        return next((d for d in self.departments if d.name == name), None)

    def department_for_card(self, card: Any) -> Department | None:
        """The department whose ``card_kinds`` has ``card["kind"]`` (None: no rule)."""
        kind = card.get("kind") if isinstance(card, dict) else None
        if not isinstance(kind, str):
            return None
        return next((d for d in self.departments if kind in d.card_kinds), None)

    def agent_departments(self, user: str) -> tuple[str, ...]:
        a = self.agents.get(user)
        return a.departments if a is not None else tuple(d.name for d in self.departments)

    def agent_capacity(self, user: str) -> int:
        a = self.agents.get(user)
        return a.capacity if a is not None else self.capacity


def _bool(t: dict[str, Any], key: str, default: bool) -> bool:
    v = t.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"plugins.desk.{key}", f"must be true or false, not {v!r}")
    return v


def _num(t: dict[str, Any], key: str, default: float, lo: float, hi: float, *, integer: bool = False, where: str = "plugins.desk") -> Any:
    v = t.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or (integer and not isinstance(v, int)):
        raise ConfigError(f"{where}.{key}", f"must be {'an integer' if integer else 'a number'}, not {v!r}")
    if not lo <= v <= hi:
        raise ConfigError(f"{where}.{key}", f"must be in {lo:g}..{hi:g}, not {v!r}")
    return v


def _strs(v: Any, key: str, *, nonempty: bool = False) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v) or (nonempty and not v):
        raise ConfigError(key, f"must be a {'non-empty ' if nonempty else ''}list of non-empty strings")
    return tuple(v)


def _days(spec: str, key: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        a, _, b = part.strip().partition("-")
        if a not in _DAYS or (b and b not in _DAYS):
            raise ConfigError(key, f"{spec!r} is not a day or a range of days (mon..sun, e.g. mon-fri)")
        i, j = _DAYS.index(a), _DAYS.index(b or a)
        if j < i:
            raise ConfigError(key, f"{spec!r}: a range of days goes forwards (mon-fri)")
        out.extend(range(i, j + 1))
    return out


def parse_hours(h: Any, holidays: Any, where: str) -> Hours:
    if not isinstance(h, dict):
        raise ConfigError(f"{where}.hours", "must be a table, e.g. { tz = \"Asia/Shanghai\", mon-fri = \"09:00-21:00\" }")
    tzname = h.get("tz", "UTC")
    try:
        tz = ZoneInfo(str(tzname))
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{where}.hours.tz", f"unknown time zone {tzname!r}") from None
    days: dict[int, list[tuple[int, int]]] = {}
    for k, v in h.items():
        if k == "tz":
            continue
        key = f"{where}.hours.{k}"
        spans = [v] if isinstance(v, str) else v
        if not isinstance(spans, list) or not spans:
            raise ConfigError(key, "must be \"HH:MM-HH:MM\" or a list of them")
        parsed = []
        for span in spans:
            m = _SPAN.match(span) if isinstance(span, str) else None
            if m is None:
                raise ConfigError(key, f"{span!r} is not HH:MM-HH:MM")
            a, b = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
            if int(m[2]) > 59 or int(m[4]) > 59 or a >= 1440 or b > 1440 or b <= a:
                raise ConfigError(key, f"{span!r}: the start must be before the end, within 00:00-24:00")
            parsed.append((a, b))
        for d in _days(k, key):
            days.setdefault(d, []).extend(parsed)
    hol: set[dt.date] = set()
    for x in _strs(holidays if holidays is not None else [], f"{where}.holidays"):
        try:
            hol.add(dt.date.fromisoformat(x))
        except ValueError:
            raise ConfigError(f"{where}.holidays", f"{x!r} is not a date (YYYY-MM-DD)") from None
    return Hours(tz, {d: tuple(sorted(v)) for d, v in days.items()}, frozenset(hol))


def parse_settings(table: Any) -> DeskSettings:
    """``[plugins.desk]`` as :class:`DeskSettings`; :class:`ConfigError` on a bad value."""
    if table is None:
        return DeskSettings()
    if not isinstance(table, dict):
        raise ConfigError("plugins.desk", "must be a table")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ConfigError(f"plugins.desk.{unknown[0]}", f"unknown setting (known: {', '.join(sorted(_KEYS))})")
    strategy = table.get("strategy", "least_busy")
    if strategy not in STRATEGIES:
        raise ConfigError("plugins.desk.strategy", f"must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    agents_from = table.get("agents_from", "role")
    if agents_from not in ("role", "config"):
        raise ConfigError("plugins.desk.agents_from", "must be \"role\" (token meta role agent/supervisor) or \"config\" ([[plugins.desk.agents]] only)")
    engine = table.get("engine", "auto")
    if engine not in ("auto", "memory", "redis"):
        raise ConfigError("plugins.desk.engine", "must be auto, memory or redis")
    for k in ("bot_fallback",):
        if not isinstance(table.get(k, ""), str):
            raise ConfigError(f"plugins.desk.{k}", "must be a string")
    depts_raw = table.get("departments", [{"name": "default"}])
    if not isinstance(depts_raw, list) or not depts_raw:
        raise ConfigError("plugins.desk.departments", "must be a non-empty list of [[plugins.desk.departments]] tables")
    depts: list[Department] = []
    for i, d in enumerate(depts_raw):
        where = f"plugins.desk.departments[{i}]"
        if not isinstance(d, dict):
            raise ConfigError(where, "must be a table")
        bad = sorted(set(d) - {"name", "title", "canned", "hours", "holidays", "offline_message", "card_kinds"})
        if bad:
            raise ConfigError(f"{where}.{bad[0]}", "unknown setting (known: name, title, canned, hours, holidays, offline_message, card_kinds)")
        name = d.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{where}.name", "required: 1..64 letters, digits, '_', '-' or '.'")
        if any(x.name == name for x in depts):
            raise ConfigError(f"{where}.name", f"department {name!r} is defined twice")
        for k in ("title", "offline_message"):
            if not isinstance(d.get(k, ""), str):
                raise ConfigError(f"{where}.{k}", "must be a string")
        hours = parse_hours(d["hours"], d.get("holidays"), where) if "hours" in d else None
        if hours is None and "holidays" in d:
            raise ConfigError(f"{where}.holidays", "holidays need hours (a department without hours is always open)")
        kw: dict[str, Any] = {"offline_message": d["offline_message"]} if "offline_message" in d else {}
        kinds = _strs(d.get("card_kinds", []), f"{where}.card_kinds")
        taken = [k for k in kinds for x in depts if k in x.card_kinds]
        if taken:
            raise ConfigError(f"{where}.card_kinds", f"card kind {taken[0]!r} already goes to another department")
        kw["card_kinds"] = kinds
        depts.append(Department(name, d.get("title", ""), _strs(d.get("canned", []), f"{where}.canned"), hours, **kw))
    names = {d.name for d in depts}
    capacity = _num(table, "capacity", 5, 1, 1000, integer=True)
    agents: dict[str, AgentConfig] = {}
    agents_raw = table.get("agents", [])
    if not isinstance(agents_raw, list):
        raise ConfigError("plugins.desk.agents", "must be a list of [[plugins.desk.agents]] tables")
    for i, a in enumerate(agents_raw):
        where = f"plugins.desk.agents[{i}]"
        if not isinstance(a, dict):
            raise ConfigError(where, "must be a table")
        user = a.get("user")
        if not isinstance(user, str) or not user:
            raise ConfigError(f"{where}.user", "required: the agent's user id")
        ad = _strs(a.get("departments", sorted(names)), f"{where}.departments", nonempty=True)
        missing = [x for x in ad if x not in names]
        if missing:
            raise ConfigError(f"{where}.departments", f"no department {missing[0]!r} (departments: {', '.join(sorted(names))})")
        agents[user] = AgentConfig(user, ad, _num(a, "capacity", capacity, 1, 1000, integer=True, where=where))
    faq: list[FaqEntry] = []
    faq_raw = table.get("faq", [])
    if not isinstance(faq_raw, list):
        raise ConfigError("plugins.desk.faq", "must be a list of [[plugins.desk.faq]] tables (keywords, answer)")
    for i, f in enumerate(faq_raw):
        where = f"plugins.desk.faq[{i}]"
        if not isinstance(f, dict) or not isinstance(f.get("answer"), str) or not f["answer"]:
            raise ConfigError(f"{where}.answer", "required: the answer text")
        faq.append(FaqEntry(tuple(k.lower() for k in _strs(f.get("keywords"), f"{where}.keywords", nonempty=True)), f["answer"]))
    return DeskSettings(
        enabled=_bool(table, "enabled", False),
        strategy=strategy,
        sticky=_bool(table, "sticky", True),
        grace=float(_num(table, "grace", 60.0, 0, 86400)),
        bot_turns=_num(table, "bot_turns", 3, 0, 100, integer=True),
        handoff_words=tuple(w.lower() for w in _strs(table.get("handoff_words", ["人工", "转人工", "human", "agent"]), "plugins.desk.handoff_words")),
        reminder_minutes=float(_num(table, "reminder_minutes", 10.0, 0, 10080)),
        agents_from=agents_from,
        capacity=capacity,
        departments=tuple(depts),
        agents=agents,
        faq=tuple(faq),
        bot_fallback=table.get("bot_fallback", _FALLBACK),
        engine=engine,
        form=_strs(table.get("form", ["name", "phone", "message"]), "plugins.desk.form", nonempty=True),
        max_card_bytes=_num(table, "max_card_bytes", 4096, 64, 65536, integer=True),
    )
