"""The Redis broker (``broker.kind = "redis"``): :class:`RedisBroker`.

Modules: ``broker`` (the broker: publish, history, subscriptions, commands, moderation),
``pubsub`` (pub/sub connections), ``reorder`` (per-room seq order, pure), ``presence``,
``debounce`` (hook join/leave debounce), ``archive`` (the archive log: archive messages
on their way to the store), ``scripts`` (the Lua scripts in ``lua/``).
"""

from .broker import RedisBroker
from .debounce import RedisDebounce
from .presence import RedisPresence
from .scripts import HISTORY_LUA, PRESENCE_LUA, PUBLISH_LUA

__all__ = ["HISTORY_LUA", "PRESENCE_LUA", "PUBLISH_LUA", "RedisBroker", "RedisDebounce", "RedisPresence"]
