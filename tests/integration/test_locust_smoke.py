"""A short headless locust run of loadtest/locustfile.py against a real gateway.

Starts the gateway with the load-test config (loadtest/locust.toml), runs every user
class for a few seconds and checks locust's CSV statistics: connects, joins, publish
acks (chat, gift, customer service), receive latencies and pings all happened, and
nothing failed. Any broken scenario (protocol change, config change, crash) fails it.
The desk's users (ShopperUser, DeskAgentUser) run against loadtest/desk.toml: sessions
opened, assigned, answered (also after an offline spell), closed and rated, no failure.
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
LOCUST_TOML = ROOT / "loadtest" / "locust.toml"
DESK_TOML = ROOT / "loadtest" / "desk.toml"
#: The classes run against locust.toml (the desk's users need desk.toml: below).
CLASSES = ["ViewerUser", "ChatterUser", "GiftUser", "ReconnectStormUser", "CustomerServiceUser", "ChatUser"]

# Not imported here: importing locust monkey-patches this process with gevent (threads
# become greenlets), which breaks every later test that uses threads and hangs the run at
# exit. It runs in its own process below; it is a test dependency (pyproject's `test`).
if importlib.util.find_spec("locust") is None:
    pytest.fail("locust is not installed (pip install -e '.[test]')", pytrace=False)


def _stats(prefix: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


@pytest.mark.slow
@pytest.mark.timeout(240)  # gateway start-up plus locust's own 90 s bound
def test_locust_headless_smoke(gateway_factory, tmp_path: Path) -> None:
    gw = gateway_factory(config=LOCUST_TOML.read_text())
    prefix = tmp_path / "smoke"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "10", "-r", "10", "-t", "5s",
           "--host", gw.ws_url(), "--csv", str(prefix), "--only-summary", "--stop-timeout", "5",
           "--heartbeat", "1", "--drop-chance", "0.3", "--chat-rate", "2", "--gift-rate", "1", *CLASSES]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=90, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"locust exited with {proc.returncode}\n{out[-4000:]}"
    assert "Traceback" not in out, out[-4000:]

    stats = _stats(prefix)
    total = stats[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0, f"failures:\n{Path(f'{prefix}_failures.csv').read_text()}"

    def count(rtype: str, name: str) -> int:
        row = stats.get((rtype, name))
        return int(row["Request Count"]) if row else 0

    # Every user class did its part.
    assert count("WS", "connect") >= 10
    assert count("WS", "join") >= 5
    assert count("WS", "publish-ack chat") >= 2
    assert count("WS", "publish-ack gift") >= 1
    assert count("WS", "publish-ack cs") >= 2  # customer and agent
    assert count("RECV", "msg chat") >= 2  # receive latency from the embedded timestamp
    assert count("RECV", "msg cs") >= 2
    assert count("WS", "ping") >= 1
    # ChatUser (conversations; one user here, so nobody to receive from): sync on connect,
    # its posts acked.
    assert count("WS", "sync") >= 1
    assert count("WS", "publish-ack dm") + count("WS", "publish-ack group") >= 1
    assert any(name.startswith("resume (recovered=") for _t, name in stats), "no resume after a drop"
    # Receive latency on one machine: sane values, not clock garbage.
    assert 0 <= float(stats[("RECV", "msg chat")]["Average Response Time"]) < 5000


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_locust_desk_smoke(gateway_factory, tmp_path: Path) -> None:
    """8 shoppers and 2 agents (capacity 5) for 12 s: every step of a desk session."""
    gw = gateway_factory(config=DESK_TOML.read_text())  # (the factory gives it its own store.path)
    prefix = tmp_path / "desk"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "10", "-r", "10", "-t", "12s",
           "--host", gw.ws_url(), "--csv", str(prefix), "--only-summary", "--stop-timeout", "5",
           "--desk-agents", "2", "--desk-capacity", "5", "--desk-start-delay", "1", "--desk-msgs", "2-4",
           "--desk-think", "0.2-0.5", "--desk-answer-delay", "0.3-0.6", "--desk-offline-chance", "0.5",
           "--desk-close-after", "3", "ShopperUser", "DeskAgentUser"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=90, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"locust exited with {proc.returncode}\n{out[-4000:]}"
    assert "Traceback" not in out, out[-4000:]
    stats = _stats(prefix)
    total = stats[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0, f"failures:\n{Path(f'{prefix}_failures.csv').read_text()}"

    def count(rtype: str, name: str) -> int:
        row = stats.get((rtype, name))
        return int(row["Request Count"]) if row else 0

    assert count("WS", "cs.status") == 2  # both agents online
    opened = count("WS", "cs.open")
    assert opened >= 8, opened  # every shopper opened a session
    assert count("DESK", "session resumed") == 0
    assert count("DESK", "assign (open -> assigned)") >= 8, "shoppers saw their session assigned"
    assert count("DESK", "assigned push (queued -> agent)") >= 8, "agents got cs.assigned"
    assert count("WS", "publish-ack cs shopper") >= 8 and count("WS", "publish-ack cs agent") >= 8
    answered = count("DESK", "answer (chat -> agent reply)") + count("DESK", "answer after offline (sync)")
    assert answered >= 8, answered
    assert count("WS", "sync (since cursor)") >= 1, "no shopper came back from offline"
    closed = count("WS", "cs.close") + count("WS", "cs.close (agent)")
    assert closed >= 4 and count("WS", "cs.rate") >= 4, (closed, count("WS", "cs.rate"))
    # Latencies on one machine: sane values.
    assert 0 <= float(stats[("DESK", "assign (open -> assigned)")]["Average Response Time"]) < 5000
