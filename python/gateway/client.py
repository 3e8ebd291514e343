"""An asyncio client for the gateway's client protocol (``docs/protocol.md``).

Built on the ``websockets`` library (imported when the first connection is made), for
integration tests, load scenarios and backend scripts::

    async with GatewayClient("ws://127.0.0.1:8080/ws", user="u1") as c:
        ack = await c.join("live:42", history=10)
        await c.publish("live:42", {"text": "hi"})
        async for msg in c:          # room messages; batch frames arrive unpacked
            print(msg["seq"], msg["data"])

What it does for you:

- offers the ``gateway.v1`` subprotocol and sends the token in the query string, the
  ``Authorization`` header or a ``token.<JWT>`` subprotocol entry;
- matches every request to its ``ack`` or ``error`` by ``id``
  (an error raises :class:`GatewayError`);
- sends ``{"op":"ping"}`` every announced ``heartbeat`` seconds and declares the
  connection dead (closes it) after 3 pings without a ``pong``;
- tracks the last ``(seq, epoch)`` of every joined room, and :meth:`GatewayClient.reconnect`
  rejoins each room with ``resume`` so missed messages are delivered (or tells you, via
  ``recovered: false``, to reload the room).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl as _ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson

__all__ = ["GatewayClient", "GatewayClosed", "GatewayError"]

log = logging.getLogger("gateway.client")

#: Pings that may go unanswered before the connection is declared dead.
MAX_MISSED_PONGS = 3


class GatewayError(Exception):
    """An ``error`` frame: ``code`` (see the protocol's error codes), ``message`` and the
    request ``id`` it answers (None for errors not tied to a request)."""

    def __init__(self, code: int, message: str, id: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.id = id


class GatewayClosed(ConnectionError):
    """The connection is closed (or was never opened). ``code`` and ``reason`` are the
    WebSocket close code and reason (1006 when the connection just vanished; None if it
    was never open)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class _Closed:
    """Queue sentinel: the connection of generation ``gen`` closed."""

    __slots__ = ("gen",)

    def __init__(self, gen: int) -> None:
        self.gen = gen


class GatewayClient:
    """One client connection (one WebSocket carrying all of its rooms).

    :param url: ``ws://host:port/ws`` (query parameters are kept).
    :param user: dev-mode user id, sent as ``?user=``.
    :param token: a JWT, sent as chosen by ``token_in``: ``"query"`` (``?token=``),
        ``"header"`` (``Authorization: Bearer``) or ``"protocol"`` (a ``token.<JWT>``
        ``Sec-WebSocket-Protocol`` entry after the others).
    :param subprotocols: offered subprotocols, in order of preference.
    :param params: extra query parameters.
    :param headers: extra HTTP headers for the upgrade request.
    :param heartbeat: seconds between application pings; None = the interval the server
        announces in ``connected``; 0 or False = no heartbeat.
    :param request_timeout: seconds to wait for an ``ack`` (``TimeoutError`` after).
    :param open_timeout: seconds for the TCP connect, the upgrade and the ``connected`` frame.
    :param on_message: called with each room message instead of queueing it (for load
        scenarios that only count); runs on the reader task, so keep it short.
    :param max_queue: most room messages kept for :meth:`recv`; the oldest are dropped
        (and counted in :attr:`dropped`) beyond it. None = unbounded.
    :param compression: ``"deflate"`` (permessage-deflate) or None.
    :param max_size: largest message accepted from the server, in bytes.
    :param ssl: for ``wss://`` URLs, the ``ssl.SSLContext`` to verify the server with
        (e.g. ``ssl.create_default_context(cafile="ca.pem")`` for a private CA); None =
        the system's trusted CAs.
    """

    def __init__(
        self,
        url: str,
        *,
        user: str | None = None,
        token: str | None = None,
        token_in: str = "query",
        subprotocols: Iterable[str] = ("gateway.v1",),
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        heartbeat: float | None = None,
        request_timeout: float = 10.0,
        open_timeout: float = 10.0,
        on_message: Callable[[dict[str, Any]], Any] | None = None,
        max_queue: int | None = 100_000,
        compression: str | None = "deflate",
        max_size: int | None = 1 << 20,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        if token_in not in ("query", "header", "protocol"):
            raise ValueError("token_in must be 'query', 'header' or 'protocol'")
        self.url = url
        self.user_param = user
        self.token = token
        self.token_in = token_in
        self.subprotocols = list(subprotocols)
        self.params = dict(params or {})
        self.headers = dict(headers or {})
        self.heartbeat_override = heartbeat
        self.request_timeout = request_timeout
        self.open_timeout = open_timeout
        self.on_message = on_message
        self.compression = compression
        self.max_size = max_size
        self.ssl = ssl

        #: From the ``connected`` frame.
        self.session: str | None = None
        self.user: str | None = None
        self.node: str | None = None
        self.heartbeat: float = 0.0
        #: Seconds of silence after which the server closes (4000), from ``connected``.
        self.idle_timeout: float | None = None
        self.server_ts: int | None = None
        #: The negotiated subprotocol.
        self.subprotocol: str | None = None
        #: Rooms joined (and not left) on this client; rejoined by :meth:`reconnect`.
        self.rooms: set[str] = set()
        #: Last seen ``(seq, epoch)`` of each room (recoverable messages only).
        self.positions: dict[str, tuple[int, str]] = {}
        #: Close code and reason of the last connection, once it closed.
        self.close_code: int | None = None
        self.close_reason: str = ""
        #: ``retry_ms`` of the last ``drain`` frame (the server is restarting).
        self.drain_retry_ms: int | None = None
        #: Why the client gave up on the connection itself (e.g. ``"heartbeat"``).
        self.dead_reason: str | None = None
        #: Counters.
        self.received = 0
        self.dropped = 0
        self.pongs = 0

        self._ws: Any = None
        self._gen = 0
        self._ids = itertools.count(1)
        self._pending: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._messages: asyncio.Queue[Any] = asyncio.Queue()
        self._max_queue = max_queue
        self._events: deque[dict[str, Any]] = deque(maxlen=10_000)
        self._event_waiters: list[tuple[Callable[[dict[str, Any]], bool], asyncio.Future[dict[str, Any]]]] = []
        self._reader: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._missed = 0
        self._closed_evt: asyncio.Event | None = None

    # ---- connection ----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while the WebSocket is open."""
        return self._ws is not None and self.close_code is None

    @property
    def events(self) -> deque[dict[str, Any]]:
        """Recent non-message frames (presence, push, drain, errors without a pending
        request, ...), oldest first; bounded."""
        return self._events

    def _target(self) -> tuple[str, list[str], dict[str, str]]:
        parts = urlsplit(self.url)
        query = parts.query
        extra = dict(self.params)
        if self.user_param is not None:
            extra["user"] = self.user_param
        if self.token is not None and self.token_in == "query":
            extra["token"] = self.token
        if extra:
            query = (query + "&" if query else "") + urlencode(extra)
        url = urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, parts.fragment))
        protocols = list(self.subprotocols)
        if self.token is not None and self.token_in == "protocol":
            protocols.append(f"token.{self.token}")
        headers = dict(self.headers)
        if self.token is not None and self.token_in == "header":
            headers["Authorization"] = f"Bearer {self.token}"
        return url, protocols, headers

    async def connect(self) -> dict[str, Any]:
        """Open the WebSocket and wait for the ``connected`` frame, which is returned.

        Raises ``websockets.exceptions.InvalidStatus`` when the upgrade is refused (its
        ``response.status_code`` is the HTTP status, e.g. 401), :class:`GatewayClosed` if
        the connection closes before ``connected``, ``TimeoutError`` after ``open_timeout``.
        """
        from websockets.asyncio.client import connect as ws_connect

        if self.connected:
            raise RuntimeError("already connected")
        url, protocols, headers = self._target()
        # Only when given: websockets makes its own default context for wss:// otherwise.
        tls: dict[str, Any] = {"ssl": self.ssl} if self.ssl is not None else {}
        ws = await ws_connect(
            url,
            subprotocols=protocols or None,  # type: ignore[arg-type]
            additional_headers=headers or None,
            open_timeout=self.open_timeout,
            ping_interval=None,  # the application heartbeat below is the liveness check
            compression=self.compression,
            max_size=self.max_size,
            max_queue=None,
            close_timeout=2.0,
            **tls,
        )
        try:
            raw = await asyncio.wait_for(ws.recv(), self.open_timeout)
        except _ws_closed_errors():
            raise GatewayClosed(ws.close_code, ws.close_reason or "") from None
        except BaseException:
            await ws.close()
            raise
        first = orjson.loads(raw)
        if not isinstance(first, dict) or first.get("op") != "connected":
            await ws.close(1002, "expected connected")
            raise GatewayError(4000, f"expected a connected frame, got {raw!r:.200}")
        self._ws = ws
        self._gen += 1
        self.subprotocol = ws.subprotocol
        self.session = first.get("session")
        self.user = first.get("user")
        self.node = first.get("node")
        self.server_ts = first.get("ts")
        self.idle_timeout = first.get("idle_timeout")
        announced = float(first.get("heartbeat") or 0)
        hb = self.heartbeat_override
        self.heartbeat = announced if hb is None else float(hb or 0)
        self.close_code = None
        self.close_reason = ""
        self.dead_reason = None
        self._missed = 0
        self._closed_evt = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read_loop(ws, self._gen))
        if self.heartbeat > 0:
            self._pinger = asyncio.ensure_future(self._ping_loop(ws, self.heartbeat))
        return first

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection (idempotent) and wait until the reader has stopped."""
        ws = self._ws
        if ws is None:
            return
        if self._pinger is not None:
            self._pinger.cancel()
        with contextlib.suppress(Exception):
            await ws.close(code, reason)
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self._reader), 5.0)

    async def wait_closed(self, timeout: float | None = None) -> tuple[int | None, str]:
        """Wait until the server (or the heartbeat) closes the connection; returns
        ``(close_code, close_reason)``. ``TimeoutError`` after ``timeout``."""
        if self._closed_evt is None:
            raise GatewayClosed(None, "never connected")
        await asyncio.wait_for(self._closed_evt.wait(), timeout)
        return self.close_code, self.close_reason

    async def __aenter__(self) -> GatewayClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def abort(self) -> None:
        """Drop the TCP connection without a close handshake (simulates a lost network)."""
        ws = self._ws
        if ws is not None and ws.transport is not None:
            ws.transport.abort()

    # ---- requests --------------------------------------------------------------------------

    async def request(self, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send ``{"op": op, "id": <new id>, **fields}`` and return its ``ack``.

        Raises :class:`GatewayError` on an ``error`` reply, :class:`GatewayClosed` if the
        connection closes first, ``TimeoutError`` after ``timeout`` (default
        ``request_timeout``).
        """
        ws = self._ws
        if ws is None or self.close_code is not None:
            raise GatewayClosed(self.close_code, self.close_reason or "not connected")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await ws.send(orjson.dumps({"op": op, "id": rid, **fields}).decode())
            return await asyncio.wait_for(fut, self.request_timeout if timeout is None else timeout)
        except _ws_closed_errors() as e:
            raise GatewayClosed(self.close_code or getattr(e, "code", 1006), self.close_reason) from None
        finally:
            self._pending.pop(rid, None)

    async def send(self, frame: Mapping[str, Any] | str | bytes) -> None:
        """Send one raw frame (a dict is JSON-encoded; str/bytes go out as text) without
        waiting for a reply. Errors it causes appear in :attr:`events`."""
        ws = self._ws
        if ws is None or self.close_code is not None:
            raise GatewayClosed(self.close_code, self.close_reason or "not connected")
        if isinstance(frame, Mapping):
            data: str = orjson.dumps(frame).decode()
        elif isinstance(frame, bytes):
            data = frame.decode()
        else:
            data = frame
        try:
            await ws.send(data)
        except _ws_closed_errors() as e:
            raise GatewayClosed(self.close_code or getattr(e, "code", 1006), self.close_reason) from None

    async def join(self, room: str, history: int = 0, resume: tuple[int, str] | Mapping[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Join ``room``; returns the ack (``room``, ``seq``, ``epoch``, ``msgs`` and, with
        ``resume``, ``recovered``). ``history`` asks for the last K messages; ``resume``
        (``(seq, epoch)`` or ``{"seq":…, "epoch":…}``) for the messages after that
        position. The ack's messages are returned, not queued for :meth:`recv`.
        """
        fields: dict[str, Any] = {"room": room}
        if history:
            fields["history"] = history
        if resume is not None:
            if isinstance(resume, Mapping):
                fields["resume"] = {"seq": resume["seq"], "epoch": resume["epoch"]}
            else:
                fields["resume"] = {"seq": resume[0], "epoch": resume[1]}
        ack = await self.request("join", timeout=timeout, **fields)
        self.rooms.add(room)
        self._track_ack(room, ack)
        return ack

    async def leave(self, room: str, timeout: float | None = None) -> dict[str, Any]:
        """Leave ``room``; returns the ack. The room's position is forgotten."""
        ack = await self.request("leave", timeout=timeout, room=room)
        self.rooms.discard(room)
        self.positions.pop(room, None)
        return ack

    async def publish(self, room: str, data: Any, type: str = "chat", timeout: float | None = None, cid: str | None = None) -> dict[str, Any]:
        """Publish into ``room`` (joined first); returns the ack (``seq`` is 0 for
        messages that are not recoverable, and for messages a hook dropped). ``cid``: the
        client message id that makes a resend of the same message idempotent (the ack of
        a resend says ``dup`` and carries the first ``seq``)."""
        fields: dict[str, Any] = {"room": room, "type": type, "data": data}
        if cid is not None:
            fields["cid"] = cid
        return await self.request("publish", timeout=timeout, **fields)

    # ---- media (docs/media.md) -----------------------------------------------------------

    @property
    def upload_url(self) -> str:
        """``/media/upload`` on the socket's host and port (``wss`` → ``https``)."""
        parts = urlsplit(self.url)
        scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
        return urlunsplit((scheme, parts.netloc, "/media/upload", "", ""))

    async def upload(
        self, file: str | bytes | Any, *, kind: str | None = None, room: str | None = None, duration: int | None = None,
        filename: str | None = None, on_progress: Callable[[int, int], Any] | None = None, timeout: float = 300.0,
    ) -> dict[str, Any]:
        """Upload a file (a path, ``bytes`` or a ``pathlib.Path``) as ``multipart/form-data``
        the way mini-programs do, with this client's credentials; returns the server's
        answer (``file_id``, ``url``, ...). ``on_progress(sent, total)`` is called as the
        body goes out. Raises :class:`GatewayError` with the HTTP status as ``code`` and the
        server's JSON as ``message`` when refused."""
        import secrets
        from pathlib import Path

        import aiohttp

        if isinstance(file, (bytes, bytearray)):
            content, name = bytes(file), filename or "file"
        else:
            path = Path(file)
            content = await asyncio.to_thread(path.read_bytes)
            name = filename or path.name
        boundary = "livegate" + secrets.token_hex(12)
        safe = name.replace('"', "_").replace("\r", "_").replace("\n", "_")
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{safe}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        total = len(head) + len(content) + len(tail)

        async def body() -> AsyncIterator[bytes]:
            sent = 0
            for piece in (head, *(content[i:i + 65536] for i in range(0, len(content), 65536)), tail):
                yield piece
                sent += len(piece)
                if on_progress is not None:
                    on_progress(sent, total)

        query: dict[str, str] = {}
        url, _, headers = self._target()
        q = urlsplit(url).query
        for k, v in (("kind", kind), ("room", room), ("duration", None if duration is None else str(duration))):
            if v is not None:
                query[k] = v
        target = self.upload_url + "?" + "&".join(x for x in (q, urlencode(query)) if x)
        headers = {**headers, "Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(total)}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        ssl = self.ssl if self.ssl is not None else True
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http, \
                http.post(target, data=body(), headers=headers, ssl=ssl) as r:
            text = await r.text()
            if r.status != 200:
                raise GatewayError(r.status, text)
            answer: dict[str, Any] = orjson.loads(text)
            return answer

    async def send_media(
        self, room: str, kind: str, file: str | bytes | Any, *, caption: str | None = None, cid: str | None = None,
        duration: int | None = None, filename: str | None = None, on_progress: Callable[[int, int], Any] | None = None,
    ) -> dict[str, Any]:
        """Upload ``file`` as ``kind`` and publish it into ``room``; returns the ack with
        the upload's answer under ``"file"``."""
        up = await self.upload(file, kind=kind, room=room, duration=duration, filename=filename, on_progress=on_progress)
        data: dict[str, Any] = {"file_id": up["file_id"]}
        if caption is not None:
            data["caption"] = caption
        ack = await self.publish(room, data, type=kind, cid=cid)
        return {**ack, "file": up}

    async def send_image(self, room: str, file: str | bytes | Any, **kw: Any) -> dict[str, Any]:
        """:meth:`send_media` of an ``image`` (JPEG, PNG, GIF, WebP, HEIC)."""
        return await self.send_media(room, "image", file, **kw)

    async def send_voice(self, room: str, file: str | bytes | Any, duration: int | None = None, **kw: Any) -> dict[str, Any]:
        """:meth:`send_media` of a ``voice`` clip; ``duration`` (ms) as the recorder said
        (the server measures it itself where the format allows)."""
        return await self.send_media(room, "voice", file, duration=duration, **kw)

    async def send_file(self, room: str, file: str | bytes | Any, **kw: Any) -> dict[str, Any]:
        """:meth:`send_media` of a ``file`` (PDF, Office, archives, text, media)."""
        return await self.send_media(room, "file", file, **kw)

    async def history(
        self, room: str, before_seq: int | None = None, limit: int = 50, timeout: float | None = None, after_seq: int | None = None,
    ) -> dict[str, Any]:
        """A page of ``room``'s messages, oldest first: the newest page, the one before
        ``before_seq``, or (``after_seq``, up to 200) the first ones after it. Returns the
        ack (``msgs``, ``more``, ``epoch``)."""
        fields: dict[str, Any] = {"room": room, "limit": limit}
        if before_seq is not None:
            fields["before_seq"] = before_seq
        if after_seq is not None:
            fields["after_seq"] = after_seq
        return await self.request("history", timeout=timeout, **fields)

    # ---- conversations (protocol 1.1) -------------------------------------------------------

    async def sync(self, since: int | None = None, limit: int = 100, msgs: int = 20, timeout: float | None = None) -> dict[str, Any]:
        """Conversations changed since ``since`` (the ``cursor`` of the previous sync; None:
        all), every page of them: returns ``{"cursor", "convs"}`` (each conversation with
        ``unread``, ``last``, ``msgs``...; docs/protocol.md, "Conversations"). The first
        sync of a connection makes it receive its conversations' messages without join.
        Keep ``cursor`` for the next call (after a reconnect)."""
        convs: list[dict[str, Any]] = []
        before: list[Any] | None = None
        while True:
            fields: dict[str, Any] = {"limit": limit, "msgs": msgs}
            if since:
                fields["since"] = since
            if before is not None:
                fields["before"] = before
            ack = await self.request("sync", timeout=timeout, **fields)
            convs += ack["convs"]
            if not ack.get("more"):
                return {"cursor": ack["cursor"], "convs": convs}
            before = ack["next"]

    async def read(self, room: str, seq: int, timeout: float | None = None) -> dict[str, Any]:
        """Mark ``room`` read up to ``seq``: the ack has ``read_seq`` and ``unread``; the
        user's other devices (and a dm's peer) get a ``read`` frame."""
        return await self.request("read", timeout=timeout, room=room, seq=seq)

    async def recall(self, room: str, seq: int, timeout: float | None = None) -> dict[str, Any]:
        """Recall message ``seq`` (the sender within the route's limit; group owners and
        admins any time): members see a tombstone."""
        return await self.request("recall", timeout=timeout, room=room, seq=seq)

    async def typing(self, room: str) -> None:
        """Tell the conversation's members online that this user is typing (no ack)."""
        await self.send({"op": "typing", "room": room})

    async def create_group(self, members: list[str], meta: Mapping[str, Any] | None = None, room: str | None = None,
                           timeout: float | None = None) -> str:
        """Create a group (this user its owner); returns its id."""
        fields: dict[str, Any] = {"kind": "group", "members": members, "meta": dict(meta or {})}
        if room is not None:
            fields["room"] = room
        ack = await self.request("create", timeout=timeout, **fields)
        return str(ack["room"])

    async def invite(self, room: str, users: list[str], timeout: float | None = None) -> list[str]:
        """Add ``users`` to a group; returns those who were not members."""
        ack = await self.request("invite", timeout=timeout, room=room, users=users)
        return list(ack.get("added") or [])

    async def remove(self, room: str, user: str, timeout: float | None = None) -> None:
        """Remove ``user`` from a group (owners, admins; anyone may remove themselves)."""
        await self.request("remove", timeout=timeout, room=room, user=user)

    @staticmethod
    def dm_room(a: str, b: str, prefix: str = "dm") -> str:
        """The id of the dm between users ``a`` and ``b``."""
        lo, hi = sorted((a, b))
        return f"{prefix}:{lo}:{hi}"

    async def publish_nowait(self, room: str, data: Any, type: str = "chat") -> None:
        """Publish without an ``id``: no ack comes back (errors still do, in :attr:`events`)."""
        await self.send({"op": "publish", "room": room, "type": type, "data": data})

    async def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """Send one application ping and wait for its ``pong`` (returned)."""
        fut = self.wait_event(lambda f: f.get("op") == "pong", timeout=timeout or self.request_timeout)
        await self.send({"op": "ping"})
        return await fut

    def wait_event(self, predicate: Callable[[dict[str, Any]], bool], timeout: float | None = None) -> asyncio.Future[dict[str, Any]]:
        """A future for the next non-message frame (presence, push, pong, drain, error
        without a pending request, ...) that satisfies ``predicate``. Register it before
        causing the frame. ``timeout`` cancels it with ``TimeoutError``."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        entry = (predicate, fut)
        self._event_waiters.append(entry)

        def cleanup(_f: Any) -> None:
            with contextlib.suppress(ValueError):
                self._event_waiters.remove(entry)

        fut.add_done_callback(cleanup)
        if timeout is not None:

            def expire() -> None:
                if not fut.done():
                    fut.set_exception(TimeoutError(f"no matching frame within {timeout}s"))

            handle = loop.call_later(timeout, expire)
            fut.add_done_callback(lambda _f: handle.cancel())
        return fut

    # ---- room messages ----------------------------------------------------------------------

    async def recv(self, timeout: float | None = None) -> dict[str, Any]:
        """The next room message (``msg`` frames, batch members unpacked, in order).

        Messages that arrived before a close are still returned; after them
        :class:`GatewayClosed` is raised. ``TimeoutError`` after ``timeout``.
        """
        q = self._messages
        while True:
            if timeout is None:
                item = await q.get()
            else:
                item = await asyncio.wait_for(q.get(), timeout)
            if isinstance(item, _Closed):
                if item.gen != self._gen:
                    continue  # the end of an earlier connection: skip
                q.put_nowait(item)  # keep telling later callers
                raise GatewayClosed(self.close_code, self.close_reason)
            return item  # type: ignore[no-any-return]

    def recv_nowait(self) -> dict[str, Any] | None:
        """The next queued room message, or None."""
        while not self._messages.empty():
            item = self._messages.get_nowait()
            if isinstance(item, _Closed):
                if item.gen == self._gen:
                    self._messages.put_nowait(item)
                    return None
                continue
            return item  # type: ignore[no-any-return]
        return None

    async def recv_many(self, n: int, timeout: float) -> list[dict[str, Any]]:
        """Exactly ``n`` room messages within ``timeout`` seconds overall, else
        ``TimeoutError`` (its message says how many arrived)."""
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"received {len(out)} of {n} messages within {timeout}s")
            try:
                out.append(await self.recv(left))
            except TimeoutError:
                raise TimeoutError(f"received {len(out)} of {n} messages within {timeout}s") from None
        return out

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            try:
                yield await self.recv()
            except GatewayClosed:
                return

    # ---- resume --------------------------------------------------------------------------------

    async def reconnect(self, *, delay: float = 0.0, attempts: int = 1, backoff: float = 0.5) -> dict[str, dict[str, Any]]:
        """Open a new connection (closing the old one if needed) and rejoin every room,
        with ``resume`` where the client has a position. Recovered messages newer than the
        position are queued for :meth:`recv`, as if they had never been missed.

        Returns the join ack of each room: check ``ack.get("recovered")``; False means
        the gap could not be filled (reload the room's state). ``delay`` waits first
        (e.g. ``drain_retry_ms / 1000``); ``attempts`` connects are tried, ``backoff``
        seconds apart (doubling). Rooms whose rejoin fails map to
        ``{"error": GatewayError}``.
        """
        if self._ws is not None:
            if self.close_code is None:
                self.abort()
            await self.close()
        if delay > 0:
            await asyncio.sleep(delay)
        err: BaseException | None = None
        for i in range(max(1, attempts)):
            try:
                await self.connect()
                err = None
                break
            except Exception as e:  # refused, reset, timeout: retry
                err = e
                if i + 1 < attempts:
                    await asyncio.sleep(backoff * (2**i))
        if err is not None:
            raise err
        acks: dict[str, dict[str, Any]] = {}
        for room in sorted(self.rooms):
            pos = self.positions.get(room)
            fields: dict[str, Any] = {"room": room}
            if pos is not None:
                fields["resume"] = {"seq": pos[0], "epoch": pos[1]}
            try:
                ack = await self.request("join", **fields)
            except GatewayError as e:
                self.rooms.discard(room)
                acks[room] = {"error": e}
                continue
            for m in ack.get("msgs") or ():
                self._deliver(m)
            self._track_ack(room, ack)
            acks[room] = ack
        return acks

    def _track_ack(self, room: str, ack: dict[str, Any]) -> None:
        epoch = ack.get("epoch")
        seq = ack.get("seq")
        if not isinstance(epoch, str) or not isinstance(seq, int):
            return
        for m in ack.get("msgs") or ():
            s = m.get("seq") if isinstance(m, dict) else None
            if isinstance(s, int) and m.get("epoch") == epoch and s > seq:
                seq = s
        cur = self.positions.get(room)
        if cur is None or cur[1] != epoch or seq > cur[0]:
            self.positions[room] = (seq, epoch)

    # ---- internals ------------------------------------------------------------------------------

    def _deliver(self, m: dict[str, Any]) -> None:
        """Track the position of a room message and hand it to the consumer."""
        room = m.get("room")
        seq = m.get("seq")
        if seq and isinstance(room, str):
            epoch = m.get("epoch", "")
            cur = self.positions.get(room)
            if cur is not None and cur[1] == epoch and seq <= cur[0]:
                return  # already seen (resume overlap)
            self.positions[room] = (seq, epoch)
        self.received += 1
        if self.on_message is not None:
            try:
                self.on_message(m)
            except Exception:
                log.exception("on_message callback failed")
            return
        q = self._messages
        if self._max_queue is not None and q.qsize() >= self._max_queue:
            with contextlib.suppress(asyncio.QueueEmpty):
                q.get_nowait()
                self.dropped += 1
        q.put_nowait(m)

    def _event(self, frame: dict[str, Any]) -> None:
        self._events.append(frame)
        for pred, fut in list(self._event_waiters):
            if not fut.done():
                try:
                    ok = pred(frame)
                except Exception:
                    ok = False
                if ok:
                    fut.set_result(frame)

    def _dispatch(self, frame: Any) -> None:
        if not isinstance(frame, dict):
            return
        op = frame.get("op")
        if op == "msg":
            self._deliver(frame)
        elif op == "batch":
            # Everything published into the room within the merge window, in order:
            # usually messages, possibly presence frames too.
            for m in frame.get("msgs") or ():
                if isinstance(m, dict):
                    if m.get("op") == "msg":
                        self._deliver(m)
                    elif m.get("op") != "batch":
                        self._dispatch(m)
        elif op == "ack" or op == "error":
            fut = self._pending.get(frame.get("id"))
            if fut is not None and not fut.done():
                if op == "ack":
                    fut.set_result(frame)
                else:
                    fut.set_exception(GatewayError(frame.get("code", 0), frame.get("message", ""), frame.get("id")))
            else:
                self._event(frame)
        elif op == "pong":
            self._missed = 0
            self.pongs += 1
            self._event(frame)
        else:
            if op == "drain":
                self.drain_retry_ms = frame.get("retry_ms")
            self._event(frame)

    async def _read_loop(self, ws: Any, gen: int) -> None:
        loads = orjson.loads
        try:
            async for raw in ws:
                try:
                    frame = loads(raw)
                except orjson.JSONDecodeError:
                    log.warning("gateway sent invalid JSON: %.200r", raw)
                    continue
                self._dispatch(frame)
        except Exception:
            pass  # closed with an error: the code is read below
        finally:
            if gen == self._gen:
                self._on_closed(ws, gen)

    def _on_closed(self, ws: Any, gen: int) -> None:
        proto = getattr(ws, "protocol", None)
        rcvd = getattr(proto, "close_rcvd", None)
        sent = getattr(proto, "close_sent", None)
        if rcvd is not None:
            self.close_code, self.close_reason = rcvd.code, rcvd.reason
        elif sent is not None and self.dead_reason is None:
            self.close_code, self.close_reason = sent.code, sent.reason
        else:
            self.close_code, self.close_reason = 1006, self.dead_reason or ""
        if self._pinger is not None:
            self._pinger.cancel()
        err = GatewayClosed(self.close_code, self.close_reason)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        for _pred, fut in list(self._event_waiters):
            if not fut.done():
                fut.set_exception(err)
        self._messages.put_nowait(_Closed(gen))
        if self._closed_evt is not None:
            self._closed_evt.set()

    async def _ping_loop(self, ws: Any, interval: float) -> None:
        ping = '{"op":"ping"}'
        try:
            while True:
                await asyncio.sleep(interval)
                if self._missed >= MAX_MISSED_PONGS:
                    self.dead_reason = f"heartbeat: no pong for {self._missed} pings"
                    log.info("gateway connection dead (%s)", self.dead_reason)
                    if ws.transport is not None:
                        ws.transport.abort()
                    return
                self._missed += 1
                await ws.send(ping)
        except asyncio.CancelledError:
            raise
        except Exception:
            return  # the connection is closing; the reader reports it


def _ws_closed_errors() -> tuple[type[BaseException], ...]:
    from websockets.exceptions import ConnectionClosed

    return (ConnectionClosed,)
