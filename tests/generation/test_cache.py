from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from services.common.errors import ServiceError
from services.common.perf import PerformanceMonitor
from services.common.redis import ResilientRedis
from services.common.settings import RedisSettings
from services.generation.answer import Answer, Usage
from services.generation.cache import (
    MemoryResponseCache,
    RedisResponseCache,
    ResilientResponseCache,
    cache_key,
    cache_tags,
    normalize_text,
)


def redis_settings(**values: Any) -> RedisSettings:
    return RedisSettings(**values)


def answer(text: str = "an answer") -> Answer:
    return Answer(text, "gpt-4o-mini", Usage(3, 4, 7))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- keys ----------------------------------------------------------------------------------------


def test_normalize_text() -> None:
    assert normalize_text("  Hello   world \t ") == "Hello world"
    assert normalize_text("a\r\nb\rc") == "a\nb\nc"
    assert normalize_text("line one  \n\n\n\n  line two") == "line one\n\nline two"
    assert normalize_text("cafe\u0301") == "caf\u00e9"  # NFC
    assert normalize_text("Case Matters") != normalize_text("case matters")


def test_cache_key_covers_everything_that_shapes_the_answer() -> None:
    base = {
        "model": "m",
        "text": "hello",
        "image_sha256": "",
        "lang": "en",
        "prompt_version": "v1",
    }
    key = cache_key(**base)
    assert key == cache_key(**base)
    assert len(key) == 64 and int(key, 16) >= 0
    for field, other in [
        ("model", "m2"),
        ("text", "hello!"),
        ("image_sha256", "ab"),
        ("lang", "de"),
        ("prompt_version", "v2"),
    ]:
        assert cache_key(**(base | {field: other})) != key, field


def test_tags() -> None:
    assert cache_tags(model="gpt-4o", lang="de", has_image=True) == (
        "model:gpt-4o",
        "lang:de",
        "kind:image",
    )
    assert cache_tags(model="m", lang="en", has_image=False)[2] == "kind:text"


def test_answer_json_round_trip_and_malformed() -> None:
    original = Answer("héllo", "m", Usage(1, 2, 3))
    assert Answer.from_json(original.to_json()) == original
    for bad in ["[]", '{"text": 5}', "nope", '{"text": "x", "usage": 5}']:
        with pytest.raises(ValueError):
            Answer.from_json(bad)


# -- memory --------------------------------------------------------------------------------------


async def test_memory_cache_expires_entries() -> None:
    clock = FakeClock()
    cache = MemoryResponseCache(ttl_seconds=10, max_entries=10, clock=clock)
    await cache.put("k", answer(), ["lang:en"])
    assert await cache.get("k") == answer()
    clock.now += 9.9
    assert await cache.entries() == 1
    clock.now += 0.2
    assert await cache.get("k") is None
    assert await cache.entries() == 0
    assert await cache.invalidate_tag("lang:en") == 0


async def test_memory_cache_evicts_the_least_recently_used() -> None:
    cache = MemoryResponseCache(ttl_seconds=60, max_entries=2)
    await cache.put("a", answer("a"), ["t"])
    await cache.put("b", answer("b"), ["t"])
    assert await cache.get("a") is not None  # a is now the most recent
    await cache.put("c", answer("c"), ["t"])
    assert await cache.get("b") is None
    assert await cache.get("a") is not None
    assert await cache.entries() == 2
    assert await cache.invalidate_tag("t") == 2  # the tag index forgot b


async def test_memory_cache_invalidation() -> None:
    cache = MemoryResponseCache(ttl_seconds=60, max_entries=10)
    await cache.put("a", answer(), ["lang:en", "kind:text"])
    await cache.put("b", answer(), ["lang:de", "kind:text"])
    await cache.put("c", answer(), ["lang:de", "kind:image"])
    assert await cache.invalidate_tag("lang:de") == 2
    assert await cache.invalidate_tag("lang:de") == 0
    assert await cache.invalidate_key("a") == 1
    assert await cache.invalidate_key("a") == 0
    await cache.put("d", answer(), ["x"])
    await cache.put("d", answer("new"), ["y"])  # re-put replaces, tags included
    assert await cache.invalidate_tag("x") == 0
    assert await cache.invalidate_all() == 1
    assert await cache.entries() == 0


# -- Redis ---------------------------------------------------------------------------------------


@pytest.fixture
async def shared_redis(redis_url: str, redis_prefix: str) -> AsyncIterator[ResilientRedis]:
    prefix = f"{redis_prefix}cache-{uuid.uuid4().hex[:8]}:"
    settings = redis_settings(redis_url=redis_url, redis_key_prefix=prefix)
    redis = ResilientRedis(settings, PerformanceMonitor())
    yield redis
    await redis.close()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.mark.integration
