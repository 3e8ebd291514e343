"""What plugins see and return: :class:`Plugin`, :class:`Message`, :data:`DROP`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..protocol.codes import Priority

if TYPE_CHECKING:
    from .node import Gateway
    from .session import Client

__all__ = ["DROP", "HOOKS", "MemberChange", "Message", "Plugin"]

#: Returned by an ``on_message`` hook: drop the message silently (the sender still gets an ack).
DROP: Any = object()

#: Every hook name, in the order a connection meets them.
HOOKS = (
    "on_connect", "on_join", "on_message", "on_leave", "on_disconnect", "after_publish", "after_connect", "after_join", "on_member",
    "on_request", "on_media",
)


@dataclass(slots=True)
class Message:
    """A client message on its way into a room. Hooks may change ``data``, ``type`` and
    ``priority``, or set ``rooms`` to re-route it (to one or several rooms).

    ``after_publish`` gets it with ``room`` = the room the result belongs to: for a
    re-routed message, a copy per target with ``room`` set to that target (``rooms``
    still lists every target); otherwise the message itself. ``cid`` is the client's
    message id (idempotency key), when it sent one."""

    room: str
    type: str
    data: Any
    sender: Client | None
    priority: int = int(Priority.NORMAL)
    rooms: list[str] | None = None
    cid: str | None = None


@dataclass(slots=True, frozen=True)
class MemberChange:
    """A client asks to change a conversation's members (``on_member``): ``action`` is
    ``"create"`` (a new group: ``users`` its members besides the creator, ``meta`` its
    JSON object), ``"invite"`` (add ``users``) or ``"remove"`` (``users``: the one
    removed; the client itself when it leaves). ``kind``: the conversation's kind."""

    room: str
    kind: str
    action: str
    users: tuple[str, ...]
    meta: bytes = b"{}"


class Plugin:
    """Base class for plugins. Override any hook; each may be sync or ``async``.

    - ``on_connect(req, identity)``: return an :class:`~gateway.Identity` (replace), None
      (keep) or raise :class:`~gateway.Reject` (refused with ``status``).
    - ``on_join(client, room)``: return False or raise :class:`~gateway.Reject` to deny.
    - ``on_message(client, msg)``: return None (as is), a :class:`Message` (modified),
      :data:`DROP`, or raise :class:`~gateway.Reject`. Set ``msg.rooms`` to re-route.
    - ``on_leave(client, room)``, ``on_disconnect(client, code, reason)``: notifications
      (``client.rooms`` in ``on_disconnect``: the rooms it was in when it closed).
    - ``after_publish(msg, result)``: after a message was published (``result.seq``), once
      per target room, with ``msg.room`` = that room.
    - ``after_join(client, room)``, ``after_connect(client)``: once per real change (with
      the Redis broker, debounced across nodes).
    - ``on_member(client, change)``: a client creates a group, invites or removes members
      (a :class:`MemberChange`, after the route's rules allowed it): return False or
      raise :class:`~gateway.Reject` to deny. The HTTP API does not run it.
    - ``on_media(info)``: a file was uploaded (a :class:`~gateway.media.MediaInfo` with a
      short-lived ``url``): return ``"risky"`` (the file is deleted; a message that
      carries it is recalled), ``"pass"``, or None when the verdict comes later (call
      ``gateway.media.verdict(file_id, "risky")``, or ``POST /v1/media/{id}/verdict``).
      Runs after the upload was answered, under ``hooks.timeout``.
    - ``on_request(client, op, msg)``: answers the client ops named in :attr:`ops` (ops
      the protocol does not define, e.g. ``"cs.open"``; ``msg`` is the request object).
      Return a dict (the fields of the ``ack``), None (an empty ``ack``), or raise
      :class:`~gateway.Reject` (an ``error`` frame with its code). The engine's rate limit
      and size cap apply as to every op, and ``hooks.timeout`` (error 4080).

    ``setup(gateway)`` runs once at start (async allowed) and ``teardown()`` at stop.
    Settings: ``gateway.config.plugins.get(self.name, {})`` (the ``[plugins.<name>]``
    table); metrics: ``gateway.counter(...)`` / ``gauge`` / ``histogram``.
    """

    name = "plugin"
    #: Client ops :meth:`on_request` answers (see the class docstring).
    ops: tuple[str, ...] = ()
    #: Room-name prefixes the room hooks (``on_join``, ``on_message``, ``on_leave``,
    #: ``after_join``, ``after_publish``) are called for, e.g. ``("cs:",)``; None: every
    #: room. A plugin about some rooms costs nothing on the others' messages.
    rooms: tuple[str, ...] | None = None

    def setup(self, gateway: Gateway) -> Any:
        return None

    def teardown(self) -> Any:
        return None
