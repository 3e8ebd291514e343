"""The gateway application, one module per concern:

- :mod:`.node`: :class:`Gateway`, one node: composition, engine events, broker
  commands, start and stop;
- :mod:`.session`: per-connection work: connect, requests (join, leave, publish), close;
- :mod:`.rooms`: publishing, leaving, presence counts and events, member listings;
- :mod:`.members`: join/leave notifications debounced across nodes;
- :mod:`.hooks`: the hook registry and the one way hooks are called (timeout, fallback);
- :mod:`.plugins`: :class:`Plugin`, :class:`Message`, :data:`DROP`;
- :mod:`.expiry`: token expiry on open connections;
- :mod:`.tasks`, :mod:`.stats`: background tasks and counters.
"""

from ..errors import HookTimeout, NotRunning, Reject
from .node import Gateway
from .plugins import DROP, HOOKS, MemberChange, Message, Plugin
from .session import MAX_BACKLOG, Client

__all__ = ["DROP", "HOOKS", "MAX_BACKLOG", "Client", "Gateway", "HookTimeout", "MemberChange", "Message", "NotRunning", "Plugin", "Reject"]
