"""DEPRECATED: the helpers moved to the ``support`` package (``support.gateway``,
``support.fixtures``). Only kept for the modules still importing ``gwtest``
(tests/integration/test_api_endpoints.py, being edited on another branch); drop it once
they import ``support.gateway``."""

from support.gateway import API_KEY, JWT_SECRET, ROOT, GatewayProcess, uniq  # noqa: F401
from support.fixtures import GatewayFactory  # noqa: F401
