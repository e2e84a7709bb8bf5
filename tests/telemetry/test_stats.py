"""Aggregation of the replicas' ReplicaStats and the health status rules, with plain protos and
fake probes (no Redis, no network)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Sequence

import pytest

from genmesh.stats.v1 import stats_pb2
from services.common.perf import PerformanceMonitor
from services.common.replica_stats import ReplicaStatsBuilder, operation_windows, timestamp
from services.telemetry.health import (
    REQUIRED_SERVICES,
    DependencyReport,
    Probe,
    StatsPull,
    Status,
    SystemHealth,
    assess,
)
from services.telemetry.stats import (
    aggregate,
    merge_breakers,
    merge_caches,
    merge_operations,
    merge_replicas,
)
from services.telemetry.stats_collector import Reports

T0 = 1_700_000_000.0
CLOSED = stats_pb2.BREAKER_STATE_CLOSED
HALF_OPEN = stats_pb2.BREAKER_STATE_HALF_OPEN
OPEN = stats_pb2.BREAKER_STATE_OPEN


class FakeClock:
    def __init__(self, now: float = 10_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def window(
    name: str,
    seconds: int,
    count: int,
    *,
    errors: int = 0,
    slow: int = 0,
    avg: float = 0.0,
    p95: float = 0.0,
    top: float = 0.0,
) -> stats_pb2.OperationWindow:
    return stats_pb2.OperationWindow(
        name=name,
        window_seconds=seconds,
        count=count,
        errors=errors,
        slow=slow,
        avg_ms=avg,
        p95_ms=p95,
        max_ms=top,
    )


def replica(
    service: str,
    name: str,
    *,
    at: float = T0,
    serving: bool = True,
    breakers: Iterable[tuple[str, stats_pb2.BreakerState.ValueType]] = (),
    fallbacks: Iterable[tuple[str, bool]] = (),
    operations: Iterable[stats_pb2.OperationWindow] = (),
    cache: stats_pb2.CacheStats | None = None,
) -> stats_pb2.ReplicaStats:
    stats = stats_pb2.ReplicaStats(
        service=service,
        replica=name,
        serving=serving,
        breakers=[stats_pb2.BreakerStats(name=n, state=s) for n, s in breakers],
        fallbacks=[stats_pb2.Fallback(name=n, engaged=e) for n, e in fallbacks],
        operations=list(operations),
        ttl_seconds=15,
    )
    stats.reported_at.CopyFrom(timestamp(at))
    if cache is not None:
        stats.cache.CopyFrom(cache)
    return stats


# -- merging -------------------------------------------------------------------------------


def test_operations_merge_per_service_operation_and_window() -> None:
    a = replica(
        "generation",
        "gen-a",
        operations=[
            window("openai.chat", 60, 10, errors=1, avg=100.0, p95=300.0, top=400.0),
            window("openai.chat", 300, 40, errors=2, slow=1, avg=150.0, p95=500.0, top=2500.0),
            window("redis.get", 60, 4, avg=1.0, p95=2.0, top=2.0),
        ],
    )
    b = replica(
        "generation",
        "gen-b",
        operations=[
            window("openai.chat", 60, 30, errors=2, slow=1, avg=200.0, p95=900.0, top=1200.0),
            window("openai.chat", 300, 60, errors=4, avg=100.0, p95=250.0, top=800.0),
        ],
    )
    # Same operation name in another service: never merged with generation's.
    q = replica("quota", "quota-a", operations=[window("redis.get", 60, 6, errors=6, avg=3.0)])

    ops = {(o.service, o.name, o.window_seconds): o for o in merge_operations([a, b, q])}
    assert sorted(ops) == [
        ("generation", "openai.chat", 60),
        ("generation", "openai.chat", 300),
        ("generation", "redis.get", 60),
        ("quota", "redis.get", 60),
    ]
    minute = ops["generation", "openai.chat", 60]
    assert (minute.count, minute.errors, minute.slow, minute.replicas) == (40, 3, 1, 2)
    assert minute.avg_ms == pytest.approx((10 * 100 + 30 * 200) / 40)  # weighted by count
    assert minute.p95_ms == 900.0  # the highest any replica reports
    assert minute.max_ms == 1200.0
    assert minute.error_rate == pytest.approx(3 / 40)
    assert minute.requests_per_second == pytest.approx(40 / 60)
    five = ops["generation", "openai.chat", 300]
    assert (five.count, five.errors, five.slow) == (100, 6, 1)
    assert five.avg_ms == pytest.approx((40 * 150 + 60 * 100) / 100)
    assert (five.p95_ms, five.max_ms) == (500.0, 2500.0)
    assert five.requests_per_second == pytest.approx(100 / 300)
    assert ops["quota", "redis.get", 60].error_rate == 1.0
    assert ops["generation", "redis.get", 60].error_rate == 0.0


def test_a_replica_without_calls_in_a_window_changes_no_figure() -> None:
    busy = replica("generation", "a", operations=[window("op", 60, 10, avg=50.0, p95=80.0)])
    idle = replica("generation", "b", operations=[window("op", 60, 0)])
    [op] = merge_operations([busy, idle])
    assert (op.count, op.avg_ms, op.p95_ms, op.replicas) == (10, 50.0, 80.0, 1)
    [nothing] = merge_operations([idle])
    assert (nothing.count, nothing.error_rate, nothing.avg_ms, nothing.p95_ms) == (0, 0, 0, 0)


def test_the_merged_p95_is_an_upper_bound_of_the_true_one() -> None:
    rng = random.Random(7)
    fast, slow, everything = PerformanceMonitor(), PerformanceMonitor(), PerformanceMonitor()
    for _ in range(500):
        latency = rng.uniform(1, 20)
        fast.record("op", latency)
        everything.record("op", latency)
    for _ in range(100):
        latency = rng.uniform(100, 1000)
        slow.record("op", latency)
        everything.record("op", latency)
    merged = merge_operations(
        [
            replica("svc", "fast", operations=operation_windows(fast, [60])),
            replica("svc", "slow", operations=operation_windows(slow, [60])),
        ]
    )
    [true_p95] = [op.p95_ms for op in everything.windowed(60)]
    assert merged[0].count == 600
    assert merged[0].p95_ms >= true_p95


async def test_error_rates_fall_back_to_zero_once_the_window_passes() -> None:
    clock, wall = FakeClock(), FakeClock(T0)
    perf = PerformanceMonitor(clock=clock)
    builder = ReplicaStatsBuilder("generation", "gen-a", perf=perf, clock=wall)
    for failed in (True, True, False, False):
        perf.record("openai.chat", 120.0, failed=failed)

    async def figures() -> dict[int, tuple[int, float]]:
        stats = await builder.build(15)
        return {o.window_seconds: (o.count, o.error_rate) for o in merge_operations([stats])}

    assert await figures() == {60: (4, 0.5), 300: (4, 0.5)}
    clock.now += 70  # the 1-minute window has passed, the 5-minute one has not
    assert await figures() == {60: (0, 0.0), 300: (4, 0.5)}
    clock.now += 300
    assert await figures() == {60: (0, 0.0), 300: (0, 0.0)}


def test_the_fresher_report_of_a_replica_wins() -> None:
    pushed = [replica("generation", "a", at=T0, serving=False), replica("quota", "q", at=T0)]
    pulled = [replica("generation", "a", at=T0 + 5), replica("generation", "b", at=T0)]
    merged = merge_replicas(pushed, pulled)
    assert [(r.service, r.replica) for r in merged] == [
        ("generation", "a"),
        ("generation", "b"),
        ("quota", "q"),
    ]
    assert merged[0].serving is True  # the pulled one, five seconds fresher
    older_pull = [replica("generation", "a", at=T0 - 5)]
    assert merge_replicas(pushed, older_pull)[0].serving is False


def test_breakers_merge_per_service_and_the_worst_state_wins() -> None:
    a = replica("generation", "a", breakers=[("openai", CLOSED), ("redis", CLOSED)])
    b = replica("generation", "b", breakers=[("openai", HALF_OPEN), ("redis", CLOSED)])
    c = replica("generation", "c", breakers=[("openai", OPEN)])
    q = replica("quota", "q", breakers=[("redis", OPEN)])
    a.breakers[0].failures, b.breakers[0].failures = 2, 5
    b.breakers[0].last_failure_time.CopyFrom(timestamp(T0 + 1.5))
    merged = {(x.service, x.name): x for x in merge_breakers([a, b, c, q])}
    openai = merged["generation", "openai"]
    assert (openai.state_name, openai.failures, openai.replicas, openai.tripped_replicas) == (
        "open",
        7,
        3,
        2,
    )
    assert openai.last_failure_time == pytest.approx(T0 + 1.5)
    assert merged["generation", "redis"].state_name == "closed"
    assert merged["generation", "redis"].last_failure_time is None
    assert merged["quota", "redis"].state_name == "open"


def test_caches_count_the_shared_entries_once_and_local_ones_each() -> None:
    shared = stats_pb2.CacheStats(hits=3, misses=1, entries=9, backend="redis")
    local = stats_pb2.CacheStats(hits=1, misses=3, entries=4, backend="memory")
    cache = merge_caches(
        [
            replica("generation", "a", cache=shared),
            replica("generation", "b", cache=shared),
            replica("generation", "c", cache=local),
            replica("quota", "q"),  # no cache
        ]
    )
    assert cache is not None
    assert (cache.hits, cache.misses, cache.entries) == (7, 5, 13)
    assert cache.hit_rate == pytest.approx(7 / 12)
    assert merge_caches([replica("quota", "q")]) is None
    empty = merge_caches([replica("g", "a", cache=stats_pb2.CacheStats())])
    assert empty is not None and empty.hit_rate == 0.0


def test_aggregate_of_nothing() -> None:
    stats = aggregate([])
    assert (stats.replicas, stats.breakers, stats.cache, stats.operations) == ([], [], None, [])


# -- the status rules ----------------------------------------------------------------------


def dep(name: str, status: Status = Status.HEALTHY, detail: str = "") -> DependencyReport:
    return DependencyReport(name, status, 1.0, detail)


def checks(**overrides: Status) -> list[DependencyReport]:
    names = ["database", "redis", "generation", "quota", "openai"]
    return [dep(n, overrides.get(n, Status.HEALTHY)) for n in names]


def fleet(*extra: stats_pb2.ReplicaStats) -> list[stats_pb2.ReplicaStats]:
    """Every service with one good replica, plus `extra` (replacing by name)."""
    good = [
        replica("generation", "gen-a", breakers=[("openai", CLOSED)], fallbacks=[("redis", False)]),
        replica("quota", "quota-a", fallbacks=[("redis", False)]),
        replica("telemetry", "tel-a", fallbacks=[("redis", False)]),
    ]
    return merge_replicas([*extra], good)


NOT_SERVING_GEN = replica("generation", "gen-a", serving=False)


@pytest.mark.parametrize(
    ("dependencies", "replicas", "expected", "why"),
    [
        pytest.param(checks(), fleet(), Status.HEALTHY, "", id="all-good"),
        pytest.param(
            checks(),
            fleet(replica("generation", "gen-a", fallbacks=[("redis", True)])),
            Status.DEGRADED,
            "generation/gen-a has its redis fallback engaged",
            id="fallback-engaged",
        ),
        pytest.param(
            checks(),
            fleet(replica("quota", "quota-b", breakers=[("redis", HALF_OPEN)])),
            Status.DEGRADED,
            "quota/quota-b has circuit breaker redis half_open",
            id="breaker-half-open",
        ),
        pytest.param(
            checks(),
            fleet(replica("generation", "gen-b", breakers=[("openai", OPEN)])),
            Status.DEGRADED,
            "generation/gen-b has circuit breaker openai open",
            id="breaker-open",
        ),
        pytest.param(
            checks(),
            fleet(replica("generation", "gen-b", serving=False)),
            Status.DEGRADED,
            "generation/gen-b is not serving",
            id="a-replica-not-serving",
        ),
        pytest.param(
            checks(generation=Status.UNHEALTHY),
            fleet(NOT_SERVING_GEN),
            Status.UNHEALTHY,
            "no generation replica is serving",
            id="no-serving-generation",
        ),
        pytest.param(
            checks(generation=Status.UNHEALTHY),
            [r for r in fleet() if r.service != "generation"],
            Status.UNHEALTHY,
            "no generation replica is serving",
            id="no-generation-replica-at-all",
        ),
        pytest.param(
            checks(quota=Status.UNHEALTHY),
            fleet(replica("quota", "quota-a", serving=False)),
            Status.UNHEALTHY,
            "no quota replica is serving",
            id="no-serving-quota",
        ),
        pytest.param(
            # The load-balanced address reached a bad replica; another one serves.
            checks(generation=Status.UNHEALTHY),
            fleet(),
            Status.DEGRADED,
            "generation is failing",
            id="check-fails-but-a-replica-serves",
        ),
        pytest.param(
            # No replica has reported yet, but the health check says SERVING.
            checks(),
            [r for r in fleet() if r.service != "generation"],
            Status.HEALTHY,
            "",
            id="serving-check-without-reports",
        ),
        pytest.param(
            checks(database=Status.UNHEALTHY),
            fleet(),
            Status.UNHEALTHY,
            "database is unreachable",
            id="postgres-down",
        ),
        pytest.param(
            checks(redis=Status.UNHEALTHY),
            fleet(),
            Status.DEGRADED,
            "redis is failing",
            id="telemetry-redis-down",
        ),
        pytest.param(
            checks(database=Status.DEGRADED),
            fleet(),
            Status.DEGRADED,
            "database is degraded",
            id="slow-dependency",
        ),
        pytest.param(
            checks(openai=Status.UNKNOWN), fleet(), Status.HEALTHY, "", id="openai-unknown"
        ),
    ],
)
def test_status_rules(
    dependencies: Sequence[DependencyReport],
    replicas: Sequence[stats_pb2.ReplicaStats],
    expected: Status,
    why: str,
) -> None:
    status, reasons = assess(dependencies, replicas, REQUIRED_SERVICES)
    assert status is expected, reasons
    if why:
        assert any(why in reason for reason in reasons), reasons
    else:
        assert reasons == []


def test_unhealthy_lists_the_degradations_too() -> None:
    status, reasons = assess(
        checks(database=Status.UNHEALTHY),
        fleet(replica("quota", "quota-a", fallbacks=[("redis", True)])),
    )
    assert status is Status.UNHEALTHY
    assert reasons[0].startswith("database is unreachable")
    assert "quota/quota-a has its redis fallback engaged" in reasons


# -- the check -----------------------------------------------------------------------------


async def ok() -> None:
    return None


class FixedReports:
    def __init__(self, replicas: Sequence[stats_pb2.ReplicaStats], from_redis: bool = True):
        self.reports = Reports(list(replicas), from_redis)
        self.calls = 0

    async def current(self) -> Reports:
        self.calls += 1
        return self.reports


def system_health(
    probes: Sequence[Probe],
    replicas: Sequence[stats_pb2.ReplicaStats] = (),
    *,
    pulls: Sequence[StatsPull] = (),
    required: Sequence[str] = (),
    timeout: float = 0.2,
    deadline: float = 1.0,
) -> SystemHealth:
    return SystemHealth(
        probes,
        pulls=pulls,
        pushed=FixedReports(replicas),
        required_services=required,
        timeout_seconds=timeout,
        deadline_seconds=deadline,
        degraded_latency_ms=50,
    )


async def test_a_hanging_probe_is_cut_at_its_timeout() -> None:
    async def hang() -> None:
        await asyncio.Event().wait()

    async def slow() -> None:
        await asyncio.sleep(0.1)

    health = system_health(
        [Probe("database", ok), Probe("quota", hang), Probe("redis", slow)],
        [replica("generation", "a", breakers=[("openai", CLOSED)])],
        required=["quota"],
    )
    report = await asyncio.wait_for(health.report(), 10)
    deps = {d.name: d for d in report.dependencies}
    assert deps["quota"].status is Status.UNHEALTHY
    assert "timed out" in deps["quota"].detail
    assert deps["redis"].status is Status.DEGRADED
    assert deps["database"].status is Status.HEALTHY
    assert deps["openai"].status is Status.HEALTHY
    assert report.status is Status.UNHEALTHY
    assert any("no quota replica is serving" in r for r in report.reasons)


async def test_a_call_ignoring_its_timeout_is_cut_at_the_deadline() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        # Swallows cancellation: only the report's hard deadline gets past it.
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    health = system_health(
        [Probe("database", ok), Probe("generation", stubborn)], timeout=0.1, deadline=0.4
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    report = await asyncio.wait_for(health.report(), 5)
    elapsed = loop.time() - started
    release.set()
    assert elapsed < 1.0
    generation = {d.name: d for d in report.dependencies}["generation"]
    assert generation.status is Status.UNHEALTHY
    assert generation.detail == "timed out: no answer within 0.4s"


async def test_pulled_and_pushed_reports_merge_and_the_fresher_wins() -> None:
    pushed = [
        replica("generation", "gen-a", at=T0, serving=False),
        replica("generation", "gen-b", at=T0, breakers=[("openai", CLOSED)]),
    ]

    async def pull() -> stats_pb2.ReplicaStats:
        return replica("generation", "gen-a", at=T0 + 1, breakers=[("openai", HALF_OPEN)])

    health = system_health(
        [Probe("database", ok), Probe("generation", ok)],
        pushed,
        pulls=[StatsPull("generation", pull)],
        required=["generation"],
    )
    report = await health.report()
    assert [(r.replica, r.serving) for r in report.replicas] == [("gen-a", True), ("gen-b", True)]
    deps = {d.name: d for d in report.dependencies}
    assert deps["openai"].status is Status.DEGRADED
    assert "1 of 2" in deps["openai"].detail
    assert report.status is Status.DEGRADED


async def test_a_failing_pull_is_noted_on_its_dependency() -> None:
    async def refused() -> stats_pb2.ReplicaStats:
        raise ConnectionError("refused")

    health = system_health(
        [Probe("database", ok), Probe("generation", ok)],
        pulls=[StatsPull("generation", refused)],
    )
    report = await health.report()
    generation = {d.name: d for d in report.dependencies}["generation"]
    assert generation.status is Status.HEALTHY
    assert "GetStats: refused" in generation.detail


async def test_reports_read_from_memory_say_so() -> None:
    health = SystemHealth(
        [Probe("database", ok)], pushed=FixedReports([], from_redis=False), degraded_latency_ms=50
    )
    report = await health.report()
    assert report.status is Status.HEALTHY
    assert any("memory" in r for r in report.reasons)


async def test_the_openai_dependency_follows_generations_breaker() -> None:
    half_open = replica("generation", "a", breakers=[("openai", HALF_OPEN)])
    report = await system_health([Probe("database", ok)], [half_open]).report()
    deps = {d.name: d for d in report.dependencies}
    assert deps["openai"].status is Status.DEGRADED
    assert report.status is Status.DEGRADED

    other = replica("generation", "a", breakers=[("something", CLOSED)])
    report = await system_health([Probe("database", ok)], [other]).report()
    deps = {d.name: d for d in report.dependencies}
    assert deps["openai"].status is Status.UNKNOWN
    assert "openai" in deps["openai"].detail

    # Another service's breaker of that name is not the upstream's.
    quotas = replica("quota", "q", breakers=[("openai", CLOSED)])
    report = await system_health([Probe("database", ok)], [quotas]).report()
    assert {d.name: d for d in report.dependencies}["openai"].status is Status.UNKNOWN
    assert report.status is Status.HEALTHY


async def test_concurrent_reports_share_one_round_of_calls() -> None:
    calls = 0

    async def counted() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)

    health = system_health([Probe("database", counted)])
    reports = await asyncio.gather(*(health.report() for _ in range(5)))
    assert calls == 1
    assert len({id(r) for r in reports}) == 1
