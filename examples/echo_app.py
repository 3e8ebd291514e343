"""Echo server on the real engine, for the Autobahn|Testsuite fuzzingclient.

Every client message comes back unchanged (text stays text, binary stays binary). It runs
through exactly the code path of production traffic: ``gateway._core.Engine`` owns the
sockets, does the upgrade, permessage-deflate, framing, UTF-8 checks and the close
handshake; this program only accepts each connect and answers every ``EV_MESSAGE`` with
``engine.send(conn, data, binary=binary)``, draining events in batches from ``engine.fd``
with ``loop.add_reader`` (on uvloop when installed, else asyncio).

What differs from production defaults, and why:

- ``max_frame_size``/``max_message_size`` are 64 MiB and ``queue_bytes`` 1 GiB: Autobahn
  case 9 echoes messages of up to 16 MiB and bursts of thousands of messages;
- ``app_ping=False``: ``{"op":"ping"}`` is an ordinary message here, echoed like any other;
- ``ping_interval=0`` and a long ``idle_timeout``: no unsolicited server pings or idle
  closes in the middle of a test case;
- ``ws_path=""``: any path upgrades (Autobahn connects to ``/`` and ``/runCase?...``).

With ``--tls-cert`` and ``--tls-key`` it also serves ``wss://`` on a free port of the same
host (``tools/autobahn.sh --tls``), through the engine's TLS listener.

Every connect is accepted; when the client offers subprotocols the first one is echoed.

Usage::

    python examples/echo_app.py [--host 127.0.0.1] [--port 9001] [--workers N]
                                [--tls-cert CHAIN.pem --tls-key KEY.pem]

It prints ``echo server listening on ws://HOST:PORT/`` (flushed) once it accepts
connections, with TLS then ``echo server listening on wss://localhost:PORT/``, and stops
cleanly on SIGINT/SIGTERM. ``tools/autobahn.sh`` starts it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from gateway import _core
from gateway._core import EV_CLOSED, EV_CONNECT, EV_MESSAGE, Engine

MIB = 1 << 20


def make_engine(host: str, port: int, workers: int = 0, tls: tuple[str, str] | None = None) -> Engine:
    cert_file, key_file = tls or ("", "")
    return Engine(
        server_host=host,
        server_port=port,
        server_tls_cert_file=cert_file,
        server_tls_key_file=key_file,
        server_tls_port=0,
        server_io_threads=workers,
        server_ws_path="",
        limits_max_frame_bytes=64 * MIB,
        limits_max_message_bytes=64 * MIB,
        limits_queue_bytes=1024 * MIB,
        # Autobahn sends 64 MiB messages, thousands of them as fast as it can.
        limits_conn_event_bytes=128 * MIB,
        limits_event_queue_bytes=256 * MIB,
        limits_client_rate=0.0,
        app_ping=False,
        heartbeat_ws_ping=False,
        heartbeat_idle_timeout=3600.0,
    )


async def serve(host: str, port: int, workers: int = 0, tls: tuple[str, str] | None = None) -> None:
    loop = asyncio.get_running_loop()
    engine = make_engine(host, port, workers, tls)
    bound_host, bound_port = engine.start()
    stop = asyncio.Event()

    def on_readable() -> None:
        events, more = engine.poll(1024)
        for ev in events:
            kind = ev[0]
            if kind == EV_MESSAGE:
                _, conn, data, binary = ev
                engine.send(conn, data, binary=binary)
            elif kind == EV_CONNECT:
                protocols = ev[6]
                engine.accept(ev[1], protocol=protocols[0] if protocols else None)
            elif kind == EV_CLOSED:
                pass
        if more:
            loop.call_soon(on_readable)

    loop.add_reader(engine.fd, on_readable)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(
        f"echo server listening on ws://{shown}:{bound_port}/ (gateway._core {_core.__version__})",
        flush=True,
    )
    if engine.tls_address is not None:
        # The test certificates name localhost: clients that verify connect by that name.
        print(f"echo server listening on wss://localhost:{engine.tls_address[1]}/", flush=True)
    try:
        await stop.wait()
    finally:
        loop.remove_reader(engine.fd)
        await loop.run_in_executor(
            None, lambda: engine.stop(1001, "server stopping", 2.0)
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="WebSocket echo server on gateway._core (for Autobahn)."
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9001, help="0 = any free port")
    ap.add_argument(
        "--workers", type=int, default=0, help="engine I/O threads (0 = CPU count)"
    )
    ap.add_argument("--tls-cert", metavar="PEM", help="certificate chain: also serve wss:// on a free port")
    ap.add_argument("--tls-key", metavar="PEM", help="its private key")
    args = ap.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port, args.workers, tls))
    else:
        uvloop.run(serve(args.host, args.port, args.workers, tls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
