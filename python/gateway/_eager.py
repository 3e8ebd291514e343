"""Run a coroutine eagerly: synchronously until it first has to wait.

Most client messages are handled without waiting on anything (the memory broker, sync
hooks), and scheduling each in an ``asyncio.Task`` would cost more than the handling
itself. :func:`run_eager` runs the coroutine's first step at once; only if it suspends
does the rest run later, as a task.

The coroutine always runs *inside a task*: ``asyncio.current_task()`` is set during the
eager step too, so hooks may use ``asyncio.timeout()``, ``aiohttp`` requests (whose
timeouts need the current task) and cancellation exactly as in any task.

- Python 3.12+: a real ``asyncio.Task(..., eager_start=True)`` (what
  ``asyncio.eager_task_factory`` does).
- Python 3.11: a light stand-in is the current task during the first step; only if the
  coroutine suspends (or something asks the task for more than its state) is an
  :class:`_EagerTask` made, a small task implementation mirroring ``asyncio.Task``
  (stepping, waking up on the awaited future, ``cancel()`` with
  ``cancelling()``/``uncancel()``). A coroutine that finishes at once costs well under
  a microsecond more than calling it.
"""

from __future__ import annotations

import asyncio
import sys
from asyncio import events
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["is_pending", "run_eager"]

_PENDING = object()


def is_pending(result: Any) -> bool:
    """True for the placeholder :func:`run_eager` returns when the coroutine suspended."""
    return result is _PENDING


if sys.version_info >= (3, 12):  # pragma: no cover - exercised on 3.12+ only

    def run_eager(coro: Coroutine[Any, Any, T]) -> tuple[Any, asyncio.Future[T] | None]:
        """Run ``coro`` until it first suspends. Returns ``(result, None)`` if it finished
        (an exception it raised propagates), else ``(<pending>, task)`` where the task
        finishes it. Must be called with a running event loop."""
        task = asyncio.Task(coro, loop=events.get_running_loop(), eager_start=True)
        if task.done():
            return task.result(), None
        return _PENDING, task

