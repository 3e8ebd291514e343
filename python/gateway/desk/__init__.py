"""The customer-service desk (docs/customer-service.md): a first-party plugin.

``[plugins.desk] enabled = true`` adds it; or ``Gateway(config, plugins=[Desk(bot=...,
context=..., on_unread_reply=...)])``."""

from .bot import Bot, BotReply, FaqBot, SessionInfo
from .desk import Actor, Desk
from .engine import AgentState, Assigner, MemoryAssigner, RedisAssigner
from .settings import DeskSettings, parse_settings

__all__ = [
    "Actor", "AgentState", "Assigner", "Bot", "BotReply", "Desk", "DeskSettings", "FaqBot", "MemoryAssigner", "RedisAssigner", "SessionInfo",
    "parse_settings",
]
