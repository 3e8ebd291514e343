"""Every exception the gateway raises on purpose, in one place.

Plugins raise :class:`Reject`; configuration problems are :class:`ConfigError` (its
``key`` names the setting); the rest are raised by the gateway and caught where they
turn into an error frame, a close code or an HTTP status (``docs/protocol.md``).
"""

from __future__ import annotations

from .protocol.codes import ErrorCode

__all__ = ["AuthError", "ConfigError", "HookTimeout", "NotRunning", "Reject"]


class ConfigError(ValueError):
    """An invalid configuration value.

    ``key`` is the dotted name of the offending setting (e.g. ``"auth.secret"``), so the
    operator can find it; ``str(err)`` is ``"<key>: <message>"``.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class Reject(Exception):
    """Raise from a hook to refuse: the client gets an error frame with ``code``
    (or, from ``on_connect``, the upgrade is refused with HTTP ``status``)."""

    def __init__(self, code: int = ErrorCode.REJECTED, message: str = "rejected", status: int = 403) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message
        self.status = status


class AuthError(Exception):
    """Refusal of a connection during the upgrade.

    ``status`` is the HTTP status to answer with (``401`` bad or missing credentials,
    ``403`` forbidden, ``503`` a hook timed out); ``reason`` is short and safe to show to
    the client (it never contains the token).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class NotRunning(RuntimeError):
    """The gateway is not started (or already stopped)."""


class HookTimeout(Exception):
    """An async hook did not finish within ``hooks.timeout``."""
