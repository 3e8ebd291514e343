"""livegate: a real-time messaging gateway for mini-programs. A Rust connection engine
(``gateway._core``) owns the sockets; this thin Python layer decides (auth, routing rules,
hooks and plugins, the HTTP API, config, CLI).

The public API::

    from gateway import Gateway, Plugin, Reject, DROP, Config, load_config

Package map (``docs/architecture.md``, "The Python package"): ``app/`` (the node,
sessions, rooms, hooks), ``protocol/`` (codes, request parser, frames), ``broker/``
(memory and Redis), ``auth``, ``routing``, ``policy``, ``limits``, ``moderation``,
``config``, ``errors``, ``api``, ``metrics``, ``cli``, ``client`` (a Python client).
"""

from __future__ import annotations

from .app import DROP, Client, Gateway, MemberChange, Message, Plugin
from .auth import ConnectRequest, Identity
from .config import Config, load_config
from .errors import ConfigError, Reject
from .protocol.codes import CloseCode, ErrorCode, Priority

__all__ = [
    "DROP",
    "Client",
    "CloseCode",
    "Config",
    "ConfigError",
    "ConnectRequest",
    "ErrorCode",
    "Gateway",
    "Identity",
    "MemberChange",
    "Message",
    "Plugin",
    "Priority",
    "Reject",
    "__version__",
    "load_config",
]
__version__ = "0.1.0"
