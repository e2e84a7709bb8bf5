"""The response cache: answers stored by a hash of everything that shapes them, with tags for
invalidation (`model:<m>`, `lang:<l>`, `kind:text|image`).

`ResponseCache` is the interface; `RedisResponseCache` is the shared store every replica uses,
`MemoryResponseCache` the per-replica fallback (TTL, bounded, LRU) and `ResilientResponseCache`
puts them together: Redis while it answers, memory for any request that finds it unusable.
Hit and miss counters are per replica (the stats publisher reports each replica's own).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
from prometheus_client import Counter
from redis.asyncio import Redis

from services.common.errors import Reason, ServiceError
from services.common.redis import RedisUnavailable, ResilientRedis
from services.generation.answer import Answer

log = logging.getLogger(__name__)

# Bump when the meaning of a cached answer changes, so old entries are simply never read.
CACHE_KEY_VERSION = "v2"
# Keys live under <REDIS_KEY_PREFIX>gencache:..., so "invalidate all" can find exactly them.
NAMESPACE = "gencache"
SCAN_BATCH = 500

CACHE_LOOKUPS = Counter(
    "genmesh_generation_cache_lookups_total",
    "Response cache lookups on this replica, by result (hit or miss).",
    ["result"],
)

_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """The prompt as sent upstream and hashed: NFC, one line-ending style, runs of spaces
    collapsed, outer blanks trimmed. Line breaks stay (they can matter, e.g. for code)."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = (_HORIZONTAL_SPACE.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def cache_key(
    *, model: str, text: str, image_sha256: str, lang: str, prompt_version: str, owner: str = ""
) -> str:
    """sha256 over what determines the answer; `text` must already be normalized. `owner` is
    empty for the shared cache, else the only user whose requests find the entry.

    Unary and streamed requests share a key: both send the model the same request (model,
    messages, token limit), so the answer is the same; a stream stores its chunking with it."""
    material = json.dumps(
        [CACHE_KEY_VERSION, model, text, image_sha256, lang, prompt_version, owner]
    )
    return hashlib.sha256(material.encode()).hexdigest()


def cache_tags(*, model: str, lang: str, has_image: bool) -> tuple[str, ...]:
    return (f"model:{model}", f"lang:{lang}", f"kind:{'image' if has_image else 'text'}")


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    entries: int
    # Entries removed by invalidation (not by expiry), on this replica's requests.
    invalidations: int
    # "redis" or "memory".
    backend: str

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class ResponseCache(Protocol):
    """A store of answers. Implementations may raise `RedisUnavailable`."""

    async def get(self, key: str) -> Answer | None: ...

    async def put(self, key: str, answer: Answer, tags: Sequence[str]) -> None: ...

    async def invalidate_tag(self, tag: str) -> int: ...

    async def invalidate_key(self, key: str) -> int: ...

    async def invalidate_all(self) -> int: ...

    async def entries(self) -> int: ...


@dataclass
class _MemoryEntry:
    answer: Answer
    tags: tuple[str, ...]
    expires_at: float


