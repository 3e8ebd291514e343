"""Where media objects live: one interface (:class:`Objects`), two backends:

- :class:`DiskObjects`: files under a directory on this node, served with sendfile;
- :class:`S3Objects`: a bucket of any S3-compatible store (AWS, MinIO, Ceph, COS, OSS
  in S3 mode), served to clients by presigned GET URLs (the bytes never pass the node).

Keys are the caller's names (``m_…``, ``m_….t`` for a thumbnail); they are made of
``[A-Za-z0-9._-]`` segments joined by ``/`` (no empty, ``.`` or ``..`` segment), checked by
every method (``ValueError``). Every blocking call (file copies, fsync, boto3) runs in a
small thread pool, never on the event loop.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import hashlib
import os
import re
import shutil
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig
    from mypy_boto3_s3 import S3Client

T = TypeVar("T")

_KEY_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,200}")

#: Objects above this size are uploaded to S3 in parts of this size, 4 at a time.
MULTIPART_BYTES = 8 * 1024 * 1024


class ObjectsError(Exception):
    """The store failed or refused (unreachable, bad credentials, no bucket): the
    message says what to check."""


class ObjectNotFound(ObjectsError, LookupError):
    """No object under that key."""


def check_key(key: str) -> str:
    """``key`` when it is a valid object key, else ``ValueError``."""
    parts = key.split("/")
    if len(key) > 512 or not all(_KEY_SEGMENT.fullmatch(p) and p not in (".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    return key


def content_disposition(filename: str, disposition: str = "attachment") -> str:
    """A Content-Disposition value for ``filename``: an ASCII fallback (quotes,
    backslashes and control characters replaced by ``_``) and the exact name as RFC
    5987 ``filename*=UTF-8''…`` (RFC 6266)."""
    fallback = "".join(c if " " <= c < "\x7f" and c not in '"\\' else "_" for c in filename) or "file"
    quoted = urllib.parse.quote(filename, safe="!#$&+-.^_`|~")
    return f"{disposition}; filename=\"{fallback}\"; filename*=UTF-8''{quoted}"


class Objects(abc.ABC):
    """A store of immutable objects, written from finished local files."""

    #: "disk" or "s3"
    name: str

    def __init__(self, executor: ThreadPoolExecutor | None) -> None:
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"media-{self.name}")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @abc.abstractmethod
    async def start(self) -> None:
        """Get ready (S3: check the bucket exists, creating it when configured to);
        :class:`ObjectsError` with a message an operator can act on otherwise."""

    async def close(self) -> None:
        """Release connections, and the thread pool when this object made it."""
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    @abc.abstractmethod
    async def put(self, key: str, path: Path, content_type: str, *, move: bool = False) -> None:
        """Store the finished local file ``path`` under ``key`` (replacing any object
        there). Readers see the whole object or none of it, never a part. ``move``: the
        caller no longer needs ``path`` (the disk backend renames it into place when it
        is on the same filesystem instead of copying it)."""

    @abc.abstractmethod
    async def delete(self, keys: Sequence[str]) -> None:
        """Delete these objects; keys that do not exist are fine."""

    @abc.abstractmethod
    async def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @abc.abstractmethod
    async def open(self, key: str) -> Path | None:
        """Disk: the path of the object's file (for sendfile), None when missing.
        S3: always None (serve :meth:`presign` URLs)."""

    @abc.abstractmethod
    async def fetch(self, key: str, dest: Path) -> None:
        """Copy the object to the local file ``dest`` (exports, reprocessing);
        :class:`ObjectNotFound` when missing."""

    @abc.abstractmethod
    def presign(self, key: str, ttl: int, *, content_type: str | None = None, filename: str | None = None) -> str | None:
        """S3: a presigned GET URL valid ``ttl`` seconds (no network call), answering
        with ``content_type`` and, given ``filename``, an attachment Content-Disposition
        naming it. Disk: None (the node signs its own ``/media/f/…`` URLs)."""


# ---- disk ---------------------------------------------------------------------------------

def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskObjects(Objects):
    """Objects as files under ``root``: key ``k`` is ``root/ab/cd/k``, where ``abcd``
    starts the SHA-256 of the key (65536 directories whatever the ids look like).

    A put copies the file to a temporary name in the destination directory, fsyncs it,
    renames it into place (``os.replace``, atomic within the filesystem) and fsyncs the
    directory: after a crash the key holds the old object, the new one or nothing."""

    name = "disk"

    def __init__(self, root: Path, executor: ThreadPoolExecutor | None = None) -> None:
        super().__init__(executor)
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """Where ``key`` is (or would be) stored."""
        h = hashlib.sha256(check_key(key).encode()).hexdigest()
        return self.root / h[:2] / h[2:4] / key

    async def start(self) -> None:
        def mk() -> None:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                probe = self.root / f".probe-{uuid.uuid4().hex}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise ObjectsError(f"media directory {self.root} is not writable: {e}") from e

        await self._run(mk)

    def _put(self, key: str, src: Path, move: bool = False) -> None:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if move:
            fd = os.open(src, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.replace(src, dest)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
            else:
                _fsync_dir(dest.parent)
                return
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(src, "rb") as fi, open(tmp, "xb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
                fo.flush()
                os.fsync(fo.fileno())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(dest.parent)

    async def put(self, key: str, path: Path, content_type: str, *, move: bool = False) -> None:
        self.path(key)
        await self._run(self._put, key, Path(path), move)

    def _delete(self, keys: Sequence[str]) -> None:
        dirs = set()
        for k in keys:
            p = self.path(k)
            try:
                p.unlink()
                dirs.add(p.parent)
            except FileNotFoundError:
                pass
        for d in dirs:
            _fsync_dir(d)

    async def delete(self, keys: Sequence[str]) -> None:
        for k in keys:
            check_key(k)
        if keys:
            await self._run(self._delete, list(keys))

    async def exists(self, key: str) -> bool:
        return await self._run(self.path(key).is_file)

    async def open(self, key: str) -> Path | None:
        p = self.path(key)
        return p if await self._run(p.is_file) else None

    def _fetch(self, key: str, dest: Path) -> None:
        try:
            shutil.copyfile(self.path(key), dest)
        except FileNotFoundError as e:
            if not self.path(key).is_file():
                raise ObjectNotFound(key) from e
            raise

    async def fetch(self, key: str, dest: Path) -> None:
        self.path(key)
        await self._run(self._fetch, key, Path(dest))

    def presign(self, key: str, ttl: int, *, content_type: str | None = None, filename: str | None = None) -> str | None:
        check_key(key)
        return None


# ---- S3 -----------------------------------------------------------------------------------

def _code(e: Exception) -> str:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        return str(resp.get("Error", {}).get("Code", ""))
    return ""


class S3Objects(Objects):
    """Objects in an S3 bucket under ``prefix`` (boto3, the ``s3`` extra).

    ``addressing``: ``"path"`` (``endpoint/bucket/key``: MinIO, Ceph and most self-hosted
    stores) or ``"virtual"`` (``bucket.endpoint/key``: AWS, COS, OSS). Signature V4,
    boto3's "standard" retry mode (3 attempts, backoff with jitter), connect timeout
    5 s, read timeout 60 s; uploads above :data:`MULTIPART_BYTES` go in parts of that
    size, 4 at a time. ``create_bucket``: create a missing bucket in :meth:`start`
    instead of failing. All calls run in ``executor`` (one is made when None: 4 threads)."""

    name = "s3"

    def __init__(self, endpoint: str | None, bucket: str, region: str = "us-east-1", access_key: str | None = None,
                 secret_key: str | None = None, prefix: str = "", addressing: str = "path", create_bucket: bool = False,
                 executor: ThreadPoolExecutor | None = None) -> None:
        if addressing not in ("path", "virtual"):
            raise ValueError(f"addressing must be 'path' or 'virtual', not {addressing!r}")
        super().__init__(executor)
        self.endpoint = endpoint or None
        self.bucket = bucket
        self.region = region or "us-east-1"
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.addressing = addressing
        self.create_bucket = create_bucket
        self._keys = (access_key, secret_key)
        self._made: tuple[S3Client, TransferConfig] | None = None
        self._lock = threading.Lock()

    @property
    def _client(self) -> S3Client:
        return self._boto()[0]

    def _boto(self) -> tuple[S3Client, TransferConfig]:
        """The boto3 client and transfer settings: made by :meth:`start` in the pool
        (importing boto3 and loading its S3 model blocks for 0.1-0.4 s); made here when
        something (``presign``) is used before ``start``."""
        with self._lock:
            if self._made is None:
                self._made = self._make_client(*self._keys)
            return self._made

    def _make_client(self, access_key: str | None, secret_key: str | None) -> tuple[S3Client, TransferConfig]:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        config = Config(
            region_name=self.region, signature_version="s3v4", s3={"addressing_style": "path" if self.addressing == "path" else "virtual"},
            retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=60,
            max_pool_connections=16, tcp_keepalive=True,
        )
        # a session of our own: the default one is shared and not thread-safe to create clients from
        session = boto3.session.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=self.region)
        transfer = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES, max_concurrency=4, use_threads=True)
        return session.client("s3", endpoint_url=self.endpoint, config=config), transfer

    def key(self, key: str) -> str:
        """The bucket key of an object key (the prefix added)."""
        return self.prefix + check_key(key)

    def _where(self) -> str:
        return f"bucket {self.bucket!r} at {self.endpoint or 'AWS'}"

    def _start(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            code = _code(e)
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise ObjectsError(f"{self._where()}: access denied ({code}): check media.s3.access_key and secret_key") from e
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise ObjectsError(f"{self._where()}: {e}") from e
        except BotoCoreError as e:
            raise ObjectsError(f"{self._where()}: cannot reach the store: {e}") from e
        if not self.create_bucket:
            raise ObjectsError(f"{self._where()} does not exist (create it, or set media.s3.create_bucket = true)")
        try:
            if self.region == "us-east-1":
                self._client.create_bucket(Bucket=self.bucket)
            else:
                self._client.create_bucket(Bucket=self.bucket, CreateBucketConfiguration={"LocationConstraint": self.region})  # type: ignore[typeddict-item]
        except (ClientError, BotoCoreError) as e:
            if _code(e) not in ("BucketAlreadyOwnedByYou",):
                raise ObjectsError(f"{self._where()}: cannot create it: {e}") from e

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """In the pool; the client's errors become :class:`ObjectsError` (what is not
        found stays :class:`ObjectNotFound`)."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return await super()._run(fn, *args)
        except (BotoCoreError, ClientError, Boto3Error) as e:
            raise ObjectsError(f"{self._where()}: {e}") from e

    async def start(self) -> None:
        await self._run(self._start)

    async def close(self) -> None:
        await super().close()
        if self._made is not None:
            self._made[0].close()

    async def put(self, key: str, path: Path, content_type: str, *, move: bool = False) -> None:
        k = self.key(key)
        await self._run(lambda: self._client.upload_file(str(path), self.bucket, k, ExtraArgs={"ContentType": content_type}, Config=self._boto()[1]))

    def _delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            resp = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            errors = [e for e in resp.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                raise ObjectsError(f"{self._where()}: {len(errors)} objects not deleted, first: {errors[0].get('Key')}: {errors[0].get('Code')} {errors[0].get('Message')}")

    async def delete(self, keys: Sequence[str]) -> None:
        ks = [self.key(k) for k in keys]
        if ks:
            await self._run(self._delete, ks)

    def _exists(self, k: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=k)
            return True
        except ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    async def exists(self, key: str) -> bool:
        return await self._run(self._exists, self.key(key))

    async def open(self, key: str) -> Path | None:
        self.key(key)
        return None

    def _fetch(self, k: str, dest: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.download_file(self.bucket, k, str(dest), Config=self._boto()[1])
        except ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                raise ObjectNotFound(k) from e
            raise

    async def fetch(self, key: str, dest: Path) -> None:
        await self._run(self._fetch, self.key(key), Path(dest))

    def presign(self, key: str, ttl: int, *, content_type: str | None = None, filename: str | None = None) -> str | None:
        params: dict[str, str] = {"Bucket": self.bucket, "Key": self.key(key)}
        if content_type:
            params["ResponseContentType"] = content_type
        if filename:
            params["ResponseContentDisposition"] = content_disposition(filename)
        return self._client.generate_presigned_url("get_object", Params=params, ExpiresIn=int(ttl))