else:
    from asyncio.tasks import _enter_task, _leave_task

    _current_tasks = asyncio.tasks._current_tasks  # type: ignore[attr-defined]  # loop -> task, read directly
    _CancelledError = asyncio.CancelledError
    _get_running_loop = events._get_running_loop
    _future_cancel = asyncio.Future.cancel
    _future_set_result = asyncio.Future.set_result
    _future_set_exception = asyncio.Future.set_exception

    class _Current:
        """What ``asyncio.current_task()`` returns while an eagerly run coroutine runs.

        Cheap to create (most coroutines finish in their first step and never need more).
        Everything a task is asked for (``cancel``, ``cancelling``/``uncancel`` as used by
        ``asyncio.timeout`` and aiohttp, ``add_done_callback``, ...) goes to the
        :class:`_EagerTask` behind it, created on first need. It stays the current task
        for every later step too, so its identity does not change.
        """

        # No __init__ and no __slots__: creating one (once per run, the hot path) costs
        # no Python call, and ``_task`` reads the class default until it is needed.
        _task: _EagerTask | None = None

        def _get_task(self) -> _EagerTask | None:
            return self._task

        def _materialize(self) -> _EagerTask:
            t = self._task
            if t is None:
                t = self._task = _EagerTask(loop=events.get_running_loop())
                t._current = self
            return t

        def __repr__(self) -> str:
            return f"<eager task {self._get_task()!r}>"

        def cancel(self, msg: Any = None) -> bool:
            return self._materialize().cancel(msg)

        def cancelling(self) -> int:
            t = self._get_task()
            return 0 if t is None else t._num_cancels_requested

        def uncancel(self) -> int:
            t = self._get_task()
            return 0 if t is None else t.uncancel()

        def done(self) -> bool:
            t = self._get_task()
            return False if t is None else t.done()

        def cancelled(self) -> bool:
            t = self._get_task()
            return False if t is None else t.cancelled()

        def get_loop(self) -> asyncio.AbstractEventLoop:
            t = self._get_task()
            return events.get_running_loop() if t is None else t.get_loop()

        def get_name(self) -> str:
            return f"eager-{id(self):x}"

        def __getattr__(self, name: str) -> Any:  # add_done_callback, result, get_coro, ...
            if name.startswith("__"):
                raise AttributeError(name)
            return getattr(self._materialize(), name)

    class _EagerTask(asyncio.Future):  # type: ignore[type-arg]
        """A task for Python 3.11 that finishes a coroutine :func:`run_eager` started.

        It behaves like ``asyncio.Task`` for the code it runs: ``cancel()`` cancels the
        future being awaited (the coroutine sees ``CancelledError`` there) and
        ``cancelling()``/``uncancel()`` keep the count that ``asyncio.timeout()`` relies
        on. While it steps the coroutine, its :class:`_Current` is the current task.
        """

        # Class-level defaults: creating one costs no Python-level __init__.
        _coro: Coroutine[Any, Any, Any] | None = None
        _current: _Current
        _fut_waiter: asyncio.Future[Any] | None = None
        _must_cancel = False
        _cancel_message: Any = None
        _num_cancels_requested = 0

        def __repr__(self) -> str:
            state = "done" if self.done() else "pending"
            return f"<_EagerTask {state} coro={self._coro!r}>"

        # ---- the Task API that coroutines and asyncio helpers use ----

        def get_coro(self) -> Coroutine[Any, Any, Any] | None:
            return self._coro

        def get_name(self) -> str:
            return self._current.get_name()

        def cancel(self, msg: Any = None) -> bool:
            if self.done():
                return False
            self._num_cancels_requested += 1
            if self._fut_waiter is not None and self._fut_waiter.cancel(msg=msg):
                # The coroutine sees CancelledError when it wakes up on that future.
                return True
            self._must_cancel = True
            self._cancel_message = msg
            return True

        def cancelling(self) -> int:
            return self._num_cancels_requested

        def uncancel(self) -> int:
            if self._num_cancels_requested > 0:
                self._num_cancels_requested -= 1
            return self._num_cancels_requested

        # ---- stepping ----

        def _step(self, exc: BaseException | None = None) -> None:
            if self.done() or self._coro is None:
                return
            if self._must_cancel:
                if not isinstance(exc, _CancelledError):
                    exc = _CancelledError(self._cancel_message) if self._cancel_message is not None else _CancelledError()
                self._must_cancel = False
            self._fut_waiter = None
            loop = self.get_loop()
            cur = self._current
            prev = _current_tasks.get(loop)
            if prev is not None:
                _leave_task(loop, prev)
            _enter_task(loop, cur)  # type: ignore[arg-type]
            try:
                result = self._coro.send(None) if exc is None else self._coro.throw(exc)
            except StopIteration as stop:
                if self._must_cancel:  # cancelled while running its last step
                    self._must_cancel = False
                    _future_cancel(self, msg=self._cancel_message)
                else:
                    _future_set_result(self, stop.value)
            except _CancelledError as e:
                _future_cancel(self, msg=e.args[0] if e.args else None)
            except (KeyboardInterrupt, SystemExit) as e:
                _future_set_exception(self, e)
                raise
            except BaseException as e:
                _future_set_exception(self, e)
            else:
                self._suspended_on(result)
            finally:
                _leave_task(loop, cur)  # type: ignore[arg-type]
                if prev is not None:
                    _enter_task(loop, prev)

        def _suspended_on(self, result: Any) -> None:
            loop = self.get_loop()
            blocking = getattr(result, "_asyncio_future_blocking", None)
            if blocking is not None:
                if result.get_loop() is not loop:
                    loop.call_soon(self._step, RuntimeError(f"Task {self!r} got Future {result!r} attached to a different loop"))
                elif blocking:
                    if result is self:
                        loop.call_soon(self._step, RuntimeError(f"Task cannot await on itself: {self!r}"))
                        return
                    result._asyncio_future_blocking = False
                    result.add_done_callback(self._wakeup)
                    self._fut_waiter = result
                    if self._must_cancel and result.cancel(msg=self._cancel_message):
                        self._must_cancel = False
                else:
                    loop.call_soon(self._step, RuntimeError(f"yield was used instead of yield from in task {self!r} with {result!r}"))
            elif result is None:
                loop.call_soon(self._step)  # a bare yield (asyncio.sleep(0))
            else:
                loop.call_soon(self._step, RuntimeError(f"Task got bad yield: {result!r}"))

        def _wakeup(self, fut: asyncio.Future[Any]) -> None:
            try:
                fut.result()
            except BaseException as exc:
                self._step(exc)
            else:
                self._step()

    def run_eager(coro: Coroutine[Any, Any, T]) -> tuple[Any, asyncio.Future[T] | None]:
        """Run ``coro`` until it first suspends. Returns ``(result, None)`` if it finished
        (an exception it raised propagates), else ``(<pending>, task)`` where the task
        finishes it. Must be called with a running event loop."""
        loop = _get_running_loop()
        if loop is None:
            raise RuntimeError("run_eager() needs a running event loop")
        cur = _Current()
        prev = _current_tasks.get(loop)
        if prev is not None:
            _leave_task(loop, prev)
        _enter_task(loop, cur)  # type: ignore[arg-type]
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            task = cur._task
            if task is None:
                return stop.value, None
            # Something holds on to the task (a done callback, a cancel): settle it.
            if task._must_cancel:
                _future_cancel(task, msg=task._cancel_message)
                raise _CancelledError() from None
            _future_set_result(task, stop.value)
            return stop.value, None
        except BaseException as e:
            task = cur._task
            if task is not None and not task.done():
                if isinstance(e, _CancelledError):
                    _future_cancel(task)
                else:
                    _future_set_exception(task, e)
                    task.exception()  # raised to the caller: retrieved
            raise
        finally:
            _leave_task(loop, cur)  # type: ignore[arg-type]
            if prev is not None:
                _enter_task(loop, prev)
        task = cur._materialize()
        task._coro = coro
        task._suspended_on(yielded)
        return _PENDING, task
