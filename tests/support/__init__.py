"""The test-support package shared by every Python test suite (unit, integration, redis,
examples) and by ``tests/redis/bench_redis_cpu.py``:

- :mod:`support.gateway`: the one way to start a gateway (``python -m gateway run`` in a
  subprocess on free ports), its HTTP API and connected ``gateway.client.GatewayClient``\\ s;
- :mod:`support.fixtures`: the pytest fixtures built on it (registered by tests/conftest.py);
- :mod:`support.ws`: a raw-frame WebSocket client for protocol-level tests the public client
  cannot serve (bad frames, refused upgrades, a reader that never reads);
- :mod:`support.http`: the one HTTP helper;
- :mod:`support.wait`: ``eventually()`` (async) and ``eventually_sync()`` instead of polling loops;
- :mod:`support.ports`: free ports;
- :mod:`support.redis`: a private ``redis-server`` and the redis-broker gateway config.

Imported as ``support`` (tests/ is on ``sys.path``: pytest puts the directory of the root
conftest.py there, the bench script does it itself). ``tests`` itself stays a namespace, not
a package: ``tests/examples`` must not shadow the top-level ``examples`` package, which is
why the repository root is on ``sys.path`` too.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

if str(ROOT) not in sys.path:  # the ``examples`` package (example apps under test)
    sys.path.append(str(ROOT))
