"""A short-lived Redis cache of profiles for GetQuota/GetProfile (the spec's 60 s profile
cache), exact right after a generation.

Every reserve or settlement of a user invalidates that user's entry once its transaction has
committed. A plain delete would not be enough: a read that fetched the row just before the
write could store its stale copy just after the delete, for a whole TTL. So each entry is a
hash with a `fence` token: a reader notes the token before reading PostgreSQL and stores its
copy only if the token is unchanged (one Lua compare-and-set); an invalidation replaces the
token with a fresh random one, so any read that started before it cannot store.

There is deliberately no in-memory fallback: a per-replica copy could not be invalidated by a
write on another replica, and reads would stop being exact. Without Redis, reads go to
PostgreSQL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

from services.common.redis import RedisUnavailable, ResilientRedis
from services.quota.profile_store import ProfileRecord

log = logging.getLogger(__name__)

# KEYS: entry. ARGV: fence seen before the read ("" = none), profile JSON, TTL in ms.
_STORE_IF_FENCE_UNCHANGED = """
local fence = redis.call('HGET', KEYS[1], 'fence') or ''
if fence ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'profile', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: entry. ARGV: a fresh fence, TTL in ms (long enough to outlive any read in flight).
_INVALIDATE = """
redis.call('HDEL', KEYS[1], 'profile')
redis.call('HSET', KEYS[1], 'fence', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class CacheLookup:
    """A hit (`profile`) or, on a miss, the `fence` to store the fresh copy under
    (None: do not store, Redis is unavailable or the cache is off)."""

    profile: ProfileRecord | None
    fence: str | None


def _encode(profile: ProfileRecord) -> str:
    return json.dumps(
        {
            "user_id": profile.user_id,
            "email": profile.email,
            "is_pro": profile.is_pro,
            "daily_used": profile.daily_used,
            "last_reset_time": profile.last_reset_time.isoformat(),
            "created_at": profile.created_at.isoformat(),
        }
    )


def _decode(raw: bytes | str) -> ProfileRecord:
    data = json.loads(raw)
    return ProfileRecord(
        user_id=str(data["user_id"]),
        email=str(data["email"]),
        is_pro=bool(data["is_pro"]),
        daily_used=int(data["daily_used"]),
        last_reset_time=datetime.fromisoformat(data["last_reset_time"]),
        created_at=datetime.fromisoformat(data["created_at"]),
    )


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


class ProfileCache:
    def __init__(self, redis: ResilientRedis, ttl_seconds: float) -> None:
        self.redis = redis
        self.ttl_ms = int(ttl_seconds * 1000)
        client = redis.client if self.ttl_ms > 0 else None
        self._store = client.register_script(_STORE_IF_FENCE_UNCHANGED) if client else None
        self._invalidate = client.register_script(_INVALIDATE) if client else None

    def key(self, user_id: str) -> str:
        return self.redis.key("quota", "profile", user_id)

    async def lookup(self, user_id: str) -> CacheLookup:
        if self._store is None:
            return CacheLookup(None, None)
        key = self.key(user_id)
        try:
            raw, fence = await self.redis.run(
                "quota.profile_cache_get", lambda client: client.hmget(key, ["profile", "fence"])
            )
        except RedisUnavailable:
            return CacheLookup(None, None)
        if raw is not None:
            try:
                return CacheLookup(_decode(raw), None)
            except (ValueError, KeyError, TypeError):
                log.warning("unreadable profile cache entry %s: ignoring it", key)
        return CacheLookup(None, _text(fence))

    async def store(self, profile: ProfileRecord, fence: str | None) -> None:
        script = self._store
        if script is None or fence is None:
            return
        keys = [self.key(profile.user_id)]
        args: list[str | int] = [fence, _encode(profile), self.ttl_ms]
        # Not stored: the next read goes to PostgreSQL again, which is fine.
        with contextlib.suppress(RedisUnavailable):
            await self.redis.run(
                "quota.profile_cache_set",
                lambda client: script(keys=keys, args=args, client=client),
            )

    async def invalidate(self, user_id: str) -> None:
        script = self._invalidate
        if script is None:
            return
        keys = [self.key(user_id)]
        args: list[str | int] = [uuid.uuid4().hex, max(self.ttl_ms, 60_000)]
        try:
            await self.redis.run(
                "quota.profile_cache_invalidate",
                lambda client: script(keys=keys, args=args, client=client),
            )
        except RedisUnavailable:
            # An entry written before the outage may outlive it by at most one TTL; with the
            # default Redis cooldown (60 s) >= the default TTL (60 s) it has expired by then.
            log.warning("could not invalidate the cached profile of %s", user_id)