class MemoryResponseCache:
    """Per-replica fallback: entries expire after `ttl_seconds`, and beyond `max_entries` the
    least recently used go first. Single-threaded asyncio needs no locks."""

    def __init__(
        self,
        ttl_seconds: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _MemoryEntry] = OrderedDict()
        self._by_tag: dict[str, set[str]] = {}

    async def get(self, key: str) -> Answer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry.answer

    async def put(self, key: str, answer: Answer, tags: Sequence[str]) -> None:
        self._drop(key)
        self._entries[key] = _MemoryEntry(answer, tuple(tags), self._clock() + self.ttl_seconds)
        for tag in tags:
            self._by_tag.setdefault(tag, set()).add(key)
        while len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)))

    async def invalidate_tag(self, tag: str) -> int:
        keys = self._by_tag.pop(tag, set())
        return sum(self._drop(k) for k in list(keys))

    async def invalidate_key(self, key: str) -> int:
        return self._drop(key)

    async def invalidate_all(self) -> int:
        self._purge_expired()
        removed = len(self._entries)
        self._entries.clear()
        self._by_tag.clear()
        return removed

    async def entries(self) -> int:
        self._purge_expired()
        return len(self._entries)

    def _purge_expired(self) -> None:
        now = self._clock()
        for key in [k for k, e in self._entries.items() if e.expires_at <= now]:
            self._drop(key)

    def _drop(self, key: str) -> int:
        entry = self._entries.pop(key, None)
        if entry is None:
            return 0
        for tag in entry.tags:
            keys = self._by_tag.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_tag[tag]
        # An expired entry was already gone as far as callers could tell.
        return 1 if entry.expires_at > self._clock() else 0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class RedisResponseCache:
    """The shared cache. Layout under the deployment's prefix:

    - `gencache:entry:<key>`  the answer as JSON, with the TTL;
    - `gencache:tag:<tag>`    sorted set of keys carrying the tag, scored by expiry time;
    - `gencache:index`        sorted set of every key, scored by expiry time (entry count).

    Sorted sets scored by expiry let each write prune members whose entries have expired, so
    tag sets stay as small as the live entries. Writes are MULTI/EXEC transactions, so a tag
    invalidation never sees an entry without its tag membership.
    """

    def __init__(self, redis: ResilientRedis, ttl_seconds: int) -> None:
        self.redis = redis
        self.ttl_seconds = ttl_seconds
        self._index = redis.key(NAMESPACE, "index")

    def _entry_key(self, key: str) -> str:
        return self.redis.key(NAMESPACE, "entry", key)

    def _tag_key(self, tag: str) -> str:
        return self.redis.key(NAMESPACE, "tag", tag)

    async def get(self, key: str) -> Answer | None:
        entry_key = self._entry_key(key)
        raw = await self.redis.run("get", lambda client: client.get(entry_key))
        if raw is None:
            return None
        try:
            return Answer.from_json(raw)
        except (ValueError, TypeError):
            log.warning("dropping a malformed cache entry", extra={"cache_key": key})
            await self.redis.run("delete", lambda client: client.delete(entry_key))
            return None

    async def put(self, key: str, answer: Answer, tags: Sequence[str]) -> None:
        now = time.time()
        expires_at = now + self.ttl_seconds
        payload = answer.to_json()

        async def write(client: Redis) -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.set(self._entry_key(key), payload, ex=self.ttl_seconds)
                for sorted_set in (self._index, *(self._tag_key(t) for t in tags)):
                    pipe.zadd(sorted_set, {key: expires_at})
                    pipe.zremrangebyscore(sorted_set, "-inf", now)
                    # Every entry has the same TTL, so the newest member expires last.
                    pipe.expire(sorted_set, self.ttl_seconds)
                await pipe.execute()

        await self.redis.run("set", write)

    async def invalidate_tag(self, tag: str) -> int:
        tag_key = self._tag_key(tag)

        async def take_members(client: Redis) -> list[str]:
            # Read and drop the tag set atomically: a concurrent write either lands before
            # (and is removed below) or after (and keeps a fresh tag membership).
            async with client.pipeline(transaction=True) as pipe:
                pipe.zrange(tag_key, 0, -1)
                pipe.delete(tag_key)
                members, _ = await pipe.execute()
            return [_text(m) for m in members]

        return await self._delete_entries(await self.redis.run("cache_invalidate", take_members))

    async def invalidate_key(self, key: str) -> int:
        return await self._delete_entries([key])

    async def _delete_entries(self, keys: Sequence[str]) -> int:
        removed = 0
        for start in range(0, len(keys), SCAN_BATCH):
            batch = keys[start : start + SCAN_BATCH]

            async def delete(client: Redis, batch: Sequence[str] = batch) -> int:
                async with client.pipeline(transaction=True) as pipe:
                    pipe.unlink(*(self._entry_key(k) for k in batch))
                    pipe.zrem(self._index, *batch)
                    unlinked, _ = await pipe.execute()
                return int(unlinked)

            removed += await self.redis.run("cache_invalidate", delete)
        return removed

    async def invalidate_all(self) -> int:
        """Every key of this deployment's cache (SCAN under our prefix, never FLUSHDB: the
        Redis may be shared). Returns the number of answers removed."""
        entry_prefix = self.redis.key(NAMESPACE, "entry", "")
        pattern = _glob_escape(self.redis.key(NAMESPACE, "")) + "*"
        removed = 0
        cursor = 0
        while True:

            async def scan(client: Redis, cursor: int = cursor) -> tuple[int, list[str]]:
                next_cursor, keys = await client.scan(cursor, match=pattern, count=SCAN_BATCH)
                return int(next_cursor), [_text(k) for k in keys]

            cursor, keys = await self.redis.run("cache_scan", scan)
            if keys:
                entries = [k for k in keys if k.startswith(entry_prefix)]
                others = [k for k in keys if not k.startswith(entry_prefix)]

                async def unlink(
                    client: Redis, entries: list[str] = entries, others: list[str] = others
                ) -> int:
                    removed = int(await client.unlink(*entries)) if entries else 0
                    if others:
                        await client.unlink(*others)
                    return removed

                removed += await self.redis.run("cache_invalidate", unlink)
            if cursor == 0:
                return removed

    async def entries(self) -> int:
        async def count(client: Redis) -> int:
            async with client.pipeline(transaction=True) as pipe:
                pipe.zremrangebyscore(self._index, "-inf", time.time())
                pipe.zcard(self._index)
                _, total = await pipe.execute()
            return int(total)

        return await self.redis.run("cache_entries", count)


