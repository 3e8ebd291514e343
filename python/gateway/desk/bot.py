"""The bot that answers first: the :class:`Bot` interface and the shipped keyword FAQ bot."""

from __future__ import annotations

import abc
from dataclasses import dataclass

from ..store import CsSession
from .settings import FaqEntry

__all__ = ["Bot", "BotReply", "FaqBot", "SessionInfo"]

#: What bots, hooks and the API see of a session (the store's row).
SessionInfo = CsSession


@dataclass(frozen=True, slots=True)
class BotReply:
    """The bot's answer (``text``: None or empty says nothing) and whether to hand the
    session to a human now (``handoff``)."""

    text: str | None
    handoff: bool = False


class Bot(abc.ABC):
    """Answers a shopper's chat text while the session is in state ``bot``. Called once
    per shopper message, off the message's path (the shopper's ack does not wait); keep
    it fast, and time-box remote calls yourself (a bot that raises hands off)."""

    @abc.abstractmethod
    async def answer(self, session: SessionInfo, text: str) -> BotReply: ...


class FaqBot(Bot):
    """Keyword FAQ (``[[plugins.desk.faq]]``: ``keywords``, ``answer``): the first entry
    one of whose keywords the text contains (case-insensitive) answers; no match: the
    ``fallback`` text and a handoff."""

    def __init__(self, entries: tuple[FaqEntry, ...], fallback: str) -> None:
        self.entries = entries
        self.fallback = fallback

    async def answer(self, session: SessionInfo, text: str) -> BotReply:
        low = text.lower()
        for e in self.entries:
            if any(k in low for k in e.keywords):
                return BotReply(e.answer)
        return BotReply(self.fallback, handoff=True)
