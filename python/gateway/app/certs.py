"""The TLS certificate at run time: reload on SIGHUP and when the files change, warn as the
certificate nears its end. The engine loads and serves it; this module only decides when.

A reload that fails (a bad PEM, a key that does not match, an expired certificate) keeps
the certificate being served and logs why; either way it is counted in
``gateway_tls_reloads_total{result}``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .._core import CertInfo, Engine
    from ..config import TlsConfig

__all__ = ["EXPIRY_WARNING", "CertWatcher", "expiry_problem"]

log = logging.getLogger("gateway")

#: A certificate this close to its notAfter is warned about (and alerted on, see
#: deploy/prometheus/alerts.yml).
EXPIRY_WARNING = 14 * 86400.0
#: How often the expiry is checked again while running.
_EXPIRY_CHECK = 3600.0


def expiry_problem(info: Mapping[str, Any], now: float | None = None) -> str | None:
    """A warning for a certificate that expired or expires within 14 days, else None."""
    left = info["not_after"] - (time.time() if now is None else now)
    if left <= 0:
        return f"the TLS certificate ({info['subject']}, serial {info['serial']}) has expired: clients refuse it"
    if left < EXPIRY_WARNING:
        return f"the TLS certificate ({info['subject']}, serial {info['serial']}) expires in {left / 86400:.1f} days"
    return None


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class CertWatcher:
    """Reloads the engine's certificate when asked (SIGHUP) or when its files change."""

    def __init__(self, engine: Engine, config: TlsConfig) -> None:
        self._engine = engine
        self._config = config
        self._stamps = self._read_stamps()

    def _read_stamps(self) -> tuple[Any, ...]:
        return (_stamp(self._config.cert_file), _stamp(self._config.key_file))

    def reload(self, why: str) -> bool:
        """Load the files again for new connections; open connections keep theirs."""
        from .. import _core

        self._stamps = self._read_stamps()
        try:
            info = self._engine.reload_tls()
        except _core.TlsError as e:
            key, message = e.args
            log.error("TLS certificate reload (%s) failed, still serving the previous certificate: %s: %s", why, key, message)
            return False
        log.info("TLS certificate reloaded (%s): %s, serial %s, valid until %s", why, info["subject"], info["serial"], _iso(info["not_after"]))
        self.warn_expiry(info)
        return True

    def warn_expiry(self, info: CertInfo | None = None) -> None:
        info = info if info is not None else self._engine.tls_info()
        problem = expiry_problem(info) if info else None
        if problem:
            log.warning("%s (server.tls.cert_file = %s)", problem, self._config.cert_file)

    async def run(self) -> None:
        """Poll the files every ``watch_interval`` s (0: never) and warn about the expiry
        hourly. Polling, not inotify: it works the same for a Kubernetes Secret volume
        (an atomic symlink swap) and a certbot renewal, and costs two stat() calls."""
        interval = self._config.watch_interval
        next_expiry = time.monotonic() + _EXPIRY_CHECK
        while True:
            await asyncio.sleep(interval if interval > 0 else _EXPIRY_CHECK)
            if interval > 0 and self._read_stamps() != self._stamps:
                # A renewal may write the two files one after the other: give the second a moment.
                await asyncio.sleep(min(1.0, interval))
                self.reload("files changed")
            if time.monotonic() >= next_expiry:
                next_expiry = time.monotonic() + _EXPIRY_CHECK
                self.warn_expiry()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
