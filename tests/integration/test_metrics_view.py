"""/metrics: engine histograms, hook durations and the bounded per-room view, scraped from
a real gateway after real traffic, parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess, uniq


def scrape(gw: GatewayProcess) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(gw.metrics())}


async def test_histograms_and_top_rooms(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory("presence.interval=0.3", "metrics.top_rooms=2")
    rooms = [f"live:{uniq('m')}" for _ in range(3)]
    clients = []
    try:
        # Room i gets i + 1 members; only the largest room gets traffic.
        for i, room in enumerate(rooms):
            for j in range(i + 1):
                c = await gw.client()
                clients.append(c)
                await c.join(room)
        busy = clients[-1]
        for k in range(5):
            await busy.publish(rooms[2], {"k": k})
        await asyncio.sleep(1.0)  # several presence ticks: rates are computed per tick
        m = await asyncio.to_thread(scrape, gw)

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
        for c in clients:
            await c.close()
