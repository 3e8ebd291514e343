"""Run a coroutine eagerly: synchronously until it first has to wait.

Most client messages are handled without waiting on anything (the memory broker, sync
hooks), and wrapping each in an ``asyncio.Task`` would cost more than the handling itself.
:func:`run_eager` steps the coroutine once; only if it suspends is the rest driven by a
task. This is what ``asyncio.eager_task_factory`` does on Python 3.12+.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_PENDING = object()


def run_eager(coro: Coroutine[Any, Any, T]) -> tuple[Any, asyncio.Future[T] | None]:
    """Step ``coro``. Returns ``(result, None)`` if it finished without suspending (an
    exception it raised propagates), else ``(_PENDING, task)`` where the task finishes it."""
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return stop.value, None
    return _PENDING, asyncio.ensure_future(_drive(coro, yielded))


async def _drive(coro: Coroutine[Any, Any, T], yielded: Any) -> T:
    """Finish a coroutine that was stepped by hand and suspended on ``yielded``."""
    while True:
        exc: BaseException | None = None
        try:
            if yielded is None:
                await asyncio.sleep(0)  # a bare yield: let the loop run once
            else:
                # The coroutine is waiting on this future: wait for it on its behalf.
                yielded._asyncio_future_blocking = False
                await asyncio.wait([yielded])
        except BaseException as e:  # cancellation of the driving task
            exc = e
        try:
            yielded = coro.throw(exc) if exc is not None else coro.send(None)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


def is_pending(result: Any) -> bool:
    return result is _PENDING