async def test_redis_cache_round_trip_with_ttl(shared_redis: ResilientRedis, raw: Redis) -> None:
    cache = RedisResponseCache(shared_redis, ttl_seconds=120)
    assert await cache.get("k") is None
    await cache.put("k", answer("stored"), ["lang:en", "kind:text"])
    assert await cache.get("k") == answer("stored")
    assert await cache.entries() == 1
    ttl = await raw.ttl(shared_redis.key("gencache", "entry", "k"))
    assert 100 < ttl <= 120
    assert await raw.exists(shared_redis.key("gencache", "tag", "lang:en")) == 1


@pytest.mark.integration
async def test_redis_cache_invalidation(shared_redis: ResilientRedis, raw: Redis) -> None:
    cache = RedisResponseCache(shared_redis, ttl_seconds=120)
    await cache.put("a", answer(), ["lang:en", "kind:text"])
    await cache.put("b", answer(), ["lang:de", "kind:text"])
    await cache.put("c", answer(), ["lang:de", "kind:image"])
    assert await cache.invalidate_tag("lang:de") == 2
    assert await cache.get("b") is None and await cache.get("c") is None
    assert await cache.get("a") is not None
    assert await cache.entries() == 1
    # The other tags still name b and c, but they count nothing that is gone.
    assert await cache.invalidate_tag("kind:image") == 0
    assert await cache.invalidate_key("a") == 1
    assert await cache.invalidate_key("a") == 0
    assert await cache.entries() == 0


@pytest.mark.integration
async def test_redis_invalidate_all_stays_within_the_prefix(
    shared_redis: ResilientRedis, raw: Redis, redis_prefix: str
) -> None:
    cache = RedisResponseCache(shared_redis, ttl_seconds=120)
    for i in range(3):
        await cache.put(f"k{i}", answer(), ["lang:en"])
    # More entries than one SCAN batch.
    entries = {shared_redis.key("gencache", "entry", f"bulk{i}"): "{}" for i in range(1200)}
    await raw.mset(entries)
    neighbour = f"{redis_prefix}neighbour-{uuid.uuid4().hex[:6]}:gencache:entry:x"
    await raw.set(neighbour, "keep me", ex=60)
    try:
        assert await cache.invalidate_all() == 1203
        assert await cache.entries() == 0
        left = [k async for k in raw.scan_iter(match=shared_redis.key("gencache", "*"))]
        assert left == []
        assert await raw.get(neighbour) == b"keep me"
    finally:
        await raw.delete(neighbour)


@pytest.mark.integration
async def test_redis_cache_drops_a_malformed_entry(
    shared_redis: ResilientRedis, raw: Redis
) -> None:
    cache = RedisResponseCache(shared_redis, ttl_seconds=120)
    entry = shared_redis.key("gencache", "entry", "bad")
    await raw.set(entry, b"\x00not json", ex=60)
    assert await cache.get("bad") is None
    assert await raw.exists(entry) == 0


@pytest.mark.integration
async def test_expired_members_are_pruned_from_tag_sets(
    shared_redis: ResilientRedis, raw: Redis
) -> None:
    cache = RedisResponseCache(shared_redis, ttl_seconds=1)
    await cache.put("old", answer(), ["lang:en"])
    await asyncio.sleep(1.1)
    cache.ttl_seconds = 60
    await cache.put("new", answer(), ["lang:en"])
    members = await raw.zrange(shared_redis.key("gencache", "tag", "lang:en"), 0, -1)
    assert members == [b"new"]
    assert await cache.entries() == 1


# -- resilience ----------------------------------------------------------------------------------


async def test_unreachable_redis_falls_back_to_memory_within_one_request() -> None:
    settings = redis_settings(
        redis_url="redis://127.0.0.1:1/0",
        redis_timeout_seconds=0.2,
        redis_error_threshold=1,
        redis_cooldown_seconds=60,
    )
    redis = ResilientRedis(settings, PerformanceMonitor())
    cache = ResilientResponseCache(RedisResponseCache(redis, 60), MemoryResponseCache(60, 10))
    try:
        async with asyncio.timeout(5):
            assert await cache.get("k") is None  # the failing call falls back at once
            await cache.put("k", answer(), ["lang:en"])
            assert await cache.get("k") == answer()
            stats = await cache.stats()
        assert (stats.hits, stats.misses, stats.entries, stats.backend) == (1, 1, 1, "memory")

        # Invalidation cannot reach the shared cache: it says so rather than pretend.
        with pytest.raises(ServiceError) as caught:
            await cache.invalidate_tag("lang:en")
        assert caught.value.code is grpc.StatusCode.UNAVAILABLE
        assert caught.value.reason == "DEPENDENCY_UNAVAILABLE"
        assert caught.value.retry_after_seconds is not None
        assert await cache.fallback.entries() == 0  # ... after clearing what it could
    finally:
        await redis.close()


async def test_without_redis_configured_memory_is_the_cache() -> None:
    cache = ResilientResponseCache(None, MemoryResponseCache(60, 10))
    await cache.put("k", answer(), ["lang:en"])
    assert cache.backend == "memory"
    assert await cache.invalidate_tag("lang:en") == 1
    assert (await cache.stats()).invalidations == 1