class ResilientResponseCache:
    """Redis while it answers; the in-memory cache for any request that finds Redis unset,
    failing or bypassed by its breaker (so a Redis outage costs at most one slow call)."""

    def __init__(self, shared: RedisResponseCache | None, fallback: MemoryResponseCache) -> None:
        self.shared = shared
        self.fallback = fallback
        self.hits = 0
        self.misses = 0
        self.invalidations = 0

    @property
    def backend(self) -> str:
        return "redis" if self.shared is not None and self.shared.redis.available else "memory"

    def _shared(self) -> RedisResponseCache | None:
        return self.shared if self.backend == "redis" else None

    async def get(self, key: str) -> Answer | None:
        answer: Answer | None
        shared = self._shared()
        try:
            if shared is None:
                raise RedisUnavailable("cache")
            answer = await shared.get(key)
        except RedisUnavailable:
            answer = await self.fallback.get(key)
        if answer is None:
            self.misses += 1
            CACHE_LOOKUPS.labels("miss").inc()
        else:
            self.hits += 1
            CACHE_LOOKUPS.labels("hit").inc()
        return answer

    async def put(self, key: str, answer: Answer, tags: Sequence[str]) -> None:
        """Never raises: an answer that could not be cached is still a good answer."""
        shared = self._shared()
        try:
            if shared is None:
                raise RedisUnavailable("cache")
            await shared.put(key, answer, tags)
        except RedisUnavailable:
            await self.fallback.put(key, answer, tags)

    async def invalidate_tag(self, tag: str) -> int:
        return await self._invalidate(lambda cache: cache.invalidate_tag(tag))

    async def invalidate_key(self, key: str) -> int:
        return await self._invalidate(lambda cache: cache.invalidate_key(key))

    async def invalidate_all(self) -> int:
        return await self._invalidate(lambda cache: cache.invalidate_all())

    async def _invalidate(self, operation: Callable[[ResponseCache], Awaitable[int]]) -> int:
        # Both stores: the fallback may hold answers written while Redis was away. The
        # fallback is per replica: other replicas' fallbacks are not reached (they expire).
        removed = await operation(self.fallback)
        if self.shared is not None:
            try:
                removed += await operation(self.shared)
            except RedisUnavailable:
                self.invalidations += removed
                # Pretending success would leave stale answers in the shared cache.
                raise ServiceError(
                    grpc.StatusCode.UNAVAILABLE,
                    Reason.DEPENDENCY_UNAVAILABLE,
                    f"Redis is unreachable: removed {removed} entries from this replica's "
                    "fallback cache but none from the shared cache; try again",
                    retry_after_seconds=max(1.0, self.shared.redis.breaker.retry_after()),
                ) from None
        self.invalidations += removed
        return removed

    async def stats(self) -> CacheStats:
        backend = self.backend
        entries: int
        try:
            shared = self._shared()
            if shared is None:
                raise RedisUnavailable("cache")
            entries = await shared.entries()
        except RedisUnavailable:
            backend = "memory"
            entries = await self.fallback.entries()
        return CacheStats(self.hits, self.misses, entries, self.invalidations, backend)
