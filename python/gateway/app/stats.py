"""Python-side counters of one node, exported by :mod:`gateway.metrics`.

Counted per control event (a connect, a request, a hook call), never per delivered
message: deliveries are counted in the engine.
"""

from __future__ import annotations

import bisect

from ..protocol.codes import CloseCode, ErrorCode
from .plugins import HOOKS

__all__ = ["HOOK_BUCKETS", "KNOWN_CLOSE_CODES", "Stats"]

#: Close codes reported under their own label in ``gateway_disconnects_by_code_total``;
#: codes nobody here sends or documents are folded into "other" (a bounded label set).
KNOWN_CLOSE_CODES = frozenset({*(int(c) for c in CloseCode), 1003, 1005, 1006, 1013})

#: Upper bounds (seconds) of the hook duration histogram buckets.
HOOK_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0)

#: ``Stats.dropped`` reason per error code.
_DROP_REASON: dict[int, str] = {
    ErrorCode.RATE_LIMITED: "rate_limit",
    ErrorCode.MUTED: "mute",
    ErrorCode.TOO_LARGE: "too_large",
    ErrorCode.FORBIDDEN: "forbidden",
}


class Stats:
    """Python-side counters, exported as metrics."""

    def __init__(self) -> None:
        self.hook_calls: dict[str, int] = dict.fromkeys(HOOKS, 0)
        self.hook_timeouts: dict[str, int] = dict.fromkeys(HOOKS, 0)
        self.hook_errors: dict[str, int] = dict.fromkeys(HOOKS, 0)
        #: Hook durations: cumulative-free bucket counts per hook (see HOOK_BUCKETS) and sums.
        self.hook_buckets: dict[str, list[int]] = {h: [0] * (len(HOOK_BUCKETS) + 1) for h in HOOKS}
        self.hook_seconds_sum: dict[str, float] = dict.fromkeys(HOOKS, 0.0)
        #: Room messages delivered on this node per room since the last presence tick, and
        #: the resulting messages/s (for the top-rooms view).
        self.room_messages: dict[str, int] = {}
        self.room_rates: dict[str, float] = {}
        #: Disconnects of accepted clients by close code (label), see KNOWN_CLOSE_CODES.
        self.disconnects_by_code: dict[str, int] = {}
        self.auth_rejects = 0
        self.errors_sent: dict[int, int] = {}
        self.published: dict[tuple[str, int], int] = {}
        self.dropped: dict[str, int] = {"rate_limit": 0, "mute": 0, "filter": 0, "forbidden": 0, "too_large": 0}
        #: Publishes answered from the idempotency record (a retried ``cid`` / key).
        self.duplicates = 0
        self.broker_publish_errors = 0
        #: Durable publishes refused because the store could not commit them (error 5030).
        self.store_unavailable = 0
        #: Kept messages whose seq was already stored by another node (republished).
        self.seq_collisions = 0
        self.tokens_expired = 0
        #: Plugin ops answered, by (op, outcome): ok, rejected, timeout, error.
        self.plugin_requests: dict[tuple[str, str], int] = {}

    def observe_hook(self, hook: str, seconds: float) -> None:
        self.hook_buckets[hook][bisect.bisect_left(HOOK_BUCKETS, seconds)] += 1
        self.hook_seconds_sum[hook] += seconds

    def count_drop(self, code: int) -> None:
        key = _DROP_REASON.get(code)
        if key:
            self.dropped[key] += 1

    def count_disconnect(self, code: int) -> None:
        label = str(code) if code in KNOWN_CLOSE_CODES else "other"
        by_code = self.disconnects_by_code
        by_code[label] = by_code.get(label, 0) + 1
