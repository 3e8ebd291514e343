"""The embedded store: one SQLite file in WAL mode, one writer thread that group-commits,
readers in a thread pool, a maintenance thread for checkpoints.

Threads (nothing here ever blocks the event loop):

- **the writer** (one thread, one connection) owns every write. :meth:`SqliteStore.commit`
  and :meth:`SqliteStore.archive` append to one queue; the writer takes up to
  ``max_batch`` items and writes them with one multi-row ``INSERT ... ON CONFLICT DO
  NOTHING`` statement, which in autocommit mode is one transaction. Then it resolves the
  batch's futures with one ``loop.call_soon_threadsafe``. When the queue holds fewer than
  :data:`GATHER` items it waits up to ``batch_ms`` (counted from the oldest item) for
  more; a busy writer never waits, since the queue fills while it writes. Deletions
  (:meth:`~SqliteStore.delete_user`, :meth:`~SqliteStore.expire`) and the full-text
  indexing run on the same thread, in chunks of about :data:`CHUNK_SECONDS`, between
  batches.
- **readers** (``readers`` threads, each with its own read-only connection) serve
  :meth:`~SqliteStore.messages`, :meth:`~SqliteStore.last_seq`,
  :meth:`~SqliteStore.export` and :meth:`~SqliteStore.search`. WAL lets them read while
  the writer writes.
- **maintenance** (one thread, its own connection) checks every
  :data:`MAINTENANCE_INTERVAL` that the database file is still the one that was opened
  (SQLite would go on writing into a deleted file), and runs ``wal_checkpoint(PASSIVE)``
  every :data:`CHECKPOINT_INTERVAL`: it copies WAL pages into the database beside the
  writer, never waiting for it. A passive checkpoint beside a busy writer never lets the
  WAL start again from its beginning (the WAL grew to 450 MB in 10 s at 15,000 commits/s
  in 1,000 rooms), so the writer checkpoints too, when idle past
  :data:`WAL_RESET_FRAMES` and after a commit past :data:`WAL_MAX_FRAMES`; it then finds
  most pages copied already. NOTE: with that bound the WAL stayed at 64-80 MB at 16,000-
  24,000 commits/s; the price is the p99 of saturated commits (64 in flight: 57-62 ms
  against 27-33 ms without the bound), not their rate or the latency at 1,000/s.

NOTE on ``batch_ms`` (1,000 commits/s in 1,000 rooms, ``loadtest/bench/store.py latency
--sweep batch_ms=0,2,5``): 0 ms gives p50/p99 0.1/1.2 ms, 1.2 messages a transaction,
122 us of CPU and 28 KB written per commit; 2 ms: 2.2/3.4 ms, 104 us, 17 KB; 5 ms (the
default): 3.0/5.7 ms, 72 us, 9.4 KB. Saturated throughput does not depend on it.

NOTE: one statement per batch, not ``executemany`` inside ``BEGIN``/``COMMIT``: the sqlite3
module releases the GIL around every step, and taking it back from a busy event loop
costs up to the switch interval (5 ms). With a busy Python thread beside it, 60,000 rows
of five indexes went in at 7,500 rows/s with ``executemany`` (200 rows a transaction),
10,800/s with a multi-row ``VALUES`` in ``BEGIN``/``COMMIT`` and 17,600/s with the same
statement alone (32,600/s with 1,000 rows); without the busy thread all three do
50,000-100,000/s.

Durability. ``synchronous="NORMAL"`` (the default) survives the *process* being killed
(``kill -9``, a crash): a commit is in the WAL file, in the operating system's page
cache, when its future resolves. It does not survive a power loss or a kernel crash: the
last commits before it may be lost (never corrupted). ``synchronous="FULL"`` fsyncs the
WAL at every transaction (one per batch), which is what survives a power loss.

Schema (version 5; PostgreSQL keeps the same logical schema):

- ``messages`` is a rowid table with ``id INTEGER PRIMARY KEY AUTOINCREMENT``, and
  ``(room, seq)`` is a unique index. NOTE: not ``WITHOUT ROWID`` keyed by ``(room,
  seq)``: FTS5 needs an integer rowid to point at, inserts into a rowid table append at
  its end, and the ``(room, seq)`` index entries are small. Measured with five indexes,
  100,000 messages in 500 rooms, 1,000 a transaction: 12 us of CPU per row for the rowid
  table, 20 us ``WITHOUT ROWID``; 272 against 292 bytes a message on disk.
  ``AUTOINCREMENT`` because rowids must never be reused (the full-text index counts on
  it, see below).
- ``(room, ifnull(sender, ''), cid)`` is unique where ``cid`` is set (the ``ifnull``: in a
  unique index NULLs are distinct, and server messages have no sender but may have an
  idempotency key).
- indexes on ``ts`` (export of everything), ``(sender, ts)`` (export of a user,
  :meth:`~SqliteStore.delete_user`) and ``(route, ts)`` (retention).
- ``messages_fts``: FTS5, ``tokenize='trigram'``, external content (``messages``),
  ``detail=none``. NOTE: measured over 100,000 chat messages of about 100 bytes (Chinese
  and English): ``detail=full`` 473 bytes a message on disk, ``detail=none`` 347 (the
  table without any full-text index: 272); insert CPU 61 against 55 us a row. With
  ``detail=none`` FTS5 cannot match phrases, so :meth:`~SqliteStore.search` matches the
  trigrams of the text with ``AND`` and checks each candidate with ``instr``. Contentless
  (``content=''``) costs the same to insert but cannot be rebuilt from the table.
- Indexing is *deferred*: trigram indexing costs about 50 us a message, more than the
  rest of the insert (15 us), and would halve durable commits/s. The writer indexes rows
  above the watermark ``meta.fts_indexed`` in chunks when it has nothing else to do (or
  between batches once more than :data:`FTS_MAX_LAG` rows wait), through the view
  ``messages_fts_feed`` whose trigger indexes and moves the watermark in one statement.
  :meth:`~SqliteStore.search` scans the rows above the watermark itself, so it always
  sees every committed message. A trigger removes deleted rows from the index when they
  were indexed (rowids are never reused, so "indexed" is "``id <=`` watermark").
- ``rooms`` and ``room_members``: conversations (version 3, with ``recalls``: the
  recalled (room, seq), whose message rows keep a :data:`~gateway.store.base.RECALLED`
  tombstone).
- ``cs_sessions`` and ``cs_tickets``: the customer-service desk (version 4).
- ``media`` and ``media_refs`` (version 5): uploaded files (:class:`~gateway.store.base.MediaFile`,
  ``WITHOUT ROWID`` keyed by ``id``; ``meta`` is JSON text) with indexes
  ``(owner, created_at)`` (a user's daily usage, a user's purge) and ``(state,
  created_at)`` (unsent files, the orphan sweep); and ``(file_id, room, seq, at)``, the
  messages that carry each file, keyed by ``(file_id, room, seq)`` with an index on
  ``(room, seq)`` (which files a recalled message carries). No trigger ties them to
  ``messages``: deleting or recalling a message costs nothing more, and
  :meth:`~SqliteStore.media_orphans` finds the files left without a live message by
  probing ``messages`` through its ``(room, seq)`` index. ``delete_user`` leaves both
  tables alone (the media service purges a user's files itself).
- ``meta``: ``schema_version``, ``epoch``, ``created_at``, ``clean_close``, and
  ``fts_indexed`` (SQLite only).

Search. ``text`` is matched as it appears inside the stored JSON (quotes and backslashes
escaped), ASCII-case-insensitively. Three characters or more use the trigram index.
Shorter text is refused (:class:`ValueError`) unless ``room`` is given: then the room's
messages are scanned newest first with ``instr`` (cost: the room's size).

Deletion. The compiled SQLite of Debian has ``SECURE_DELETE``: deleted rows are overwritten
in the file. The trigram index of a deleted row is removed too, but FTS5 (before 3.44's
``secure-delete`` option) keeps the old segment pages until its merges rewrite them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

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

__all__ = ["MIGRATIONS", "SqliteStore"]

log = logging.getLogger("gateway.store")

T = TypeVar("T")

#: Fewer items than this in the queue: the writer waits up to ``batch_ms`` for more.
GATHER = 32
#: Rows per INSERT statement (9 variables each; SQLite's default limit is 32,766).
ROWS_PER_STATEMENT = 1000
#: Time budget of one chunk of deletion or full-text indexing (the writer's other work
#: waits at most this long).
CHUNK_SECONDS = 0.005
#: Rows the full-text index may lag behind before the writer indexes between batches
#: even when it is busy (below this, only when it is idle), as many rows after each batch
#: as the batch had: under a sustained overload the index keeps pace and commits slow
#: down to what indexing allows, rather than search scanning an ever longer tail. NOTE:
#: 1,000 committers in 1,000 rooms, 138-byte messages: 28,000 commits/s while the index
#: may lag, 10,000-16,000/s once it must keep pace (the lag then stays within a batch of
#: the limit); a search scans the rows above the index at about 0.6 us a row, so 200,000
#: rows (7 s of such a burst) cost a search that finds fewer than its limit 0.12 s.
FTS_MAX_LAG = 200_000
#: When idle, the writer indexes a full chunk of rows, or what there is once the oldest
#: unindexed row has waited this long (seconds). NOTE: indexing whatever there was
#: whenever the writer was idle wrote 33 KB per message at 1,000 commits/s (a new FTS5
#: segment, then merges, for every 2 or 3 rows); without any indexing, 7.4 KB.
FTS_DELAY = 1.0
#: Seconds between checks that the file is still there (maintenance thread).
MAINTENANCE_INTERVAL = 0.1
#: Seconds between passive checkpoints (maintenance thread): a page changed many times
#: in between is copied once.
CHECKPOINT_INTERVAL = 1.0
#: WAL frames (pages) past which the writer checkpoints itself when it is idle (then the
#: WAL starts again from its beginning), and past which it does so even when busy
#: (SQLite's ``wal_autocheckpoint``, right after a commit): 16 MB and 64 MB of 4 KB pages.
WAL_RESET_FRAMES, WAL_MAX_FRAMES = 4096, 16_384
#: Backoff between retries of a failed archive batch.
BACKOFF_MIN, BACKOFF_MAX = 0.05, 2.0

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")

#: Schema migrations: (version, statements), applied in order, each version in one
#: transaction, by :meth:`SqliteStore.migrate`.
MIGRATIONS: list[tuple[int, tuple[str, ...]]] = [
    (1, (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            room TEXT NOT NULL,
            seq INTEGER NOT NULL,
            ts INTEGER NOT NULL,
            type TEXT NOT NULL,
            prio INTEGER NOT NULL,
            sender TEXT,
            cid TEXT,
            data TEXT NOT NULL,
            route TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE UNIQUE INDEX messages_room_seq ON messages (room, seq)",
        "CREATE UNIQUE INDEX messages_room_cid ON messages (room, ifnull(sender, ''), cid) WHERE cid IS NOT NULL",
        "CREATE INDEX messages_ts ON messages (ts)",
        "CREATE INDEX messages_sender_ts ON messages (sender, ts) WHERE sender IS NOT NULL",
        "CREATE INDEX messages_route_ts ON messages (route, ts)",
        "CREATE VIRTUAL TABLE messages_fts USING fts5 (data, content='messages', content_rowid='id', tokenize='trigram', detail='none')",
        # Indexing: INSERT INTO messages_fts_feed (upto) indexes the rows above the
        # watermark up to ``upto`` and moves the watermark, in one statement.
        "CREATE VIEW messages_fts_feed (upto) AS SELECT NULL",
        """CREATE TRIGGER messages_fts_feed_insert INSTEAD OF INSERT ON messages_fts_feed BEGIN
            INSERT INTO messages_fts (rowid, data) SELECT id, data FROM messages
                WHERE id > (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'fts_indexed') AND id <= NEW.upto;
            UPDATE meta SET value = NEW.upto WHERE key = 'fts_indexed' AND CAST(value AS INTEGER) < NEW.upto;
        END""",
        """CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages
            WHEN old.id <= (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'fts_indexed') BEGIN
            INSERT INTO messages_fts (messages_fts, rowid, data) VALUES ('delete', old.id, old.data);
        END""",
        "CREATE TABLE rooms (room TEXT PRIMARY KEY, kind TEXT NOT NULL, created_at INTEGER NOT NULL, meta TEXT) WITHOUT ROWID",
        """CREATE TABLE room_members (
            room TEXT NOT NULL,
            user_id TEXT NOT NULL,
            joined_at INTEGER NOT NULL,
            last_read_seq INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (room, user_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX room_members_user ON room_members (user_id)",
        "INSERT INTO meta (key, value) VALUES ('fts_indexed', '0'), ('clean_close', '1'), "
        "('created_at', CAST(CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) AS TEXT)), ('epoch', lower(hex(randomblob(8))))",
    )),
    (2, (
        # The outbox log: an entry per message written while meta.outbox is '1' (the
        # trigger: inside the INSERT statement, so in its transaction, at no extra
        # statement), and room events. AUTOINCREMENT: ids are the log order (one writer
        # at a time holds the file's write lock from the insert to the commit).
        """CREATE TABLE outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            room TEXT NOT NULL,
            seq INTEGER,
            kind TEXT NOT NULL,
            ts INTEGER NOT NULL,
            body TEXT,
            endpoint TEXT
        )""",
        """CREATE TRIGGER messages_outbox AFTER INSERT ON messages WHEN (SELECT value FROM meta WHERE key = 'outbox') = '1' BEGIN
            INSERT INTO outbox (room, seq, kind, ts) VALUES (new.room, new.seq, 'message', new.ts);
        END""",
        "CREATE TABLE outbox_cursors (endpoint TEXT PRIMARY KEY, position TEXT NOT NULL, updated_at INTEGER NOT NULL) WITHOUT ROWID",
        """CREATE TABLE outbox_dead (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            endpoint TEXT NOT NULL,
            event_id TEXT NOT NULL,
            room TEXT NOT NULL,
            event TEXT NOT NULL,
            error TEXT NOT NULL,
            failed_at INTEGER NOT NULL
        )""",
        "CREATE INDEX outbox_dead_endpoint ON outbox_dead (endpoint, id)",
        # The highest seq of each room's deleted messages (retention, erasure), so that
        # last_seq never goes back and a seq is never used twice in a room.
        "CREATE TABLE room_floors (room TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID",
        """CREATE TRIGGER messages_floor AFTER DELETE ON messages BEGIN
            INSERT INTO room_floors (room, seq) VALUES (old.room, old.seq) ON CONFLICT (room) DO UPDATE SET seq = max(seq, excluded.seq);
        END""",
        "INSERT INTO meta (key, value) VALUES ('outbox', '0') ON CONFLICT (key) DO NOTHING",
    )),
    (3, (
        # Conversations: the rooms and room_members of version 1 come into use.
        "ALTER TABLE rooms ADD COLUMN creator TEXT",
        "ALTER TABLE rooms ADD COLUMN updated_at INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE room_members ADD COLUMN role TEXT NOT NULL DEFAULT 'member'",
        "ALTER TABLE room_members ADD COLUMN muted_until INTEGER",
        "ALTER TABLE room_members ADD COLUMN left_seq INTEGER",
        "ALTER TABLE room_members ADD COLUMN updated_at INTEGER NOT NULL DEFAULT 0",
        "CREATE TABLE recalls (room TEXT NOT NULL, seq INTEGER NOT NULL, at INTEGER NOT NULL, by TEXT NOT NULL, PRIMARY KEY (room, seq)) WITHOUT ROWID",
        "CREATE INDEX recalls_at ON recalls (room, at)",
        # A recall rewrites a message's data: its trigrams follow (when it was indexed).
        """CREATE TRIGGER messages_fts_update AFTER UPDATE OF data ON messages
            WHEN old.id <= (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'fts_indexed') BEGIN
            INSERT INTO messages_fts (messages_fts, rowid, data) VALUES ('delete', old.id, old.data);
            INSERT INTO messages_fts (rowid, data) VALUES (new.id, new.data);
        END""",
    )),
    (4, (
        # The customer-service desk: sessions (one open per shopper) and offline forms.
        """CREATE TABLE cs_sessions (
            id TEXT PRIMARY KEY,
            shopper TEXT NOT NULL,
            department TEXT NOT NULL,
            state TEXT NOT NULL,
            opened_at INTEGER NOT NULL,
            agent TEXT,
            queued_at INTEGER,
            assigned_at INTEGER,
            first_response_at INTEGER,
            closed_at INTEGER,
            closed_by TEXT,
            last_agent TEXT,
            rating INTEGER,
            rating_comment TEXT,
            rated_at INTEGER,
            card TEXT NOT NULL DEFAULT 'null',
            transfers INTEGER NOT NULL DEFAULT 0,
            bot_turns INTEGER NOT NULL DEFAULT 0,
            updated_at INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID""",
        "CREATE UNIQUE INDEX cs_sessions_open ON cs_sessions (shopper) WHERE state IN ('bot', 'queued', 'assigned')",
        "CREATE INDEX cs_sessions_shopper ON cs_sessions (shopper, opened_at)",
        "CREATE INDEX cs_sessions_state ON cs_sessions (state, department, queued_at)",
        "CREATE INDEX cs_sessions_agent ON cs_sessions (agent, state) WHERE agent IS NOT NULL",
        "CREATE INDEX cs_sessions_opened ON cs_sessions (opened_at, id)",
        "CREATE INDEX cs_sessions_rated ON cs_sessions (rated_at, id) WHERE rated_at IS NOT NULL",
        """CREATE TABLE cs_tickets (
            id TEXT PRIMARY KEY,
            shopper TEXT NOT NULL,
            department TEXT NOT NULL,
            session TEXT,
            fields TEXT NOT NULL,
            created_at INTEGER NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX cs_tickets_created ON cs_tickets (created_at)",
    )),
    (5, (
        # Media: uploaded files and the messages that carry them (see the module docstring).
        """CREATE TABLE media (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            kind TEXT NOT NULL,
            mime TEXT NOT NULL,
            size INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            name TEXT NOT NULL DEFAULT '',
            meta TEXT NOT NULL DEFAULT '{}',
            key TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            room TEXT,
            attached_at INTEGER,
            state TEXT NOT NULL DEFAULT 'uploaded',
            verdict TEXT
        ) WITHOUT ROWID""",
        "CREATE INDEX media_owner ON media (owner, created_at)",
        "CREATE INDEX media_state ON media (state, created_at)",
        """CREATE TABLE media_refs (
            file_id TEXT NOT NULL,
            room TEXT NOT NULL,
            seq INTEGER NOT NULL,
            at INTEGER NOT NULL,
            PRIMARY KEY (file_id, room, seq)
        ) WITHOUT ROWID""",
        "CREATE INDEX media_refs_room ON media_refs (room, seq)",
    )),
]

_COLUMNS = "room, seq, ts, type, prio, sender, data, cid, route"
_VALUES = "(?,?,?,?,?,?,?,?,?)"
_Row = tuple[str, int, int, str, int, str | None, str, str | None, str]
#: A commit's future, what to settle it with, and when it was called (for the latency).
_Result = tuple["asyncio.Future[StoredMessage]", "StoredMessage | BaseException", float]


def _row(m: StoredMessage) -> _Row:
    """The row of ``m`` (``data`` decoded: the column is TEXT); raises on a malformed message."""
    return (m.room, m.seq, m.ts, m.type, m.prio, m.sender, m.data.decode(), m.cid, m.route)


def _message(r: Any) -> StoredMessage:
    return StoredMessage(r[0], r[1], r[2], r[3], r[4], r[5], r[6].encode(), r[7], r[8])


def _insert_sql(n: int) -> str:
    return f"INSERT INTO messages ({_COLUMNS}) VALUES " + ",".join([_VALUES] * n) + " ON CONFLICT DO NOTHING"


def _failing(e: BaseException) -> bool:
    """True when ``e`` says the database fails (locked, full, I/O, gone), False when it is
    about the values written (a constraint, a string that cannot be encoded, an integer
    too large): retrying the first may work, retrying the second never will."""
    if isinstance(e, StoreUnavailable | sqlite3.OperationalError | sqlite3.InternalError | sqlite3.NotSupportedError):
        return True
    return type(e) is sqlite3.DatabaseError  # corrupt, not a database, ...


def _unavailable(e: BaseException, what: str) -> StoreUnavailable:
    return StoreUnavailable(f"sqlite store: {what} failed: {e}")


_EVENT_SQL = "INSERT INTO outbox (room, kind, ts, body) VALUES "
_OUTBOX_COLS = "o.id, o.room, o.seq, o.kind, o.ts, o.body, o.endpoint, " + ", ".join(f"m.{c.strip()}" for c in _COLUMNS.split(","))


def _entry(r: Any) -> OutboxEntry:
    msg = _message(r[7:]) if r[7] is not None else None
    return OutboxEntry(str(r[0]), r[1], r[3], r[4], r[2], msg, r[5].encode() if r[5] is not None else None, r[6])


class _Item:
    """A queued message: a commit (with its future) or an archive (``fut`` None); or a
    room event for the outbox log (``msg`` None, ``row`` (room, kind, ts, body))."""

    __slots__ = ("fut", "msg", "row", "t0")

    def __init__(self, msg: StoredMessage | None, row: Any, fut: asyncio.Future[StoredMessage] | None, t0: float) -> None:
        self.msg = msg
        self.row = row
        self.fut = fut
        self.t0 = t0


class _Job:
    """A deletion run by the writer in chunks: ``sql`` deletes at most ``?`` (last
    parameter) rows; done when a chunk deletes fewer than asked or ``remaining`` is 0."""

    __slots__ = ("args", "deleted", "fut", "remaining", "sql")

    def __init__(self, sql: str, args: tuple[Any, ...], remaining: float, fut: asyncio.Future[int]) -> None:
        self.sql = sql
        self.args = args
        self.remaining = remaining
        self.deleted = 0
        self.fut = fut


class _Pacer:
    """Rows per chunk so that a chunk takes about :data:`CHUNK_SECONDS`."""

    __slots__ = ("per_row",)

    def __init__(self, per_row: float) -> None:
        self.per_row = per_row

    def rows(self) -> int:
        return max(16, min(10_000, int(CHUNK_SECONDS / self.per_row)))

    def observe(self, rows: int, seconds: float) -> None:
        if rows > 0:
            self.per_row = 0.7 * self.per_row + 0.3 * (seconds / rows)


_DELETE_USER = "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE sender = ? LIMIT ?)"
_EXPIRE = "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE route = ? AND ts < ? ORDER BY ts LIMIT ?)"


def _connect(path: str, *, timeout: float, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True, timeout=timeout, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA query_only = ON")
    else:
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    return conn


def _schema_version(conn: sqlite3.Connection) -> int | None:
    """The version in ``meta``: -1 for an empty database, None for one that is not a store."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
        empty = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        return -1 if empty else None
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    try:
        return int(row[0]) if row is not None else None
    except ValueError:
        return None


def _migrate(conn: sqlite3.Connection, path: str) -> tuple[int, int]:
    """Apply the missing :data:`MIGRATIONS`, all of them in one IMMEDIATE transaction, so
    no other process ever sees a version in between (another process migrating or
    creating the file at the same time waits for the lock, then finds nothing to do; the
    worker processes of ``server.workers`` open a new file at the same moment)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = _schema_version(conn)
        if current is None:
            raise SchemaError(f"{path} is not a livegate store (it has tables but no schema version in meta)")
        if current > SCHEMA_VERSION:
            raise SchemaError(f"{path} has schema version {current}, newer than this gateway's ({SCHEMA_VERSION}): upgrade the gateway")
        before = max(current, 0)
        for version, statements in MIGRATIONS:
            if version <= current:
                continue
            try:
                for sql in statements:
                    conn.execute(sql)
            except sqlite3.Error as e:
                raise SchemaError(f"{path}: migration from schema version {max(current, 0)} to {version} failed: {e}") from e
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(version),))
            current = version
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if current != before:
        log.info("store %s: schema migrated from version %d to %d", path, before, current)
    return before, max(current, 0)


class SqliteStore(Store):
    """The embedded store: messages in one SQLite file (WAL), written by one thread that
    group-commits, read by a pool of threads. See the module docstring for the design.

    ``path``: the database file (its parent directories are created). ``batch_ms``: how
    long the writer waits for more work when its queue is nearly empty. ``max_batch``:
    messages per transaction at most. ``max_backlog``: messages :meth:`archive` may hold
    (queued or being written); past it, archives are refused. ``readers``: reader threads.
    ``synchronous``: ``"NORMAL"`` survives a process crash, ``"FULL"`` a power loss.
    ``busy_timeout``: seconds a write waits for a lock held by another process (e.g. a
    backup or ``gateway migrate``) before the batch fails.

    Stats: the writer thread updates ``committed``, ``archived``, ``duplicates``,
    ``errors``, ``batches`` and ``batched_messages``; the event loop updates
    ``archive_dropped`` and the latency histogram.
    """

    kind = "sqlite"

    def __init__(
        self, path: str, *, batch_ms: float = 5.0, max_batch: int = 1000, max_backlog: int = 100_000, readers: int = 4,
        synchronous: str = "NORMAL", busy_timeout: float = 2.0,
    ) -> None:
        super().__init__()
        if synchronous.upper() not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, not {synchronous!r}")
        if max_batch < 1 or max_backlog < 1 or readers < 1:
            raise ValueError("max_batch, max_backlog and readers must be positive")
        self.path = str(path)
        self.batch_s = max(0.0, batch_ms / 1000.0)
        self.max_batch = max_batch
        self.max_backlog = max_backlog
        self.readers = readers
        self.synchronous = synchronous.upper()
        self.busy_timeout = busy_timeout
        # Shared between the loop and the writer, under _cond.
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Item] = deque()
        self._queued_commits = 0
        self._inflight = 0
        self._jobs: deque[_Job] = deque()
        #: Small writes run once on the writer thread (outbox cursors, dead letters).
        self._calls: deque[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = deque()
        self._wake_commit = 1  # the writer waits: notify when the queue reaches this size
        self._wake_archive = 1
        self._retry_at = 0.0  # archive retries wait until then (backoff)
        self._stop_at: float | None = None  # set by close(): flush until then
        self._moved: str | None = None  # set by the maintenance thread: the file is gone
        # The writer's own state.
        self._backoff = 0.0
        self._last_id = 0
        self._fts_indexed = 0
        self._fts_since = 0.0  # when the oldest row not indexed yet was written (0: none)
        self._fts_pacer = _Pacer(50e-6)
        self._delete_pacer = _Pacer(100e-6)
        self._turn = False  # after a batch, a deletion chunk or index chunk gets a turn
        self._last_batch = 0  # messages in the last batch written
        self._reset_wal = False  # set by the maintenance thread: checkpoint when idle
        # Threads.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: threading.Thread | None = None
        self._closed_fut: concurrent.futures.Future[int] | None = None
        self._maint: threading.Thread | None = None
        self._maint_stop = threading.Event()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._state = "new"  # new -> open -> closing -> closed
        self._identity: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the file opened

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Open (creating the file and its schema when it is new), check the schema, set
        :attr:`epoch`, start the writer, the maintenance thread and the reader pool.
        :class:`SchemaError` when the file is at another schema version;
        :class:`StoreUnavailable` when it cannot be opened."""
        if self._state != "new":
            raise RuntimeError("SqliteStore.start() called twice")
        self._loop = asyncio.get_running_loop()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._closed_fut = concurrent.futures.Future()
        self._writer = threading.Thread(target=self._writer_main, args=(ready,), name="store-writer", daemon=True)
        self._writer.start()
        try:
            await asyncio.wrap_future(ready)
        except BaseException:
            self._state = "closed"
            raise
        self._pool = concurrent.futures.ThreadPoolExecutor(self.readers, thread_name_prefix="store-read")
        self._maint = threading.Thread(target=self._maintenance_main, name="store-maintenance", daemon=True)
        self._maint.start()
        self._state = "open"

    async def close(self, timeout: float = 5.0) -> None:
        """Refuse new work, write what is queued (for up to ``timeout`` seconds, plus at
        most ``busy_timeout`` for a write under way), mark the file closed cleanly when
        nothing was left behind, checkpoint the WAL and stop every thread. Commits still
        queued at the deadline fail with :class:`StoreUnavailable`; archives are counted
        in ``archive_dropped``. Idempotent."""
        if self._state in ("new", "closed"):
            self._state = "closed"
            return
        if self._state == "closing":
            assert self._closed_fut is not None
            await asyncio.wrap_future(self._closed_fut)
            return
        self._state = "closing"
        self._maint_stop.set()
        assert self._maint is not None and self._writer is not None and self._closed_fut is not None
        await asyncio.to_thread(self._maint.join)
        with self._cond:
            self._stop_at = time.perf_counter() + max(0.0, timeout)
            self._cond.notify()
        dropped = await asyncio.wrap_future(self._closed_fut)
        self.stats.archive_dropped += dropped
        await asyncio.to_thread(self._writer.join)
        if self._pool is not None:
            await asyncio.to_thread(self._pool.shutdown, True)
        with self._readers_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()
        self._state = "closed"

    async def migrate(self) -> tuple[int, int]:
        """Bring the file to :data:`SCHEMA_VERSION` (creating it and its schema when
        missing), each version in one transaction; safe while a store uses the file."""

        def run() -> tuple[int, int]:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = _connect(self.path, timeout=self.busy_timeout)
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return _migrate(conn, self.path)
            finally:
                conn.close()

        try:
            return await asyncio.to_thread(run)
        except sqlite3.Error as e:
            raise _unavailable(e, "migrate") from e

    # ---- writing -----------------------------------------------------------------------

    async def commit(self, msg: StoredMessage) -> StoredMessage:
        """See :meth:`Store.commit`. The future resolves after the batch's transaction
        committed (``synchronous`` decides what that survives)."""
        if self._state != "open":
            raise StoreUnavailable("sqlite store is not open")
        assert self._loop is not None
        fut: asyncio.Future[StoredMessage] = self._loop.create_future()
        item = _Item(msg, _row(msg), fut, time.perf_counter())
        with self._cond:
            q = self._queue
            q.append(item)
            self._queued_commits += 1
            if len(q) >= self._wake_commit:
                self._cond.notify()
        return await fut

    def archive(self, msg: StoredMessage) -> bool:
        """See :meth:`Store.archive`. False (and ``archive_dropped``) when the store is not
        open, the backlog is full, or ``msg`` cannot be stored (malformed)."""
        if self._state != "open":
            self.stats.archive_dropped += 1
            return False
        try:
            row = _row(msg)
        except Exception:
            log.exception("store: cannot archive a malformed message")
            self.stats.archive_dropped += 1
            return False
        if not self._enqueue(_Item(msg, row, None, time.perf_counter())):
            self.stats.archive_dropped += 1
            return False
        return True

    def _enqueue(self, item: _Item) -> bool:
        """Queue a write-behind item (an archive message, an outbox event) for the
        writer; False when the backlog (``max_backlog``) is full."""
        with self._cond:
            q = self._queue
            if len(q) + self._inflight >= self.max_backlog:
                return False
            q.append(item)
            if len(q) >= self._wake_archive:
                self._cond.notify()
        return True

    @property
    def backlog(self) -> int:
        """Messages queued (commits and archives) or being written."""
        return len(self._queue) + self._inflight

    # ---- reading -----------------------------------------------------------------------

    async def last_seq(self, room: str) -> int:
        """See :meth:`Store.last_seq`; never lower than the seq of a deleted message."""

        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT max(ifnull((SELECT max(seq) FROM messages WHERE room = ?1), 0), ifnull((SELECT seq FROM room_floors WHERE room = ?1), 0))",
                (room,),
            ).fetchone()
            return int(row[0])

        return await self._read(run, "last_seq")

    async def messages(
        self, room: str, *, before_seq: int | None = None, after_seq: int | None = None, limit: int = 100,
    ) -> list[StoredMessage]:
        """See :meth:`Store.messages`. With both ``before_seq`` and ``after_seq``: the
        oldest ones between them."""
        if limit <= 0:
            return []

        def run(conn: sqlite3.Connection) -> list[StoredMessage]:
            if after_seq is not None:
                hi = before_seq if before_seq is not None else 2**63 - 1
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND seq > ? AND seq < ? ORDER BY seq LIMIT ?", (room, after_seq, hi, limit),
                ).fetchall()
                return [_message(r) for r in rows]
            hi = before_seq if before_seq is not None else 2**63 - 1
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND seq < ? ORDER BY seq DESC LIMIT ?", (room, hi, limit),
            ).fetchall()
            return [_message(r) for r in reversed(rows)]

        return await self._read(run, "messages")

    async def export(
        self, *, since_ms: int, until_ms: int, room: str | None = None, sender: str | None = None, batch: int = 1000,
    ) -> AsyncIterator[StoredMessage]:
        """See :meth:`Store.export`. Each batch is one query (keyset paging: by ``seq``
        for a room, by ``(ts, id)`` otherwise), so rows written meanwhile may appear and
        memory holds one batch. For a room, the ``(room, seq)`` index is scanned and
        filtered by time: the cost grows with the room, not with the range."""
        batch = max(1, batch)
        if room is not None:
            sql = f"SELECT {_COLUMNS}, seq FROM messages WHERE room = ? AND seq > ? AND ts >= ? AND ts < ?"
            if sender is not None:
                sql += " AND sender = ?"
            sql += " ORDER BY seq LIMIT ?"
            seq = -(2**63)
            while True:
                args: tuple[Any, ...] = (room, seq, since_ms, until_ms, *((sender,) if sender is not None else ()), batch)
                rows = await self._read(_fetch(sql, args), "export")
                for r in rows:
                    yield _message(r)
                if len(rows) < batch:
                    return
                seq = rows[-1][9]
        where = "sender = ? AND " if sender is not None else ""
        sql = f"SELECT {_COLUMNS}, ts, id FROM messages WHERE {where}ts >= ? AND ts < ? AND (ts, id) > (?, ?) ORDER BY ts, id LIMIT ?"
        ts, rowid = since_ms, -1
        while True:
            args = (*((sender,) if sender is not None else ()), since_ms, until_ms, ts, rowid, batch)
            rows = await self._read(_fetch(sql, args), "export")
            for r in rows:
                yield _message(r)
            if len(rows) < batch:
                return
            ts, rowid = rows[-1][9], rows[-1][10]

    async def search(self, text: str, *, room: str | None = None, limit: int = 50) -> list[StoredMessage]:
        """See :meth:`Store.search` and the module docstring: ``text`` as it appears in
        the JSON, ASCII-case-insensitive; newest (last stored) first. Fewer than three
        characters: :class:`ValueError` without ``room``, a scan of the room with it."""
        needle = orjson.dumps(text)[1:-1].decode()  # as written inside a JSON string
        if not needle:
            raise ValueError("search text is empty")
        if len(needle) < 3 and room is None:
            raise ValueError("search needs at least 3 characters (or a room, whose messages are then scanned)")
        if limit <= 0:
            return []
        where_room = " AND m.room = ?" if room is not None else ""
        room_arg: tuple[str, ...] = (room,) if room is not None else ()

        def short(conn: sqlite3.Connection) -> list[StoredMessage]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM messages m WHERE room = ? AND instr(lower(data), lower(?)) > 0 ORDER BY seq DESC LIMIT ?", (room, needle, limit),
            ).fetchall()
            return [_message(r) for r in rows]

        def indexed(conn: sqlite3.Connection) -> list[StoredMessage]:
            cols = ", ".join(f"m.{c.strip()}" for c in _COLUMNS.split(","))
            conn.execute("BEGIN")  # one snapshot: the watermark and both queries
            try:
                mark = int(conn.execute("SELECT value FROM meta WHERE key = 'fts_indexed'").fetchone()[0])
                # Rows not indexed yet: a scan of the rowid range above the watermark.
                rows = conn.execute(
                    f"SELECT {cols} FROM messages m WHERE m.id > ? AND instr(lower(m.data), lower(?)) > 0{where_room} ORDER BY m.id DESC LIMIT ?",
                    (mark, needle, *room_arg, limit),
                ).fetchall()
                if len(rows) < limit:
                    rows += conn.execute(
                        f"SELECT {cols} FROM messages_fts f JOIN messages m ON m.id = f.rowid "
                        f"WHERE messages_fts MATCH ? AND instr(lower(m.data), lower(?)) > 0{where_room} ORDER BY f.rowid DESC LIMIT ?",
                        (_trigram_query(needle), needle, *room_arg, limit - len(rows)),
                    ).fetchall()
            finally:
                conn.execute("COMMIT")
            return [_message(r) for r in rows]

        return await self._read(short if len(needle) < 3 else indexed, "search")

    # ---- the data's life ---------------------------------------------------------------

    async def delete_user(self, user: str) -> int:
        """See :meth:`Store.delete_user`: chunks of about :data:`CHUNK_SECONDS` on the
        writer thread, between batches."""
        return await self._job(_DELETE_USER, (user,), float("inf"))

    async def expire(self, route: str, before_ms: int, batch: int = 5000) -> int:
        """See :meth:`Store.expire`: the oldest first, in chunks on the writer thread."""
        if batch <= 0:
            return 0
        return await self._job(_EXPIRE, (route, before_ms), float(batch))

    async def _job(self, sql: str, args: tuple[Any, ...], remaining: float) -> int:
        if self._state != "open":
            raise StoreUnavailable("sqlite store is not open")
        assert self._loop is not None
        fut: asyncio.Future[int] = self._loop.create_future()
        with self._cond:
            self._jobs.append(_Job(sql, args, remaining, fut))
            self._cond.notify()
        return await fut

    # ---- the outbox log ----------------------------------------------------------------

    def event(self, room: str, kind: str, body: bytes) -> bool:
        """See :meth:`Store.event`: queued with the messages, written by the same writer."""
        if self._state != "open" or not self.outbox:
            self.stats.events_dropped += 1
            return False
        row = (room, kind, int(time.time() * 1000), body.decode())
        if not self._enqueue(_Item(None, row, None, time.perf_counter())):
            self.stats.events_dropped += 1
            return False
        return True

    async def outbox_read(self, after: str | None, limit: int) -> list[OutboxEntry]:
        """See :meth:`Store.outbox_read`: by id (the log order: one writer at a time)."""
        sql = (f"SELECT {_OUTBOX_COLS} FROM outbox o LEFT JOIN messages m ON o.kind = 'message' AND m.room = o.room AND m.seq = o.seq "
               "WHERE o.id > ? ORDER BY o.id LIMIT ?")
        rows = await self._read(_fetch(sql, (int(after or 0), limit)), "outbox_read")
        return [_entry(r) for r in rows]

    def outbox_order(self, position: str) -> tuple[int, ...]:
        return (int(position),)

    async def outbox_backlog(self, after: str | None) -> tuple[int, int]:
        def run(conn: sqlite3.Connection) -> tuple[int, int]:
            pos = int(after or 0)
            top, ts = conn.execute(
                "SELECT (SELECT ifnull(max(id), 0) FROM outbox), (SELECT ts FROM outbox WHERE id > ?1 ORDER BY id LIMIT 1)", (pos,),
            ).fetchone()
            return max(0, int(top) - pos), int(ts or 0)

        return await self._read(run, "outbox_backlog")

    async def outbox_cursor(self, endpoint: str) -> str | None:
        rows = await self._read(_fetch("SELECT position FROM outbox_cursors WHERE endpoint = ?", (endpoint,)), "outbox_cursor")
        return str(rows[0][0]) if rows else None

    async def outbox_save(self, endpoint: str, position: str) -> None:
        sql = ("INSERT INTO outbox_cursors (endpoint, position, updated_at) VALUES (?, ?, ?) "
               "ON CONFLICT (endpoint) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at")
        await self._call(lambda conn: conn.execute(sql, (endpoint, position, int(time.time() * 1000))))

    async def outbox_trim(self, upto: str) -> int:
        return await self._job("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE id <= ? ORDER BY id LIMIT ?)", (int(upto),), float("inf"))

    async def outbox_bury(self, endpoint: str, events: Sequence[tuple[str, str, bytes]], error: str) -> None:
        now = int(time.time() * 1000)
        rows = [(endpoint, eid, room, body.decode(), error, now) for eid, room, body in events]

        def run(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO outbox_dead (endpoint, event_id, room, event, error, failed_at) VALUES (?, ?, ?, ?, ?, ?)", rows)
            conn.execute("COMMIT")

        await self._call(run)

    async def dead_letters(self, endpoint: str, *, after_id: int = 0, limit: int = 100) -> list[DeadLetter]:
        sql = "SELECT id, endpoint, event_id, room, event, error, failed_at FROM outbox_dead WHERE endpoint = ? AND id > ? ORDER BY id LIMIT ?"
        rows = await self._read(_fetch(sql, (endpoint, after_id, limit)), "dead_letters")
        return [DeadLetter(r[0], r[1], r[2], r[3], r[4].encode(), r[5], r[6]) for r in rows]

    async def replay_dead(self, endpoint: str, ids: Sequence[int] | None = None) -> int:
        where = "endpoint = ?" + (f" AND id IN ({','.join('?' * len(ids))})" if ids is not None else "")
        args: tuple[Any, ...] = (endpoint, *(ids or ()))
        if ids is not None and not ids:
            return 0

        def run(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            n = conn.execute(
                f"INSERT INTO outbox (room, kind, ts, body, endpoint) SELECT room, 'replay', ?, event, endpoint FROM outbox_dead WHERE {where} ORDER BY id",
                (int(time.time() * 1000), *args),
            ).rowcount
            conn.execute(f"DELETE FROM outbox_dead WHERE {where}", args)
            conn.execute("COMMIT")
            return int(n)

        n: int = await self._call(run)
        return n

    async def lead(self, name: str) -> Lease | None:
        """See :meth:`Store.lead`: an exclusive ``flock`` on ``<path>.<name>.lock`` (every
        process on this machine that uses the file competes for it)."""
        import fcntl

        def take() -> int | None:
            fd = os.open(f"{self.path}.{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            return fd

        try:
            fd = await asyncio.to_thread(take)
        except OSError as e:
            raise _unavailable(e, "lead") from e
        return None if fd is None else _FileLease(fd)

    # ---- conversations -----------------------------------------------------------------

    async def create_conversation(
        self, room: str, kind: str, creator: str | None, meta: bytes, members: Sequence[tuple[str, str]], max_members: int,
    ) -> tuple[Conversation, bool]:
        def run(conn: sqlite3.Connection) -> tuple[Conversation, bool]:
            now = _now_ms()
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(f"SELECT {_CONV_COLS} FROM rooms WHERE room = ?", (room,)).fetchone()
                created = row is None
                if created:
                    conn.execute("INSERT INTO rooms (room, kind, created_at, meta, creator, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                                 (room, kind, now, meta.decode(), creator, now))
                if _add_members(conn, room, members, max_members, now) and not created:
                    conn.execute("UPDATE rooms SET updated_at = ? WHERE room = ?", (now, room))
                row = conn.execute(f"SELECT {_CONV_COLS} FROM rooms WHERE room = ?", (room,)).fetchone()
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return _conversation(row), created

        return await self._call(run)

    async def conversation(self, room: str) -> Conversation | None:
        rows = await self._read(_fetch(f"SELECT {_CONV_COLS} FROM rooms WHERE room = ?", (room,)), "conversation")
        return _conversation(rows[0]) if rows else None

    async def add_members(self, room: str, members: Sequence[tuple[str, str]], max_members: int) -> list[str]:
        def run(conn: sqlite3.Connection) -> list[str]:
            now = _now_ms()
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute("SELECT 1 FROM rooms WHERE room = ?", (room,)).fetchone() is None:
                    raise KeyError(room)
                added = _add_members(conn, room, members, max_members, now)
                if added:
                    conn.execute("UPDATE rooms SET updated_at = ? WHERE room = ?", (now, room))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return added

        return await self._call(run)

    async def remove_member(self, room: str, user: str) -> Member | None:
        def run(conn: sqlite3.Connection) -> Member | None:
            now = _now_ms()
            conn.execute("BEGIN IMMEDIATE")
            try:
                last = _last_seq(conn, room)
                row = conn.execute(
                    f"UPDATE room_members SET left_seq = ?, updated_at = ? WHERE room = ? AND user_id = ? AND left_seq IS NULL RETURNING {_MEMBER_COLS}",
                    (last, now, room, user),
                ).fetchone()
                if row is not None:
                    conn.execute("UPDATE rooms SET updated_at = ? WHERE room = ?", (now, room))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return _member(row) if row is not None else None

        return await self._call(run)

    async def update_member(self, room: str, user: str, *, role: str | None = None, muted_until: int | bool | None = False) -> Member | None:
        sets, args = ["updated_at = ?"], [_now_ms()]
        if role is not None:
            sets.append("role = ?")
            args.append(role)  # type: ignore[arg-type]
        if muted_until is not False:
            sets.append("muted_until = ?")
            args.append(muted_until)  # type: ignore[arg-type]
        sql = f"UPDATE room_members SET {', '.join(sets)} WHERE room = ? AND user_id = ? AND left_seq IS NULL RETURNING {_MEMBER_COLS}"

        def run(conn: sqlite3.Connection) -> Member | None:
            row = conn.execute(sql, (*args, room, user)).fetchone()
            return _member(row) if row is not None else None

        return await self._call(run)

    async def member(self, room: str, user: str) -> Member | None:
        rows = await self._read(_fetch(f"SELECT {_MEMBER_COLS} FROM room_members WHERE room = ? AND user_id = ?", (room, user)), "member")
        return _member(rows[0]) if rows else None

    async def members(self, room: str, *, offset: int = 0, limit: int = 100) -> list[Member]:
        sql = f"SELECT {_MEMBER_COLS} FROM room_members WHERE room = ? AND left_seq IS NULL ORDER BY joined_at, user_id LIMIT ? OFFSET ?"
        return [_member(r) for r in await self._read(_fetch(sql, (room, limit, offset)), "members")]

    async def member_count(self, room: str) -> int:
        rows = await self._read(_fetch("SELECT count(*) FROM room_members WHERE room = ? AND left_seq IS NULL", (room,)), "member_count")
        return int(rows[0][0])

    async def user_rooms(self, user: str, limit: int) -> list[str]:
        sql = "SELECT room FROM room_members WHERE user_id = ? AND left_seq IS NULL ORDER BY updated_at DESC LIMIT ?"
        rows = await self._read(_fetch(sql, (user, limit + 1)), "user_rooms")
        if len(rows) <= limit:
            return [r[0] for r in rows]
        return [c.conv.room for c in await self.user_conversations(user, limit=limit, include_left=False)]

    async def mark_read(self, room: str, user: str, seq: int) -> Member | None:
        def run(conn: sqlite3.Connection) -> Member | None:
            row = conn.execute(_MARK_READ + f" RETURNING {_MEMBER_COLS}", (seq, room, _now_ms(), room, user, seq, room)).fetchone()
            if row is None:
                rows = conn.execute(f"SELECT {_MEMBER_COLS} FROM room_members WHERE room = ? AND user_id = ?", (room, user)).fetchall()
                return _member(rows[0]) if rows else None
            return _member(row)

        return await self._call(run)

    async def mark_read_many(self, items: Sequence[tuple[str, str, int]]) -> None:
        now = _now_ms()
        rows = sorted((seq, now, room, user, seq) for room, user, seq in items)
        sql = "UPDATE room_members SET last_read_seq = ?, updated_at = ? WHERE room = ? AND user_id = ? AND last_read_seq < ?"

        def run(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(sql, rows)
            conn.execute("COMMIT")

        await self._call(run)

    async def recall(self, room: str, seq: int, by: str, at_ms: int) -> StoredMessage | None:
        tomb = orjson.dumps({"by": by, "at": at_ms}).decode()

        def run(conn: sqlite3.Connection) -> StoredMessage | None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND seq = ?", (room, seq)).fetchone()
                if row is None or row[3] == RECALLED:
                    conn.execute("COMMIT")
                    return None
                conn.execute("UPDATE messages SET type = ?, data = ? WHERE room = ? AND seq = ?", (RECALLED, tomb, room, seq))
                conn.execute("INSERT INTO recalls (room, seq, at, by) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING", (room, seq, at_ms, by))
                conn.execute("UPDATE rooms SET updated_at = max(updated_at, ?) WHERE room = ?", (at_ms, room))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return _message(row)

        return await self._call(run)

    async def recalled_since(self, rooms: Sequence[str], since_ms: int) -> dict[str, list[int]]:
        if not rooms:
            return {}
        out: dict[str, list[int]] = {}
        for i in range(0, len(rooms), 500):
            part = list(rooms[i:i + 500])
            sql = f"SELECT room, seq FROM recalls WHERE room IN ({','.join('?' * len(part))}) AND at > ? ORDER BY room, seq"
            for room, seq in await self._read(_fetch(sql, (*part, since_ms)), "recalled_since"):
                out.setdefault(room, []).append(int(seq))
        return out

    async def user_conversations(
        self, user: str, *, since_ms: int = 0, limit: int = 100, before: tuple[int, str] | None = None, include_left: bool = True,
    ) -> list[ConversationState]:
        """See :meth:`Store.user_conversations`: one query; per membership, the newest
        readable message is found through the ``(room, seq)`` index."""
        where = ["activity > ?"]
        args: list[Any] = [user, since_ms]
        if before is not None:
            where.append("(activity < ? OR (activity = ? AND room > ?))")
            args += [before[0], before[0], before[1]]
        left = "" if include_left else " AND m.left_seq IS NULL"
        sql = f"""
            WITH mine AS (
                SELECT m.room, m.user_id, m.role, m.joined_at, m.last_read_seq, m.muted_until, m.left_seq, m.updated_at AS m_updated,
                    (SELECT x.id FROM messages x WHERE x.room = m.room AND x.seq <= ifnull(m.left_seq, 9223372036854775807)
                     ORDER BY x.seq DESC LIMIT 1) AS last_id
                FROM room_members m WHERE m.user_id = ?{left}
            ), listed AS (
                SELECT mine.*, {", ".join(f"c.{c.strip()} AS c_{c.strip()}" for c in _CONV_COLS.split(","))},
                    {", ".join(f"l.{c.strip()} AS l_{c.strip()}" for c in _COLUMNS.split(","))},
                    max(ifnull(l.ts, 0), c.updated_at, mine.m_updated) AS activity,
                    CASE WHEN c.kind = 'dm' THEN (SELECT p.last_read_seq FROM room_members p WHERE p.room = mine.room AND p.user_id <> mine.user_id)
                    END AS peer_read
                FROM mine JOIN rooms c ON c.room = mine.room LEFT JOIN messages l ON l.id = mine.last_id
            )
            SELECT * FROM listed WHERE {" AND ".join(where)} ORDER BY activity DESC, room LIMIT ?"""
        args.append(limit)
        rows = await self._read(_fetch(sql, tuple(args)), "user_conversations")
        out = []
        for r in rows:
            member = _member(r[0:8])
            conv = _conversation(r[9:15])
            last = _message(r[15:24]) if r[15] is not None else None
            out.append(ConversationState(conv, member, last.seq if last is not None else 0, last, int(r[24]), r[25]))
        return out

    async def find_cids(self, keys: Sequence[tuple[str, str | None, str]]) -> dict[tuple[str, str, str], StoredMessage]:
        """See :meth:`Store.find_cids`: every look-up in one reader job."""
        sql = f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND ifnull(sender, '') = ? AND cid = ?"

        def run(conn: sqlite3.Connection) -> dict[tuple[str, str, str], StoredMessage]:
            out = {}
            for room, sender, cid in keys:
                row = conn.execute(sql, (room, sender or "", cid)).fetchone()
                if row is not None:
                    out[(room, sender or "", cid)] = _message(row)
            return out

        return await self._read(run, "find_cids") if keys else {}

    async def newest_messages(self, wanted: Sequence[tuple[str, int, int]]) -> dict[str, list[StoredMessage]]:
        """See :meth:`Store.newest_messages`: every page in one reader job."""
        sql = f"SELECT {_COLUMNS} FROM messages WHERE room = ? AND seq > ? ORDER BY seq DESC LIMIT ?"

        def run(conn: sqlite3.Connection) -> dict[str, list[StoredMessage]]:
            return {room: [_message(r) for r in reversed(conn.execute(sql, (room, after, limit)).fetchall())] for room, after, limit in wanted}

        return await self._read(run, "newest_messages") if wanted else {}

    # ---- the customer-service desk ------------------------------------------------------

    async def cs_open(self, session: CsSession) -> tuple[CsSession, bool]:
        row = _cs_row(session)

        def run(conn: sqlite3.Connection) -> tuple[CsSession, bool]:
            conn.execute("BEGIN IMMEDIATE")
            try:
                cur = conn.execute(_CS_INSERT, row)
                if cur.rowcount == 1:
                    conn.execute("COMMIT")
                    return session, True
                got = conn.execute(f"SELECT {_CS_COLS} FROM cs_sessions WHERE shopper = ? AND state IN {_CS_OPEN}", (session.shopper,)).fetchone()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if got is None:
                raise ValueError(f"session id {session.id!r} is taken")
            return _cs_session(got), False

        return await self._call(run)

    async def cs_update(
        self, id: str, changes: dict[str, object], *, states: Sequence[str] | None = None, agent: str | bool | None = False,
    ) -> CsSession | None:
        sets, args = _cs_sets(changes)
        where, wargs = ["id = ?"], [id]
        if states is not None:
            where.append(f"state IN ({','.join('?' * len(states))})")
            wargs.extend(states)
        if agent is None:
            where.append("agent IS NULL")
        elif agent is not False:
            where.append("agent = ?")
            wargs.append(str(agent))
        sql = f"UPDATE cs_sessions SET {', '.join(sets)}, updated_at = ? WHERE {' AND '.join(where)} RETURNING {_CS_COLS}"

        def run(conn: sqlite3.Connection) -> CsSession | None:
            r = conn.execute(sql, (*args, _now_ms(), *wargs)).fetchone()
            return _cs_session(r) if r is not None else None

        return await self._call(run)

    async def cs_first_response(self, id: str, at_ms: int) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("UPDATE cs_sessions SET first_response_at = ?, updated_at = ? WHERE id = ? AND first_response_at IS NULL", (at_ms, _now_ms(), id))
            return cur.rowcount == 1

        return await self._call(run)

    async def cs_session(self, id: str) -> CsSession | None:
        rows = await self._read(_fetch(f"SELECT {_CS_COLS} FROM cs_sessions WHERE id = ?", (id,)), "cs_session")
        return _cs_session(rows[0]) if rows else None

    async def cs_open_session(self, shopper: str) -> CsSession | None:
        rows = await self._read(_fetch(f"SELECT {_CS_COLS} FROM cs_sessions WHERE shopper = ? AND state IN {_CS_OPEN}", (shopper,)), "cs_open_session")
        return _cs_session(rows[0]) if rows else None

    async def cs_last_agent(self, shopper: str) -> str | None:
        sql = "SELECT agent FROM cs_sessions WHERE shopper = ? AND agent IS NOT NULL ORDER BY opened_at DESC LIMIT 1"
        rows = await self._read(_fetch(sql, (shopper,)), "cs_last_agent")
        return str(rows[0][0]) if rows else None

    async def cs_sessions(
        self, *, states: Sequence[str] | None = None, department: str | None = None, agent: str | None = None, limit: int = 100, offset: int = 0,
    ) -> list[CsSession]:
        where, args = _cs_filter(states, department, agent, "?")
        order = "queued_at, id" if states is not None and tuple(states) == ("queued",) else "opened_at DESC, id"
        sql = f"SELECT {_CS_COLS} FROM cs_sessions {where} ORDER BY {order} LIMIT ? OFFSET ?"
        return [_cs_session(r) for r in await self._read(_fetch(sql, (*args, limit, offset)), "cs_sessions")]

    async def cs_between(self, since_ms: int, until_ms: int, *, by: str = "opened_at", batch: int = 1000) -> AsyncIterator[CsSession]:
        if by not in ("opened_at", "rated_at"):
            raise ValueError(f"cs_between: by must be opened_at or rated_at, not {by!r}")
        sql = f"SELECT {_CS_COLS} FROM cs_sessions WHERE {by} >= ? AND {by} < ? AND ({by}, id) > (?, ?) ORDER BY {by}, id LIMIT ?"
        after: tuple[int, str] = (since_ms - 1, "")
        while True:
            rows = await self._read(_fetch(sql, (since_ms, until_ms, after[0], after[1], batch)), "cs_between")
            for r in rows:
                s = _cs_session(r)
                yield s
            if len(rows) < batch:
                return
            last = _cs_session(rows[-1])
            after = (int(getattr(last, by)), last.id)

    async def cs_unread_replies(self, *, first_before_ms: int, limit: int = 10_000) -> list[CsUnread]:
        cols = ", ".join(f"s.{c}" for c in CS_SESSION_FIELDS)
        # SQLite: the bare m.seq / m.ts of an aggregate query with one min() come from the row of that min.
        sql = (f"SELECT {cols}, count(*), min(m.seq), m.ts FROM cs_sessions s "
               "JOIN room_members r ON r.room = 'cs:' || s.id AND r.user_id = s.shopper "
               "JOIN messages m ON m.room = r.room AND m.seq > r.last_read_seq AND m.sender IS NOT NULL AND m.sender <> s.shopper "
               "WHERE s.state = 'assigned' GROUP BY s.id HAVING m.ts < ? ORDER BY s.id LIMIT ?")
        n = len(CS_SESSION_FIELDS)
        rows = await self._read(_fetch(sql, (first_before_ms, limit)), "cs_unread_replies")
        return [CsUnread(_cs_session(r[:n]), int(r[n]), int(r[n + 1]), int(r[n + 2])) for r in rows]

    async def cs_add_ticket(self, ticket: CsTicket) -> None:
        row = (ticket.id, ticket.shopper, ticket.department, ticket.session, ticket.fields.decode(), ticket.created_at)

        def run(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO cs_tickets (id, shopper, department, session, fields, created_at) VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING", row)

        await self._call(run)

    async def cs_tickets(self, since_ms: int, until_ms: int, *, limit: int = 1000) -> list[CsTicket]:
        sql = "SELECT id, shopper, department, fields, created_at, session FROM cs_tickets WHERE created_at >= ? AND created_at < ? ORDER BY created_at, id LIMIT ?"
        rows = await self._read(_fetch(sql, (since_ms, until_ms, limit)), "cs_tickets")
        return [CsTicket(r[0], r[1], r[2], r[3].encode(), r[4], r[5]) for r in rows]

    # ---- media --------------------------------------------------------------------------

    async def media_add(self, f: MediaFile) -> None:
        row = _media_row(f)

        def run(conn: sqlite3.Connection) -> int:
            return int(conn.execute(_MEDIA_INSERT, row).rowcount)

        if await self._call(run) != 1:
            raise ValueError(f"media id {f.id!r} is taken")

    async def media_get(self, id: str) -> MediaFile | None:
        rows = await self._read(_fetch(f"SELECT {_MEDIA_COLS} FROM media WHERE id = ?", (id,)), "media_get")
        return MediaFile.from_row(rows[0]) if rows else None

    async def media_get_many(self, ids: Sequence[str]) -> dict[str, MediaFile]:
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return {}

        def run(conn: sqlite3.Connection) -> dict[str, MediaFile]:
            out: dict[str, MediaFile] = {}
            for i in range(0, len(wanted), 500):
                part = wanted[i:i + 500]
                for r in conn.execute(f"SELECT {_MEDIA_COLS} FROM media WHERE id IN ({','.join('?' * len(part))})", part):
                    out[r[0]] = MediaFile.from_row(r)
            return out

        return await self._read(run, "media_get_many")

    async def media_attach(self, id: str, owner: str, room: str, at_ms: int, *, exclusive: bool) -> tuple[MediaFile | None, str]:
        """See :meth:`Store.media_attach`: one conditional ``UPDATE ... RETURNING`` on the
        writer thread (the only writer), then, when it changed nothing, a look at the row
        to say why."""

        def run(conn: sqlite3.Connection) -> tuple[MediaFile | None, str]:
            r = conn.execute(_MEDIA_ATTACH, (room, at_ms, id, owner, int(exclusive), room)).fetchone()
            if r is not None:
                return MediaFile.from_row(r), "ok"
            got = conn.execute("SELECT owner, state FROM media WHERE id = ?", (id,)).fetchone()
            return None, attach_refusal(got, owner)

        return await self._call(run)

    async def media_ref(self, id: str, room: str, seq: int, at_ms: int) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO media_refs (file_id, room, seq, at) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING", (id, room, seq, at_ms))

        await self._call(run)

    async def media_refs(self, id: str) -> list[tuple[str, int]]:
        rows = await self._read(_fetch("SELECT room, seq FROM media_refs WHERE file_id = ? ORDER BY room, seq", (id,)), "media_refs")
        return [(str(r[0]), int(r[1])) for r in rows]

    async def media_set_verdict(self, id: str, verdict: str) -> MediaFile | None:
        def run(conn: sqlite3.Connection) -> MediaFile | None:
            r = conn.execute(f"UPDATE media SET verdict = ? WHERE id = ? RETURNING {_MEDIA_COLS}", (verdict, id)).fetchone()
            return MediaFile.from_row(r) if r is not None else None

        return await self._call(run)

    async def media_usage(self, owner: str, since_ms: int) -> int:
        rows = await self._read(_fetch("SELECT ifnull(sum(size), 0) FROM media WHERE owner = ? AND created_at >= ?", (owner, since_ms)), "media_usage")
        return int(rows[0][0])

    async def media_remove(self, ids: Sequence[str]) -> int:
        return await self._media_rows(ids, (
            ("UPDATE media SET state = 'removed' WHERE id IN ({}) AND state <> 'removed'", True),
            ("DELETE FROM media_refs WHERE file_id IN ({})", False),
        ))

    async def media_purge_rows(self, ids: Sequence[str]) -> int:
        return await self._media_rows(ids, (
            ("DELETE FROM media_refs WHERE file_id IN ({})", False),
            ("DELETE FROM media WHERE id IN ({})", True),
        ))

    async def _media_rows(self, ids: Sequence[str], statements: Sequence[tuple[str, bool]]) -> int:
        """Run each statement (``{}``: the ids' placeholders) over ``ids``, 500 at a time,
        in one transaction; the rows the counted ones changed."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return 0

        def run(conn: sqlite3.Connection) -> int:
            n = 0
            conn.execute("BEGIN IMMEDIATE")
            try:
                for i in range(0, len(wanted), 500):
                    part = wanted[i:i + 500]
                    marks = ",".join("?" * len(part))
                    for sql, counted in statements:
                        changed = conn.execute(sql.format(marks), part).rowcount
                        n += changed if counted else 0
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return n

        return await self._call(run)

    async def media_unsent(self, before_ms: int, limit: int) -> list[MediaFile]:
        sql = f"SELECT {_MEDIA_COLS} FROM media WHERE state = 'uploaded' AND created_at < ? AND attached_at IS NULL ORDER BY created_at, id LIMIT ?"
        return [MediaFile.from_row(r) for r in await self._read(_fetch(sql, (before_ms, limit)), "media_unsent")]

    async def media_of_user(self, user: str, limit: int) -> list[MediaFile]:
        sql = f"SELECT {_MEDIA_COLS} FROM media WHERE owner = ? AND state <> 'removed' ORDER BY created_at, id LIMIT ?"
        return [MediaFile.from_row(r) for r in await self._read(_fetch(sql, (user, limit)), "media_of_user")]

    async def media_orphans(self, limit: int) -> list[MediaFile]:
        """See :meth:`Store.media_orphans`: one query on a reader (its plan: a scan of
        ``media_state`` for ``state = 'attached'``, per file a search of the primary key of
        ``media_refs`` and per old ref a search of ``messages_room_seq``)."""
        cutoff = _now_ms() - MEDIA_PUBLISH_GRACE_MS
        return [MediaFile.from_row(r) for r in await self._read(_fetch(_MEDIA_ORPHANS, (cutoff, RECALLED, limit)), "media_orphans")]

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` once on the writer thread, between batches."""
        if self._state != "open":
            raise StoreUnavailable("sqlite store is not open")
        assert self._loop is not None
        fut: asyncio.Future[T] = self._loop.create_future()
        with self._cond:
            self._calls.append((fn, fut))
            self._cond.notify()
        return await fut

    # ---- readers -----------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T], what: str) -> T:
        if self._state != "open" or self._pool is None or self._loop is None:
            raise StoreUnavailable("sqlite store is not open")
        try:
            return await self._loop.run_in_executor(self._pool, self._in_reader, fn)
        except sqlite3.Error as e:
            raise _unavailable(e, what) from e
        except RuntimeError as e:  # the pool was shut down meanwhile
            if self._state == "open":
                raise
            raise StoreUnavailable("sqlite store is closed") from e

    def _in_reader(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path, timeout=self.busy_timeout, readonly=True)
            self._local.conn = conn
            with self._readers_lock:
                self._reader_conns.append(conn)
        return fn(conn)

    # ---- the writer thread -------------------------------------------------------------

    def _writer_main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            conn = self._open_writer()
        except BaseException as e:
            if isinstance(e, sqlite3.Error | OSError):
                e = _unavailable(e, f"opening {self.path}")
            ready.set_exception(e)
            return
        ready.set_result(None)
        dropped = 0
        try:
            while (work := self._next_work()) is not None:
                try:
                    work(conn)
                except Exception:  # a bug: never let the writer die with futures pending
                    log.exception("store: writer step failed")
            dropped = self._finish(conn)
        finally:
            conn.close()
            assert self._closed_fut is not None
            self._closed_fut.set_result(dropped)

    def _open_writer(self) -> sqlite3.Connection:
        """Open the writer's connection; another process creating the same new file at
        that moment (the workers of ``server.workers``) can make SQLite answer "locked" at
        once (switching to WAL does not wait): tried again for up to ``busy_timeout``."""
        deadline = time.monotonic() + max(self.busy_timeout, 1.0)
        delay = 0.02
        while True:
            try:
                return self._try_open_writer()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    def _try_open_writer(self) -> sqlite3.Connection:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(self.path, timeout=self.busy_timeout)
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreUnavailable(f"sqlite store: {self.path} cannot use WAL (journal_mode is {mode})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_MAX_FRAMES}")  # see _maintenance_main
            conn.execute("PRAGMA journal_size_limit = 67108864")  # a reset WAL is cut back to 64 MB
            conn.execute("PRAGMA cache_size = -65536")  # 64 MB: the indexes' hot pages of many rooms
            conn.execute("PRAGMA temp_store = MEMORY")
            version = _schema_version(conn)
            if version == -1:  # a new file: the embedded store creates its schema itself
                _migrate(conn, self.path)
            elif version != SCHEMA_VERSION:
                what = "is not a livegate store" if version is None else f"has schema version {version}, this gateway needs {SCHEMA_VERSION}"
                raise SchemaError(f"{self.path} {what}: run `gateway migrate`")
            conn.execute("BEGIN IMMEDIATE")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("clean_close") == "1" and meta.get("epoch"):
                self.epoch = meta["epoch"]
            else:  # a crash: messages queued but not written may have their seqs used again
                self.epoch = secrets.token_hex(8)
                log.warning("store %s was not closed cleanly: new epoch %s", self.path, self.epoch)
            conn.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value", (self.epoch,))
            conn.execute("INSERT INTO meta (key, value) VALUES ('clean_close', '0') ON CONFLICT (key) DO UPDATE SET value = excluded.value")
            conn.execute("UPDATE meta SET value = ? WHERE key = 'outbox'", ("1" if self.outbox else "0",))
            conn.execute("COMMIT")
            self._fts_indexed = int(meta.get("fts_indexed", 0))
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
            self._last_id = int(row[0]) if row is not None else 0
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)
        except BaseException:
            conn.close()
            raise
        return conn

    def _next_work(self) -> Callable[[sqlite3.Connection], None] | None:
        """Under the lock: what the writer does next, or None to stop. Waits for work."""
        with self._cond:
            while True:
                q = self._queue
                now = time.perf_counter()
                if self._stop_at is not None:  # closing: only flush the queue
                    if not q or now >= self._stop_at or self._moved is not None:
                        return None
                    if now < self._retry_at:
                        self._cond.wait(min(self._retry_at, self._stop_at) - now)
                        continue
                    return self._take()
                # After a batch, a deletion chunk (or an index chunk, when the index lags far
                # behind) gets a turn before the next batch.
                other = bool(self._jobs) or bool(self._calls) or (self._last_id - self._fts_indexed > FTS_MAX_LAG and now >= self._retry_at)
                if q and not (self._turn and other) and (now >= self._retry_at or self._queued_commits):
                    if len(q) < GATHER and self.batch_s > 0 and now < q[0].t0 + self.batch_s:
                        self._wake_commit = self._wake_archive = GATHER
                        self._cond.wait(q[0].t0 + self.batch_s - now)
                        continue
                    self._turn = True
                    return self._take()
                self._turn = False
                if self._reset_wal and not q:
                    self._wake_commit = self._wake_archive = 1 << 62
                    return self._checkpoint
                if self._calls:
                    self._wake_commit = self._wake_archive = 1 << 62
                    return self._step_call
                if self._jobs:
                    self._wake_commit = self._wake_archive = 1 << 62
                    return self._step_job
                index_at = self._index_due()
                if index_at is not None and now >= max(index_at, self._retry_at):
                    self._wake_commit = self._wake_archive = 1 << 62
                    return self._index_chunk
                # Idle, or waiting out a backoff (then only a commit wakes the writer).
                self._wake_commit = 1
                self._wake_archive = 1 if not q else 1 << 62
                deadlines = ([self._retry_at] if q else []) + ([max(index_at, self._retry_at)] if index_at is not None else [])
                self._cond.wait(max(0.0, min(deadlines) - now) if deadlines else None)

    def _index_due(self) -> float | None:
        """When the next index chunk is due (None: nothing to index): at once for a full
        chunk, else :data:`FTS_DELAY` after the oldest row waiting was written."""
        lag = self._last_id - self._fts_indexed
        if lag <= 0:
            return None
        if lag >= self._fts_pacer.rows():
            return 0.0
        return (self._fts_since or time.perf_counter()) + FTS_DELAY

    def _take(self) -> Callable[[sqlite3.Connection], None]:
        """Under the lock: take a batch off the queue (it stays in the backlog)."""
        q = self._queue
        n = min(len(q), self.max_batch)
        items = [q.popleft() for _ in range(n)]
        self._queued_commits -= sum(1 for it in items if it.fut is not None)
        self._inflight = n
        self._wake_commit = self._wake_archive = 1 << 62
        return lambda conn: self._write(conn, items)

    def _write(self, conn: sqlite3.Connection, items: list[_Item]) -> None:
        """Write one batch in one transaction, then settle its commits on the loop. On
        failure the commits fail and the archives go back to the head of the queue (retried
        after a backoff), except for messages the database refuses as such."""
        results: list[_Result] = []
        try:
            if self._moved is not None:
                raise StoreUnavailable(self._moved)
            before = self._last_id
            rows = [it.row for it in items if it.msg is not None]
            events = [it.row for it in items if it.msg is None]
            inserted = self._insert(conn, rows, events)
            self.stats.events += len(events)
            if inserted == len(rows):
                n_commits = sum(1 for it in items if it.fut is not None)
                self.stats.committed += n_commits
                self.stats.archived += inserted - n_commits
                results = [(it.fut, it.msg, it.t0) for it in items if it.fut is not None and it.msg is not None]
            else:
                self._settle(conn, items, before, inserted, results)
        except Exception as e:
            self.stats.errors += 1
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            refused = not _failing(e)
            with self._cond:
                self._inflight = 0
                if not refused:
                    self._backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, self._backoff * 2))
                    self._retry_at = time.perf_counter() + self._backoff
                    self._queue.extendleft(reversed([it for it in items if it.fut is None]))
            if refused and len(items) > 1:  # one bad message: find it, write the others
                log.warning("store: a batch of %d was refused (%r): writing its messages one by one", len(items), e)
                for it in items:
                    self._write(conn, [it])
                return
            error: BaseException
            if refused:
                first = items[0].msg
                if first is None:
                    log.error("store: outbox event refused by the database (%r): %r", e, items[0].row)
                    self.stats.events_dropped += 1
                else:
                    log.error("store: message refused by the database (%r): room %r seq %r", e, first.room, first.seq)
                if items[0].fut is None and first is not None:
                    self._post(self._count_dropped, 1)
                error = ValueError(f"sqlite store: message refused: {e!r}")
            else:
                log.warning("store: write of %d messages failed (%s): archives retried in %.2f s", len(items), e, self._backoff)
                error = e if isinstance(e, StoreUnavailable) else _unavailable(e, "write")
            results = [(it.fut, error, it.t0) for it in items if it.fut is not None]
        else:
            self.stats.batches += 1
            self.stats.batched_messages += len(items)
            self._last_batch = len(items)
            self._backoff = 0.0
            with self._cond:
                self._inflight = 0
                self._retry_at = 0.0
        if results:
            self._post(self._resolve, results)

    def _insert(self, conn: sqlite3.Connection, rows: list[_Row], events: list[Any] | None = None) -> int:
        """Insert ``rows`` (and outbox ``events``) in one transaction; the number of
        messages actually inserted."""
        if not events and len(rows) <= ROWS_PER_STATEMENT:  # one statement: its own transaction
            cur = conn.execute(_insert_sql(len(rows)), [x for r in rows for x in r])
            if cur.rowcount > 0:
                self._wrote(cur.lastrowid)
            return cur.rowcount
        conn.execute("BEGIN IMMEDIATE")
        total = 0
        for i in range(0, len(rows), ROWS_PER_STATEMENT):
            part = rows[i:i + ROWS_PER_STATEMENT]
            cur = conn.execute(_insert_sql(len(part)), [x for r in part for x in r])
            total += cur.rowcount
            if cur.rowcount > 0:
                self._wrote(cur.lastrowid)
        for i in range(0, len(events or ()), ROWS_PER_STATEMENT):
            part = (events or [])[i:i + ROWS_PER_STATEMENT]
            conn.execute(_EVENT_SQL + ",".join(["(?,?,?,?)"] * len(part)), [x for r in part for x in r])
        conn.execute("COMMIT")
        return total

    def _wrote(self, rowid: int | None) -> None:
        self._last_id = max(self._last_id, rowid or 0)
        if not self._fts_since:
            self._fts_since = time.perf_counter()

    def _settle(self, conn: sqlite3.Connection, items: list[_Item], before: int, inserted: int,
                results: list[_Result]) -> None:
        """Some rows were duplicates: find, for each commit, the row that holds it (by
        ``cid``, else by ``(room, seq)``). The commit was written by this batch when that
        row is new (ids above ``before``: AUTOINCREMENT, one writer), holds this very
        message and no earlier commit of the batch claimed it; otherwise the stored row
        is its answer. Archives need no answer, so they cost no lookup."""
        claimed: set[int] = set()
        new_commits = 0
        for it in items:
            m = it.msg
            if it.fut is None or m is None:
                continue
            row = None
            if m.cid is not None:
                row = conn.execute(
                    f"SELECT id, {_COLUMNS} FROM messages WHERE room = ? AND ifnull(sender, '') = ? AND cid = ?", (m.room, m.sender or "", m.cid),
                ).fetchone()
            if row is None:
                row = conn.execute(f"SELECT id, {_COLUMNS} FROM messages WHERE room = ? AND seq = ?", (m.room, m.seq)).fetchone()
            if row is None:  # cannot happen: the insert that skipped it found a conflict
                results.append((it.fut, StoreUnavailable("sqlite store: the stored duplicate was not found"), it.t0))
                continue
            stored = _message(row[1:])
            if row[0] > before and row[0] not in claimed and stored == m:
                claimed.add(row[0])
                new_commits += 1
            results.append((it.fut, stored, it.t0))
        self.stats.committed += new_commits
        self.stats.archived += inserted - new_commits
        self.stats.duplicates += sum(1 for it in items if it.msg is not None) - inserted

    def _step_call(self, conn: sqlite3.Connection) -> None:
        """Run the first queued call (a small write) and settle its future."""
        with self._cond:
            fn, fut = self._calls.popleft()
        try:
            if self._moved is not None:
                raise StoreUnavailable(self._moved)
            value: Any = fn(conn)
        except Exception as e:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            self.stats.errors += 1
            value = e if isinstance(e, StoreUnavailable) else _unavailable(e, "write") if isinstance(e, sqlite3.Error) else e
        self._post(_settle_future, fut, value)

    def _step_job(self, conn: sqlite3.Connection) -> None:
        """One chunk of the first deletion job; the job goes to the back of the line."""
        with self._cond:
            job = self._jobs.popleft()
        want = int(min(job.remaining, self._delete_pacer.rows()))
        t0 = time.perf_counter()
        try:
            if self._moved is not None:
                raise StoreUnavailable(self._moved)
            n = conn.execute(job.sql, (*job.args, want)).rowcount
        except (sqlite3.Error, StoreUnavailable) as e:
            self.stats.errors += 1
            error = e if isinstance(e, StoreUnavailable) else _unavailable(e, "delete")
            self._post(_settle_future, job.fut, error)
            return
        self._delete_pacer.observe(n, time.perf_counter() - t0)
        job.deleted += n
        job.remaining -= n
        if n < want or job.remaining <= 0:
            self._post(_settle_future, job.fut, job.deleted)
        else:
            with self._cond:
                self._jobs.append(job)

    def _index_chunk(self, conn: sqlite3.Connection) -> None:
        """Index the next rows of the full-text index (one statement, see the schema)."""
        rows = self._fts_pacer.rows()
        if self._last_id - self._fts_indexed > FTS_MAX_LAG:  # overloaded: keep pace with the batches
            rows = max(rows, self._last_batch)
        upto = min(self._last_id, self._fts_indexed + rows)
        t0 = time.perf_counter()
        try:
            conn.execute("INSERT INTO messages_fts_feed (upto) VALUES (?)", (upto,))
        except sqlite3.Error as e:
            self.stats.errors += 1
            self._backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, self._backoff * 2))
            log.warning("store: full-text indexing failed (%s), retried in %.2f s", e, self._backoff)
            with self._cond:
                self._retry_at = time.perf_counter() + self._backoff
            return
        self._fts_pacer.observe(upto - self._fts_indexed, time.perf_counter() - t0)
        self._fts_indexed = upto
        self._fts_since = time.perf_counter() if self._last_id > upto else 0.0

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """Checkpoint from the writer: with no write under way, every frame can be copied,
        and the next transaction starts the WAL again from its beginning."""
        self._reset_wal = False
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as e:
            log.warning("store: checkpoint of %s failed: %s", self.path, e)

    def _finish(self, conn: sqlite3.Connection) -> int:
        """The writer stops: fail what is left, mark a clean close if nothing was, and
        checkpoint. Returns the archives left behind."""
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
            self._queued_commits = 0
            jobs = list(self._jobs)
            self._jobs.clear()
            calls = list(self._calls)
            self._calls.clear()
        for _fn, fut in calls:
            self._post(_settle_future, fut, StoreUnavailable("sqlite store closed before this was written"))
        closed = StoreUnavailable("sqlite store closed before this was written")
        results = [(it.fut, closed, it.t0) for it in left if it.fut is not None]
        if results:
            self._post(self._resolve, results)
        for job in jobs:
            self._post(_settle_future, job.fut, StoreUnavailable("sqlite store closed during the deletion"))
        dropped = sum(1 for it in left if it.fut is None)
        if not left and self._moved is None:
            try:
                conn.execute("UPDATE meta SET value = '1' WHERE key = 'clean_close'")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                log.warning("store: clean close of %s failed: %s", self.path, e)
        elif left:
            log.warning("store %s closed with %d messages not written", self.path, len(left))
        return dropped

    def _count_dropped(self, n: int) -> None:
        self.stats.archive_dropped += n

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _resolve(self, results: list[_Result]) -> None:
        """On the loop: settle a batch's futures and record their latency."""
        now = time.perf_counter()
        observe = self.stats.observe
        for fut, value, t0 in results:
            if isinstance(value, BaseException):
                if not fut.done():
                    fut.set_exception(value)
                continue
            observe(now - t0)
            if not fut.done():
                fut.set_result(value)

    # ---- the maintenance thread --------------------------------------------------------

    def _maintenance_main(self) -> None:
        """Checkpoint the WAL in the background (PASSIVE: it never waits for the writer),
        so that the writer's own checkpoint, which lets the WAL start again from its
        beginning, finds most pages copied. NOTE: a passive checkpoint beside a busy
        writer never catches up with it: the WAL grew to 116,000 frames (450 MB) in 10 s
        of 15,000 commits/s in 1,000 rooms, and writes that grow a file are slower than
        writes over its old pages."""
        try:
            conn = _connect(self.path, timeout=self.busy_timeout)
        except sqlite3.Error as e:
            log.error("store: maintenance connection to %s failed: %s (no checkpoints)", self.path, e)
            return
        last_error = ""
        last_checkpoint = time.perf_counter()
        try:
            while not self._maint_stop.wait(MAINTENANCE_INTERVAL):
                try:
                    self._check_identity()
                    if self._moved is not None or time.perf_counter() - last_checkpoint < CHECKPOINT_INTERVAL:
                        continue
                    last_checkpoint = time.perf_counter()
                    _busy, frames, _done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if frames >= WAL_RESET_FRAMES:
                        with self._cond:
                            self._reset_wal = True
                            self._cond.notify()
                    last_error = ""
                except sqlite3.Error as e:
                    if str(e) != last_error:
                        log.warning("store: checkpoint of %s failed: %s", self.path, e)
                    last_error = str(e)
        finally:
            conn.close()

    def _check_identity(self) -> None:
        """SQLite writes on into a file that was deleted or replaced: refuse instead."""
        try:
            st = os.stat(self.path)
            same = (st.st_dev, st.st_ino) == self._identity
        except FileNotFoundError:
            same = False
        if not same and self._moved is None:
            self._moved = f"sqlite store: {self.path} was removed or replaced while open; restart the gateway"
            log.error("%s", self._moved)


_CONV_COLS = "room, kind, created_at, creator, meta, updated_at"
_MEMBER_COLS = "room, user_id, role, joined_at, last_read_seq, muted_until, left_seq, updated_at"
#: Args: (seq, room, now, room, user, seq, room): read_seq = max(read_seq, min(seq, last seq)).
_MARK_READ = (
    "UPDATE room_members SET last_read_seq = max(last_read_seq, min(?, ifnull((SELECT max(seq) FROM messages WHERE room = ?), 0))), "
    "updated_at = ? WHERE room = ? AND user_id = ? AND last_read_seq < ? AND last_read_seq < ifnull((SELECT max(seq) FROM messages WHERE room = ?), 0)"
)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _conversation(r: Any) -> Conversation:
    return Conversation(r[0], r[1], int(r[2]), r[3], (r[4] or "{}").encode(), int(r[5]))


def _member(r: Any) -> Member:
    return Member(r[0], r[1], r[2], int(r[3]), int(r[4]), r[5], r[6], int(r[7]))


def _last_seq(conn: sqlite3.Connection, room: str) -> int:
    row = conn.execute(
        "SELECT max(ifnull((SELECT max(seq) FROM messages WHERE room = ?1), 0), ifnull((SELECT seq FROM room_floors WHERE room = ?1), 0))", (room,),
    ).fetchone()
    return int(row[0])


def _add_members(conn: sqlite3.Connection, room: str, members: Sequence[tuple[str, str]], max_members: int, now: int) -> list[str]:
    """In the caller's transaction: make ``members`` active (new ones start having read
    everything so far); raises :class:`TooManyMembers`."""
    active = {u for (u,) in conn.execute("SELECT user_id FROM room_members WHERE room = ? AND left_seq IS NULL", (room,))}
    new: dict[str, str] = {}
    for user, role in members:
        if user not in active:
            new.setdefault(user, role)
    if len(active) + len(new) > max_members:
        raise TooManyMembers(f"{room} would have {len(active) + len(new)} members (at most {max_members})")
    last = _last_seq(conn, room)
    conn.executemany(
        "INSERT INTO room_members (room, user_id, joined_at, last_read_seq, role, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (room, user_id) DO UPDATE SET left_seq = NULL, role = excluded.role, joined_at = excluded.joined_at, "
        "last_read_seq = max(last_read_seq, excluded.last_read_seq), updated_at = excluded.updated_at",
        [(room, u, now, last, r, now) for u, r in new.items()],
    )
    return list(new)


class _FileLease(Lease):
    """A held ``flock``: released by closing the descriptor (or by the process dying)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    async def alive(self) -> bool:
        return self._fd is not None

    async def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_CS_COLS = ", ".join(CS_SESSION_FIELDS)
_CS_OPEN = "(" + ", ".join(f"'{s}'" for s in CS_OPEN_STATES) + ")"
_CS_INSERT = f"INSERT INTO cs_sessions ({_CS_COLS}) VALUES ({', '.join('?' * len(CS_SESSION_FIELDS))}) ON CONFLICT DO NOTHING"
#: Columns cs_update may set.
_CS_SETTABLE = frozenset(CS_SESSION_FIELDS) - {"id", "shopper", "opened_at", "updated_at"}


def _cs_row(s: CsSession) -> tuple[Any, ...]:
    return tuple(getattr(s, f).decode() if f == "card" else getattr(s, f) for f in CS_SESSION_FIELDS)


def _cs_session(r: Any) -> CsSession:
    vals = list(r)
    i = CS_SESSION_FIELDS.index("card")
    vals[i] = (vals[i] or "null").encode()
    return CsSession(*vals)


def _cs_sets(changes: dict[str, object]) -> tuple[list[str], list[Any]]:
    sets, args = [], []
    for k, v in changes.items():
        if k not in _CS_SETTABLE:
            raise ValueError(f"cs_update: cannot set {k!r}")
        sets.append(f"{k} = ?")
        args.append(v.decode() if isinstance(v, bytes) else v)
    if not sets:
        raise ValueError("cs_update: nothing to change")
    return sets, args


def _cs_filter(states: Sequence[str] | None, department: str | None, agent: str | None, ph: str) -> tuple[str, list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    if states is not None:
        where.append(f"state IN ({','.join([ph] * len(states))})")
        args.extend(states)
    if department is not None:
        where.append(f"department = {ph}")
        args.append(department)
    if agent is not None:
        where.append(f"agent = {ph}")
        args.append(agent)
    return ("WHERE " + " AND ".join(where)) if where else "", args


_MEDIA_COLS = ", ".join(MEDIA_FIELDS)
_MEDIA_INSERT = f"INSERT INTO media ({_MEDIA_COLS}) VALUES ({', '.join('?' * len(MEDIA_FIELDS))}) ON CONFLICT DO NOTHING"
#: Args: (room, at_ms, id, owner, exclusive, room).
_MEDIA_ATTACH = (
    "UPDATE media SET room = ifnull(room, ?), attached_at = ?, state = 'attached' "
    "WHERE id = ? AND owner = ? AND state <> 'removed' AND (NOT ? OR room IS NULL OR room = ?) "
    f"RETURNING {_MEDIA_COLS}"
)
#: Args: (cutoff, RECALLED, limit). See Store.media_orphans.
_MEDIA_ORPHANS = (
    f"SELECT {_MEDIA_COLS} FROM media f WHERE f.state = 'attached' AND f.attached_at < ?1 AND NOT EXISTS ("
    "SELECT 1 FROM media_refs r WHERE r.file_id = f.id AND (r.at >= ?1 OR EXISTS ("
    "SELECT 1 FROM messages m WHERE m.room = r.room AND m.seq = r.seq AND m.type <> ?2))) "
    "ORDER BY f.state, f.created_at LIMIT ?3"
)


def _media_row(f: MediaFile) -> tuple[Any, ...]:
    return tuple(getattr(f, k).decode() if k == "meta" else getattr(f, k) for k in MEDIA_FIELDS)


def _fetch(sql: str, args: tuple[Any, ...]) -> Callable[[sqlite3.Connection], list[Any]]:
    return lambda conn: conn.execute(sql, args).fetchall()


def _settle_future(fut: asyncio.Future[Any], value: Any) -> None:
    if fut.done():
        return
    if isinstance(value, BaseException):
        fut.set_exception(value)
    else:
        fut.set_result(value)


def _trigram_query(needle: str) -> str:
    """An FTS5 query matching rows that hold every trigram of a cover of ``needle``
    (every third one and the last: enough, since candidates are checked with ``instr``)."""
    starts = list(range(0, len(needle) - 2, 3))
    if starts[-1] != len(needle) - 3:
        starts.append(len(needle) - 3)
    terms = dict.fromkeys(needle[i:i + 3] for i in starts)
    return " AND ".join('"' + t.replace('"', '""') + '"' for t in terms)

