"""Brokers: how nodes share rooms. ``memory`` (default, one node) or ``redis``
(:mod:`gateway.broker.redis`, imported on demand: it needs redis-py)."""

from .base import (
    Broker,
    BrokerError,
    BrokerHandler,
    HistoryPolicy,
    HistoryResult,
    MemberDebounce,
    Presence,
    PublishResult,
)
from .commands import Ban, Broadcast, CloseRoom, Command, ConvMember, Kick, Mute, Unban, Unmute
from .memory import MemoryBroker

__all__ = [
    "Ban",
    "Broadcast",
    "Broker",
    "BrokerError",
    "BrokerHandler",
    "CloseRoom",
    "Command",
    "ConvMember",
    "HistoryPolicy",
    "HistoryResult",
    "Kick",
    "MemberDebounce",
    "MemoryBroker",
    "Mute",
    "Presence",
    "PublishResult",
    "Unban",
    "Unmute",
]
