"""A connection flood from one source address, run as its own process by
test_conn_flood.py (so its CPU does not stall the honest clients' event loop).

Keeps up to ``--hold`` upgraded WebSocket connections open and, with ``--inflight``
attempts at a time (at most ``--rate`` new attempts per second), keeps trying new ones:
refused attempts are retried at once, and once ``--hold`` connections are open the
oldest is dropped for each new one (a reconnect storm). A share ``--idle-share`` of the
attempts open the TCP connection and send nothing (slow handshakes: they hold a
handshake slot until the server gives up).

Prints ``READY <held> <attempts>`` once ``--ready-held`` connections are held (or after
``--ramp-max`` seconds). Reads commands on stdin: ``mark`` starts the measured window,
``stop`` (or EOF, or ``--duration`` seconds) ends the flood; then it prints one JSON
line: the outcome of every attempt (HTTP status of the upgrade: ``101``, ``429``,
``503``, ...; ``reset``, ``eof``, ``timeout``, ``idle_*``), the most connections held,
and the same for the window (``window``: attempts, outcomes, held_min, held_max).

    python tests/chaos/flood.py --port 8080 --source 127.0.0.2 --hold 2000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import os
import random
import resource
import sys
import time
from typing import Any


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/ws")
    ap.add_argument("--source", default="127.0.0.2")
    ap.add_argument("--hold", type=int, default=2000)
    ap.add_argument("--inflight", type=int, default=200)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--idle-share", type=float, default=0.1)
    ap.add_argument("--duration", type=float, default=60.0, help="at most this long (stdin 'stop' or EOF ends it)")
    ap.add_argument("--ready-held", type=int, default=1000, help="print READY once this many are held ...")
    ap.add_argument("--ramp-max", type=float, default=5.0, help="... or after this many seconds")
    ap.add_argument("--timeout", type=float, default=5.0)
    a = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    outcomes: collections.Counter[str] = collections.Counter()
    held: collections.deque[asyncio.StreamWriter] = collections.deque()
    most_held = 0
    attempts = 0
    ready_said = False
    stop_at = time.monotonic() + a.duration
    sem = asyncio.Semaphore(a.inflight)
    n = 0

    async def attempt(i: int) -> None:
        nonlocal most_held
        writer: asyncio.StreamWriter | None = None
        keep = False
        released = False
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(a.host, a.port, local_addr=(a.source, 0)), a.timeout)
            if random.random() < a.idle_share:
                # A slow handshake: connected, nothing sent; wait for the server to give up
                # (without taking an attempt slot meanwhile).
                sem.release()
                released = True
                try:
                    data = await asyncio.wait_for(reader.read(1), a.timeout * 2)
                    outcomes["idle_closed" if not data else "idle_answered"] += 1
                except TimeoutError:
                    outcomes["idle_timeout"] += 1
                return
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write((f"GET {a.path}?user=flood{i} HTTP/1.1\r\nHost: {a.host}:{a.port}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                          "Sec-WebSocket-Protocol: gateway.v1\r\n\r\n").encode())
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), a.timeout)
            if not line:
                outcomes["eof"] += 1
                return
            parts = line.split()
            code = parts[1].decode() if len(parts) > 1 else "bad"
            outcomes[code] += 1
            if code == "101":
                keep = True
                held.append(writer)
                while len(held) > a.hold:
                    old = held.popleft()
                    old.transport.abort()
                most_held = max(most_held, len(held))
        except TimeoutError:
            outcomes["timeout"] += 1
        except (ConnectionResetError, BrokenPipeError):
            outcomes["reset"] += 1
        except OSError as e:
            outcomes[f"oserror:{e.errno}"] += 1
        finally:
            if writer is not None and not keep:
                writer.transport.abort()
            if not released:
                sem.release()

    tasks: set[asyncio.Task[None]] = set()
    period = 1.0 / a.rate if a.rate > 0 else 0.0
    t0 = time.monotonic()
    window: dict[str, Any] = {}

    async def commands() -> None:
        """``mark`` starts the measured window, ``stop`` (or EOF) ends the flood."""
        nonlocal stop_at
        while True:
            line = (await asyncio.to_thread(sys.stdin.readline)).strip()
            if line == "mark":
                window.update(attempts0=attempts, outcomes0=dict(outcomes), held_min=len(held), held_max=len(held))
            else:
                stop_at = 0.0
                return

    cmd_task = asyncio.ensure_future(commands())
    nxt = time.monotonic()
    while time.monotonic() < stop_at:
        await sem.acquire()
        t = asyncio.ensure_future(attempt(n))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        n += 1
        attempts += 1
        if "held_min" in window:
            window["held_min"] = min(window["held_min"], len(held))
            window["held_max"] = max(window["held_max"], len(held))
        if not ready_said and (len(held) >= a.ready_held or time.monotonic() - t0 > a.ramp_max):
            ready_said = True
            print(f"READY {len(held)} {attempts}", flush=True)
        if period:
            nxt += period
            delay = nxt - time.monotonic()
            await asyncio.sleep(max(0.0, delay))
    cmd_task.cancel()
    for t in list(tasks):
        t.cancel()
    with contextlib.suppress(BaseException):
        await asyncio.gather(*tasks, return_exceptions=True)
    for w in held:
        w.transport.abort()
    res: dict[str, Any] = {"attempts": attempts, "outcomes": dict(outcomes), "most_held": most_held,
                           "seconds": round(time.monotonic() - t0, 2)}
    if "held_min" in window:
        res["window"] = {"attempts": attempts - window["attempts0"],
                         "outcomes": {k: v - window["outcomes0"].get(k, 0) for k, v in outcomes.items()},
                         "held_min": window["held_min"], "held_max": window["held_max"]}
    print(json.dumps(res), flush=True)

if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    sys.exit(0)
