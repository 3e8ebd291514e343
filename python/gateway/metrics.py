"""Prometheus metrics. Engine counters live in Rust as atomics and are read here at scrape
time by a custom collector: nothing is incremented from Python per delivered message."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector

if TYPE_CHECKING:
    from .app import Gateway

# engine counter -> (metric, help, labels)
_SIMPLE = {
    "tcp_accepted": ("gateway_tcp_accepted_total", "TCP connections accepted"),
    "accept_errors": ("gateway_accept_errors_total", "accept() failures (e.g. out of file descriptors)"),
    "connects": ("gateway_connects_total", "WebSocket upgrades completed"),
    "disconnects": ("gateway_disconnects_total", "WebSocket connections closed"),
    "messages_in": ("gateway_messages_in_total", "Data messages received from clients"),
    "messages_to_app": ("gateway_messages_to_app_total", "Client messages handed to the Python layer"),
    "messages_shed": ("gateway_messages_shed_total", "Client messages shed because the event queue was full"),
    "app_pings": ("gateway_app_pings_total", "Application-level pings answered by the engine"),
    "publishes": ("gateway_room_publishes_total", "Room messages published on this node"),
    "deliveries": ("gateway_deliveries_total", "Frames queued to connections"),
    "deliveries_logical": ("gateway_deliveries_logical_total", "Logical messages delivered (batch members counted)"),
    "frames_out": ("gateway_frames_out_total", "Frames written to sockets"),
    "bytes_in": ("gateway_received_bytes_total", "Bytes read from client sockets"),
    "bytes_out": ("gateway_sent_bytes_total", "Bytes written to client sockets"),
    "writev_calls": ("gateway_writev_calls_total", "Vectored socket writes"),
    "direct_writes": (
        "gateway_direct_writes_total",
        "Socket writes made by a fan-out straight into an idle member's socket (part of writev_calls)",
    ),
    "batches": ("gateway_batches_total", "Merged batch frames built"),
    "deflate_compressions": ("gateway_deflate_compressions_total", "Server messages compressed (shared by recipients)"),
    "pings_sent": ("gateway_ws_pings_sent_total", "WebSocket pings sent to quiet connections"),
    "pongs_coalesced": ("gateway_pongs_coalesced_total", "Pongs replaced by a later one (a client pinging without reading)"),
    "rate_limited": ("gateway_rate_limited_total", "Client messages refused by the per-connection rate limit (limits.client_rate)"),
    "closed_abuse": ("gateway_closed_abuse_total", "Connections closed with 4029 for going on past the rate limit"),
    "read_paused": ("gateway_read_paused_total", "Times a connection's reading paused: its share of the event queue was full"),
    "events_discarded": ("gateway_events_discarded_total", "Queued events of connections that closed before Python took them"),
    "connects_expired": ("gateway_connects_expired_total", "Connect requests dropped before Python: older than auth.deadline"),
    "accept_paused": ("gateway_accept_paused_total", "Times accepting paused at the connection or file-descriptor cap"),
}

#: Refusals by reason: engine counter -> label of gateway_refused_total.
_REFUSED = {
    "conns_refused_node": "conns_node",
    "conns_refused_ip": "conns_ip",
    "handshakes_refused_ip": "handshakes_ip",
    "conns_refused_user": "conns_user",
    "rooms_refused_conn": "rooms_conn",
    "rooms_refused_node": "rooms_node",
}


class EngineCollector:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def collect(self) -> Any:
        gw = self.gw
        eng = gw.engine
        if eng is None:
            return
        c = eng.counters()
        yield GaugeMetricFamily("gateway_connections", "Open WebSocket connections", value=c["connections_current"])
        yield GaugeMetricFamily("gateway_rooms", "Rooms with local members", value=c["rooms_current"])
        yield GaugeMetricFamily("gateway_event_queue_length", "Events waiting for the Python layer", value=c["event_queue_len"])
        yield GaugeMetricFamily("gateway_event_queue_bytes", "Bytes of events waiting for the Python layer", value=c["event_queue_bytes"])
        refused = CounterMetricFamily("gateway_refused", "Connections and joins refused at a limit, by reason", labels=["reason"])
        for key, reason in _REFUSED.items():
            refused.add_metric([reason], c[key])
        yield refused
        for key, (name, doc) in _SIMPLE.items():
            yield CounterMetricFamily(name.removesuffix("_total"), doc, value=c[key])
        yield from _tls(eng, c)
        yield from _media_relay(c)
        hs = CounterMetricFamily("gateway_handshake_failures", "Failed HTTP upgrades by reason", labels=["reason"])
        for reason, key in (("timeout", "handshake_timeout"), ("bad_request", "handshake_bad_request"), ("too_large", "handshake_too_large"), ("not_found", "handshake_not_found"), ("auth_timeout", "connects_auth_timeout")):
            hs.add_metric([reason], c[key])
        yield hs
        rej = CounterMetricFamily("gateway_auth_rejects", "Connections refused by auth or on_connect hooks")
        rej.add_metric([], gw.stats.auth_rejects)
        yield rej
        dc = CounterMetricFamily("gateway_disconnect_reasons", "Disconnects by reason", labels=["reason"])
        for reason, key in (("client", "close_client"), ("protocol_error", "close_protocol_error"), ("too_big", "close_too_big"), ("invalid_utf8", "close_invalid_utf8"), ("idle_timeout", "close_idle"), ("slow_consumer", "close_slow_consumer"), ("server", "close_server"), ("io_error", "close_io_error")):
            dc.add_metric([reason], c[key])
        yield dc
        bc = CounterMetricFamily("gateway_disconnects_by_code", "Disconnects of accepted clients by WebSocket close code (1006: connection lost without a close frame)", labels=["code"])
        for code, n in sorted(gw.stats.disconnects_by_code.items()):
            bc.add_metric([code], n)
        yield bc
        slow = CounterMetricFamily("gateway_slow_consumer_disconnects", "Connections closed as slow consumers (4008)")
        slow.add_metric([], c["close_slow_consumer"])
        yield slow
        drops = CounterMetricFamily("gateway_dropped_messages", "Messages dropped, by reason", labels=["reason", "priority"])
        drops.add_metric(["queue_full", "low"], c["dropped_low"])
        drops.add_metric(["queue_full", "normal"], c["dropped_normal"])
        drops.add_metric(["queue_full", "high"], c["dropped_high"])
        drops.add_metric(["closed", "any"], c["dropped_closed"])
        for reason, n in gw.stats.dropped.items():
            drops.add_metric([reason, "any"], n)
        yield drops
        pub = CounterMetricFamily("gateway_messages_published", "Room messages accepted from clients and the API", labels=["type", "priority"])
        for (mtype, prio), n in gw.stats.published.items():
            pub.add_metric([mtype, str(prio)], n)
        yield pub
        ht = CounterMetricFamily("gateway_hook_timeouts", "Hook calls that timed out", labels=["hook"])
        hc = CounterMetricFamily("gateway_hook_calls", "Hook calls", labels=["hook"])
        for hook, n in gw.stats.hook_timeouts.items():
            ht.add_metric([hook], n)
            hc.add_metric([hook], gw.stats.hook_calls[hook])
        yield ht
        yield hc
        pr = CounterMetricFamily("gateway_plugin_requests", "Client requests answered by plugins' ops (on_request), by outcome", labels=["op", "outcome"])
        for (op, outcome), n in gw.stats.plugin_requests.items():
            pr.add_metric([op, outcome], n)
        yield pr
        be = CounterMetricFamily("gateway_broker_publish_errors", "Broker publishes that failed")
        be.add_metric([], gw.stats.broker_publish_errors)
        yield be
        yield from self._histograms(eng)
        yield from self._top_rooms(eng)
        yield GaugeMetricFamily("gateway_broker_connected", "1 while the broker is usable", value=1 if gw.broker.ready else 0)
        br = CounterMetricFamily("gateway_broker_reconnects", "Broker reconnections (Redis pub/sub)")
        br.add_metric([], gw.broker.stats.reconnects)
        yield br
        te = CounterMetricFamily("gateway_tokens_expired", "Connections closed (4001) because their token expired")
        te.add_metric([], gw.stats.tokens_expired)
        dup = CounterMetricFamily("gateway_publish_duplicates", "Publishes answered from their idempotency key (cid, Idempotency-Key): not published again")
        dup.add_metric([], gw.stats.duplicates)
        yield dup
        yield te
        yield GaugeMetricFamily("gateway_ready", "1 while /readyz answers ready", value=1 if gw.ready else 0)
        yield from _store(gw)
        yield from _outbox(gw)
        yield from _archive_log(gw)


    def _histograms(self, eng: Any) -> Any:
        from .app.plugins import HOOKS
        from .app.stats import HOOK_BUCKETS

        for name, doc in (("fanout_seconds", "Duration of one room fan-out round (queueing to every local member)"),
                          ("flush_lag_seconds", "Lag from publish to the socket write that sent it, sampled per write")):
            buckets, total = eng.histograms()[name]
            h = HistogramMetricFamily(f"gateway_{name}", doc)
            h.add_metric([], [(_le(le), n) for le, n in buckets], sum_value=total)
            yield h
        from .broker.base import LAG_BUCKETS

        bs = self.gw.broker.stats
        cum = _cumulative(LAG_BUCKETS, bs.lag_buckets)
        lag = HistogramMetricFamily("gateway_broker_pubsub_lag_seconds", "Lag of room messages from other nodes, publish to receipt (clocks of two nodes)")
        lag.add_metric([], cum, sum_value=bs.lag_sum)
        yield lag
        st = self.gw.stats
        hd = HistogramMetricFamily("gateway_hook_duration_seconds", "Hook call duration, by hook", labels=["hook"])
        for hook in HOOKS:
            hd.add_metric([hook], _cumulative(HOOK_BUCKETS, st.hook_buckets[hook]), sum_value=st.hook_seconds_sum[hook])
        yield hd

    def _top_rooms(self, eng: Any) -> Any:
        n = self.gw.config.metrics.top_rooms
        members = GaugeMetricFamily("gateway_top_room_members", "Local members of the largest and busiest rooms", labels=["room"])
        rate = GaugeMetricFamily("gateway_top_room_messages_per_second", "Room messages/s over the last presence interval", labels=["room"])
        dps = GaugeMetricFamily("gateway_top_room_deliveries_per_second", "Deliveries/s to local members (messages/s x members)", labels=["room"])
        dropped = CounterMetricFamily("gateway_top_room_dropped", "Deliveries to the room's local members that backpressure did not queue", labels=["room"])
        if n:
            rooms = {r: c for r, c, _u in eng.rooms()}
            rates = self.gw.stats.room_rates
            chosen = set(sorted(rooms, key=rooms.__getitem__, reverse=True)[:n])
            chosen |= set(sorted((r for r in rates if r in rooms), key=rates.__getitem__, reverse=True)[:n])
            for r in chosen:
                members.add_metric([r], rooms[r])
                rate.add_metric([r], rates.get(r, 0.0))
                dps.add_metric([r], rates.get(r, 0.0) * rooms[r])
                dropped.add_metric([r], eng.room_dropped(r))
        yield members
        yield rate
        yield dps
        yield dropped


#: TLS handshake failures: label of gateway_tls_handshake_failures_total -> engine counter.
_TLS_FAILURES = {
    "timeout": "tls_fail_timeout", "client_gone": "tls_fail_eof", "plain_http": "tls_fail_http", "not_tls": "tls_fail_not_tls",
    "protocol_version": "tls_fail_version", "no_shared_params": "tls_fail_params", "alert_received": "tls_fail_alert",
    "alpn": "tls_fail_alpn", "other": "tls_fail_other",
}


def _media_relay(c: dict[str, int]) -> Any:
    """The engine's relay of ``/media/`` requests to the node's media server (zeros when
    it is off, so alerts have a series)."""
    yield CounterMetricFamily("gateway_media_relay_requests", "HTTP requests under the media prefix (relayed or refused)", value=c["media_relay_requests"])
    ref = CounterMetricFamily("gateway_media_relay_refused", "Media requests refused or cut by the engine, by reason", labels=["reason"])
    for reason in ("too_large", "length_required", "bad_request", "busy", "upstream", "timeout", "draining"):
        ref.add_metric([reason], c[f"media_relay_refused_{reason}"])
    yield ref
    yield CounterMetricFamily("gateway_media_relay_client_gone", "Media relays ended because the client went away", value=c["media_relay_client_gone"])
    yield CounterMetricFamily("gateway_media_relay_bytes_in", "Request body bytes relayed from clients to the media server", value=c["media_relay_bytes_in"])
    yield CounterMetricFamily("gateway_media_relay_bytes_out", "Response bytes relayed from the media server to clients", value=c["media_relay_bytes_out"])
    yield GaugeMetricFamily("gateway_media_relay_inflight", "Media relays in progress", value=c["media_relay_inflight_current"])


def _tls(eng: Any, c: dict[str, int]) -> Any:
    """TLS and PROXY-protocol metrics (zeros without TLS, so alerts have a series)."""
    hs = CounterMetricFamily("gateway_tls_handshakes", "TLS handshakes completed, full or resumed (ticket / session id)", labels=["kind"])
    hs.add_metric(["full"], c["tls_handshakes_full"])
    hs.add_metric(["resumed"], c["tls_handshakes_resumed"])
    yield hs
    fails = CounterMetricFamily("gateway_tls_handshake_failures", "TLS handshakes that failed, by reason", labels=["reason"])
    for reason, key in _TLS_FAILURES.items():
        fails.add_metric([reason], c[key])
    yield fails
    errs = CounterMetricFamily("gateway_tls_record_errors", "Established TLS connections closed on a record that failed to decrypt or parse")
    errs.add_metric([], c["tls_errors"])
    yield errs
    rl = CounterMetricFamily("gateway_tls_reloads", "Certificate reloads (SIGHUP or changed files), by result; on error the old certificate stays", labels=["result"])
    rl.add_metric(["ok"], c["tls_reloads_ok"])
    rl.add_metric(["error"], c["tls_reloads_error"])
    yield rl
    info = eng.tls_info()
    if info is not None:
        yield GaugeMetricFamily("gateway_tls_cert_expiry_timestamp_seconds", "notAfter of the served TLS certificate (Unix time)", value=info["not_after"])
    px = CounterMetricFamily("gateway_proxy_protocol_refused", "Connections dropped on a PROXY-protocol listener, by reason", labels=["reason"])
    px.add_metric(["bad_header"], c["proxy_bad_header"])
    px.add_metric(["untrusted_peer"], c["proxy_untrusted"])
    yield px


def _store(gw: Gateway) -> Any:
    """The message store's metrics (only when a route keeps messages)."""
    store = gw.storage.store
    if store is None:
        return
    st = store.stats
    for name, doc, value in (
        ("committed", "Durable messages committed before their ack", st.committed),
        ("archived", "Messages written behind (archive)", st.archived),
        ("archive_dropped", "Archive messages not kept: the backlog (store.max_backlog) was full", st.archive_dropped),
        ("duplicates", "Messages already stored (same cid or seq): nothing written", st.duplicates),
        ("errors", "Failed store transactions", st.errors),
        ("batches", "Store transactions (group commits)", st.batches),
        ("batched_messages", "Messages written by those transactions (batch size = this / batches)", st.batched_messages),
        ("events", "Room events written to the outbox log", st.events),
        ("events_dropped", "Room events not logged for the outbox: the backlog was full or the store closed", st.events_dropped),
    ):
        c = CounterMetricFamily(f"gateway_store_{name}", doc)
        c.add_metric([], value)
        yield c
    yield GaugeMetricFamily("gateway_store_backlog", "Messages waiting to be written (archive queue and commits in flight)", value=store.backlog)
    un = CounterMetricFamily("gateway_store_unavailable", "Durable publishes answered with error 5030: the store could not commit")
    un.add_metric([], gw.stats.store_unavailable)
    yield un
    col = CounterMetricFamily("gateway_store_seq_collisions", "Durable messages numbered again: their seq was already stored by another node (Redis had lost the room)")
    col.add_metric([], gw.stats.seq_collisions)
    yield col
    from .store.base import LATENCY_BUCKETS

    h = HistogramMetricFamily("gateway_store_commit_seconds", "Durable commit latency (queued to committed)")
    h.add_metric([], _cumulative(LATENCY_BUCKETS, st.latency_buckets), sum_value=st.latency_sum)
    yield h


