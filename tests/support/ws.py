"""A raw-frame WebSocket client, for the protocol-level tests that
``gateway.client.GatewayClient`` cannot serve: control over the bytes (bad frames,
refused upgrades and their headers, a reader that never reads), the exact frames the
server writes, or a thousand cheap connections. Everything else uses GatewayClient
(:meth:`support.gateway.GatewayProcess.client`).

Only what the tests need: the HTTP upgrade done by hand, masked (or deliberately
unmasked) frames out, unmasked server frames in, no extensions.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from typing import Any

import orjson

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0, length: int | None = None) -> bytes:
    """One client frame. ``length`` overrides the announced payload length (to claim an
    oversized frame without sending it)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return head + key + masked


def upgrade_request(host: str, port: int, path: str, protocols: tuple[str, ...] = (), headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if protocols:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    text = head.decode("latin-1")
    status_line, *rest = text.split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    hdrs: dict[str, str] = {}
    for line in rest:
        if ":" in line:
            k, v = line.split(":", 1)
            hdrs[k.strip().lower()] = v.strip()
    return status, hdrs


class RawWS:
    """An upgraded (or refused) connection over asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, headers: dict[str, str]) -> None:
        self.reader = reader
        self.writer = writer
        self.status = status
        self.headers = headers

    @classmethod
    async def connect(cls, host: str, port: int, path: str = "/ws", *, protocols: tuple[str, ...] = (), headers: tuple[tuple[str, str], ...] = (), timeout: float = 20.0) -> RawWS:
        """Connect and send the upgrade; check ``status`` (101 when accepted)."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 22), timeout)
        writer.write(upgrade_request(host, port, path, protocols, headers))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status, hdrs = parse_head(head)
        return cls(reader, writer, status, hdrs)

    async def send_frame(self, opcode: int, payload: bytes, **kw: Any) -> None:
        self.writer.write(encode_frame(opcode, payload, **kw))
        await self.writer.drain()

    async def send_json(self, obj: Any) -> None:
        await self.send_frame(OP_TEXT, orjson.dumps(obj))

    async def recv_frame(self, timeout: float = 20.0) -> tuple[bool, int, bytes]:
        """(fin, opcode, payload) of the next server frame; ``asyncio.IncompleteReadError``
        at EOF."""

        async def read() -> tuple[bool, int, bytes]:
            b0, b1 = await self.reader.readexactly(2)
            assert not b1 & 0x80, "server frames must not be masked"
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(n) if n else b""
            return bool(b0 & 0x80), b0 & 0x0F, payload

        return await asyncio.wait_for(read(), timeout)

    async def recv_json(self, timeout: float = 20.0, skip: tuple[str, ...] = ("presence",)) -> dict[str, Any]:
        """The next text frame as JSON, skipping control frames and the ``skip`` ops.
        Raises AssertionError on a close frame (with its code)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            _fin, op, payload = await self.recv_frame(max(0.01, deadline - loop.time()))
            if op == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                raise AssertionError(f"connection closed by the server: {code} {payload[2:]!r}")
            if op != OP_TEXT:
                continue
            obj = orjson.loads(payload)
            if obj.get("op") in skip:
                continue
            return obj  # type: ignore[no-any-return]

    async def recv_close(self, timeout: float = 20.0) -> tuple[int | None, bytes, list[dict[str, Any]]]:
        """Read until the server's close frame (or EOF): ``(code, reason, text frames
        seen before it)``; code None when the TCP connection ended without a close frame."""
        seen: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                _fin, op, payload = await self.recv_frame(max(0.01, deadline - loop.time()))
            except (asyncio.IncompleteReadError, ConnectionError):
                return None, b"", seen
            if op == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                return code, payload[2:], seen
            if op == OP_TEXT:
                seen.append(orjson.loads(payload))

    async def at_eof(self, timeout: float = 20.0) -> bool:
        """True once the server has closed the TCP connection (reads and discards)."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), timeout):
                pass
        except ConnectionError:
            pass
        return True

    def close(self) -> None:
        self.writer.close()

    @classmethod
    async def joined(cls, host: str, port: int, user: str, room: str | None = None, timeout: float = 20.0) -> RawWS:
        """Upgraded (101) as ``user``, past the ``connected`` frame and, with ``room``,
        the ack of a join (id 1)."""
        ws = await cls.connect(host, port, f"/ws?user={user}", timeout=timeout)
        assert ws.status == 101, ws.status
        assert (await ws.recv_json(timeout))["op"] == "connected"
        if room is not None:
            await ws.send_json({"op": "join", "id": 1, "room": room})
            ack = await ws.recv_json(timeout)
            assert ack["op"] == "ack" and ack["id"] == 1, ack
        return ws


def split_frames(data: bytes, whole: bool = True) -> list[tuple[int, bytes]]:
    """Split a server byte stream into ``(opcode, payload)`` frames. ``whole``: every byte
    must belong to a whole frame (AssertionError otherwise); else the walk ends at a
    truncated frame, which is returned with the payload bytes that are there."""
    out, i = [], 0
    while i + 2 <= len(data):
        b0, b1 = data[i], data[i + 1]
        if whole:
            assert b0 & 0x70 == 0 and b1 & 0x80 == 0, f"not a frame at byte {i}: {data[i:i + 16]!r}"
        n, j = b1 & 0x7F, i + 2
        ext = {126: 2, 127: 8}.get(n, 0)
        if j + ext > len(data):
            break
        if ext:
            (n,) = struct.unpack("!H" if ext == 2 else "!Q", data[j : j + ext])
            j += ext
        if whole:
            assert j + n <= len(data), f"truncated frame at byte {i}: {n} bytes announced, {len(data) - j} left"
        out.append((b0 & 0x0F, data[j : j + n]))
        i = j + n
    if whole:
        assert i == len(data), f"truncated frame header at byte {i} of {len(data)}"
    return out


def read_to_end(sock: socket.socket, timeout: float, reset_ok: bool = False) -> bytes:
    """Everything a blocking socket receives until the peer closes (or resets the
    connection, with ``reset_ok``)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    except ConnectionResetError:
        if not reset_ok:
            raise
    return b"".join(chunks)


def blocking_upgrade(host: str, port: int, path: str, rcvbuf: int | None = 4096, timeout: float = 20.0, headers: tuple[tuple[str, str], ...] = ()) -> socket.socket:
    """Upgrade with a blocking socket (receive buffer ``rcvbuf`` bytes, None = the
    kernel's) and return it unread: e.g. a client that stops reading (a slow consumer)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(upgrade_request(host, port, path, headers=headers))
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(1)  # byte by byte: leave the frames after the head in the kernel
            if not chunk:
                raise ConnectionError("closed during the upgrade")
            buf += chunk
        status, _ = parse_head(buf)
        if status != 101:
            raise ConnectionError(f"upgrade refused: {status}")
    except BaseException:
        s.close()
        raise
    return s
