"""The limiter: one GCRA check per (subject, route), with escalation to blocks, behind a small
interface. `RedisLimiter` (redis_limiter.py) is the shared, exact one; `MemoryLimiter`
(memory_limiter.py) is the per-replica fallback with the same semantics; `FallbackLimiter`
uses Redis and falls back to memory for any call Redis cannot serve, and goes back to Redis
by itself when the shared client's breaker lets calls through again.

While the fallback serves, each quota replica counts on its own: a limit of N holds per
replica (N x replicas in all), blocks started there hold only there, and blocks kept in Redis
are not seen. That is the documented trade: limits keep working, if looser, rather than every
request waiting on a dead Redis or being refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol
from urllib.parse import quote

from prometheus_client import Counter

from services.common.redis import RedisUnavailable
from services.quota.ratelimit.config import Escalation, Limit, Scope

LIMITER_FALLBACKS = Counter(
    "genmesh_ratelimit_fallback_total",
    "Rate-limit operations served by the in-memory fallback because Redis was unavailable.",
    ["operation"],
)


@dataclass(frozen=True)
class Subject:
    """Whom a limit counts: a client network (`ip`) or a signed-in user (`user`)."""

    scope: Scope
    value: str

    def __str__(self) -> str:
        return f"{self.scope.value}:{self.value}"

    @property
    def tag(self) -> str:
        """The subject as a Redis hash tag body: every key of one subject lands in one slot.
        Braces (which would end the tag early) and % are percent-encoded."""
        return quote(str(self), safe=":/.@-_")

    @classmethod
    def parse(cls, text: str) -> Subject:
        scope, _, value = text.partition(":")
        return cls(Scope(scope), value)


class Verdict(StrEnum):
    ALLOWED = "allowed"
    # Over the limit: refused until `retry_after_ms`.
    LIMITED = "limited"
    # Blocked (now or earlier) for repeated violations: refused on every route.
    BLOCKED = "blocked"


@dataclass(frozen=True)
class CheckResult:
    verdict: Verdict
    # Requests left right now (0 unless allowed).
    remaining: int
    # Refused: how long until a request would pass (the block's remaining time if blocked).
    retry_after_ms: int
    # Allowed: how long until the limit is whole again.
    reset_ms: int
    # Limited or newly blocked: refusals of this subject in the current window, this one
    # included (1 means a new burst of violations began). Counted whether or not escalation
    # can block, so a burst is reported either way.
    violations: int = 0
    # Blocked: the block's level (1 = first, 2 = second within the escalation memory, ...),
    # and whether this very request started it (its length is then `retry_after_ms`).
    block_level: int = 0
    started_block: bool = False

    @property
    def refused(self) -> bool:
        return self.verdict is not Verdict.ALLOWED


@dataclass(frozen=True)
class Block:
    subject: Subject
    level: int
    # When it ends, in unix milliseconds.
    until_ms: int
    # "redis" or "memory" (a block the fallback holds in one replica only).
    backend: str


class Limiter(Protocol):
    async def check(
        self, subject: Subject, route: str, limit: Limit, escalation: Escalation
    ) -> CheckResult:
        """Count one request of `subject` against `route`'s `limit`, unless it is blocked;
        a refusal counts toward escalation, which may start a block."""
        ...

    async def blocked(self, subject: Subject) -> CheckResult | None:
        """`subject`'s block, if one is in force (a BLOCKED result with its remaining time
        and level), else None. Counts nothing: for requests on routes without a limit for
        `subject`'s scope, which a block refuses all the same."""
        ...

    async def blocks(self) -> list[Block]:
        """The blocks in force now."""
        ...

    async def lift(self, subject: Subject) -> bool:
        """End `subject`'s block and forgive its violations and block history; False when it
        was not blocked."""
        ...


class FallbackLimiter:
    """Redis when it answers, the replica's memory for any call it does not."""

    def __init__(self, primary: Limiter, fallback: Limiter) -> None:
        self.primary = primary
        self.fallback = fallback

    async def check(
        self, subject: Subject, route: str, limit: Limit, escalation: Escalation
    ) -> CheckResult:
        try:
            return await self.primary.check(subject, route, limit, escalation)
        except RedisUnavailable:
            LIMITER_FALLBACKS.labels("check").inc()
            return await self.fallback.check(subject, route, limit, escalation)

    async def blocked(self, subject: Subject) -> CheckResult | None:
        try:
            return await self.primary.blocked(subject)
        except RedisUnavailable:
            LIMITER_FALLBACKS.labels("blocked").inc()
            return await self.fallback.blocked(subject)

    async def blocks(self) -> list[Block]:
        found = await self.fallback.blocks()
        try:
            found = [*await self.primary.blocks(), *found]
        except RedisUnavailable:
            LIMITER_FALLBACKS.labels("blocks").inc()
        return sorted(found, key=lambda block: block.until_ms, reverse=True)

    async def lift(self, subject: Subject) -> bool:
        """Lifts the block in memory, then in Redis. Raises RedisUnavailable when Redis cannot
        be reached: a block kept there would be in force again once Redis is back."""
        in_memory = await self.fallback.lift(subject)
        return await self.primary.lift(subject) or in_memory
