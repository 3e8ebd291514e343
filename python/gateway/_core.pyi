"""Type stubs and contract of the compiled engine (rust/gateway-py).

The engine owns every client socket on its own threads and never takes the GIL there.
Python drives it with the non-blocking methods below and drains events in batches:

    loop.add_reader(engine.fd, on_readable)
    def on_readable():
        events, more = engine.poll(1024)
        ...                      # handle each event tuple
        if more: loop.call_soon(on_readable)
"""

from typing import Final, TypedDict, final

__all__ = ["EV_CLOSED", "EV_CONNECT", "EV_MESSAGE", "PRIO_HIGH", "PRIO_LOW", "PRIO_NORMAL", "Engine", "EngineError", "TlsError", "__version__", "check_tls", "raise_fd_limit"]

EV_CONNECT: Final[int]
"""``(EV_CONNECT, conn, peer, path, query, headers, protocols)``: an upgrade waits for
:meth:`Engine.accept` or :meth:`Engine.reject` (within ``auth_deadline``, else 503;
connects that waited longer are dropped at poll, counter ``connects_expired``)."""
EV_MESSAGE: Final[int]
"""``(EV_MESSAGE, conn, data: bytes, binary: bool)``: a client data message. Application
pings (``{"op":"ping"}``) never arrive here: the engine answers them. Messages over the
connection's rate limit or shed by a full queue never arrive either: the engine answers
them with an error frame 4029 (``"rate limited"`` / ``"overloaded"``). Messages of a
connection that is gone are dropped at poll."""
EV_CLOSED: Final[int]
"""``(EV_CLOSED, conn, code, reason, rooms: list[str], user: str | None)``: the connection
is gone (1006 when the TCP connection just vanished); ``rooms`` it was still in."""
PRIO_LOW: Final[int]
PRIO_NORMAL: Final[int]
PRIO_HIGH: Final[int]
__version__: Final[str]

_ConnectEvent = tuple[int, int, str, str, str, list[tuple[str, str]], list[str]]
_MessageEvent = tuple[int, int, bytes, bool]
_ClosedEvent = tuple[int, int, int, str, list[str], str | None]
_Event = _ConnectEvent | _MessageEvent | _ClosedEvent

class EngineError(Exception):
    """Raised when the engine cannot do what was asked (bind failed, already started)."""

