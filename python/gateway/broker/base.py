"""The broker interface: how nodes share room messages, history, users, presence,
moderation and the hook debounce.

Two implementations: :class:`~gateway.broker.memory.MemoryBroker` (one node, the default)
and :class:`~gateway.broker.redis.RedisBroker` (many nodes). The gateway calls the broker
once per room message per node, never per recipient; the broker calls back into the
:class:`BrokerHandler` to deliver to local members through the engine. The app never
needs to know which implementation it has: what differs between them is described by
:attr:`Presence.shared` and :attr:`MemberDebounce.grace`.

Everything here runs on the event loop; no method is thread-safe.
"""

from __future__ import annotations

import abc
import bisect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .commands import Command

if TYPE_CHECKING:
    from ..store import StoredMessage

#: Where a broker that keeps an archive log (:attr:`Broker.archives`) writes it: stores
#: the messages and returns once they are committed (how many the database refused as
#: malformed: those are dropped); raises on anything else (the entries are kept and
#: written again later). See :meth:`gateway.store.Store.write_archive`.
ArchiveWriter = Callable[[Sequence["StoredMessage"]], Awaitable[int]]


class BrokerError(RuntimeError):
    """The broker could not do what was asked (e.g. Redis is unreachable)."""


@dataclass(slots=True)
class PublishResult:
    """``seq`` is 0 for messages that are not recoverable. ``duplicate`` is True when the
    publish carried an idempotency key already used within ``broker.idempotency_ttl``:
    nothing was published, ``seq`` and ``epoch`` are those of the first publish."""

    seq: int
    epoch: str
    duplicate: bool = False


@dataclass(slots=True)
class HistoryResult:
    """Messages (complete ``msg`` frames, oldest first) and the room's current position.

    ``recovered`` is None for a plain "last K" request; for a resume it is True when every
    message after the client's ``seq`` in its ``epoch`` is in ``messages``.
    """

    messages: list[bytes]
    seq: int
    epoch: str
    recovered: bool | None = None


@dataclass(slots=True)
class HistoryPolicy:
    """Per-room history settings, from the matching route.

    ``floor``: for rooms whose messages are stored, the highest ``seq`` known to be
    taken (stored, or published by this node): a room the broker starts afresh (a new
    node, expired state, a Redis ``FLUSHALL``) numbers on from there instead of from 1,
    so no stored ``(room, seq)`` is reused. ``epoch``: the epoch such a fresh room takes
    (the store's, see :attr:`gateway.store.Store.epoch`), when the broker lets the caller
    choose one."""

    size: int = 50
    ttl: float = 300.0
    floor: int = 0
    epoch: str | None = None


class BrokerHandler(Protocol):
    """Where a broker delivers what arrives for this node (the gateway). Called on the
    event loop, never concurrently; none of these may block."""

    def deliver_room(self, room: str, payload: bytes, prio: int) -> int:
        """Queue a complete frame to the local members of ``room``; returns their count."""
        ...

    def deliver_user(self, user: str, payload: bytes, prio: int) -> int:
        """Queue a complete frame to the local connections of ``user``; returns their count."""
        ...

    def apply(self, cmd: Command) -> None:
        """Apply a cluster-wide command on this node (see :mod:`gateway.broker.commands`).
        Exceptions are logged by the broker and go no further."""
        ...

    def local_counts(self, room: str) -> tuple[int, int]:
        """This node's (connections, users) in ``room`` (the memory presence's answer)."""
        ...


#: Upper bounds (seconds) of the pub/sub lag histogram buckets.
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(slots=True)
class BrokerStats:
    """Counters exported as metrics."""

    publish_errors: int = 0
    reconnects: int = 0
    connected: bool = True
    extra: dict[str, float] = field(default_factory=dict)
    #: Pub/sub lag (publishing node's clock to receipt here) of room messages from other
    #: nodes: bucket counts for LAG_BUCKETS (+Inf last) and their sum in seconds.
    lag_buckets: list[int] = field(default_factory=lambda: [0] * (len(LAG_BUCKETS) + 1))
    lag_sum: float = 0.0

    #: The archive log's figures, on a node that consumes it (:meth:`Broker.consume_archive`).
    archive: ArchiveLogStats | None = None

    def observe_lag(self, seconds: float) -> None:
        self.lag_buckets[bisect.bisect_left(LAG_BUCKETS, seconds)] += 1
        self.lag_sum += seconds


