"""Configuration: one TOML file, overridden by environment variables, then CLI flags.

Precedence (last wins): defaults < TOML file < ``GATEWAY_<SECTION>__<KEY>`` environment
variables < ``--set section.key=value`` and the named CLI flags. Everything is validated
at start-up; errors name the offending key (``server.port: must be 1..65535``).

Environment values are parsed as TOML values when they parse (``8080``, ``true``,
``["a","b"]``, ``"x"``), else taken as strings: ``GATEWAY_SERVER__PORT=9000``,
``GATEWAY_AUTH__SECRET=...``, ``GATEWAY_NODE_ID=n2``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import socket
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .auth import AuthConfig
from .errors import ConfigError
from .routing import RouteConfig, Router

__all__ = ["Config", "ConfigError", "load_config"]

ENV_PREFIX = "GATEWAY_"

#: Keys renamed since 0.1: old dotted name -> new one (the old one still loads, with a warning).
RENAMED = {"server.threads": "server.io_threads"}

_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def engine(default: Any, **kw: Any) -> Any:
    """A setting the engine reads: passed to ``Engine(...)`` as ``<section>_<key>`` by
    :meth:`Config.engine_settings`. Adding one touches its section here, the binding's
    conversion (``rust/gateway-py``) and ``_core.pyi``, nothing else."""
    if isinstance(default, (list, dict)):
        raise TypeError("engine settings are scalars; a list is field(default_factory=list, metadata=ENGINE)")
    return field(default=default, metadata=ENGINE, **kw)


#: Field metadata of an engine setting (what :func:`engine` sets), for list settings.
ENGINE = {"engine": True}


@dataclass
class TlsConfig:
    """The ``wss://`` listener (``[server.tls]``): on when ``cert_file`` is set. The plain
    listener (``server.port``) stays, for a TLS-terminating proxy in front or local use."""

    #: PEM certificate chain, leaf first (a full chain, as a public CA issues it).
    cert_file: str = engine("")
    #: PEM private key of the leaf (RSA, ECDSA or Ed25519; PKCS#8, SEC1 or PKCS#1).
    key_file: str = engine("")
    #: Listener address; empty = ``server.host``.
    host: str = engine("")
    port: int = engine(8443)
    #: Expect a PROXY protocol v1/v2 header on every connection (TLS passthrough behind
    #: Tencent CLB, AWS NLB or HAProxy).
    proxy_protocol: bool = engine(False)
    #: Seconds between checks of the files for a change (then reload, as on SIGHUP);
    #: 0 = reload on SIGHUP only.
    watch_interval: float = 10.0


@dataclass
class ServerConfig:
    """Client-facing listener (the engine)."""

    host: str = engine("0.0.0.0")
    port: int = engine(8080)
    ws_path: str = engine("/ws")
    health_path: str = engine("/healthz")
    #: Worker processes sharing the port (SO_REUSEPORT); >1 needs the redis broker.
    workers: int = 1
    #: Engine I/O threads per process; 0 = the CPU count (was ``server.threads``).
    io_threads: int = engine(0)
    #: SO_REUSEPORT (always on with ``workers`` > 1).
    reuse_port: bool = engine(False)
    #: The plain listener expects a PROXY protocol v1/v2 header on every connection.
    proxy_protocol: bool = engine(False)
    #: CIDRs of proxies whose ``X-Forwarded-For`` / ``X-Real-IP`` are believed (and, when
    #: set, the only peers allowed on a PROXY-protocol listener). Empty: headers ignored.
    trusted_proxies: list[str] = field(default_factory=list, metadata=ENGINE)
    tls: TlsConfig = field(default_factory=TlsConfig)
    backlog: int = engine(4096)
    subprotocols: list[str] = field(default_factory=lambda: ["gateway.v1"])
    #: Serve the live-room demo page at ``/``.
    demo: bool = True
    #: A new login of a user closes the user's older connections (4004).
    single_session: bool = False


@dataclass
class LimitsConfig:
    """Bounds on what one client, one IP or the whole node can make the server hold or do
    (docs/operations.md, "Limits"; docs/architecture.md, "Memory bounds")."""

    max_message_bytes: int = engine(65536)
    max_frame_bytes: int = engine(65536)
    #: Bound of each connection's outbound queue (control replies included).
    queue_bytes: int = engine(1 << 20)
    handshake_timeout: float = engine(5.0)
    max_headers: int = engine(64)
    max_header_bytes: int = engine(8192)
    #: Events waiting for Python (count); above it, requests are shed with 4029 "overloaded".
    event_queue: int = engine(1 << 20)
    #: Bytes of events waiting for Python, node-wide.
    event_queue_bytes: int = engine(64 << 20)
    #: A connection's share of the event queue in bytes; above it the engine stops reading
    #: that connection until Python has caught up (TCP backpressure).
    conn_event_bytes: int = engine(256 << 10)
    #: Client messages per second per connection, every op (token bucket), and the burst.
    client_rate: float = engine(50.0)
    client_burst: int = engine(100)
    #: Open connections per node (also never more than the fd limit minus reserved_fds).
    max_conns: int = engine(100_000)
    #: File descriptors kept free for Redis, the API, logs and the database.
    reserved_fds: int = engine(256)
    #: Open connections per client IP (generous: behind a load balancer without the PROXY
    #: protocol every client has the balancer's address).
    max_conns_per_ip: int = engine(10_000)
    #: Upgrades in progress per client IP.
    max_handshakes_per_ip: int = engine(1000)
    #: Open connections per user (a phone, a PC, a few tabs).
    max_conns_per_user: int = engine(10)
    #: Rooms one connection may be in, and rooms with members on this node.
    max_rooms_per_conn: int = engine(100)
    max_rooms: int = engine(100_000)
    #: Bytes of history in one join ack (``history`` or ``resume``); older messages are cut.
    max_history_bytes: int = 256 << 10
    #: Members per fan-out task; larger rooms are split across threads.
    fanout_chunk: int = engine(1024)
    #: Consecutive client errors (bad JSON, rate limits, ...) before closing with 4029.
    max_errors: int = 50
    #: SO_SNDBUF of accepted client sockets, in bytes; 0 = the kernel default (autotuned).
    socket_send_buffer: int = engine(0)


@dataclass
class HeartbeatConfig:
    #: Seconds between client pings, announced in the ``connected`` frame.
    interval: int = engine(30)
    #: Close a connection silent for this long (code 4000). Default: 3 intervals.
    idle_timeout: float = engine(90.0)
    #: Send WebSocket pings to connections silent for ``interval``.
    ws_ping: bool = engine(True)


@dataclass
class DeflateSection:
    enabled: bool = engine(True)
    min_size: int = engine(128)
    level: int = engine(5)
    client_max_window_bits: int = engine(15)


@dataclass
class ApiConfig:
    """Internal HTTP API, ``/metrics``, ``/healthz`` and ``/readyz``."""

    host: str = "127.0.0.1"
    port: int = 8081
    #: Required in the ``Authorization: Bearer`` or ``X-API-Key`` header. May be empty
    #: only when ``host`` is a loopback address.
    api_key: str = ""
    enabled: bool = True
    #: Serve ``/metrics`` only with the API key too (``/healthz`` and ``/readyz`` stay open).
    metrics_need_key: bool = False
    #: Extra ``Host`` header values accepted besides loopback names and ``host`` itself
    #: (e.g. the service name in Kubernetes). Checked only when there is no API key.
    allowed_hosts: list[str] = field(default_factory=list)
    #: Seconds to read a request (headers and body); slower clients get 408.
    read_timeout: float = 10.0
    #: Open API connections; more wait in the kernel's backlog.
    max_connections: int = 256


@dataclass
class HooksConfig:
    #: Seconds an async hook may take.
    timeout: float = 2.0
    #: What a timed-out hook means: "allow" or "deny".
    fallback: str = "deny"


@dataclass
class PresenceConfig:
    #: Seconds between presence count frames (only sent when counts changed).
    interval: float = 10.0


@dataclass
class BrokerConfig:
    kind: str = "memory"
    url: str = "redis://127.0.0.1:6379/0"
    #: Redis Cluster: sharded pub/sub (SSUBSCRIBE/SPUBLISH).
    cluster: bool = False
    #: Key and channel prefix, so several deployments can share one Redis.
    prefix: str = "gw"
    #: Seconds a node's presence report lives without renewal.
    presence_ttl: float = 30.0
    #: Seconds a reconnect may take before a leave is reported to hooks.
    leave_grace: float = 5.0
    #: Seconds without a heartbeat after which the other nodes count a node as gone: its
    #: hook-debounce counts stop holding back leaves (a crashed node's users).
    node_timeout: float = 10.0
    #: Seconds a publish's idempotency key (client ``cid``, API ``Idempotency-Key``) is
    #: remembered: a retry within it returns the first result instead of a duplicate.
    idempotency_ttl: float = 600.0
    #: The archive log (``store = "archive"`` messages with the redis broker; see
    #: docs/operations.md, "The message store"): the streams it is spread over (a room
    #: always uses the same one). 0 = no log: archive messages are written behind from
    #: the publishing node's memory, as with the memory broker (and with ``cluster``).
    archive_streams: int = 4
    #: Entries the log holds at most, all streams together (approximately: Redis trims
    #: whole blocks of ~100) while the store is down or slow; entries trimmed before they
    #: were written are lost (``gateway_archive_log_lost_total``). ~250 bytes each for chat.
    archive_maxlen: int = 1_000_000
    #: Seconds an entry a node read may stay unwritten before another node takes it
    #: over (its node died or is stuck).
    archive_claim_after: float = 30.0
    #: Entries a node reads, writes (one transaction) and acknowledges per round.
    archive_batch: int = 500


@dataclass
class MetricsConfig:
    #: Rooms in the per-room view (``gateway_top_room_*``): the N largest plus the N busiest,
    #: so the number of series never grows with the number of rooms.
    top_rooms: int = 20


@dataclass
class LogConfig:
    level: str = "info"
    #: JSON lines (True) or plain text.
    json: bool = True
    #: One line per connect and disconnect.
    access_log: bool = False


@dataclass
class DrainConfig:
    #: Seconds to wait for connections to close on stop.
    timeout: float = 10.0
    #: Reconnect delay suggested to clients in the ``drain`` frame.
    retry_ms: int = 1500


@dataclass
class StoreConfig:
    """Where room messages are kept (``store`` of each route says what): see
    docs/operations.md, "The message store". Opened at start-up only when a route keeps
    messages."""

    #: ``"sqlite"`` (embedded, one node) or ``"postgres"`` (production, many nodes).
    kind: str = "sqlite"
    #: SQLite: the database file (created with its directory).
    path: str = "data/livegate.db"
    #: SQLite: ``"NORMAL"`` survives a crash of the process (WAL); ``"FULL"`` also a power loss.
    synchronous: str = "NORMAL"
    #: PostgreSQL: ``postgresql://user:password@host:5432/db`` (better from the
    #: environment: ``GATEWAY_STORE__DSN``).
    dsn: str = ""
    #: Group commit: how long the writer waits to gather more messages into a
    #: transaction, and the most it writes in one.
    batch_ms: float = 5.0
    max_batch: int = 1000
    #: Archive messages waiting to be written; beyond it they are not kept (counted in
    #: ``gateway_store_archive_dropped_total``).
    max_backlog: int = 100_000
    #: Readers (SQLite threads) or connections (PostgreSQL).
    pool_size: int = 4
    #: PostgreSQL: connections that write durable commits (a room always uses the same
    #: one; one more writes archive messages). 1 suits a database on a slow disk.
    writers: int = 2
    #: PostgreSQL: seconds any statement may take before the database counts as down.
    timeout: float = 10.0
    #: Seconds between runs of the retention job (routes' ``retention_days``).
    retention_interval: float = 600.0


@dataclass
class ConversationsConfig:
    """Conversations (routes of kind ``dm``, ``group``, ``notice``): docs/protocol.md,
    "Conversations"."""

    #: Conversations a connection receives live after its first ``sync``: its user's most
    #: recently active ones; the rest reach it through ``sync`` (docs/scaling.md).
    max_attached: int = 1000
    #: Seconds a sync cursor reaches back, for changes another node committed late.
    sync_margin: float = 10.0
    #: Seconds a sender's own read position (its messages count as read) waits to be
    #: written with others, in one transaction.
    read_flush_interval: float = 0.5


@dataclass
class MediaLimits:
    """Largest upload per kind (bytes) and longest voice/video (seconds):
    ``[media.limits]``. A route's ``media_limits`` may lower the byte caps for its rooms."""

    image: int = 20 << 20
    voice: int = 2 << 20
    video: int = 100 << 20
    file: int = 100 << 20
    voice_seconds: float = 60.0
    video_seconds: float = 300.0


