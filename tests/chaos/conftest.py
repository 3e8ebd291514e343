"""Fixtures of the chaos tests: real ``redis-server`` and gateway processes that the tests
stop, kill and restart while real clients stream. Every test in this directory is
marked ``chaos`` (registered here: ``pytest -m chaos``, or ``-m 'not chaos'`` to skip).

Gateways are started like every other test gateway: ``support.gateway.GatewayProcess``
through the shared ``gateway_factory`` fixture (at teardown each must stop cleanly on
SIGTERM, unless the test ended it itself, and not have logged a traceback; a failed
test's gateway logs are printed). The Redis server is ``support.redis.RedisServer``.

Deliberately no ``__init__.py`` (same reason as tests/redis). Helpers live in
``chaoslib.py``.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from chaoslib import REDIS_NODE_SETTINGS, SINGLE_SETTINGS, SINGLE_TOML, chaos_node_config, close_peers
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess
from support.redis import RedisServer

_HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: kills, stops and floods real processes (tests/chaos, ~3 min)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Without redis-server, the first test using it installs it (redis_binary: 3
    # apt-get runs, 600 s each), as in tests/redis.
    installing = shutil.which("redis-server") is None
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.chaos)
            if installing and "redis_server" in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.timeout(1920))


@pytest.fixture
async def chaos_nodes(redis_server: RedisServer, gateway_factory: GatewayFactory) -> AsyncIterator[Callable[..., GatewayProcess]]:
    """``make(redis_url, name)`` starts a chaos node (redis broker, dev auth on 127.0.0.1,
    ``server.io_threads=2``, the ``chaos:{id}`` route, node id = ``name``) and returns it
    ready. Safe to call from several threads at once (``asyncio.to_thread``). At the end
    the test's peers are closed, then the factory stops the nodes (before Redis)."""
    lock = threading.Lock()  # the factory names each node's directory by its count: one at a time

    def make(redis_url: str, name: str, **kw: Any) -> GatewayProcess:
        with lock:
            return gateway_factory(*REDIS_NODE_SETTINGS, config=chaos_node_config(redis_url), node_id=name, **kw)

    try:
        yield make
    finally:
        await close_peers()


@pytest.fixture
async def single_node(gateway_factory: GatewayFactory) -> AsyncIterator[Callable[..., GatewayProcess]]:
    """``make(name, sets)`` starts one gateway on the memory broker (dev auth on 127.0.0.1,
    unlimited ``chaos:{id}`` rooms, ``chaoslib.SINGLE_TOML``) with the ``--set`` strings
    ``sets`` and returns it ready. At the end the test's peers are closed, then the
    factory stops the nodes the test did not stop."""
    lock = threading.Lock()

    def make(name: str, sets: tuple[str, ...] | list[str] = ()) -> GatewayProcess:
        with lock:
            return gateway_factory(*SINGLE_SETTINGS, *sets, config=SINGLE_TOML, node_id=name)

    try:
        yield make
    finally:
        await close_peers()