@dataclass(slots=True)
class ArchiveLogStats:
    """The archive log as this node sees it (``gateway_archive_log_*``)."""

    #: Entries this node wrote to the store and acknowledged.
    written: int = 0
    #: Entries this node took over from other consumers (dead or stuck nodes).
    claimed: int = 0
    #: Failed rounds, each retried: ``redis``, ``store``, ``other``.
    errors: dict[str, int] = field(default_factory=lambda: {"redis": 0, "store": 0, "other": 0})
    #: Entries that will never be stored, by reason: ``trimmed_unread`` (trimmed by the
    #: log's MAXLEN before any node read them), ``trimmed_pending`` (trimmed after a node
    #: read them but before it acknowledged them), ``malformed``, ``refused`` (by the
    #: database).
    lost: dict[str, int] = field(default_factory=lambda: {"trimmed_unread": 0, "trimmed_pending": 0, "malformed": 0, "refused": 0})
    #: The whole log as Redis last reported it (the same on every node; -1 until known):
    #: entries no node has read yet, and entries read but not yet acknowledged.
    lag: int = -1
    pending: int = -1


class Presence(abc.ABC):
    """Room counts and member lists across nodes (``broker.presence``).

    The gateway reports this node's numbers every ``presence.interval`` and reads the
    cluster's. Every method may raise :class:`BrokerError` when the backend is
    unreachable; the gateway then falls back to its local counts and member lists.
    """

    @property
    @abc.abstractmethod
    def shared(self) -> bool:
        """True when :meth:`counts` and :meth:`members` include other nodes (so they are
        worth reading after :meth:`report`); False when they only echo this node."""

    @abc.abstractmethod
    async def report(self, counts: dict[str, tuple[int, int]]) -> None:
        """Publish this node's (connections, users) for every room it has members in.
        Rooms missing from ``counts`` no longer count for this node; entries that are
        not renewed expire (a dead node's counts vanish)."""

    @abc.abstractmethod
    async def counts(self, room: str) -> tuple[int, int]:
        """(connections, users) in ``room``: summed over live nodes when :attr:`shared`
        (users are summed per node, so a user connected to two nodes counts twice:
        approximate by design), else this node's."""

    @abc.abstractmethod
    async def report_members(self, members: dict[str, list[dict[str, Any]]]) -> None:
        """Publish this node's member list of each small room (``{"user", "meta"}`` per
        connection); like counts, entries expire if not renewed."""

    @abc.abstractmethod
    async def members(self, room: str) -> list[dict[str, Any]] | None:
        """Members of a small room on every live node (each entry also names its
        ``node``), or None when member lists are not shared: use the local engine."""


class MemberDebounce(abc.ABC):
    """Whether a join or leave is a real change for the hooks (``broker.debounce``).

    ``room`` None stands for "connected at all" (``after_connect``/``on_disconnect``).
    Each connection's join is counted once and undone by exactly one leave (the gateway
    waits for a join still in flight before counting its leave). Both may raise
    :class:`BrokerError`; the gateway then reports the change anyway (at least once).
    """

    @property
    @abc.abstractmethod
    def grace(self) -> float:
        """Seconds :meth:`leave` may wait before answering (a stopping node waits that
        long for its clients' leave notifications)."""

    @abc.abstractmethod
    async def join(self, room: str | None, user: str) -> bool:
        """A connection of ``user`` joined ``room``: True when it is the user's first
        connection there across the cluster (and not a reconnect within :attr:`grace`)."""

    @abc.abstractmethod
    async def leave(self, room: str | None, user: str) -> bool:
        """A connection of ``user`` left ``room``: True when it was the user's last one
        and the user did not come back anywhere within :attr:`grace` (then it returns
        after that wait, True on exactly one node)."""


