"""Message storage in the company's own database (see :mod:`gateway.store.base`)."""

from .base import (
    CS_OPEN_STATES,
    CS_SESSION_FIELDS,
    MEDIA_FIELDS,
    MEDIA_PUBLISH_GRACE_MS,
    MEDIA_STATES,
    RECALLED,
    SCHEMA_VERSION,
    Conversation,
    ConversationState,
    CsSession,
    CsTicket,
    CsUnread,
    DeadLetter,
    Lease,
    MediaFile,
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
    "CS_OPEN_STATES", "CS_SESSION_FIELDS", "MEDIA_FIELDS", "MEDIA_PUBLISH_GRACE_MS", "MEDIA_STATES", "RECALLED", "SCHEMA_VERSION", "Conversation",
    "ConversationState", "CsSession", "CsTicket", "CsUnread", "DeadLetter", "Lease", "MediaFile", "Member", "OutboxEntry", "SchemaError", "Store", "StoreStats", "StoreUnavailable", "StoredMessage", "TooManyMembers",
]