def _outbox(gw: Gateway) -> Any:
    """The outbox's metrics, per endpoint (figures are this node's: the leader delivers)."""
    ob = gw.outbox
    if not ob.enabled:
        return
    yield GaugeMetricFamily("gateway_outbox_leader", "1 while this node delivers the outbox (holds its lease)", value=int(ob.leader))
    delivered = CounterMetricFamily("gateway_outbox_delivered", "Events delivered (2xx) by this node", labels=["endpoint"])
    dead = CounterMetricFamily("gateway_outbox_dead_letters", "Events given up and kept as dead letters", labels=["endpoint"])
    failures = CounterMetricFamily("gateway_outbox_failures", "Failed delivery attempts, by reason", labels=["endpoint", "reason"])
    backlog = GaugeMetricFamily("gateway_outbox_backlog", "Log entries not yet delivered to the endpoint (about; leader only)", labels=["endpoint"])
    lag = GaugeMetricFamily("gateway_outbox_lag_seconds", "Age of the oldest event not yet delivered to the endpoint (leader only)", labels=["endpoint"])
    for ep in ob.endpoints:
        st = ep.stats
        delivered.add_metric([ep.name], st.delivered)
        dead.add_metric([ep.name], st.dead)
        for reason, n in st.failures.items():
            failures.add_metric([ep.name, reason], n)
        if ob.leader:
            backlog.add_metric([ep.name], st.backlog)
            lag.add_metric([ep.name], st.lag)
    yield from (delivered, dead, failures, backlog, lag)


