"""/metrics: engine histograms, hook durations and the bounded per-room view, scraped from
a real gateway after real traffic, parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import websockets
from prometheus_client.parser import text_string_to_metric_families

from gwtest import GatewayFactory, uniq


def scrape(url: str) -> dict[str, list]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


async def test_histograms_and_top_rooms(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory("presence.interval=0.3", "metrics.top_rooms=2")
    rooms = [f"live:{uniq('m')}" for _ in range(3)]
    clients = []
    try:
        # Room i gets i + 1 members; only the largest room gets traffic.
        for i, room in enumerate(rooms):
            for j in range(i + 1):
                ws = await websockets.connect(gw.ws_url(user=uniq("u")))
                await ws.recv()  # connected
                await ws.send(json.dumps({"op": "join", "id": 1, "room": room}))
                while json.loads(await ws.recv()).get("op") != "ack":
                    pass
                clients.append(ws)
        busy = clients[-1]
        for k in range(5):
            await busy.send(json.dumps({"op": "publish", "id": 10 + k, "room": rooms[2], "data": {"k": k}}))
        await asyncio.sleep(1.0)  # several presence ticks: rates are computed per tick
        m = scrape(gw.api_url)

        fan = {s.labels.get("le"): s.value for s in m["gateway_fanout_seconds"] if s.name.endswith("_bucket")}
        assert fan["+Inf"] >= 5, "one fan-out round per published message at least"
        lag = [s for s in m["gateway_flush_lag_seconds"] if s.name.endswith("_count")]
        assert lag and lag[0].value >= 1
        hooks = {s.labels["hook"] for s in m["gateway_hook_duration_seconds"]}
        assert hooks >= {"on_connect", "on_message", "on_join"}

        members = {s.labels["room"]: s.value for s in m["gateway_top_room_members"]}
        # top_rooms=2: the two largest rooms (3 and 2 members); the busiest is among them.
        assert members == {rooms[2]: 3, rooms[1]: 2}
        rates = {s.labels["room"]: s.value for s in m["gateway_top_room_messages_per_second"]}
        assert set(rates) == set(members)
    finally:
        for ws in clients:
            await ws.close()
