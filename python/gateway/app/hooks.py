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

__all__ = ["Hooks", "consume_result"]

log = logging.getLogger("gateway")

T = TypeVar("T")
Hook = Callable[..., Any]


def consume_result(t: asyncio.Future[Any]) -> None:
    """Done callback for abandoned tasks (timed-out hooks, desk ops answered early):
    retrieve the outcome so asyncio does not log "exception was never retrieved"."""
    if not t.cancelled():
        t.exception()


#: Hooks about one room, which a plugin may limit to some rooms (``Plugin.rooms``).
ROOM_HOOKS = ("on_join", "on_message", "on_leave", "after_join", "after_publish")


def _room_of(hook: str, args: tuple[Any, ...]) -> str:
    """The room a room hook's call is about: ``(client, room)`` or ``(client, msg)`` or
    ``(msg, result)``."""
    if hook == "after_publish":
        return str(args[0].room)
    x = args[1]
    return x if isinstance(x, str) else str(x.room)


class Hooks:
    """Hook functions by name, in registration (plugin) order."""

    def __init__(self, cfg: HooksConfig, stats: Stats) -> None:
        self.cfg = cfg
        self.stats = stats
        self._fns: dict[str, list[Hook]] = {h: [] for h in HOOKS if h != "on_request"}
        #: Per hook, in step with ``_fns``: the room prefixes a room hook is for (None: all).
        self._scopes: dict[str, list[tuple[str, ...] | None]] = {h: [] for h in self._fns}
        #: Plugin ops: op name -> its ``on_request(client, op, msg)``.
        self.ops: dict[str, Hook] = {}

    def add(self, name: str, fn: Hook, rooms: tuple[str, ...] | None = None) -> Hook:
        """Register ``fn`` for hook ``name``; ``rooms``: for a room hook (see
        :data:`ROOM_HOOKS`), the room-name prefixes it is called for (None: every room)."""
        if name == "on_request":
            raise ValueError("on_request answers named ops: register it with gateway.op(name) or Plugin.ops")
        if name not in self._fns:
            raise ValueError(f"unknown hook {name!r} (hooks: {', '.join(HOOKS)})")
        if rooms is not None and (name not in ROOM_HOOKS or isinstance(rooms, str) or not all(isinstance(p, str) and p for p in rooms)):
            raise ValueError(f"rooms must be a tuple of room-name prefixes, for room hooks only ({', '.join(ROOM_HOOKS)})")
        self._fns[name].append(fn)
        self._scopes[name].append(tuple(rooms) if rooms is not None else None)
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
        rooms = getattr(plugin, "rooms", None)
        for h in self._fns:
            fn = getattr(plugin, h, None)
            if fn is not None and callable(fn):
                self.add(h, fn, rooms if h in ROOM_HOOKS else None)
        ops = getattr(plugin, "ops", ())
        if ops:
            fn = getattr(plugin, "on_request", None)
            if fn is None or not callable(fn):
                raise ValueError(f"plugin {plugin.name!r} names ops but has no on_request")
            for op in ops:
                self.add_op(op, fn)

    def functions(self, hook: str) -> list[Hook]:
        """The functions registered for a hook without room scope (``on_media``)."""
        return list(self._fns[hook])

    def has(self, *names: str) -> bool:
        """Whether any of ``names`` has a hook (skips work nobody listens to)."""
        return any(self._fns.get(n) for n in names)

    def wants(self, hook: str, room: str) -> bool:
        """Whether a ``hook`` (a room hook) is registered for ``room``."""
        return any(scope is None or room.startswith(scope) for scope in self._scopes[hook])

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
                        task.add_done_callback(consume_result)
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
        for fn, scope in zip(self._fns[hook], self._scopes[hook], strict=True):
            if scope is not None and not _room_of(hook, (head, subject)).startswith(scope):
                continue
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
        for fn, scope in zip(self._fns[hook], self._scopes[hook], strict=True):
            if scope is not None and not _room_of(hook, args).startswith(scope):
                continue
            try:
                await self.call(hook, fn, *args)
            except Exception:
                pass
