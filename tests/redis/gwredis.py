"""DEPRECATED: the Redis test helpers moved to the ``support`` package (``support.redis``,
``support.wait``, ``support.ports``). Only kept for the modules still importing
``gwredis`` (tests/redis/test_broker.py, being edited on another branch); drop it once
they import from ``support``."""

from support.ports import free_port, port_is_free  # noqa: F401
from support.redis import RedisServer, command, commandstats  # noqa: F401
from support.wait import eventually as await_until  # noqa: F401
from support.wait import eventually_sync as wait_until  # noqa: F401