@dataclass
class MediaS3:
    """An S3-compatible object store (``[media.s3]``): MinIO, Tencent COS, Alibaba OSS,
    AWS S3. The credentials are better given in the environment
    (``GATEWAY_MEDIA__S3__SECRET_KEY``)."""

    #: ``https://cos.ap-shanghai.myqcloud.com``, ``http://minio:9000``; empty = AWS.
    endpoint: str = ""
    bucket: str = ""
    region: str = "us-east-1"
    access_key: str = ""
    secret_key: str = ""
    #: Key prefix inside the bucket (``livegate/``).
    prefix: str = ""
    #: ``"path"`` (MinIO, most private deployments) or ``"virtual"`` (COS, OSS, AWS).
    addressing: str = "path"
    #: Create the bucket at start-up when it is missing (else a start-up error).
    create_bucket: bool = False


@dataclass
class MediaConfig:
    """Images, voice, video and files (docs/media.md): uploaded to ``/media/upload`` on
    the client port, checked, kept on disk or in an S3-compatible store, sent in messages
    as references and downloaded through short-lived signed URLs. On when the store is
    (the files' records live there)."""

    enabled: bool = True
    #: ``"disk"`` (one node: under ``dir``) or ``"s3"`` (``[media.s3]``; several nodes).
    backend: str = "disk"
    #: Local directory: the files (disk backend) and uploads in progress (both backends).
    #: Empty: ``media/`` beside the SQLite file, else ``data/media``.
    dir: str = ""
    #: Seconds a download URL is valid after the message is delivered or paged.
    url_ttl: float = 600.0
    #: HMAC key of the disk backend's download URLs (at least 32 characters); empty: a
    #: random key kept in ``<dir>/.url-key`` (several nodes sharing a disk need one key).
    url_secret: str = ""
    #: Absolute base of download URLs (``https://chat.example.com``); empty: URLs are
    #: paths (``/media/f/...``) that the SDKs resolve against the socket's origin.
    public_url: str = ""
    limits: MediaLimits = field(default_factory=MediaLimits)
    #: Bytes one user may upload in any 24 hours.
    daily_quota: int = 1 << 30
    #: Uploads in progress per user (more get 429).
    per_user_uploads: int = 4
    #: Whole-upload deadline and idle cut-off (seconds), enforced by the engine's relay
    #: and again by the upload handler; uploads in flight per node (more get 503).
    timeout: float = 300.0
    idle_timeout: float = 30.0
    max_inflight: int = 64
    #: Upload bytes per second the node reads, all uploads together (0: no limit), and
    #: per upload (0: no limit). Uploads cost CPU (about 5 ms per MB on the development
    #: machine, engine and Python): the node budget keeps them from starving the live
    #: rooms' fan-out (docs/media.md, "Cost"). Raise it on machines with cores to spare.
    node_upload_rate: int = 16 << 20
    upload_rate: int = 0
    #: Hours an uploaded file that no message carries is kept before it is deleted.
    unsent_hours: float = 24.0
    #: Seconds between sweeps for unsent, orphaned (message deleted, recalled or expired)
    #: and purged files.
    sweep_interval: float = 300.0
    #: Longest side of image thumbnails (pixels).
    thumb_size: int = 320
    s3: MediaS3 = field(default_factory=MediaS3)