def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard limit; returns ``(soft, hard)``."""

class TlsError(ValueError):
    """A certificate or key that cannot be served; ``args == (config_key, message)``, the
    key being ``server.tls.cert_file`` or ``server.tls.key_file``."""

class CertInfo(TypedDict):
    not_after: int
    not_before: int
    serial: str
    subject: str
    chain_len: int

def check_tls(cert_file: str, key_file: str) -> CertInfo:
    """Check a PEM chain and key as the engine loads them: readable, an unexpired X.509
    leaf, a supported key (RSA, ECDSA, Ed25519) that matches it. Raises TlsError."""

@final
class Engine:
    """The connection engine. Keyword arguments (all optional) are named after their config
    keys, ``<section>_<key>`` (``limits.queue_bytes`` -> ``limits_queue_bytes``); the engine
    only converts types (unknown keyword -> TypeError, wrong type -> TypeError, out of
    the type's range -> ValueError/OverflowError); ``Config.check()`` validates ranges.

    server_host ("0.0.0.0"; "::" = IPv6 + IPv4), server_port (8080; 0 = any free port),
    server_reuse_port (False), server_backlog (4096), server_io_threads (0 = CPU count),
    server_ws_path ("/ws"; "" = any), server_health_path ("/healthz"),
    server_proxy_protocol (False), server_trusted_proxies ([] CIDRs), server_tls_cert_file
    and server_tls_key_file ("" = no TLS listener; a bad pair raises EngineError naming
    the key), server_tls_host ("" = server_host), server_tls_port (8443; 0 = any free
    port), server_tls_proxy_protocol (False),
    limits_handshake_timeout (5.0 s), auth_deadline (5.0 s: then HTTP 503),
    limits_max_headers (64), limits_max_header_bytes (8192), limits_max_frame_bytes (65536),
    limits_max_message_bytes (65536), deflate_enabled (True), deflate_min_size (128),
    deflate_level (5), deflate_client_max_window_bits (15), heartbeat_idle_timeout (90.0 s),
    heartbeat_interval (30 s), heartbeat_ws_ping (True: WebSocket pings after
    heartbeat_interval of silence), limits_queue_bytes (1 MiB per connection, replies
    included), limits_socket_send_buffer (0 = kernel autotuning), limits_fanout_chunk
    (1024), limits_event_queue (1048576 events), limits_event_queue_bytes (64 MiB: client
    messages over it are shed with error 4029 "overloaded"), limits_conn_event_bytes
    (256 KiB: a connection over it is not read until its events are polled),
    limits_client_rate (50.0 msgs/s; 0 = unlimited), limits_client_burst (100; also the
    refusals in a row that close with 4029), limits_max_conns (100000 sockets, at most the
    open-files limit minus limits_reserved_fds (256): HTTP 503), limits_max_conns_per_ip
    (10000: HTTP 429), limits_max_handshakes_per_ip (1000: HTTP 429),
    limits_max_conns_per_user (10: checked by accept, HTTP 429), limits_max_rooms_per_conn
    (100), limits_max_rooms (100000). Engine-only: static_files ({path: (content_type,
    body)}), app_ping (True), close_timeout (2.0 s).

    Media relay (off by default; checked at construction, a bad value raises EngineError
    naming its key): media_prefix ("" = off; e.g. "/media/": every HTTP request whose path
    starts with it, any method, is relayed before the other plain-HTTP answers),
    media_upstream ("ip:port" of the HTTP server on loopback), media_secret (sent as
    X-Gateway-Media-Secret; visible ASCII), media_max_body (104857600 bytes: a larger
    Content-Length gets 413 before the body is read; chunked gets 411), media_timeout
    (300.0 s for the whole exchange), media_idle_timeout (30.0 s without a byte either
    way), media_max_inflight (64 relays at once: then 503), media_rate and
    media_node_rate (request-body bytes per second read per relay and by all relays
    together; 0 = no limit; a relay over budget waits before its next read, so TCP
    slows the client). The upstream gets the client's
    request line and end-to-end headers (hop-by-hop ones, Expect, and any client-sent
    X-Gateway-Media-Secret, X-Forwarded-For/-Proto/-Host, X-Real-IP, Forwarded, Via
    removed) plus X-Gateway-Media-Secret, X-Forwarded-For (the client's address as the
    engine determined it), X-Forwarded-Proto and Connection: close; one request per
    connection. The engine's own refusals are JSON {"error", "code"}: 400/411
    bad_request, 413 too_large (+ "limit"), 503 busy (draining, media_max_inflight; with
    Retry-After: 1), 502 busy (upstream unreachable or closed without an answer), 408
    timeout (the client stalled), 504 timeout (the upstream stalled); a timeout after
    the answer started cuts the connection.
    """

    def __init__(self, **kwargs: object) -> None: ...
    def start(self) -> tuple[str, int]:
        """Bind and serve; returns the bound (host, port). Raises EngineError."""
    @property
    def tls_address(self) -> tuple[str, int] | None:
        """(host, port) of the TLS listener once started; None without TLS."""
    def tls_info(self) -> CertInfo | None:
        """The certificate served to new connections; None without TLS."""
    def reload_tls(self) -> CertInfo:
        """Re-read the certificate and key files for new connections (open ones keep
        theirs). Raises TlsError and keeps the current certificate on failure."""
    @property
    def fd(self) -> int:
        """eventfd that becomes readable when events wait (only on empty -> non-empty)."""
    @property
    def running(self) -> bool: ...
    @property
    def draining(self) -> bool: ...
    @property
    def connections(self) -> int: ...
    def poll(self, max: int = ...) -> tuple[list[_Event], bool]:
        """Take up to ``max`` events; the bool says more are waiting (call again soon)."""
    def accept(self, conn: int, user: str | None = ..., meta: str | None = ..., protocol: str | None = ..., first: bytes | None = ...) -> bool:
        """Complete a pending upgrade. ``meta`` is JSON text returned by member listings,
        ``protocol`` the Sec-WebSocket-Protocol to echo, ``first`` the first text frame.
        False if the connect is no longer pending (deadline passed, client gone), or when
        ``user`` has ``limits_max_conns_per_user`` connections already: the upgrade is then
        refused with HTTP 429 (counter ``conns_refused_user``)."""
    def reject(self, conn: int, status: int = ..., reason: str = ...) -> bool:
        """Refuse a pending upgrade with an HTTP 4xx/5xx status."""
    def send(self, conn: int, data: bytes, priority: int = ..., binary: bool = ...) -> bool:
        """Queue one message to one connection; False if unknown, closing or dropped."""
    def send_user(self, user: str, data: bytes, priority: int = ...) -> int:
        """Queue to every local connection of ``user``; returns how many."""
    def publish(self, room: str, data: bytes, priority: int = ...) -> int:
        """Encode once, queue a shared reference to every local member in publish order
        (merged into batch frames when the room has a merge window). Never blocks on a
        member. Returns the member count."""
    def broadcast(self, data: bytes, priority: int = ...) -> int:
        """Queue to every local connection."""
    def join(self, conn: int, room: str, cap: int | None = None) -> int:
        """1 joined, 0 already a member, -1 no such (or closing) connection, -2 the
        connection is in ``cap`` rooms (default ``limits_max_rooms_per_conn``; the app
        passes more for connections it attached conversations to), -3 the room is new
        and the node has ``limits_max_rooms`` rooms."""
    def is_member(self, conn: int, room: str) -> bool:
        """Whether ``conn`` is in ``room`` (cheap: no list is built)."""
    def leave(self, conn: int, room: str) -> bool: ...
    def set_room_options(self, prefix: str, merge_ms: int = ..., merge_max: int = ...) -> None:
        """Merge window for rooms whose name starts with ``prefix`` (rooms created later)."""
    def room_dropped(self, room: str) -> int:
        """Deliveries to the room's local members that backpressure did not queue."""
    def room_counts(self, room: str) -> tuple[int, int]:
        """(connections, distinct users) of ``room`` on this node, exact."""
    def room_members(self, room: str, offset: int = ..., limit: int = ...) -> list[tuple[int, str | None, str | None]]:
        """Paged (conn, user, meta) of local members."""
    def rooms(self) -> list[tuple[str, int, int]]:
        """(room, connections, users) for every local room."""
    def conn_rooms(self, conn: int) -> list[str] | None: ...
    def user_conns(self, user: str) -> list[int]: ...
    def disconnect(self, conn: int, code: int = ..., reason: str = ...) -> bool:
        """Close after flushing what is queued. Codes: 1000, 1001, 1008, 1011-1013, 3000-4999."""
    def disconnect_user(self, user: str, code: int = ..., reason: str = ...) -> int: ...
    def counters(self) -> dict[str, int]:
        """Snapshot of the engine's atomic counters (see gateway.metrics). Media relay:
        media_relay_requests, media_relay_refused_{too_large,length_required,bad_request,
        busy,upstream,timeout,draining}, media_relay_client_gone, media_relay_bytes_in
        (request body bytes passed to the upstream), media_relay_bytes_out (response bytes
        passed to the client), media_relay_inflight_current (gauge)."""
    def histograms(self) -> dict[str, tuple[list[tuple[float, int]], float]]:
        """``fanout_seconds`` (one room fan-out round) and ``flush_lag_seconds`` (publish
        to socket write, sampled per write): cumulative ``(le, count)`` buckets ending
        with ``+Inf``, and the sum in seconds."""
    def drain(self, code: int = ..., reason: str = ..., last: bytes | None = ...) -> int:
        """Stop accepting (health -> 503) and close every connection with ``code``, after
        the optional ``last`` frame. Returns how many were asked to close."""
    def wait_closed(self, timeout: float) -> int:
        """Block (GIL released) until no connection is left or timeout; returns those left."""
    def stop(self, code: int = ..., reason: str = ..., timeout: float = ...) -> int:
        """Drain, wait up to ``timeout``, shut the runtime down. Returns connections dropped."""
