"""Command line: ``gateway run`` (also ``python -m gateway run``).

``gateway run --dev`` serves the embedded default for a local demo: one node, in memory,
no Redis, clients on 127.0.0.1:8080 (WebSocket at /ws, demo page at /), the internal API
on 127.0.0.1:8081, and ``dev`` authentication (``?user=<id>`` is trusted). Without
``--dev`` the gateway verifies JWTs and refuses to start without a key (``auth.secret``
or ``auth.public_key_file``). ``run`` and ``check-config`` load and check the
configuration through the same code (:func:`resolve_config`).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import sys
import time
from typing import Any

from ._core import EngineError
from .config import Config, load_config
from .errors import ConfigError
from .store.base import SchemaError, StoreUnavailable

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
    run.add_argument("--tls-cert", metavar="PEM", help="certificate chain for wss:// (server.tls.cert_file)")
    run.add_argument("--tls-key", metavar="PEM", help="its private key (server.tls.key_file)")
    run.add_argument("--tls-port", type=int, help="wss:// listener port (server.tls.port, default 8443)")
    run.add_argument("--api-host", help="internal API address (api.host, default 127.0.0.1)")
    run.add_argument("--api-port", type=int, help="internal API port (api.port, default 8081)")
    run.add_argument("--workers", type=int, help="worker processes sharing the port (server.workers; >1 needs broker.kind=redis)")
    run.add_argument("--io-threads", "--threads", dest="io_threads", type=int, help="engine I/O threads per process (server.io_threads, 0 = CPU count)")
    run.add_argument("--broker", choices=["memory", "redis"], help="broker.kind")
    run.add_argument("--redis-url", help="broker.url, e.g. redis://127.0.0.1:6379/0")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log.level")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any setting, e.g. --set limits.queue_bytes=524288 (repeatable)")
    run.add_argument("--dev", action="store_true", help="local demo: dev authentication (?user=<id> is trusted) on 127.0.0.1 unless a host is set")
    check = sub.add_parser("check-config", help="validate the configuration `run` would use (same arguments) and print a summary")
    for action in run._actions:
        if action.dest not in ("help", "app"):
            check._add_action(action)
    mig = sub.add_parser(
        "migrate", help="create or upgrade the message store's schema (store.kind = postgres)",
        description="Bring the store's database to the schema this gateway needs and print its version. Safe to run on "
        "several nodes at once and while they serve: each step runs once, in its own transaction, under an advisory lock. "
        "Exit status 2 when the database cannot be reached or its schema is newer than this gateway's.",
    )
    mig.add_argument("--config", "-c", metavar="FILE", help="TOML config file (default: $GATEWAY_CONFIG); its [store] section is used")
    mig.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any setting, e.g. --set store.dsn=postgresql://... (repeatable)")
    mig.add_argument("--dsn", help="the PostgreSQL database, postgresql://user@host:port/db (store.dsn; default: [store] dsn, $GATEWAY_STORE__DSN)")
    token = sub.add_parser("token", help="mint an HS256 test token for a user (uses auth.secret)")
    token.add_argument("user")
    token.add_argument("--config", "-c", metavar="FILE")
    token.add_argument("--ttl", type=int, default=3600)
    token.add_argument("--rooms", nargs="*", help="room patterns for the rooms claim")
    return p


def _overrides(a: argparse.Namespace) -> dict[str, Any]:
    pairs = {
        "server.host": a.host, "server.port": a.port, "api.host": a.api_host, "api.port": a.api_port,
        "server.workers": a.workers, "server.io_threads": a.io_threads, "broker.kind": a.broker,
        "broker.url": a.redis_url, "log.level": a.log_level,
        "server.tls.cert_file": a.tls_cert, "server.tls.key_file": a.tls_key, "server.tls.port": a.tls_port,
    }
    out = {k: v for k, v in pairs.items() if v is not None}
    if a.dev:
        out["auth.mode"] = "dev"
    return out


def _host_given(a: argparse.Namespace, path: str | None) -> bool:
    """Whether the listener address was chosen anywhere (flag, --set, environment, file)."""
    if a.host is not None or any(s.split("=", 1)[0].strip() == "server.host" for s in a.set) or "GATEWAY_SERVER__HOST" in os.environ:
        return True
    if path:
        import tomllib

        try:
            with open(path, "rb") as f:
                return "host" in tomllib.load(f).get("server", {})
        except (OSError, tomllib.TOMLDecodeError):
            return False  # load_config reports it
    return False


def resolve_config(a: argparse.Namespace) -> Config:
    """The configuration ``run`` (and ``check-config``) uses: file, environment, flags.
    ``--dev`` listens on 127.0.0.1 unless an address was chosen."""
    path = a.config or os.environ.get("GATEWAY_CONFIG")
    overrides = _overrides(a)
    if a.dev and not _host_given(a, path):
        overrides["server.host"] = "127.0.0.1"
    cfg = load_config(path, overrides=overrides, sets=a.set)
    # The certificate is part of the configuration: a missing file, a bad PEM, a key that
    # does not match or an expired certificate fail here, naming the key.
    cfg.tls_certificate()
    return cfg


def store_settings(a: argparse.Namespace) -> dict[str, Any]:
    """The ``[store]`` settings ``migrate`` uses: the file's ``[store]`` table,
    ``GATEWAY_STORE__*``, ``--set store.*``, then ``--dsn``. Only this section is read:
    migrating needs no auth secret or listener settings."""
    import tomllib

    path = a.config or os.environ.get("GATEWAY_CONFIG")
    out: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                out.update(tomllib.load(f).get("store", {}))
        except FileNotFoundError:
            raise ConfigError("config", f"file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("config", f"{path} is not valid TOML: {e}") from None
    out.update({k[len("GATEWAY_STORE__"):].lower(): v for k, v in os.environ.items() if k.startswith("GATEWAY_STORE__")})
    for item in a.set:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError("--set", f"expected section.key=value, got {item!r}")
        if key.strip().startswith("store."):
            out[key.strip()[len("store."):]] = value.strip()
    if a.dsn:  # says which store, too
        out["dsn"] = a.dsn
        out["kind"] = "postgres"
    return out


def migrate(a: argparse.Namespace) -> int:
    """``gateway migrate``: bring the store's schema to this gateway's version."""
    import asyncio

    from .store.base import SchemaError, Store, StoreUnavailable

    s = store_settings(a)
    kind = s.get("kind") or ("postgres" if s.get("dsn") else "sqlite")
    store: Store
    if kind == "postgres":
        if not s.get("dsn"):
            raise ConfigError("store.dsn", "not set (--dsn, [store] dsn or GATEWAY_STORE__DSN)")
        try:
            from .store.postgres import PostgresStore
        except ImportError as e:  # the optional dependency
            raise ConfigError("store.kind", f"postgres needs asyncpg: pip install 'livegate[postgres]' ({e})") from None
        store = PostgresStore(str(s["dsn"]))
    elif kind == "sqlite":
        try:
            from .store.sqlite import SqliteStore
        except ImportError as e:
            raise ConfigError("store.kind", f"the SQLite store is not available in this build ({e})") from None
        store = SqliteStore(str(s.get("path") or "data/livegate.db"))
    else:
        raise ConfigError("store.kind", f"must be 'sqlite' or 'postgres', got {kind!r}")
    try:
        before, after = asyncio.run(store.migrate())
    except (StoreUnavailable, SchemaError) as e:
        print(f"gateway: cannot migrate: {e}", file=sys.stderr)
        return 2
    print(f"schema at version {after} (was {before})")
    return 0


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
            cfg = resolve_config(a)
            tls = cfg.server.tls
            wss = f", wss on {tls.host or cfg.server.host}:{tls.port}" if tls.cert_file else ""
            print(f"ok: {len(cfg.routes)} routes, broker={cfg.broker.kind}, auth={cfg.auth.mode}, listening on {cfg.server.host}:{cfg.server.port}{wss}")
            cert = cfg.tls_certificate()
            if cert is not None:
                from .app.certs import expiry_problem

                print(f"tls: {cert['subject']}, serial {cert['serial']}, {cert['chain_len']} certificate(s) in the chain, valid until {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(cert['not_after']))}")
                problem = expiry_problem(cert)
                if problem:
                    print(f"warning: {problem}")
            return 0
        if a.cmd == "migrate":
            setup_logging("warning", False)
            return migrate(a)
        if a.cmd == "token":
            from .auth import mint_token

            cfg = load_config(a.config)
            if not cfg.auth.secret:
                raise ConfigError("auth.secret", "needed to mint a token")
            claims = {"rooms": a.rooms} if a.rooms else {}
            print(mint_token(cfg.auth.secret, a.user, ttl=a.ttl, **claims))
            return 0
        cfg = resolve_config(a)
    except ConfigError as e:
        print(f"gateway: configuration error: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log.level, cfg.log.json)
    if cfg.server.workers > 1:
        from .supervisor import supervise

        return supervise(cfg, a)
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
    except (OSError, EngineError) as e:  # bind failures and the like
        log.error("cannot start: %s", e)
        return 1
    except (SchemaError, StoreUnavailable) as e:  # the message store: too old a schema, unreachable
        print(f"gateway: cannot start: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
