"""The desk's assignment engine: who gets which session.

One interface, two implementations:

- :class:`MemoryAssigner`: one node (the embedded default). Every operation runs on the
  event loop without awaiting in between, so each is atomic.
- :class:`RedisAssigner`: many nodes sharing one Redis. The operations that decide
  (``pick``, ``claim``, ``release``, agent changes) are Lua scripts (``lua/``), so two
  nodes accepting the same session at once get exactly one ``ok``.

Hot state: per-department queues (ordered by queue time), the owner of each assigned
session, and agents (status, capacity, load, departments, time of their last
assignment, and when they went away). The store is the durable record; the engine is
rebuilt from it at start when it is empty (:meth:`Assigner.rebuild`).
"""

from __future__ import annotations

import abc
import secrets
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

__all__ = ["STATUSES", "STRATEGIES", "AgentState", "Assigner", "MemoryAssigner", "RedisAssigner"]

STATUSES = ("online", "away", "offline")
STRATEGIES = ("least_busy", "round_robin", "manual")

#: Results of :meth:`Assigner.claim`.
OK, MINE, TAKEN, OFFLINE, FULL = "ok", "mine", "taken", "offline", "full"


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class AgentState:
    """An agent as the engine sees it. ``last``: ms of their last assignment (the
    least-busy tie-break); ``gone``: ms since which they have had no connection (0:
    connected or never seen)."""

    user: str
    status: str = "offline"
    capacity: int = 0
    load: int = 0
    departments: tuple[str, ...] = ()
    last: int = 0
    gone: int = 0
    sessions: set[str] = field(default_factory=set)

    def has_room(self) -> bool:
        return self.status == "online" and self.load < self.capacity

    def json(self) -> dict[str, Any]:
        return {"user": self.user, "status": self.status, "capacity": self.capacity, "load": self.load,
                "departments": list(self.departments)}


