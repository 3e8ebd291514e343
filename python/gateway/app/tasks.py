"""Background work of one node: tasks run eagerly, kept until done, cancelled at stop."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable
from typing import Any

from .._eager import run_eager

__all__ = ["Tasks"]

log = logging.getLogger("gateway")


class Tasks:
    """Runs coroutines eagerly (to their first real suspension, without a task when they
    finish at once) and keeps the ones that suspend, so :meth:`cancel_all` can end them.

    Notifications (leave and disconnect hooks) are tracked apart: :meth:`settle` gives
    them time to finish at stop.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()
        self._notifications: set[asyncio.Future[Any]] = set()

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Future[Any] | None:
        """Run ``coro`` now; returns its task if it suspended, else None."""
        _, task = run_eager(coro) if inspect.iscoroutine(coro) else (None, asyncio.ensure_future(coro))
        if task is not None:
            self.keep(task)
        return task

    def keep(self, task: asyncio.Future[Any]) -> None:
        """Track ``task`` (its failure is logged; it is cancelled at stop)."""
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def start(self, coro: Awaitable[Any]) -> asyncio.Future[Any]:
        """A long-running task (a loop), not run eagerly."""
        task = asyncio.ensure_future(coro)
        self.keep(task)
        return task

    def spawn_notification(self, coro: Awaitable[Any]) -> None:
        """A leave/disconnect notification: :meth:`settle` waits for these at stop."""
        task = self.spawn(coro)
        if task is not None:
            self._notifications.add(task)
            task.add_done_callback(self._notifications.discard)

    async def settle(self, timeout: float) -> None:
        """Wait up to ``timeout`` for pending notifications."""
        if self._notifications:
            await asyncio.wait(list(self._notifications), timeout=timeout)

    def cancel_all(self) -> None:
        for t in list(self._tasks):
            t.cancel()

    def _done(self, t: asyncio.Future[Any]) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("background task failed", exc_info=t.exception())
