"""``gateway run --workers 2``: two processes on one port (SO_REUSEPORT), sharing rooms
through Redis; a worker that dies is restarted; SIGTERM drains them all."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess
from support.redis import RedisServer
from support.wait import eventually_sync

pytestmark = pytest.mark.redis


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.fixture
def supervisor(redis_server: RedisServer, gateway_factory: GatewayFactory) -> GatewayProcess:
    """A supervisor (node id ``sv``) and its 2 workers ``sv-w0`` and ``sv-w1``, each ready."""
    return gateway_factory(
        "server.demo=false", "drain.timeout=1.0",
        args=["--broker", "redis", "--redis-url", redis_server.url], node_id="sv", workers=2,
    )


async def test_workers_share_the_port_and_rooms(supervisor: GatewayProcess, clients: Any) -> None:
    by_worker: dict[str, Any] = {}
    for i in range(40):
        c = await clients(supervisor, f"w-user{i}")
        by_worker.setdefault(c.node, c)
        if len(by_worker) == 2:
            break
    assert set(by_worker) == {"sv-w0", "sv-w1"}, f"SO_REUSEPORT spreads connections: {set(by_worker)}"
    c0, c1 = by_worker["sv-w0"], by_worker["sv-w1"]
    await c0.join("live:workers")
    await c1.join("live:workers")
    await c0.request("publish", room="live:workers", data={"from": "w0"})
    m = await c1.recv(5)
    assert m["data"] == {"from": "w0"} and m["room"] == "live:workers"
    assert (await c0.recv(5))["data"] == {"from": "w0"}


def test_a_dead_worker_is_restarted_and_sigterm_drains(supervisor: GatewayProcess) -> None:
    proc = supervisor
    kids = eventually_sync(lambda: len(children(proc.pid)) == 2 and children(proc.pid), 10, what="2 workers")
    victim = kids[0]
    os.kill(victim, signal.SIGKILL)
    def replaced() -> list[int] | None:
        k = children(proc.pid)
        return k if len(k) == 2 and victim not in k else None

    new = eventually_sync(replaced, 15, what="worker restarted")
    assert len(new) == 2
    for i in range(2):
        eventually_sync(lambda i=i: proc.ready_status(i) == 200, 30, what=f"worker {i} ready again")
    assert "restarting" in proc.log_text()
    proc.signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert proc.wait(20) == 0
    assert time.monotonic() - t0 < 15
    for k in new:
        assert not Path(f"/proc/{k}").exists() or "zombie" in Path(f"/proc/{k}/status").read_text().lower()
