"""The desk's routes for tests (docs/customer-service.md, "Set-up"): each session's
conversation ``cs:<id>`` and internal channel ``csi:<id>``, durable groups the desk alone
fills, without rate limits (tests send fast), and a catch-all route after them."""

from __future__ import annotations

__all__ = ["DESK_ROUTES"]

DESK_ROUTES = """
[[routes]]
pattern = "cs:{session}"
kind = "group"
join = "none"
store = "durable"
members_max = 20
create = "none"
invite = "none"
user_rate = 0
room_rate = 0

[[routes]]
pattern = "csi:{session}"
kind = "group"
join = "none"
store = "durable"
create = "none"
invite = "none"
user_rate = 0
room_rate = 0
"""
