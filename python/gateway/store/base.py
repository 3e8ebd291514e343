"""The store interface: the company's own database, where room messages are kept for as
long as the company decides.

Two implementations: :class:`~gateway.store.sqlite.SqliteStore` (one node, the embedded
default: one file, WAL, one writer thread that group-commits, readers in a thread pool)
and :class:`~gateway.store.postgres.PostgresStore` (production and many nodes, asyncpg).
A MySQL store would implement this same class; the app never looks past it.

What the store keeps and who numbers it:

- A message is stored under ``(room, seq)``. The *broker* assigns ``seq`` (the room's
  sequence, shared by every recoverable message of the room, across nodes); the store
  never numbers anything. Rooms whose route keeps messages (``store = "archive"`` or
  ``"durable"``) continue their sequence from :meth:`Store.last_seq` when a broker starts
  them afresh (a node restart, a Redis ``FLUSHALL``). The epoch tells clients whether
  their position still holds: the memory broker uses :attr:`Store.epoch`, which stays the
  same across clean restarts and changes after a crash (messages that were sent but not
  yet written may then be numbered again); the Redis broker keeps its own per room.
- ``durable`` messages are written with :meth:`Store.commit`: the publisher's ack waits
  for it. ``archive`` messages are written behind with :meth:`Store.archive`, in batches;
  the publish never waits for them.
- ``(room, sender, cid)`` is unique when ``cid`` is set: a retried publish finds the first
  one and nothing is stored twice.

Every method runs on the event loop and never blocks it (SQLite work runs in threads,
PostgreSQL work is asynchronous I/O). Methods other than :meth:`Store.archive` raise
:class:`StoreUnavailable` when the database cannot do what was asked.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..protocol.frames import message_parts, splice

__all__ = [
    "CS_OPEN_STATES", "CS_SESSION_FIELDS", "MEDIA_FIELDS", "MEDIA_PUBLISH_GRACE_MS", "MEDIA_STATES", "SCHEMA_VERSION", "Conversation", "ConversationState", "CsSession",
    "CsTicket", "DeadLetter", "Lease", "MediaFile", "Member", "OutboxEntry", "SchemaError", "Store", "StoreStats", "StoreUnavailable", "StoredMessage",
    "TooManyMembers", "attach_refusal",
]

#: The schema this code reads and writes. ``gateway migrate`` brings a database to it; a
#: database at another version is refused at start-up (:class:`SchemaError`).
#: Version 2 added the outbox (``outbox``, ``outbox_cursors``, ``outbox_dead``) and
#: ``room_floors`` (the highest seq of a room's deleted messages). Version 3:
#: conversations (``rooms`` and ``room_members`` in use, with roles, mutes, removals and
#: read positions; ``recalls``). Version 4: the customer-service desk (``cs_sessions``,
#: ``cs_tickets``). Version 5: media (``media``: uploaded files; ``media_refs``: the
#: messages that carry them).
SCHEMA_VERSION = 5

#: Type of a recalled message (its data becomes ``{"by": user, "at": ms}``).
RECALLED = "recalled"


class StoreUnavailable(RuntimeError):
    """The database could not do what was asked (down, full, timed out). For
    :meth:`Store.commit` the message may or may not be stored: a retry with the same
    ``cid`` is safe."""


class SchemaError(RuntimeError):
    """The database's schema is not the one this code needs (run ``gateway migrate``)."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One room message as stored, enough to rebuild the ``msg`` frame clients got.

    ``data`` is the JSON text of the message's ``data`` field, as published. ``sender``
    is the publishing user, None for messages from the server (the HTTP API, plugins).
    ``cid`` is the sender's client message id or the API's ``Idempotency-Key``. ``route``
    is the pattern of the route the room matched when the message was stored (retention
    applies per route). ``ts`` is the server's time in milliseconds since the Unix epoch.
    """

    room: str
    seq: int
    ts: int
    type: str
    prio: int
    sender: str | None
    data: bytes
    cid: str | None = None
    route: str = ""

    def frame(self, epoch: str) -> bytes:
        """The ``msg`` frame, as the broker published it (``epoch``: the store's)."""
        import orjson

        head, tail = message_parts(self.room, self.type, self.prio, self.sender, orjson.Fragment(self.data), self.ts)
        return splice(head, self.seq, epoch, tail)


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One entry of the outbox log (see :meth:`Store.outbox_read`).

    ``position`` is opaque: passing it back to :meth:`Store.outbox_read` reads the entries
    after this one. ``kind`` is ``"message"`` (a stored message: ``message`` holds it,
    None when it was deleted since, by retention or an erasure request: such an entry is
    skipped), or a room event (``"join"``, ``"leave"``, ``"kick"``, ``"ban"``...) or a
    ``"replay"`` of a dead letter, whose ``body`` is the event's JSON object. ``endpoint``
    is None for entries every endpoint gets, else the only endpoint that gets it (a
    replay). ``ts``: milliseconds since the Unix epoch (the message's or the event's)."""

    position: str
    room: str
    kind: str
    ts: int
    seq: int | None = None
    message: StoredMessage | None = None
    body: bytes | None = None
    endpoint: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event an endpoint did not take (see :meth:`Store.outbox_bury`): ``event`` is the
    JSON object that was sent, ``error`` why it was given up, ``failed_at`` when (ms)."""

    id: int
    endpoint: str
    event_id: str
    room: str
    event: bytes
    error: str
    failed_at: int


class TooManyMembers(ValueError):
    """Adding members would pass the conversation's cap."""


@dataclass(frozen=True, slots=True)
class Conversation:
    """A conversation (a room whose members and messages outlive the sockets).
    ``meta``: the JSON object given at creation (name, avatar...). ``updated_at``: the
    last change other than a message (members, meta, a recall), ms."""

    room: str
    kind: str
    created_at: int
    creator: str | None = None
    meta: bytes = b"{}"
    updated_at: int = 0


@dataclass(frozen=True, slots=True)
class Member:
    """A user's membership. ``read_seq``: how far they have read. ``left_seq``: None while
    a member; once removed (or left), the conversation's last seq at that moment (they may
    still read up to it). ``muted_until``: ms, None when not muted (0: for good)."""

    room: str
    user: str
    role: str = "member"
    joined_at: int = 0
    read_seq: int = 0
    muted_until: int | None = None
    left_seq: int | None = None
    updated_at: int = 0

    @property
    def active(self) -> bool:
        return self.left_seq is None

    def muted(self, now_ms: int) -> bool:
        return self.muted_until is not None and (self.muted_until == 0 or self.muted_until > now_ms)


@dataclass(frozen=True, slots=True)
class ConversationState:
    """One entry of a user's conversation list (:meth:`Store.user_conversations`):
    ``last`` is the newest message they may read (None: none yet), ``last_seq`` its seq
    (0 without one), ``activity`` the newest of its ts, the conversation's and the
    membership's ``updated_at`` (the list's order and the sync cursor's measure);
    ``peer_read_seq``: in a ``dm``, how far the other user has read (None otherwise)."""

    conv: Conversation
    member: Member
    last_seq: int
    last: StoredMessage | None
    activity: int
    peer_read_seq: int | None = None


#: States of a desk session that count as open (a shopper has at most one).
CS_OPEN_STATES = ("bot", "queued", "assigned")


@dataclass(frozen=True, slots=True)
class CsSession:
    """A customer-service session (the desk, docs/customer-service.md): the shopper's
    conversation ``cs:<id>`` with the bot and then one agent at a time.

    ``state``: ``bot``, ``queued``, ``assigned``, ``closed`` or ``offline`` (opened
    outside business hours: nothing queued). Times are ms since the Unix epoch, None
    until they happen. ``last_agent``: the agent of the shopper's previous session when
    this one opened (for sticky assignment). ``card``: the context card's JSON text.
    ``transfers``: how often it changed agent or department; ``bot_turns``: the bot's
    answers."""

    id: str
    shopper: str
    department: str
    state: str
    opened_at: int
    agent: str | None = None
    queued_at: int | None = None
    assigned_at: int | None = None
    first_response_at: int | None = None
    closed_at: int | None = None
    closed_by: str | None = None
    last_agent: str | None = None
    rating: int | None = None
    rating_comment: str | None = None
    rated_at: int | None = None
    card: bytes = b"null"
    transfers: int = 0
    bot_turns: int = 0
    updated_at: int = 0

    @property
    def room(self) -> str:
        return f"cs:{self.id}"

    @property
    def note_room(self) -> str:
        return f"csi:{self.id}"

    @property
    def open(self) -> bool:
        return self.state in CS_OPEN_STATES


@dataclass(frozen=True, slots=True)
class CsUnread:
    """An assigned session whose shopper has unread messages from agents
    (:meth:`Store.cs_unread_replies`): ``unread`` of them (messages of ``cs:<id>`` after
    the shopper's read position with a sender other than the shopper; system messages,
    whose sender is None, do not count); ``first_seq`` and ``first_ts`` (ms) are the
    oldest one's."""

    session: CsSession
    unread: int
    first_seq: int
    first_ts: int


#: The columns of ``cs_sessions``, in :class:`CsSession` field order.
CS_SESSION_FIELDS = tuple(CsSession.__dataclass_fields__)


@dataclass(frozen=True, slots=True)
class CsTicket:
    """An offline form a shopper left (``fields``: its JSON object text)."""

    id: str
    shopper: str
    department: str
    fields: bytes
    created_at: int
    session: str | None = None


#: States of a media file: uploaded (not sent yet), attached (sent in a message at least
#: once), removed (its object is deleted; the row stays so that a late publish or link
#: gets "removed" rather than "missing").
MEDIA_STATES = ("uploaded", "attached", "removed")

#: How long (ms) after an attach the file's publish may still be on its way into the
#: store (a commit in flight, an archive message written behind, a Redis archive log
#: catching up): :meth:`Store.media_orphans` leaves a file alone until its last attach
#: and every one of its refs are older than this.
MEDIA_PUBLISH_GRACE_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class MediaFile:
    """An uploaded file (``media``, docs: the media contract).

    ``id``: ``"m_"`` + random. ``owner``: the uploader. ``kind``: ``image``, ``voice``,
    ``video`` or ``file``. ``size``: bytes of the original; ``sha256`` its hex digest.
    ``name``: the sanitised original file name (``""`` when none). ``meta``: JSON object
    text (``w``, ``h``, ``duration``, ``thumb``, ``thumb_size``...). ``key``: the object
    key of the original in the object store (the thumbnail's is ``key + ".t"``).
    ``room``: the first conversation it was attached to; ``attached_at``: its last
    attach (ms). ``state``: one of :data:`MEDIA_STATES`. ``verdict``: moderation, None
    (pending or none), ``"pass"`` or ``"risky"``. Times are ms since the Unix epoch."""

    id: str
    owner: str
    kind: str
    mime: str
    size: int
    sha256: str
    name: str
    meta: bytes
    key: str
    created_at: int
    room: str | None = None
    attached_at: int | None = None
    state: str = "uploaded"
    verdict: str | None = None

    @classmethod
    def from_row(cls, r: Any) -> MediaFile:
        """A record from a database row in :data:`MEDIA_FIELDS` order (``meta`` as text)."""
        vals = list(r)
        i = MEDIA_FIELDS.index("meta")
        vals[i] = (vals[i] or "{}").encode()
        return cls(*vals)

    @property
    def thumb_key(self) -> str:
        return self.key + ".t"


#: The columns of ``media``, in :class:`MediaFile` field order.
MEDIA_FIELDS = tuple(MediaFile.__dataclass_fields__)


class Lease(abc.ABC):
    """Leadership of a named task among every node that uses the database (the outbox
    deliverer), from :meth:`Store.lead`. Held until :meth:`release`, or until the holder
    dies (its lock goes with its process or connection)."""

    @abc.abstractmethod
    async def alive(self) -> bool:
        """Whether the lease is still held (False once the connection that holds it broke:
        another node may lead now). Never raises."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Give the lease up. Idempotent; never raises."""


#: Upper bounds (seconds) of the commit-latency histogram.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(slots=True)
class StoreStats:
    """Counters for ``/metrics`` (``gateway_store_*``); implementations update them."""

    #: Messages committed by :meth:`Store.commit` / written behind by :meth:`Store.archive`.
    committed: int = 0
    archived: int = 0
    #: Archive messages refused because the backlog was full (lost to the store).
    archive_dropped: int = 0
    #: Duplicates found by ``cid`` or ``(room, seq)``: nothing written.
    duplicates: int = 0
    #: Failed transactions.
    errors: int = 0
    #: Room events written to the outbox log / refused because the backlog was full.
    events: int = 0
    events_dropped: int = 0
    #: Transactions and the messages they carried (batch size = messages / batches).
    batches: int = 0
    batched_messages: int = 0
    #: Commit latency of :meth:`Store.commit` calls, seconds: bucket upper bounds and counts.
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def observe(self, seconds: float) -> None:
        import bisect

        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds




class Store(abc.ABC):
    """Where messages are kept. See the module docstring for who numbers what."""

    #: ``"sqlite"`` or ``"postgres"``.
    kind: str = ""

    def __init__(self) -> None:
        self.stats = StoreStats()
        #: The epoch of store-backed rooms on a memory broker, set by start(): the previous
        #: one after a clean close (everything queued was written), a new one after a
        #: crash (then seqs of messages lost with the process may be reused).
        self.epoch = ""
        #: Whether stored messages also go to the outbox log (set before :meth:`start`,
        #: when outbox endpoints are configured): an entry per new message, written in
        #: the message's own transaction.
        self.outbox = False

    # ---- lifecycle ---------------------------------------------------------------------

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect, check the schema (:class:`SchemaError` if it is not
        :data:`SCHEMA_VERSION`: the message says to run ``gateway migrate``; the embedded
        SQLite store creates its schema itself in a new file), set :attr:`epoch` (kept
        in the database with a "closed cleanly" mark that :meth:`close` sets and
        :meth:`start` clears), start the writer. Raises :class:`StoreUnavailable` if the
        database cannot be reached."""

    @abc.abstractmethod
    async def close(self, timeout: float = 5.0) -> None:
        """Write what :meth:`archive` still holds (for up to ``timeout`` seconds; what is
        left is counted in ``archive_dropped``), then disconnect."""

    @abc.abstractmethod
    async def migrate(self) -> tuple[int, int]:
        """Bring the schema to :data:`SCHEMA_VERSION` (creating it in an empty database);
        returns (version before, version after). Safe to run while other nodes use the
        database; never drops data."""

    # ---- writing -----------------------------------------------------------------------

    @abc.abstractmethod
    async def commit(self, msg: StoredMessage) -> StoredMessage:
        """Store ``msg`` durably; return once it is committed (fsync'd as the database's
        durability settings say). Concurrent calls share transactions (group commit).

        If the room already holds a message with the same ``(sender, cid)`` (``cid`` set),
        or the same ``seq``, nothing is written and the stored message is returned: its
        ``seq`` is the one to acknowledge. Raises :class:`StoreUnavailable`."""

    @abc.abstractmethod
    def archive(self, msg: StoredMessage) -> bool:
        """Queue ``msg`` to be written behind, in a batch, within a few milliseconds.
        Never blocks and never raises. False when the backlog (``store.max_backlog``) is
        full: the message is not stored (``archive_dropped``). Duplicates by ``(room,
        seq)`` or ``cid`` are skipped, so writing the same message twice is harmless."""

    async def write_archive(self, msgs: Sequence[StoredMessage]) -> int:
        """Write archive messages now and return once they are committed: the Redis
        broker's archive log (:mod:`gateway.broker.redis.archive`) acknowledges its
        entries after this, so what it hands over is never only in memory. Duplicates by
        ``(room, seq)`` or ``cid`` are skipped, so a redelivered entry is stored once. A
        message the database refuses as such (malformed) is left out and counted in
        ``archive_dropped``, as :meth:`archive` does; returns how many were. Raises
        :class:`StoreUnavailable` when they could not all be written (some may be:
        writing them again is harmless).

        This default goes through :meth:`commit` (so they count as ``committed`` and in the
        commit latency; SQLite has one writer anyway); the PostgreSQL store overrides it to
        keep them off the commit writers."""
        import asyncio

        results = await asyncio.gather(*(self.commit(m) for m in msgs), return_exceptions=True)
        refused = 0
        for r in results:
            if isinstance(r, StoreUnavailable):
                raise r
            if isinstance(r, ValueError):  # the database refused this message as such
                refused += 1
            elif isinstance(r, BaseException):
                raise r
        self.stats.archive_dropped += refused
        return refused

    @property
    @abc.abstractmethod
    def backlog(self) -> int:
        """Messages queued by :meth:`archive` (and commits in flight) not yet written."""

    # ---- reading -----------------------------------------------------------------------

    @abc.abstractmethod
    async def last_seq(self, room: str) -> int:
        """The highest ``seq`` stored for ``room`` (0 when none)."""

    @abc.abstractmethod
    async def messages(
        self, room: str, *, before_seq: int | None = None, after_seq: int | None = None, limit: int = 100,
    ) -> list[StoredMessage]:
        """Up to ``limit`` messages of ``room`` in ``seq`` order (oldest first): the newest
        ones below ``before_seq`` (paging back), or the oldest ones above ``after_seq``
        (catching up), or the newest ones when neither is given."""

    @abc.abstractmethod
    def export(
        self, *, since_ms: int, until_ms: int, room: str | None = None, sender: str | None = None, batch: int = 1000,
    ) -> AsyncIterator[StoredMessage]:
        """Every message with ``since_ms <= ts < until_ms`` (of one room, or one sender, or
        all), in (room, seq) order for one room and ``ts`` order otherwise, read in
        batches of ``batch`` so that memory stays bounded whatever the range."""

    @abc.abstractmethod
    async def search(self, text: str, *, room: str | None = None, limit: int = 50) -> list[StoredMessage]:
        """Messages whose ``data`` contains ``text`` (substring match that works for
        Chinese: at least 3 characters), newest first."""

    # ---- the data's life ---------------------------------------------------------------

    @abc.abstractmethod
    async def delete_user(self, user: str) -> int:
        """Delete every message ``user`` sent (a personal-data erasure request); returns
        how many. Runs in batches; other writes go on meanwhile.

        Media is left alone: the user's files (``media``) and the refs of the deleted
        messages (``media_refs``) stay. The media service purges a user's files itself
        (their objects first, from :meth:`media_of_user`, then :meth:`media_purge_rows`),
        and files that others sent in those messages become :meth:`media_orphans`."""

    @abc.abstractmethod
    async def expire(self, route: str, before_ms: int, batch: int = 5000) -> int:
        """Delete up to ``batch`` messages stored under ``route`` older than
        ``before_ms``; returns how many (call again while it returns ``batch``)."""

    # ---- the outbox log ----------------------------------------------------------------
    #
    # With :attr:`outbox` on, every message written (commit or archive; not a duplicate)
    # adds an entry in the same transaction, and :meth:`event` adds room events. Entries
    # are read in *log order*: an order every reader sees the same, in which an entry
    # never appears before one that precedes it (so a cursor never skips an entry that
    # commits late). A room's messages written by one writer are in seq order; messages of
    # one room written by several nodes at once may be out of seq order by a few
    # milliseconds (the deliverer reorders what it reads together, see gateway.app.outbox).

    @abc.abstractmethod
    def event(self, room: str, kind: str, body: bytes) -> bool:
        """Queue a room event for the outbox log (``body``: its JSON object, which names
        its own ``id``), written behind like :meth:`archive`. Never blocks or raises;
        False when the backlog is full or the outbox is off (``events_dropped``)."""

    @abc.abstractmethod
    async def outbox_read(self, after: str | None, limit: int) -> list[OutboxEntry]:
        """Up to ``limit`` entries after position ``after`` (None: from the oldest entry
        kept), in log order. Raises :class:`StoreUnavailable`."""

    @abc.abstractmethod
    def outbox_order(self, position: str) -> tuple[int, ...]:
        """A sort key of ``position``: positions sort in log order by it."""

    @abc.abstractmethod
    async def outbox_backlog(self, after: str | None) -> tuple[int, int]:
        """(about how many entries follow position ``after``, the ``ts`` of the first of
        them or 0 when there is none): for the outbox's lag metrics. Cheap (no count)."""

    @abc.abstractmethod
    async def outbox_cursor(self, endpoint: str) -> str | None:
        """The position up to which ``endpoint`` has been served (None: never)."""

    @abc.abstractmethod
    async def outbox_save(self, endpoint: str, position: str) -> None:
        """Remember that ``endpoint`` has been served up to ``position``, durably."""

    @abc.abstractmethod
    async def outbox_trim(self, upto: str) -> int:
        """Delete the entries up to ``upto`` (every endpoint is past them), in batches;
        returns how many."""

    @abc.abstractmethod
    async def outbox_bury(self, endpoint: str, events: Sequence[tuple[str, str, bytes]], error: str) -> None:
        """Keep ``(event id, room, event JSON)`` as dead letters of ``endpoint``."""

    @abc.abstractmethod
    async def dead_letters(self, endpoint: str, *, after_id: int = 0, limit: int = 100) -> list[DeadLetter]:
        """``endpoint``'s dead letters with ``id > after_id``, oldest first."""

    @abc.abstractmethod
    async def replay_dead(self, endpoint: str, ids: Sequence[int] | None = None) -> int:
        """Move dead letters of ``endpoint`` (those ``ids``, or all) back into the outbox
        log as ``"replay"`` entries for that endpoint alone, in one transaction; returns
        how many. Their event ids stay, so the endpoint can tell a replay from news."""

    @abc.abstractmethod
    async def lead(self, name: str) -> Lease | None:
        """Try to take the lease ``name`` among every process that uses this database;
        None when another holds it. Raises :class:`StoreUnavailable`."""

    # ---- conversations -----------------------------------------------------------------
    #
    # A conversation is a row of ``rooms`` (its kind, creator, meta) and its members'
    # rows. These are small writes, one transaction each; none of them is on the path of
    # a message (a message's commit does not touch them: a conversation's last seq is its
    # newest message's, read when a list is built).

    @abc.abstractmethod
    async def create_conversation(
        self, room: str, kind: str, creator: str | None, meta: bytes, members: Sequence[tuple[str, str]], max_members: int,
    ) -> tuple[Conversation, bool]:
        """Create ``room`` with ``members`` ((user, role) pairs), or, when it exists,
        add those of ``members`` who are not active members. Returns (the conversation,
        whether it was created). :class:`TooManyMembers` beyond ``max_members``."""

    @abc.abstractmethod
    async def conversation(self, room: str) -> Conversation | None:
        """The conversation, or None."""

    @abc.abstractmethod
    async def add_members(self, room: str, members: Sequence[tuple[str, str]], max_members: int) -> list[str]:
        """Make ``members`` active members (a removed one comes back, keeping its read
        position); returns the users who were not active members before. The
        conversation must exist (:class:`KeyError` otherwise); :class:`TooManyMembers`
        when the active members would pass ``max_members`` (nothing is added)."""

    @abc.abstractmethod
    async def remove_member(self, room: str, user: str) -> Member | None:
        """End ``user``'s membership (``left_seq`` = the room's last seq); the member row
        as it is now, or None when they were not an active member."""

    @abc.abstractmethod
    async def update_member(self, room: str, user: str, *, role: str | None = None, muted_until: int | bool | None = False) -> Member | None:
        """Change an active member's ``role`` and/or ``muted_until`` (``False``: keep; None:
        unmute). The row after, or None when not an active member."""

    @abc.abstractmethod
    async def member(self, room: str, user: str) -> Member | None:
        """``user``'s row in ``room`` (active or removed), or None."""

    @abc.abstractmethod
    async def members(self, room: str, *, offset: int = 0, limit: int = 100) -> list[Member]:
        """Active members, by join time."""

    @abc.abstractmethod
    async def member_count(self, room: str) -> int:
        """Active members."""

    @abc.abstractmethod
    async def user_rooms(self, user: str, limit: int) -> list[str]:
        """Up to ``limit`` conversations ``user`` is an active member of (the ones a
        connection is attached to): every one when there are no more than ``limit``,
        most recently changed membership (joined, read, role) first; otherwise the
        ``limit`` most recently active (by their last message), most active first.
        The common case is one index read of the memberships, with no message probe."""

    @abc.abstractmethod
    async def mark_read(self, room: str, user: str, seq: int) -> Member | None:
        """Move ``read_seq`` to ``seq`` (never back, never past the room's last seq);
        the row after, or None when ``user`` has no row."""

    @abc.abstractmethod
    async def mark_read_many(self, items: Sequence[tuple[str, str, int]]) -> None:
        """Move read positions forward for many (room, user, seq) at once, in one
        transaction, where ``seq`` is a stored message's (the app batches a sender's own
        messages, which count as read): never back, not checked against the room's last
        seq. Rows are locked in (room, user) order, so concurrent batches (several nodes)
        cannot deadlock."""

    @abc.abstractmethod
    async def recall(self, room: str, seq: int, by: str, at_ms: int) -> StoredMessage | None:
        """Replace the message's type and data by a tombstone (:data:`RECALLED`, ``{"by":
        by, "at": at_ms}``), note the recall, and mark the conversation changed. Returns
        the message as it was, or None (no such message, or already recalled)."""

    @abc.abstractmethod
    async def recalled_since(self, rooms: Sequence[str], since_ms: int) -> dict[str, list[int]]:
        """Seqs recalled after ``since_ms`` in each of ``rooms`` (rooms without: absent)."""

    @abc.abstractmethod
    async def find_cids(self, keys: Sequence[tuple[str, str | None, str]]) -> dict[tuple[str, str, str], StoredMessage]:
        """The messages stored with these ``(room, sender, cid)`` (one round trip), keyed
        by ``(room, sender or "", cid)``; keys without a message are absent."""

    @abc.abstractmethod
    async def newest_messages(self, wanted: Sequence[tuple[str, int, int]]) -> dict[str, list[StoredMessage]]:
        """For each ``(room, after_seq, limit)``: the newest ``limit`` messages with a seq
        above ``after_seq`` (oldest first), in one round trip (a sync's unread pages)."""

    @abc.abstractmethod
    async def user_conversations(
        self, user: str, *, since_ms: int = 0, limit: int = 100, before: tuple[int, str] | None = None, include_left: bool = True,
    ) -> list[ConversationState]:
        """``user``'s conversations whose ``activity`` is after ``since_ms``, most recent
        first, at most ``limit``; ``before`` = (activity, room) of the last one of the
        previous page. Removed memberships are included (``member.left_seq`` set, their
        ``last`` at most that seq) unless ``include_left`` is False."""

    # ---- the customer-service desk ------------------------------------------------------
    #
    # Sessions are rows of ``cs_sessions``: one small transaction per state change (a
    # control event, never per message). Who gets a session is arbitrated by the desk's
    # assignment engine; the store is the durable record, and its conditional updates
    # (``states``, ``agent``) make a lost race a no-op rather than a double assignment.

    @abc.abstractmethod
    async def cs_open(self, session: CsSession) -> tuple[CsSession, bool]:
        """Insert ``session`` unless its shopper has an open one (state in
        :data:`CS_OPEN_STATES`; at most one per shopper, enforced by the database).
        Returns (the shopper's open session, whether it is the new one). An ``offline``
        or ``closed`` session is always inserted."""

    @abc.abstractmethod
    async def cs_update(
        self, id: str, changes: dict[str, object], *, states: Sequence[str] | None = None, agent: str | bool | None = False,
    ) -> CsSession | None:
        """Set ``changes`` (column -> value; columns of :data:`CS_SESSION_FIELDS` except
        ``id``, ``shopper``, ``opened_at``; ``card`` as bytes) on the session, in one
        statement, only if its state is one of ``states`` (None: any) and its agent is
        ``agent`` (False: any; None: unassigned). ``updated_at`` is set to now. The row
        after, or None when there is no such session or a condition failed (nothing
        written). Raises :class:`ValueError` for an unknown column."""

    @abc.abstractmethod
    async def cs_first_response(self, id: str, at_ms: int) -> bool:
        """Set ``first_response_at`` to ``at_ms`` unless it is set; True when it was set
        now (the first agent reply of the session)."""

    @abc.abstractmethod
    async def cs_session(self, id: str) -> CsSession | None:
        """The session, or None."""

    @abc.abstractmethod
    async def cs_open_session(self, shopper: str) -> CsSession | None:
        """The shopper's open session (state in :data:`CS_OPEN_STATES`), or None."""

    @abc.abstractmethod
    async def cs_last_agent(self, shopper: str) -> str | None:
        """The agent of the shopper's most recently opened session that had one."""

    @abc.abstractmethod
    async def cs_sessions(
        self, *, states: Sequence[str] | None = None, department: str | None = None, agent: str | None = None, limit: int = 100, offset: int = 0,
    ) -> list[CsSession]:
        """Sessions in ``states`` (None: any), of ``department`` and/or ``agent`` when
        given: queued ones by ``queued_at`` (oldest first), the others newest first."""

    @abc.abstractmethod
    def cs_between(self, since_ms: int, until_ms: int, *, by: str = "opened_at", batch: int = 1000) -> AsyncIterator[CsSession]:
        """Sessions with ``since_ms <= <by> < until_ms`` (``by``: ``opened_at`` or
        ``rated_at``), in that order, read in batches (reports and the ratings export)."""

    @abc.abstractmethod
    async def cs_unread_replies(self, *, first_before_ms: int, limit: int = 10_000) -> list[CsUnread]:
        """Assigned sessions whose shopper has unread agent messages, the oldest of which
        is older than ``first_before_ms`` (``first_ts < first_before_ms``), in one query
        (the desk's reminder round): at most ``limit``, by session id. A session whose
        shopper is not a member of ``cs:<id>`` is left out. See :class:`CsUnread`."""

    @abc.abstractmethod
    async def cs_add_ticket(self, ticket: CsTicket) -> None:
        """Store an offline form (an existing id is left as it is)."""

    @abc.abstractmethod
    async def cs_tickets(self, since_ms: int, until_ms: int, *, limit: int = 1000) -> list[CsTicket]:
        """Tickets created in ``[since_ms, until_ms)``, oldest first."""

    # ---- media ----------------------------------------------------------------------------
    #
    # Uploaded files are rows of ``media``; the messages that carry them are rows of
    # ``media_refs`` (file, room, seq). The objects themselves live in the object store
    # (disk or S3): the store never touches them. Small writes, one statement each (or
    # one transaction), never on a message's commit path.

    @abc.abstractmethod
    async def media_add(self, f: MediaFile) -> None:
        """Store a new file; :class:`ValueError` when its id is taken."""

    @abc.abstractmethod
    async def media_get(self, id: str) -> MediaFile | None:
        """The file (in any state, a removed one too), or None."""

    @abc.abstractmethod
    async def media_get_many(self, ids: Sequence[str]) -> dict[str, MediaFile]:
        """The files with these ids, in one round trip; missing ones are absent."""

    @abc.abstractmethod
    async def media_attach(self, id: str, owner: str, room: str, at_ms: int, *, exclusive: bool) -> tuple[MediaFile | None, str]:
        """Attach the file to a message about to be published in ``room``, in one atomic
        conditional update: it succeeds when the file exists, ``owner`` uploaded it, it is
        not removed, and either ``exclusive`` is False (the route lets a file be sent
        again), or the file was never attached, or it was attached to this same ``room``
        (a retried publish). Then ``room`` is set if it was None, ``attached_at`` to
        ``at_ms`` and ``state`` to ``"attached"``, and the answer is (the file after,
        ``"ok"``). Otherwise nothing changes and the answer is (None, why): ``"missing"``,
        ``"owner"``, ``"removed"`` or ``"used"`` (attached to another room), in that order
        of precedence. Of concurrent exclusive attaches of one file to different rooms,
        exactly one gets ``"ok"``."""

    @abc.abstractmethod
    async def media_ref(self, id: str, room: str, seq: int, at_ms: int) -> None:
        """Note that message ``(room, seq)`` carries the file (idempotent)."""

    @abc.abstractmethod
    async def media_refs(self, id: str) -> list[tuple[str, int]]:
        """The (room, seq) of the messages that carry the file, in (room, seq) order."""

    @abc.abstractmethod
    async def media_set_verdict(self, id: str, verdict: str) -> MediaFile | None:
        """Set the moderation verdict; the file after, or None when there is no such file."""

    @abc.abstractmethod
    async def media_usage(self, owner: str, since_ms: int) -> int:
        """Bytes ``owner`` uploaded since ``since_ms`` (``created_at >= since_ms``), in
        every state (a removed file still counts against the day's quota)."""

    @abc.abstractmethod
    async def media_remove(self, ids: Sequence[str]) -> int:
        """Mark the files removed (their objects are gone) and delete their refs, in one
        transaction. The rows stay, so later look-ups answer ``"removed"`` rather than
        ``"missing"``. Returns how many files changed state (already removed or missing
        ones do not count)."""

    @abc.abstractmethod
    async def media_purge_rows(self, ids: Sequence[str]) -> int:
        """Delete the files' rows and refs outright (after a user's data purge, once their
        objects are deleted); returns how many rows were deleted."""

    @abc.abstractmethod
    async def media_unsent(self, before_ms: int, limit: int) -> list[MediaFile]:
        """Up to ``limit`` files never attached to a message (state ``"uploaded"``)
        created before ``before_ms``, oldest first (to delete after ``unsent_ttl``)."""

    @abc.abstractmethod
    async def media_of_user(self, user: str, limit: int) -> list[MediaFile]:
        """Up to ``limit`` files ``user`` uploaded that are not removed, oldest first (a
        user's data purge: delete their objects, then :meth:`media_purge_rows`, again
        until none is left)."""

    @abc.abstractmethod
    async def media_orphans(self, limit: int) -> list[MediaFile]:
        """Up to ``limit`` attached files no stored message uses any more, oldest upload
        first: every ref points at a message that is gone (retention, an erasure
        request) or recalled, or the file has no ref at all (its publish never
        committed). A file is left alone while its last attach or any of its refs is
        younger than :data:`MEDIA_PUBLISH_GRACE_MS` (its message may not be written
        yet: archive messages are written behind). The caller deletes the objects and
        then calls :meth:`media_remove`.

        NOTE: messages of routes that do not store messages are never in the store, so
        a file sent only there becomes an orphan once the grace period is over.

        Cost: one pass over the attached files (the ``(state, created_at)`` index) that
        stops at ``limit`` orphans; per file one probe of its refs (primary key) and, per
        ref older than the grace period, one probe of ``messages`` by ``(room, seq)``
        until a live one is found. So a sweep that finds few orphans reads every attached
        file: call it rarely (hourly), not per message. NOTE: measured with 200,000
        attached files, each in one stored message (5,000 rooms), 10 of them orphans: a
        sweep read all 200,000 in 0.3-0.7 s on SQLite and 0.76-0.82 s on PostgreSQL
        (about 8 index pages a file, all cached), so about 4 s per million attached
        files, on one reader connection."""

    async def commit_many(self, msgs: Sequence[StoredMessage]) -> list[StoredMessage]:
        """:meth:`commit` for several messages (one group commit)."""
        import asyncio

        return list(await asyncio.gather(*(self.commit(m) for m in msgs)))


def attach_refusal(row: Any, owner: str) -> str:
    """Why a media attach changed nothing, from the file's ``(owner, state)`` (None: no
    such file): ``missing``, ``owner``, ``removed`` or ``used``."""
    if row is None:
        return "missing"
    if row[0] != owner:
        return "owner"
    if row[1] == "removed":
        return "removed"
    return "used"
