"""Join/leave/connect/disconnect notifications, debounced across nodes by the broker.

``after_join``/``after_connect`` run once per real change and ``on_leave``/
``on_disconnect`` once per real leave: with the Redis broker a user's second connection,
or a reconnect within ``broker.leave_grace`` on any node, is no change. With the memory
broker every join and leave on the node counts. The same real joins and leaves go to the
outbox when an endpoint asked for ``join``/``leave`` events.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..broker import Broker, BrokerError
from .hooks import Hooks
from .tasks import Tasks

if TYPE_CHECKING:
    from .outbox import Outbox
    from .session import Client

__all__ = ["Members"]


class Members:
    def __init__(self, broker: Broker, hooks: Hooks, tasks: Tasks, outbox: Outbox | None = None) -> None:
        self.broker = broker
        self.hooks = hooks
        self.tasks = tasks
        self.outbox = outbox
        # Joins in flight, so a leave of the same (room, user) is counted after its join.
        self._pending: dict[tuple[str | None, str], asyncio.Future[Any]] = {}

    @property
    def counts_rooms(self) -> bool:
        """Whether room joins are counted (:meth:`joined`): a hook or the outbox listens."""
        ob = self.outbox
        return self.hooks.has("on_leave", "after_join") or (ob is not None and (ob.wants("join") or ob.wants("leave")))

    def _outbox_wants_leave(self) -> bool:
        return self.outbox is not None and self.outbox.wants("leave")

    @property
    def grace(self) -> float:
        """Seconds a leave may wait before it is reported (a reconnect cancels it)."""
        return self.broker.debounce.grace

    def joined(self, room: str | None, client: Client) -> None:
        """Count ``client`` in ``room`` (None: connected), in the background, and run
        ``after_join``/``after_connect`` when it is a real change; a later leave of the
        same (room, user) waits for it."""
        key = (room, client.user)
        task = asyncio.ensure_future(self._join(room, client))
        self._pending[key] = task
        self.tasks.keep(task)
        task.add_done_callback(lambda t: self._pending.pop(key) if self._pending.get(key) is t else None)

    async def _join(self, room: str | None, client: Client) -> None:
        try:
            real = await self.broker.debounce.join(room, client.user)
        except BrokerError:
            real = True  # Redis unreachable: report it (at least once) rather than lose it
        if real:
            if room is None:
                await self.hooks.notify("after_connect", client)
            else:
                if self.outbox is not None:
                    self.outbox.record(room, "join", user=client.user)
                await self.hooks.notify("after_join", client, room)

    async def left(self, room: str | None, user: str) -> bool:
        """Whether hooks hear of this leave (see the module docstring)."""
        pending = self._pending.get((room, user))
        if pending is not None:
            await asyncio.wait((pending,))
        try:
            return await self.broker.debounce.leave(room, user)
        except BrokerError:
            return True  # Redis unreachable: report it (at least once) rather than lose it

    def on_leave(self, client: Client, room: str) -> None:
        if self.hooks.has("on_leave") or self._outbox_wants_leave():
            self.tasks.spawn_notification(self._notify_leave(client, room))

    async def _notify_leave(self, client: Client, room: str) -> None:
        if await self.left(room, client.user):
            if self.outbox is not None:
                self.outbox.record(room, "leave", user=client.user)
            await self.hooks.notify("on_leave", client, room)

    def on_disconnect(self, client: Client, code: int, reason: str) -> None:
        if self.hooks.has("on_disconnect"):
            self.tasks.spawn_notification(self._notify_disconnect(client, code, reason))

    async def _notify_disconnect(self, client: Client, code: int, reason: str) -> None:
        if await self.left(None, client.user):
            await self.hooks.notify("on_disconnect", client, code, reason)
