"""The demo page served at ``/`` by the engine (no Python per request)."""

from __future__ import annotations

from importlib import resources


def static_files(ws_path: str) -> dict[str, tuple[str, bytes]]:
    """Path -> (content type, body) for the engine's static file table."""
    page = resources.files("gateway").joinpath("static/index.html").read_bytes()
    page = page.replace(b"__WS_PATH__", ws_path.encode())
    return {"/": ("text/html; charset=utf-8", page), "/index.html": ("text/html; charset=utf-8", page)}
