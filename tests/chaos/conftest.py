"""Fixtures of the chaos tests: real ``redis-server`` and gateway processes that the tests
stop, kill and restart while real clients stream. Every test in this directory is
marked ``chaos`` (registered here: ``pytest -m chaos``, or ``-m 'not chaos'`` to skip).

Deliberately no ``__init__.py`` (same reason as tests/redis). Helpers live in
``chaoslib.py``; the Redis server and gateway node classes are tests/redis/gwredis.py's.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

_HERE = Path(__file__).resolve().parent
for _p in (_HERE, _HERE.parent, _HERE.parent / "redis"):  # chaoslib, gwproc, gwredis
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from chaoslib import ChaosNode, RedisServer
from gwredis import _install_redis


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: kills, stops and floods real processes (tests/chaos, ~3 min)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.chaos)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    rep = yield
    if rep.when == "call":
        item.stash[_FAILED] = rep.failed
    return rep


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def chaos_tmp(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A temporary directory for configs and logs, removed after the test (pytest's
    tmp_path keeps the last runs). When the test failed, the tail of every log in it is
    printed first (shown in the failure report)."""
    d = Path(tempfile.mkdtemp(prefix="chaos-"))
    try:
        yield d
    finally:
        if request.node.stash.get(_FAILED, False):
            for log in sorted(d.rglob("*.log")):
                lines = log.read_text(errors="replace").splitlines()[-40:]
                print(f"---- {log.name} (last {len(lines)} lines)\n" + "\n".join(lines))
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def chaos_redis_binary() -> str:
    path = shutil.which("redis-server") or _install_redis()
    if not path:
        pytest.fail("redis-server is not installed and `apt-get install -y redis-server` failed (needs root)")
    return path


@pytest.fixture
def chaos_redis(chaos_redis_binary: str, chaos_tmp: Path) -> Iterator[RedisServer]:
    """A private redis-server (no persistence); always continued and killed at the end."""
    srv = RedisServer(chaos_redis_binary, chaos_tmp / "redis")
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            with contextlib.suppress(Exception):
                srv.proc.send_signal(signal.SIGCONT)
        srv.kill()


@pytest.fixture
def chaos_nodes(chaos_tmp: Path) -> Iterator[Any]:
    """``make(redis_url, name)`` starts a ChaosNode; all are stopped (killed if they hang)
    at the end, also the ones a test killed."""
    nodes: list[ChaosNode] = []

    def make(redis_url: str, name: str, **kw: Any) -> ChaosNode:
        n = ChaosNode(chaos_tmp, redis_url, name=name, **kw)
        nodes.append(n)
        n.start()
        return n

    yield make
    for n in nodes:
        with contextlib.suppress(Exception):
            n.stop(timeout=5.0)
        n.kill()
