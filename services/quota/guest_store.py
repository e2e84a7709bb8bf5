"""Guest quotas: one count per (client network, quota day), expiring at that day's reset, and
the reservations pending against it, each expiring on its own after a TTL.

`GuestQuotaStore` is the interface; `RedisGuestQuotaStore` is the shared, exact one (each
operation is one Lua script, so many replicas never over-grant or refund twice);
`MemoryGuestQuotaStore` is the documented per-replica fallback with the same semantics; and
`FallbackGuestQuotaStore` uses Redis and falls back to memory for any request Redis cannot
serve (unset, failing, or bypassed by the circuit breaker), returning to Redis by itself once
the breaker lets calls through again.

A reservation nobody settles (its caller crashed) expires after `ttl_seconds` and gives its
unit back: every operation on a guest-day first reaps the reservations whose time is up, so
the count is exact whenever anyone looks, with no sweeper scanning keys. A unit taken with
`consume=True` (an answer already in hand) is counted and nothing is left pending: there is
nothing to settle, expire or reap, and a later settlement of its id is not applied.

Redis layout, per guest-day: a hash `quota:guest:{<tag>}` (`used`, `network`, `day`) and a
sorted set `quota:guest:{<tag>}:pending` (reservation -> expiry, in ms of Redis's clock). The
tag is a digest of (network, day): both keys share it, so each script's keys hash to one slot
and the scripts run unchanged on Redis Cluster; reservation ids carry it, so a settlement
finds its keys without asking anyone. Expiry times come from Redis's own clock (TIME), so
replicas with skewed clocks agree.

While the fallback is in use each replica counts on its own, so a guest may get up to
`limit x replicas` generations that day; refusing every guest during a Redis outage would be
worse. A reservation is settled where it was made: memory first (it knows its own), then Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Protocol

from prometheus_client import Counter

from services.common.redis import RedisUnavailable, ResilientRedis
from services.quota.clock import QuotaWindow
from services.quota.reservations import RESERVATIONS_EXPIRED, ReservationId, Settlement

GUEST_FALLBACKS = Counter(
    "genmesh_quota_guest_fallback_total",
    "Guest quota operations served by the in-memory fallback because Redis was unavailable.",
    ["operation"],
)


def guest_tag(network: str, day: date) -> str:
    """The guest-day's name in keys and reservation ids: 16 hex digits, the same on every
    replica. A digest keeps ids short whatever the network's spelling."""
    return hashlib.blake2b(f"{network}|{day.isoformat()}".encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class GuestReserveResult:
    reserved: bool
    # The day's count after the call (the limit or more when nothing was left).
    used: int


@dataclass(frozen=True)
class GuestSettleResult:
    # False when the reservation was already settled or had expired; nothing changed then.
    applied: bool
    network: str
    # The reservation's quota day and that day's count after the settlement.
    day: date
    used: int


class GuestQuotaStore(Protocol):
    async def used(self, network: str, window: QuotaWindow) -> int:
        """How many units `network` has used in `window`'s day (expired reservations excluded)."""
        ...

    async def reserve(
        self,
        network: str,
        window: QuotaWindow,
        limit: int,
        reservation: ReservationId,
        *,
        consume: bool = False,
    ) -> GuestReserveResult:
        """Take one unit if fewer than `limit` are used, pending as `reservation` until it is
        settled or its TTL passes; with `consume`, taken for good at once (committed, nothing
        pending). `reservation.tag` must be `guest_tag(network, window.day)`."""
        ...

    async def settle(
        self, reservation: ReservationId, settlement: Settlement
    ) -> GuestSettleResult | None:
        """Commit or refund a pending reservation (a refund gives its unit back, at most once).
        None when its guest-day is unknown here (expired with its day, or never seen)."""
        ...


# Every script starts by reaping: pending reservations whose expiry has passed are dropped and
# their units given back. Returns the count after that and how many were reaped.
_REAP_LUA = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function reap(state, pending, now)
  local expired = redis.call('ZREMRANGEBYSCORE', pending, '-inf', now)
  local used = tonumber(redis.call('HGET', state, 'used') or '0')
  if expired > 0 then
    used = math.max(0, used - expired)
    redis.call('HSET', state, 'used', used)
  end
  return used, expired
end
"""

# KEYS: state, pending. ARGV: limit, reset (unix s), network, day, reservation, ttl (ms).
# A ttl of 0 consumes: the unit is counted for good and nothing is added to pending (the
# pending key is still named in KEYS, with the same hash tag, for the reap).
# Returns {reserved (0/1), used, reaped}.
_RESERVE_LUA = (
    _REAP_LUA
    + """
local now = now_ms()
local used, expired = reap(KEYS[1], KEYS[2], now)
if used >= tonumber(ARGV[1]) then
  return {0, used, expired}
end
used = redis.call('HINCRBY', KEYS[1], 'used', 1)
redis.call('HSET', KEYS[1], 'network', ARGV[3], 'day', ARGV[4])
redis.call('EXPIREAT', KEYS[1], ARGV[2])
local ttl = tonumber(ARGV[6])
if ttl > 0 then
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[5])
  redis.call('EXPIREAT', KEYS[2], ARGV[2])
