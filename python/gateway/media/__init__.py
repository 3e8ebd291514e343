"""Media messages (docs/media.md): uploads over the client port, type by content,
disk or S3 storage, references in messages, signed download URLs, moderation verdicts
and the sweeper. The service is :class:`Media` (``gateway.media`` on a node)."""

from .service import Media, MediaError, MediaInfo

__all__ = ["Media", "MediaError", "MediaInfo"]
