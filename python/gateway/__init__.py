"""Live-room WebSocket gateway: a Rust connection engine (``gateway._core``) driven by a
thin Python layer where backend teams write auth, routing rules, hooks and plugins."""

from __future__ import annotations

__all__ = ["__version__"]
__version__ = "0.1.0"
