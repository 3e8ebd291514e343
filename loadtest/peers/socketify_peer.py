"""socketify peer: uWebSockets' Python binding with its built-in pub/sub (one topic per
room, ``app.publish``). Run: ``python loadtest/peers/socketify_peer.py --port 9002``.
With ``--tls-cert CERT.pem --tls-key KEY.pem`` it serves wss:// instead (uSockets' OpenSSL
layer, same pub/sub). Needs ``pip install socketify`` and the system libuv
(``apt-get install libuv1``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from socketify import App, AppOptions, CompressOptions, OpCode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Room, ack, connected_frame, error, pong, raise_nofile

rooms: dict[str, Room] = {}


def make_app(cert: str | None = None, key: str | None = None) -> App:
    app = App(AppOptions(key_file_name=key, cert_file_name=cert)) if cert else App()

    def on_open(ws) -> None:
        ws.send(connected_frame(), OpCode.TEXT)

    def on_message(ws, message, opcode) -> None:
        try:
            req = json.loads(message)
            op = req["op"]
        except (ValueError, KeyError, TypeError):
            ws.send(error({}, 4000, "bad request"), OpCode.TEXT)
            return
        if op == "ping":
            ws.send(pong(), OpCode.TEXT)
        elif op == "join":
            name = req["room"]
            room = rooms.setdefault(name, Room(name))
            ws.subscribe(name)
            ws.send(ack(req, room=name, seq=room.seq, epoch="e", msgs=[]), OpCode.TEXT)
        elif op == "publish":
            name = req.get("room")
            target = rooms.get(name)
            if target is None or not ws.is_subscribed(name):
                ws.send(error(req, 4004, "not joined"), OpCode.TEXT)
                return
            # app.publish reaches every subscriber, the publisher included (like the gateway).
            app.publish(name, target.envelope(req), OpCode.TEXT)
            ws.send(ack(req, seq=target.seq), OpCode.TEXT)
        elif op == "leave":
            ws.unsubscribe(req.get("room", ""))
            ws.send(ack(req), OpCode.TEXT)
        else:
            ws.send(error(req, 4001, "unknown op"), OpCode.TEXT)

    app.ws("/*", {
        "compression": CompressOptions.DISABLED,
        "max_payload_length": 65536,
        "idle_timeout": 120,
        "max_backpressure": 1 << 20,
        "open": on_open,
        "message": on_message,
    })
    return app


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9002)
    ap.add_argument("--tls-cert", help="PEM certificate (chain): serve wss:// (with --tls-key)")
    ap.add_argument("--tls-key", help="PEM private key for --tls-cert")
    a = ap.parse_args()
    if bool(a.tls_cert) != bool(a.tls_key):
        ap.error("--tls-cert and --tls-key go together")
    raise_nofile()
    app = make_app(a.tls_cert, a.tls_key)
    scheme = "wss" if a.tls_cert else "ws"
    app.listen({"port": a.port, "host": a.host},
               lambda cfg: print(f"listening {scheme}://{a.host}:{a.port}", flush=True))
    app.run()