def _archive_log(gw: Gateway) -> Any:
    """The broker's archive log (Redis broker with a store: docs/operations.md, "The
    message store"). Lag and pending are the whole log's, the same on every node (take
    the max across nodes); the counters are this node's (sum them)."""
    st = gw.broker.stats.archive
    if st is None:
        return
    if st.lag >= 0:
        yield GaugeMetricFamily("gateway_archive_log_lag", "Archive log entries no node has read yet (all nodes report the same)", value=st.lag)
        yield GaugeMetricFamily("gateway_archive_log_pending", "Archive log entries read by a node but not yet written and acknowledged (all nodes report the same)", value=st.pending)
    for name, doc, value in (
        ("written", "Archive log entries this node wrote to the store and acknowledged", st.written),
        ("claimed", "Archive log entries this node took over from other nodes (dead or stuck) after broker.archive_claim_after", st.claimed),
    ):
        c = CounterMetricFamily(f"gateway_archive_log_{name}", doc)
        c.add_metric([], value)
        yield c
    err = CounterMetricFamily("gateway_archive_log_errors", "Failed archive log rounds on this node (each retried), by what failed", labels=["kind"])
    for kind, n in sorted(st.errors.items()):
        err.add_metric([kind], n)
    yield err
    lost = CounterMetricFamily("gateway_archive_log_lost", "Archive log entries that will never be stored, by reason (trimmed: broker.archive_maxlen was reached)", labels=["reason"])
    for reason, n in sorted(st.lost.items()):
        lost.add_metric([reason], n)
    yield lost


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (the last one above every bound) as Prometheus's cumulative
    ``(le, count)`` pairs."""
    acc = 0
    cum: list[tuple[str, float]] = []
    for le, n in zip((*bounds, float("inf")), counts, strict=False):
        acc += n
        cum.append((_le(le), acc))
    return cum


def _le(v: float) -> str:
    return "+Inf" if v == float("inf") else repr(float(v))


def make_registry(gw: Gateway) -> CollectorRegistry:
    """The registry served at ``/metrics``: the engine and app collector, the process
    collector, and whatever plugins add (``Gateway.metrics_registry``)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(EngineCollector(gw))
    ProcessCollector(namespace="gateway", registry=reg)
    return reg


def render(gw: Gateway) -> tuple[bytes, str]:
    return generate_latest(gw.metrics_registry), CONTENT_TYPE_LATEST
