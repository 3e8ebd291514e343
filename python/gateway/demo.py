"""The pages served by the engine (no Python per request): the demo at ``/``, the
customer-service desk's agent console at ``/console`` and its shopper page at ``/shop``
(all built by ``clients/js/build.mjs`` with the JS SDK inlined)."""

from __future__ import annotations

from importlib import resources

#: URL paths -> the built page in ``gateway/static``.
PAGES = {
    "/": "index.html",
    "/index.html": "index.html",
    "/console": "console.html",
    "/console.html": "console.html",
    "/shop": "shop.html",
    "/shop.html": "shop.html",
}


def static_files(ws_path: str) -> dict[str, tuple[str, bytes]]:
    """Path -> (content type, body) for the engine's static file table."""
    static = resources.files("gateway").joinpath("static")
    bodies: dict[str, bytes] = {}
    out: dict[str, tuple[str, bytes]] = {}
    for path, name in PAGES.items():
        if name not in bodies:
            bodies[name] = static.joinpath(name).read_bytes().replace(b"__WS_PATH__", ws_path.encode())
        out[path] = ("text/html; charset=utf-8", bodies[name])
    return out
