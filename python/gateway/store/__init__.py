"""Message storage in the company's own database (see :mod:`gateway.store.base`)."""

from .base import (
    RECALLED,
    SCHEMA_VERSION,
    Conversation,
    ConversationState,
    DeadLetter,
    Lease,
    Member,
    OutboxEntry,
    SchemaError,
    Store,
    StoredMessage,
    StoreStats,
    StoreUnavailable,
    TooManyMembers,
)

__all__ = [
    "RECALLED", "SCHEMA_VERSION", "Conversation", "ConversationState", "DeadLetter", "Lease", "Member", "OutboxEntry", "SchemaError", "Store",
    "StoreStats", "StoreUnavailable", "StoredMessage", "TooManyMembers",
]
