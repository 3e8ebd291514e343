"""Waiting for a condition: ``eventually()`` (async) and ``eventually_sync()``, instead of
hand-written ``while time.monotonic() < deadline: ... sleep()`` loops; ``holds()`` for the
opposite (a condition that must stay true for a while)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

Condition = Callable[[], "T | Awaitable[T]"]


def _timed_out(timeout: float, what: str, last: Any) -> AssertionError:
    return AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


async def eventually(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "the condition") -> Any:
    """Call ``cond`` (a function, or one returning an awaitable) every ``interval`` seconds
    until it returns something truthy, and return that. ``AssertionError`` after
    ``timeout`` seconds; an exception raised by ``cond`` propagates at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what, value)
        await asyncio.sleep(interval)


def eventually_sync(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "the condition") -> Any:
    """:func:`eventually` for code without an event loop (fixtures, launchers, scripts)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what, value)
        time.sleep(interval)


async def holds(cond: Callable[[], Any], duration: float, interval: float = 0.05, what: str = "the condition") -> None:
    """Check ``cond`` every ``interval`` seconds for ``duration`` seconds: ``AssertionError``
    as soon as it is falsy."""
    deadline = time.monotonic() + duration
    while True:
        value = cond()
        if inspect.isawaitable(value):
            value = await value
        assert value, f"{what} stopped holding (got {value!r})"
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(interval)