#: Room events an outbox endpoint may ask for, besides ``message``.
OUTBOX_EVENTS = ("message", "join", "leave", "kick", "ban", "recall", "member", "cs.state", "cs.ticket", "cs.rating")


@dataclass
class OutboxEndpoint:
    """One of the company's HTTP endpoints the outbox delivers to (``[[outbox.endpoints]]``)."""

    #: Unique name: the key of its cursor and dead letters, the ``endpoint`` label of the
    #: metrics. Letters, digits, ``-`` and ``_``. Renaming it starts a new cursor.
    name: str = ""
    #: ``https://`` (or ``http://`` inside the company's network) URL that gets the POSTs.
    url: str = ""
    #: HMAC-SHA256 key for ``X-Gateway-Signature``; better from the environment: set
    #: ``secret_env`` to the name of a variable that holds it. Empty: unsigned.
    secret: str = ""
    secret_env: str = ""
    #: Room name patterns (``*`` matches anything, as in ``cs:*``) whose events it gets
    #: (a kick is about a user everywhere: every endpoint that asked for kicks gets it).
    rooms: list[str] = field(default_factory=lambda: ["*"])
    #: Message types it gets (empty: every type).
    types: list[str] = field(default_factory=list)
    #: What it gets: ``message`` (stored messages) and room events ``join``, ``leave``,
    #: ``kick``, ``ban``, and of conversations ``recall`` and ``member`` (added, removed,
    #: role or mute changed); of the desk (docs/customer-service.md) ``cs.state``,
    #: ``cs.ticket`` and ``cs.rating``.
    events: list[str] = field(default_factory=lambda: ["message"])
    #: Extra request headers (e.g. ``Authorization``).
    headers: dict[str, str] = field(default_factory=dict)
    #: Seconds one POST may take; events per POST at most.
    timeout: float = 10.0
    batch: int = 100

    def signing_key(self) -> str:
        """The HMAC key: ``secret``, or the variable ``secret_env`` names."""
        return os.environ.get(self.secret_env, "") if self.secret_env else self.secret