class Assigner(abc.ABC):
    """The engine's contract. Sessions and agents are ids (strings)."""

    async def start(self) -> None:
        """Connect (Redis)."""
        return None

    async def close(self) -> None:
        """Disconnect."""
        return None

    @abc.abstractmethod
    async def take_rebuild(self) -> bool:
        """True for exactly one caller while the hot state is empty (a new Redis, a
        restarted single node): that caller then calls :meth:`rebuild`."""

    async def rebuild(self, queued: list[tuple[str, str, int, str | None]], assigned: list[tuple[str, str]]) -> None:
        """Load ``queued`` ((session, department, queued_at ms, sticky agent)) and
        ``assigned`` ((session, agent): owners and loads) from the store."""
        for s, d, at, st in queued:
            await self.enqueue(s, d, at, st)
        for s, a in assigned:
            await self.claim(s, a, None, force=True)

    @abc.abstractmethod
    async def enqueue(self, session: str, department: str, queued_at: int, sticky: str | None = None) -> None:
        """Put ``session`` in ``department``'s queue at ``queued_at`` (again: moved)."""

    @abc.abstractmethod
    async def dequeue(self, session: str, department: str) -> None:
        """Take ``session`` out of the queue (closed while waiting)."""

    @abc.abstractmethod
    async def claim(self, session: str, agent: str, department: str | None, *, force: bool = False) -> str:
        """``agent`` takes ``session`` (out of ``department``'s queue when given):
        ``"ok"``; ``"mine"`` when it already is theirs; ``"taken"`` when another agent
        has it; without ``force``: ``"offline"`` unless the agent is online or away,
        ``"full"`` at capacity. Exactly one concurrent claim of a session wins."""

    @abc.abstractmethod
    async def release(self, session: str, agent: str | None = None) -> str | None:
        """``session`` leaves its agent (only if it is ``agent``'s, when given); returns
        the agent it left, or None."""

    @abc.abstractmethod
    async def pick(self, department: str, strategy: str, sticky: bool) -> tuple[str, str] | None:
        """Assign the oldest queued session of ``department`` (to its sticky agent when
        ``sticky`` and that agent is online with room, else by ``strategy`` among the
        department's online agents with room); ``(session, agent)`` or None."""

    @abc.abstractmethod
    async def set_agent(self, user: str, *, status: str | None = None, capacity: int | None = None,
                        departments: tuple[str, ...] | None = None) -> AgentState:
        """Create or change an agent (None: keep); the agent after."""

    @abc.abstractmethod
    async def agent(self, user: str) -> AgentState | None:
        """The agent, or None."""

    @abc.abstractmethod
    async def agents(self) -> list[AgentState]:
        """Every agent, by user id."""

    @abc.abstractmethod
    async def queue(self, department: str) -> list[tuple[str, int]]:
        """``department``'s queue: (session, queued_at), oldest first."""

    @abc.abstractmethod
    async def owner(self, session: str) -> str | None:
        """The agent ``session`` is assigned to."""

    @abc.abstractmethod
    async def sessions_of(self, agent: str) -> list[str]:
        """Sessions assigned to ``agent``."""

    @abc.abstractmethod
    async def mark_gone(self, user: str, at: int) -> None:
        """``user`` has had no connection since ``at`` (ms)."""

    @abc.abstractmethod
    async def mark_back(self, user: str) -> None:
        """``user`` is connected again."""

    @abc.abstractmethod
    async def built(self) -> str | None:
        """The mark of the hot state's current build (a new one after each
        :meth:`take_rebuild`), or None when it is not there: after a Redis wipe (FLUSHALL,
        a failover to an empty replica); then one caller of :meth:`take_rebuild`
        rebuilds it."""

    @abc.abstractmethod
    async def conn_up(self, user: str, node: str, until: int) -> None:
        """``user`` has a connection on ``node``, as of now and until ``until`` (ms; the
        node refreshes it while the connection lasts); clears the gone mark."""

    @abc.abstractmethod
    async def conn_down(self, user: str, node: str) -> None:
        """``user`` has no connection on ``node`` any more."""

    @abc.abstractmethod
    async def conns(self, user: str) -> dict[str, int]:
        """The nodes where ``user`` has (or had, when expired) a connection: node -> until."""

    @abc.abstractmethod
    async def take_gone(self, user: str, at: int, now: int) -> bool:
        """``user`` has been gone since ``at`` and the grace ran out: set them offline and
        clear the mark, atomically, and True, only if the mark is still ``at`` and no node
        has a live connection of theirs (``until > now``). Of concurrent callers (several
        nodes), at most one gets True."""

    async def connected(self, user: str, now: int) -> bool:
        """Whether some node has a live connection of ``user``."""
        return any(u > now for u in (await self.conns(user)).values())


