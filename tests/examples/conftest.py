"""Fixtures for the example tests (helpers in ``examples_support.py``).

Deliberately no ``__init__.py`` in this directory: it would make ``tests`` the import root
and let ``tests/examples`` shadow the top-level ``examples`` package.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from examples_support import GatewayProcess, WsClient


@pytest.fixture
def start_gateway(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """``start_gateway("examples.x:make_app", sets=[...], env={...}) -> GatewayProcess``;
    every process is stopped at teardown and its log printed if the test failed."""
    procs: list[GatewayProcess] = []
    counter = itertools.count()

    def start(app: str, *, sets: Sequence[str] = (), env: Mapping[str, str] | None = None) -> GatewayProcess:
        gp = GatewayProcess(app, sets, env or {}, tmp_path / f"gateway-{next(counter)}.log")
        procs.append(gp)
        gp.start()
        return gp

    yield start
    for gp in procs:
        gp.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for gp in procs:
            print(f"\n---- log of {gp.app} ({gp.node}) ----\n{gp.log()[-6000:]}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep


@pytest.fixture
async def clients() -> Any:
    """``await clients(url, **kw) -> WsClient``; all are closed at teardown."""
    opened: list[WsClient] = []

    async def open_client(url: str, **kw: Any) -> WsClient:
        c = await WsClient.connect(url, **kw)
        opened.append(c)
        return c

    yield open_client
    for c in opened:
        await c.close()
