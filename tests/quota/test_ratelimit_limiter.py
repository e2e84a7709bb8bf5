"""The limiter's semantics, run against both implementations (the shared Redis script and the
per-replica memory fallback), which must agree: GCRA counts, refills and Retry-After, the
window edge, escalation to blocks, listing, looking up and lifting blocks, bursts counted with
blocking off. Plus what only Redis does: exactness across replicas, the fallback that engages
and returns by itself, and a Redis that hangs costing a decision its budget, not Envoy's
whole wait."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devstack import infra
from services.common.perf import PerformanceMonitor
from services.common.redis import RedisUnavailable, ResilientRedis
from services.quota.app import build_decider
from services.quota.ratelimit.config import Escalation, Limit, Scope, Unit
from services.quota.ratelimit.limiter import FallbackLimiter, Limiter, Subject, Verdict
from services.quota.ratelimit.memory_limiter import MemoryLimiter
from services.quota.ratelimit.redis_limiter import RedisLimiter
from tests.quota.conftest import SettingsFactory

NO_BLOCKS = Escalation(violations=0, window_ms=60_000, blocks_ms=(60_000,), forget_after_ms=1)
FIVE_PER_SECOND = Limit(5, Unit.SECOND)
THREE_PER_MINUTE = Limit(3, Unit.MINUTE)


def escalation(violations: int = 3, *blocks_ms: int) -> Escalation:
    return Escalation(
        violations=violations,
        window_ms=60_000,
        blocks_ms=blocks_ms or (400, 800),
        forget_after_ms=60_000,
    )


def subject(scope: Scope = Scope.IP) -> Subject:
    return Subject(scope, f"198.51.100.{uuid.uuid4().int % 250}-{uuid.uuid4().hex[:8]}")


@pytest.fixture(params=["redis", "memory"])
def limiter(request: pytest.FixtureRequest, redis: ResilientRedis) -> Limiter:
    if request.param == "redis":
        return RedisLimiter(redis)
    return MemoryLimiter()


async def test_a_burst_of_the_limit_passes_then_the_next_waits_one_interval(
    limiter: Limiter,
) -> None:
    who = subject()
    results = [await limiter.check(who, "feedback", THREE_PER_MINUTE, NO_BLOCKS) for _ in range(4)]
    assert [r.verdict for r in results] == [Verdict.ALLOWED] * 3 + [Verdict.LIMITED]
    assert [r.remaining for r in results] == [2, 1, 0, 0]
    # Allowed: the limit is whole again one interval per request used.
    assert 19_000 < results[0].reset_ms <= 20_000
    assert 55_000 < results[2].reset_ms <= 60_000
    # Refused: one more request passes after one emission interval (60 s / 3).
    assert 15_000 < results[3].retry_after_ms <= 20_000
    # Blocking is off, but the refusal is counted: the first of a burst is reported.
    assert results[3].violations == 1 and not results[3].started_block


async def test_retry_after_counts_down(limiter: Limiter) -> None:
    who = subject()
    for _ in range(3):
        await limiter.check(who, "feedback", THREE_PER_MINUTE, NO_BLOCKS)
    started = time.monotonic()
    first = await limiter.check(who, "feedback", THREE_PER_MINUTE, NO_BLOCKS)
    await asyncio.sleep(0.3)
    later = await limiter.check(who, "feedback", THREE_PER_MINUTE, NO_BLOCKS)
    elapsed_ms = (time.monotonic() - started) * 1000
    assert later.refused and first.refused
    # It went down by the time that passed (give or take a call).
    assert 250 <= first.retry_after_ms - later.retry_after_ms <= elapsed_ms + 50


async def test_a_used_request_comes_back_after_one_interval(limiter: Limiter) -> None:
    who = subject()
    for _ in range(5):
        assert not (await limiter.check(who, "generate", FIVE_PER_SECOND, NO_BLOCKS)).refused
    refused = await limiter.check(who, "generate", FIVE_PER_SECOND, NO_BLOCKS)
    assert refused.refused
    await asyncio.sleep(refused.retry_after_ms / 1000 + 0.02)
    assert not (await limiter.check(who, "generate", FIVE_PER_SECOND, NO_BLOCKS)).refused
    assert (await limiter.check(who, "generate", FIVE_PER_SECOND, NO_BLOCKS)).refused


async def test_no_fresh_burst_at_a_window_edge(limiter: Limiter) -> None:
    """A fixed one-second window would admit 5 just before a whole second and 5 more just after
    it. GCRA admits only what refilled in between: over any span of t seconds at most
    5 + 5 * t, so barely more than 5 across the edge."""
    who = subject()
    now = time.time()
    await asyncio.sleep(1 - (now % 1) + 0.85 if now % 1 > 0.5 else 0.85 - (now % 1))
    started = time.monotonic()
    before = [await limiter.check(who, "events", FIVE_PER_SECOND, NO_BLOCKS) for _ in range(5)]
    await asyncio.sleep(max(0.0, 0.25 - (time.monotonic() - started)))  # past the whole second
    after = [await limiter.check(who, "events", FIVE_PER_SECOND, NO_BLOCKS) for _ in range(5)]
    elapsed = time.monotonic() - started
    assert all(not r.refused for r in before)
    admitted_after = sum(not r.refused for r in after)
    assert admitted_after < 5  # not a fresh window
    assert 5 + admitted_after <= 5 + int(elapsed * 5) + 1


async def test_subjects_and_routes_count_apart(limiter: Limiter) -> None:
    one, other = subject(), subject(Scope.USER)
    for _ in range(3):
        await limiter.check(one, "feedback", THREE_PER_MINUTE, NO_BLOCKS)
    assert (await limiter.check(one, "feedback", THREE_PER_MINUTE, NO_BLOCKS)).refused
    assert not (await limiter.check(one, "wishlist", THREE_PER_MINUTE, NO_BLOCKS)).refused
    assert not (await limiter.check(other, "feedback", THREE_PER_MINUTE, NO_BLOCKS)).refused


async def test_repeated_refusals_escalate_to_longer_blocks_on_every_route(
    limiter: Limiter,
) -> None:
    who = subject()
    policy = escalation(3, 500, 1500)
    for _ in range(3):
        await limiter.check(who, "feedback", THREE_PER_MINUTE, policy)
    violations = [await limiter.check(who, "feedback", THREE_PER_MINUTE, policy) for _ in range(3)]
    assert [v.verdict for v in violations] == [Verdict.LIMITED, Verdict.LIMITED, Verdict.BLOCKED]
    assert [v.violations for v in violations] == [1, 2, 3]
    started = violations[2]
    assert started.started_block and started.block_level == 1
    assert 400 < started.retry_after_ms <= 500

    # Blocked on another route too, with the block's own remaining time.
    elsewhere = await limiter.check(who, "reads", FIVE_PER_SECOND, policy)
    assert elsewhere.verdict is Verdict.BLOCKED and not elsewhere.started_block
    assert elsewhere.block_level == 1
    assert 0 < elsewhere.retry_after_ms <= started.retry_after_ms

    await asyncio.sleep(0.6)  # the first block ends
    assert not (await limiter.check(who, "reads", FIVE_PER_SECOND, policy)).refused
    again = [await limiter.check(who, "feedback", THREE_PER_MINUTE, policy) for _ in range(3)]
    assert again[-1].started_block and again[-1].block_level == 2
    assert 1400 < again[-1].retry_after_ms <= 1500  # the next step


async def test_with_blocking_off_refusals_are_counted_per_window_but_never_block(
    limiter: Limiter,
) -> None:
    """RATE_LIMIT_BLOCK_AFTER=0: the burst is still known (violations 1, 2, ...), so the
    decider can report it, but no number of refusals blocks."""
    who = subject()
    for _ in range(3):
        await limiter.check(who, "feedback", THREE_PER_MINUTE, NO_BLOCKS)
    refused = [await limiter.check(who, "feedback", THREE_PER_MINUTE, NO_BLOCKS) for _ in range(40)]
    assert {r.verdict for r in refused} == {Verdict.LIMITED}
    assert [r.violations for r in refused] == list(range(1, 41))
    assert not any(r.started_block for r in refused)
    assert await limiter.blocked(who) is None
    assert who not in {block.subject for block in await limiter.blocks()}
    assert not (await limiter.check(who, "reads", FIVE_PER_SECOND, NO_BLOCKS)).refused


async def test_blocked_finds_a_block_and_counts_nothing(limiter: Limiter) -> None:
    who, bystander = subject(), subject()
    policy = escalation(1, 60_000)
    for _ in range(10):  # looking up a block uses no allowance
        assert await limiter.blocked(bystander) is None
    assert (await limiter.check(bystander, "feedback", THREE_PER_MINUTE, policy)).remaining == 2

    for _ in range(4):  # the allowance, then one refusal: a block
        started = await limiter.check(who, "feedback", THREE_PER_MINUTE, policy)
    assert started.started_block
    found = await limiter.blocked(who)
    assert found is not None and found.verdict is Verdict.BLOCKED
    assert found.block_level == 1 and not found.started_block
    assert 59_000 < found.retry_after_ms <= 60_000
    assert found.remaining == 0

    assert await limiter.lift(who)
    assert await limiter.blocked(who) is None


async def test_blocks_are_listed_and_lifted(limiter: Limiter) -> None:
    who, bystander = subject(), subject()
    policy = escalation(2, 60_000)
    for _ in range(3):
        await limiter.check(bystander, "feedback", THREE_PER_MINUTE, policy)
    for _ in range(5):
        await limiter.check(who, "feedback", THREE_PER_MINUTE, policy)
    listed = {block.subject: block for block in await limiter.blocks()}
    assert who in listed and bystander not in listed
    assert listed[who].level == 1
    assert 59_000 < listed[who].until_ms - time.time() * 1000 <= 60_500

    assert await limiter.lift(who)
    assert who not in {block.subject for block in await limiter.blocks()}
    assert not (await limiter.check(who, "reads", FIVE_PER_SECOND, policy)).refused
    assert not await limiter.lift(who)  # nothing left to lift
    # Lifting forgave the history: the next block starts again at the first step.
    for _ in range(5):
        last = await limiter.check(who, "feedback", THREE_PER_MINUTE, policy)
    assert last.block_level == 1


async def test_redis_counts_exactly_across_replicas(quota_settings: SettingsFactory) -> None:
    """Two limiters on two connections (two quota replicas) and 60 concurrent checks against
    a limit of 10: exactly 10 pass."""
    replicas = [ResilientRedis(quota_settings(), PerformanceMonitor()) for _ in range(2)]
    try:
        limiters = [RedisLimiter(r) for r in replicas]
        who = subject()
        limit = Limit(10, Unit.MINUTE)
        results = await asyncio.gather(
            *(limiters[i % 2].check(who, "generate", limit, NO_BLOCKS) for i in range(60))
        )
        assert sum(not r.refused for r in results) == 10
        assert sorted(r.remaining for r in results if not r.refused) == list(range(10))
    finally:
        for r in replicas:
            await r.close()


async def test_redis_keys_of_one_subject_share_a_hash_tag(redis: ResilientRedis) -> None:
    limiter = RedisLimiter(redis)
    keys = limiter.keys(Subject(Scope.USER, "odd{user}%id"), "generate")
    tags = {key[key.index("{") + 1 : key.index("}")] for key in keys}
    assert len(tags) == 1
    (tag,) = tags
    assert "{" not in tag and "}" not in tag
    assert limiter.keys(Subject(Scope.USER, "odd{user}%id2"), "generate")[0] != keys[0]


async def test_fallback_engages_per_call_and_returns_to_redis(
    quota_settings: SettingsFactory,
) -> None:
    redis = ResilientRedis(quota_settings(redis_cooldown_seconds=0.2), PerformanceMonitor())
    try:
        memory = MemoryLimiter()
        limiter = FallbackLimiter(RedisLimiter(redis), memory)
        who = subject()
        for _ in range(redis.breaker.failure_threshold):
            permit = redis.breaker.try_acquire()
            assert permit is not None
            permit.failure()
        assert not redis.available
        assert (await limiter.check(who, "feedback", THREE_PER_MINUTE, NO_BLOCKS)).remaining == 2
        assert (await memory.check(who, "feedback", THREE_PER_MINUTE, NO_BLOCKS)).remaining == 1

        await asyncio.sleep(0.3)  # the cooldown passes; the next call probes Redis
        assert (await limiter.check(who, "feedback", THREE_PER_MINUTE, NO_BLOCKS)).remaining == 2
        assert redis.available
    finally:
        await redis.close()


async def test_lifting_while_redis_is_down_says_so(quota_settings: SettingsFactory) -> None:
    redis = ResilientRedis(
        quota_settings(redis_url="redis://127.0.0.1:1/0", redis_timeout_seconds=0.2),
        PerformanceMonitor(),
    )
    try:
        memory = MemoryLimiter()
        limiter = FallbackLimiter(RedisLimiter(redis), memory)
        who = subject()
        policy = escalation(1, 60_000)
        for _ in range(4):
            await limiter.check(who, "feedback", THREE_PER_MINUTE, policy)
        assert [b.backend for b in await limiter.blocks()] == ["memory"]
        async with asyncio.timeout(5):
            with pytest.raises(RedisUnavailable):
                await limiter.lift(who)
        assert await memory.blocks() == []  # lifted where it could be
    finally:
        await redis.close()


# -- a Redis that hangs: the decision's budget (RATE_LIMIT_REDIS_TIMEOUT_MS) --------------------

BUDGET_MS = 50
# Far below what the shared client alone would take (a 0.5 s socket timeout, then a retry),
# with room for a slow CI machine.
WITHIN_BUDGET_SECONDS = 0.25


@pytest.fixture
async def silent_redis() -> AsyncIterator[str]:
    """A TCP server that accepts connections and never answers: a Redis URL that hangs."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(4096):
            pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.close()


