"""Message storage in the company's own database (see :mod:`gateway.store.base`)."""

from .base import SCHEMA_VERSION, DeadLetter, Lease, OutboxEntry, SchemaError, Store, StoredMessage, StoreStats, StoreUnavailable

__all__ = ["SCHEMA_VERSION", "DeadLetter", "Lease", "OutboxEntry", "SchemaError", "Store", "StoreStats", "StoreUnavailable", "StoredMessage"]
