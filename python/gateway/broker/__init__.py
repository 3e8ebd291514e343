"""Brokers: how nodes share rooms. ``memory`` (default, one node) or ``redis``."""

from .base import Broker, BrokerError, BrokerHandler, HistoryPolicy, HistoryResult, PublishResult
from .memory import MemoryBroker

__all__ = ["Broker", "BrokerError", "BrokerHandler", "HistoryPolicy", "HistoryResult", "MemoryBroker", "PublishResult"]
