"""Observability end to end: a scripted session against a real gateway with exact counter
values read from /metrics, the Prometheus alert rules and scrape config checked (and unit
tested) by promtool, and the Grafana dashboard referencing only metrics a real scrape has."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from typing import Any

import pytest
from gateway.auth import mint_token
from prometheus_client.parser import text_string_to_metric_families
from support.fixtures import GatewayFactory
from support.gateway import JWT_SECRET, ROOT, GatewayProcess, uniq
from support.wait import eventually
from support.ws import OP_TEXT, RawWS, blocking_upgrade, encode_frame, read_to_end

PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "gateway-dashboard.json"


def samples(gw: GatewayProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (sample name, sorted labels) -> value."""
    out = {}
    for fam in text_string_to_metric_families(gw.metrics()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(gw: GatewayProcess, name: str, **labels: str) -> float:
    return samples(gw)[(name, tuple(sorted(labels.items())))]


async def wait_value(gw: GatewayProcess, name: str, want: float, timeout: float = 30.0, **labels: str) -> float:
    """Poll /metrics until ``name`` reaches ``want``; returns the value then."""

    async def reached() -> tuple[float] | None:
        got = await asyncio.to_thread(value, gw, name, **labels)
        return (got,) if got >= want else None  # a tuple: truthy even when got is 0

    (got,) = await eventually(reached, timeout, what=f"{name} >= {want}")
    return got


# ---- the scripted session ------------------------------------------------------------------------


async def test_scripted_session_exact_counters(gateway_factory: GatewayFactory) -> None:
    # JWT auth (a bad token is an auth reject), a small send queue (a slow consumer is closed
    # quickly), no deflate, and no periodic presence frames (they would be deliveries too).
    gw = gateway_factory("auth.mode=jwt", f"auth.secret={JWT_SECRET}", "limits.queue_bytes=65536",
                         "deflate.enabled=false", "presence.interval=3600")
    m0 = await asyncio.to_thread(samples, gw)
    assert m0[("gateway_connects_total", ())] == 0
    assert m0[("gateway_auth_rejects_total", ())] == 0
    assert m0[("gateway_slow_consumer_disconnects_total", ())] == 0

    room, slow_room = f"live:{uniq('obs')}", f"live:{uniq('obsslow')}"
    members = []
    slow = None
    try:
        # connects 1 and 2
        for _ in range(2):
            members.append(await gw.client(token=mint_token(JWT_SECRET, uniq("u"))))
            await members[-1].join(room)

        # one auth reject: a token signed with another secret gets 401, no WebSocket
        bad = mint_token("another-secret-another-secret-another-secret!", "mallory")
        ws = await RawWS.connect(gw.host, gw.port, f"/ws?token={bad}")
        assert ws.status == 401
        assert await ws.at_eof()
        ws.close()
        assert await wait_value(gw, "gateway_auth_rejects_total", 1) == 1

        # N messages into a room with 2 members: exactly 2N frames queued (deliveries), measured
        # as the delta around the publishes (connected frames and join acks came before).
        n = 7
        d0 = await asyncio.to_thread(value, gw, "gateway_deliveries_total")
        for i in range(n):
            await gw.publish(room, {"i": i})
        for c in members:
            got = [(await c.recv(20))["data"]["i"] for _ in range(n)]
            assert got == list(range(n))
        assert await wait_value(gw, "gateway_deliveries_total", d0 + 2 * n) == d0 + 2 * n
        assert all(c.recv_nowait() is None for c in members)
        m1 = await asyncio.to_thread(samples, gw)
        assert m1[("gateway_deliveries_total", ())] == d0 + 2 * n, "nothing else was queued to anyone"
        assert m1[("gateway_connects_total", ())] == 2
        assert m1[("gateway_connections", ())] == 2

        # connect 3: a client that joins and never reads (tiny receive buffer)
        slow = await asyncio.to_thread(blocking_upgrade, gw.host, gw.port, f"/ws?token={mint_token(JWT_SECRET, uniq('slow'))}")
        slow.sendall(encode_frame(OP_TEXT, json.dumps({"op": "join", "id": 1, "room": slow_room}).encode()))

        async def slow_joined() -> bool:
            _, body = await gw.api("GET", f"/v1/rooms/{slow_room}/presence")
            return bool(body.get("conns") == 1)

        await eventually(slow_joined, 20, what=f"the slow client in {slow_room}")

        # High-priority 2 KB messages until the engine closes it as a slow consumer.
        pad = "g" * 2000
        sent = 0

        async def burst_until_closed() -> bool:
            nonlocal sent
            await asyncio.gather(*(gw.publish(slow_room, {"n": sent + k, "pad": pad}, type="gift") for k in range(50)))
            sent += 50
            return await asyncio.to_thread(value, gw, "gateway_slow_consumer_disconnects_total") >= 1

        await eventually(burst_until_closed, 60, interval=0, what="the slow consumer's close (gifts in rounds of 50)")
        assert await wait_value(gw, "gateway_slow_consumer_disconnects_total", 1) == 1, f"not closed after {sent} messages"
        # The server closes the TCP connection after the frames the client had buffered:
        # read them so the close completes, then the disconnect is counted.
        await asyncio.to_thread(read_to_end, slow, 30.0, True)
        assert await wait_value(gw, "gateway_disconnects_total", 1) == 1

        # The final scrape: exact values.
        m = await asyncio.to_thread(samples, gw)
        assert m[("gateway_connects_total", ())] == 3
        assert m[("gateway_auth_rejects_total", ())] == 1
        assert m[("gateway_slow_consumer_disconnects_total", ())] == 1
        assert m[("gateway_disconnect_reasons_total", (("reason", "slow_consumer"),))] == 1
        assert m[("gateway_disconnects_total", ())] == 1
        assert m[("gateway_disconnects_by_code_total", (("code", "4008"),))] == 1
        assert m[("gateway_connections", ())] == 2
        assert sum(v for (k, _), v in m.items() if k == "gateway_handshake_failures_total") == 0
        # The two members' deliveries did not change after the slow phase (it had its own room).
        for c in members:
            assert c.recv_nowait() is None
    finally:
        if slow is not None:
            slow.close()
        for c in members:
            await c.close()


# ---- Prometheus rules and config ------------------------------------------------------------------


def promtool() -> str:
    """promtool, installed from Debian's prometheus package when missing (fails otherwise)."""
    path = shutil.which("promtool")
    if path:
        return path
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    logs = []
    for cmd in ([*sudo, "apt-get", "install", "-y", "-q", "prometheus"],
                [*sudo, "apt-get", "update", "-q"],
                [*sudo, "apt-get", "install", "-y", "-q", "prometheus"]):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            logs.append(f"{cmd}: {e}")
            continue
        logs.append(f"{cmd}: {p.returncode}\n{p.stderr[-1500:]}")
        path = shutil.which("promtool")
        if path and cmd[-1] == "prometheus" and p.returncode == 0:
            return path
    raise AssertionError("promtool is missing and Debian's prometheus package could not be installed:\n" + "\n".join(logs))


#: The first promtool test may install Debian's prometheus package (3 apt-get runs, 900 s each).
PROMTOOL_TIMEOUT = pytest.mark.timeout(2820)


def run_promtool(*args: str) -> str:
    p = subprocess.run([promtool(), *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, f"promtool {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}"
    return p.stdout + p.stderr


@PROMTOOL_TIMEOUT
def test_alert_rules_pass_promtool() -> None:
    out = run_promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in out
    names = set(re.findall(r"^\s*-\s*alert:\s*(\S+)", (PROM_DIR / "alerts.yml").read_text(), re.MULTILINE))
    # drop rate, slow consumers, Redis, p99 lag, hook timeouts, not ready, TLS certificate expiry and reloads
    assert names >= {"GatewayDropRateHigh", "GatewaySlowConsumerSpike", "GatewayBrokerDisconnected",
                     "GatewayFlushLagHigh", "GatewayHookTimeouts", "GatewayNotReady",
                     "GatewayTLSCertExpiringSoon", "GatewayTLSReloadFailed"}


@PROMTOOL_TIMEOUT
def test_scrape_config_passes_promtool() -> None:
    out = run_promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in out


@PROMTOOL_TIMEOUT
def test_alert_unit_tests_pass_promtool() -> None:
    run_promtool("test", "rules", "alerts_test.yml")


# ---- Grafana dashboard -------------------------------------------------------------------------------

_METRIC = re.compile(r"\bgateway_[a-zA-Z0-9_]+")


def _queries(node: Any, key: str = "") -> list[str]:
    """Every PromQL text in the dashboard: panel target ``expr``s and templating queries."""
    out: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, str) and k in ("expr", "query", "definition"):
                out.append(v)
            else:
                out += _queries(v, k)
    elif isinstance(node, list):
        for v in node:
            out += _queries(v, key)
    return out


def test_dashboard_references_only_scraped_metrics(gateway_factory: GatewayFactory) -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert "instance" in variables and ({"DS_PROMETHEUS", "datasource"} & set(variables))
    panels = [p for p in dash["panels"] if p.get("type") != "row"]
    panels += [p for row in dash["panels"] if row.get("type") == "row" for p in row.get("panels", [])]
    assert len(panels) >= 10
    for p in panels:
        assert p.get("targets"), f"panel {p.get('title')!r} has no query"
        assert p["datasource"]["uid"].startswith("${"), p["title"]

    gw = gateway_factory()
    families = {f.name: f.type for f in text_string_to_metric_families(gw.metrics())}
    referenced = {name for q in _queries(dash) for name in _METRIC.findall(q)}
    assert len(referenced) >= 20

    def exists(name: str) -> bool:
        for suffix, types in (("_bucket", {"histogram"}), ("_sum", {"histogram", "summary"}),
                              ("_count", {"histogram", "summary"}), ("_total", {"counter"})):
            if name.endswith(suffix) and families.get(name.removesuffix(suffix)) in types:
                return True
        return families.get(name) in {"gauge", "untyped"}

    # gateway_cs_*: exported once the desk is on (checked in tests/integration/test_desk.py).
    missing = sorted(n for n in referenced if not exists(n) and not n.startswith("gateway_cs_"))
    assert not missing, f"the dashboard references metrics the gateway does not export: {missing}"
    # the sections are all there
    text = json.dumps(dash)
    for needed in ("gateway_connections", "gateway_fanout_seconds_bucket", "gateway_flush_lag_seconds_bucket",
                   "gateway_dropped_messages_total", "gateway_hook_duration_seconds_bucket",
                   "gateway_broker_connected", "gateway_top_room_members"):
        assert needed in text, needed
