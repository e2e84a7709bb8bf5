"""Guest quotas: one counter per (client IP, quota day), expiring at that day's reset.

`GuestQuotaStore` is the interface; `RedisGuestQuotaStore` is the shared, exact one (each
operation is one Lua script, so many replicas never over-grant or refund twice);
`MemoryGuestQuotaStore` is the documented per-replica fallback with the same semantics; and
`FallbackGuestQuotaStore` uses Redis and falls back to memory for any request Redis cannot
serve (unset, failing, or bypassed by the circuit breaker), returning to Redis by itself once
the breaker lets calls through again.

While the fallback is in use each replica counts on its own, so a guest may get up to
`limit x replicas` generations that day; refusing every guest during a Redis outage would be
worse. A reservation is settled where it was made: memory first (it knows its own), then Redis.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol

from prometheus_client import Counter

from services.common.redis import RedisUnavailable, ResilientRedis
from services.quota.clock import QuotaWindow
from services.quota.reservations import Settlement

GUEST_FALLBACKS = Counter(
    "genmesh_quota_guest_fallback_total",
    "Guest quota operations served by the in-memory fallback because Redis was unavailable.",
    ["operation"],
)


@dataclass(frozen=True)
class GuestReserveResult:
    reserved: bool
    # The day's count after the call (the limit or more when nothing was left).
    used: int


@dataclass(frozen=True)
class GuestSettleResult:
    # False when the reservation was already settled; nothing changed then.
    applied: bool
    ip: str
    # The reservation's quota day and that day's count after the settlement.
    day: date
    used: int


class GuestQuotaStore(Protocol):
    async def used(self, ip: str, window: QuotaWindow) -> int:
        """How many units `ip` has used in `window`'s day."""
        ...

    async def reserve(
        self, ip: str, window: QuotaWindow, limit: int, reservation: uuid.UUID
    ) -> GuestReserveResult:
        """Take one unit if fewer than `limit` are used, remembering `reservation` until the
        reset so it can be settled once."""
        ...

    async def settle(
        self, reservation: uuid.UUID, settlement: Settlement, now: datetime
    ) -> GuestSettleResult | None:
        """Commit or refund a reservation (a refund gives its unit back, at most once).
        None when the reservation is unknown here or expired with its day."""
        ...


# KEYS: counter, reservation. ARGV: limit, reset (unix seconds), ip, day.
_RESERVE_LUA = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used >= tonumber(ARGV[1]) then
  return {0, used}
end
used = redis.call('INCR', KEYS[1])
redis.call('EXPIREAT', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], 'counter', KEYS[1], 'state', 'reserved', 'ip', ARGV[3], 'day', ARGV[4])
redis.call('EXPIREAT', KEYS[2], ARGV[2])
return {1, used}
"""

# KEYS: reservation. ARGV: the state to settle in ("committed" or "refunded").
# Returns {-1} for an unknown reservation, else {applied, used, ip, day}. The counter is never
# taken below 0 nor re-created (DECR on a missing key would make a -1 without expiry).
_SETTLE_LUA = """
local fields = redis.call('HMGET', KEYS[1], 'counter', 'state', 'ip', 'day')
local counter = fields[1]
if not counter then
  return {-1}
end
local used = tonumber(redis.call('GET', counter) or '0')
if fields[2] ~= 'reserved' then
  return {0, used, fields[3], fields[4]}
end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
if ARGV[1] == 'refunded' and used > 0 then
  used = redis.call('DECR', counter)
end
return {1, used, fields[3], fields[4]}
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisGuestQuotaStore:
    def __init__(self, redis: ResilientRedis) -> None:
        self.redis = redis
        client = redis.client
        self._reserve = client.register_script(_RESERVE_LUA) if client else None
        self._settle = client.register_script(_SETTLE_LUA) if client else None

    def counter_key(self, ip: str, day: date) -> str:
        return self.redis.key("quota", "guest", day.isoformat(), ip)

    def reservation_key(self, reservation: uuid.UUID) -> str:
        return self.redis.key("quota", "guest-reservation", reservation.hex)

    async def used(self, ip: str, window: QuotaWindow) -> int:
        key = self.counter_key(ip, window.day)
        value = await self.redis.run("quota.guest_used", lambda client: client.get(key))
        return int(value or 0)

    async def reserve(
        self, ip: str, window: QuotaWindow, limit: int, reservation: uuid.UUID
    ) -> GuestReserveResult:
        script = self._reserve
        if script is None:
            raise RedisUnavailable("REDIS_URL is not set")
        keys = [self.counter_key(ip, window.day), self.reservation_key(reservation)]
        # Whole seconds for EXPIREAT, rounded up so a key never expires before its reset.
        reset = math.ceil(window.resets_at.timestamp())
        args: list[str | int] = [limit, reset, ip, window.day.isoformat()]
        reply = await self.redis.run(
            "quota.guest_reserve", lambda client: script(keys=keys, args=args, client=client)
        )
        return GuestReserveResult(reserved=reply[0] == 1, used=int(reply[1]))

    async def settle(
        self, reservation: uuid.UUID, settlement: Settlement, now: datetime
    ) -> GuestSettleResult | None:
        script = self._settle
        if script is None:
            raise RedisUnavailable("REDIS_URL is not set")
        keys = [self.reservation_key(reservation)]
        args: list[str | int] = [settlement.value]
        reply = await self.redis.run(
            "quota.guest_settle", lambda client: script(keys=keys, args=args, client=client)
        )
        if reply[0] == -1:
            return None
        return GuestSettleResult(
            applied=reply[0] == 1,
            ip=_text(reply[2]),
            day=date.fromisoformat(_text(reply[3])),
            used=int(reply[1]),
        )


