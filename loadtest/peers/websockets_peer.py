"""Plain Python baseline peer: ``websockets`` (asyncio server) on uvloop, fan-out with
``websockets.broadcast``. Run: ``python loadtest/peers/websockets_peer.py --port 9001``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

import uvloop
import websockets
from websockets.asyncio.server import serve

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Room, ack, connected_frame, error, pong, raise_nofile

rooms: dict[str, tuple[Room, set]] = {}


async def handler(ws) -> None:
    joined: list[str] = []
    await ws.send(connected_frame())
    try:
        async for text in ws:
            try:
                req = json.loads(text)
                op = req["op"]
            except (ValueError, KeyError, TypeError):
                await ws.send(error({}, 4000, "bad request"))
                continue
            if op == "ping":
                await ws.send(pong())
            elif op == "join":
                name = req["room"]
                room, members = rooms.setdefault(name, (Room(name), set()))
                members.add(ws)
                joined.append(name)
                await ws.send(ack(req, room=name, seq=room.seq, epoch="e", msgs=[]))
            elif op == "publish":
                entry = rooms.get(req.get("room"))
                if entry is None or ws not in entry[1]:
                    await ws.send(error(req, 4004, "not joined"))
                    continue
                room, members = entry
                websockets.broadcast(members, room.envelope(req))
                await ws.send(ack(req, seq=room.seq))
            elif op == "leave":
                entry = rooms.get(req.get("room"))
                if entry:
                    entry[1].discard(ws)
                await ws.send(ack(req))
            else:
                await ws.send(error(req, 4001, "unknown op"))
    except websockets.ConnectionClosed:
        pass
    finally:
        for name in joined:
            entry = rooms.get(name)
            if entry:
                entry[1].discard(ws)


async def main(host: str, port: int) -> None:
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(handler, host, port, subprotocols=["gateway.v1"], compression=None,
                     max_size=65536, ping_interval=None, backlog=4096):
        print(f"listening {host}:{port}", flush=True)
        await stop


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9001)
    a = ap.parse_args()
    raise_nofile()
    uvloop.run(main(a.host, a.port))
