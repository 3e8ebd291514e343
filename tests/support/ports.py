"""Free TCP ports on 127.0.0.1 for test servers (gateways, redis-server)."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def port_is_free(port: int) -> bool:
    """Whether a server could bind ``port`` on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(max_port: int = 65535) -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a server.

    Taken at random OUTSIDE the ephemeral range (/proc/sys/net/ipv4/ip_local_port_range):
    there the outgoing connections of this machine's other tests cannot grab it between the
    check and the server's bind, and a client reconnecting to a server that was killed (to
    be restarted on the same port) cannot connect to itself (TCP simultaneous open) and
    hold the port. ``max_port`` caps it (a Redis cluster node also uses port + 10000)."""
    lo, hi = _ephemeral_range()
    ranges = [(a, b) for a, b in ((10000, lo - 1), (hi + 1, max_port)) if b - a > 100]
    if ranges:
        rnd = random.Random()
        for _ in range(200):
            a, b = rnd.choices(ranges, weights=[b - a for a, b in ranges])[0]
            port = rnd.randint(a, b)
            if port_is_free(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

