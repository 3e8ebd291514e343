"""The hook registry and the one way hooks are called: sync or async, with the
``hooks.timeout`` deadline, counted and timed, and chained with the timeout fallback."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .._eager import run_eager
from ..config import HooksConfig
from ..errors import HookTimeout, Reject
from ..protocol.requests import BUILTIN_OPS, is_op_name
from .plugins import DROP, HOOKS, Plugin
from .stats import Stats

__all__ = ["Hooks"]

log = logging.getLogger("gateway")

T = TypeVar("T")
Hook = Callable[..., Any]


def _consume_result(t: asyncio.Future[Any]) -> None:
    """Done callback for abandoned tasks (timed-out hooks): retrieve the outcome so
    asyncio does not log "exception was never retrieved"."""
    if not t.cancelled():
        t.exception()


class Hooks:
    """Hook functions by name, in registration (plugin) order."""

    def __init__(self, cfg: HooksConfig, stats: Stats) -> None:
        self.cfg = cfg
        self.stats = stats
        self._fns: dict[str, list[Hook]] = {h: [] for h in HOOKS if h != "on_request"}
        #: Plugin ops: op name -> its ``on_request(client, op, msg)``.
        self.ops: dict[str, Hook] = {}

    def add(self, name: str, fn: Hook) -> Hook:
        if name == "on_request":
            raise ValueError("on_request answers named ops: register it with gateway.op(name) or Plugin.ops")
        if name not in self._fns:
            raise ValueError(f"unknown hook {name!r} (hooks: {', '.join(HOOKS)})")
        self._fns[name].append(fn)
        return fn

    def add_op(self, op: str, fn: Hook) -> Hook:
        """Make ``fn(client, op, msg)`` the answer to client op ``op``. Raises ValueError
        for a name the protocol uses, one that is not an op name, or one already taken."""
        if op in BUILTIN_OPS:
            raise ValueError(f"op {op!r} is part of the protocol; pick another name (e.g. 'myplugin.{op}')")
        if not is_op_name(op):
            raise ValueError(f"op {op!r} is not an op name (lower-case words joined by dots, e.g. 'cs.open')")
        if op in self.ops:
            raise ValueError(f"op {op!r} is answered by two plugins")
        self.ops[op] = fn
        return fn

    def add_plugin(self, plugin: Plugin) -> None:
        """Register every hook method ``plugin`` defines, and its ops."""
        for h in self._fns:
            fn = getattr(plugin, h, None)
            if fn is not None and callable(fn):
                self._fns[h].append(fn)
        ops = getattr(plugin, "ops", ())
        if ops:
            fn = getattr(plugin, "on_request", None)
            if fn is None or not callable(fn):
                raise ValueError(f"plugin {plugin.name!r} names ops but has no on_request")
            for op in ops:
                self.add_op(op, fn)

    def has(self, *names: str) -> bool:
        """Whether any of ``names`` has a hook (skips work nobody listens to)."""
        return any(self._fns.get(n) for n in names)

    async def call(self, hook: str, fn: Hook, *args: Any) -> Any:
        """Call one hook, sync or async, with the configured timeout for async ones.
        Raises what the hook raised, or :class:`HookTimeout`."""
        st = self.stats
        st.hook_calls[hook] += 1
        t0 = time.perf_counter()
        try:
            r = fn(*args)
            if inspect.isawaitable(r):
                if inspect.iscoroutine(r):
                    value, task = run_eager(r)
                else:
                    value, task = None, asyncio.ensure_future(r)
                if task is not None:
                    # Not asyncio.wait_for: it waits for the cancelled hook to finish
                    # unwinding, so a hook that ignores cancellation would never time out.
                    try:
                        done, _ = await asyncio.wait((task,), timeout=self.cfg.timeout)
                    except asyncio.CancelledError:
                        task.cancel()
                        raise
                    if not done:
                        task.cancel()
                        task.add_done_callback(_consume_result)
                        st.hook_timeouts[hook] += 1
                        log.warning("hook %s (%s) timed out after %.1fs", hook, getattr(fn, "__qualname__", fn), self.cfg.timeout)
                        raise HookTimeout(hook)
                    value = task.result()
                r = value
            return r
        except (Reject, HookTimeout):
            raise
        except Exception:
            st.hook_errors[hook] += 1
            log.exception("hook %s failed", hook)
            raise
        finally:
            st.observe_hook(hook, time.perf_counter() - t0)

    async def chain(self, hook: str, head: Any, subject: T, apply: Callable[[T, Any], T]) -> T:
        """Run every ``hook`` as ``fn(head, subject)``; ``apply(subject, result)`` gives
        the subject the next hook sees (or raises to refuse). Stops early when it
        returns :data:`DROP`. A timed-out hook is skipped when ``hooks.fallback`` is
        ``allow``; otherwise :class:`HookTimeout` propagates."""
        for fn in self._fns[hook]:
            try:
                r = await self.call(hook, fn, head, subject)
            except HookTimeout:
                if self.cfg.fallback == "allow":
                    continue
                raise
            subject = apply(subject, r)
            if subject is DROP:
                break
        return subject

    async def notify(self, hook: str, *args: Any) -> None:
        """Run a notification hook (``on_leave``, ``after_publish``, ...): failures are
        counted and logged by :meth:`call`; notifications cannot refuse anything."""
        for fn in self._fns[hook]:
            try:
                await self.call(hook, fn, *args)
            except Exception:
                pass