end
return {1, used, expired}
"""
)

# KEYS: state, pending. Returns {used, reaped}.
_USED_LUA = (
    _REAP_LUA
    + """
local used, expired = reap(KEYS[1], KEYS[2], now_ms())
return {used, expired}
"""
)

# KEYS: state, pending. ARGV: reservation, the state it settles in ("committed"/"refunded").
# Returns {-1} for an unknown guest-day, else {applied, used, network, day, reaped}. A
# reservation no longer pending (settled, or reaped: its unit is back already) is not applied.
_SETTLE_LUA = (
    _REAP_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {-1}
end
local used, expired = reap(KEYS[1], KEYS[2], now_ms())
local fields = redis.call('HMGET', KEYS[1], 'network', 'day')
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then
  return {0, used, fields[1], fields[2], expired}
end
if ARGV[2] == 'refunded' and used > 0 then
  used = redis.call('HINCRBY', KEYS[1], 'used', -1)
end
return {1, used, fields[1], fields[2], expired}
"""
)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _count_reaped(store: str, reaped: int) -> None:
    if reaped:
        RESERVATIONS_EXPIRED.labels(store=store).inc(reaped)


class RedisGuestQuotaStore:
    def __init__(self, redis: ResilientRedis, ttl_seconds: float) -> None:
        self.redis = redis
        self.ttl_ms = max(1, math.ceil(ttl_seconds * 1000))
        client = redis.client
        self._reserve = client.register_script(_RESERVE_LUA) if client else None
        self._used = client.register_script(_USED_LUA) if client else None
        self._settle = client.register_script(_SETTLE_LUA) if client else None

    def keys(self, tag: str) -> list[str]:
        state = self.redis.key("quota", "guest", "{" + tag + "}")
        return [state, state + ":pending"]

    async def used(self, network: str, window: QuotaWindow) -> int:
        script = self._used
        if script is None:
            raise RedisUnavailable("REDIS_URL is not set")
        keys = self.keys(guest_tag(network, window.day))
        reply = await self.redis.run(
            "quota.guest_used", lambda client: script(keys=keys, client=client)
        )
        _count_reaped("redis", int(reply[1]))
        return int(reply[0])

    async def reserve(
        self,
        network: str,
        window: QuotaWindow,
        limit: int,
        reservation: ReservationId,
        *,
        consume: bool = False,
    ) -> GuestReserveResult:
        script = self._reserve
        if script is None:
            raise RedisUnavailable("REDIS_URL is not set")
        keys = self.keys(reservation.tag)
        # Whole seconds for EXPIREAT, rounded up so a key never expires before its reset.
        reset = math.ceil(window.resets_at.timestamp())
        args: list[str | int] = [
            limit,
            reset,
            network,
            window.day.isoformat(),
            reservation.uuid.hex,
            0 if consume else self.ttl_ms,  # 0: taken for good, nothing pending
        ]
        reply = await self.redis.run(
            "quota.guest_consume" if consume else "quota.guest_reserve",
            lambda client: script(keys=keys, args=args, client=client),
        )
        _count_reaped("redis", int(reply[2]))
        return GuestReserveResult(reserved=reply[0] == 1, used=int(reply[1]))

    async def settle(
        self, reservation: ReservationId, settlement: Settlement
    ) -> GuestSettleResult | None:
        script = self._settle
        if script is None:
            raise RedisUnavailable("REDIS_URL is not set")
        keys = self.keys(reservation.tag)
        args: list[str | int] = [reservation.uuid.hex, settlement.value]
        reply = await self.redis.run(
            "quota.guest_settle", lambda client: script(keys=keys, args=args, client=client)
        )
        if reply[0] == -1:
            return None
        _count_reaped("redis", int(reply[4]))
        return GuestSettleResult(
            applied=reply[0] == 1,
            network=_text(reply[2]),
            day=date.fromisoformat(_text(reply[3])),
            used=int(reply[1]),
        )


