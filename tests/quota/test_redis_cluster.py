"""The quota and rate-limit Lua scripts, unchanged, on a three-node Redis Cluster this test
starts from the installed redis-server: each script's keys share a hash tag, so they hash to
one slot and the cluster runs the script on that slot's node. (A script whose keys spanned
slots would be refused: the last test shows the cluster checks.)"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ClusterCrossSlotError, RedisClusterException

from devstack import infra
from services.common.perf import PerformanceMonitor
from services.common.redis import ResilientRedis
from services.quota.clock import QuotaClock
from services.quota.guest_store import RedisGuestQuotaStore, guest_tag
from services.quota.profile_cache import ProfileCache
from services.quota.ratelimit.config import Escalation, Limit, Scope, Unit
from services.quota.ratelimit.limiter import Subject, Verdict
from services.quota.ratelimit.redis_limiter import RedisLimiter
from services.quota.reservations import Settlement, new_guest_reservation
from tests.quota.conftest import SettingsFactory, unique_ip

pytestmark = pytest.mark.integration

ESCALATION = Escalation(violations=2, window_ms=60_000, blocks_ms=(60_000,), forget_after_ms=60_000)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[infra.PrivateRedisCluster]:
    scratch: Path = tmp_path_factory.mktemp("redis-cluster")
    started = infra.private_redis_cluster(scratch, size=3)
    yield started
    started.stop()


@pytest.fixture
async def redis(
    cluster: infra.PrivateRedisCluster, quota_settings: SettingsFactory
) -> AsyncIterator[ResilientRedis]:
    client = RedisCluster.from_url(cluster.url)
    # ResilientRedis is typed for a single server; a cluster client speaks the same commands.
    resilient = ResilientRedis(quota_settings(), PerformanceMonitor(), client=cast(Redis, client))
    yield resilient
    await client.aclose()


async def test_the_cluster_has_three_primaries_sharing_the_slots(
    redis: ResilientRedis,
) -> None:
    client = cast(RedisCluster, redis.client)
    await client.initialize()
    assert len(client.get_primaries()) == 3


async def test_guest_quota_scripts_run_on_the_cluster(redis: ResilientRedis) -> None:
    store = RedisGuestQuotaStore(redis, ttl_seconds=0.3)
    window = QuotaClock().window()
    ip = unique_ip()
    rids = [new_guest_reservation(guest_tag(ip, window.day)) for _ in range(4)]
    results = await asyncio.gather(*(store.reserve(ip, window, 3, rid) for rid in rids))
    assert sorted(r.reserved for r in results) == [False, True, True, True]
    granted = [rid for rid, r in zip(rids, results, strict=True) if r.reserved]
    committed = await store.settle(granted[0], Settlement.COMMIT)
    refunded = await store.settle(granted[1], Settlement.REFUND)
    assert committed is not None and committed.applied
    assert refunded is not None and refunded.applied and refunded.used == 2
    await asyncio.sleep(0.5)  # the third is never settled: it expires and gives its unit back
    assert await store.used(ip, window) == 1


async def test_guest_consume_runs_on_the_cluster(redis: ResilientRedis) -> None:
    store = RedisGuestQuotaStore(redis, ttl_seconds=0.3)
    window = QuotaClock().window()
    ip = unique_ip()
    rids = [new_guest_reservation(guest_tag(ip, window.day)) for _ in range(3)]
    results = await asyncio.gather(*(store.reserve(ip, window, 2, r, consume=True) for r in rids))
    assert sorted(r.reserved for r in results) == [False, True, True]
    consumed = next(rid for rid, r in zip(rids, results, strict=True) if r.reserved)
    assert redis.client is not None
    assert await redis.client.zcard(store.keys(consumed.tag)[1]) == 0  # nothing pending
    await asyncio.sleep(0.5)  # past the TTL: nothing expires, both units stay used
    assert await store.used(ip, window) == 2
    late = await store.settle(consumed, Settlement.REFUND)
    assert late is not None and (late.applied, late.used) == (False, 2)


async def test_rate_limit_scripts_run_on_the_cluster(redis: ResilientRedis) -> None:
    limiter = RedisLimiter(redis)
    who = Subject(Scope.IP, f"2001:db8:{uuid.uuid4().hex[:4]}::/64")
    limit = Limit(2, Unit.MINUTE)
    verdicts = [(await limiter.check(who, "feedback", limit, ESCALATION)).verdict for _ in range(4)]
    assert verdicts == [Verdict.ALLOWED, Verdict.ALLOWED, Verdict.LIMITED, Verdict.BLOCKED]
    assert who in {block.subject for block in await limiter.blocks()}
    blocked = await limiter.blocked(who)
    assert blocked is not None and blocked.verdict is Verdict.BLOCKED
    assert await limiter.lift(who)
    assert await limiter.blocked(who) is None
    assert not (await limiter.check(who, "reads", limit, ESCALATION)).refused


async def test_profile_cache_scripts_run_on_the_cluster(redis: ResilientRedis) -> None:
    cache = ProfileCache(redis, ttl_seconds=60)
    user_id = f"user-{uuid.uuid4()}"
    miss = await cache.lookup(user_id)
    assert miss.profile is None and miss.fence is not None
    await cache.invalidate(user_id)
    assert (await cache.lookup(user_id)).fence != miss.fence


async def test_keys_in_different_slots_are_refused(redis: ResilientRedis) -> None:
    client = cast(RedisCluster, redis.client)
    script = client.register_script("return redis.call('GET', KEYS[2])")
    # Refused by the client when it knows the slots, by the node otherwise.
    with pytest.raises((RedisClusterException, ClusterCrossSlotError), match="same"):
        await script(keys=["genmesh:{a}:x", "genmesh:{b}:y"])
