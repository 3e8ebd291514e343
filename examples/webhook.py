"""The receiving end of the outbox: a small service that takes the gateway's events into
the company's own database, exactly once.

The gateway's outbox (``[[outbox.endpoints]]``, docs/operations.md "The outbox") POSTs
every stored message and the room events you ask for, in order per room, **at least
once**: after a timeout, a restart or a failover an event may come again. This service
shows what the receiving side does about it:

- **checks the signature** (``X-Gateway-Signature: sha256=HMAC(secret, timestamp + "." +
  body)``) and the timestamp's age, and answers 401 otherwise (the gateway keeps
  retrying, then files the events as dead letters: a wrong secret loses nothing);
- **stores each event once**: the event ``id`` is the primary key, so a repeat changes
  nothing (``INSERT ... ON CONFLICT DO NOTHING``), and answers 200 only after the commit,
  so an event is never acknowledged and then lost;
- answers **400** to a body that is not an outbox batch (the gateway files such events as
  dead letters at once instead of retrying them for a day);
- does the slow work elsewhere: answer fast, and let your workers read the table.

It uses SQLite through a thread so that it runs anywhere; swap in your database.

Run it::

    CRM_OUTBOX_SECRET=... python -m examples.webhook --port 9000 --db events.db

and point the gateway at it::

    [[outbox.endpoints]]
    name = "crm"
    url = "http://127.0.0.1:9000/livegate/events"
    secret_env = "CRM_OUTBOX_SECRET"
    events = ["message", "join", "leave", "kick", "ban"]

Table ``events``: ``id`` (the event id: ``msg:<room>:<seq>`` for messages), ``event``
(``message``, ``join``...), ``room``, ``seq`` (messages), ``ts`` (ms), ``body`` (the event
as JSON), ``received_at``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import logging
import os
import sqlite3
import time
from typing import Any

import orjson
from aiohttp import web

__all__ = ["STORE", "EventStore", "make_app", "verify"]

log = logging.getLogger("examples.webhook")

#: Seconds a signed request may be old (replays of captured requests are refused).
MAX_AGE = 300


def verify(secret: bytes, timestamp: str, signature: str, body: bytes, now: float | None = None) -> bool:
    """Whether ``signature`` is the gateway's for ``body`` at ``timestamp`` (not too old)."""
    if not timestamp.isdigit() or abs(int(timestamp) - (now if now is not None else time.time())) > MAX_AGE:
        return False
    want = "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(signature, want)


class EventStore:
    """The events table in a SQLite file; every call runs in a worker thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        conn = self._connect()
        conn.execute(
            "CREATE TABLE IF NOT EXISTS events (id TEXT PRIMARY KEY, event TEXT NOT NULL, room TEXT NOT NULL, seq INTEGER, "
            "ts INTEGER NOT NULL, body TEXT NOT NULL, received_at INTEGER NOT NULL)"
        )
        conn.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        return conn

    def _add(self, events: list[dict[str, Any]]) -> int:
        now = int(time.time() * 1000)
        rows = [(str(e["id"]), str(e["event"]), str(e.get("room", "")), e.get("seq"), int(e.get("ts", now)), orjson.dumps(e).decode(), now)
                for e in events]
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            before = conn.total_changes
            conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING", rows)
            conn.execute("COMMIT")
            return conn.total_changes - before
        finally:
            conn.close()

    async def add(self, events: list[dict[str, Any]]) -> int:
        """Store ``events`` (one transaction); returns how many were new."""
        return await asyncio.to_thread(self._add, events)

    def rows(self, sql: str = "SELECT id, event, room, seq FROM events ORDER BY rowid") -> list[tuple[Any, ...]]:
        conn = self._connect()
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()


#: Where the app keeps its :class:`EventStore` (``app[STORE]``).
STORE: web.AppKey[EventStore] = web.AppKey("store", EventStore)

def make_app(secret: str, db: str) -> web.Application:
    """The service: ``POST /livegate/events``."""
    key = secret.encode()
    store = EventStore(db)

    async def events(request: web.Request) -> web.Response:
        body = await request.read()
        if key and not verify(key, request.headers.get("X-Gateway-Timestamp", ""), request.headers.get("X-Gateway-Signature", ""), body):
            return web.json_response({"error": "bad signature"}, status=401)
        try:
            batch = orjson.loads(body)["events"]
            if not isinstance(batch, list) or not all(isinstance(e, dict) and "id" in e and "event" in e for e in batch):
                raise ValueError("events must be objects with an id and an event")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            return web.json_response({"error": f"not an outbox batch: {e}"}, status=400)
        new = await store.add(batch)
        if new < len(batch):
            log.info("%d repeated event(s) ignored (delivery %s)", len(batch) - new, request.headers.get("X-Gateway-Delivery"))
        return web.json_response({"stored": new})

    app = web.Application(client_max_size=16 << 20)
    app[STORE] = store
    app.router.add_post("/livegate/events", events)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--db", default="events.db", help="SQLite file of the events table")
    ap.add_argument("--secret-env", default="CRM_OUTBOX_SECRET", help="variable holding the endpoint's secret")
    args = ap.parse_args()
    secret = os.environ.get(args.secret_env, "")
    if not secret:
        ap.error(f"set {args.secret_env} to the secret of the gateway's [[outbox.endpoints]] entry")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    web.run_app(make_app(secret, args.db), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
