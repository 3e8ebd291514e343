"""The broker interface: how nodes share room messages, history, users and presence.

Two implementations: :class:`~gateway.broker.memory.MemoryBroker` (one node, the default)
and :class:`~gateway.broker.redis.RedisBroker` (many nodes). The gateway calls the broker
once per room message per node, never per recipient; the broker calls back into the
:class:`BrokerHandler` to deliver to local members through the engine.
"""

from __future__ import annotations

import abc
import bisect
from dataclasses import dataclass, field
from typing import Any, Protocol


class BrokerError(RuntimeError):
    """The broker could not do what was asked (e.g. Redis is unreachable)."""


@dataclass(slots=True)
class PublishResult:
    """``seq`` is 0 for messages that are not recoverable."""

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
    """Per-room history settings, from the matching route."""

    size: int = 50
    ttl: float = 300.0


class BrokerHandler(Protocol):
    """Where a broker delivers what arrives for this node."""

    def deliver_room(self, room: str, payload: bytes, prio: int) -> int:
        """Queue a complete frame to the local members of ``room``; returns their count."""

    def deliver_user(self, user: str, payload: bytes, prio: int) -> int:
        """Queue a complete frame to the local connections of ``user``."""

    def control(self, kind: str, data: dict[str, Any]) -> None:
        """Apply a cluster-wide command locally (kick, mute, ban, close_room, broadcast)."""


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

    def observe_lag(self, seconds: float) -> None:
        self.lag_buckets[bisect.bisect_left(LAG_BUCKETS, seconds)] += 1
        self.lag_sum += seconds


class Broker(abc.ABC):
    """Contract shared by every implementation. All methods run on the event loop."""

    stats: BrokerStats

    @property
    def presence(self) -> Any:
        from ._compat import Presence

        return Presence(self)

    @property
    def debounce(self) -> Any:
        from ._compat import Debounce

        return Debounce(self)

    async def command(self, cmd: Any) -> None:
        from ._compat import as_control

        await self.control(*as_control(cmd))

    async def moderation(self) -> list[Any]:
        return []

    @abc.abstractmethod
    async def start(self, handler: BrokerHandler, node_id: str) -> None:
        """Connect and start delivering to ``handler``. May raise :class:`BrokerError`."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop delivering and release connections. Idempotent."""

    @property
    def ready(self) -> bool:
        """True while the broker can serve cross-node traffic."""
        return True

    @abc.abstractmethod
    async def publish(self, room: str, head: bytes, tail: bytes, prio: int, recoverable: bool, history: HistoryPolicy) -> PublishResult:
        """Publish one room message (see :func:`gateway.protocol.message_parts`).

        Ordering: messages of one room are delivered in ``seq`` order on every node.
        Delivery: exactly once to each node that has members of the room, including this
        one, while the broker is healthy; at most once otherwise (no retries).
        Recoverable messages get the next ``seq`` of the room and are kept in its history
        (``history.size`` messages for ``history.ttl`` seconds); others get ``seq`` 0.
        Failure: raises :class:`BrokerError` after still delivering to local members, so a
        broken broker never silences a node's own rooms.
        """

    @abc.abstractmethod
    async def publish_frame(self, room: str, frame: bytes, prio: int) -> None:
        """Deliver a complete frame (presence, system notices) to the room's members on
        every node: no sequence number, no history, at most once."""

    @abc.abstractmethod
    async def history(self, room: str, *, limit: int, since: int | None = None, epoch: str | None = None) -> HistoryResult:
        """Last ``limit`` messages, or (with ``since``) the messages after ``since`` in
        ``epoch``, with ``recovered`` telling whether the gap could be filled entirely."""

    @abc.abstractmethod
    async def subscribe(self, room: str) -> None:
        """This node has members in ``room``: receive its messages. Called on each
        connection's first join of the room (so a joiner can wait for a subscription
        another joiner started), hence idempotent and cheap when already subscribed;
        returns once the room's messages reach this node, so a history read after it
        leaves no gap. Implementations may batch."""

    @abc.abstractmethod
    async def unsubscribe(self, room: str) -> None:
        """The last local member left ``room``: stop receiving its messages."""

    @abc.abstractmethod
    async def send_user(self, user: str, payload: bytes, prio: int) -> None:
        """Deliver a frame to every connection of ``user`` on every node (at most once)."""

    @abc.abstractmethod
    async def control(self, kind: str, data: dict[str, Any]) -> None:
        """Run a command on every node, this one included (at most once per node)."""

    @abc.abstractmethod
    async def report_presence(self, counts: dict[str, tuple[int, int]]) -> None:
        """Publish this node's (connections, users) per room; entries expire if not renewed."""

    async def report_members(self, members: dict[str, list[dict[str, Any]]]) -> None:
        """Publish this node's member list of each small room (``{"user", "meta"}`` per
        connection); like presence, entries expire if not renewed. Default: not shared."""
        return None

    async def members(self, room: str) -> list[dict[str, Any]] | None:
        """Members of a small room on every live node (each entry also names its ``node``),
        or None when this broker does not share member lists (use the local engine)."""
        return None

    @abc.abstractmethod
    async def presence_counts(self, room: str) -> tuple[int, int]:
        """(connections, users) in ``room`` summed over live nodes. Users are summed per
        node, so a user connected on two nodes counts twice (approximate by design)."""
