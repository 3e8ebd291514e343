#!/usr/bin/env python3
"""Write the seed inputs of the fuzz targets into fuzz/corpus/<target>/seed-*.

Seeds are real traffic in each target's input format (a few config bytes, then the
bytes): browser, WeChat-like and library handshakes, client and server frames, and
permessage-deflate messages. tools/fuzz.sh --cmin minimizes the corpus afterwards; a
seed that adds no coverage is dropped there.
"""
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus")

# Indexes into the targets' tables (see fuzz_targets/*.rs).
CAP = {0: 0, 1: 1, 2: 2, 16: 3, 125: 4, 126: 5, 127: 6, 128: 7, 1000: 8, 4096: 9, 65535: 10, 65536: 11}
HS_MAXH = {64: 6, 4: 3, 100: 7}
HS_MAXB = {8192: 6, 256: 4, 65536: 7}
DF_CAP = {0: 0, 16: 3, 64: 5, 255: 7, 256: 8, 1000: 9, 4096: 10, 65536: 11}


def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def deflate_msg(data, wbits=15, level=6):
    c = zlib.compressobj(level, zlib.DEFLATED, -wbits)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def frame(op, payload, fin=True, rsv1=False, mask=b"\x37\xfa\x21\x3d"):
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | op
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        h = bytes([b0, m | n])
    elif n < 65536:
        h = bytes([b0, m | 126]) + struct.pack(">H", n)
    else:
        h = bytes([b0, m | 127]) + struct.pack(">Q", n)
    if not mask:
        return h + payload
    return h + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def frames():
    join = b'{"op":"join","room":"lobby","id":1}'
    pub = '{"op":"publish","room":"lobby","data":{"text":"你好, WeChat 👋"}}'.encode()
    big = b'{"op":"publish","room":"r","data":"' + b"x" * 300 + b'"}'
    close = struct.pack(">H", 1000) + b"bye"

    def server(name, stream, deflate=0, fcap=65536, mcap=65536, bits=15, seed=0, client=False):
        b0 = (1 if client else 0) | (deflate << 1)
        write("frame_decoder", name, bytes([b0, CAP[fcap], CAP[mcap], bits - 9, seed]) + stream)

    server("text", frame(1, join))
    server("session", frame(1, join) + frame(9, b"hb") + frame(1, pub) + frame(10, b"") + frame(8, close), seed=3)
    server("fragments", frame(1, pub[:10], fin=False) + frame(9, b"x") + frame(0, pub[10:20], fin=False)
           + frame(0, pub[20:], fin=True), seed=1)
    server("len126", frame(2, bytes(range(256)) * 2), seed=6)
    server("len127", frame(2, b"\x00" * 70000)[:14] + b"\x00" * 64, fcap=65536)
    server("text-cut-utf8", frame(1, pub[:40], fin=False) + frame(0, pub[40:]), seed=2)
    server("bad-utf8", frame(1, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited"), seed=1)
    server("unmasked", frame(1, join, mask=None))
    server("close-bad-code", frame(8, struct.pack(">H", 1005)))
    server("too-big", frame(2, big), fcap=128, mcap=128)
    z = deflate_msg(pub)
    server("deflate", frame(1, z, rsv1=True) + frame(1, deflate_msg(big), rsv1=True), deflate=1, seed=4)
    server("deflate-noctx", frame(1, z[:5], fin=False, rsv1=True) + frame(0, z[5:]), deflate=2, bits=9, seed=5)
    # RFC 7692 section 7.2.3.2: two messages sharing the sliding window.
    server("deflate-rfc7692", frame(1, bytes.fromhex("f248cdc9c90700"), rsv1=True)
           + frame(1, bytes.fromhex("f200110000"), rsv1=True), deflate=1)
    server("client-role", frame(1, pub, mask=None) + frame(9, b"", mask=None) + frame(8, close, mask=None),
           client=True, seed=7)


def handshakes():
    key = "dGhlIHNhbXBsZSBub25jZQ=="

    def req(lines, path="/ws?token=abc"):
        return ("GET %s HTTP/1.1\r\n" % path + "".join(l + "\r\n" for l in lines) + "\r\n").encode()

    chrome = req([
        "Host: gw.example.com", "Connection: Upgrade", "Pragma: no-cache", "Cache-Control: no-cache",
        "User-Agent: Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36",
        "Upgrade: websocket", "Origin: https://app.example.com", "Sec-WebSocket-Version: 13",
        "Accept-Encoding: gzip, deflate, br, zstd", "Accept-Language: zh-CN,zh;q=0.9,en;q=0.8",
        "Sec-WebSocket-Key: " + key, "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        "Sec-WebSocket-Protocol: gateway.v1"])
    firefox = req([
        "Host: gw.example.com",
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
        "Accept: */*", "Accept-Language: en-US,en;q=0.5", "Accept-Encoding: gzip, deflate, br, zstd",
        "Sec-WebSocket-Version: 13", "Origin: https://app.example.com",
        "Sec-WebSocket-Extensions: permessage-deflate", "Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==",
        "Connection: keep-alive, Upgrade", "Sec-Fetch-Dest: empty", "Sec-Fetch-Mode: websocket",
        "Sec-Fetch-Site: same-site", "Pragma: no-cache", "Cache-Control: no-cache", "Upgrade: websocket"])
    safari = req([
        "Host: gw.example.com", "Sec-WebSocket-Extensions: permessage-deflate", "Sec-WebSocket-Key: " + key,
        "Upgrade: websocket", "Origin: https://app.example.com", "Sec-WebSocket-Version: 13",
        "Connection: Upgrade", "Accept-Language: en-GB,en;q=0.9",
        "User-Agent: Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1"])
    wechat = req([
        "Host: gw.example.com", "Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: " + key,
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=15; server_max_window_bits=10",
        "Sec-WebSocket-Protocol: gateway.v1",
        "User-Agent: Mozilla/5.0 (Linux; Android 14; V2307A Build/UP1A.231005.007; wv) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Version/4.0 Chrome/116.0.0.0 Mobile Safari/537.36 XWEB/1160065 MMWEBSDK/20231202 "
        "MMWEBID/2247 MicroMessenger/8.0.47.2560(0x28002F35) WeChat/arm64 Weixin NetType/WIFI Language/zh_CN ABI/arm64",
        "Referer: https://servicewechat.com/wx1234567890abcdef/12/page-frame.html", "Accept-Encoding: gzip"],
        path="/ws?token=eyJhbGciOiJIUzI1NiJ9.e30.sig&room=%E5%A4%A7%E5%8E%85")
    okhttp = req(["Host: gw.example.com:8080", "Upgrade: websocket", "Connection: Upgrade",
                  "Sec-WebSocket-Key: " + key, "Sec-WebSocket-Version: 13",
                  "Sec-WebSocket-Extensions: permessage-deflate", "Accept-Encoding: gzip",
                  "User-Agent: okhttp/4.12.0"])
    python = req(["Host: localhost:8080", "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: " + key,
                  "Sec-WebSocket-Version: 13",
                  "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits, permessage-deflate",
                  "User-Agent: Python/3.12 websockets/13.1"], path="/ws")
    health = b"GET /health HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8.11.0\r\nAccept: */*\r\n\r\n"
    bad = [
        ("post-upgrade", chrome.replace(b"GET ", b"POST ", 1)),
        ("version8", chrome.replace(b"Version: 13", b"Version: 8")),
        ("http10", chrome.replace(b"HTTP/1.1", b"HTTP/1.0", 1)),
        ("bad-key", chrome.replace(key.encode(), b"not-base64!")),
        ("tls-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)),
        ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("pipelined", health + b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"),
    ]
    for name, data, mh, mb, seed in [
        ("chrome", chrome, 64, 8192, 0), ("firefox", firefox, 64, 8192, 3), ("safari", safari, 64, 8192, 1),
        ("wechat", wechat, 64, 8192, 5), ("okhttp", okhttp, 64, 8192, 7), ("python", python, 64, 8192, 0),
        ("health", health, 64, 8192, 2), ("chrome-few-headers", chrome, 4, 8192, 0),
        ("firefox-small-head", firefox, 64, 256, 4),
    ] + [(n, d, 64, 8192, 0) for n, d in bad]:
        write("handshake", name, bytes([HS_MAXH[mh], HS_MAXB[mb], seed, 6]) + data)


def deflates():
    msgs = [
        b'{"op":"publish","room":"lobby","data":{"text":"hello"}}',
        '{"op":"presence","room":"大厅","users":["张三","李四","wx_7f3a"]}'.encode(),
        b'{"t":"tick","seq":' + b"1234567890," * 40 + b"0}",
        bytes(range(256)),
    ]
    for i, m in enumerate(msgs):
        # Round trip (mode 1): window 15, level 6, slack 0, one message.
        write("deflate", "rt-%d" % i, bytes([1, 6, 6, 0, 0]) + m)
        # Inflate (mode 0) of a real compressed message, with a cap around its size.
        for bits in (15, 9):
            write("deflate", "inflate-%d-w%d" % (i, bits),
                  bytes([0, bits - 9, 0, DF_CAP[1000], 1]) + deflate_msg(m, wbits=bits))
    write("deflate", "inflate-small-cap", bytes([0, 6, 0, DF_CAP[64], 1]) + deflate_msg(msgs[2]))
    write("deflate", "rt-many", bytes([1, 0, 1, 2, 0x2c]) + b"".join(msgs))
    # RFC 7692 section 7.2.3: compressed, stored block, and the two-message shared window.
    write("deflate", "rfc7692-hello", bytes([0, 6, 0, DF_CAP[16], 0]) + bytes.fromhex("f248cdc9c90700"))
    write("deflate", "rfc7692-stored", bytes([0, 6, 0, DF_CAP[16], 0]) + bytes.fromhex("000500faff48656c6c6f00"))
    write("deflate", "rfc7692-bfinal", bytes([0, 6, 0, DF_CAP[16], 0]) + bytes.fromhex("f348cdc9c90700"))


def proxies():
    """PROXY protocol headers as HAProxy and AWS NLB send them, valid and broken."""
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    http = b"GET /ws HTTP/1.1\r\nHost: gw.example.com\r\nUpgrade: websocket\r\n\r\n"

    def v2(ver_cmd, fam, body):
        return sig + bytes([ver_cmd, fam]) + struct.pack(">H", len(body)) + body

    def tlv(t, v):
        return bytes([t]) + struct.pack(">H", len(v)) + v

    v4 = bytes([198, 51, 100, 22, 10, 0, 1, 5]) + struct.pack(">HH", 35646, 443)
    v6 = (bytes.fromhex("20010db885a3000000008a2e03707334") + bytes.fromhex("20010db8000000000000000000000443")
          + struct.pack(">HH", 51234, 443))
    ssl = tlv(0x20, b"\x01\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3"))
    for name, data, seed in [
        ("v1-tcp4", b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n" + http, 0),
        ("v1-tcp6", b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\r\n" + http, 1),
        ("v1-mapped", b"PROXY TCP6 ::ffff:203.0.113.9 ::1 1 2\r\n", 0),
        ("v1-unknown", b"PROXY UNKNOWN\r\n" + http, 2),
        ("v1-unknown-max", b"PROXY UNKNOWN " + b":".join([b"ffff"] * 8) + b" " + b":".join([b"ffff"] * 8)
         + b" 65535 65535\r\n", 0),
        ("v1-bare-lf", b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n", 0),
        ("v1-port-range", b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n", 0),
        ("v2-nlb", v2(0x21, 0x11, v4 + tlv(0xEA, b"\x01vpce-08d2bf15fac5001c9")) + http, 0),
        ("v2-nlb-chunked", v2(0x21, 0x11, v4 + tlv(0xEA, b"\x01vpce-08d2bf15fac5001c9")) + http, 1),
        ("v2-haproxy-v6", v2(0x21, 0x21, v6 + tlv(0x01, b"h2") + tlv(0x02, b"gw.example.com")
                               + tlv(0x03, b"\x5a\x1f\x09\xc3") + ssl + tlv(0x04, bytes(3))) + http, 3),
        ("v2-local", v2(0x20, 0x00, b""), 0),
        ("v2-local-addr", v2(0x20, 0x11, v4), 2),
        ("v2-unspec", v2(0x21, 0x00, b""), 0),
        ("v2-udp", v2(0x21, 0x12, v4), 0),
        ("v2-unix", v2(0x21, 0x31, bytes(216)), 4),
        ("v2-short-block", v2(0x21, 0x21, bytes(35)), 0),
        # At the parser's 4096-byte cap (NOOP padding); also lifts libFuzzer's default
        # max_len (4096) above the cap, so headers at and over it are generated.
        ("v2-at-cap", v2(0x21, 0x11, v4 + tlv(0x04, bytes(4096 - 16 - 12 - 3))) + http, 5),
        ("tls-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), 0),
        ("http", http, 0),
    ]:
        write("proxy_header", name, bytes([seed]) + data)


if __name__ == "__main__":
    frames()
    handshakes()
    deflates()
    proxies()
