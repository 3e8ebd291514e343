"""[plugins.desk] validation and business hours with an injected clock (no gateway)."""

# ruff: noqa: RUF001 (Chinese text with its own punctuation)
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from gateway.desk import Actor, Desk
from gateway.desk.bot import FaqBot
from gateway.desk.settings import parse_settings
from gateway.errors import ConfigError
from gateway.store import CsSession

SH = dt.timezone(dt.timedelta(hours=8))


def at(y: int, mo: int, d: int, h: int, mi: int = 0) -> float:
    """Unix time of a wall-clock time in Shanghai (UTC+8, no DST)."""
    return dt.datetime(y, mo, d, h, mi, tzinfo=SH).timestamp()


TABLE: dict[str, Any] = {
    "enabled": True,
    "departments": [
        {"name": "presales", "hours": {"tz": "Asia/Shanghai", "mon-fri": "09:00-21:00", "sat": ["10:00-12:00", "13:00-18:00"]},
         "holidays": ["2026-10-01"], "offline_message": "下班了"},
        {"name": "aftersales"},
    ],
    "agents": [{"user": "alice", "departments": ["aftersales"], "capacity": 2}],
    "faq": [{"keywords": ["发货", "Shipping"], "answer": "48 小时内发货"}],
}


def test_hours_with_an_injected_clock() -> None:
    s = parse_settings(TABLE)
    pre = s.department("presales")
    assert pre is not None
    # 2026-09-30 is a Wednesday.
    assert pre.open_at(at(2026, 9, 30, 9, 0)) and pre.open_at(at(2026, 9, 30, 20, 59))
    assert not pre.open_at(at(2026, 9, 30, 8, 59)) and not pre.open_at(at(2026, 9, 30, 21, 0))
    assert not pre.open_at(at(2026, 10, 1, 12)), "a holiday"
    assert pre.open_at(at(2026, 10, 3, 11)) and not pre.open_at(at(2026, 10, 3, 12, 30)) and pre.open_at(at(2026, 10, 3, 17, 59))
    assert not pre.open_at(at(2026, 10, 4, 12)), "Sunday: no hours"
    # The time zone counts: 02:00 UTC on a Wednesday is 10:00 in Shanghai.
    assert pre.open_at(dt.datetime(2026, 9, 30, 2, 0, tzinfo=dt.UTC).timestamp())
    after = s.department("aftersales")
    assert after is not None and after.open_at(at(2026, 10, 1, 3))
    assert s.department(None) is pre and s.department("nope") is None
    assert s.agent_departments("alice") == ("aftersales",) and s.agent_capacity("alice") == 2
    assert s.agent_departments("bob") == ("presales", "aftersales") and s.agent_capacity("bob") == 5


async def test_the_desk_uses_its_clock_for_hours() -> None:
    now = [at(2026, 10, 1, 12)]
    d = Desk(clock=lambda: now[0], settings=parse_settings(TABLE))
    pre = d.settings.department("presales")
    assert pre is not None and not pre.open_at(d.clock())
    now[0] = at(2026, 9, 30, 12)
    assert pre.open_at(d.clock())


async def test_faq_bot() -> None:
    s = parse_settings(TABLE)
    bot = FaqBot(s.faq, s.bot_fallback)
    sess = CsSession("s", "u", "presales", "bot", 0)
    r = await bot.answer(sess, "什么时候发货")
    assert r.text == "48 小时内发货" and not r.handoff
    r = await bot.answer(sess, "SHIPPING please")
    assert r.text == "48 小时内发货"
    r = await bot.answer(sess, "别的")
    assert r.handoff and r.text


def test_actor_roles() -> None:
    assert Actor("a", "agent").is_agent and not Actor("a", "agent").is_supervisor
    assert Actor("a", "supervisor").is_supervisor and not Actor("s", "shopper").is_agent


