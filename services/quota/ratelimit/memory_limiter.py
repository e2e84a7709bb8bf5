"""The per-replica fallback limiter: the same GCRA and escalation as the Redis script, in one
process's memory, used only while Redis cannot be reached (see limiter.py for what limits
mean then). State is dropped as it expires, so memory stays bounded by the callers seen in
the last window.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.quota.ratelimit.config import Escalation, Limit
from services.quota.ratelimit.limiter import Block, CheckResult, Subject, Verdict

# Expired state is swept at most this often (every call pays nothing in between).
_SWEEP_EVERY_SECONDS = 10.0


@dataclass
class _Expiring:
    value: float
    expires_at: float  # unix seconds


class MemoryLimiter:
    """`clock` is unix time in seconds (injectable for tests). Not thread-safe; the service
    runs on one event loop and no method awaits midway, so each check is atomic."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._tats: dict[tuple[Subject, str], _Expiring] = {}
        self._violations: dict[Subject, _Expiring] = {}
        self._levels: dict[Subject, _Expiring] = {}
        self._blocks: dict[Subject, _Expiring] = {}
        self._next_sweep = 0.0

    def _live(self, table: dict[Subject, _Expiring], subject: Subject, now: float) -> float:
        entry = table.get(subject)
        if entry is None or entry.expires_at <= now:
            table.pop(subject, None)
            return 0.0
        return entry.value

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_EVERY_SECONDS
        self._tats = {k: e for k, e in self._tats.items() if e.expires_at > now}
        for table in (self._violations, self._levels, self._blocks):
            for subject in [s for s, e in table.items() if e.expires_at <= now]:
                del table[subject]

    async def blocked(self, subject: Subject) -> CheckResult | None:
        return self._blocked(subject, self.clock())

    def _blocked(self, subject: Subject, now: float) -> CheckResult | None:
        block = self._blocks.get(subject)
        if block is None or block.expires_at <= now:
            return None
        remaining_ms = math.ceil((block.expires_at - now) * 1000)
        return CheckResult(
            Verdict.BLOCKED, 0, remaining_ms, remaining_ms, block_level=int(block.value)
        )

    async def check(
        self, subject: Subject, route: str, limit: Limit, escalation: Escalation
    ) -> CheckResult:
        now = self.clock()
        self._sweep(now)
        blocked = self._blocked(subject, now)
        if blocked is not None:
            return blocked

        period = limit.period_ms / 1000
        interval = period / limit.requests
        key = (subject, route)
        stored = self._tats.get(key)
        tat = max(stored.value if stored else now, now)
        new_tat = tat + interval
        diff = now - (new_tat - period)
        if diff >= 0:
            self._tats[key] = _Expiring(new_tat, new_tat)
            reset_ms = math.ceil((new_tat - now) * 1000)
            return CheckResult(Verdict.ALLOWED, math.floor(diff / interval), 0, reset_ms)

        retry_ms = math.ceil(-diff * 1000)
        reset_ms = math.ceil((tat - now) * 1000)
        # Refusals are counted in the escalation window even when blocking is off
        # (violations 0): the first of a burst is what the burst's security event reports.
        violations = int(self._live(self._violations, subject, now)) + 1
        window_end = (
            self._violations[subject].expires_at
            if violations > 1
            else now + escalation.window_ms / 1000
        )
        self._violations[subject] = _Expiring(violations, window_end)
        if not escalation.enabled or violations < escalation.violations:
            return CheckResult(Verdict.LIMITED, 0, retry_ms, reset_ms, violations)

        level = int(self._live(self._levels, subject, now)) + 1
        self._levels[subject] = _Expiring(level, now + escalation.forget_after_ms / 1000)
        block_ms = escalation.block_ms(level)
        self._blocks[subject] = _Expiring(level, now + block_ms / 1000)
        del self._violations[subject]
        return CheckResult(Verdict.BLOCKED, 0, block_ms, block_ms, violations, level, True)

    async def blocks(self) -> list[Block]:
        now = self.clock()
        return [
            Block(subject, int(entry.value), math.floor(entry.expires_at * 1000), "memory")
            for subject, entry in self._blocks.items()
            if entry.expires_at > now
        ]

    async def lift(self, subject: Subject) -> bool:
        now = self.clock()
        block = self._blocks.pop(subject, None)
        self._violations.pop(subject, None)
        self._levels.pop(subject, None)
        return block is not None and block.expires_at > now
