"""Fixtures for the Redis scale-out tests: a real ``redis-server`` on a free port (installed
from Debian when missing), real gateway processes and real WebSocket clients. Every test
in this directory is marked ``redis``.

Deliberately no ``__init__.py`` here (same reason as tests/examples): ``tests`` must not
become an import root. Helpers live in ``gwredis.py``.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from gwredis import Client, GatewayNode, RedisServer, _install_redis


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.redis)


@pytest.fixture(scope="session")
def redis_binary() -> str:
    path = shutil.which("redis-server") or _install_redis()
    if not path:
        pytest.fail("redis-server is not installed and `apt-get install -y redis-server` failed (needs root)")
    return path


@pytest.fixture
def redis_server(redis_binary: str, tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(redis_binary, tmp_path / "redis")
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            with contextlib.suppress(Exception):
                srv.resume()
        srv.kill()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Any]:
    nodes: list[GatewayNode] = []

    def make(redis_url: str, **kw: Any) -> GatewayNode:
        n = GatewayNode(tmp_path, redis_url, **kw)
        n.start()
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        n.stop()


@pytest.fixture
def two_nodes(redis_server: RedisServer, gateway_factory: Any) -> tuple[GatewayNode, GatewayNode]:
    return gateway_factory(redis_server.url, name="A"), gateway_factory(redis_server.url, name="B")


@pytest.fixture
async def clients() -> AsyncIterator[Any]:
    opened: list[Client] = []

    async def open_(node: GatewayNode, user: str) -> Client:
        c = await Client.open(node, user)
        opened.append(c)
        return c

    yield open_
    for c in opened:
        await c.close()