@pytest.mark.parametrize(("patch", "key"), [
    ({"strategy": "random"}, "plugins.desk.strategy"),
    ({"grace": "60"}, "plugins.desk.grace"),
    ({"bot_turns": 1.5}, "plugins.desk.bot_turns"),
    ({"sticky": "yes"}, "plugins.desk.sticky"),
    ({"handoff_words": "人工"}, "plugins.desk.handoff_words"),
    ({"departments": []}, "plugins.desk.departments"),
    ({"departments": [{"name": "a b"}]}, "plugins.desk.departments[0].name"),
    ({"departments": [{"name": "a"}, {"name": "a"}]}, "plugins.desk.departments[1].name"),
    ({"departments": [{"name": "a", "hours": {"tz": "Mars/Olympus"}}]}, "plugins.desk.departments[0].hours.tz"),
    ({"departments": [{"name": "a", "hours": {"mon-fri": "9-5"}}]}, "plugins.desk.departments[0].hours.mon-fri"),
    ({"departments": [{"name": "a", "hours": {"fri-mon": "09:00-17:00"}}]}, "plugins.desk.departments[0].hours.fri-mon"),
    ({"departments": [{"name": "a", "hours": {"mon": "18:00-09:00"}}]}, "plugins.desk.departments[0].hours.mon"),
    ({"departments": [{"name": "a", "hours": {"mon": "09:00-17:00"}, "holidays": ["10/01"]}]}, "plugins.desk.departments[0].holidays"),
    ({"departments": [{"name": "a", "holidays": ["2026-10-01"]}]}, "plugins.desk.departments[0].holidays"),
    ({"agents": [{"user": "x", "departments": ["nope"]}]}, "plugins.desk.agents[0].departments"),
    ({"agents": [{"user": "x", "capacity": 0}]}, "plugins.desk.agents[0].capacity"),
    ({"faq": [{"keywords": [], "answer": "x"}]}, "plugins.desk.faq[0].keywords"),
    ({"departments": [{"name": "a", "card_kinds": "order"}]}, "plugins.desk.departments[0].card_kinds"),
    ({"departments": [{"name": "a", "card_kinds": ["order"]}, {"name": "b", "card_kinds": ["order"]}]}, "plugins.desk.departments[1].card_kinds"),
    ({"engine": "etcd"}, "plugins.desk.engine"),
    ({"typo": 1}, "plugins.desk.typo"),
])
def test_bad_settings_name_their_key(patch: dict[str, Any], key: str) -> None:
    table = {k: v for k, v in TABLE.items() if k not in ("departments", "agents")} | patch
    with pytest.raises(ConfigError) as e:
        parse_settings(table)
    assert e.value.key == key, str(e.value)


def test_the_gateway_validates_the_table_at_construction() -> None:
    from gateway import Config, Gateway

    cfg = Config()
    cfg.auth.mode = "dev"
    cfg.server.host = "127.0.0.1"
    cfg.plugins = {"desk": {"enabled": True, "strategy": "nope"}}
    with pytest.raises(ConfigError):
        Gateway(cfg)
    cfg.plugins = {"desk": {"enabled": True}}
    gw = Gateway(cfg)
    assert [p.name for p in gw.plugins] == ["desk"]
    cfg.plugins = {"desk": {"enabled": False}}
    assert Gateway(cfg).plugins == []


def test_the_example_config_has_a_working_desk_section(tmp_path: Path) -> None:
    """gateway.example.toml's commented desk section, uncommented, is a valid desk with the
    routes it needs (group, durable cs: and csi:) and a department."""
    import re

    from gateway.config import load_config
    from gateway.routing import Router

    text = (Path(__file__).resolve().parents[2] / "gateway.example.toml").read_text()
    block = re.search(r"^# --- desk ---\n(.*?)^# --- end desk ---\n", text, re.S | re.M)
    assert block is not None, "the example has a desk section"
    on = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in block.group(1).splitlines())
    # The routes come after the plugin tables: put the desk at the end, as a user may.
    cfg_text = text.replace(block.group(0), "") + "\n" + on + "\n"
    path = tmp_path / "gateway.toml"
    path.write_text(cfg_text)
    cfg = load_config(str(path), environ={"GATEWAY_AUTH__SECRET": "q3V9x-Lr0aT7mZ2pK8sW4yB6nD1fH5jG0cE"})
    st = parse_settings(cfg.plugins["desk"])
    assert st.enabled and [d.name for d in st.departments] == ["presales"] and st.faq and "alice" in st.agents
    assert st.departments[0].hours is not None and st.departments[0].canned
    router = Router(cfg.routes)
    for room in ("cs:s1", "csi:s1"):
        route = router.match(room)
        assert route is not None and route.cfg.kind == "group" and route.cfg.store == "durable", room
