"""RSS of an engine process under abuse (not a pytest module; docs/architecture.md "Memory bounds").
Usage: python tests/integration/abuse_rss.py old|new ping|appping|flood [seconds]; "old" passes the
keywords of the engine before the rename (run it with that build on PYTHONPATH); RATE=0 turns
the rate limit off for "new".
Scenarios: ping (WS pings, never reading), appping ({"op":"ping"}, never reading),
flood (1 KiB messages while Python does not poll). 8 clients, loopback."""
import os, select, socket, subprocess, sys, threading, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for the support package
from support.ws import OP_PING, OP_TEXT, encode_frame, upgrade_request, parse_head

SERVER = r'''
import os, select, sys, time
from gateway._core import Engine, EV_CONNECT, raise_fd_limit
raise_fd_limit()
mode, poll = sys.argv[1], sys.argv[2] == "1"
kw = dict(host="127.0.0.1", port=0) if mode == "old" else dict(server_host="127.0.0.1", server_port=0, limits_client_rate=float(os.environ.get("RATE", "50")))
e = Engine(**kw)
host, port = e.start()
print(port, flush=True)
while True:
    select.select([e.fd], [], [], 0.05)
    evs, more = e.poll(1024)
    for ev in evs:
        if ev[0] == EV_CONNECT:
            e.accept(ev[1], user=ev[4])
    if not poll and any(ev[0] != EV_CONNECT for ev in evs):
        pass
    if not poll:
        # Take connects only: leave messages queued (Python too slow).
        pass
'''

def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

def main():
    mode, scen = sys.argv[1], sys.argv[2]
    secs = float(sys.argv[3]) if len(sys.argv) > 3 else 5
    srv_code = SERVER
    if scen == "flood":
        # a server that accepts but polls only until the clients are connected
        srv_code = SERVER.replace("evs, more = e.poll(1024)", "evs, more = e.poll(1024) if time.time() < STOP else ([], False)").replace("print(port, flush=True)", "print(port, flush=True)\nSTOP = time.time() + 2")
    p = subprocess.Popen([sys.executable, "-c", srv_code, mode, "1"], stdout=subprocess.PIPE, text=True)
    port = int(p.stdout.readline())
    time.sleep(0.3)
    r0 = rss(p.pid)
    socks = []
    for i in range(8):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port)); s.sendall(upgrade_request("127.0.0.1", port, "/ws", ))
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(1)
        assert parse_head(buf)[0] == 101, buf
        socks.append(s)
    frame = {"ping": encode_frame(OP_PING, b"p" * 125), "appping": encode_frame(OP_TEXT, b'{"op":"ping"}'),
             "flood": encode_frame(OP_TEXT, b'{"op":"publish","data":"' + b"x" * 1000 + b'"}')}[scen] * 256
    stop = time.time() + secs
    sent = [0] * len(socks)
    def pump(i, s):
        s.setblocking(False)
        off = 0
        while time.time() < stop:
            try:
                n = s.send(frame[off:] if off else frame)
                sent[i] += n
                off = (off + n) % len(frame)
            except BlockingIOError:
                select.select([], [s], [], 0.05)
            except OSError:
                return
    ts = [threading.Thread(target=pump, args=(i, s)) for i, s in enumerate(socks)]
    [t.start() for t in ts]
    peak = r0
    while time.time() < stop:
        peak = max(peak, rss(p.pid)); time.sleep(0.1)
        if peak > 3_000_000:
            break
    [t.join() for t in ts]
    peak = max(peak, rss(p.pid))
    print(f"{mode} {scen}: rss start {r0/1024:.1f} MiB, peak {peak/1024:.1f} MiB (+{(peak-r0)/1024:.1f} MiB), client sent {sum(sent)/2**20:.0f} MiB in {secs:.0f} s")
    p.kill()

main()
