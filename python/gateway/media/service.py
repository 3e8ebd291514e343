"""The media service of one node (docs/media.md): uploads, the files' records, the checks
of a media ``publish``, signed download URLs, moderation verdicts and the sweeper.

Where the bytes go. The engine's client port relays every request under ``/media/`` to
this module's aiohttp server on ``127.0.0.1`` (a random port; each request carries the
node's relay secret, so nothing else on the host can call it). The engine terminates TLS
and enforces the relay's cap, deadline, idle cut-off and in-flight limit; this side
authenticates with the user's token and streams the multipart body chunk by chunk to a
file under ``<dir>/tmp``, checking the type from the first bytes and the kind's limit as
the bytes arrive. The blocking work (writes, hashing, probing, thumbnails, the object
store's client) runs in a small thread pool, never on the event loop. Mini-programs
upload to the same host and port they already connect to (one domain to whitelist), and
the live-room fan-out never waits for an upload: it runs in the engine's threads, and the
relay is a byte copy on the connection's own task.

Messages carry references (``file_id``), never bytes. A ``publish`` of type ``image``,
``voice``, ``video`` or ``file`` is checked here (the file exists, the sender uploaded
it, its kind is the type, it fits the route's limit, it is not sent elsewhere when the
route forbids reuse), and the stored and delivered ``data`` is the server's description
of the file. Download URLs are signed when a message goes out and again whenever it is
paged (``history``, ``sync``, the API), so a stored message never holds a URL that
matters: they expire after ``media.url_ttl``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson
from aiohttp import BodyPartReader, MultipartReader, web

from ..auth import ConnectRequest
from ..errors import AuthError, Reject
from ..protocol import frames
from ..protocol.codes import ErrorCode
from ..routing import MEDIA_KINDS, Route, valid_room_name
from ..store import MediaFile, Store, StoreUnavailable
from .objects import DiskObjects, Objects, ObjectsError, S3Objects, content_disposition
from .probe import ProbeError, audio_duration_ms, probe_image, thumbnail, video_info
from .sniff import HEAD_BYTES, Sniffed, allowed, detect, kind_of

if TYPE_CHECKING:
    from ..app import Gateway
    from ..config import MediaConfig

log = logging.getLogger("gateway.media")

#: The header carrying the node's relay secret (added by the engine, stripped from clients).
SECRET_HEADER = "X-Gateway-Media-Secret"
PREFIX = "/media/"
#: Room for the multipart framing and the small fields around the file part.
_FRAMING = 64 << 10
#: Bytes gathered before a write to the temporary file.
_WRITE_CHUNK = 1 << 20
_FIELD_MAX = 1024
_FIELDS_MAX = 16
_CAPTION_MAX = 1000
_ID_RE = re.compile(r"m_[A-Za-z0-9_-]{22}")
_DAY_MS = 86_400_000
#: Records read in the last minute serve downloads and re-signing without a query.
_RECENT_SECONDS = 60.0
_RECENT_MAX = 10_000
#: Image types Pillow decodes (a thumbnail is made); HEIC is kept without one.
_THUMBNAILED = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp", "image/bmp"})
#: Types a browser may show inline; everything else downloads as an attachment.
_INLINE = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp", "audio/mpeg", "audio/aac", "audio/mp4", "audio/wav",
                     "audio/ogg", "video/mp4", "video/quicktime", "video/webm"})
_PURPOSE_FILE, _PURPOSE_THUMB = "f", "t"


class MediaError(Exception):
    """An upload refused: HTTP ``status`` with ``{"error": message, "code": code, ...}``."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


@dataclass(frozen=True, slots=True)
class MediaInfo:
    """What ``on_media`` hooks get for each finished upload: the file's record and a URL
    valid for ``media.url_ttl`` (give it to the moderation service)."""

    file_id: str
    owner: str
    kind: str
    mime: str
    size: int
    name: str
    sha256: str
    meta: dict[str, Any] = field(default_factory=dict)
    url: str = ""
    thumb_url: str | None = None


@dataclass(slots=True)
class _Received:
    """A file part written to the temporary file."""

    file_id: str
    path: Path
    size: int
    sha256: str
    sniffed: Sniffed
    kind: str
    name: str


def new_file_id() -> str:
    """``m_`` and 22 URL-safe random characters (128 bits)."""
    return "m_" + secrets.token_urlsafe(16)


def safe_name(name: str | None) -> str:
    """A file name fit to show and to put in ``Content-Disposition``: the last path
    segment, control characters and separators removed, at most 200 characters."""
    if not name:
        return ""
    name = unicodedata.normalize("NFC", name.replace("\\", "/").rsplit("/", 1)[-1])
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C" and ch not in '"<>|:*?')
    return name.strip(" .")[:200]


