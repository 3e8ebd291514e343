"""Media messages through a real gateway (issue 17): uploads over the client port (the
engine relays ``/media/`` to the node's upload server), publish checks, signed downloads,
moderation verdicts, purge and sweeping, on the disk backend; the same flow on a real
S3-compatible server (s3s-fs) at the end. Clients are real: ``GatewayClient`` sockets and
its multipart ``upload``, raw sockets for the abusive cases."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import struct
import time
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image
from support.gateway import GatewayProcess, uniq
from support.routes import conversation, route, routes
from support.wait import eventually

from gateway.client import GatewayClient, GatewayError

ROUTES = routes(
    conversation("dm:{a}:{b}", "dm", members_max=2),
    conversation("group:{group_id}", "group", media_limits={"image": 100_000}),
    conversation("notice:{user_id}", "notice", publish="none", members_max=1),
    route("live:{room_id}"),
)


@dataclass
class Chat:
    """A gateway and two connected clients, ``a`` (alice) and ``b`` (bob, synced)."""

    g: GatewayProcess
    a: GatewayClient
    b: GatewayClient
    alice: str
    bob: str

    @property
    def room(self) -> str:
        return dm(self.alice, self.bob)


@contextlib.asynccontextmanager
async def chat(tmp_path: Path, *sets: str, app: str | None = None) -> AsyncIterator[Chat]:
    """A gateway on ROUTES with ``sets``; both clients closed and the gateway stopped
    cleanly (no traceback in its log) at the end."""
    g = GatewayProcess(tmp_path, ["limits.client_rate=0", *sets], config=ROUTES, app=app).start()
    alice, bob = f"alice{uniq()}", f"bob{uniq()}"
    a = await g.client(alice)
    b = await g.client(bob)
    try:
        await b.request("sync")
        yield Chat(g, a, b, alice, bob)
    finally:
        await a.close()
        await b.close()
        assert not g.finish()


def dm(a: str, b: str) -> str:
    return GatewayClient.dm_room(a, b)


def jpeg(w: int = 640, h: int = 480, quality: int = 90) -> bytes:
    img = Image.new("RGB", (w, h))
    px = img.load()
    assert px is not None
    for x in range(0, w, 7):
        for y in range(0, h, 5):
            px[x, y] = ((x * 7) % 256, (y * 3) % 256, (x + y) % 256)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def wav(seconds: float, rate: int = 8000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(rate)
        w.writeframes(bytes([128]) * int(seconds * rate))
    return out.getvalue()


def exe() -> bytes:
    """The start of a PE executable (what an .exe renamed .jpg holds)."""
    return b"MZ\x90\x00\x03" + b"\x00" * 59 + struct.pack("<I", 64) + b"PE\x00\x00" + b"\x00" * 4000


async def next_msg(c: GatewayClient, pred: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The next room message on ``c`` that ``pred`` accepts (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        m = await c.recv(timeout=max(0.01, deadline - time.monotonic()))
        if pred(m):
            return m


async def get(url: str) -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.read(), dict(r.headers)


def absolute(g: GatewayProcess, url: str) -> str:
    return url if url.startswith("http") else g.http_url + url


async def raw_http(g: GatewayProcess, head: bytes, body: bytes = b"", *, read_after: float = 10.0) -> bytes:
    """Send ``head`` (and ``body``) on a plain socket to the client port; the answer."""
    r, w = await asyncio.open_connection("127.0.0.1", g.port)
    w.write(head + body)
    await w.drain()
    try:
        return await asyncio.wait_for(r.read(), read_after)
    finally:
        w.close()


async def test_upload_publish_and_a_second_client_downloads_image_voice_and_file(tmp_path: Path) -> None:
    async with chat(tmp_path) as t:
        g, a, b = t.g, t.a, t.b
        room = t.room
        photo = jpeg()
        progress: list[tuple[int, int]] = []
        ack = await a.send_image(room, photo, filename="parcel.jpg", on_progress=lambda s, t: progress.append((s, t)))
        assert ack["seq"] >= 1 and progress and progress[-1][0] == progress[-1][1]
        up = ack["file"]
        assert up["kind"] == "image" and up["mime"] == "image/jpeg" and up["size"] == len(photo)
        assert (up["w"], up["h"]) == (640, 480) and up["thumb"] is True and up["name"] == "parcel.jpg"
        msg = await next_msg(b, lambda m: m.get("room") == room and m.get("type") == "image")
        data = msg["data"]
        assert data["file_id"] == up["file_id"] and data["expires"] > time.time() * 1000
        status, body, headers = await get(absolute(g, data["url"]))
        assert status == 200 and body == photo and headers["Content-Type"] == "image/jpeg"
        status, thumb, _ = await get(absolute(g, data["thumb_url"]))
        assert status == 200 and thumb[:3] == b"\xff\xd8\xff"
        assert max(Image.open(io.BytesIO(thumb)).size) <= 320

        voice = wav(2.5)
        vack = await a.send_voice(room, voice, filename="v.wav")
        assert vack["file"]["duration"] == 2500 and vack["file"]["kind"] == "voice"

        pdf = b"%PDF-1.4\n" + b"0" * 5000 + b"\n%%EOF\n"
        fack = await a.send_file(room, pdf, filename="合同 v2.pdf")
        fmsg = await next_msg(b, lambda m: m.get("type") == "file")
        status, body, headers = await get(absolute(g, fmsg["data"]["url"]))
        assert status == 200 and body == pdf
        assert "attachment" in headers["Content-Disposition"] and "filename*=UTF-8''" in headers["Content-Disposition"]
        assert fack["file"]["name"] == "合同 v2.pdf"

        # Paged later: the URLs are signed again (not the ones delivered live).
        await asyncio.sleep(1.1)
        page = await b.request("history", room=room, limit=10)
        images = [m for m in page["msgs"] if m["type"] == "image"]
        assert images and images[0]["data"]["expires"] > data["expires"]
        status, body, _ = await get(absolute(g, images[0]["data"]["url"]))
        assert status == 200 and body == photo
        sync = await b.request("sync")
        (conv,) = [c for c in sync["convs"] if c["room"] == room]
        assert conv["last"]["type"] == "file" and conv["last"]["data"]["url"]


async def test_forged_and_expired_urls_get_403(tmp_path: Path) -> None:
    async with chat(tmp_path, "media.url_ttl=1") as t:
        g, a = t.g, t.a
        up = await a.upload(jpeg(64, 64), kind="image")
        url = absolute(g, up["url"])
        assert (await get(url))[0] == 200
        forged = url[:-3] + ("AAA" if not url.endswith("AAA") else "BBB")
        assert (await get(forged))[0] == 403
        other = url.replace(up["file_id"], "m_" + "x" * 22)
        assert (await get(other))[0] == 403
        assert (await get(url.replace("?e=", "?e=9").replace("/f/", "/t/")))[0] == 403
        await asyncio.sleep(2.2)
        status, body, _ = await get(url)
        assert status == 403 and b"expired" in body


async def test_limits_hold_while_the_bytes_stream_in_and_at_publish(tmp_path: Path) -> None:
    async with chat(tmp_path, "media.limits.image=300000", "media.limits.voice=100000") as t:
        g, a = t.g, t.a
        user = t.alice
        # 30 MB announced, 256 KiB sent: the refusal comes before the rest is sent.
        boundary = "xyz"
        part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jpg\"\r\n\r\n").encode()
        head = (f"POST /media/upload?user={user}&kind=image HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {30 << 20}\r\n\r\n").encode()
        t0 = time.monotonic()
        answer = await raw_http(g, head, part + jpeg()[:4096] + b"\0" * (256 << 10))
        assert answer.startswith(b"HTTP/1.1 413") and b"too_large" in answer, answer[:300]
        assert time.monotonic() - t0 < 5
        # Over the limit with a truthful length, through the client.
        with pytest.raises(GatewayError) as e:
            await a.upload(jpeg(1600, 1600, 100) + b"\0" * 300_000, kind="image")
        assert e.value.code == 413
        # The voice limit in seconds: 61 s of 8 kHz 8-bit WAV is under the byte cap only
        # when the cap is raised, so measure it against the default 2 MB.
        # At publish: the group takes images up to 100 kB; this one is 150 kB.
        alice = f"g{uniq()}"
        owner = await g.client(alice)
        ack = await owner.create_group([user])
        room = ack if isinstance(ack, str) else ack["room"]
        big = jpeg(600, 600, 80)
        assert 100_000 < len(big) < 300_000, len(big)
        up = await owner.upload(big, kind="image")
        with pytest.raises(GatewayError) as e:
            await owner.publish(room, {"file_id": up["file_id"]}, type="image")
        assert e.value.code == 4009
        # Naming the room at upload applies the route's limit while streaming.
        with pytest.raises(GatewayError) as e:
            await owner.upload(big, kind="image", room=room)
        assert e.value.code == 413
        await owner.close()


async def test_renamed_executables_and_bad_requests_are_refused_and_the_node_serves_on(tmp_path: Path) -> None:
    async with chat(tmp_path) as t:
        g, a = t.g, t.a
        user = t.alice
        for kind in ("image", "file", None):
            with pytest.raises(GatewayError) as e:
                await a.upload(exe(), kind=kind, filename="photo.jpg")
            assert e.value.code == 415, (kind, e.value.message)
        with pytest.raises(GatewayError) as e:
            await a.upload(b"#!/bin/sh\nrm -rf /\n", kind="file", filename="notes.txt")
        assert e.value.code == 415
        with pytest.raises(GatewayError) as e:
            await a.upload(wav(1), kind="image")
        assert e.value.code == 415
        # No token: 401. A chunked body: 411. Garbage multipart: 400.
        anon = GatewayClient(g.ws_url())
        with pytest.raises(GatewayError) as e:
            await anon.upload(jpeg(32, 32), kind="image")
        assert e.value.code == 401
        head = (f"POST /media/upload?user={user} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                "Transfer-Encoding: chunked\r\n\r\n").encode()
        assert (await raw_http(g, head, b"5\r\nhello\r\n0\r\n\r\n")).startswith(b"HTTP/1.1 411")
        head = (f"POST /media/upload?user={user} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                "Content-Length: 20\r\n\r\n").encode()
        assert (await raw_http(g, head, b"\x00garbage-not-a-part!")).startswith(b"HTTP/1.1 400")
        # The secret the engine adds cannot be supplied from outside.
        head = (f"GET /media/f/m_{'a' * 22}?e=1&s=x HTTP/1.1\r\nHost: x\r\nX-Gateway-Media-Secret: guess\r\n\r\n").encode()
        assert (await raw_http(g, head)).startswith(b"HTTP/1.1 403")
        # Other connections did not notice.
        assert (await a.ping())["op"] == "pong"
        up = await a.upload(jpeg(32, 32), kind="image")
        assert up["file_id"].startswith("m_")


async def test_publish_checks_owner_kind_reuse_and_existence(tmp_path: Path) -> None:
    async with chat(tmp_path) as t:
        a, b = t.a, t.b
        alice, bob, carol = t.alice, t.bob, f"carol{uniq()}"
        up = await a.upload(jpeg(64, 64), kind="image")
        fid = up["file_id"]
        with pytest.raises(GatewayError) as e:
            await b.publish(dm(bob, carol), {"file_id": fid}, type="image")
        assert e.value.code == 4036
        with pytest.raises(GatewayError) as e:
            await a.publish(dm(alice, bob), {"file_id": fid}, type="file")
        assert e.value.code == 4037
        with pytest.raises(GatewayError) as e:
            await a.publish(dm(alice, bob), {"file_id": "m_" + "Q" * 22}, type="image")
        assert e.value.code == 4035
        with pytest.raises(GatewayError) as e:
            await a.publish(dm(alice, bob), {"url": "https://elsewhere/x.jpg"}, type="image")
        assert e.value.code == 4000
        # Live rooms take no media by default.
        await a.join("live:1")
        with pytest.raises(GatewayError) as e:
            await a.publish("live:1", {"file_id": fid}, type="image")
        assert e.value.code == 4037
        ack = await a.publish(dm(alice, bob), {"file_id": fid, "caption": "the box"}, type="image", cid="c1")
        again = await a.publish(dm(alice, bob), {"file_id": fid, "caption": "the box"}, type="image", cid="c1")
        assert again["seq"] == ack["seq"]
        with pytest.raises(GatewayError) as e:
            await a.publish(dm(alice, carol), {"file_id": fid}, type="image")
        assert e.value.code == 4038


async def test_a_late_risky_verdict_recalls_the_message_and_deletes_the_object(tmp_path: Path) -> None:
    async with chat(tmp_path) as t:
        g, a, b = t.g, t.a, t.b
        alice = t.alice
        room = t.room
        ack = await a.send_image(room, jpeg(200, 100))
        fid = ack["file"]["file_id"]
        msg = await next_msg(b, lambda m: m.get("type") == "image")
        url = absolute(g, msg["data"]["url"])
        assert (await get(url))[0] == 200
        recalled = b.wait_event(lambda m: m.get("op") == "recall" and m.get("room") == room, 10)
        status, body = await g.api("POST", f"/v1/media/{fid}/verdict", {"verdict": "risky"})
        assert status == 200, body
        recall = await recalled
        assert recall["seq"] == ack["seq"]
        page = await b.request("history", room=room, limit=10)
        (tomb,) = [m for m in page["msgs"] if m["seq"] == ack["seq"]]
        assert tomb["type"] == "recalled"
        assert (await get(url))[0] == 404
        assert not [p for p in (tmp_path).rglob(fid) if p.is_file()]
        status, body = await g.api("GET", f"/v1/media/{fid}")
        assert status == 200 and body["state"] == "removed" and body["verdict"] == "risky"
        with pytest.raises(GatewayError) as e:
            await a.publish(dm(alice, f"z{uniq()}"), {"file_id": fid}, type="image")
        assert e.value.code == 4035


async def test_user_purge_removes_their_objects_and_unsent_files_are_swept(tmp_path: Path) -> None:
    async with chat(tmp_path, "media.unsent_hours=0.0005", "media.sweep_interval=0.5") as t:
        g, a = t.g, t.a
        alice, bob = t.alice, t.bob
        sent = await a.send_image(dm(alice, bob), jpeg(64, 64))
        fid = sent["file"]["file_id"]
        url = absolute(g, sent["file"]["url"])
        unsent = await a.upload(jpeg(32, 32), kind="image")
        # Unsent: gone within a couple of sweeps (1.8 s old, sweeps every 0.25-0.5 s).
        async def unsent_gone() -> bool:
            return (await get(absolute(g, unsent["url"])))[0] == 404

        await eventually(unsent_gone, timeout=15, what="the unsent file deleted")
        assert (await get(url))[0] == 200
        status, body = await g.api("DELETE", f"/v1/users/{alice}/messages")
        assert status == 200 and body["files"] == 1, body
        assert (await get(url))[0] == 404
        assert not [p for p in tmp_path.rglob(fid) if p.is_file()]
        assert (await g.api("GET", f"/v1/media/{fid}"))[0] == 404


async def test_quota_and_voice_duration_limits(tmp_path: Path) -> None:
    async with chat(tmp_path, "media.daily_quota=600000") as t:
        a = t.a
        with pytest.raises(GatewayError) as e:
            await a.upload(wav(61), kind="voice")
        assert e.value.code == 413 and "too_long" in e.value.message
        await a.upload(wav(25), kind="voice")
        await a.upload(wav(25), kind="voice")
        with pytest.raises(GatewayError) as e:
            await a.upload(wav(25), kind="voice")
        assert e.value.code == 429 and "quota" in e.value.message


async def test_export_carries_links_and_the_api_re_signs(tmp_path: Path) -> None:
    async with chat(tmp_path) as t:
        g, a = t.g, t.a
        room = t.room
        photo = jpeg(100, 100)
        ack = await a.send_image(room, photo)
        await a.publish(room, {"text": "and some words"})
        status, text = await g.api("GET", f"/v1/export?room={room}&url_ttl=3600")
        assert status == 200
        exported = [json.loads(x) for x in text.splitlines() if x]
        assert [m["type"] for m in exported] == ["image", "chat"]
        img = exported[0]["data"]
        assert img["file_id"] == ack["file"]["file_id"] and 3500_000 < img["expires"] - time.time() * 1000 <= 3600_000
        assert (await get(absolute(g, img["url"])))[1] == photo
        status, body = await g.api("GET", f"/v1/media/{ack['file']['file_id']}")
        assert status == 200 and body["refs"] == [[room, ack["seq"]]]
        assert (await get(absolute(g, body["url"])))[1] == photo


async def test_the_s3_path_upload_publish_download_expiry_verdict_and_purge(tmp_path: Path, s3_server: Any) -> None:
    """The same flow against a real S3 server (s3s-fs, SigV4): URLs in messages are its
    presigned ones, so the bytes never pass the node; forged and expired ones get 403
    from the store; a risky verdict and a purge delete the objects in the bucket."""
    s3 = s3_server
    bucket = f"media-{uniq().lower()}"
    sets = (
        "media.backend=s3", f"media.s3.endpoint={s3.endpoint}", f"media.s3.bucket={bucket}", f"media.s3.access_key={s3.access_key}",
        f"media.s3.secret_key={s3.secret_key}", f"media.s3.region={s3.region}", "media.s3.create_bucket=true", "media.s3.prefix=chat/",
        "media.url_ttl=3",
    )
    async with chat(tmp_path, *sets) as t:
        g, a, b = t.g, t.a, t.b
        alice = t.alice
        room = t.room
        photo = jpeg(300, 200)
        ack = await a.send_image(room, photo, filename="s3.jpg")
        fid = ack["file"]["file_id"]
        msg = await next_msg(b, lambda m: m.get("room") == room and m.get("type") == "image")
        url = msg["data"]["url"]
        assert url.startswith(s3.endpoint + f"/{bucket}/chat/") and "X-Amz-Signature=" in url
        status, body, headers = await get(url)
        assert status == 200 and body == photo and headers["Content-Type"] == "image/jpeg"
        status, thumb, _ = await get(msg["data"]["thumb_url"])
        assert status == 200 and thumb[:3] == b"\xff\xd8\xff"
        assert [p for p in s3.data.rglob(fid) if p.is_file()], "the object is in the bucket"
        assert not [p for p in tmp_path.rglob(fid) if p.is_file()], "nothing of it stays on the node's disk"
        sig = url.split("X-Amz-Signature=")[1][:64]
        assert (await get(url.replace(sig, "0" * 64)))[0] == 403
        pdf = b"%PDF-1.7\n" + bytes(range(256)) * 100
        sent = await a.send_file(room, pdf, filename="report.pdf")
        fmsg = await next_msg(b, lambda m: m.get("type") == "file")
        status, body, headers = await get(fmsg["data"]["url"])
        assert status == 200 and body == pdf and "attachment" in headers.get("Content-Disposition", "")
        await asyncio.sleep(4)
        assert (await get(url))[0] == 403, "expired"
        # Paged again: fresh presigned URLs.
        page = await b.request("history", room=room, limit=10)
        (img,) = [m for m in page["msgs"] if m["type"] == "image"]
        assert (await get(img["data"]["url"]))[1] == photo
        # Risky: recalled and deleted from the bucket.
        recalled = b.wait_event(lambda m: m.get("op") == "recall" and m.get("room") == room, 10)
        assert (await g.api("POST", f"/v1/media/{fid}/verdict", {"verdict": "risky"}))[0] == 200
        await recalled
        assert not [p for p in s3.data.rglob(fid) if p.is_file()]
        # Purge: the user's other objects go too.
        status, body = await g.api("DELETE", f"/v1/users/{alice}/messages")
        assert status == 200 and body["files"] >= 1, body
        assert not [p for p in s3.data.rglob(sent["file"]["file_id"]) if p.is_file()]


async def test_on_media_hooks_judge_uploads_at_once_or_later(tmp_path: Path) -> None:
    async with chat(tmp_path, app="tests.integration.media_app:make_app") as t:
        g, a, b = t.g, t.a, t.b
        room, alice = t.room, t.alice
        # Judged risky as soon as it was checked: never sent.
        bad = await a.upload(jpeg(64, 64), kind="image", filename="bad.jpg")

        async def removed() -> bool:
            status, body = await g.api("GET", f"/v1/media/{bad['file_id']}")
            return status == 200 and body["state"] == "removed"

        await eventually(removed, what="the risky upload removed")
        with pytest.raises(GatewayError) as e:
            await a.publish(room, {"file_id": bad["file_id"]}, type="image")
        assert e.value.code == 4035
        # Passed: sent and kept. Dropped by on_message first: the file was not claimed
        # by that room, so it goes to another one.
        dropped = await a.send_image(dm(alice, f"zz{uniq()}"), jpeg(64, 64), filename="fine.jpg", caption="drop me")
        assert dropped["seq"] == 0
        ok = await a.publish(room, {"file_id": dropped["file"]["file_id"]}, type="image")
        # A late verdict: the message was delivered, then it is recalled everywhere.
        recalled = b.wait_event(lambda m: m.get("op") == "recall" and m.get("room") == room, 15)
        late = await a.send_image(room, jpeg(64, 64), filename="late.jpg")
        assert (await next_msg(b, lambda m: m.get("seq") == late["seq"]))["type"] == "image"
        assert (await recalled)["seq"] == late["seq"]
        page = await b.request("history", room=room, limit=10)
        types = {m["seq"]: m["type"] for m in page["msgs"]}
        assert types[late["seq"]] == "recalled" and types[ok["seq"]] == "image"
        assert (await get(absolute(g, late["file"]["url"])))[0] == 404
        assert g.metric("moderator_checked_total") is not None


async def test_a_stalled_upload_is_cut_off_while_others_go_on(tmp_path: Path) -> None:
    """An upload that stops sending is cut after media.idle_timeout (408 from the engine's
    relay); meanwhile another upload, pings and messages go through."""
    async with chat(tmp_path, "media.idle_timeout=1.5") as t:
        g, a, b = t.g, t.a, t.b
        head = (f"POST /media/upload?user={t.alice}&kind=file HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {1 << 20}\r\n\r\n").encode()
        body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="f.pdf"\r\n\r\n%PDF-1.4\n' + b"0" * 8000
        t0 = time.monotonic()
        stalled = asyncio.ensure_future(raw_http(g, head, body))
        await asyncio.sleep(0.3)
        up = await a.upload(jpeg(64, 64), kind="image")
        ack = await b.publish(t.room, {"file_id": (await b.upload(jpeg(32, 32), kind="image"))["file_id"]}, type="image")
        assert up["file_id"] and ack["seq"] >= 1 and (await a.ping())["op"] == "pong"
        answer = await stalled
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert 1.4 < time.monotonic() - t0 < 6
        await eventually(lambda: not list((tmp_path / "media" / "tmp").iterdir()), what="the cut upload's partial file removed")


async def test_the_object_store_down_gets_503_and_the_node_serves_on(tmp_path: Path, s3_server: Any) -> None:
    """S3 goes away after start-up: uploads get 503 (retry later), nothing else breaks;
    when it is back, uploads work again."""
    from support.s3 import S3Server

    s3 = S3Server(s3_server.binary, tmp_path / "own-s3")
    s3.start()
    sets = (
        "media.backend=s3", f"media.s3.endpoint={s3.endpoint}", "media.s3.bucket=down", f"media.s3.access_key={s3.access_key}",
        f"media.s3.secret_key={s3.secret_key}", "media.s3.create_bucket=true",
    )
    try:
        async with chat(tmp_path, *sets) as t:
            a, b = t.a, t.b
            assert (await a.upload(jpeg(32, 32), kind="image"))["file_id"]
            s3.stop()
            with pytest.raises(GatewayError) as e:
                await a.upload(jpeg(32, 32), kind="image")
            assert e.value.code == 503 and "unavailable" in e.value.message
            ack = await a.publish(t.room, {"text": "still here"})
            assert (await next_msg(b, lambda m: m.get("seq") == ack["seq"]))["data"] == {"text": "still here"}
            s3.start()
            assert (await a.upload(jpeg(32, 32), kind="image"))["file_id"]
    finally:
        s3.stop()


async def test_the_backend_sends_its_bots_upload_to_a_user_through_the_api(tmp_path: Path) -> None:
    """A backend uploads as its own bot user (a token it mints; ?user= here), then posts
    the file as the system into a user's notice conversation: checked like a client's
    (kind, existence), delivered with signed URLs. As a member, only one's own file."""
    async with chat(tmp_path) as t:
        g, a, b = t.g, t.a, t.b
        bot = await g.client(f"shopbot{uniq()}")
        photo = jpeg(120, 90)
        up = await bot.upload(photo, kind="image", filename="order.jpg")
        notice = f"notice:{t.bob}"
        status, body = await g.api("POST", f"/v1/conversations/{notice}/messages", {"type": "image", "data": {"file_id": up["file_id"]}})
        assert status == 200, body
        msg = await next_msg(b, lambda m: m.get("room") == notice)
        assert msg["from"] is None and msg["data"]["name"] == "order.jpg"
        assert (await get(absolute(g, msg["data"]["url"])))[1] == photo
        status, body = await g.api("POST", f"/v1/conversations/{notice}/messages", {"type": "file", "data": {"file_id": up["file_id"]}})
        assert status == 422 and body["code"] == 4037, body
        status, body = await g.api("POST", f"/v1/conversations/{t.room}/messages",
                                   {"type": "image", "data": {"file_id": (await bot.upload(photo, kind="image"))["file_id"]}, "from": t.alice})
        assert status == 403 and body["code"] == 4036, body
        await a.ping()
        await bot.close()