async def test_a_silent_redis_costs_each_check_its_budget_then_the_breaker_skips_it(
    quota_settings: SettingsFactory, silent_redis: str
) -> None:
    redis = ResilientRedis(
        quota_settings(redis_url=silent_redis, redis_error_threshold=2, redis_timeout_seconds=0.05),
        PerformanceMonitor(),
    )
    try:
        memory = MemoryLimiter()
        limiter = FallbackLimiter(RedisLimiter(redis, timeout_seconds=BUDGET_MS / 1000), memory)
        who = subject()
        started = time.monotonic()
        first = await limiter.check(who, "feedback", THREE_PER_MINUTE, NO_BLOCKS)
        assert time.monotonic() - started < WITHIN_BUDGET_SECONDS
        assert first.remaining == 2  # decided from memory
        started = time.monotonic()
        assert await limiter.blocked(who) is None  # from memory too
        assert time.monotonic() - started < WITHIN_BUDGET_SECONDS
        # An expired budget is not counted against Redis (a late event loop expires it as
        # well); the shared client's own timeouts are, as any other caller meets them.
        assert redis.breaker.snapshot().consecutive_failures == 0
        for _ in range(2):
            with pytest.raises(RedisUnavailable):
                await redis.run("probe", lambda client: client.get("k"))
        assert not redis.available
        # The breaker is open: checks go to memory without waiting at all.
        started = time.monotonic()
        assert (await limiter.check(who, "feedback", THREE_PER_MINUTE, NO_BLOCKS)).remaining == 1
        assert time.monotonic() - started < BUDGET_MS / 1000
    finally:
        await redis.close()


