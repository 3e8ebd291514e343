"""Fixtures for the Redis scale-out tests: a real ``redis-server`` on a free port (installed
from Debian when missing) and gateway nodes with the redis broker, started like every
other test gateway (``gateway_factory``); clients are the shared ``clients`` fixture. Every
test in this directory is marked ``redis``.

Deliberately no ``__init__.py`` here (same reason as tests/examples): ``tests`` must not
become an import root. Helpers live in the ``support`` package (``support.redis``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess
from support.redis import REDIS_NODE_SETTINGS, RedisServer, redis_node_config


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    # Without redis-server, the first test installs it (redis_binary: 3 apt-get runs, 600 s each).
    installing = shutil.which("redis-server") is None
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.redis)
            if installing:
                item.add_marker(pytest.mark.timeout(1920))


@pytest.fixture
def redis_node(redis_server: RedisServer, gateway_factory: GatewayFactory) -> Callable[..., GatewayProcess]:
    """``redis_node("A", app=None, env=None, sets=())``: a gateway node on ``redis_server``
    (redis broker, dev auth, no rate limits, fast presence), node id = the name."""

    def start(name: str, *, sets: tuple[str, ...] = (), presence_interval: float = 0.2, **kw: Any) -> GatewayProcess:
        return gateway_factory(*REDIS_NODE_SETTINGS, *sets, config=redis_node_config(redis_server.url, presence_interval), node_id=name, **kw)

    return start


@pytest.fixture
def two_nodes(redis_node: Callable[..., GatewayProcess]) -> tuple[GatewayProcess, GatewayProcess]:
    return redis_node("A"), redis_node("B")