@dataclass
class OutboxConfig:
    """Delivery of stored messages and room events to the company's systems: see
    docs/operations.md, "The outbox"."""

    endpoints: list[OutboxEndpoint] = field(default_factory=list)
    #: Seconds between reads of the outbox log when it had nothing new.
    poll_interval: float = 0.25
    #: Seconds a room's message waits for an earlier seq of the same room that is not in
    #: the log yet (being committed by another node) before it is sent anyway.
    gap_wait: float = 2.0
    #: Retry delays after a failed POST: doubling from ``backoff_min`` up to
    #: ``backoff_max`` seconds (a ``Retry-After`` answer is honoured, up to
    #: ``retry_after_max``).
    backoff_min: float = 1.0
    backoff_max: float = 60.0
    retry_after_max: float = 3600.0
    #: Seconds an endpoint may keep failing before the events it does not take go to its
    #: dead letters (``GET /v1/outbox/{endpoint}/dead``, replayed with ``POST .../replay``).
    dead_letter_after: float = 86400.0


@dataclass
class Config:
    """The whole configuration; see ``gateway.example.toml``."""

    node_id: str = ""
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    deflate: DeflateSection = field(default_factory=DeflateSection)
    api: ApiConfig = field(default_factory=ApiConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    presence: PresenceConfig = field(default_factory=PresenceConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    drain: DrainConfig = field(default_factory=DrainConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    conversations: ConversationsConfig = field(default_factory=ConversationsConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    routes: list[RouteConfig] = field(default_factory=Router.default_routes)
    #: Free-form settings of plugins: ``[plugins.<name>]`` tables, not validated here
    #: (each plugin reads and checks its own: ``gateway.config.plugins.get(name, {})``).
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)

    def check(self) -> None:
        """Validate every section; raise :class:`ConfigError` naming the key. The one
        validation of every setting, engine settings included (the binding only
        converts types)."""
        if not self.node_id:
            self.node_id = f"{socket.gethostname()}-{os.getpid()}"
        s = self.server
        for key, port in (("server.port", s.port), ("api.port", self.api.port)):
            if not 0 <= port <= 65535:
                raise ConfigError(key, "must be 0..65535")
        if not s.ws_path.startswith("/"):
            raise ConfigError("server.ws_path", "must start with '/'")
        if not s.health_path.startswith("/"):
            raise ConfigError("server.health_path", "must start with '/'")
        if s.workers < 1:
            raise ConfigError("server.workers", "must be >= 1")
        if s.workers > 1 and self.broker.kind != "redis":
            raise ConfigError("server.workers", "several workers share rooms through a broker: set broker.kind = 'redis'")
        if s.io_threads < 0:
            raise ConfigError("server.io_threads", "must be >= 0 (0 = CPU count)")
        if s.backlog < 1:
            raise ConfigError("server.backlog", "must be >= 1")
        if not s.subprotocols:
            raise ConfigError("server.subprotocols", "must list at least one protocol")
        self._check_tls()
        if not isinstance(s.trusted_proxies, list) or not all(isinstance(x, str) for x in s.trusted_proxies):
            raise ConfigError("server.trusted_proxies", "must be a list of CIDR strings, e.g. ['10.0.0.0/8']")
        for entry in s.trusted_proxies:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ConfigError("server.trusted_proxies", f"{entry!r} is not an address or CIDR") from None
        lim = self.limits
        for name in (
            "max_message_bytes", "max_frame_bytes", "queue_bytes", "max_headers", "max_header_bytes", "event_queue",
            "event_queue_bytes", "conn_event_bytes", "client_burst", "max_conns", "max_conns_per_ip",
            "max_handshakes_per_ip", "max_conns_per_user", "max_rooms_per_conn", "max_rooms", "max_history_bytes",
            "fanout_chunk", "max_errors",
        ):
            if getattr(lim, name) <= 0:
                raise ConfigError(f"limits.{name}", "must be > 0")
        if lim.max_frame_bytes > lim.max_message_bytes:
            raise ConfigError("limits.max_frame_bytes", "must be <= limits.max_message_bytes")
        if lim.conn_event_bytes < lim.max_message_bytes:
            raise ConfigError("limits.conn_event_bytes", "must hold at least one message (>= limits.max_message_bytes)")
        if lim.event_queue_bytes < lim.conn_event_bytes:
            raise ConfigError("limits.event_queue_bytes", "must be >= limits.conn_event_bytes")
        if lim.client_rate < 0:
            raise ConfigError("limits.client_rate", "must be >= 0 (0 = unlimited)")
        if lim.reserved_fds < 16:
            raise ConfigError("limits.reserved_fds", "must be >= 16 (Redis, the API, logs)")
        if lim.handshake_timeout <= 0:
            raise ConfigError("limits.handshake_timeout", "must be > 0")
        if lim.socket_send_buffer < 0:
            raise ConfigError("limits.socket_send_buffer", "must be >= 0 (0 = kernel default)")
        hb = self.heartbeat
        if hb.interval < 1:
            raise ConfigError("heartbeat.interval", "must be >= 1 second")
        if hb.idle_timeout <= hb.interval:
            raise ConfigError("heartbeat.idle_timeout", "must be longer than heartbeat.interval (2-3 intervals is usual)")
        d = self.deflate
        if not 0 <= d.level <= 9:
            raise ConfigError("deflate.level", "must be 0..9")
        if not 9 <= d.client_max_window_bits <= 15:
            raise ConfigError("deflate.client_max_window_bits", "must be 9..15")
        if d.min_size < 0:
            raise ConfigError("deflate.min_size", "must be >= 0")
        api = self.api
        if api.enabled and not api.api_key and api.host not in _LOOPBACK:
            raise ConfigError("api.api_key", "required when the API listens on a non-loopback address")
        if api.metrics_need_key and not api.api_key:
            raise ConfigError("api.metrics_need_key", "needs api.api_key (otherwise /metrics could never be read)")
        if api.read_timeout <= 0:
            raise ConfigError("api.read_timeout", "must be > 0")
        if api.max_connections < 1:
            raise ConfigError("api.max_connections", "must be >= 1")
        if self.hooks.timeout <= 0:
            raise ConfigError("hooks.timeout", "must be > 0")
        if self.hooks.fallback not in ("allow", "deny"):
            raise ConfigError("hooks.fallback", "must be 'allow' or 'deny'")
        if not 0 <= self.metrics.top_rooms <= 1000:
            raise ConfigError("metrics.top_rooms", "must be 0..1000")
        if self.presence.interval <= 0:
            raise ConfigError("presence.interval", "must be > 0")
        b = self.broker
        if b.kind not in ("memory", "redis"):
            raise ConfigError("broker.kind", "must be 'memory' or 'redis'")
        if b.node_timeout <= 0:
            raise ConfigError("broker.node_timeout", "must be > 0")
        if b.leave_grace < 0:
            raise ConfigError("broker.leave_grace", "must be >= 0")
        if b.idempotency_ttl <= 0:
            raise ConfigError("broker.idempotency_ttl", "must be > 0")
        if not 0 <= b.archive_streams <= 64:
            raise ConfigError("broker.archive_streams", "must be 0..64 (0 = no archive log: write behind from node memory)")
        if b.archive_maxlen < 100:
            raise ConfigError("broker.archive_maxlen", "must be >= 100 entries")
        if not 0 < b.archive_claim_after <= 86400:
            raise ConfigError("broker.archive_claim_after", "must be > 0 and <= 86400 seconds")
        if not 1 <= b.archive_batch <= 10_000:
            raise ConfigError("broker.archive_batch", "must be 1..10000")
        if self.log.level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ConfigError("log.level", "must be debug, info, warning, error or critical")
        if self.drain.timeout < 0:
            raise ConfigError("drain.timeout", "must be >= 0")
        self._check_store()
        self._check_outbox()
        self._check_media()
        cv = self.conversations
        if cv.max_attached < 0:
            raise ConfigError("conversations.max_attached", "must be >= 0")
        if cv.sync_margin < 0:
            raise ConfigError("conversations.sync_margin", "must be >= 0")
        if cv.read_flush_interval <= 0:
            raise ConfigError("conversations.read_flush_interval", "must be > 0")
        self.auth.check("auth")
        if self.auth.mode == "dev" and s.host not in _LOOPBACK and not self.auth.dev_allow_remote:
            raise ConfigError(
                "auth.mode",
                f"'dev' trusts ?user= and ?role= from anyone: refused on server.host = {s.host!r}. "
                "Use 127.0.0.1, configure JWT (auth.secret or auth.public_key_file), "
                "or set auth.dev_allow_remote = true for a throw-away demo",
            )
        seen = set()
        for i, r in enumerate(self.routes):
            r.check(f"routes[{i}]")
            if r.pattern in seen:
                raise ConfigError(f"routes[{i}].pattern", f"duplicate pattern {r.pattern!r}")
            seen.add(r.pattern)
        if not isinstance(self.plugins, dict):
            raise ConfigError("plugins", "must be a table of [plugins.<name>] tables")
        for name, table in self.plugins.items():
            if not isinstance(table, dict):
                raise ConfigError(f"plugins.{name}", "must be a table ([plugins.<name>])")

    def _check_store(self) -> None:
        st = self.store
        if st.kind not in ("sqlite", "postgres"):
            raise ConfigError("store.kind", f"must be 'sqlite' or 'postgres', got {st.kind!r}")
        if st.synchronous.upper() not in ("NORMAL", "FULL"):
            raise ConfigError("store.synchronous", "must be 'NORMAL' or 'FULL'")
        for name in ("max_batch", "max_backlog", "pool_size", "writers"):
            if getattr(st, name) < 1:
                raise ConfigError(f"store.{name}", "must be >= 1")
        if st.timeout <= 0:
            raise ConfigError("store.timeout", "must be > 0")
        if not 0 <= st.batch_ms <= 1000:
            raise ConfigError("store.batch_ms", "must be 0..1000 milliseconds")
        if st.retention_interval <= 0:
            raise ConfigError("store.retention_interval", "must be > 0")
        if not self.needs_store:
            return
        why = "a route keeps messages" if self.keeps_messages else "outbox endpoints are configured"
        if st.kind == "sqlite" and not st.path:
            raise ConfigError("store.path", f"must name the SQLite file ({why})")
        if st.kind == "postgres" and not st.dsn:
            raise ConfigError("store.dsn", f"must be set for store.kind = 'postgres' ({why})")

    def _check_outbox(self) -> None:
        import re
        from urllib.parse import urlsplit

        ob = self.outbox
        for name in ("poll_interval", "gap_wait", "backoff_min", "backoff_max", "retry_after_max", "dead_letter_after"):
            if getattr(ob, name) < 0 or (name != "gap_wait" and getattr(ob, name) == 0):
                raise ConfigError(f"outbox.{name}", "must be > 0" if name != "gap_wait" else "must be >= 0")
        if ob.backoff_max < ob.backoff_min:
            raise ConfigError("outbox.backoff_max", "must be >= outbox.backoff_min")
        names: set[str] = set()
        for i, ep in enumerate(ob.endpoints):
            key = f"outbox.endpoints[{i}]"
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", ep.name):
                raise ConfigError(f"{key}.name", "must be 1-64 letters, digits, '-' or '_'")
            if ep.name in names:
                raise ConfigError(f"{key}.name", f"duplicate endpoint name {ep.name!r}")
            names.add(ep.name)
            u = urlsplit(ep.url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ConfigError(f"{key}.url", f"must be an http:// or https:// URL, got {ep.url!r}")
            bad = [e for e in ep.events if e not in OUTBOX_EVENTS]
            if bad or not ep.events:
                raise ConfigError(f"{key}.events", f"must list some of {', '.join(OUTBOX_EVENTS)}" + (f", not {bad[0]!r}" if bad else ""))
            if not ep.rooms:
                raise ConfigError(f"{key}.rooms", "must list room patterns (['*'] for every room)")
            if not all(isinstance(v, str) for v in ep.headers.values()):
                raise ConfigError(f"{key}.headers", "must map header names to strings")
            if ep.timeout <= 0:
                raise ConfigError(f"{key}.timeout", "must be > 0")
            if not 1 <= ep.batch <= 10_000:
                raise ConfigError(f"{key}.batch", "must be 1..10000")
            if ep.secret_env and ep.secret_env not in os.environ:
                raise ConfigError(f"{key}.secret_env", f"the environment variable {ep.secret_env} is not set")

    @property
    def keeps_messages(self) -> bool:
        """Whether a route keeps messages (``store`` other than ``"none"``)."""
        return any(r.store != "none" for r in self.routes)

    @property
    def needs_store(self) -> bool:
        """Whether the store is opened at start-up: a route keeps messages, or outbox
        endpoints are configured (room events go through the store's outbox log)."""
        return self.keeps_messages or bool(self.outbox.endpoints)

    def _check_tls(self) -> None:
        t = self.server.tls
        if not 0 <= t.port <= 65535:
            raise ConfigError("server.tls.port", "must be 0..65535")
        if t.watch_interval < 0:
            raise ConfigError("server.tls.watch_interval", "must be >= 0 (0 = reload on SIGHUP only)")
        if bool(t.cert_file) != bool(t.key_file):
            missing = "server.tls.key_file" if t.cert_file else "server.tls.cert_file"
            raise ConfigError(missing, "must be set together with " + ("server.tls.cert_file" if t.cert_file else "server.tls.key_file"))
        if t.cert_file and t.port == self.server.port and (t.host or self.server.host) == self.server.host and t.port:
            raise ConfigError("server.tls.port", f"must differ from server.port ({self.server.port})")

    def tls_certificate(self) -> dict[str, Any] | None:
        """Check the TLS certificate and key as the engine will load them; the served
        certificate's facts (``not_after``, ``serial``, ``subject``...), or None without
        TLS. Raises :class:`ConfigError` naming the key: a missing file, a bad PEM, a key
        that does not match, an expired certificate."""
        t = self.server.tls
        if not t.cert_file:
            return None
        from gateway import _core

        try:
            return dict(_core.check_tls(t.cert_file, t.key_file))
        except _core.TlsError as e:
            key, message = e.args
            raise ConfigError(key, message) from None

    def _check_media(self) -> None:
        m = self.media
        if m.backend not in ("disk", "s3"):
            raise ConfigError("media.backend", f"must be 'disk' or 's3', got {m.backend!r}")
        for name in ("url_ttl", "timeout", "idle_timeout", "sweep_interval", "unsent_hours"):
            if not getattr(m, name) > 0:
                raise ConfigError(f"media.{name}", "must be > 0")
        if m.url_ttl > 7 * 86400:
            raise ConfigError("media.url_ttl", "must be at most 7 days (604800 s; the longest an S3 presigned URL lives)")
        for name in ("node_upload_rate", "upload_rate"):
            if not isinstance(getattr(m, name), int) or getattr(m, name) < 0:
                raise ConfigError(f"media.{name}", "must be a number of bytes per second >= 0 (0: no limit)")
        for name in ("daily_quota", "per_user_uploads", "max_inflight"):
            if not getattr(m, name) >= 1:
                raise ConfigError(f"media.{name}", "must be >= 1")
        if not 32 <= m.thumb_size <= 2048:
            raise ConfigError("media.thumb_size", "must be 32..2048 pixels")
        if m.url_secret and len(m.url_secret) < 32:
            raise ConfigError("media.url_secret", "must be at least 32 characters (or empty: a random key kept in the media dir)")
        if m.public_url and not m.public_url.startswith(("https://", "http://")):
            raise ConfigError("media.public_url", "must be an absolute http(s):// URL (or empty)")
        lim = m.limits
        for name in ("image", "voice", "video", "file"):
            if not 1 <= getattr(lim, name) <= 4 << 30:
                raise ConfigError(f"media.limits.{name}", "must be 1 byte .. 4 GiB")
        for name in ("voice_seconds", "video_seconds"):
            if not getattr(lim, name) > 0:
                raise ConfigError(f"media.limits.{name}", "must be > 0")
        if m.enabled and m.backend == "s3":
            s3 = m.s3
            if not s3.bucket:
                raise ConfigError("media.s3.bucket", "must be set for media.backend = 's3'")
            if s3.addressing not in ("path", "virtual"):
                raise ConfigError("media.s3.addressing", "must be 'path' or 'virtual'")
            if s3.endpoint and not s3.endpoint.startswith(("https://", "http://")):
                raise ConfigError("media.s3.endpoint", "must be an http(s):// URL (or empty for AWS)")
            if bool(s3.access_key) != bool(s3.secret_key):
                raise ConfigError("media.s3.secret_key", "give access_key and secret_key together (or neither: the environment's AWS credentials)")

    def engine_settings(self) -> dict[str, Any]:
        """Every engine setting as ``Engine(...)`` takes it: ``<section>_<key>`` for each
        field declared with :func:`engine`, one name on both sides."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if not dataclasses.is_dataclass(section):
                continue
            out.update(_engine_fields(section, f.name))
        if self.server.workers > 1:
            out["server_reuse_port"] = True
        return out


def _engine_fields(section: Any, prefix: str) -> dict[str, Any]:
    """Engine settings of one section and its subsections (``server.tls.port`` ->
    ``server_tls_port``)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_engine_fields(value, f"{prefix}_{f.name}"))
        elif f.metadata.get("engine"):
            out[f"{prefix}_{f.name}"] = list(value) if isinstance(value, list) else value
    return out


# ---- building dataclasses from plain data, with key-naming errors ----------------------


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check (and lightly coerce: int -> float) ``value`` against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            ok, v = _type_ok(value, arm)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            return False, value
        out = []
        for item in value:
            ok, v = _type_ok(item, arg)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if origin is dict:
        return isinstance(value, dict), value
    return True, value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class _Text:
    """A value given as text (environment variable, ``--set``): its TOML reading and the
    raw text, so a string setting keeps its text even when it looks like a number
    (``GATEWAY_AUTH__SECRET=123456``)."""

    __slots__ = ("raw", "value")

    def __init__(self, raw: str, value: Any) -> None:
        self.raw = raw
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from ``data``; unknown keys and wrong types raise
    :class:`ConfigError` naming ``prefix.key``."""
    if isinstance(data, _Text):
        data = data.value
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, "must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if name in RENAMED and key not in fields:
            new = RENAMED[name]
            logging.getLogger("gateway.config").warning("%s is deprecated: use %s", name, new)
            key, name = new.rsplit(".", 1)[1], new
        if key not in fields:
            raise ConfigError(name, f"unknown setting (known: {', '.join(sorted(fields))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value, name)  # type: ignore[arg-type]
            continue
        raw = None
        if isinstance(value, _Text):
            raw, value = value.raw, value.value
        if key == "routes":
            if not isinstance(value, list):
                raise ConfigError(name, "must be an array of tables ([[routes]])")
            kwargs[key] = [build(RouteConfig, r, f"routes[{i}]") for i, r in enumerate(value)]
            continue
        if key == "endpoints" and cls is OutboxConfig:
            value = _plain(value)
            if not isinstance(value, list):
                raise ConfigError(name, "must be an array of tables ([[outbox.endpoints]])")
            kwargs[key] = [build(OutboxEndpoint, r, f"{name}[{i}]") for i, r in enumerate(value)]
            continue
        if key == "plugins" and cls is Config:
            kwargs[key] = _plugin_tables(value, name)
            continue
        ok, v = _type_ok(value, tp)
        if not ok and raw is not None:
            ok, v = _type_ok(raw, tp)
        if not ok:
            raise ConfigError(name, f"must be {_type_name(tp)}, got {value!r}")
        kwargs[key] = v
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(prefix or "config", str(e)) from None


def _plain(value: Any) -> Any:
    """``value`` with environment / ``--set`` texts replaced by their TOML reading."""
    if isinstance(value, _Text):
        return value.value
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _plugin_tables(value: Any, prefix: str) -> dict[str, dict[str, Any]]:
    """``[plugins.<name>]`` tables: each must be a table; what is inside is free-form."""
    value = _plain(value)
    if not isinstance(value, dict):
        raise ConfigError(prefix, "must be a table of [plugins.<name>] tables")
    for name, table in value.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{prefix}.{name}", "must be a table ([plugins.<name>])")
    return value


def _parse_scalar(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _text(text: str) -> _Text:
    return _Text(text, _parse_scalar(text))


def _set_path(data: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    parts = [p for p in dotted.split(".") if p]
    if not parts:
        raise ConfigError(origin, "empty key")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(dotted, f"{p} is not a section ({origin})")
        node = nxt
    node[parts[-1]] = value


def _env_items(environ: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(variable, dotted key, value) of every ``GATEWAY_*`` setting variable."""
    out = []
    for k, v in environ.items():
        if not k.startswith(ENV_PREFIX) or k in ("GATEWAY_CONFIG", "GATEWAY_APP"):
            continue
        out.append((k, k[len(ENV_PREFIX):].lower().replace("__", "."), v))
    return out


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``GATEWAY_SECTION__KEY=value`` -> {"section": {"key": value}}."""
    out: dict[str, Any] = {}
    for k, dotted, v in _env_items(environ):
        _set_path(out, dotted, _text(v), k)
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def load_config(
    path: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    sets: list[str] | None = None,
) -> Config:
    """Load, merge and validate. ``sets`` are ``section.key=value`` strings (``--set``)."""
    data: dict[str, Any] = {}
    path = path or (environ if environ is not None else os.environ).get("GATEWAY_CONFIG")
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError("config", f"file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("config", f"{path} is not valid TOML: {e}") from None
    env = os.environ if environ is None else environ
    _merge(data, env_overrides(env))
    origins = {dotted: f"environment variable {k}" for k, dotted, _ in _env_items(env)}
    for s in sets or []:
        if "=" not in s:
            raise ConfigError("--set", f"expected section.key=value, got {s!r}")
        k, v = s.split("=", 1)
        _set_path(data, k.strip(), _text(v.strip()), "--set")
        origins[k.strip()] = "--set"
    for k, v in (overrides or {}).items():
        _set_path(data, k, v, "command line")
        origins.pop(k, None)
    try:
        cfg: Config = build(Config, data, "")
        cfg.check()
    except ConfigError as e:
        origin = origins.get(e.key)
        if origin is None:
            # An unknown key inside a section set from the environment names its variable too.
            for dotted, o in origins.items():
                if e.key.startswith(dotted + ".") or dotted.startswith(e.key + "."):
                    origin = o
                    break
        if origin is not None:
            raise ConfigError(e.key, f"{e.message} (from {origin})") from None
        raise
    return cfg
