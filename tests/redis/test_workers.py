"""``gateway run --workers 2``: two processes on one port (SO_REUSEPORT), sharing rooms
through Redis; a worker that dies is restarted; SIGTERM drains them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from gwredis import ROOT, Client, RedisServer, free_port, http, port_is_free, wait_until

pytestmark = pytest.mark.redis


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class _Node:
    """Just enough of GatewayNode for Client.open."""

    def __init__(self, port: int) -> None:
        self.ws_url = f"ws://127.0.0.1:{port}/ws"


@pytest.fixture
def supervisor(redis_server: RedisServer, tmp_path: Path) -> Any:
    port, api = free_port(), free_port()
    while api + 1 == port or not port_is_free(api + 1):
        api = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = str(ROOT / "python") + os.pathsep + env.get("PYTHONPATH", "")
    log = open(tmp_path / "supervisor.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--workers", "2", "--host", "127.0.0.1", "--port", str(port),
         "--api-port", str(api), "--broker", "redis", "--redis-url", redis_server.url,
         "--set", "node_id=\"sv\"", "--set", "auth.mode=\"dev\"", "--set", "server.demo=false", "--set", "drain.timeout=1.0",
         "--set", "log.json=false"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
    )
    log.close()
    try:
        for i in range(2):
            wait_until(lambda i=i: http("GET", f"http://127.0.0.1:{api + i}/readyz", timeout=1)[0] == 200, 30, what=f"worker {i} ready")
        yield proc, port, api, tmp_path / "supervisor.log"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                for c in children(proc.pid):
                    os.kill(c, signal.SIGKILL)


async def test_workers_share_the_port_and_rooms(supervisor: Any) -> None:
    _proc, port, _api, _ = supervisor
    node = _Node(port)
    opened: list[Client] = []
    by_worker: dict[str, Client] = {}
    try:
        for i in range(40):
            c = await Client.open(node, f"w-user{i}")  # type: ignore[arg-type]
            opened.append(c)
            by_worker.setdefault(c.hello["node"], c)
            if len(by_worker) == 2:
                break
        assert set(by_worker) == {"sv-w0", "sv-w1"}, f"SO_REUSEPORT spreads connections: {set(by_worker)}"
        c0, c1 = by_worker["sv-w0"], by_worker["sv-w1"]
        await c0.join("live:workers")
        await c1.join("live:workers")
        await c0.request("publish", room="live:workers", data={"from": "w0"})
        m = await c1.next(room="live:workers")
        assert m["data"] == {"from": "w0"}
        assert (await c0.next(room="live:workers"))["data"] == {"from": "w0"}
    finally:
        for c in opened:
            await c.close()


def test_a_dead_worker_is_restarted_and_sigterm_drains(supervisor: Any) -> None:
    proc, _port, api, log_path = supervisor
    kids = wait_until(lambda: len(children(proc.pid)) == 2 and children(proc.pid), 10, what="2 workers")
    victim = kids[0]
    os.kill(victim, signal.SIGKILL)
    def replaced() -> list[int] | None:
        k = children(proc.pid)
        return k if len(k) == 2 and victim not in k else None

    new = wait_until(replaced, 15, what="worker restarted")
    assert len(new) == 2
    for i in range(2):
        wait_until(lambda i=i: http("GET", f"http://127.0.0.1:{api + i}/readyz", timeout=1)[0] == 200, 30, what=f"worker {i} ready again")
    assert "restarting" in log_path.read_text()
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert proc.wait(20) == 0
    assert time.monotonic() - t0 < 15
    for k in new:
        assert not Path(f"/proc/{k}").exists() or "zombie" in Path(f"/proc/{k}/status").read_text().lower()
