"""The eager coroutine runner (gateway._eager): synchronous completion, suspension, errors,
cancellation, and that coroutines always run inside a task (asyncio.timeout, aiohttp).

Plain functions driving their own loops, so this file also runs without pytest-asyncio
(``python -m pytest`` on other Python versions)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from gateway._eager import is_pending, run_eager

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]

LOOPS = ["asyncio"] + (["uvloop"] if uvloop is not None else [])


def run(kind: str, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    if kind == "uvloop":
        return uvloop.run(main())
    return asyncio.run(main())


def from_callback(coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Coroutine[Any, Any, Any]:
    """Run ``run_eager(coro_fn())`` from a plain loop callback (no current task), as the
    gateway does from its reader callback; return (value, task) via a future."""

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def cb() -> None:
            try:
                fut.set_result(run_eager(coro_fn()))
            except BaseException as e:
                fut.set_exception(e)

        loop.call_soon(cb)
        return await fut

    return main()


@pytest.mark.parametrize("kind", LOOPS)
def test_completes_synchronously(kind: str) -> None:
    trace: list[str] = []

    async def work() -> int:
        trace.append("ran")
        return 42

    async def main() -> None:
        value, task = run_eager(work())
        assert (value, task) == (42, None)
        assert trace == ["ran"], "ran before run_eager returned"
        value, task = await from_callback(work)
        assert (value, task) == (42, None)

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_exception_before_suspending_propagates(kind: str) -> None:
    async def bad() -> None:
        raise KeyError("nope")

    async def main() -> None:
        with pytest.raises(KeyError):
            run_eager(bad())
        with pytest.raises(KeyError):
            await from_callback(bad)

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_suspending_coroutine_finishes_in_a_task(kind: str) -> None:
    trace: list[str] = []

    async def work() -> str:
        trace.append("first step")
        await asyncio.sleep(0.01)
        trace.append("second step")
        await asyncio.sleep(0)  # a bare yield
        trace.append("third step")
        return "done"

    async def main() -> None:
        value, task = await from_callback(work)
        assert is_pending(value) and task is not None
        assert trace == ["first step"]
        assert await task == "done"
        assert trace == ["first step", "second step", "third step"]
        assert task.done() and task.result() == "done"

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_exception_after_suspending_is_the_tasks(kind: str) -> None:
    async def work() -> None:
        await asyncio.sleep(0.01)
        raise ValueError("late")

    async def main() -> None:
        _, task = await from_callback(work)
        assert task is not None
        with pytest.raises(ValueError, match="late"):
            await task
        assert isinstance(task.exception(), ValueError)

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_current_task_is_set_from_the_first_step(kind: str) -> None:
    seen: list[Any] = []

    async def work() -> None:
        seen.append(asyncio.current_task())
        await asyncio.sleep(0.01)
        seen.append(asyncio.current_task())

    async def main() -> None:
        _, task = await from_callback(work)
        await task
        assert seen[0] is not None and seen[0] is seen[1], "one task identity for every step"
        assert seen[0].cancelling() == 0 and seen[0].done(), "it reflects the task"

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_asyncio_timeout_in_the_first_step(kind: str) -> None:
    async def quick() -> str:
        async with asyncio.timeout(1):
            await asyncio.sleep(0.01)
        return "in time"

    async def slow() -> str:
        try:
            async with asyncio.timeout(0.05):
                await asyncio.sleep(10)
        except TimeoutError:
            return "timed out"
        return "no"

    async def main() -> None:
        for fn, expected in ((quick, "in time"), (slow, "timed out")):
            _, task = await from_callback(fn)
            assert task is not None
            assert await asyncio.wait_for(task, 5) == expected
            assert task.cancelling() == 0

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_wait_for_and_nested_tasks(kind: str) -> None:
    async def inner() -> int:
        await asyncio.sleep(0.01)
        return 7

    async def outer() -> int:
        # A nested eager run inside an eager run (hooks inside message handling).
        value, task = run_eager(inner())
        assert task is not None
        got = await asyncio.wait_for(task, 5)
        return got + await asyncio.wait_for(inner(), 5)

    async def main() -> None:
        before = asyncio.current_task()
        _, task = await from_callback(outer)
        assert await task == 14
        value, task2 = run_eager(outer())  # from inside a task: the task is restored after
        assert asyncio.current_task() is before
        assert await task2 == 14

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_cancel_while_suspended(kind: str) -> None:
    trace: list[str] = []
    blocker: asyncio.Future[None] | None = None

    async def work() -> None:
        nonlocal blocker
        blocker = asyncio.get_running_loop().create_future()
        try:
            await blocker
        except asyncio.CancelledError:
            trace.append("cancelled inside")
            raise

    async def main() -> None:
        _, task = await from_callback(work)
        assert task is not None and blocker is not None
        assert task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
        assert blocker.cancelled(), "the awaited future is cancelled, as a Task does"
        assert trace == ["cancelled inside"]

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_coroutine_may_swallow_cancellation(kind: str) -> None:
    async def work() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            await asyncio.sleep(0.01)
            return "recovered"
        return "slept"

    async def main() -> None:
        _, task = await from_callback(work)
        assert task is not None
        await asyncio.sleep(0.01)
        task.cancel()
        assert await task == "recovered"

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_asyncio_wait_with_timeout_on_an_eager_task(kind: str) -> None:
    """How the gateway applies hook timeouts."""

    async def slow() -> None:
        await asyncio.sleep(10)

    async def main() -> None:
        _, task = await from_callback(slow)
        assert task is not None
        done, pending = await asyncio.wait((task,), timeout=0.05)
        assert not done and pending == {task}
        task.cancel()
        await asyncio.sleep(0.01)
        assert task.cancelled()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_gather_and_shield_inside(kind: str) -> None:
    async def work() -> list[int]:
        async def one(i: int) -> int:
            await asyncio.sleep(0.001 * i)
            return i

        res = await asyncio.gather(*(one(i) for i in range(5)))
        res.append(await asyncio.shield(one(9)))
        return res

    async def main() -> None:
        _, task = await from_callback(work)
        assert task is not None
        assert await task == [0, 1, 2, 3, 4, 9]

    run(kind, main)
