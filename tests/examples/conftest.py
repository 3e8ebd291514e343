"""Fixtures for the example tests: ``example_gateway("examples.x:make_app", *sets,
env={...})`` starts an example app with the shared ``gateway_factory`` (the one way to
start a gateway, see ``support.gateway``); clients are the shared ``clients`` fixture.

Deliberately no ``__init__.py`` in this directory: it would make ``tests`` the import root
and let ``tests/examples`` shadow the top-level ``examples`` package.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess

#: What every example gateway gets on top of the shared test settings.
EXAMPLE_SETTINGS = ("server.demo=false", "server.io_threads=2", "drain.timeout=1")


@pytest.fixture
def example_gateway(gateway_factory: GatewayFactory) -> Callable[..., GatewayProcess]:
    """``example_gateway("examples.x:make_app", "auth.mode=jwt", env={...})``: a ready gateway
    running that app, stopped (and checked) at teardown."""

    def start(app: str, *sets: str, env: Mapping[str, str] | None = None, **kw: Any) -> GatewayProcess:
        return gateway_factory(*EXAMPLE_SETTINGS, *sets, app=app, env=env, **kw)

    return start