class Broker(abc.ABC):
    """Contract shared by every implementation. All methods run on the event loop.

    Besides the methods, every broker has two parts of its own: :attr:`presence`
    (:class:`Presence`) and :attr:`debounce` (:class:`MemberDebounce`).
    """

    stats: BrokerStats
    presence: Presence
    debounce: MemberDebounce

    @abc.abstractmethod
    async def start(self, handler: BrokerHandler, node_id: str) -> None:
        """Connect and start delivering to ``handler``. A backend that cannot be reached
        yet is no error (the broker starts degraded, :attr:`ready` False, and keeps
        trying); may raise :class:`BrokerError` for a broken configuration."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop delivering and release connections. Idempotent."""

    @property
    def ready(self) -> bool:
        """True while the broker can serve cross-node traffic."""
        return True

    @property
    def archives(self) -> bool:
        """True when the broker keeps an archive log that outlives this node: a message
        :meth:`publish` is asked to ``archive`` goes into the log in the same atomic step
        that numbers and publishes it, and every node's :meth:`consume_archive` writes
        the log to the store, each entry exactly once across the nodes (a node that dies
        leaves its entries to the others). False (the default, the memory broker): the
        caller keeps archive messages itself (:meth:`gateway.store.Store.archive`, written
        behind from this node's memory)."""
        return False

    def consume_archive(self, write: ArchiveWriter) -> None:
        """Write the archive log with ``write`` (the store), from :meth:`start` until
        :meth:`close`, which finishes the batch in hand first. Called before :meth:`start`,
        on nodes that have a store. Entries are acknowledged in the log only after
        ``write`` returned; while it raises they are kept and retried. A broker that does
        not :attr:`archive <archives>` ignores it."""
        return None

    @abc.abstractmethod
    async def publish(
        self, room: str, head: bytes, tail: bytes, prio: int, recoverable: bool, history: HistoryPolicy, idem: str | None = None,
        archive: tuple[str, str | None] | None = None,
    ) -> PublishResult:
        """Publish one room message (see :func:`gateway.protocol.message_parts`).

        Ordering: messages of one room are delivered in ``seq`` order on every node.
        Delivery: exactly once to each node that has members of the room, including this
        one, while the broker is healthy; at most once otherwise (no retries).
        Recoverable messages get the next ``seq`` of the room and are kept in its history
        (``history.size`` messages for ``history.ttl`` seconds); others get ``seq`` 0.

        Idempotency: ``idem`` is an opaque key (built by the caller, unique per sender,
        e.g. user + client message id). A publish to the same room with a key used in
        the last ``broker.idempotency_ttl`` seconds, on any node, publishes nothing and
        returns the first publish's result with ``duplicate=True``. The check and the
        publish are one atomic step.

        Archive: ``archive`` is ``(route, cid)`` (the :class:`~gateway.store.StoredMessage`
        fields the frame does not carry: the matched route's pattern and the client
        message id or None) for a message the store keeps behind the publish. When
        :attr:`archives` is True and the message gets a ``seq``, the broker appends the
        numbered frame with them to its archive log, in the same atomic step as the
        numbering and the publish: a message is published and logged, or neither. A
        duplicate (see Idempotency) is not logged again. Ignored when :attr:`archives` is
        False (then the caller archives the message itself).

        Failure: raises :class:`BrokerError` after still delivering to local members, so a
        broken broker never silences a node's own rooms.
        """

    @abc.abstractmethod
    async def publish_frame(self, room: str, frame: bytes, prio: int) -> None:
        """Deliver a complete frame (presence, system notices) to the room's members on
        every node: no sequence number, no history, at most once. Delivers locally, then
        may raise :class:`BrokerError`."""

    @abc.abstractmethod
    async def history(self, room: str, *, limit: int, since: int | None = None, epoch: str | None = None) -> HistoryResult:
        """Last ``limit`` messages, or (with ``since``) the messages after ``since`` in
        ``epoch``, with ``recovered`` telling whether the gap could be filled entirely.
        May raise :class:`BrokerError`."""

    @abc.abstractmethod
    async def subscribe(self, room: str) -> None:
        """This node has members in ``room``: receive its messages. Called on each
        connection's first join of the room (so a joiner can wait for a subscription
        another joiner started), hence idempotent and cheap when already subscribed;
        returns once the room's messages reach this node, so a history read after it
        leaves no gap. Implementations may batch. Never raises: while the backend is
        unreachable it returns at once and the reconnect subscribes."""

    @abc.abstractmethod
    async def unsubscribe(self, room: str) -> None:
        """The last local member left ``room``: stop receiving its messages. Never raises."""

    @abc.abstractmethod
    async def send_user(self, user: str, payload: bytes, prio: int, idem: str | None = None) -> bool:
        """Deliver a frame to every connection of ``user`` on every node (at most once).

        ``idem``: as for :meth:`publish` (keys are scoped by ``user``); returns False,
        delivering nothing, when the key was used within ``broker.idempotency_ttl``,
        else True. Failure: delivers locally, then raises :class:`BrokerError`."""

    @abc.abstractmethod
    async def command(self, cmd: Command) -> None:
        """Run ``cmd`` on every node, this one included: applied here at once (through
        :meth:`BrokerHandler.apply`), on other nodes at most once each. Mutes and bans
        (and their lifting) are also recorded, so :meth:`moderation` returns them.

        Failure: applied locally, then raises :class:`BrokerError` (other nodes may not
        have it; commands are idempotent, so the caller may retry)."""

    @abc.abstractmethod
    async def moderation(self) -> list[Command]:
        """The :class:`~gateway.broker.commands.Mute` and
        :class:`~gateway.broker.commands.Ban` commands still in force (expired ones are
        left out), for a starting node to apply. How long they are kept depends on the
        implementation (memory: this process; Redis: until they expire or are lifted).
        May raise :class:`BrokerError`."""
