"""Command line: ``gateway run`` (also ``python -m gateway run``).

``gateway run`` with no arguments serves the embedded default: one node, in memory, no
Redis, clients on :8080 (WebSocket at /ws, demo page at /), the internal API on
127.0.0.1:8081. Without a config file and without auth settings, authentication is in
``dev`` mode (``?user=<id>`` is trusted) so the demo works out of the box.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import sys
from typing import Any

from .auth import ConfigError
from .config import Config, load_config

log = logging.getLogger("gateway")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gateway",
        description="WebSocket gateway for live-stream chat rooms (Rust engine, Python hooks).",
        epilog="Environment: GATEWAY_CONFIG=path, GATEWAY_<SECTION>__<KEY>=value (e.g. GATEWAY_SERVER__PORT=9000). "
        "See docs/operations.md for every setting.",
    )
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    run = sub.add_parser("run", help="run the gateway", description="Run the gateway until SIGINT/SIGTERM, then drain gracefully.")
    run.add_argument("--config", "-c", metavar="FILE", help="TOML config file (default: $GATEWAY_CONFIG, else built-in defaults)")
    run.add_argument("--app", metavar="MODULE:ATTR", help="load a Gateway object (or a factory returning one) from your code, like uvicorn")
    run.add_argument("--host", help="client listener address (server.host), '::' for IPv6 + IPv4")
    run.add_argument("--port", type=int, help="client listener port (server.port, default 8080)")
    run.add_argument("--api-host", help="internal API address (api.host, default 127.0.0.1)")
    run.add_argument("--api-port", type=int, help="internal API port (api.port, default 8081)")
    run.add_argument("--workers", type=int, help="worker processes sharing the port (server.workers; >1 needs broker.kind=redis)")
    run.add_argument("--threads", type=int, help="engine I/O threads per process (server.threads, 0 = CPU count)")
    run.add_argument("--broker", choices=["memory", "redis"], help="broker.kind")
    run.add_argument("--redis-url", help="broker.url, e.g. redis://127.0.0.1:6379/0")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log.level")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any setting, e.g. --set limits.queue_bytes=524288 (repeatable)")
    check = sub.add_parser("check-config", help="validate a config file and print the result")
    check.add_argument("--config", "-c", metavar="FILE")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    token = sub.add_parser("token", help="mint an HS256 test token for a user (uses auth.secret)")
    token.add_argument("user")
    token.add_argument("--config", "-c", metavar="FILE")
    token.add_argument("--ttl", type=int, default=3600)
    token.add_argument("--rooms", nargs="*", help="room patterns for the rooms claim")
    return p


def _overrides(a: argparse.Namespace) -> dict[str, Any]:
    pairs = {
        "server.host": a.host, "server.port": a.port, "api.host": a.api_host, "api.port": a.api_port,
        "server.workers": a.workers, "server.threads": a.threads, "broker.kind": a.broker,
        "broker.url": a.redis_url, "log.level": a.log_level,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def _embedded_default(a: argparse.Namespace) -> dict[str, Any]:
    """No config file and no auth settings anywhere: the demo's dev auth."""
    has_file = bool(getattr(a, "config", None) or os.environ.get("GATEWAY_CONFIG"))
    has_auth = any(k.startswith("GATEWAY_AUTH__") for k in os.environ) or any(s.startswith("auth.") for s in a.set)
    return {} if has_file or has_auth else {"auth.mode": "dev"}


def load_app(spec: str, config: Config) -> Any:
    """Import ``module:attr``; a callable taking the config (or nothing) is called."""
    from .app import Gateway

    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ConfigError("--app", f"expected module:attr, got {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError("--app", f"cannot load {spec}: {e}") from None
    if isinstance(obj, Gateway):
        return obj
    if callable(obj):
        # Call with the config when the factory takes an argument. Not "try with, retry
        # without on TypeError": that would hide TypeErrors raised inside the factory.
        try:
            params = inspect.signature(obj).parameters.values()
            takes_config = any(
                p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params
            )
        except (TypeError, ValueError):  # no signature (some builtins): try with the config
            takes_config = True
        gw = obj(config) if takes_config else obj()
        if isinstance(gw, Gateway):
            return gw
    raise ConfigError("--app", f"{spec} is not a Gateway or a factory returning one")


def main(argv: list[str] | None = None) -> int:
    from .logs import setup_logging

    a = _parser().parse_args(argv)
    if a.cmd is None:
        _parser().print_help()
        return 2
    try:
        if a.cmd == "check-config":
            cfg = load_config(a.config, sets=a.set)
            print(f"ok: {len(cfg.routes)} routes, broker={cfg.broker.kind}, auth={cfg.auth.mode}")
            return 0
        if a.cmd == "token":
            from .auth import mint_token

            cfg = load_config(a.config)
            if not cfg.auth.secret:
                raise ConfigError("auth.secret", "needed to mint a token")
            claims = {"rooms": a.rooms} if a.rooms else {}
            print(mint_token(cfg.auth.secret, a.user, ttl=a.ttl, **claims))
            return 0
        overrides = {**_embedded_default(a), **_overrides(a)}
        cfg = load_config(a.config, overrides=overrides, sets=a.set)
    except ConfigError as e:
        print(f"gateway: configuration error: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log.level, cfg.log.json)
    if cfg.server.workers > 1:
        try:
            from .supervisor import supervise  # type: ignore[import-not-found]
        except ImportError:
            print("gateway: configuration error: server.workers: several worker processes are not available in this build yet", file=sys.stderr)
            return 2
        return supervise(cfg, a)  # type: ignore[no-any-return]
    try:
        if a.app:
            gw = load_app(a.app, cfg)
        else:
            from .app import Gateway

            gw = Gateway(cfg)
    except ConfigError as e:
        print(f"gateway: configuration error: {e}", file=sys.stderr)
        return 2
    try:
        gw.run()
    except ConfigError as e:  # raised by a plugin's setup() (e.g. its [plugins.<name>] table)
        print(f"gateway: configuration error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
    except Exception as e:  # EngineError: bind failures and the like
        if type(e).__name__ == "EngineError":
            log.error("cannot start: %s", e)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