def _write(f: IO[bytes], hasher: Any, data: bytes) -> None:
    f.write(data)
    hasher.update(data)


class Media:
    """Uploads, records, checks, URLs and sweeping for one node (``gw.media``)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.cfg: MediaConfig = gw.config.media
        self.objects: Objects | None = None
        self.dir = Path(self.cfg.dir or self._default_dir())
        self.tmp = self.dir / "tmp"
        self._executor: ThreadPoolExecutor | None = None
        self._runner: web.AppRunner | None = None
        self._relay_secret = secrets.token_urlsafe(32)
        self._url_key = self.cfg.url_secret.encode()
        self._uploading: dict[str, int] = {}
        #: Recently read records, for downloads (file id -> record); removals evict.
        self._recent: OrderedDict[str, tuple[float, MediaFile]] = OrderedDict()
        c, g = gw.counter, gw.gauge
        self.m_uploads = c("gateway_media_uploads", "Uploads by kind and outcome (ok, or the refusal's code).", ("kind", "outcome"))
        self.m_bytes = c("gateway_media_upload_bytes", "Bytes of files accepted.")
        self.m_inflight = g("gateway_media_uploads_in_progress", "Uploads this node is receiving.")
        self.m_downloads = c("gateway_media_downloads", "Downloads served by this node by outcome (ok, forbidden, gone).", ("outcome",))
        self.m_removed = c("gateway_media_removed", "Files deleted, by reason (unsent, orphan, risky, purge).", ("reason",))
        self.m_verdicts = c("gateway_media_verdicts", "Moderation verdicts by value.", ("verdict",))
        self.m_refused = c("gateway_media_publish_refused", "Media publishes refused, by error code.", ("code",))

    def _default_dir(self) -> str:
        st = self.gw.config.store
        if st.kind == "sqlite":
            return str(Path(st.path).parent / "media")
        return "data/media"

    @property
    def enabled(self) -> bool:
        """On when configured and the store is (the records live there)."""
        return self.cfg.enabled and self.gw.storage.enabled

    @property
    def store(self) -> Store:
        st = self.gw.storage.store
        assert st is not None, "media needs the store"
        return st

    @property
    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="media")
        return self._executor

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---- start and stop ----------------------------------------------------------------

    async def start(self) -> dict[str, Any]:
        """Open the object store and the relay's upstream; returns the engine settings
        that route ``/media/`` to it."""
        await self._run(self._prepare_dir)
        cfg = self.cfg
        if cfg.backend == "s3":
            s3 = cfg.s3
            self.objects = S3Objects(
                endpoint=s3.endpoint, bucket=s3.bucket, region=s3.region, access_key=s3.access_key, secret_key=s3.secret_key,
                prefix=s3.prefix, addressing=s3.addressing, create_bucket=s3.create_bucket, executor=self.executor,
            )
        else:
            self.objects = DiskObjects(self.dir / "files", executor=self.executor)
            if self.gw.config.broker.kind == "redis" and self.gw.config.server.workers == 1:
                log.warning("media.backend = 'disk' with the redis broker: a file uploaded through this node is only on this "
                            "node's disk (%s) unless every node shares it and media.url_secret; several nodes want media.backend = 's3'",
                            self.dir)
        await self.objects.start()
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post(PREFIX + "upload", self._upload)
        for purpose in (_PURPOSE_FILE, _PURPOSE_THUMB):
            app.router.add_get(f"{PREFIX}{purpose}/{{file_id}}", self._download)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        lim = cfg.limits
        self.gw.tasks.start(self._sweep_loop())
        log.info("media: %s storage, uploads at %supload (relayed to 127.0.0.1:%d)", self.objects.name, PREFIX, port)
        return {
            "media_prefix": PREFIX,
            "media_upstream": f"127.0.0.1:{port}",
            "media_secret": self._relay_secret,
            "media_max_body": max(lim.image, lim.voice, lim.video, lim.file) + _FRAMING,
            "media_timeout": cfg.timeout,
            "media_idle_timeout": cfg.idle_timeout,
            "media_max_inflight": cfg.max_inflight,
            "media_rate": cfg.upload_rate,
            "media_node_rate": cfg.node_upload_rate,
        }

    def _prepare_dir(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        # Uploads cut off by a crash: nobody finishes them.
        cutoff = time.time() - 3600
        for p in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < cutoff:
                    p.unlink()
        if not self._url_key:
            key_file = self.dir / ".url-key"
            if not key_file.exists():
                # Written whole under another name, then linked into place: workers
                # starting together all end up with the first one's key.
                tmp = self.dir / f".url-key.{os.getpid()}.{secrets.token_hex(4)}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_urlsafe(32).encode())
                    f.flush()
                    os.fsync(f.fileno())
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, key_file)
                tmp.unlink()
            self._url_key = key_file.read_bytes().strip()
            if len(self._url_key) < 32:
                raise RuntimeError(f"{key_file} holds a key shorter than 32 characters: delete it to make a new one")

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.objects is not None:
            await self.objects.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # ---- URLs --------------------------------------------------------------------------

    def _sig(self, purpose: str, file_id: str, exp: int) -> str:
        mac = hmac.new(self._url_key, f"{purpose}:{file_id}:{exp}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:18]).decode()

    def url(self, f: MediaFile, purpose: str = _PURPOSE_FILE, ttl: float | None = None, *, exp: int | None = None) -> str:
        """A download URL of the file (``f``) or its thumbnail (``t``) valid for ``ttl``
        seconds (``media.url_ttl``): an S3 presigned URL, or this node's signed path."""
        ttl = self.cfg.url_ttl if ttl is None else ttl
        if exp is None:
            exp = int(time.time() + ttl)
        objects = self.objects
        assert objects is not None
        key = f.key if purpose == _PURPOSE_FILE else f.thumb_key
        inline = purpose == _PURPOSE_THUMB or f.mime in _INLINE
        presigned = objects.presign(
            key, max(1, exp - int(time.time())),
            content_type=f.mime if purpose == _PURPOSE_FILE else "image/jpeg",
            filename=None if inline else (f.name or f.id),
        )
        if presigned is not None:
            return presigned
        return f"{self.cfg.public_url}{PREFIX}{purpose}/{f.id}?e={exp}&s={self._sig(purpose, f.id, exp)}"

    def describe(self, f: MediaFile, caption: str | None = None) -> dict[str, Any]:
        """The ``data`` of a message carrying ``f``, as stored (no URLs)."""
        meta = orjson.loads(f.meta) if f.meta else {}
        d: dict[str, Any] = {"file_id": f.id, "kind": f.kind, "mime": f.mime, "size": f.size, "name": f.name}
        for k in ("w", "h", "duration"):
            if meta.get(k) is not None:
                d[k] = meta[k]
        d["thumb"] = bool(meta.get("thumb"))
        if caption:
            d["caption"] = caption
        return d

    def with_urls(self, f: MediaFile, data: dict[str, Any], ttl: float | None = None) -> dict[str, Any]:
        """``data`` with ``url``, ``thumb_url`` (images with a thumbnail) and ``expires``
        (ms) signed now."""
        exp = int(time.time() + (self.cfg.url_ttl if ttl is None else ttl))
        out = dict(data)
        out["url"] = self.url(f, _PURPOSE_FILE, exp=exp)
        if data.get("thumb"):
            out["thumb_url"] = self.url(f, _PURPOSE_THUMB, exp=exp)
        out["expires"] = exp * 1000
        return out

    async def fresh(self, frames_: Sequence[bytes], ttl: float | None = None) -> list[bytes]:
        """Message frames (``msg``, as stored or paged) with their media URLs signed now;
        frames without a file are returned as they are (one substring test each)."""
        if not self.enabled or not self.any_media(frames_):
            return list(frames_)
        parsed: dict[int, dict[str, Any]] = {}
        ids: set[str] = set()
        for i, fr in enumerate(frames_):
            if b'"file_id"' not in fr:
                continue
            try:
                obj = orjson.loads(fr)
            except orjson.JSONDecodeError:
                continue
            data = obj.get("data") if isinstance(obj, dict) else None
            if obj.get("type") in MEDIA_KINDS and isinstance(data, dict) and isinstance(data.get("file_id"), str):
                parsed[i] = obj
                ids.add(data["file_id"])
        if not parsed:
            return list(frames_)
        files = await self._records(ids)
        out = list(frames_)
        for i, obj in parsed.items():
            data = obj["data"]
            f = files.get(data["file_id"])
            clean = {k: v for k, v in data.items() if k not in ("url", "thumb_url", "expires")}
            if f is None or f.state == "removed":
                clean["removed"] = True
                obj["data"] = clean
            else:
                obj["data"] = self.with_urls(f, clean, ttl)
            out[i] = orjson.dumps(obj)
        return out

    def any_media(self, frames_: Iterable[bytes]) -> bool:
        return any(b'"file_id"' in fr for fr in frames_)

    async def fresh_groups(self, groups: list[list[bytes]], ttl: float | None = None) -> list[list[bytes]]:
        """:meth:`fresh` over several lists of frames, in one read of the records."""
        flat = [fr for g in groups for fr in g]
        if not self.enabled or not self.any_media(flat):
            return groups
        done = await self.fresh(flat, ttl)
        out, i = [], 0
        for g in groups:
            out.append(done[i:i + len(g)])
            i += len(g)
        return out

    async def _records(self, ids: Iterable[str]) -> dict[str, MediaFile]:
        """The records of ``ids`` (those that exist): from the last minute's reads, else
        in one query. (Another node's removal shows here within a minute; its objects
        are gone at once, so a download then gets 404 anyway.)"""
        ids = list(ids)
        fresh_after = time.monotonic() - _RECENT_SECONDS
        got: dict[str, MediaFile] = {}
        for i in ids:
            hit = self._recent.get(i)
            if hit is not None and hit[0] >= fresh_after:
                got[i] = hit[1]
        missing = [i for i in ids if i not in got]
        if missing:
            more = await self.store.media_get_many(missing)
            for f in more.values():
                self._remember(f)
            got.update(more)
        return got

    def _remember(self, f: MediaFile) -> None:
        self._recent[f.id] = (time.monotonic(), f)
        self._recent.move_to_end(f.id)
        while len(self._recent) > _RECENT_MAX:
            self._recent.popitem(last=False)

    # ---- publish -----------------------------------------------------------------------

    @staticmethod
    def applies(route: Route, mtype: str, data: Any) -> bool:
        """Whether a ``publish`` is a media message to check: its type is a kind the route
        takes, or it names a ``file_id``. (A type ``image`` with the client's own data in
        a route that takes no media is an ordinary message, as before media existed.)"""
        if mtype not in MEDIA_KINDS:
            return False
        return mtype in route.cfg.media_kinds() or (isinstance(data, dict) and "file_id" in data)

    def live_data(self, f: MediaFile, data: Any) -> Any:
        """The data of the live frame: ``data`` with URLs signed now (None: as kept, when
        a hook replaced the file)."""
        if isinstance(data, dict) and data.get("file_id") == f.id:
            return self.with_urls(f, data)
        return None

    def limit(self, kind: str, route: Route | None) -> int:
        """Bytes a file of ``kind`` may have (in ``route``'s rooms when given)."""
        cap = int(getattr(self.cfg.limits, kind))
        if route is not None and kind in route.cfg.media_limits:
            cap = min(cap, int(route.cfg.media_limits[kind]))
        return cap

    async def check_publish(self, user: str | None, room: str, route: Route, mtype: str, data: Any) -> tuple[MediaFile, dict[str, Any]]:
        """Check a media ``publish`` (before the hooks run); returns the file and the
        message's ``data`` as stored. :meth:`attach` then claims the file for the room.
        ``user`` None: the system posts (the HTTP API, plugins), which may send a file
        any user uploaded (e.g. the backend's own bot). Raises :class:`Reject` with the
        media codes."""
        if mtype not in route.cfg.media_kinds():
            raise self._refuse(ErrorCode.MEDIA_KIND, f"{mtype} messages are not allowed in {room}")
        fid = data.get("file_id") if isinstance(data, dict) else None
        if not isinstance(fid, str) or not _ID_RE.fullmatch(fid):
            raise self._refuse(ErrorCode.BAD_REQUEST, "data.file_id must be the file_id of an upload (POST /media/upload)")
        caption = data.get("caption")
        if caption is not None and (not isinstance(caption, str) or len(caption) > _CAPTION_MAX):
            raise self._refuse(ErrorCode.BAD_REQUEST, f"data.caption must be a string of at most {_CAPTION_MAX} characters")
        store = self.store
        f = await store.media_get(fid)
        if f is None or f.state == "removed" or f.verdict == "risky":
            raise self._refuse(ErrorCode.MEDIA_NOT_FOUND, f"no file {fid} (never uploaded, expired or removed)")
        if user is not None and f.owner != user:
            raise self._refuse(ErrorCode.MEDIA_NOT_YOURS, f"file {fid} was uploaded by another user")
        if f.kind != mtype:
            raise self._refuse(ErrorCode.MEDIA_KIND, f"file {fid} is a {f.kind}, not a {mtype}")
        cap = self.limit(f.kind, route)
        if f.size > cap:
            raise self._refuse(ErrorCode.TOO_LARGE, f"file {fid} has {f.size} bytes; {room} takes {f.kind} files up to {cap}")
        if f.room is not None and f.room != room and not route.cfg.media_reuse:
            raise self._refuse(ErrorCode.MEDIA_USED, f"file {fid} was sent in another conversation; upload it again")
        return f, self.describe(f, caption or None)

    async def attach(self, f: MediaFile, user: str | None, room: str, route: Route) -> MediaFile:
        """Claim ``f`` for a message in ``room`` once the hooks let it through: one
        conditional update, so of two sends of one file into two rooms at once (a route
        without ``media_reuse``) one gets 4038. A retry into the same room is no reuse."""
        owner = f.owner if user is None else user
        got, why = await self.store.media_attach(f.id, owner, room, frames.now_ms(), exclusive=not route.cfg.media_reuse)
        if got is None:
            if why == "used":
                raise self._refuse(ErrorCode.MEDIA_USED, f"file {f.id} was sent in another conversation; upload it again")
            raise self._refuse(ErrorCode.MEDIA_NOT_FOUND, f"no file {f.id} (removed meanwhile)")
        self._remember(got)
        return got

    def _refuse(self, code: int, message: str) -> Reject:
        self.m_refused.labels(str(int(code))).inc()
        return Reject(code, message)

    async def sent(self, f: MediaFile, room: str, seq: int, kept: bool) -> None:
        """The message carrying ``f`` got ``seq`` in ``room``: remember where it went (for
        recalls, retention and moderation) when the room keeps its messages."""
        if kept and seq > 0:
            await self.store.media_ref(f.id, room, seq, frames.now_ms())

    # ---- upload ------------------------------------------------------------------------

    def _authenticate(self, req: web.Request) -> str:
        headers = tuple((k.lower(), v) for k, v in req.headers.items())
        peer = req.headers.get("X-Forwarded-For", "") or (req.remote or "")
        creq = ConnectRequest(0, peer, req.path, req.query_string, headers)
        try:
            ident = self.gw.auth.authenticate(creq)
        except AuthError as e:
            raise MediaError(401, "auth", e.reason or "authentication failed") from None
        if ident.guest:
            raise MediaError(401, "auth", "guests cannot upload: log in")
        return ident.user

    async def _upload(self, req: web.Request) -> web.StreamResponse:
        if not self._relayed(req):
            return web.json_response({"error": "not through the gateway's port", "code": "forbidden"}, status=403)
        user: str | None = None
        kind = "unknown"
        try:
            user = self._authenticate(req)
            n = self._uploading.get(user, 0)
            if n >= self.cfg.per_user_uploads:
                raise MediaError(429, "busy", f"at most {self.cfg.per_user_uploads} uploads at once per user")
            self._uploading[user] = n + 1
            self.m_inflight.inc()
            try:
                async with asyncio.timeout(self.cfg.timeout):
                    body = await self._receive(req, user)
            finally:
                self.m_inflight.dec()
                left = self._uploading[user] - 1
                if left:
                    self._uploading[user] = left
                else:
                    del self._uploading[user]
            kind = body["kind"]
            self.m_uploads.labels(kind, "ok").inc()
            return web.json_response(body)
        except MediaError as e:
            kind = e.extra.pop("kind", kind)
            self.m_uploads.labels(kind, e.code).inc()
            return web.json_response({"error": e.message, "code": e.code, **e.extra}, status=e.status, headers={"Connection": "close"})
        except ConnectionError:
            # The client went away (or the engine's relay cut a stalled upload): nobody
            # reads an answer; what was received is gone already.
            self.m_uploads.labels(kind, "gone").inc()
            return web.Response(status=400)
        except TimeoutError:
            self.m_uploads.labels(kind, "timeout").inc()
            return web.json_response({"error": f"the upload took longer than {self.cfg.timeout:g} s", "code": "timeout"}, status=408)
        except (StoreUnavailable, ObjectsError) as e:
            self.m_uploads.labels(kind, "store").inc()
            log.warning("upload refused: %s", e)
            return web.json_response({"error": "storage is unavailable: try again", "code": "unavailable"}, status=503, headers={"Retry-After": "1"})

    async def _receive(self, req: web.Request, user: str) -> dict[str, Any]:
        length = req.content_length
        if length is None:
            raise MediaError(411, "bad_request", "Content-Length is required")
        if not req.content_type.startswith("multipart/form-data"):
            raise MediaError(415, "bad_request", "the upload must be multipart/form-data with the file in a part named 'file'")
        store = self.store
        used = await store.media_usage(user, frames.now_ms() - _DAY_MS)
        quota = self.cfg.daily_quota
        if used + max(0, length - _FRAMING) > quota:
            raise MediaError(429, "quota", f"the daily upload quota ({quota} bytes) would be exceeded ({used} used)", limit=quota)
        fields: dict[str, str] = {k: v for k, v in req.query.items() if k in ("kind", "room", "duration", "name")}
        got: _Received | None = None
        try:
            try:
                reader = await req.multipart()
                while True:
                    part = await reader.next()
                    if part is None:
                        break
                    if isinstance(part, MultipartReader):
                        raise MediaError(400, "bad_request", "nested multipart is not accepted")
                    if part.filename is not None or part.name == "file":
                        if got is not None:
                            raise MediaError(400, "bad_request", "one file per upload")
                        got = await self._file_part(part, fields, length)
                    else:
                        if len(fields) >= _FIELDS_MAX:
                            raise MediaError(400, "bad_request", f"at most {_FIELDS_MAX} form fields")
                        fields.setdefault(part.name or "", await _small_field(part))
            except (ValueError, AssertionError, RuntimeError, UnicodeDecodeError) as e:
                raise MediaError(400, "bad_request", f"malformed multipart body: {e}") from None
            if got is None:
                raise MediaError(400, "bad_request", "no file part (name it 'file')")
            if used + got.size > quota:
                raise MediaError(429, "quota", f"the daily upload quota ({quota} bytes) would be exceeded ({used} used)", limit=quota)
            return await self._finish(got, user, fields)
        finally:
            if got is not None:
                await self._run(_unlink, got.path, got.path.with_suffix(".thumb"))

    def _decide_kind(self, declared: str | None, sniffed: Sniffed | None) -> str:
        if sniffed is None:
            raise MediaError(415, "type", "unknown or refused file type (checked by content: executables and scripts are never accepted)")
        if declared is not None:
            if declared not in MEDIA_KINDS:
                raise MediaError(400, "bad_request", f"kind must be one of {', '.join(MEDIA_KINDS)}")
            if not allowed(declared, sniffed):
                raise MediaError(415, "type", f"{sniffed.mime} is not accepted as {declared}", kind=declared)
            return declared
        kind = kind_of(sniffed)
        if kind is None:
            raise MediaError(415, "type", f"{sniffed.mime} is not accepted")
        return kind

    def _route_of(self, room: str | None) -> Route | None:
        if not room:
            return None
        if not valid_room_name(room):
            raise MediaError(400, "bad_request", "room is not a valid room name")
        return self.gw.router.match(room)

    async def _file_part(self, part: BodyPartReader, fields: dict[str, str], length: int) -> _Received:
        head = bytearray()
        while len(head) < HEAD_BYTES:
            chunk = await part.read_chunk(65536)
            if not chunk:
                break
            head += chunk
        sniffed = detect(bytes(head[:HEAD_BYTES]))
        kind = self._decide_kind(fields.get("kind"), sniffed)
        assert sniffed is not None
        cap = self.limit(kind, self._route_of(fields.get("room")))
        if length - _FRAMING > cap or len(head) > cap:
            raise MediaError(413, "too_large", f"{kind} files may have at most {cap} bytes", limit=cap, kind=kind)
        file_id = new_file_id()
        path = self.tmp / f"{file_id}.part"
        f = await self._run(open, path, "wb")
        hasher = hashlib.sha256()
        size = len(head)
        buf = head
        rec = _Received(file_id, path, 0, "", sniffed, kind, safe_name(part.filename))
        try:
            while True:
                chunk = await part.read_chunk(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > cap:
                    raise MediaError(413, "too_large", f"{kind} files may have at most {cap} bytes", limit=cap, kind=kind)
                buf += chunk
                if len(buf) >= _WRITE_CHUNK:
                    await self._run(_write, f, hasher, bytes(buf))
                    buf = bytearray()
            if buf:
                await self._run(_write, f, hasher, bytes(buf))
        except BaseException:
            await self._run(f.close)
            await self._run(_unlink, path)
            raise
        await self._run(f.close)
        if size == 0:
            await self._run(_unlink, path)
            raise MediaError(400, "bad_request", "the file is empty")
        rec.size, rec.sha256 = size, hasher.hexdigest()
        return rec

    async def _finish(self, got: _Received, user: str, fields: dict[str, str]) -> dict[str, Any]:
        kind = got.kind
        if fields.get("name"):
            # Mini-programs' upload APIs cannot name the file part: the SDKs send the name.
            got.name = safe_name(fields["name"])
        declared = fields.get("kind")
        if declared is not None and declared != kind:
            # The kind arrived after the file part: check it now.
            kind = self._decide_kind(declared, got.sniffed)
        cap = self.limit(kind, self._route_of(fields.get("room")))
        if got.size > cap:
            raise MediaError(413, "too_large", f"{kind} files may have at most {cap} bytes", limit=cap, kind=kind)
        meta: dict[str, Any] = {}
        thumb_path = got.path.with_suffix(".thumb")
        mime = got.sniffed.mime
        try:
            meta = await self._run(self._probe, got, kind, thumb_path)
        except ProbeError as e:
            raise MediaError(415, "type", f"not a valid {kind}: {e}", kind=kind) from None
        if kind in ("voice", "video"):
            meta["duration"] = self._duration(kind, meta.get("duration"), fields.get("duration"))
        objects = self.objects
        assert objects is not None
        key = f"{time.strftime('%Y%m%d', time.gmtime())}/{got.file_id}"
        rec = MediaFile(got.file_id, user, kind, mime, got.size, got.sha256, got.name, orjson.dumps(meta), key, frames.now_ms())
        await objects.put(rec.key, got.path, mime, move=True)
        try:
            if meta.get("thumb"):
                await objects.put(rec.thumb_key, thumb_path, "image/jpeg", move=True)
            await self.store.media_add(rec)
        except BaseException:
            with contextlib.suppress(Exception):
                await objects.delete([rec.key, rec.thumb_key])
            raise
        self.m_bytes.inc(got.size)
        self._remember(rec)
        data = self.with_urls(rec, self.describe(rec))
        if self.gw.hooks.has("on_media"):
            self.gw.tasks.spawn(self._moderate(rec, data))
        return data

    def _probe(self, got: _Received, kind: str, thumb_path: Path) -> dict[str, Any]:
        """Facts from the content (in the thread pool)."""
        mime = got.sniffed.mime
        meta: dict[str, Any] = {}
        if got.sniffed.family == "image" and mime in _THUMBNAILED:
            info = probe_image(got.path)
            meta["w"], meta["h"] = info.w, info.h
            thumbnail(got.path, thumb_path, self.cfg.thumb_size)
            meta["thumb"] = True
        elif kind == "voice" or got.sniffed.family == "audio":
            meta["duration"] = audio_duration_ms(got.path, got.sniffed)
        elif got.sniffed.family == "video":
            dur, w, h = video_info(got.path)
            meta.update({"duration": dur, "w": w, "h": h})
        return {k: v for k, v in meta.items() if v is not None}

    def _duration(self, kind: str, measured: int | None, declared: str | None) -> int:
        longest = int(1000 * (self.cfg.limits.voice_seconds if kind == "voice" else self.cfg.limits.video_seconds))
        ms = measured
        if ms is None and declared is not None:
            try:
                ms = int(float(declared))
            except ValueError:
                raise MediaError(400, "bad_request", "duration must be a number of milliseconds") from None
        if ms is None:
            raise MediaError(400, "bad_request", f"the {kind}'s duration could not be read from the file: send it (ms) in 'duration'", kind=kind)
        if not 0 <= ms <= longest + 500:
            raise MediaError(413, "too_long", f"{kind} may last at most {longest // 1000} s", limit=longest, kind=kind)
        return ms

    # ---- download (disk backend) -------------------------------------------------------

    def _relayed(self, req: web.Request) -> bool:
        """The request came through the engine's relay (it carries the node's secret)."""
        return hmac.compare_digest(req.headers.get(SECRET_HEADER, "").encode(), self._relay_secret.encode())

    async def _download(self, req: web.Request) -> web.StreamResponse:
        if not self._relayed(req):
            return web.Response(status=403, text="not through the gateway's port\n")
        purpose = req.path[len(PREFIX)]
        fid = req.match_info["file_id"]
        exp_s, sig = req.query.get("e", ""), req.query.get("s", "")
        if not (exp_s.isdigit() and len(exp_s) < 12 and _ID_RE.fullmatch(fid)
                and hmac.compare_digest(sig.encode(), self._sig(purpose, fid, int(exp_s)).encode())):
            self.m_downloads.labels("forbidden").inc()
            return web.Response(status=403, text="bad signature\n")
        exp = int(exp_s)
        now = time.time()
        if exp < now:
            self.m_downloads.labels("forbidden").inc()
            return web.Response(status=403, text="this link has expired: page the message again for a new one\n")
        try:
            f = (await self._records([fid])).get(fid)
        except StoreUnavailable:
            return web.Response(status=503, text="store unavailable\n", headers={"Retry-After": "1"})
        objects = self.objects
        assert objects is not None
        path = None
        if f is not None and f.state != "removed":
            path = await objects.open(f.key if purpose == _PURPOSE_FILE else f.thumb_key)
        if f is None or path is None:
            self.m_downloads.labels("gone").inc()
            return web.Response(status=404, text="no such file (removed)\n")
        self.m_downloads.labels("ok").inc()
        ctype = f.mime if purpose == _PURPOSE_FILE else "image/jpeg"
        headers = {
            "Content-Type": ctype,
            "Cache-Control": f"private, max-age={max(0, exp - int(now))}",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
        }
        if purpose == _PURPOSE_FILE and ctype not in _INLINE:
            headers["Content-Disposition"] = content_disposition(f.name or f.id)
        return web.FileResponse(path, headers=headers)

    # ---- moderation --------------------------------------------------------------------

    async def _moderate(self, rec: MediaFile, data: dict[str, Any]) -> None:
        info = MediaInfo(rec.id, rec.owner, rec.kind, rec.mime, rec.size, rec.name, rec.sha256,
                         orjson.loads(rec.meta), data["url"], data.get("thumb_url"))
        for fn in self.gw.hooks.functions("on_media"):
            try:
                r = await self.gw.hooks.call("on_media", fn, info)
            except Exception:
                continue  # counted and logged by Hooks.call; the file stays as it is
            if r in ("pass", "risky"):
                await self.verdict(rec.id, r)
                if r == "risky":
                    return

    async def verdict(self, file_id: str, verdict: str, *, by: str = "moderation") -> MediaFile | None:
        """Record a moderation verdict (``pass`` or ``risky``), e.g. from WeChat's
        ``mediaCheckAsync`` callback. ``risky`` recalls every message carrying the file
        (a tombstone in history, a ``recall`` frame to members online) and deletes the
        object. None when there is no such file."""
        if verdict not in ("pass", "risky"):
            raise ValueError("verdict must be 'pass' or 'risky'")
        store = self.store
        f = await store.media_set_verdict(file_id, verdict)
        self.m_verdicts.labels(verdict).inc()
        if f is None or verdict == "pass":
            return f
        log.info("media %s of %s judged risky: recalling %s", file_id, f.owner, f.room or "(not sent)")
        for room, seq in await store.media_refs(file_id):
            try:
                await self.gw.conversations.do_recall(room, seq, by)
            except Exception:
                log.exception("recall of %s#%d (risky media %s) failed", room, seq, file_id)
        await self.remove([f], "risky")
        return f

    # ---- lifecycle ---------------------------------------------------------------------

    async def remove(self, files: Sequence[MediaFile], reason: str, *, purge_rows: bool = False) -> int:
        """Delete the objects of ``files`` and mark them removed (or delete their rows)."""
        if not files:
            return 0
        objects = self.objects
        assert objects is not None
        # The objects first: if the store cannot delete them (ObjectsError), the records
        # stay and the next sweep (or the caller's retry) tries again; nothing leaks.
        await objects.delete([k for f in files for k in (f.key, f.thumb_key)])
        ids = [f.id for f in files]
        store = self.store
        n = await (store.media_purge_rows(ids) if purge_rows else store.media_remove(ids))
        for i in ids:
            self._recent.pop(i, None)
        self.m_removed.labels(reason).inc(len(files))
        return n

    async def purge_user(self, user: str) -> int:
        """Delete every file ``user`` uploaded (a personal-data deletion request)."""
        n = 0
        store = self.store
        while batch := await store.media_of_user(user, 500):
            await self.remove(batch, "purge", purge_rows=True)
            n += len(batch)
        return n

    async def sweep(self) -> dict[str, int]:
        """One pass: files uploaded and never sent (``media.unsent_hours``), and files
        whose every message is gone (retention, erasure, recall) or that were sent where
        nothing is kept, an hour after (``MEDIA_PUBLISH_GRACE_MS``)."""
        store = self.store
        now = frames.now_ms()
        out = {"unsent": 0, "orphan": 0}
        while batch := await store.media_unsent(now - int(self.cfg.unsent_hours * 3_600_000), 500):
            out["unsent"] += await self.remove(batch, "unsent", purge_rows=True)
            if len(batch) < 500:
                break
        while batch := await store.media_orphans(500):
            out["orphan"] += await self.remove(batch, "orphan")
            if len(batch) < 500:
                break
        return out

    async def _sweep_loop(self) -> None:
        interval = self.cfg.sweep_interval
        await asyncio.sleep(interval * (0.5 + secrets.randbelow(1000) / 1000))
        while True:
            try:
                n = await self.sweep()
                if any(n.values()):
                    log.info("media sweep removed %d unsent and %d orphaned files", n["unsent"], n["orphan"])
            except (StoreUnavailable, ObjectsError) as e:
                log.warning("media sweep stopped for now: %s", e)
            except Exception:
                log.exception("media sweep failed")
            await asyncio.sleep(interval)


async def _small_field(part: BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(_FIELD_MAX + 1):
        data += chunk
        if len(data) > _FIELD_MAX:
            raise MediaError(400, "bad_request", f"form field {part.name!r} is longer than {_FIELD_MAX} bytes")
    return data.decode()


def _unlink(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()