async def test_a_hung_redis_costs_a_decision_its_budget_not_envoys_wait(
    quota_settings: SettingsFactory, tmp_path: Path
) -> None:
    """A real Redis that stops answering mid-connection (SIGSTOP): Envoy waits 100 ms for the
    decision (GATEWAY_RATE_LIMIT_TIMEOUT_MS) and lets the request pass after that, so the
    decision must come from memory within RATE_LIMIT_REDIS_TIMEOUT_MS instead of waiting out
    the shared client's timeouts."""
    server = infra.private_redis(tmp_path)
    if server is None or server.process is None:
        pytest.skip("redis-server is not installed")
    settings = quota_settings(redis_url=server.url, rate_limit_redis_timeout_ms=BUDGET_MS)
    redis = ResilientRedis(settings, PerformanceMonitor())
    try:
        decider = build_decider(settings, redis, None)
        path, ip, user_id = "/api/feedback", unique_network(), f"user-{uuid.uuid4()}"
        descriptors = [{"path": path, "remote_address": ip}, {"path": path, "user": user_id}]
        counted = await decider.decide(descriptors)  # Redis answers
        assert [s.result.remaining for s in counted.statuses if s.result] == [29, 9]

        server.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            decision = await decider.decide(descriptors)
            elapsed = time.monotonic() - started
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert elapsed < WITHIN_BUDGET_SECONDS, elapsed
        assert not decision.over_limit
        # Memory has not seen the first request; Redis would have said 28 and 8.
        assert [s.result.remaining for s in decision.statuses if s.result] == [29, 9]
        # An expired budget is no failure of Redis's (a late event loop expires it too): the
        # breaker stays closed and the next decision asks Redis again.
        assert redis.breaker.snapshot().consecutive_failures == 0

        back = await decider.decide(descriptors)  # Redis answers again, with its counts
        # The scripts that timed out had been sent: Redis may have run them once resumed
        # (counting that request twice, once here and once in memory), never lost this one.
        ip_left, user_left = (s.result.remaining for s in back.statuses if s.result)
        assert (ip_left, user_left) in {(28, 8), (27, 7)}
    finally:
        await redis.close()
        server.stop()


def unique_network() -> str:
    h = uuid.uuid4().hex
    return f"2001:db8:{h[:4]}:{h[4:8]}::1"
