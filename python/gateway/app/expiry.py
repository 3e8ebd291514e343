"""Token expiry on open connections: close with 4001 "token expired" at the token's
``exp`` (+ ``auth.leeway``). One timer for the node, armed at the earliest deadline."""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .._core import Engine
from ..protocol.codes import CloseCode
from .stats import Stats

if TYPE_CHECKING:
    from .session import Client

__all__ = ["TokenExpiry"]

log = logging.getLogger("gateway")


class TokenExpiry:
    """A heap of (deadline, conn), lazily cleaned, and one timer at the earliest deadline."""

    def __init__(self, clients: Mapping[int, Client], engine: Callable[[], Engine | None], leeway: float, stats: Stats) -> None:
        self.clients = clients
        self.engine = engine
        self.leeway = leeway
        self.stats = stats
        self.heap: list[tuple[float, int]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.armed_at = math.inf

    def watch(self, conn: int, expires_at: float) -> None:
        """Close ``conn`` at ``expires_at`` (+ leeway)."""
        heap = self.heap
        heapq.heappush(heap, (expires_at + self.leeway, conn))
        if len(heap) > 1024 and len(heap) > 2 * len(self.clients):
            # Entries of closed connections pile up until due: rebuild from the live ones.
            heap[:] = [(c.identity.expires_at + self.leeway, k) for k, c in self.clients.items() if c.identity.expires_at is not None]
            heapq.heapify(heap)
        if heap and heap[0][0] < self.armed_at:
            self._arm(heap[0][0])

    def _arm(self, deadline: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.armed_at = deadline
        # Re-checked at least every minute: the wall clock may be adjusted meanwhile.
        delay = min(max(0.0, deadline - time.time()), 60.0)
        self.timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self.timer = None
        self.armed_at = math.inf
        eng = self.engine()
        if eng is None:
            return
        now = time.time()
        heap = self.heap
        closed = 0
        while heap and heap[0][0] <= now:
            _, conn = heapq.heappop(heap)
            c = self.clients.get(conn)
            if c is not None and c.identity.expires_at is not None and eng.disconnect(conn, CloseCode.AUTH, "token expired"):
                closed += 1
        if closed:
            self.stats.tokens_expired += closed
            log.info("closed %d connection(s) whose token expired", closed)
        if heap:
            self._arm(heap[0][0])

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.heap.clear()
        self.armed_at = math.inf