class MemoryAssigner(Assigner):
    def __init__(self) -> None:
        self._queues: dict[str, dict[str, int]] = {}
        self._sticky: dict[str, str] = {}
        self._owner: dict[str, str] = {}
        self._agents: dict[str, AgentState] = {}
        self._rr: dict[str, str] = {}
        self._conns: dict[str, dict[str, int]] = {}
        self._built = False

    def _agent(self, user: str) -> AgentState:
        a = self._agents.get(user)
        if a is None:
            a = self._agents[user] = AgentState(user)
        return a

    async def take_rebuild(self) -> bool:
        first, self._built = not self._built, True
        return first

    async def enqueue(self, session: str, department: str, queued_at: int, sticky: str | None = None) -> None:
        self._queues.setdefault(department, {})[session] = queued_at
        if sticky:
            self._sticky[session] = sticky

    async def dequeue(self, session: str, department: str) -> None:
        self._queues.get(department, {}).pop(session, None)
        self._sticky.pop(session, None)

    def _assign(self, session: str, agent: str, department: str | None) -> None:
        if department is not None:
            self._queues.get(department, {}).pop(session, None)
        self._sticky.pop(session, None)
        self._owner[session] = agent
        a = self._agent(agent)
        a.load += 1
        a.last = _now_ms()
        a.sessions.add(session)

    async def claim(self, session: str, agent: str, department: str | None, *, force: bool = False) -> str:
        owner = self._owner.get(session)
        if owner is not None:
            return MINE if owner == agent else TAKEN
        if not force:
            a = self._agents.get(agent)
            if a is None or a.status not in ("online", "away"):
                return OFFLINE
            if a.load >= a.capacity:
                return FULL
        self._assign(session, agent, department)
        return OK

    async def release(self, session: str, agent: str | None = None) -> str | None:
        owner = self._owner.get(session)
        if owner is None or (agent is not None and owner != agent):
            return None
        del self._owner[session]
        a = self._agent(owner)
        a.load = max(0, a.load - 1)
        a.sessions.discard(session)
        return owner

    async def pick(self, department: str, strategy: str, sticky: bool) -> tuple[str, str] | None:
        if strategy == "manual":
            return None
        q = self._queues.get(department)
        while q:
            session = min(q, key=lambda s: (q[s], s))
            if session not in self._owner:
                break
            del q[session]  # already assigned (queued again by a rebuild): not waiting
            self._sticky.pop(session, None)
        if not q:
            return None
        chosen: str | None = None
        if sticky:
            st = self._sticky.get(session)
            if st is not None and st in self._agents and self._agents[st].has_room():
                chosen = st
        if chosen is None:
            cands = sorted((a for a in self._agents.values() if department in a.departments and a.has_room()), key=lambda a: a.user)
            if not cands:
                return None
            if strategy == "round_robin":
                last = self._rr.get(department, "")
                chosen = next((a.user for a in cands if a.user > last), cands[0].user)
                self._rr[department] = chosen
            else:
                chosen = min(cands, key=lambda a: (a.load, a.last, a.user)).user
        self._assign(session, chosen, department)
        return session, chosen

    async def set_agent(self, user: str, *, status: str | None = None, capacity: int | None = None,
                        departments: tuple[str, ...] | None = None) -> AgentState:
        a = self._agent(user)
        if status is not None:
            a.status = status
        if capacity is not None:
            a.capacity = capacity
        if departments is not None:
            a.departments = tuple(departments)
        return a

    async def agent(self, user: str) -> AgentState | None:
        return self._agents.get(user)

    async def agents(self) -> list[AgentState]:
        return sorted(self._agents.values(), key=lambda a: a.user)

    async def queue(self, department: str) -> list[tuple[str, int]]:
        q = self._queues.get(department, {})
        return sorted(q.items(), key=lambda kv: (kv[1], kv[0]))

    async def owner(self, session: str) -> str | None:
        return self._owner.get(session)

    async def sessions_of(self, agent: str) -> list[str]:
        a = self._agents.get(agent)
        return sorted(a.sessions) if a is not None else []

    async def mark_gone(self, user: str, at: int) -> None:
        self._agent(user).gone = at

    async def mark_back(self, user: str) -> None:
        a = self._agents.get(user)
        if a is not None:
            a.gone = 0

    async def built(self) -> str | None:
        return "memory" if self._built else None

    async def conn_up(self, user: str, node: str, until: int) -> None:
        self._conns.setdefault(user, {})[node] = until
        await self.mark_back(user)

    async def conn_down(self, user: str, node: str) -> None:
        c = self._conns.get(user)
        if c is not None:
            c.pop(node, None)
            if not c:
                del self._conns[user]

    async def conns(self, user: str) -> dict[str, int]:
        return dict(self._conns.get(user, {}))

    async def take_gone(self, user: str, at: int, now: int) -> bool:
        a = self._agents.get(user)
        if a is None or a.gone != at or await self.connected(user, now):
            return False
        a.gone = 0
        a.status = "offline"
        return True


