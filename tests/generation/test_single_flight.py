"""Single-flight and retries in the pipeline (scripted upstream, no Redis), and the Redis
lease protocol behind single-flight across replicas (this run's Redis)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from services.common.errors import Reason, ServiceError
from services.common.perf import PerformanceMonitor
from services.common.redis import ResilientRedis
from services.common.settings import RedisSettings
from services.generation.answer import Answer, Usage
from services.generation.flight_leases import FlightLeases, Following, Lease
from services.generation.pipeline import Delta, Done
from services.generation.upstream import Prompt
from services.generation.upstream_errors import UpstreamError, upstream_unavailable
from tests.generation.pipeline_rig import ScriptedUpstream, collect, request, rig


class FlakyUpstream(ScriptedUpstream):
    """Fails with `errors` in turn, then answers."""

    def __init__(self, *errors: Exception) -> None:
        super().__init__()
        self.errors = list(errors)

    async def complete(self, prompt: Prompt) -> Answer:
        self.prompts.append(prompt)
        if self.errors:
            raise self.errors.pop(0)
        return Answer("fine", prompt.model, Usage(1, 1, 2))


def transient(retry_after: float | None = None) -> UpstreamError:
    return UpstreamError(
        upstream_unavailable("busy", retry_after or 2.0),
        counts_as_failure=True,
        retryable=True,
        upstream_retry_after=retry_after,
    )


def rejected() -> UpstreamError:
    error = ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.UPSTREAM_REJECTED, "no")
    return UpstreamError(error, counts_as_failure=False, retryable=False)


# -- single-flight within a replica --------------------------------------------------------------


async def test_identical_misses_share_one_call_and_each_pays_for_its_answer() -> None:
    r = rig(ScriptedUpstream(delay=0.05), max_inflight=1)
    results = await asyncio.gather(*(r.pipeline.generate(request("same")) for _ in range(6)))
    assert len(r.upstream.prompts) == 1
    assert {res.answer.text for res in results} == {"Hello there friend."}
    assert r.quota.used == 6  # every caller got an answer, so every caller pays
    assert r.limiter.active == 0


async def test_a_follower_is_never_refused_as_overloaded() -> None:
    r = rig(ScriptedUpstream(delay=0.1), max_inflight=1)
    leader = asyncio.create_task(r.pipeline.generate(request("same")))
    while not r.upstream.prompts:
        await asyncio.sleep(0.005)
    followers = await asyncio.gather(*(r.pipeline.generate(request("same")) for _ in range(5)))
    assert (await leader).answer.text == followers[0].answer.text
    with pytest.raises(ServiceError):  # a different prompt would need a slot of its own
        await asyncio.gather(
            r.pipeline.generate(request("other")), r.pipeline.generate(request("third"))
        )


async def test_the_call_survives_its_leader_leaving_while_others_wait() -> None:
    r = rig(ScriptedUpstream(delay=0.2))
    leader = asyncio.create_task(r.pipeline.generate(request("same")))
    while not r.upstream.prompts:
        await asyncio.sleep(0.005)
    follower = asyncio.create_task(r.pipeline.generate(request("same")))
    await asyncio.sleep(0.02)
    leader.cancel()
    result = await follower
    assert result.answer.text == "Hello there friend."
    assert len(r.upstream.prompts) == 1
    await r.background.drain(5)
    assert sorted(commit for _, commit in r.quota.settlements) == [False, True]


async def test_a_failed_call_fails_every_follower_once() -> None:
    r = rig(ScriptedUpstream(delay=0.05, error=transient()))
    results = await asyncio.gather(
        *(r.pipeline.generate(request("same")) for _ in range(4)), return_exceptions=True
    )
    assert all(isinstance(res, ServiceError) for res in results)
    assert len(r.upstream.prompts) == 1
    assert r.breaker.snapshot().failures == 1
    await r.background.drain(5)
    assert r.quota.used == 0


async def test_a_stream_follower_gets_the_deltas_live_from_the_start() -> None:
    r = rig(ScriptedUpstream(delay=0.05))
    leader = asyncio.create_task(collect(r, request("same")))
    while not r.upstream.prompts:
        await asyncio.sleep(0.005)
    follower = await collect(r, request("same"))
    first = await leader
    assert [e.text for e in follower if isinstance(e, Delta)] == ["Hello ", "there ", "friend."]
    assert [e.text for e in first if isinstance(e, Delta)] == ["Hello ", "there ", "friend."]
    assert isinstance(follower[-1], Done) and not follower[-1].result.cached
    assert len(r.upstream.prompts) == 1


async def test_a_follower_with_a_shorter_deadline_leaves_alone() -> None:
    r = rig(ScriptedUpstream(delay=0.3))
    leader = asyncio.create_task(r.pipeline.generate(request("same")))
    while not r.upstream.prompts:
        await asyncio.sleep(0.005)
    loop = asyncio.get_running_loop()
    with pytest.raises(ServiceError) as caught:
        await r.pipeline.generate(request("same", deadline=loop.time() + 0.05))
    assert caught.value.reason == "UPSTREAM_TIMEOUT"
    assert (await leader).answer.text
    assert r.breaker.snapshot().failures == 0


# -- retries -------------------------------------------------------------------------------------


async def test_transient_failures_are_retried_and_every_attempt_is_seen() -> None:
    r = rig(FlakyUpstream(transient(), transient()), retries=2)
    result = await r.pipeline.generate(request())
    assert result.answer.text == "fine"
    snapshot = r.breaker.snapshot()
    assert (snapshot.failures, snapshot.successes) == (2, 1)


async def test_rejected_input_is_not_retried() -> None:
    r = rig(FlakyUpstream(rejected()), retries=3)
    with pytest.raises(ServiceError) as caught:
        await r.pipeline.generate(request())
    assert caught.value.reason == "UPSTREAM_REJECTED"
    assert len(r.upstream.prompts) == 1
    assert r.breaker.snapshot().failures == 0


async def test_an_upstream_retry_after_that_fits_is_honoured() -> None:
    r = rig(FlakyUpstream(transient(retry_after=0.04)), retries=1)
    started = time.monotonic()
    await r.pipeline.generate(request())
    assert time.monotonic() - started >= 0.04
    assert len(r.upstream.prompts) == 2


async def test_a_retry_after_longer_than_the_longest_wait_is_returned_not_waited() -> None:
    r = rig(FlakyUpstream(transient(retry_after=30)), retries=3)
    with pytest.raises(ServiceError) as caught:
        await r.pipeline.generate(request())
    assert caught.value.retry_after_seconds == 30
    assert len(r.upstream.prompts) == 1


async def test_no_retry_starts_past_the_deadline() -> None:
    r = rig(FlakyUpstream(*(transient(retry_after=0.04) for _ in range(20))), retries=20)
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    with pytest.raises(ServiceError):
        await r.pipeline.generate(request(deadline=loop.time() + 0.5))
    assert time.monotonic() - started < 0.5
    assert 3 <= len(r.upstream.prompts) < 12


async def test_a_call_the_breaker_refuses_is_not_retried() -> None:
    r = rig(FlakyUpstream(*(transient() for _ in range(5))), retries=4, threshold=2)
    with pytest.raises(ServiceError) as caught:
        await r.pipeline.generate(request())
    assert len(r.upstream.prompts) == 2  # the second failure opened it: no third attempt
    assert caught.value.retry_after_seconds is not None
    assert caught.value.retry_after_seconds > 50


# -- the lease across replicas -------------------------------------------------------------------


@pytest.fixture
async def leases(redis_url: str, redis_prefix: str) -> AsyncIterator[FlightLeases]:
    redis = ResilientRedis(
        RedisSettings(redis_url=redis_url, redis_key_prefix=f"{redis_prefix}lease:"),
        PerformanceMonitor(),
    )
    try:
        yield FlightLeases(redis, lease_seconds=0.3)
    finally:
        await redis.close()


async def test_the_second_claim_follows_and_gets_the_leaders_answer(
    leases: FlightLeases,
) -> None:
    lease = await leases.claim("k1")
    following = await leases.claim("k1")
    assert isinstance(lease, Lease) and isinstance(following, Following)
    assert following.token == lease.token
    answer = Answer("shared", "m", Usage(1, 2, 3), chunks=(3, 3))
    waiting = asyncio.create_task(leases.follow(following))
    await asyncio.sleep(0.05)
    await leases.publish(lease, answer)
    assert await waiting == answer
    assert isinstance(await leases.claim("k1"), Lease)  # released with the outcome


async def test_a_follower_gets_the_leaders_error(leases: FlightLeases) -> None:
    lease = await leases.claim("k2")
    following = await leases.claim("k2")
    assert isinstance(lease, Lease) and isinstance(following, Following)
    await leases.publish(lease, upstream_unavailable("down", 7))
    error = await leases.follow(following)
    assert isinstance(error, ServiceError)
    assert (error.reason, error.retry_after_seconds) == ("UPSTREAM_UNAVAILABLE", 7)


async def test_a_dead_leaders_lease_lapses_and_the_follower_takes_over(
    leases: FlightLeases,
) -> None:
    lease = await leases.claim("k3")
    following = await leases.claim("k3")
    assert isinstance(lease, Lease) and isinstance(following, Following)
    # The leader never renews nor publishes (its replica died): the lease lapses.
    assert await asyncio.wait_for(leases.follow(following), 2) is None
    assert isinstance(await leases.claim("k3"), Lease)


async def test_a_renewed_lease_outlives_its_ttl(leases: FlightLeases) -> None:
    lease = await leases.claim("k4")
    assert isinstance(lease, Lease)
    async with leases.renewed(lease):
        await asyncio.sleep(0.7)
        assert isinstance(await leases.claim("k4"), Following)
    await leases.release(lease)
    assert isinstance(await leases.claim("k4"), Lease)
