"""The PostgreSQL store (production, one or many nodes), on asyncpg.

**Writing: group commit by writer tasks.** :meth:`PostgresStore.commit` and
:meth:`PostgresStore.archive` only queue the message. Each writer task owns one
connection and a queue, takes what is queued (up to ``max_batch``) and writes it with one
statement (its own transaction)::

    INSERT INTO messages (...) SELECT * FROM unnest($1::text[], $2::int8[], ...)
    ON CONFLICT DO NOTHING

then resolves the commits' futures. Commits go to ``writers`` writers (2 by default), a
room always to the same one (a hash of its name), so a room's durable messages are
committed in the order they were queued: what a crash leaves in the table is a prefix of
each room's durable sequence. Archive messages have a writer of their own, so a commit
never waits behind an archive batch of 1,000 rows. A batch goes out as soon as a commit
waits in it (the transaction in flight is what gathers the next batch: no timer on the
durable path); archive messages wait up to ``batch_ms`` for a batch to fill. Rows are sent
sorted by (room, seq), so two nodes writing the same messages lock them in the same order
and cannot deadlock.

NOTE: two commit writers by default. A batch costs the server CPU per row plus one WAL
flush (0.4-5 ms on this machine's disk, depending on its neighbours). Two writers use
both cores and overlap one's flush with the other's inserts: in a quiet period they made
13,355 / 16,470 / 14,919 commits/s with 64 commits in flight against one writer's
10,718 / 14,258 / 12,373, and 25,199 / 26,443 / 19,810 with 1,000 in flight against
14,116 / 13,451 / 19,876 (``loadtest/bench/store_pg.py throughput``, rounds interleaved).
When flushes are slow (load average 4-5 from other work) the 64 commits in flight split
into batches of 24 whose flushes queue behind each other, and one writer did better
there: 10,763 / 10,904 / 6,724 against 8,497 / 6,714 / 5,880. ``writers = 1`` suits a
database on a slow disk with few concurrent publishers.

NOTE: ``unnest`` arrays, not ``copy_records_to_table`` into a temporary table followed by
``INSERT ... SELECT ... ON CONFLICT``: in 12 interleaved pairs (two runs) unnest was
1.1-2.1x as fast for batches of 64, and 0.87-1.32x for batches of 1,000 (faster in 4 of
6; ``store_pg.py insert``): one round trip instead of four, no temporary table to empty at every commit. Its ``INSERT 0 n``
status also tells at once whether every row went in (the common case, with no row sent
back); only a batch with duplicates is looked up again to return the stored rows.

**Duplicates.** ``(room, seq)`` is the primary key; ``(room, coalesce(sender, ''), cid)``
is unique where ``cid`` is set (the expression makes a server-published ``Idempotency-Key``
unique too: a plain ``sender`` column would let NULLs repeat). ``ON CONFLICT DO NOTHING``
skips a row that hits either; the caller then gets the stored row: the one with its
``cid`` if any, else the one with its ``seq``.

**Partitioning: none, on purpose (schema v1).** Messages are keyed by (room, seq) and
every index that enforces something starts with ``room``.

- *Not by time.* PostgreSQL enforces a unique index of a partitioned table only if it
  contains the partition key, so the keys would become (room, seq, ts) and (room, sender,
  cid, ts). A store-level retry of the same message carries the same ``ts`` and would
  still be caught, but a client's retried publish is a new publish: it gets a new server
  ``ts`` (and, past the broker's idempotency window or after a restart, a new ``seq``),
  and that is exactly the case where ``cid`` must find the original. Catching it would
  take a second, unpartitioned table of every (room, sender, cid), which then needs the
  same batched deletes as an unpartitioned message table. Dropping a month's partition,
  the usual prize, is also rarely possible: retention is per route and defaults to
  "forever" for durable routes, so nearly every month holds rows that must stay. And
  every read the gateway makes is by room (history, resume, ``last_seq``): without ``ts``
  in the predicate each one would probe every partition, a cost that grows with the
  number of months kept.
- *Not by hash of room, yet.* It keeps both unique keys (they start with ``room``) and
  splits vacuum and reindex work, which matters at hundreds of GB. Measured at 1M
  messages with 16 partitions against none: inserts 9 % slower, 470 instead of 395 bytes
  per message, search 4.5 ms instead of 0.5 ms and the all-rooms export 4x slower (each
  merges 16 index scans). Because every key starts with ``room``, a later migration can
  move the table to hash partitions without changing a key or a query.
- Retention and erasure delete in batches by key through the ``(route, ts)`` and
  ``(sender, ts)`` indexes, each batch its own short transaction; autovacuum makes the
  space reusable.

**Schema v1**, in its own PostgreSQL schema (``livegate`` by default, so the company's
database can hold it next to its own tables): ``meta``, ``messages``, and the forward
tables ``rooms`` and ``room_members`` of the conversations to come. Search is ``ILIKE``
on ``data`` through a ``pg_trgm`` GIN index (trigrams of any UTF-8 text, Chinese
included, when the database's ``LC_CTYPE`` classifies those characters as letters, as
``C.UTF-8`` and the ``*.UTF-8`` locales do: :meth:`PostgresStore.migrate` warns otherwise).

**Later versions** add tables beside these: v2 the outbox (``outbox``,
``outbox_cursors``, ``outbox_dead``) and ``room_floors``; v3 conversations (columns of
``rooms`` and ``room_members``, ``recalls``); v4 the desk (``cs_sessions``,
``cs_tickets``); v5 media: ``media`` (uploaded files, keyed by ``id``; ``meta`` is JSON
text; indexes ``(owner, created_at)`` for a user's daily usage and purge, ``(state,
created_at)`` for unsent files and the orphan sweep) and ``media_refs (file_id, room,
seq, at)`` (the messages that carry each file; primary key ``(file_id, room, seq)``,
index ``(room, seq)`` for the files of recalled messages). No trigger ties media to
``messages``: retention, erasure and recalls cost nothing more, and
:meth:`PostgresStore.media_orphans` probes ``messages`` by its primary key instead.
:meth:`PostgresStore.delete_user` leaves media alone (the media service purges a user's
files itself).

**Migrations** are numbered steps, each applied in one transaction holding
an advisory lock held for the whole migration, so nodes that run ``gateway migrate`` at once apply each step
once. :meth:`PostgresStore.start` never changes the schema: at another version it raises
:class:`~gateway.store.base.SchemaError`.

**Failures.** A refused, dropped or timed-out connection raises
:class:`~gateway.store.base.StoreUnavailable` naming the server (never the password).
While a writer cannot reach the database, new commits routed to it fail at once, and its
archive messages wait (retried with backoff, up to ``max_backlog``, then dropped and
counted). A message the database refuses (bad data) is isolated by splitting its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import secrets
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import orjson

from .base import (
    CS_OPEN_STATES,
    CS_SESSION_FIELDS,
    MEDIA_FIELDS,
    MEDIA_PUBLISH_GRACE_MS,
    RECALLED,
    SCHEMA_VERSION,
    Conversation,
    ConversationState,
    CsSession,
    CsTicket,
    CsUnread,
    DeadLetter,
    Lease,
    MediaFile,
    Member,
    OutboxEntry,
    SchemaError,
    Store,
    StoredMessage,
    StoreUnavailable,
    TooManyMembers,
    attach_refusal,
)

__all__ = ["MIGRATIONS", "PostgresStore", "describe_dsn", "migration_lock_key"]

log = logging.getLogger("gateway.store")

T = TypeVar("T")

#: The columns of ``messages``, in the order of every INSERT and SELECT here.
_COLS = "room, seq, ts, type, prio, sender, cid, data, route"

#: Errors that mean "the database cannot be reached or cannot work right now": the
#: connection is gone, a timeout, the server shutting down or starting up, out of
#: resources, read-only (a standby after a failover).
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.InternalClientError,
)
#: The same and any other error from the server.
_ANY_DB: tuple[type[BaseException], ...] = (*_UNAVAILABLE, asyncpg.PostgresError)
#: Errors caused by the rows themselves (a NUL character, an out-of-range value): the
#: batch is split to find the message at fault.
_BAD_ROWS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.IntegrityConstraintViolationError,
    UnicodeError,
    ValueError,
    TypeError,
    OverflowError,
)
#: Failures after which queued outbox events are kept and written again.
_RETRY_EVENTS: tuple[type[BaseException], ...] = (StoreUnavailable, *_ANY_DB)
#: Seconds between merges of the search index's pending list (see _clean_pending_list).
CLEAN_INTERVAL = 1.0
#: Seconds between reconnection attempts of a writer: doubling up to the cap.
_BACKOFF = (0.05, 1.0)

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Migration:
    """One step: the SQL that takes the schema from ``version - 1`` to ``version``
    (``{s}`` is the PostgreSQL schema, ``{trgm}`` the schema of the pg_trgm extension)."""

    version: int
    what: str
    sql: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "meta, messages (+ search), rooms, room_members", (
        "CREATE TABLE {s}.meta (key text PRIMARY KEY, value text NOT NULL)",
        """CREATE TABLE {s}.messages (
            room text NOT NULL,
            seq bigint NOT NULL,
            ts bigint NOT NULL,
            type text NOT NULL,
            prio smallint NOT NULL,
            sender text,
            cid text,
            data text NOT NULL,
            route text NOT NULL DEFAULT '',
            PRIMARY KEY (room, seq)
        )""",
        "CREATE UNIQUE INDEX messages_cid ON {s}.messages (room, (coalesce(sender, '')), cid) WHERE cid IS NOT NULL",
        "CREATE INDEX messages_ts ON {s}.messages (ts)",
        "CREATE INDEX messages_sender_ts ON {s}.messages (sender, ts) WHERE sender IS NOT NULL",
        "CREATE INDEX messages_route_ts ON {s}.messages (route, ts)",
        "CREATE INDEX messages_data_trgm ON {s}.messages USING gin (data {trgm}.gin_trgm_ops)",
        """CREATE TABLE {s}.rooms (
            room text PRIMARY KEY,
            kind text NOT NULL DEFAULT '',
            created_at bigint NOT NULL,
            meta jsonb NOT NULL DEFAULT '{{}}'
        )""",
        """CREATE TABLE {s}.room_members (
            room text NOT NULL,
            user_id text NOT NULL,
            joined_at bigint NOT NULL,
            last_read_seq bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (room, user_id)
        )""",
        'CREATE INDEX room_members_user ON {s}.room_members (user_id)',
    )),
    Migration(2, "outbox (log, cursors, dead letters), room_floors", (
        # The outbox log. ``xid``: the writing transaction; the log order is (xid, id) and
        # a reader takes only entries of transactions older than every one still running
        # (pg_snapshot_xmin), so an entry that commits late is never skipped by a cursor.
        """CREATE TABLE {s}.outbox (
            id bigserial PRIMARY KEY,
            xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
            room text NOT NULL,
            seq bigint,
            kind text NOT NULL,
            ts bigint NOT NULL,
            body text,
            endpoint text
        )""",
        "CREATE INDEX outbox_log ON {s}.outbox (xid, id)",
        "CREATE TABLE {s}.outbox_cursors (endpoint text PRIMARY KEY, position text NOT NULL, updated_at bigint NOT NULL)",
        """CREATE TABLE {s}.outbox_dead (
            id bigserial PRIMARY KEY,
            endpoint text NOT NULL,
            event_id text NOT NULL,
            room text NOT NULL,
            event text NOT NULL,
            error text NOT NULL,
            failed_at bigint NOT NULL
        )""",
        "CREATE INDEX outbox_dead_endpoint ON {s}.outbox_dead (endpoint, id)",
        # The highest seq of each room's deleted messages (retention, erasure), so that
        # last_seq never goes back and a seq is never used twice in a room.
        "CREATE TABLE {s}.room_floors (room text PRIMARY KEY, seq bigint NOT NULL)",
        """CREATE FUNCTION {s}.keep_room_floors() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
            INSERT INTO {s}.room_floors AS f (room, seq) SELECT room, max(seq) FROM gone GROUP BY room
                ON CONFLICT (room) DO UPDATE SET seq = greatest(f.seq, EXCLUDED.seq);
            RETURN NULL;
        END $$""",
        "CREATE TRIGGER messages_floor AFTER DELETE ON {s}.messages REFERENCING OLD TABLE AS gone "
        "FOR EACH STATEMENT EXECUTE FUNCTION {s}.keep_room_floors()",
    )),
    Migration(3, "conversations: roles, mutes, removals, read positions; recalls", (
        "ALTER TABLE {s}.rooms ADD COLUMN creator text",
        "ALTER TABLE {s}.rooms ADD COLUMN updated_at bigint NOT NULL DEFAULT 0",
        "ALTER TABLE {s}.room_members ADD COLUMN role text NOT NULL DEFAULT 'member'",
        "ALTER TABLE {s}.room_members ADD COLUMN muted_until bigint",
        "ALTER TABLE {s}.room_members ADD COLUMN left_seq bigint",
        "ALTER TABLE {s}.room_members ADD COLUMN updated_at bigint NOT NULL DEFAULT 0",
        "CREATE TABLE {s}.recalls (room text NOT NULL, seq bigint NOT NULL, at bigint NOT NULL, by text NOT NULL, PRIMARY KEY (room, seq))",
        "CREATE INDEX recalls_at ON {s}.recalls (room, at)",
    )),
    Migration(4, "customer-service desk: cs_sessions, cs_tickets", (
        """CREATE TABLE {s}.cs_sessions (
            id text PRIMARY KEY,
            shopper text NOT NULL,
            department text NOT NULL,
            state text NOT NULL,
            opened_at bigint NOT NULL,
            agent text,
            queued_at bigint,
            assigned_at bigint,
            first_response_at bigint,
            closed_at bigint,
            closed_by text,
            last_agent text,
            rating smallint,
            rating_comment text,
            rated_at bigint,
            card text NOT NULL DEFAULT 'null',
            transfers integer NOT NULL DEFAULT 0,
            bot_turns integer NOT NULL DEFAULT 0,
            updated_at bigint NOT NULL DEFAULT 0
        )""",
        "CREATE UNIQUE INDEX cs_sessions_open ON {s}.cs_sessions (shopper) WHERE state IN ('bot', 'queued', 'assigned')",
        "CREATE INDEX cs_sessions_shopper ON {s}.cs_sessions (shopper, opened_at)",
        "CREATE INDEX cs_sessions_state ON {s}.cs_sessions (state, department, queued_at)",
        "CREATE INDEX cs_sessions_agent ON {s}.cs_sessions (agent, state) WHERE agent IS NOT NULL",
        "CREATE INDEX cs_sessions_opened ON {s}.cs_sessions (opened_at, id)",
        "CREATE INDEX cs_sessions_rated ON {s}.cs_sessions (rated_at, id) WHERE rated_at IS NOT NULL",
        """CREATE TABLE {s}.cs_tickets (
            id text PRIMARY KEY,
            shopper text NOT NULL,
            department text NOT NULL,
            session text,
            fields text NOT NULL,
            created_at bigint NOT NULL
        )""",
        "CREATE INDEX cs_tickets_created ON {s}.cs_tickets (created_at)",
    )),
    Migration(5, "media: uploaded files and the messages that carry them", (
        """CREATE TABLE {s}.media (
            id text PRIMARY KEY,
            owner text NOT NULL,
            kind text NOT NULL,
            mime text NOT NULL,
            size bigint NOT NULL,
            sha256 text NOT NULL,
            name text NOT NULL DEFAULT '',
            meta text NOT NULL DEFAULT '{{}}',
            key text NOT NULL,
            created_at bigint NOT NULL,
            room text,
            attached_at bigint,
            state text NOT NULL DEFAULT 'uploaded',
            verdict text
        )""",
        "CREATE INDEX media_owner ON {s}.media (owner, created_at)",
        "CREATE INDEX media_state ON {s}.media (state, created_at)",
        """CREATE TABLE {s}.media_refs (
            file_id text NOT NULL,
            room text NOT NULL,
            seq bigint NOT NULL,
            at bigint NOT NULL,
            PRIMARY KEY (file_id, room, seq)
        )""",
        "CREATE INDEX media_refs_room ON {s}.media_refs (room, seq)",
    )),
)
assert MIGRATIONS[-1].version == SCHEMA_VERSION and [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))


def describe_dsn(dsn: str) -> str:
    """``host:port/database`` of a DSN, for messages (never the password)."""
    try:
        u = urlsplit(dsn)
        host = u.hostname or ""
        if not host and "host=" in u.query:
            host = u.query.split("host=", 1)[1].split("&", 1)[0]
        return f"{host or 'localhost'}:{u.port or 5432}{u.path or '/'}"
    except ValueError:
        return "the configured database"


def migration_lock_key(schema: str) -> int:
    """The advisory lock key that serialises migrations of ``schema``."""
    return zlib.crc32(f"livegate.migrate.{schema}".encode())


def _now_ms() -> int:
    return int(time.time() * 1000)


def _row(r: Any) -> StoredMessage:
    return StoredMessage(r[0], r[1], r[2], r[3], r[4], r[5], r[7].encode(), r[6], r[8])


async def _execute(sql: str, args: Sequence[Any], timeout: float, conn: Any) -> str:
    return str(await conn.execute(sql, *args, timeout=timeout))


def _position(pos: str | None) -> tuple[str, int]:
    """(xid, id) of an outbox position ``"<xid>:<id>"`` (None: before the first entry)."""
    if not pos:
        return "0", 0
    xid, _, rowid = pos.partition(":")
    return xid, int(rowid)


def _entry(r: Any) -> OutboxEntry:
    msg = _row(r[8:]) if r[8] is not None else None
    return OutboxEntry(f"{r[1]}:{r[0]}", r[2], r[4], r[5], r[3], msg, r[6].encode() if r[6] is not None else None, r[7])


_CONV_COLS = "room, kind, created_at, creator, meta::text, updated_at"
_MEMBER_COLS = "room, user_id, role, joined_at, last_read_seq, muted_until, left_seq, updated_at"


def _conversation(r: Any) -> Conversation:
    return Conversation(r[0], r[1], int(r[2]), r[3], (r[4] or "{}").encode(), int(r[5]))


def _member(r: Any) -> Member:
    return Member(r[0], r[1], r[2], int(r[3]), int(r[4]), r[5], r[6], int(r[7]))


_CS_COLS = ", ".join(CS_SESSION_FIELDS)
_CS_OPEN = "(" + ", ".join(f"'{s}'" for s in CS_OPEN_STATES) + ")"
_CS_SETTABLE = frozenset(CS_SESSION_FIELDS) - {"id", "shopper", "opened_at", "updated_at"}


def _cs_session(r: Any) -> CsSession:
    vals = list(r)
    i = CS_SESSION_FIELDS.index("card")
    vals[i] = (vals[i] or "null").encode()
    return CsSession(*vals)


_MEDIA_COLS = ", ".join(MEDIA_FIELDS)


class _ConnLease(Lease):
    """A session advisory lock, held by a connection of its own."""

    def __init__(self, conn: asyncpg.Connection, key: int, timeout: float) -> None:
        self._conn: asyncpg.Connection | None = conn
        self._key = key
        self._timeout = timeout

    async def alive(self) -> bool:
        if self._conn is None:
            return False
        try:
            await self._conn.fetchval("SELECT 1", timeout=self._timeout)
            return True
        except _ANY_DB:
            self._conn.terminate()
            self._conn = None
            return False

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await conn.execute("SELECT pg_advisory_unlock($1)", self._key, timeout=self._timeout)
            await asyncio.wait_for(conn.close(), self._timeout)
        except _ANY_DB:
            conn.terminate()


class _Writer:
    """One writer task: its connection, its queue of (message, future or None)."""

    __slots__ = ("backoff", "commits", "conn", "down", "error", "inflight", "n", "queue", "task", "wake")

    def __init__(self, n: int) -> None:
        self.n = n
        self.queue: deque[tuple[StoredMessage, asyncio.Future[StoredMessage] | None, float]] = deque()
        self.commits = 0  # commits waiting in the queue
        self.inflight = 0  # messages in the batch being written
        self.conn: asyncpg.Connection | None = None
        self.down = False
        self.error = ""
        self.backoff = _BACKOFF[0]
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class PostgresStore(Store):
    """The store in PostgreSQL (see the module docstring).

    ``dsn``: ``postgresql://user:password@host:port/database`` (libpq environment
    variables such as ``PGPASSWORD`` fill what it leaves out). ``batch_ms``: how long an
    archive batch may wait to fill. ``max_batch``: messages per transaction.
    ``max_backlog``: archive messages kept while the database is slow or down.
    ``pool_size``: connections for reads (and the search index's upkeep). ``writers``:
    connections that write commits (a room always uses the same one; one more writes
    archive messages). ``schema``: the PostgreSQL schema of the tables. ``timeout``:
    seconds any statement may take before the database counts as unavailable.
    """

    kind = "postgres"

    def __init__(
        self,
        dsn: str,
        *,
        batch_ms: float = 5.0,
        max_batch: int = 1000,
        max_backlog: int = 100_000,
        pool_size: int = 4,
        writers: int = 2,
        schema: str = "livegate",
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
    ) -> None:
        super().__init__()
        if not _IDENT.match(schema):
            raise ValueError(f"schema must be a lower-case SQL identifier, got {schema!r}")
        if batch_ms < 0 or max_batch < 1 or max_backlog < 1 or pool_size < 1 or writers < 1 or timeout <= 0:
            raise ValueError("batch_ms >= 0, max_batch, max_backlog, pool_size, writers >= 1 and timeout > 0")
        self.dsn = dsn
        self.where = describe_dsn(dsn)
        self.batch_s = batch_ms / 1000.0
        self.max_batch = max_batch
        self.max_backlog = max_backlog
        self.pool_size = pool_size
        self.schema = schema
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        #: ``writers`` writers for commits (a room always uses the same one), then one for
        #: archive messages, so that a commit never waits behind an archive batch.
        self._writers = [_Writer(i) for i in range(writers + 1)]
        self._committers = self._writers[:-1]
        self._archiver = self._writers[-1]
        self._pool: asyncpg.Pool | None = None
        self._closing = False
        self._started = False
        self._cleaner: asyncio.Task[None] | None = None
        self._written = 0  # rows inserted since the trigram index's pending list was last merged
        s = schema
        self._sql_insert = (
            f"INSERT INTO {s}.messages ({_COLS}) SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::text[], "
            "$5::int2[], $6::text[], $7::text[], $8::text[], $9::text[]) ON CONFLICT DO NOTHING"
        )
        self._sql_insert_outbox = (
            f"WITH ins AS ({self._sql_insert} RETURNING room, seq, ts) "
            f"INSERT INTO {s}.outbox (room, seq, kind, ts) SELECT room, seq, 'message', ts FROM ins"
        )
        #: Room events for the outbox log, written by a task of their own.
        self._events: deque[tuple[str, str, int, str]] = deque()
        self._events_wake = asyncio.Event()
        self._events_task: asyncio.Task[None] | None = None
        self._sql_by_cid = (
            f"SELECT {', '.join('m.' + c for c in _COLS.split(', '))} FROM unnest($1::text[], $2::text[], $3::text[]) AS k(room, sender, cid) "
            f"JOIN {s}.messages m ON m.room = k.room AND coalesce(m.sender, '') = k.sender AND m.cid = k.cid"
        )
        self._sql_by_seq = (
            f"SELECT {', '.join('m.' + c for c in _COLS.split(', '))} FROM unnest($1::text[], $2::int8[]) AS k(room, seq) "
            f"JOIN {s}.messages m ON m.room = k.room AND m.seq = k.seq"
        )

    # ---- connections -----------------------------------------------------------------

    def _unavailable(self, e: BaseException, doing: str = "") -> StoreUnavailable:
        why = f"no answer within {self.timeout:g}s" if isinstance(e, TimeoutError) else (str(e).strip() or type(e).__name__)
        return StoreUnavailable(f"PostgreSQL at {self.where} is unavailable{f' ({doing})' if doing else ''}: {why}")

    async def _connect(self) -> asyncpg.Connection:
        try:
            conn: asyncpg.Connection = await asyncpg.connect(
                self.dsn, timeout=self.connect_timeout, server_settings={"application_name": "livegate"},
            )
        except _ANY_DB as e:
            raise self._unavailable(e, "connecting") from e
        try:
            # Durability is the contract of commit(): a database whose default is
            # synchronous_commit=off would acknowledge before the WAL is on disk.
            if await conn.fetchval("SHOW synchronous_commit", timeout=self.timeout) == "off":
                await conn.execute("SET synchronous_commit = on", timeout=self.timeout)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _read(self, fn: Callable[[Any], Awaitable[T]], doing: str) -> T:
        """Run ``fn(connection)`` on a pooled connection; a connection that broke while
        idle (a restarted server) is replaced and ``fn`` tried once more."""
        if self._pool is None:
            raise StoreUnavailable("the store is not started" if not self._closing else "the store is closed")
        for attempt in (0, 1):
            try:
                async with self._pool.acquire(timeout=self.timeout) as conn:
                    return await fn(conn)
            except _ANY_DB as e:
                if not isinstance(e, (*_UNAVAILABLE, asyncpg.exceptions.UndefinedTableError)):
                    raise
                if attempt == 0 and isinstance(e, (asyncpg.ConnectionDoesNotExistError, asyncpg.exceptions.AdminShutdownError)):
                    continue
                self.stats.errors += 1
                raise self._unavailable(e, doing) from e
        raise AssertionError("unreachable")

    async def _fetch(self, sql: str, args: Sequence[Any], doing: str) -> list[Any]:
        return await self._read(lambda c: c.fetch(sql, *args), doing)

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=0, max_size=self.pool_size, timeout=self.connect_timeout, command_timeout=self.timeout,
                server_settings={"application_name": "livegate"},
            )
        except _ANY_DB as e:
            raise self._unavailable(e, "connecting") from e
        try:
            async with self._pool.acquire(timeout=self.timeout) as conn:
                version = await self._version(conn)
                if version != SCHEMA_VERSION:
                    if version > SCHEMA_VERSION:
                        raise SchemaError(f"the database at {self.where} has schema version {version}, newer than this gateway's "
                                          f"({SCHEMA_VERSION}): upgrade the gateway")
                    raise SchemaError(f"the database at {self.where} has schema version {version}, this gateway needs "
                                      f"{SCHEMA_VERSION}: run `gateway migrate`")
                self.epoch = await self._take_epoch(conn)
            for w in self._writers:
                w.conn = await self._connect()
        except BaseException as e:
            for w in self._writers:
                if w.conn is not None:
                    w.conn.terminate()
                    w.conn = None
            self._pool.terminate()
            self._pool = None
            if isinstance(e, _ANY_DB):
                raise self._unavailable(e, "starting") from e
            raise
        self._closing = False
        self._started = True
        for w in self._writers:
            w.task = asyncio.create_task(self._run(w), name=f"pg-writer-{w.n}")
        self._cleaner = asyncio.create_task(self._clean_pending_list(), name="pg-gin-cleaner")
        self._events_task = asyncio.create_task(self._write_events(), name="pg-outbox-events")

    async def _clean_pending_list(self) -> None:
        """Merge the trigram index's pending list every second, on a pooled connection.

        NOTE: the GIN index takes new rows into a pending list (``fastupdate``, 2x the
        insert rate of updating the index in place: measured 19-39k against 7-12k rows/s
        in batches of 1,000); when the list passes ``gin_pending_list_limit`` (4 MB, about
        5,000 chat messages) the INSERT that finds it full merges it itself: 30-90 ms
        inside a commit, every ~5 s at 1,000 commits/s, which set the ack p99 at
        24-35 ms. Merging it here (7-50 ms a second, off the commit path; an inserter
        that finds a merge running skips its own) brought the p99 to 10-12 ms in the same
        runs."""
        sql = f"SELECT gin_clean_pending_list('{self.schema}.messages_data_trgm'::regclass)"
        while not self._closing:
            await asyncio.sleep(CLEAN_INTERVAL)
            if not self._written or self._pool is None:
                continue
            self._written = 0
            try:
                await self._read(lambda c: c.fetchval(sql), "merging the search index")
            except StoreUnavailable:
                pass  # the writers report it
            except asyncpg.PostgresError as e:  # e.g. not the index's owner: autovacuum still merges it
                log.warning("store: cannot merge the search index's pending list at %s (%s); leaving it to autovacuum", self.where, e)
                return

    async def _take_epoch(self, conn: Any) -> str:
        """The epoch: the stored one after a clean close, else a new one; then the clean
        mark is cleared until :meth:`close` sets it again."""
        s = self.schema
        async with conn.transaction():
            rows = dict(await conn.fetch(f"SELECT key, value FROM {s}.meta WHERE key IN ('epoch', 'clean_close') FOR UPDATE"))
            epoch = rows.get("epoch", "")
            if not epoch or rows.get("clean_close") != "1":
                epoch = secrets.token_hex(4)
            await conn.executemany(
                f"INSERT INTO {s}.meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                [("epoch", epoch), ("clean_close", "0")],
            )
        return str(epoch)

    async def close(self, timeout: float = 5.0) -> None:
        if not self._started:
            return
        self._closing = True
        if self._cleaner is not None:
            self._cleaner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cleaner
            self._cleaner = None
        for w in self._writers:
            w.wake.set()
        self._events_wake.set()
        tasks = [w.task for w in self._writers if w.task is not None] + ([self._events_task] if self._events_task else [])
        _, pending = await asyncio.wait(tasks, timeout=timeout) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        left = 0
        for w in self._writers:
            while w.queue:
                _msg, fut, _t = w.queue.popleft()
                if fut is None:
                    left += 1
                elif not fut.done():
                    fut.set_exception(StoreUnavailable("the store closed before the message was written"))
            w.commits = 0
            if w.conn is not None:
                if pending:
                    w.conn.terminate()
                else:
                    await self._close_conn(w.conn)
                w.conn = None
        self.stats.archive_dropped += left
        self.stats.events_dropped += len(self._events)
        left += len(self._events)
        self._events.clear()
        if left:
            log.warning("store closed with %d archive message(s) not written (PostgreSQL at %s)", left, self.where)
        if self._pool is not None:
            if not left and not pending:
                with contextlib.suppress(*_ANY_DB, StoreUnavailable):  # down: the next start takes a new epoch
                    await self._read(lambda c: c.execute(
                        f"UPDATE {self.schema}.meta SET value = '1' WHERE key = 'clean_close'", timeout=self.timeout), "closing")
            with contextlib.suppress(*_UNAVAILABLE):
                await asyncio.wait_for(self._pool.close(), timeout)
            self._pool.terminate()
            self._pool = None
        self._started = False

    @staticmethod
    async def _close_conn(conn: asyncpg.Connection) -> None:
        try:
            await asyncio.wait_for(conn.close(), 2.0)
        except _ANY_DB:
            conn.terminate()

    async def _version(self, conn: Any) -> int:
        if await conn.fetchval("SELECT to_regclass($1)", f"{self.schema}.meta") is None:
            return 0
        v = await conn.fetchval(f"SELECT value FROM {self.schema}.meta WHERE key = 'schema_version'")
        return int(v) if v is not None else 0

    async def migrate(self) -> tuple[int, int]:
        conn = await self._connect()
        s = self.schema
        try:
            # One lock for every step: a node that waited finds the whole migration done.
            await conn.execute("SELECT pg_advisory_lock($1)", migration_lock_key(s))
            before: int | None = None
            for step in MIGRATIONS:
                async with conn.transaction():
                    v = await self._version(conn)
                    if before is None:
                        before = v  # read under the lock: a node that waited sees what the other did
                        if v > SCHEMA_VERSION:
                            raise SchemaError(f"the database at {self.where} has schema version {v}, newer than this "
                                              f"gateway's ({SCHEMA_VERSION}): upgrade the gateway (migrations never go back)")
                    if v >= step.version:
                        continue
                    trgm = await self._prepare(conn) if step.version == 1 else ""
                    for sql in step.sql:
                        await conn.execute(sql.format(s=s, trgm=trgm))
                    await conn.executemany(
                        f"INSERT INTO {s}.meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                        [("schema_version", str(step.version))]
                        + ([("epoch", secrets.token_hex(4)), ("created_at", str(_now_ms())), ("clean_close", "1")] if step.version == 1 else []),
                    )
                    log.info("store schema at %s: version %d (%s)", self.where, step.version, step.what)
            after = await self._version(conn)
            await self._check_search(conn)
            return before or 0, after
        except asyncpg.exceptions.InsufficientPrivilegeError as e:
            raise SchemaError(f"cannot migrate the database at {self.where}: {e} (the role needs CREATE on the database)") from e
        except _ANY_DB as e:
            if isinstance(e, asyncpg.PostgresError) and not isinstance(e, _UNAVAILABLE):
                raise SchemaError(f"migrating the database at {self.where} failed: {e}") from e
            raise self._unavailable(e, "migrating") from e
        finally:
            await self._close_conn(conn)

    async def _prepare(self, conn: Any) -> str:
        """Create the schema and the pg_trgm extension; return the extension's schema."""
        s = self.schema
        enc = await conn.fetchval("SHOW server_encoding")
        if enc != "UTF8":
            raise SchemaError(f"the database at {self.where} is encoded in {enc}: the store needs UTF8 "
                              "(CREATE DATABASE ... ENCODING 'UTF8')")
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
        try:
            async with conn.transaction():  # a savepoint: the error below leaves the step usable
                await conn.execute(f"CREATE EXTENSION IF NOT EXISTS pg_trgm SCHEMA {s}")
        except (asyncpg.exceptions.UndefinedFileError, asyncpg.exceptions.FeatureNotSupportedError) as e:
            raise SchemaError(f"PostgreSQL at {self.where} has no pg_trgm extension ({e}): install the contrib package "
                              "(Debian: postgresql-contrib)") from e
        except asyncpg.exceptions.InsufficientPrivilegeError as e:
            raise SchemaError(f"cannot create the pg_trgm extension at {self.where} ({e}): a superuser can run "
                              f"CREATE EXTENSION pg_trgm SCHEMA {s}, then `gateway migrate` again") from e
        return str(await conn.fetchval("SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'pg_trgm'"))

    async def _check_search(self, conn: Any) -> None:
        """Warn when the database's locale makes no trigrams of Chinese text (LC_CTYPE=C):
        search then still answers, by reading the whole table."""
        with contextlib.suppress(asyncpg.PostgresError):
            trgm = await conn.fetchval("SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'pg_trgm'")
            if trgm and not await conn.fetchval(f"SELECT cardinality({trgm}.show_trgm('中文消息'))"):
                ctype = await conn.fetchval("SELECT datctype FROM pg_database WHERE datname = current_database()")
                log.warning("the database at %s (LC_CTYPE %s) makes no trigrams of Chinese text: search works but reads the "
                            "whole table; create the database with LC_CTYPE 'C.UTF-8' (or any *.UTF-8 locale)", self.where, ctype)

    # ---- writing ---------------------------------------------------------------------

    def _writer(self, room: str) -> _Writer:
        ws = self._committers
        return ws[zlib.crc32(room.encode()) % len(ws)] if len(ws) > 1 else ws[0]

    async def commit(self, msg: StoredMessage) -> StoredMessage:
        if not self._started or self._closing:
            raise StoreUnavailable("the store is closed" if self._closing else "the store is not started")
        w = self._writer(msg.room)
        if w.down:
            self.stats.errors += 1
            raise StoreUnavailable(w.error)
        t0 = time.perf_counter()
        fut: asyncio.Future[StoredMessage] = asyncio.get_running_loop().create_future()
        w.queue.append((msg, fut, t0))
        w.commits += 1
        w.wake.set()
        stored = await fut
        self.stats.observe(time.perf_counter() - t0)
        return stored

    def archive(self, msg: StoredMessage) -> bool:
        if self._closing or self.backlog >= self.max_backlog:
            self.stats.archive_dropped += 1
            return False
        w = self._archiver
        q = w.queue
        q.append((msg, None, time.perf_counter()))
        if len(q) == 1 or len(q) >= self.max_batch:
            w.wake.set()
        return True

    async def write_archive(self, msgs: Sequence[StoredMessage]) -> int:
        """See :meth:`Store.write_archive`: one INSERT (one transaction) on a pooled
        connection, so that durable commits never wait behind a batch of the archive log
        on their writers; a batch the database refuses is split to find the message at
        fault (as the writers do)."""
        if not self._started or self._closing:
            raise StoreUnavailable("the store is closed" if self._closing else "the store is not started")
        batch = sorted(msgs, key=lambda m: (m.room, m.seq))  # the writers' lock order: no deadlock with them
        if not batch:
            return 0
        try:
            return await self._read(lambda c: self._insert_archive(c, batch), "writing archive messages")
        except asyncpg.exceptions.TransactionRollbackError as e:
            self.stats.errors += 1
            raise StoreUnavailable(f"PostgreSQL at {self.where}: writing archive messages failed ({e}): try again") from e

    async def _insert_archive(self, conn: asyncpg.Connection, msgs: list[StoredMessage]) -> int:
        dups = self.stats.duplicates
        try:
            await self._insert(conn, msgs)
        except _BAD_ROWS as e:
            if len(msgs) == 1:
                self._reject((msgs[0], None, 0.0), e)
                return 1
            half = len(msgs) // 2
            return await self._insert_archive(conn, msgs[:half]) + await self._insert_archive(conn, msgs[half:])
        self.stats.batches += 1
        self.stats.batched_messages += len(msgs)
        self.stats.archived += len(msgs) - (self.stats.duplicates - dups)
        self._written += len(msgs)
        return 0

    @property
    def backlog(self) -> int:
        return sum(len(w.queue) + w.inflight for w in self._writers)

    async def _run(self, w: _Writer) -> None:
        q = w.queue
        while True:
            if self._closing and not q:
                return
            if w.conn is None and (q or w.down):
                # Down: keep trying (backing off) even with nothing queued, so that
                # commits stop failing as soon as the database is back.
                await self._reconnect(w)
                continue
            if not q:
                w.wake.clear()
                await w.wake.wait()
                continue
            if not w.commits and len(q) < self.max_batch and not self._closing:
                # Archive messages only: let the batch fill for up to batch_ms.
                delay = q[0][2] + self.batch_s - time.perf_counter()
                if delay > 0:
                    w.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(w.wake.wait(), delay)
                    continue
            n = min(len(q), self.max_batch)
            batch = [q.popleft() for _ in range(n)]
            w.commits -= sum(1 for _m, f, _t in batch if f is not None)
            w.inflight = n
            try:
                await self._write(w, batch)
            except asyncio.CancelledError:  # close() ran out of time
                for _m, fut, _t in batch:
                    if fut is None:
                        self.stats.archive_dropped += 1
                    elif not fut.done():
                        fut.set_exception(StoreUnavailable("the store closed while the message was being written: it may or may not be stored"))
                raise
            finally:
                w.inflight = 0
            # Let the publishers whose commits just returned run before the next batch is
            # taken: a closed loop's next commits then share one transaction instead of
            # trickling into several.
            await asyncio.sleep(0)

    async def _reconnect(self, w: _Writer) -> None:
        """Connect ``w`` (backing off after a failure); while down, commits routed to it fail."""
        try:
            w.conn = await self._connect()
        except StoreUnavailable as e:
            if not w.down:
                log.warning("store writer %d: %s; archive messages are kept (up to %d), durable commits fail", w.n, e, self.max_backlog)
            w.down, w.error = True, str(e)
            self._fail_commits(w, StoreUnavailable(str(e)))
            await asyncio.sleep(w.backoff)
            w.backoff = min(w.backoff * 2, _BACKOFF[1])
            return
        if w.down:
            log.warning("store writer %d: PostgreSQL at %s is reachable again (%d message(s) queued)", w.n, self.where, len(w.queue))
        w.down, w.error, w.backoff = False, "", _BACKOFF[0]

    def _fail_commits(self, w: _Writer, exc: StoreUnavailable) -> None:
        """Fail the commits waiting in ``w``'s queue; archive messages stay."""
        if not w.commits:
            return
        kept = [item for item in w.queue if item[1] is None]
        for _m, fut, _t in w.queue:
            if fut is not None and not fut.done():
                fut.set_exception(StoreUnavailable(str(exc)))
        w.queue.clear()
        w.queue.extend(kept)
        w.commits = 0

    async def _write(self, w: _Writer, batch: list[tuple[StoredMessage, asyncio.Future[StoredMessage] | None, float]]) -> None:
        batch.sort(key=lambda item: (item[0].room, item[0].seq))
        msgs = [m for m, _f, _t in batch]
        for attempt in range(3):
            assert w.conn is not None
            try:
                stored = await self._insert(w.conn, msgs)
            except _BAD_ROWS as e:
                if len(batch) > 1:
                    half = len(batch) // 2
                    await self._write(w, batch[:half])
                    await self._write(w, batch[half:])
                else:
                    self._reject(batch[0], e)
                return
            except asyncpg.exceptions.TransactionRollbackError:
                continue  # a deadlock or serialization failure with another node: again
            except _ANY_DB as e:
                self.stats.errors += 1
                w.conn.terminate()
                w.conn = None
                if attempt == 0 and not isinstance(e, TimeoutError):
                    # A connection that broke while idle (the server restarted): once more
                    # on a fresh one before anyone is told. Safe: a batch that did get in is
                    # found again as duplicates of itself.
                    with contextlib.suppress(StoreUnavailable):
                        w.conn = await self._connect()
                        continue
                self._give_back(w, batch, self._unavailable(e, "writing"))
                return
            self.stats.batches += 1
            self.stats.batched_messages += len(batch)
            self._written += len(batch)
            for (m, fut, _t), s in zip(batch, stored, strict=True):
                if fut is None:
                    self.stats.archived += s is m
                elif not fut.done():
                    self.stats.committed += s is m
                    fut.set_result(s)
            return
        self._give_back(w, batch, StoreUnavailable(f"PostgreSQL at {self.where}: the batch kept failing with deadlocks"))

    def _give_back(self, w: _Writer, batch: list[tuple[StoredMessage, asyncio.Future[StoredMessage] | None, float]], exc: StoreUnavailable) -> None:
        """After a failed write: commits fail (the message may or may not be stored: a retry
        with its cid is safe), archive messages go back to the front of the queue."""
        w.down, w.error = w.conn is None, str(exc)
        if w.down:
            log.warning("store writer %d: %s", w.n, exc)
        for _m, fut, _t in batch:
            if fut is not None and not fut.done():
                fut.set_exception(StoreUnavailable(str(exc)))
        w.queue.extendleft(reversed([item for item in batch if item[1] is None]))
        if w.down:
            self._fail_commits(w, exc)
        over = len(w.queue) - self.max_backlog
        while over > 0 and w.queue:
            w.queue.pop()
            self.stats.archive_dropped += 1
            over -= 1

    def _reject(self, item: tuple[StoredMessage, asyncio.Future[StoredMessage] | None, float], e: BaseException) -> None:
        msg, fut, _t = item
        self.stats.errors += 1
        why = f"PostgreSQL at {self.where} refused message {msg.room}#{msg.seq}: {str(e).strip() or type(e).__name__}"
        log.warning("store: %s", why)
        if fut is None:
            self.stats.archive_dropped += 1
        elif not fut.done():
            fut.set_exception(StoreUnavailable(why))

    async def _insert(self, conn: asyncpg.Connection, msgs: list[StoredMessage]) -> list[StoredMessage]:
        """Insert ``msgs`` (one statement, one transaction); for each, the stored row (the
        same object when it is the one that went in)."""
        cols: list[list[Any]] = [[], [], [], [], [], [], [], [], []]
        room, seq, ts, typ, prio, sender, cid, data, route = cols
        for m in msgs:
            room.append(m.room)
            seq.append(m.seq)
            ts.append(m.ts)
            typ.append(m.type)
            prio.append(m.prio)
            sender.append(m.sender)
            cid.append(m.cid)
            data.append(m.data.decode())
            route.append(m.route)
        status = await conn.execute(self._sql_insert_outbox if self.outbox else self._sql_insert, *cols, timeout=self.timeout)
        inserted = int(status.rsplit(" ", 1)[1])
        if inserted == len(msgs):
            return msgs
        self.stats.duplicates += len(msgs) - inserted
        # Some were there already: look every message up (cid first, then seq).
        with_cid = [m for m in msgs if m.cid is not None]
        by_cid: dict[tuple[str, str, str], StoredMessage] = {}
        if with_cid:
            for r in await conn.fetch(self._sql_by_cid, [m.room for m in with_cid], [m.sender or "" for m in with_cid],
                                      [m.cid for m in with_cid], timeout=self.timeout):
                row = _row(r)
                by_cid[(row.room, row.sender or "", row.cid or "")] = row
        by_seq = {(x.room, x.seq): x for x in map(_row, await conn.fetch(self._sql_by_seq, room, seq, timeout=self.timeout))}
        out: list[StoredMessage] = []
        missing: list[int] = []
        for i, m in enumerate(msgs):
            found = by_cid.get((m.room, m.sender or "", m.cid)) if m.cid is not None else None
            stored = found or by_seq.get((m.room, m.seq))
            if stored is None:
                missing.append(i)  # deleted between the insert and the look-up: insert it again
                out.append(m)
            else:
                out.append(m if stored == m else stored)
        if missing:
            again = await self._insert(conn, [msgs[i] for i in missing])
            for i, st in zip(missing, again, strict=True):
                out[i] = st
        return out

    # ---- reading ---------------------------------------------------------------------

    async def last_seq(self, room: str) -> int:
        s = self.schema
        sql = (f"SELECT greatest((SELECT coalesce(max(seq), 0) FROM {s}.messages WHERE room = $1), "
               f"(SELECT coalesce(max(seq), 0) FROM {s}.room_floors WHERE room = $1))")
        return int(await self._read(lambda c: c.fetchval(sql, room), "reading the last seq"))

    async def messages(
        self, room: str, *, before_seq: int | None = None, after_seq: int | None = None, limit: int = 100,
    ) -> list[StoredMessage]:
        if limit <= 0:
            return []
        s = self.schema
        if after_seq is not None:
            cond, args, order = "seq > $2" + (" AND seq < $3" if before_seq is not None else ""), [after_seq], "ASC"
            if before_seq is not None:
                args.append(before_seq)
        elif before_seq is not None:
            cond, args, order = "seq < $2", [before_seq], "DESC"
        else:
            cond, args, order = "TRUE", [], "DESC"
        sql = f"SELECT {_COLS} FROM {s}.messages WHERE room = $1 AND {cond} ORDER BY seq {order} LIMIT {int(limit)}"
        rows = await self._read(lambda c: c.fetch(sql, room, *args), "reading messages")
        out = [_row(r) for r in rows]
        if order == "DESC":
            out.reverse()
        return out

    async def export(
        self, *, since_ms: int, until_ms: int, room: str | None = None, sender: str | None = None, batch: int = 1000,
    ) -> AsyncIterator[StoredMessage]:
        """Keyset pages, each read on a connection taken from the pool for that page only:
        a slow consumer holds no connection and no transaction."""
        s = self.schema
        batch = max(1, int(batch))
        if room is not None:
            extra = " AND sender = $5" if sender is not None else ""
            sql = (f"SELECT {_COLS} FROM {s}.messages WHERE room = $1 AND seq > $2 AND ts >= $3 AND ts < $4{extra} "
                   f"ORDER BY seq LIMIT {batch}")
            last = -(2**63)
            while True:
                rows = await self._fetch(sql, [room, last, since_ms, until_ms] + ([sender] if sender is not None else []), "exporting")
                for r in rows:
                    yield _row(r)
                if len(rows) < batch:
                    return
                last = rows[-1][1]
        who = "sender = $6 AND " if sender is not None else ""
        sql = (f"SELECT {_COLS} FROM {s}.messages WHERE {who}ts >= $1 AND ts < $2 AND (ts, room, seq) > ($3, $4, $5) "
               f"ORDER BY ts, room, seq LIMIT {batch}")
        key: tuple[int, str, int] = (since_ms, "", -(2**63))
        while True:
            rows = await self._fetch(sql, [key[0], until_ms, *key] + ([sender] if sender is not None else []), "exporting")
            for r in rows:
                yield _row(r)
            if len(rows) < batch:
                return
            key = (rows[-1][2], rows[-1][0], rows[-1][1])

    async def search(self, text: str, *, room: str | None = None, limit: int = 50) -> list[StoredMessage]:
        if len(text) < 3:
            raise ValueError("search text needs at least 3 characters")
        if limit <= 0:
            return []
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where = " AND room = $2" if room is not None else ""
        sql = f"SELECT {_COLS} FROM {self.schema}.messages WHERE data ILIKE $1{where} ORDER BY ts DESC, seq DESC LIMIT {int(limit)}"
        args = [pattern] + ([room] if room is not None else [])
        return [_row(r) for r in await self._read(lambda c: c.fetch(sql, *args), "searching")]

    # ---- the data's life -------------------------------------------------------------

    async def _delete_batch(self, where: str, args: Sequence[Any], batch: int) -> int:
        s = self.schema
        sql = (f"WITH d AS (DELETE FROM {s}.messages WHERE (room, seq) IN "
               f"(SELECT room, seq FROM {s}.messages WHERE {where} LIMIT {int(batch)}) RETURNING 1) SELECT count(*) FROM d")
        return int(await self._read(lambda c: c.fetchval(sql, *args), "deleting"))

    async def delete_user(self, user: str, batch: int = 5000) -> int:
        total = 0
        while True:
            n = await self._delete_batch("sender = $1", [user], batch)
            total += n
            if n < batch:
                return total

    async def expire(self, route: str, before_ms: int, batch: int = 5000) -> int:
        return await self._delete_batch("route = $1 AND ts < $2", [route, before_ms], batch)

    # ---- the outbox log --------------------------------------------------------------

    def event(self, room: str, kind: str, body: bytes) -> bool:
        if self._closing or not self._started or not self.outbox or len(self._events) >= self.max_backlog:
            self.stats.events_dropped += 1
            return False
        self._events.append((room, kind, _now_ms(), body.decode()))
        if len(self._events) == 1:
            self._events_wake.set()
        return True

    async def _write_events(self) -> None:
        """Write queued room events every ``batch_ms``, in batches, on a pooled
        connection; a failure keeps them (up to ``max_backlog``) and retries."""
        q = self._events
        sql = (f"INSERT INTO {self.schema}.outbox (room, kind, ts, body) "
               "SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[])")
        backoff = _BACKOFF[0]
        while True:
            if not q:
                if self._closing:
                    return
                self._events_wake.clear()
                await self._events_wake.wait()
                continue
            if not self._closing:
                await asyncio.sleep(self.batch_s)
            batch = [q[i] for i in range(min(len(q), self.max_batch))]
            cols = [list(c) for c in zip(*batch, strict=True)]
            try:
                await self._read(functools.partial(_execute, sql, cols, self.timeout), "writing outbox events")
            except _RETRY_EVENTS as e:
                log.warning("store: %d outbox event(s) not written yet (%s), retried in %.2f s", len(q), e, backoff)
                if self._closing:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF[1])
                continue
            backoff = _BACKOFF[0]
            for _ in batch:
                q.popleft()
            self.stats.events += len(batch)

    async def outbox_read(self, after: str | None, limit: int) -> list[OutboxEntry]:
        """See :meth:`Store.outbox_read`: in (xid, id) order, only entries of transactions
        that finished before every transaction still running began."""
        s = self.schema
        mcols = ", ".join("m." + c for c in _COLS.split(", "))
        sql = (f"SELECT o.id, o.xid::text, o.room, o.seq, o.kind, o.ts, o.body, o.endpoint, {mcols} "
               f"FROM {s}.outbox o LEFT JOIN {s}.messages m ON o.kind = 'message' AND m.room = o.room AND m.seq = o.seq "
               "WHERE (o.xid, o.id) > ($1::text::xid8, $2::int8) AND o.xid < pg_snapshot_xmin(pg_current_snapshot()) "
               "ORDER BY o.xid, o.id LIMIT $3")
        xid, rowid = _position(after)
        return [_entry(r) for r in await self._fetch(sql, [xid, rowid, limit], "reading the outbox")]

    def outbox_order(self, position: str) -> tuple[int, ...]:
        xid, rowid = _position(position)
        return int(xid), rowid

    async def outbox_backlog(self, after: str | None) -> tuple[int, int]:
        s = self.schema
        xid, rowid = _position(after)
        sql = (f"SELECT (SELECT coalesce(max(id), 0) FROM {s}.outbox), "
               f"(SELECT ts FROM {s}.outbox WHERE (xid, id) > ($1::text::xid8, $2::int8) ORDER BY xid, id LIMIT 1)")
        rows = await self._fetch(sql, [xid, rowid], "reading the outbox")
        top, ts = rows[0]
        return max(0, int(top) - rowid), int(ts or 0)

    async def outbox_cursor(self, endpoint: str) -> str | None:
        rows = await self._fetch(f"SELECT position FROM {self.schema}.outbox_cursors WHERE endpoint = $1", [endpoint], "reading the outbox")
        return str(rows[0][0]) if rows else None

    async def outbox_save(self, endpoint: str, position: str) -> None:
        sql = (f"INSERT INTO {self.schema}.outbox_cursors (endpoint, position, updated_at) VALUES ($1, $2, $3) "
               "ON CONFLICT (endpoint) DO UPDATE SET position = EXCLUDED.position, updated_at = EXCLUDED.updated_at")
        await self._read(lambda c: c.execute(sql, endpoint, position, _now_ms(), timeout=self.timeout), "saving an outbox cursor")

    async def outbox_trim(self, upto: str) -> int:
        s = self.schema
        xid, rowid = _position(upto)
        sql = (f"WITH d AS (DELETE FROM {s}.outbox WHERE id IN (SELECT id FROM {s}.outbox "
               "WHERE (xid, id) <= ($1::text::xid8, $2::int8) LIMIT 5000) RETURNING 1) SELECT count(*) FROM d")
        total = 0
        while True:
            n = int(await self._read(lambda c: c.fetchval(sql, xid, rowid, timeout=self.timeout), "trimming the outbox"))
            total += n
            if n < 5000:
                return total

    async def outbox_bury(self, endpoint: str, events: Sequence[tuple[str, str, bytes]], error: str) -> None:
        sql = (f"INSERT INTO {self.schema}.outbox_dead (endpoint, event_id, room, event, error, failed_at) "
               "SELECT $1, e.id, e.room, e.ev, $5, $6 FROM unnest($2::text[], $3::text[], $4::text[]) AS e(id, room, ev)")
        ids, rooms, bodies = [e[0] for e in events], [e[1] for e in events], [e[2].decode() for e in events]
        await self._read(lambda c: c.execute(sql, endpoint, ids, rooms, bodies, error, _now_ms(), timeout=self.timeout), "keeping dead letters")

    async def dead_letters(self, endpoint: str, *, after_id: int = 0, limit: int = 100) -> list[DeadLetter]:
        sql = (f"SELECT id, endpoint, event_id, room, event, error, failed_at FROM {self.schema}.outbox_dead "
               "WHERE endpoint = $1 AND id > $2 ORDER BY id LIMIT $3")
        rows = await self._fetch(sql, [endpoint, after_id, limit], "reading dead letters")
        return [DeadLetter(r[0], r[1], r[2], r[3], r[4].encode(), r[5], r[6]) for r in rows]

    async def replay_dead(self, endpoint: str, ids: Sequence[int] | None = None) -> int:
        if ids is not None and not ids:
            return 0
        s = self.schema
        which = "endpoint = $1" + (" AND id = ANY($2::int8[])" if ids is not None else "")
        sql = (f"WITH d AS (DELETE FROM {s}.outbox_dead WHERE {which} RETURNING id, room, event, endpoint) "
               f"INSERT INTO {s}.outbox (room, kind, ts, body, endpoint) "
               f"SELECT room, 'replay', (extract(epoch FROM clock_timestamp()) * 1000)::int8, event, endpoint FROM d ORDER BY id")
        args: list[Any] = [endpoint] + ([list(ids)] if ids is not None else [])
        status = await self._read(lambda c: c.execute(sql, *args, timeout=self.timeout), "replaying dead letters")
        return int(str(status).rsplit(" ", 1)[1])

    async def lead(self, name: str) -> Lease | None:
        """See :meth:`Store.lead`: a session advisory lock on a connection of its own."""
        key = zlib.crc32(f"livegate.{name}.{self.schema}".encode())
        conn = await self._connect()
        try:
            got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", key, timeout=self.timeout)
        except _ANY_DB as e:
            conn.terminate()
            raise self._unavailable(e, "taking a lease") from e
        if not got:
            await self._close_conn(conn)
            return None
        return _ConnLease(conn, key, self.timeout)

    # ---- the customer-service desk ----------------------------------------------------

    async def cs_open(self, session: CsSession) -> tuple[CsSession, bool]:
        s = self.schema
        row = [getattr(session, f).decode() if f == "card" else getattr(session, f) for f in CS_SESSION_FIELDS]
        ph = ", ".join(f"${i + 1}" for i in range(len(row)))

        async def run(conn: Any) -> tuple[CsSession, bool]:
            async with conn.transaction():
                done = await conn.fetchval(f"INSERT INTO {s}.cs_sessions ({_CS_COLS}) VALUES ({ph}) ON CONFLICT DO NOTHING RETURNING true", *row)
                if done:
                    return session, True
                got = await conn.fetchrow(f"SELECT {_CS_COLS} FROM {s}.cs_sessions WHERE shopper = $1 AND state IN {_CS_OPEN}", session.shopper)
            if got is None:
                raise ValueError(f"session id {session.id!r} is taken")
            return _cs_session(got), False

        result: tuple[CsSession, bool] = await self._read(run, "opening a desk session")
        return result

    async def cs_update(
        self, id: str, changes: dict[str, object], *, states: Sequence[str] | None = None, agent: str | bool | None = False,
    ) -> CsSession | None:
        args: list[Any] = []
        sets = []
        for k, v in changes.items():
            if k not in _CS_SETTABLE:
                raise ValueError(f"cs_update: cannot set {k!r}")
            args.append(v.decode() if isinstance(v, bytes) else v)
            sets.append(f"{k} = ${len(args)}")
        if not sets:
            raise ValueError("cs_update: nothing to change")
        args.append(_now_ms())
        sets.append(f"updated_at = ${len(args)}")
        args.append(id)
        where = [f"id = ${len(args)}"]
        if states is not None:
            args.append(list(states))
            where.append(f"state = ANY(${len(args)}::text[])")
        if agent is None:
            where.append("agent IS NULL")
        elif agent is not False:
            args.append(str(agent))
            where.append(f"agent = ${len(args)}")
        sql = f"UPDATE {self.schema}.cs_sessions SET {', '.join(sets)} WHERE {' AND '.join(where)} RETURNING {_CS_COLS}"
        rows = await self._fetch(sql, args, "updating a desk session")
        return _cs_session(rows[0]) if rows else None

    async def cs_first_response(self, id: str, at_ms: int) -> bool:
        sql = f"UPDATE {self.schema}.cs_sessions SET first_response_at = $2, updated_at = $3 WHERE id = $1 AND first_response_at IS NULL RETURNING true"
        return bool(await self._fetch(sql, [id, at_ms, _now_ms()], "updating a desk session"))

    async def cs_session(self, id: str) -> CsSession | None:
        rows = await self._fetch(f"SELECT {_CS_COLS} FROM {self.schema}.cs_sessions WHERE id = $1", [id], "reading a desk session")
        return _cs_session(rows[0]) if rows else None

    async def cs_open_session(self, shopper: str) -> CsSession | None:
        sql = f"SELECT {_CS_COLS} FROM {self.schema}.cs_sessions WHERE shopper = $1 AND state IN {_CS_OPEN}"
        rows = await self._fetch(sql, [shopper], "reading a desk session")
        return _cs_session(rows[0]) if rows else None

    async def cs_last_agent(self, shopper: str) -> str | None:
        sql = f"SELECT agent FROM {self.schema}.cs_sessions WHERE shopper = $1 AND agent IS NOT NULL ORDER BY opened_at DESC LIMIT 1"
        rows = await self._fetch(sql, [shopper], "reading a desk session")
        return str(rows[0][0]) if rows else None

    async def cs_sessions(
        self, *, states: Sequence[str] | None = None, department: str | None = None, agent: str | None = None, limit: int = 100, offset: int = 0,
    ) -> list[CsSession]:
        where: list[str] = []
        args: list[Any] = []
        if states is not None:
            args.append(list(states))
            where.append(f"state = ANY(${len(args)}::text[])")
        if department is not None:
            args.append(department)
            where.append(f"department = ${len(args)}")
        if agent is not None:
            args.append(agent)
            where.append(f"agent = ${len(args)}")
        order = "queued_at, id" if states is not None and tuple(states) == ("queued",) else "opened_at DESC, id"
        w = ("WHERE " + " AND ".join(where)) if where else ""
        sql = f"SELECT {_CS_COLS} FROM {self.schema}.cs_sessions {w} ORDER BY {order} LIMIT {int(limit)} OFFSET {int(offset)}"
        return [_cs_session(r) for r in await self._fetch(sql, args, "listing desk sessions")]

    async def cs_between(self, since_ms: int, until_ms: int, *, by: str = "opened_at", batch: int = 1000) -> AsyncIterator[CsSession]:
        if by not in ("opened_at", "rated_at"):
            raise ValueError(f"cs_between: by must be opened_at or rated_at, not {by!r}")
        sql = (f"SELECT {_CS_COLS} FROM {self.schema}.cs_sessions WHERE {by} >= $1 AND {by} < $2 AND ({by}, id) > ($3, $4) "
               f"ORDER BY {by}, id LIMIT {int(batch)}")
        key: tuple[int, str] = (since_ms - 1, "")
        while True:
            rows = await self._fetch(sql, [since_ms, until_ms, key[0], key[1]], "reading desk sessions")
            for r in rows:
                yield _cs_session(r)
            if len(rows) < batch:
                return
            last = _cs_session(rows[-1])
            key = (int(getattr(last, by)), last.id)

    async def cs_unread_replies(self, *, first_before_ms: int, limit: int = 10_000) -> list[CsUnread]:
        cols = ", ".join(f"s.{c}" for c in CS_SESSION_FIELDS)
        sc = self.schema
        sql = (f"SELECT {cols}, u.n, u.first_seq, u.first_ts FROM {sc}.cs_sessions s "
               f"JOIN {sc}.room_members r ON r.room = 'cs:' || s.id AND r.user_id = s.shopper "
               "CROSS JOIN LATERAL (SELECT count(*) AS n, min(m.seq) AS first_seq, (array_agg(m.ts ORDER BY m.seq))[1] AS first_ts "
               f"FROM {sc}.messages m WHERE m.room = r.room AND m.seq > r.last_read_seq AND m.sender IS NOT NULL AND m.sender <> s.shopper) u "
               f"WHERE s.state = 'assigned' AND u.n > 0 AND u.first_ts < $1 ORDER BY s.id LIMIT {int(limit)}")
        n = len(CS_SESSION_FIELDS)
        rows = await self._fetch(sql, [first_before_ms], "reading unread desk replies")
        return [CsUnread(_cs_session(list(r)[:n]), int(r[n]), int(r[n + 1]), int(r[n + 2])) for r in rows]

    async def cs_add_ticket(self, ticket: CsTicket) -> None:
        sql = (f"INSERT INTO {self.schema}.cs_tickets (id, shopper, department, session, fields, created_at) VALUES ($1, $2, $3, $4, $5, $6) "
               "ON CONFLICT DO NOTHING")
        args = [ticket.id, ticket.shopper, ticket.department, ticket.session, ticket.fields.decode(), ticket.created_at]
        await self._read(lambda c: c.execute(sql, *args), "storing a ticket")

    async def cs_tickets(self, since_ms: int, until_ms: int, *, limit: int = 1000) -> list[CsTicket]:
        sql = (f"SELECT id, shopper, department, fields, created_at, session FROM {self.schema}.cs_tickets "
               f"WHERE created_at >= $1 AND created_at < $2 ORDER BY created_at, id LIMIT {int(limit)}")
        rows = await self._fetch(sql, [since_ms, until_ms], "reading tickets")
        return [CsTicket(r[0], r[1], r[2], r[3].encode(), int(r[4]), r[5]) for r in rows]

    # ---- media ------------------------------------------------------------------------

    async def media_add(self, f: MediaFile) -> None:
        row = [getattr(f, k).decode() if k == "meta" else getattr(f, k) for k in MEDIA_FIELDS]
        ph = ", ".join(f"${i + 1}" for i in range(len(row)))
        sql = f"INSERT INTO {self.schema}.media ({_MEDIA_COLS}) VALUES ({ph}) ON CONFLICT DO NOTHING RETURNING true"
        if not await self._fetch(sql, row, "storing a media file"):
            raise ValueError(f"media id {f.id!r} is taken")

    async def media_get(self, id: str) -> MediaFile | None:
        rows = await self._fetch(f"SELECT {_MEDIA_COLS} FROM {self.schema}.media WHERE id = $1", [id], "reading a media file")
        return MediaFile.from_row(rows[0]) if rows else None

    async def media_get_many(self, ids: Sequence[str]) -> dict[str, MediaFile]:
        if not ids:
            return {}
        rows = await self._fetch(f"SELECT {_MEDIA_COLS} FROM {self.schema}.media WHERE id = ANY($1::text[])", [list(ids)], "reading media files")
        return {r[0]: MediaFile.from_row(r) for r in rows}

    async def media_attach(self, id: str, owner: str, room: str, at_ms: int, *, exclusive: bool) -> tuple[MediaFile | None, str]:
        """See :meth:`Store.media_attach`: one conditional ``UPDATE ... RETURNING``. Of two
        concurrent ones, the second waits for the first's row lock and then evaluates its
        condition on the row the first wrote (READ COMMITTED), so it finds the room taken.
        When it changed nothing, the row is read again to say why."""
        s = self.schema
        sql = (f"UPDATE {s}.media SET room = coalesce(room, $3), attached_at = $4, state = 'attached' "
               "WHERE id = $1 AND owner = $2 AND state <> 'removed' AND (NOT $5::bool OR room IS NULL OR room = $3) "
               f"RETURNING {_MEDIA_COLS}")
        rows = await self._fetch(sql, [id, owner, room, at_ms, exclusive], "attaching a media file")
        if rows:
            return MediaFile.from_row(rows[0]), "ok"
        got = await self._fetch(f"SELECT owner, state FROM {s}.media WHERE id = $1", [id], "reading a media file")
        return None, attach_refusal(got[0] if got else None, owner)

    async def media_ref(self, id: str, room: str, seq: int, at_ms: int) -> None:
        sql = f"INSERT INTO {self.schema}.media_refs (file_id, room, seq, at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING"
        await self._read(lambda c: c.execute(sql, id, room, seq, at_ms), "storing a media ref")

    async def media_refs(self, id: str) -> list[tuple[str, int]]:
        rows = await self._fetch(f"SELECT room, seq FROM {self.schema}.media_refs WHERE file_id = $1 ORDER BY room, seq", [id], "reading media refs")
        return [(str(r[0]), int(r[1])) for r in rows]

    async def media_set_verdict(self, id: str, verdict: str) -> MediaFile | None:
        sql = f"UPDATE {self.schema}.media SET verdict = $2 WHERE id = $1 RETURNING {_MEDIA_COLS}"
        rows = await self._fetch(sql, [id, verdict], "updating a media file")
        return MediaFile.from_row(rows[0]) if rows else None

    async def media_usage(self, owner: str, since_ms: int) -> int:
        sql = f"SELECT coalesce(sum(size), 0) FROM {self.schema}.media WHERE owner = $1 AND created_at >= $2"
        return int(await self._read(lambda c: c.fetchval(sql, owner, since_ms), "reading media usage"))

    async def media_remove(self, ids: Sequence[str]) -> int:
        s = self.schema
        return await self._media_rows(ids, "removing media files", (
            f"DELETE FROM {s}.media_refs WHERE file_id = ANY($1::text[])",
            f"WITH u AS (UPDATE {s}.media SET state = 'removed' WHERE id = ANY($1::text[]) AND state <> 'removed' RETURNING 1) "
            "SELECT count(*) FROM u",
        ))

    async def media_purge_rows(self, ids: Sequence[str]) -> int:
        s = self.schema
        return await self._media_rows(ids, "purging media files", (
            f"DELETE FROM {s}.media_refs WHERE file_id = ANY($1::text[])",
            f"WITH d AS (DELETE FROM {s}.media WHERE id = ANY($1::text[]) RETURNING 1) SELECT count(*) FROM d",
        ))

    async def _media_rows(self, ids: Sequence[str], what: str, statements: tuple[str, str]) -> int:
        """In one transaction: lock the rows of ``ids`` in id order (two nodes sweeping
        overlapping files cannot deadlock), run the first statement, then the second,
        whose value (a count) is returned."""
        if not ids:
            return 0
        wanted = list(set(ids))
        first, counted = statements

        async def run(conn: Any) -> int:
            async with conn.transaction():
                await conn.execute(f"SELECT 1 FROM {self.schema}.media WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE", wanted)
                await conn.execute(first, wanted)
                return int(await conn.fetchval(counted, wanted))

        result: int = await self._read(run, what)
        return result

    async def media_unsent(self, before_ms: int, limit: int) -> list[MediaFile]:
        sql = (f"SELECT {_MEDIA_COLS} FROM {self.schema}.media WHERE state = 'uploaded' AND created_at < $1 AND attached_at IS NULL "
               "ORDER BY created_at, id LIMIT $2")
        return [MediaFile.from_row(r) for r in await self._fetch(sql, [before_ms, limit], "reading unsent media files")]

    async def media_of_user(self, user: str, limit: int) -> list[MediaFile]:
        sql = f"SELECT {_MEDIA_COLS} FROM {self.schema}.media WHERE owner = $1 AND state <> 'removed' ORDER BY created_at, id LIMIT $2"
        return [MediaFile.from_row(r) for r in await self._fetch(sql, [user, limit], "reading a user's media files")]

    async def media_orphans(self, limit: int) -> list[MediaFile]:
        """See :meth:`Store.media_orphans`: one query (plan: an index scan of
        ``media_state`` for ``state = 'attached'`` feeding a nested-loop anti join with
        ``media_refs`` by its primary key, whose filter probes ``messages`` by its
        primary key; it stops at ``limit`` rows)."""
        s = self.schema
        sql = (f"SELECT {', '.join('f.' + c for c in MEDIA_FIELDS)} FROM {s}.media f "
               "WHERE f.state = 'attached' AND f.attached_at < $1 AND NOT EXISTS ("
               f"SELECT 1 FROM {s}.media_refs r WHERE r.file_id = f.id AND (r.at >= $1 OR EXISTS ("
               f"SELECT 1 FROM {s}.messages m WHERE m.room = r.room AND m.seq = r.seq AND m.type <> $2))) "
               "ORDER BY f.state, f.created_at LIMIT $3")
        rows = await self._fetch(sql, [_now_ms() - MEDIA_PUBLISH_GRACE_MS, RECALLED, limit], "finding orphaned media files")
        return [MediaFile.from_row(r) for r in rows]

    # ---- conversations ---------------------------------------------------------------

    def _last_seq_sql(self, arg: str) -> str:
        s = self.schema
        return (f"greatest((SELECT coalesce(max(seq), 0) FROM {s}.messages WHERE room = {arg}), "
                f"(SELECT coalesce(max(seq), 0) FROM {s}.room_floors WHERE room = {arg}))")

    async def _add_members(self, conn: Any, room: str, members: Sequence[tuple[str, str]], max_members: int, now: int) -> list[str]:
        """In the caller's transaction (the room's row locked): make ``members`` active."""
        s = self.schema
        active = {r[0] for r in await conn.fetch(f"SELECT user_id FROM {s}.room_members WHERE room = $1 AND left_seq IS NULL", room)}
        new: dict[str, str] = {}
        for user, role in members:
            if user not in active:
                new.setdefault(user, role)
        if len(active) + len(new) > max_members:
            raise TooManyMembers(f"{room} would have {len(active) + len(new)} members (at most {max_members})")
        if new:
            last = await conn.fetchval(f"SELECT {self._last_seq_sql('$1')}", room)
            await conn.execute(
                f"INSERT INTO {s}.room_members AS m (room, user_id, joined_at, last_read_seq, role, updated_at) "
                "SELECT $1, u, $2, $3, r, $2 FROM unnest($4::text[], $5::text[]) AS x(u, r) "
                "ON CONFLICT (room, user_id) DO UPDATE SET left_seq = NULL, role = EXCLUDED.role, joined_at = EXCLUDED.joined_at, "
                "last_read_seq = greatest(m.last_read_seq, EXCLUDED.last_read_seq), updated_at = EXCLUDED.updated_at",
                room, now, last, list(new), list(new.values()),
            )
        return list(new)

    async def create_conversation(
        self, room: str, kind: str, creator: str | None, meta: bytes, members: Sequence[tuple[str, str]], max_members: int,
    ) -> tuple[Conversation, bool]:
        s = self.schema
        if len(members) <= max_members and len({u for u, _ in members}) == len(members):
            # A new conversation in one statement (one round trip, no explicit transaction):
            # the common case of a dm's first message, where thousands of new pairs at once
            # took the full path's eight round trips each through the read pool.
            now = _now_ms()
            row = await self._fetch(
                f"WITH r AS (INSERT INTO {s}.rooms (room, kind, created_at, meta, creator, updated_at) "
                "VALUES ($1, $2, $3, $4::jsonb, $5, $3) ON CONFLICT (room) DO NOTHING RETURNING room, meta::text AS meta), "
                f"m AS (INSERT INTO {s}.room_members (room, user_id, joined_at, last_read_seq, role, updated_at) "
                f"SELECT r.room, x.u, $3, {self._last_seq_sql('$1')}, x.r, $3 FROM r, unnest($6::text[], $7::text[]) AS x(u, r) "
                "ON CONFLICT (room, user_id) DO UPDATE SET left_seq = NULL, role = EXCLUDED.role, joined_at = EXCLUDED.joined_at, "
                "last_read_seq = greatest(room_members.last_read_seq, EXCLUDED.last_read_seq), updated_at = EXCLUDED.updated_at) "
                "SELECT (SELECT meta FROM r)",
                [room, kind, now, meta.decode(), creator, [u for u, _ in members], [r for _, r in members]], "creating a conversation",
            )
            if row[0][0] is not None:
                return Conversation(room, kind, now, creator, row[0][0].encode(), now), True
            # It exists: the full path below makes the members active (or refuses).

        async def run(conn: Any) -> tuple[Conversation, bool]:
            now = _now_ms()
            async with conn.transaction():
                created = await conn.fetchval(
                    f"INSERT INTO {s}.rooms (room, kind, created_at, meta, creator, updated_at) VALUES ($1, $2, $3, $4::jsonb, $5, $3) "
                    "ON CONFLICT (room) DO NOTHING RETURNING true", room, kind, now, meta.decode(), creator,
                ) is not None
                await conn.execute(f"SELECT 1 FROM {s}.rooms WHERE room = $1 FOR UPDATE", room)
                if await self._add_members(conn, room, members, max_members, now) and not created:
                    await conn.execute(f"UPDATE {s}.rooms SET updated_at = $2 WHERE room = $1", room, now)
                row = await conn.fetchrow(f"SELECT {_CONV_COLS} FROM {s}.rooms WHERE room = $1", room)
            return _conversation(row), created

        result: tuple[Conversation, bool] = await self._read(run, "creating a conversation")
        return result

    async def conversation(self, room: str) -> Conversation | None:
        rows = await self._fetch(f"SELECT {_CONV_COLS} FROM {self.schema}.rooms WHERE room = $1", [room], "reading a conversation")
        return _conversation(rows[0]) if rows else None

    async def add_members(self, room: str, members: Sequence[tuple[str, str]], max_members: int) -> list[str]:
        s = self.schema

        async def run(conn: Any) -> list[str]:
            now = _now_ms()
            async with conn.transaction():
                if await conn.fetchval(f"SELECT 1 FROM {s}.rooms WHERE room = $1 FOR UPDATE", room) is None:
                    raise KeyError(room)
                added = await self._add_members(conn, room, members, max_members, now)
                if added:
                    await conn.execute(f"UPDATE {s}.rooms SET updated_at = $2 WHERE room = $1", room, now)
            return added

        result: list[str] = await self._read(run, "adding members")
        return result

    async def remove_member(self, room: str, user: str) -> Member | None:
        s = self.schema

        async def run(conn: Any) -> Member | None:
            now = _now_ms()
            async with conn.transaction():
                row = await conn.fetchrow(
                    f"UPDATE {s}.room_members SET left_seq = {self._last_seq_sql('$1')}, updated_at = $3 "
                    f"WHERE room = $1 AND user_id = $2 AND left_seq IS NULL RETURNING {_MEMBER_COLS}", room, user, now,
                )
                if row is not None:
                    await conn.execute(f"UPDATE {s}.rooms SET updated_at = $2 WHERE room = $1", room, now)
            return _member(row) if row is not None else None

        result: Member | None = await self._read(run, "removing a member")
        return result

    async def update_member(self, room: str, user: str, *, role: str | None = None, muted_until: int | bool | None = False) -> Member | None:
        sets, args = ["updated_at = $3"], [room, user, _now_ms()]
        if role is not None:
            args.append(role)
            sets.append(f"role = ${len(args)}")
        if muted_until is not False:
            args.append(muted_until)
            sets.append(f"muted_until = ${len(args)}")
        sql = f"UPDATE {self.schema}.room_members SET {', '.join(sets)} WHERE room = $1 AND user_id = $2 AND left_seq IS NULL RETURNING {_MEMBER_COLS}"
        rows = await self._fetch(sql, args, "updating a member")
        return _member(rows[0]) if rows else None

    async def member(self, room: str, user: str) -> Member | None:
        rows = await self._fetch(f"SELECT {_MEMBER_COLS} FROM {self.schema}.room_members WHERE room = $1 AND user_id = $2", [room, user], "reading a member")
        return _member(rows[0]) if rows else None

    async def members(self, room: str, *, offset: int = 0, limit: int = 100) -> list[Member]:
        sql = (f"SELECT {_MEMBER_COLS} FROM {self.schema}.room_members WHERE room = $1 AND left_seq IS NULL "
               "ORDER BY joined_at, user_id LIMIT $2 OFFSET $3")
        return [_member(r) for r in await self._fetch(sql, [room, limit, offset], "reading members")]

    async def member_count(self, room: str) -> int:
        rows = await self._fetch(f"SELECT count(*) FROM {self.schema}.room_members WHERE room = $1 AND left_seq IS NULL", [room], "counting members")
        return int(rows[0][0])

    async def user_rooms(self, user: str, limit: int) -> list[str]:
        rows = await self._fetch(
            f"SELECT room FROM {self.schema}.room_members WHERE user_id = $1 AND left_seq IS NULL ORDER BY updated_at DESC LIMIT $2",
            [user, limit + 1], "reading a user's conversations",
        )
        if len(rows) <= limit:
            return [r[0] for r in rows]
        return [c.conv.room for c in await self.user_conversations(user, limit=limit, include_left=False)]

    def _mark_read_sql(self) -> str:
        s = self.schema
        top = f"(SELECT coalesce(max(seq), 0) FROM {s}.messages WHERE room = $1)"
        return (f"UPDATE {s}.room_members SET last_read_seq = least($3, {top}), updated_at = $4 "
                f"WHERE room = $1 AND user_id = $2 AND last_read_seq < least($3, {top})")

    async def mark_read(self, room: str, user: str, seq: int) -> Member | None:
        rows = await self._fetch(self._mark_read_sql() + f" RETURNING {_MEMBER_COLS}", [room, user, seq, _now_ms()], "marking read")
        return _member(rows[0]) if rows else await self.member(room, user)

    async def mark_read_many(self, items: Sequence[tuple[str, str, int]]) -> None:
        if not items:
            return
        s = self.schema
        items = sorted(items)
        # One statement; the rows are locked in (room, user) order first (FOR UPDATE in an
        # ordered CTE), so two nodes' batches never lock the same rows in opposite orders.
        sql = (f"WITH x AS (SELECT * FROM unnest($1::text[], $2::text[], $3::int8[]) AS t(room, user_id, seq)), "
               f"locked AS (SELECT m.room, m.user_id, x.seq FROM {s}.room_members m JOIN x ON m.room = x.room AND m.user_id = x.user_id "
               "WHERE m.last_read_seq < x.seq ORDER BY m.room, m.user_id FOR UPDATE OF m) "
               f"UPDATE {s}.room_members m SET last_read_seq = l.seq, updated_at = $4 FROM locked l "
               "WHERE m.room = l.room AND m.user_id = l.user_id AND m.last_read_seq < l.seq")
        args = ([i[0] for i in items], [i[1] for i in items], [i[2] for i in items], _now_ms())
        await self._read(lambda c: c.execute(sql, *args, timeout=self.timeout), "marking read")

    async def recall(self, room: str, seq: int, by: str, at_ms: int) -> StoredMessage | None:
        s = self.schema
        tomb = orjson.dumps({"by": by, "at": at_ms}).decode()

        async def run(conn: Any) -> StoredMessage | None:
            async with conn.transaction():
                row = await conn.fetchrow(f"SELECT {_COLS} FROM {s}.messages WHERE room = $1 AND seq = $2 FOR UPDATE", room, seq)
                if row is None or row[3] == RECALLED:
                    return None
                await conn.execute(f"UPDATE {s}.messages SET type = $3, data = $4 WHERE room = $1 AND seq = $2", room, seq, RECALLED, tomb)
                await conn.execute(f"INSERT INTO {s}.recalls (room, seq, at, by) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING", room, seq, at_ms, by)
                await conn.execute(f"UPDATE {s}.rooms SET updated_at = greatest(updated_at, $2) WHERE room = $1", room, at_ms)
            return _row(row)

        result: StoredMessage | None = await self._read(run, "recalling a message")
        return result

    async def recalled_since(self, rooms: Sequence[str], since_ms: int) -> dict[str, list[int]]:
        if not rooms:
            return {}
        sql = f"SELECT room, seq FROM {self.schema}.recalls WHERE room = ANY($1::text[]) AND at > $2 ORDER BY room, seq"
        out: dict[str, list[int]] = {}
        for room, seq in await self._fetch(sql, [list(rooms), since_ms], "reading recalls"):
            out.setdefault(room, []).append(int(seq))
        return out

    async def user_conversations(
        self, user: str, *, since_ms: int = 0, limit: int = 100, before: tuple[int, str] | None = None, include_left: bool = True,
    ) -> list[ConversationState]:
        s = self.schema
        activity = "greatest(coalesce(l.ts, 0), c.updated_at, m.updated_at)"
        args: list[Any] = [user, since_ms, limit]
        where = f"m.user_id = $1 AND {activity} > $2" + ("" if include_left else " AND m.left_seq IS NULL")
        if before is not None:
            args += [before[0], before[1]]
            where += f" AND ({activity} < $4 OR ({activity} = $4 AND m.room > $5))"
        mcols = ", ".join("m." + c for c in _MEMBER_COLS.split(", "))
        ccols = ", ".join("c." + c for c in _CONV_COLS.split(", "))
        lcols = ", ".join("l." + c for c in _COLS.split(", "))
        peer = (f"CASE WHEN c.kind = 'dm' THEN (SELECT p.last_read_seq FROM {s}.room_members p "
                "WHERE p.room = m.room AND p.user_id <> m.user_id LIMIT 1) END")
        sql = (f"SELECT {mcols}, {ccols}, {lcols}, {activity} AS activity, {peer} AS peer_read "
               f"FROM {s}.room_members m JOIN {s}.rooms c ON c.room = m.room "
               f"LEFT JOIN LATERAL (SELECT {_COLS} FROM {s}.messages x WHERE x.room = m.room "
               "AND x.seq <= coalesce(m.left_seq, 9223372036854775807) ORDER BY x.seq DESC LIMIT 1) l ON true "
               f"WHERE {where} ORDER BY activity DESC, m.room LIMIT $3")
        out = []
        for r in await self._fetch(sql, args, "listing conversations"):
            last = _row(r[14:23]) if r[14] is not None else None
            out.append(ConversationState(_conversation(r[8:14]), _member(r[0:8]), last.seq if last is not None else 0, last, int(r[23]), r[24]))
        return out

    async def find_cids(self, keys: Sequence[tuple[str, str | None, str]]) -> dict[tuple[str, str, str], StoredMessage]:
        if not keys:
            return {}
        rows = await self._fetch(self._sql_by_cid, [[k[0] for k in keys], [k[1] or "" for k in keys], [k[2] for k in keys]], "reading messages by cid")
        return {(m.room, m.sender or "", m.cid or ""): m for m in map(_row, rows)}

    async def newest_messages(self, wanted: Sequence[tuple[str, int, int]]) -> dict[str, list[StoredMessage]]:
        if not wanted:
            return {}
        s = self.schema
        xcols = ", ".join("x." + c for c in _COLS.split(", "))
        sql = (f"SELECT {xcols} FROM unnest($1::text[], $2::int8[], $3::int4[]) AS k(room, after, lim) "
               f"CROSS JOIN LATERAL (SELECT {_COLS} FROM {s}.messages m WHERE m.room = k.room AND m.seq > k.after "
               "ORDER BY m.seq DESC LIMIT k.lim) x")
        rows = await self._fetch(sql, [[w[0] for w in wanted], [w[1] for w in wanted], [w[2] for w in wanted]], "reading messages")
        out: dict[str, list[StoredMessage]] = {}
        for r in rows:
            out.setdefault(r[0], []).append(_row(r))
        for msgs in out.values():
            msgs.sort(key=lambda m: m.seq)
        return out
