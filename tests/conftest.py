"""Root conftest: registers the shared fixtures that live in ``gwtest.py``.

Helpers are imported by tests as ``from gwtest import ...`` (a uniquely named module):
``from conftest import ...`` is ambiguous once several directories have a conftest.py.
"""

from gwtest import (  # noqa: F401  (fixtures and hooks are registered by name)
    _kill_leftovers,
    _servers_still_alive,
    gateway_factory,
    gw,
    jwt_gw,
    module_gateway_factory,
    pytest_configure,
    session_gateway_factory,
)