@dataclass
class _MemoryReservation:
    ip: str
    day: date
    state: str


class MemoryGuestQuotaStore:
    """The same semantics in one process: counts and reservations live until their day's reset.
    The lock keeps each operation atomic even if one ever awaits midway."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._counts: dict[tuple[date, str], int] = {}
        self._reservations: dict[uuid.UUID, _MemoryReservation] = {}
        # When each day still present expires; the earliest is the next purge.
        self._resets: dict[date, datetime] = {}

    def _purge(self, now: datetime) -> None:
        expired = {day for day, reset in self._resets.items() if reset <= now}
        if not expired:
            return
        self._counts = {k: v for k, v in self._counts.items() if k[0] not in expired}
        self._reservations = {k: r for k, r in self._reservations.items() if r.day not in expired}
        for day in expired:
            del self._resets[day]

    async def used(self, ip: str, window: QuotaWindow) -> int:
        async with self._lock:
            self._purge(window.now)
            return self._counts.get((window.day, ip), 0)

    async def reserve(
        self, ip: str, window: QuotaWindow, limit: int, reservation: uuid.UUID
    ) -> GuestReserveResult:
        async with self._lock:
            self._purge(window.now)
            key = (window.day, ip)
            used = self._counts.get(key, 0)
            if used >= limit:
                return GuestReserveResult(reserved=False, used=used)
            self._counts[key] = used + 1
            self._resets.setdefault(window.day, window.resets_at)
            self._reservations[reservation] = _MemoryReservation(ip, window.day, "reserved")
            return GuestReserveResult(reserved=True, used=used + 1)

    async def settle(
        self, reservation: uuid.UUID, settlement: Settlement, now: datetime
    ) -> GuestSettleResult | None:
        async with self._lock:
            self._purge(now)
            found = self._reservations.get(reservation)
            if found is None:
                return None
            key = (found.day, found.ip)
            used = self._counts.get(key, 0)
            applied = found.state == "reserved"
            if applied:
                found.state = settlement.value
                if settlement is Settlement.REFUND and used > 0:
                    used -= 1
                    self._counts[key] = used
            return GuestSettleResult(applied=applied, ip=found.ip, day=found.day, used=used)

    def __len__(self) -> int:
        """How many (ip, day) counters are held (for tests and stats)."""
        return len(self._counts)


class FallbackGuestQuotaStore:
    """Redis when it answers, memory for any request it does not."""

    def __init__(self, primary: GuestQuotaStore, fallback: MemoryGuestQuotaStore) -> None:
        self.primary = primary
        self.fallback = fallback

    async def used(self, ip: str, window: QuotaWindow) -> int:
        try:
            return await self.primary.used(ip, window)
        except RedisUnavailable:
            GUEST_FALLBACKS.labels("used").inc()
            return await self.fallback.used(ip, window)

    async def reserve(
        self, ip: str, window: QuotaWindow, limit: int, reservation: uuid.UUID
    ) -> GuestReserveResult:
        try:
            return await self.primary.reserve(ip, window, limit, reservation)
        except RedisUnavailable:
            GUEST_FALLBACKS.labels("reserve").inc()
            return await self.fallback.reserve(ip, window, limit, reservation)

    async def settle(
        self, reservation: uuid.UUID, settlement: Settlement, now: datetime
    ) -> GuestSettleResult | None:
        settled = await self.fallback.settle(reservation, settlement, now)
        if settled is not None:
            return settled
        try:
            return await self.primary.settle(reservation, settlement, now)
        except RedisUnavailable:
            # Made in Redis and Redis is gone: the unit stays used (a guest loses at most one
            # refund per outage, while the fallback counts from zero anyway).
            GUEST_FALLBACKS.labels("settle").inc()
            return None
