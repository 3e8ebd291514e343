"""gateway.media.objects: the disk and S3 object stores behind one interface, the S3 one
against a real S3 server (``s3s-fs`` from crates.io, the session's ``s3_server``).

What s3s-fs 0.14.1 checks, found by these tests: it verifies SigV4 signatures of
presigned URLs (a changed signature, key or secret gets 403 SignatureDoesNotMatch) and
their expiry (X-Amz-Date + X-Amz-Expires in the past: 403 AccessDenied "Request has
expired"); it implements multipart uploads (CreateMultipartUpload, UploadPart,
CompleteMultipartUpload) and DeleteObjects, and honours ``response-content-type`` and
``response-content-disposition`` on a presigned GET.

No conftest.py here on purpose (``tests`` must not become an import root); the first
test builds s3s-fs when ``make tools`` has not, hence the longer timeout then.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.ports import free_port
from support.s3 import TOOLS, S3Server, _version_ok
from yarl import URL

from gateway.media.objects import DiskObjects, ObjectNotFound, Objects, ObjectsError, S3Objects, content_disposition

pytestmark = [pytest.mark.timeout(1800)] if not _version_ok(TOOLS / "bin" / "s3s-fs") else []


def s3_store(srv: S3Server, bucket: str | None = None, **kw: Any) -> S3Objects:
    args: dict[str, Any] = {"region": srv.region, "access_key": srv.access_key, "secret_key": srv.secret_key,
                            "prefix": "media/", "create_bucket": True} | kw
    return S3Objects(srv.endpoint, bucket or f"lg-{uuid.uuid4().hex[:16]}", **args)


@pytest.fixture(params=["disk", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Objects]:
    o: Objects = DiskObjects(tmp_path / "media") if request.param == "disk" else s3_store(request.getfixturevalue("s3_server"))
    await o.start()
    try:
        yield o
    finally:
        await o.close()


@pytest.fixture
async def s3(s3_server: S3Server) -> AsyncIterator[S3Objects]:
    o = s3_store(s3_server)
    await o.start()
    try:
        yield o
    finally:
        await o.close()


def calls(o: S3Objects) -> list[str]:
    """The S3 operations ``o`` makes from now on, by name."""
    seen: list[str] = []
    o._client.meta.events.register("before-call.s3", lambda model, **kw: seen.append(model.name))
    return seen


async def test_put_exists_open_fetch_delete(store: Objects, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"first")
    await store.put("m_a", src, "image/jpeg")
    src.write_bytes(os.urandom(3000))
    await store.put("m_b.t", src, "image/jpeg")
    assert await store.exists("m_a") and await store.exists("m_b.t")
    assert not await store.exists("m_missing")

    opened = await store.open("m_a")
    if store.name == "disk":
        assert opened is not None and opened.read_bytes() == b"first"
        assert await store.open("m_missing") is None
    else:
        assert opened is None
    dest = tmp_path / "out.bin"
    await store.fetch("m_b.t", dest)
    assert dest.read_bytes() == src.read_bytes()

    src.write_bytes(b"second")  # a put replaces
    await store.put("m_a", src, "image/jpeg")
    await store.fetch("m_a", dest)
    assert dest.read_bytes() == b"second"

    await store.delete(["m_a", "m_never_was"])
    await store.delete([])
    assert not await store.exists("m_a") and await store.exists("m_b.t")
    with pytest.raises(ObjectNotFound):
        await store.fetch("m_a", tmp_path / "gone.bin")
    await store.delete(["m_b.t"])
    assert not await store.exists("m_b.t")


async def test_keys_are_checked(store: Objects, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    for bad in ("", "../etc/passwd", "a//b", "a/./b", "/abs", "sp ace", "new\nline", "é"):
        with pytest.raises(ValueError):
            await store.put(bad, src, "text/plain")
        with pytest.raises(ValueError):
            await store.exists(bad)
        with pytest.raises(ValueError):
            await store.delete(["ok", bad])
    await store.put("thumbs/m_x.t", src, "text/plain")  # segments are fine
    assert await store.exists("thumbs/m_x.t")


async def test_big_file_round_trips(store: Objects, tmp_path: Path) -> None:
    """20 MB, byte for byte; on S3 in three parts (8 + 8 + 4 MB) of a multipart upload."""
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(20 * 1024 * 1024))
    seen = calls(store) if isinstance(store, S3Objects) else []
    await store.put("m_big", src, "video/mp4")
    if isinstance(store, S3Objects):
        assert seen.count("CreateMultipartUpload") == 1 and seen.count("UploadPart") == 3 and seen.count("CompleteMultipartUpload") == 1, seen
        assert "PutObject" not in seen
    dest = tmp_path / "back.bin"
    await store.fetch("m_big", dest)
    assert dest.stat().st_size == src.stat().st_size and dest.read_bytes() == src.read_bytes()


async def test_disk_put_is_atomic(tmp_path: Path) -> None:
    """While a 64 MB put runs (in the thread pool: the loop keeps running), the key holds
    the old object or the whole new one, never a part; no temporary file is left."""
    store = DiskObjects(tmp_path / "media")
    await store.start()
    try:
        old, new = tmp_path / "old.bin", tmp_path / "new.bin"
        old.write_bytes(b"o" * 1000)
        new.write_bytes(os.urandom(64 * 1024 * 1024))
        path = store.path("m_atomic")
        assert path.is_relative_to(tmp_path / "media") and len(path.relative_to(tmp_path / "media").parts) == 3
        for before in (None, old):
            if before is not None:
                await store.put("m_atomic", before, "application/octet-stream")
            else:
                assert not path.exists()
            task = asyncio.create_task(store.put("m_atomic", new, "application/octet-stream"))
            sizes = set()
            while not task.done():
                try:
                    sizes.add(path.stat().st_size)
                except FileNotFoundError:
                    sizes.add(-1)
                await asyncio.sleep(0)
            await task
            assert sizes <= {-1 if before is None else 1000, 64 * 1024 * 1024}, sizes
            assert path.stat().st_size == 64 * 1024 * 1024
            await store.delete(["m_atomic"])
        with pytest.raises(FileNotFoundError):
            await store.put("m_atomic", tmp_path / "missing.bin", "application/octet-stream")
        assert not path.exists()
        assert [p.name for p in (tmp_path / "media").rglob("*") if p.is_file()] == []
        assert store.presign("m_atomic", 60) is None
    finally:
        await store.close()


async def test_disk_start_refuses_an_unwritable_root(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    store = DiskObjects(blocker / "media")
    with pytest.raises(ObjectsError, match="not writable"):
        await store.start()
    await store.close()


async def test_presigned_get(s3: S3Objects, s3_server: S3Server, tmp_path: Path) -> None:
    """A presigned URL serves the object with the asked Content-Type and an attachment
    Content-Disposition naming the file (RFC 5987 for the UTF-8 name); a forged
    signature, another key under the same signature and a URL signed with the wrong
    secret get 403 (s3s-fs verifies presigned signatures)."""
    src = tmp_path / "a.pdf"
    src.write_bytes(b"%PDF-1.4\n" + os.urandom(5000))
    await s3.put("m_doc", src, "application/pdf")
    url = s3.presign("m_doc", 60, content_type="application/pdf", filename='报告 "2024".pdf')
    assert url is not None and url.startswith(s3_server.endpoint + "/")
    async with aiohttp.ClientSession() as http:
        async with http.get(URL(url, encoded=True)) as r:
            assert r.status == 200
            assert await r.read() == src.read_bytes()
            assert r.headers["Content-Type"] == "application/pdf"
            assert r.headers["Content-Disposition"] == "attachment; filename=\"__ _2024_.pdf\"; filename*=UTF-8''%E6%8A%A5%E5%91%8A%20%222024%22.pdf"
        sig_at = url.index("X-Amz-Signature=") + len("X-Amz-Signature=")
        sig = url[sig_at:]
        forged = url[:sig_at] + ("0" if sig[0] != "0" else "1") + sig[1:]
        other_key = url.replace("/m_doc?", "/m_other?")
        await s3.put("m_other", src, "application/pdf")
        wrong = s3_store(s3_server, bucket=s3.bucket, secret_key="not-the-secret")
        try:
            for bad in (forged, other_key, url.replace("response-content-type=application%2Fpdf", "response-content-type=text%2Fhtml"),
                        wrong.presign("m_doc", 60)):
                assert bad is not None
                async with http.get(URL(bad, encoded=True)) as r:
                    assert r.status == 403, bad
                    assert b"SignatureDoesNotMatch" in await r.read()
        finally:
            await wrong.close()


async def test_presigned_get_expires(s3: S3Objects, tmp_path: Path) -> None:
    """ttl=1, two seconds later: 403 (s3s-fs checks X-Amz-Date + X-Amz-Expires)."""
    src = tmp_path / "a.jpg"
    src.write_bytes(b"\xff\xd8\xff" + b"\0" * 100)
    await s3.put("m_exp", src, "image/jpeg")
    url = s3.presign("m_exp", 1, content_type="image/jpeg")
    assert url is not None
    signed_at = time.monotonic()
    async with aiohttp.ClientSession() as http:
        async with http.get(URL(url, encoded=True)) as r:
            fresh = r.status
        if time.monotonic() - signed_at < 0.9:  # else the machine was too slow to see it fresh
            assert fresh == 200
        await asyncio.sleep(2.0)
        async with http.get(URL(url, encoded=True)) as r:
            assert r.status == 403
            body = await r.read()
            assert b"AccessDenied" in body and b"expired" in body


async def test_s3_batch_delete(s3: S3Objects, tmp_path: Path) -> None:
    """DeleteObjects, 1000 keys a call: 2500 keys (3 real, the rest missing) take three."""
    src = tmp_path / "x"
    src.write_bytes(b"x")
    for k in ("m_d0", "m_d1", "m_d2", "m_keep"):
        await s3.put(k, src, "text/plain")
    seen = calls(s3)
    await s3.delete([f"m_d{i}" for i in range(2500)])
    assert seen == ["DeleteObjects"] * 3
    assert [await s3.exists(k) for k in ("m_d0", "m_d1", "m_d2", "m_keep")] == [False, False, False, True]


async def test_s3_prefix_and_addressing(s3: S3Objects, s3_server: S3Server, tmp_path: Path) -> None:
    src = tmp_path / "x"
    src.write_bytes(b"prefixed")
    await s3.put("m_p", src, "text/plain")
    head = s3._client.head_object(Bucket=s3.bucket, Key="media/m_p")
    assert head["ContentLength"] == 8 and head["ContentType"] == "text/plain"
    assert await s3.open("m_p") is None
    # virtual-hosted style puts the bucket in the host name (botocore falls back to the
    # path style for an IP address, so a name here)
    virtual = S3Objects(f"http://localhost:{s3_server.port}", s3.bucket, access_key="a", secret_key="b", prefix="media", addressing="virtual")
    url = virtual.presign("m_p", 60)
    assert url is not None and url.startswith(f"http://{s3.bucket}.localhost:{s3_server.port}/media/m_p?")
    await virtual.close()
    with pytest.raises(ValueError):
        s3_store(s3_server, addressing="sideways")


async def test_s3_start_errors(s3_server: S3Server) -> None:
    """A missing bucket (create_bucket off), wrong keys and an endpoint nobody listens on
    each fail start() with an ObjectsError saying what to check."""
    missing = s3_store(s3_server, create_bucket=False)
    with pytest.raises(ObjectsError, match="does not exist"):
        await missing.start()
    await missing.close()
    made = s3_store(s3_server)
    await made.start()
    await made.close()
    bad_key = s3_store(s3_server, bucket=made.bucket, secret_key="wrong")
    with pytest.raises(ObjectsError, match="access denied"):
        await bad_key.start()
    await bad_key.close()
    nobody = S3Objects(f"http://127.0.0.1:{free_port()}", "b", access_key="a", secret_key="b")
    with pytest.raises(ObjectsError, match="cannot reach"):
        await nobody.start()
    await nobody.close()


def test_content_disposition() -> None:
    assert content_disposition("a.jpg") == "attachment; filename=\"a.jpg\"; filename*=UTF-8''a.jpg"
    assert content_disposition("x\r\ny\\z.txt", "inline") == "inline; filename=\"x__y_z.txt\"; filename*=UTF-8''x%0D%0Ay%5Cz.txt"
    assert content_disposition("") == "attachment; filename=\"file\"; filename*=UTF-8''"