def _lua(name: str) -> str:
    return (resources.files("gateway.desk") / "lua" / name).read_text(encoding="utf-8")


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RedisAssigner(Assigner):
    """The engine in Redis, under ``{<prefix>:cs}:`` (one hash slot)."""

    def __init__(self, url: str, prefix: str = "gw", *, cluster: bool = False) -> None:
        self.url = url
        self.cluster = cluster
        self.p = f"{{{prefix}:cs}}:"
        self._redis: Any = None
        self._scripts: dict[str, Any] = {}
        self._pool: Any = None

    async def start(self) -> None:
        if self.cluster:
            from redis.asyncio.cluster import RedisCluster

            self._redis = RedisCluster.from_url(self.url)
        else:
            from redis.asyncio import BlockingConnectionPool, Redis

            pool = BlockingConnectionPool.from_url(self.url, max_connections=16, timeout=5.0)
            self._redis = Redis(connection_pool=pool)
            self._pool = pool
        for name in ("pick", "claim", "release", "agent", "gone"):
            self._scripts[name] = self._redis.register_script(_lua(f"{name}.lua"))

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        if self._pool is not None:
            await self._pool.disconnect()
            self._pool = None

    async def _run(self, name: str, *args: Any) -> Any:
        return await self._scripts[name](keys=[self.p + "owner"], args=[self.p, *args])

    async def take_rebuild(self) -> bool:
        return bool(await self._redis.set(self.p + "built", secrets.token_hex(8), nx=True))

    async def enqueue(self, session: str, department: str, queued_at: int, sticky: str | None = None) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.zadd(self.p + "q:" + department, {session: queued_at})
        if sticky:
            pipe.hset(self.p + "sticky", session, sticky)
        await pipe.execute()

    async def dequeue(self, session: str, department: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.zrem(self.p + "q:" + department, session)
        pipe.hdel(self.p + "sticky", session)
        await pipe.execute()

    async def claim(self, session: str, agent: str, department: str | None, *, force: bool = False) -> str:
        return _s(await self._run("claim", session, agent, department or "", "1" if force else "0", _now_ms()))

    async def release(self, session: str, agent: str | None = None) -> str | None:
        r = await self._run("release", session, agent or "")
        return _s(r) if r else None

    async def pick(self, department: str, strategy: str, sticky: bool) -> tuple[str, str] | None:
        r = await self._run("pick", department, strategy, "1" if sticky else "0", _now_ms())
        return (_s(r[0]), _s(r[1])) if r else None

    def _state(self, user: str, r: list[Any]) -> AgentState:
        st, cap, load, depts, last, gone = (_s(x) if x is not None else None for x in r)
        return AgentState(user, st or "offline", int(cap or 0), int(load or 0), tuple(d for d in (depts or "").split(",") if d),
                          int(last or 0), int(gone or 0))

    async def set_agent(self, user: str, *, status: str | None = None, capacity: int | None = None,
                        departments: tuple[str, ...] | None = None) -> AgentState:
        if departments is not None and any("," in d for d in departments):
            raise ValueError("department names cannot contain ','")
        r = await self._run("agent", user, status or "", "" if capacity is None else str(capacity),
                            "-" if departments is None else ",".join(departments))
        return self._state(user, r)

    async def agent(self, user: str) -> AgentState | None:
        r = await self._redis.hmget(self.p + "a:" + user, "status", "cap", "load", "depts", "last", "gone")
        if r[0] is None:
            return None
        return self._state(user, r)

    async def agents(self) -> list[AgentState]:
        users = sorted(_s(u) for u in await self._redis.smembers(self.p + "agents"))
        out = []
        for u in users:
            a = await self.agent(u)
            if a is not None:
                out.append(a)
        return out

    async def queue(self, department: str) -> list[tuple[str, int]]:
        r = await self._redis.zrange(self.p + "q:" + department, 0, -1, withscores=True)
        return [(_s(m), int(sc)) for m, sc in r]

    async def owner(self, session: str) -> str | None:
        r = await self._redis.hget(self.p + "owner", session)
        return _s(r) if r is not None else None

    async def sessions_of(self, agent: str) -> list[str]:
        return sorted(_s(x) for x in await self._redis.smembers(self.p + "mine:" + agent))

    async def mark_gone(self, user: str, at: int) -> None:
        await self._redis.hset(self.p + "a:" + user, "gone", at)

    async def mark_back(self, user: str) -> None:
        await self._redis.hdel(self.p + "a:" + user, "gone")

    async def built(self) -> str | None:
        r = await self._redis.get(self.p + "built")
        return _s(r) if r is not None else None

    async def conn_up(self, user: str, node: str, until: int) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self.p + "on:" + user, node, until)
        pipe.hdel(self.p + "a:" + user, "gone")
        await pipe.execute()

    async def conn_down(self, user: str, node: str) -> None:
        await self._redis.hdel(self.p + "on:" + user, node)

    async def conns(self, user: str) -> dict[str, int]:
        return {_s(k): int(v) for k, v in (await self._redis.hgetall(self.p + "on:" + user)).items()}

    async def take_gone(self, user: str, at: int, now: int) -> bool:
        return bool(await self._run("gone", user, str(at), now))
