"""Webhook forwarder: POSTs room messages (after they were published) and disconnects to
your backend as JSON, with retries, without ever slowing the gateway down.

Use it to archive chat, count gifts, feed analytics or moderation queues.

How it works:

- ``after_publish`` (and ``on_disconnect``) only build a small dict and ``put_nowait`` it
  on a bounded :class:`asyncio.Queue`. When the queue is full the event is **dropped and
  counted**: a slow or dead backend costs memory up to the bound, never latency.
- ``WEBHOOK_WORKERS`` sender tasks take events off the queue, up to ``WEBHOOK_BATCH_MAX``
  at a time, and POST them with one shared :class:`aiohttp.ClientSession`.
- A failed POST (connection error, timeout, HTTP 408/425/429/5xx) is retried with
  exponential backoff and jitter (``WEBHOOK_BACKOFF_BASE`` * 2^n, capped at
  ``WEBHOOK_BACKOFF_MAX``; a ``Retry-After`` header is honoured within that cap), at most
  ``WEBHOOK_MAX_ATTEMPTS`` attempts; other 4xx answers are not retried. Delivery is
  at-least-once: every event has a unique ``id`` to de-duplicate on.
- Sessions and tasks start in ``setup(gateway)``; ``teardown()`` (graceful stop) keeps
  sending for up to ``WEBHOOK_DRAIN_TIMEOUT`` seconds, then cancels what is left.

Request body (``Content-Type: application/json``)::

    {"events": [
      {"event": "publish", "id": "n1-3f9a-17", "node": "n1", "ts": 1732262400123,
       "room": "live:42", "seq": 121, "epoch": "k3j9", "type": "chat", "prio": 1,
       "from": "u1", "data": {"text": "hi"}},
      {"event": "disconnect", "id": "n1-3f9a-18", "node": "n1", "ts": 1732262400456,
       "user": "u1", "session": "n1-42", "peer": "10.0.0.7:51234", "code": 1000,
       "reason": "", "connected_for": 812.4}
    ]}

Headers: ``X-Gateway-Delivery`` (batch id, stable across retries), ``X-Gateway-Attempt``,
and with ``WEBHOOK_SECRET`` set, ``X-Gateway-Timestamp`` and ``X-Gateway-Signature:
sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>`` to verify the sender.

Messages published from the server side (``gateway.publish`` or the HTTP API) do not run
hooks and are not forwarded: your backend sent them already.

Run it::

    WEBHOOK_URL=https://backend.internal/chat-events WEBHOOK_TYPES=chat,gift \\
        gateway run --app examples.webhook:make_app

Settings (environment variables):

==========================  ===================================================================
``WEBHOOK_URL``             the endpoint (required)
``WEBHOOK_EVENTS``          ``publish``, ``disconnect`` or both (default), comma separated
``WEBHOOK_TYPES``           message types to forward, comma separated (default: all)
``WEBHOOK_ROOMS``           room name prefixes to forward, comma separated (default: all)
``WEBHOOK_SECRET``          HMAC key for ``X-Gateway-Signature`` (default: unsigned)
``WEBHOOK_BEARER``          token sent as ``Authorization: Bearer`` (default: none)
``WEBHOOK_QUEUE_SIZE``      events held while the backend is slow (default 10000)
``WEBHOOK_WORKERS``         concurrent sender tasks / connections (default 4)
``WEBHOOK_BATCH_MAX``       events per POST (default 50)
``WEBHOOK_MAX_ATTEMPTS``    attempts per POST, first one included (default 5)
``WEBHOOK_BACKOFF_BASE``    seconds before the first retry (default 0.5)
``WEBHOOK_BACKOFF_MAX``     cap of the retry delay (default 30)
``WEBHOOK_TIMEOUT``         seconds per attempt (default 5)
``WEBHOOK_DRAIN_TIMEOUT``   seconds to keep sending at shutdown (default 5)
==========================  ===================================================================

Counters (attributes, and ``gateway_webhook_*`` series on the gateway's ``/metrics``):
``sent``, ``failed`` (gave up after retries or at shutdown), ``rejected`` (4xx),
``dropped`` (queue full), ``retries``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import logging
import os
import random
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from gateway import Client, Config, ConfigError, Gateway, Message, Plugin
from gateway.broker import PublishResult

__all__ = ["WebhookForwarder", "WebhookSettings", "make_app"]

log = logging.getLogger("gateway.webhook")

EVENTS = ("publish", "disconnect")
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass
class WebhookSettings:
    """Settings of :class:`WebhookForwarder`; see the module docstring."""

    url: str
    events: frozenset[str] = frozenset(EVENTS)
    types: frozenset[str] | None = None
    rooms: tuple[str, ...] | None = None
    secret: str | None = None
    bearer: str | None = None
    queue_size: int = 10_000
    workers: int = 4
    batch_max: int = 50
    max_attempts: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    timeout: float = 5.0
    drain_timeout: float = 5.0

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the environment variable of a bad value."""
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError("WEBHOOK_URL", f"must be an http(s) URL, got {self.url!r}")
        bad = set(self.events) - set(EVENTS)
        if bad or not self.events:
            raise ConfigError("WEBHOOK_EVENTS", f"must list some of {', '.join(EVENTS)}")
        for name, value, low in (
            ("WEBHOOK_QUEUE_SIZE", self.queue_size, 1),
            ("WEBHOOK_WORKERS", self.workers, 1),
            ("WEBHOOK_BATCH_MAX", self.batch_max, 1),
            ("WEBHOOK_MAX_ATTEMPTS", self.max_attempts, 1),
        ):
            if value < low:
                raise ConfigError(name, f"must be >= {low}")
        for name, f in (("WEBHOOK_BACKOFF_BASE", self.backoff_base), ("WEBHOOK_BACKOFF_MAX", self.backoff_max), ("WEBHOOK_DRAIN_TIMEOUT", self.drain_timeout)):
            if f < 0:
                raise ConfigError(name, "must be >= 0")
        if self.timeout <= 0:
            raise ConfigError("WEBHOOK_TIMEOUT", "must be > 0")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WebhookSettings:
        """Read ``WEBHOOK_*`` variables (raises :class:`ConfigError` naming the variable)."""
        env = os.environ if environ is None else environ
        url = env.get("WEBHOOK_URL", "").strip()
        if not url:
            raise ConfigError("WEBHOOK_URL", "required (the backend endpoint events are POSTed to)")

        def num(name: str, default: float, kind: type = float) -> Any:
            raw = env.get(name)
            if raw is None or not raw.strip():
                return default
            try:
                return kind(raw)
            except ValueError:
                raise ConfigError(name, f"must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None

        def items(name: str) -> list[str]:
            return [v.strip() for v in env.get(name, "").split(",") if v.strip()]

        s = cls(
            url=url,
            events=frozenset(items("WEBHOOK_EVENTS") or EVENTS),
            types=frozenset(items("WEBHOOK_TYPES")) or None,
            rooms=tuple(items("WEBHOOK_ROOMS")) or None,
            secret=env.get("WEBHOOK_SECRET") or None,
            bearer=env.get("WEBHOOK_BEARER") or None,
            queue_size=num("WEBHOOK_QUEUE_SIZE", cls.queue_size, int),
            workers=num("WEBHOOK_WORKERS", cls.workers, int),
            batch_max=num("WEBHOOK_BATCH_MAX", cls.batch_max, int),
            max_attempts=num("WEBHOOK_MAX_ATTEMPTS", cls.max_attempts, int),
            backoff_base=num("WEBHOOK_BACKOFF_BASE", cls.backoff_base),
            backoff_max=num("WEBHOOK_BACKOFF_MAX", cls.backoff_max),
            timeout=num("WEBHOOK_TIMEOUT", cls.timeout),
            drain_timeout=num("WEBHOOK_DRAIN_TIMEOUT", cls.drain_timeout),
        )
        s.check()
        return s


class _Retry(Exception):
    def __init__(self, why: str, retry_after: float | None = None) -> None:
        super().__init__(why)
        self.retry_after = retry_after


class WebhookForwarder(Plugin):
    """Forwards ``after_publish`` and ``on_disconnect`` events to ``settings.url``."""

    name = "webhook"

    def __init__(self, settings: WebhookSettings) -> None:
        settings.check()
        self.settings = settings
        # Created here so events can be queued even before setup(); never awaited by hooks.
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(settings.queue_size)
        self._session: aiohttp.ClientSession | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._ids: Iterator[int] = itertools.count(1)
        self._id_prefix = uuid.uuid4().hex[:6]
        self._node = ""
        self.sent = 0
        self.failed = 0
        self.rejected = 0
        self.dropped = 0
        self.retries = 0

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    # -- hooks: never block, never await ------------------------------------------------------

    def _event(self, kind: str, body: dict[str, Any]) -> None:
        body["event"] = kind
        body["id"] = f"{self._node}-{self._id_prefix}-{next(self._ids)}"
        body["node"] = self._node
        body["ts"] = time.time_ns() // 1_000_000
        try:
            self._queue.put_nowait(body)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("webhook queue full (%d events): %d event(s) dropped so far", self.settings.queue_size, self.dropped)

    def after_publish(self, msg: Message, result: PublishResult) -> None:
        s = self.settings
        if "publish" not in s.events:
            return
        if s.types is not None and msg.type not in s.types:
            return
        # For a message re-routed by an on_message hook the gateway calls this once per
        # target room, with ``msg.room`` set to the room ``result.seq`` belongs to.
        room = msg.room
        if s.rooms is not None and not room.startswith(s.rooms):
            return
        self._event("publish", {
            "room": room,
            "seq": result.seq,
            "epoch": result.epoch,
            "type": msg.type,
            "prio": msg.priority,
            "from": msg.sender.user if msg.sender is not None else None,
            "data": msg.data,
        })

    def on_disconnect(self, client: Client, code: int, reason: str) -> None:
        if "disconnect" not in self.settings.events:
            return
        self._event("disconnect", {
            "user": client.user,
            "session": client.session,
            "peer": client.peer,
            "code": code,
            "reason": reason,
            "connected_for": round(time.time() - client.connected_at, 3),
        })

    # -- lifecycle ------------------------------------------------------------------------------

    async def setup(self, gateway: Gateway) -> None:
        s = self.settings
        self._node = gateway.node_id
        headers = {"Content-Type": "application/json", "User-Agent": "gateway-webhook/1"}
        if s.bearer:
            headers["Authorization"] = f"Bearer {s.bearer}"
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=s.timeout),
            connector=aiohttp.TCPConnector(limit=s.workers),
        )
        self._workers = [asyncio.create_task(self._worker(i), name=f"webhook-{i}") for i in range(s.workers)]
        _register_metrics(gateway, self)
        log.info("webhook forwarder: %s, %d workers, queue %d", s.url, s.workers, s.queue_size)

    async def teardown(self) -> None:
        s = self.settings
        if self._workers:
            try:  # queued and in-flight events
                await asyncio.wait_for(self._queue.join(), s.drain_timeout)
            except TimeoutError:
                log.warning("webhook: %d event(s) not delivered at shutdown", self._queue.qsize())
        for t in self._workers:
            t.cancel()
        for t in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._workers = []
        lost = self._queue.qsize()
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
        self.failed += lost
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- delivery -------------------------------------------------------------------------------

    async def _worker(self, n: int) -> None:
        q = self._queue
        batch_max = self.settings.batch_max
        while True:
            batch = [await q.get()]
            while len(batch) < batch_max and not q.empty():
                batch.append(q.get_nowait())
            try:
                await self._deliver(batch)
            except asyncio.CancelledError:
                self.failed += len(batch)
                raise
            except Exception:  # never let a worker die
                self.failed += len(batch)
                log.exception("webhook worker %d: delivery failed", n)
            finally:
                for _ in batch:
                    q.task_done()

    async def _deliver(self, batch: list[dict[str, Any]]) -> None:
        s = self.settings
        body = orjson.dumps({"events": batch})
        delivery = uuid.uuid4().hex
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._post(body, delivery, attempt)
                self.sent += len(batch)
                return
            except _Retry as r:
                why, retry_after = str(r), r.retry_after
            except aiohttp.ClientResponseError as e:  # non-retryable 4xx
                self.rejected += len(batch)
                log.error("webhook: %s refused %d event(s) with HTTP %d; not retried", s.url, len(batch), e.status)
                return
            if attempt >= s.max_attempts:
                self.failed += len(batch)
                log.error("webhook: giving up on %d event(s) after %d attempts (%s)", len(batch), attempt, why)
                return
            delay = min(s.backoff_max, s.backoff_base * (2 ** (attempt - 1)))
            delay = random.uniform(delay / 2, delay)  # jitter: retries of many nodes spread out
            if retry_after is not None:
                delay = min(s.backoff_max, max(delay, retry_after))
            self.retries += 1
            log.warning("webhook: attempt %d failed (%s); retrying in %.2fs", attempt, why, delay)
            await asyncio.sleep(delay)

    async def _post(self, body: bytes, delivery: str, attempt: int) -> None:
        s = self.settings
        assert self._session is not None, "setup() has not run"
        headers = {"X-Gateway-Delivery": delivery, "X-Gateway-Attempt": str(attempt)}
        if s.secret:
            ts = str(int(time.time()))
            mac = hmac.new(s.secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
            headers["X-Gateway-Timestamp"] = ts
            headers["X-Gateway-Signature"] = f"sha256={mac}"
        try:
            async with self._session.post(s.url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status < 300:
                    return
                if resp.status in RETRY_STATUSES:
                    raise _Retry(f"HTTP {resp.status}", _retry_after(resp.headers.get("Retry-After")))
                raise aiohttp.ClientResponseError(resp.request_info, resp.history, status=resp.status, message=resp.reason or "")
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as e:
            raise _Retry(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to the backoff


def _register_metrics(gateway: Gateway, fw: WebhookForwarder) -> None:
    """Expose the counters on the gateway's ``/metrics`` (best effort)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class _Collector:
        def collect(self) -> Iterator[Any]:
            c = CounterMetricFamily("gateway_webhook_events", "Webhook events by outcome", labels=["outcome"])
            for outcome in ("sent", "failed", "rejected", "dropped"):
                c.add_metric([outcome], getattr(fw, outcome))
            yield c
            yield CounterMetricFamily("gateway_webhook_retries", "Webhook POST retries", value=fw.retries)
            yield GaugeMetricFamily("gateway_webhook_queue_length", "Webhook events waiting", value=fw.queued)

    try:
        gateway.metrics_registry.register(_Collector())  # type: ignore[arg-type]
    except Exception:
        log.warning("webhook: could not register metrics", exc_info=True)


def make_app(config: Config) -> Gateway:
    """``WEBHOOK_URL=... gateway run --app examples.webhook:make_app``."""
    return Gateway(config, plugins=[WebhookForwarder(WebhookSettings.from_env())])
