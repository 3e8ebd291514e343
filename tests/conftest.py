"""Root conftest: registers the shared fixtures of ``support/fixtures.py`` for every suite.

Tests import helpers from the ``support`` package (tests/ is on ``sys.path``);
``from conftest import ...`` is ambiguous once several directories have a conftest.py.
"""

from support.fixtures import (  # noqa: F401  (fixtures and hooks are registered by name)
    _kill_leftovers,
    _servers_still_alive,
    browser_paths,
    browsers,
    clients,
    gateway_factory,
    gw,
    jwt_gw,
    module_gateway_factory,
    postgres_db,
    postgres_dsn,
    postgres_server,
    private_pg,
    pytest_runtest_makereport,
    redis_binary,
    redis_server,
    s3_server,
    session_gateway_factory,
)
