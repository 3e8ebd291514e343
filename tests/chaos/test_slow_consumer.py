"""One slow consumer among 5,000 members of a room (docs/architecture.md backpressure,
docs/protocol.md close code 4008): the others keep their throughput and get every
message, the slow one is closed with 4008, the node's memory stays bounded.

gw-load does the 5,000 members: one publisher at a fixed rate of high-priority messages
(``gift``), two runs on fresh nodes in the same test, without and with ``--slow 1`` (the
first member joins and then never reads its socket, 16 KiB receive buffer). A fixed rate
rather than saturation: on this 2-core machine a saturated run moves by more than 5 %
from one run to the next, while at a fixed offered load "throughput" is what the members
got within the run, which a slow consumer must not reduce.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from chaoslib import RssSampler, gw_load_binary, run_gw_load
from support.gateway import GatewayProcess

MEMBERS = 5000
RATE = 200  # msgs/s -> 1,000,000 deliveries/s into 5,000 members
QUEUE_BYTES = 262144
SETS = [
    f"limits.queue_bytes={QUEUE_BYTES}",
    # The kernel send buffer autotunes to ~4 MiB on loopback: capped, the slow consumer's
    # queue fills within seconds instead of half a minute.
    "limits.socket_send_buffer=65536",
    "server.io_threads=2",
    # 5,000 members connect from one address at once, and the publisher goes at 200/s.
    "limits.max_handshakes_per_ip=10000",
    "limits.client_rate=0",
]


async def _run(single_node: Callable[..., GatewayProcess], slow: int) -> tuple[dict[str, Any], dict[str, Any], RssSampler]:
    node = await asyncio.to_thread(single_node, f"slow{slow}", SETS)
    try:
        before = (await node.stats())["engine"]
        async with RssSampler(node.pid) as rss:
            load = await run_gw_load(
                ["--url", node.ws_url(), "--conns", str(MEMBERS), "--room", "chaos:slow", "--connect-inflight", "1024",
                 "--rate", str(RATE), "--msg-type", "gift", "--payload-bytes", "512", "--warmup", "1",
                 "--duration", "6", "--drain-wait", "1", "--ping-interval", "5", "--lat-sample", "10",
                 "--slow", str(slow), "--slow-rcvbuf", "16384", "--server-pid", str(node.pid)],
                budget=60)
        after = (await node.stats())["engine"]
    finally:
        await node.astop()
    delta = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], int) and k in before}
    return load, delta, rss


@pytest.mark.skipif(gw_load_binary() is None, reason="gw-load not built (cargo build --release -p gw-load)")
async def test_slow_consumer_among_5000_members(single_node: Callable[..., GatewayProcess]) -> None:
    base, base_eng, base_rss = await _run(single_node, slow=0)
    slow, slow_eng, slow_rss = await _run(single_node, slow=1)

    def line(tag: str, ld: dict[str, Any], eng: dict[str, Any], rss: RssSampler) -> str:
        return (f"{tag}: receivers={ld['receivers']} published={ld['published']} received={ld['received']}/"
                f"{ld['expected_deliveries']} deliveries/s={ld['deliveries_per_s']:,.0f} p99={ld['latency_ms']['p99']} ms "
                f"closes={ld['closes_by_code']} slow_closes={ld['slow_closes_by_code']} close_slow_consumer="
                f"{eng.get('close_slow_consumer')} dropped_high={eng.get('dropped_high')} "
                f"rss start/peak/end KiB={rss.samples[0][1]}/{rss.peak}/{rss.samples[-1][1]}")

    print("\n" + line("without", base, base_eng, base_rss) + "\n" + line("with slow", slow, slow_eng, slow_rss))
    for ld in (base, slow):
        assert ld["conns_failed"] == 0 and not ld["timed_out"], ld
        assert ld["published"] >= RATE * 5, ld
    assert base["receivers"] == MEMBERS and slow["receivers"] == MEMBERS - 1 and slow["slow_ready"] == 1

    # Every other member got every message, and none of them was closed.
    assert base["received"] == base["expected_deliveries"], base
    assert slow["received"] == slow["expected_deliveries"], "a member other than the slow one missed messages"
    assert not slow["closes_by_code"], f"other members were closed: {slow['closes_by_code']}"
    assert slow["publish_errors"] == 0 and slow["publish_acks"] >= slow["published"]

    # The others' throughput: within 5 % of the run without the slow consumer.
    ratio = slow["deliveries_per_s"] / base["deliveries_per_s"]
    assert ratio >= 0.95, f"others' throughput fell to {ratio:.3f} of the baseline"

    # The slow one was closed for being slow (4008; its own buffers are full, so it may
    # only see the TCP close): the server's counter says why, and it was the only one.
    assert slow_eng.get("close_slow_consumer") == 1, slow_eng
    assert base_eng.get("close_slow_consumer") == 0, base_eng
    assert set(slow["slow_closes_by_code"]) <= {"4008", "eof", "reset"}, slow["slow_closes_by_code"]
    assert "open" not in slow["slow_closes_by_code"]

    # Memory: the slow consumer costs at most its bounded queue (plus allocator noise),
    # not a backlog of everything it did not read.
    grown = slow_rss.peak - base_rss.peak
    assert grown <= 16 * 1024, f"peak RSS {slow_rss.peak} KiB with the slow consumer vs {base_rss.peak} KiB without"
    tail = [v for _, v in slow_rss.samples[len(slow_rss.samples) // 2:]]
    assert max(tail) <= slow_rss.samples[len(slow_rss.samples) // 2][1] + 8 * 1024, "RSS keeps growing with the slow consumer"