@dataclass
class _GuestDay:
    network: str
    day: date
    resets_at: float  # unix seconds: the whole entry goes then
    used: int = 0
    # reservation uuid hex -> expiry (unix seconds)
    pending: dict[str, float] = field(default_factory=dict)

    def reap(self, now: float) -> int:
        expired = [rid for rid, expires in self.pending.items() if expires <= now]
        for rid in expired:
            del self.pending[rid]
        self.used = max(0, self.used - len(expired))
        return len(expired)


class MemoryGuestQuotaStore:
    """The same semantics in one process: guest-days live until their reset, reservations
    until settled or their TTL. The lock keeps each operation atomic even if one ever awaits
    midway. `clock` is wall time in unix seconds (injectable for tests)."""

    def __init__(self, ttl_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self._lock = asyncio.Lock()
        self.ttl_seconds = ttl_seconds
        self.now = clock
        self._days: dict[str, _GuestDay] = {}
        self._next_purge = 0.0

    def _day(self, tag: str, now: float) -> _GuestDay | None:
        if now >= self._next_purge:
            # Whole days go at their reset; checked at most once a minute.
            self._days = {t: d for t, d in self._days.items() if d.resets_at > now}
            self._next_purge = now + 60
        found = self._days.get(tag)
        if found is None or found.resets_at <= now:
            return None
        _count_reaped("memory", found.reap(now))
        return found

    async def used(self, network: str, window: QuotaWindow) -> int:
        async with self._lock:
            found = self._day(guest_tag(network, window.day), self.now())
            return found.used if found else 0

    async def reserve(
        self,
        network: str,
        window: QuotaWindow,
        limit: int,
        reservation: ReservationId,
        *,
        consume: bool = False,
    ) -> GuestReserveResult:
        async with self._lock:
            now = self.now()
            found = self._day(reservation.tag, now)
            if found is None:
                found = _GuestDay(network, window.day, window.resets_at.timestamp())
                self._days[reservation.tag] = found
            if found.used >= limit:
                return GuestReserveResult(reserved=False, used=found.used)
            found.used += 1
            if not consume:
                found.pending[reservation.uuid.hex] = now + self.ttl_seconds
            return GuestReserveResult(reserved=True, used=found.used)

    async def settle(
        self, reservation: ReservationId, settlement: Settlement
    ) -> GuestSettleResult | None:
        async with self._lock:
            found = self._day(reservation.tag, self.now())
            if found is None:
                return None
            applied = found.pending.pop(reservation.uuid.hex, None) is not None
            if applied and settlement is not Settlement.COMMIT:
                found.used = max(0, found.used - 1)
            return GuestSettleResult(applied, found.network, found.day, found.used)

    def knows(self, reservation: ReservationId) -> bool:
        """Whether this replica holds the reservation pending (it was made in the fallback)."""
        found = self._days.get(reservation.tag)
        return found is not None and reservation.uuid.hex in found.pending

    def __len__(self) -> int:
        """How many guest-days are held (for tests and stats)."""
        return len(self._days)


class FallbackGuestQuotaStore:
    """Redis when it answers, memory for any request it does not."""

    def __init__(self, primary: GuestQuotaStore, fallback: MemoryGuestQuotaStore) -> None:
        self.primary = primary
        self.fallback = fallback

    async def used(self, network: str, window: QuotaWindow) -> int:
        try:
            return await self.primary.used(network, window)
        except RedisUnavailable:
            GUEST_FALLBACKS.labels("used").inc()
            return await self.fallback.used(network, window)

    async def reserve(
        self,
        network: str,
        window: QuotaWindow,
        limit: int,
        reservation: ReservationId,
        *,
        consume: bool = False,
    ) -> GuestReserveResult:
        try:
            return await self.primary.reserve(network, window, limit, reservation, consume=consume)
        except RedisUnavailable:
            GUEST_FALLBACKS.labels("consume" if consume else "reserve").inc()
            return await self.fallback.reserve(network, window, limit, reservation, consume=consume)

    async def settle(
        self, reservation: ReservationId, settlement: Settlement
    ) -> GuestSettleResult | None:
        if self.fallback.knows(reservation):
            return await self.fallback.settle(reservation, settlement)
        try:
            return await self.primary.settle(reservation, settlement)
        except RedisUnavailable:
            # Made in Redis and Redis is gone: nothing is lost for good. A refund happens
            # anyway when the reservation's TTL passes; a commit becomes that refund (one
            # free generation per reservation settled during the outage).
            GUEST_FALLBACKS.labels("settle").inc()
            return None
