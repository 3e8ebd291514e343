"""Repro (not a benchmark; found by bench/desk.py): messages committed while a reconnecting connection's first `sync` runs are
neither in the sync ack nor delivered live (conversations.sync reads the snapshot, then
attaches). A desk session: the agent posts a chat every 5 ms; the shopper drops its
socket, comes back with sync(since=cursor), listens 0.3 s, reads up to what it saw,
again.

    python loadtest/bench/sync_gap.py [ROUNDS]

Reports seqs in (read_seq, last seen] it never saw, confirmed by history."""

import asyncio
import pathlib
import re
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "loadtest" / "bench")]
from run import Server  # noqa: E402

from gateway.client import GatewayClient  # noqa: E402


async def main(url, rounds):
    seen = set()

    def on_msg(m):
        if str(m.get("room", "")).startswith("cs:") and m.get("seq"):
            seen.add(m["seq"])

    ag = GatewayClient(url, user="ag1", params={"role": "agent"}, compression=None, on_message=lambda m: None)
    await ag.connect()
    await ag.sync(limit=1, msgs=0)
    await ag.request("cs.status", status="online", capacity=5)
    sh = GatewayClient(url, user="sh1", compression=None, on_message=on_msg)
    await sh.connect()
    ack = await sh.sync()
    cursor = ack["cursor"]
    o = await sh.request("cs.open", card={"kind": "product", "title": "x"})
    room = o["room"]
    await asyncio.sleep(0.3)
    stop = False

    async def pump():
        while not stop:
            try:
                await ag.publish(room, {"text": "a"})
            except Exception as e:
                print("agent", e)
                return
            await asyncio.sleep(0.005)

    p = asyncio.ensure_future(pump())
    lost_total, lost_rounds = [], 0
    read_seq = 0
    for r in range(rounds):
        await asyncio.sleep(0.1)
        top = max(seen) if seen else 0
        await sh.read(room, top)
        read_seq = top
        sh.abort()
        await asyncio.sleep(0.05)
        await sh.connect()
        ack = await sh.sync(since=cursor, msgs=50)
        cursor = ack["cursor"]
        info = None
        for c in ack["convs"]:
            if c["room"] == room:
                info = (c["read_seq"], c["last_seq"], [m["seq"] for m in c["msgs"]])
                for m in c["msgs"]:
                    seen.add(m["seq"])
        await asyncio.sleep(0.3)
        top = max(seen)
        lost = [s for s in range(read_seq + 1, top + 1) if s not in seen]
        if lost:
            lost_rounds += 1
            lost_total += lost
            if lost_rounds <= 4:
                later = sorted(x for x in seen if x > read_seq)[:8]
                print("round", r, "read_seq", read_seq, "sync (read_seq, last_seq, msgs)", info, "lost", lost, "seen after read_seq", later)
    stop = True
    await p
    hist = set()
    after = 0
    while True:
        page = await sh.request("history", room=room, after_seq=after, limit=200)
        ms = page["msgs"]
        if not ms:
            break
        hist |= {m["seq"] for m in ms}
        after = ms[-1]["seq"]
    print(
        {
            "rounds": rounds,
            "rounds_with_a_loss": lost_rounds,
            "lost_seqs": lost_total[:30],
            "n_lost": len(lost_total),
            "lost_in_history": sum(1 for s in lost_total if s in hist),
            "max_seq": max(hist),
        }
    )


if __name__ == "__main__":
    tmp = tempfile.mkdtemp()
    t = re.sub(r"(?m)^host = .*$", "", (ROOT / "loadtest" / "desk.toml").read_text())
    pathlib.Path(tmp, "d.toml").write_text(t)
    with Server("livegate", [f"store.path={tmp}/s.db"], tag="-race", config=pathlib.Path(tmp, "d.toml")) as s:
        asyncio.run(main(s.url, int(sys.argv[1]) if len(sys.argv) > 1 else 40))
