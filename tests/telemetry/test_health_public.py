"""The public GetHealth (/api/health) and the admin GetHealthReport (/api/admin/health), over a
real gRPC server with fake probes (no database, no Redis): the public answer carries only the
overall status and when it was checked, a burst shares one check, results are reused within
the freshness window, and nothing a probe says reaches the public."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import grpc
import pytest
from google.protobuf import json_format, text_format

from genmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.admin_auth import AdminGuard
from services.common.interceptors import ServiceInterceptor
from services.telemetry.health import HealthReport, Probe, Status, SystemHealth
from services.telemetry.public_health import CachedHealth, PublicHealth
from services.telemetry.servicer import TelemetryAdminServicer, TelemetryServicer
from services.telemetry.store import TelemetryStore
from tests.security_events import RecordedEvents

ADMIN_TOKEN = "health-admin-token"
SECRET = "password=hunter2 at 10.0.0.5:5432"
PUBLIC_FIELDS = {"status", "checked_at"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class CountingProbe:
    """A probe that counts its calls; it waits for `gate` when one is given, and raises
    `error` when one is given."""

    name: str
    gate: asyncio.Event | None = None
    error: Exception | None = None
    calls: int = 0

    async def check(self) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error

    def probe(self) -> Probe:
        return Probe(self.name, self.check)


def system_health(*probes: CountingProbe) -> SystemHealth:
    # No required services: these tests are about the public view, not the status rules.
    return SystemHealth(
        [p.probe() for p in probes],
        timeout_seconds=1.5,
        # Behaviour, not speed: a busy machine must not turn "healthy" into "degraded".
        degraded_latency_ms=60_000,
    )


@dataclass
class Served:
    public: telemetry_pb2_grpc.TelemetryServiceAsyncStub
    admin: telemetry_pb2_grpc.TelemetryAdminServiceAsyncStub
    sink: RecordedEvents


@asynccontextmanager
async def serve(health: SystemHealth, cached: CachedHealth) -> AsyncIterator[Served]:
    """TelemetryService and TelemetryAdminService behind the shared interceptor (which turns
    the guard's ServiceError into a status), on a real port."""
    sink = RecordedEvents()
    server = grpc.aio.server(interceptors=[ServiceInterceptor()])
    # GetHealth and GetHealthReport never touch the store.
    store = cast(TelemetryStore, None)
    telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(
        TelemetryServicer(store, cached), server
    )
    telemetry_pb2_grpc.add_TelemetryAdminServiceServicer_to_server(
        TelemetryAdminServicer(AdminGuard(ADMIN_TOKEN, sink), health), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Served(
                telemetry_pb2_grpc.TelemetryServiceStub(channel),
                telemetry_pb2_grpc.TelemetryAdminServiceStub(channel),
                sink,
            )
    finally:
        await server.stop(None)


async def get_health(served: Served) -> telemetry_pb2.GetHealthResponse:
    return await served.public.GetHealth(telemetry_pb2.GetHealthRequest(), timeout=10)


def rendered(message: Any) -> str:
    """Every way the answer leaves the service: wire bytes, text, and the JSON Envoy sends."""
    return "\n".join(
        [
            repr(message.SerializeToString()),
            text_format.MessageToString(message),
            json_format.MessageToJson(message, preserving_proto_field_name=True),
        ]
    )


# -- (a) the public answer -----------------------------------------------------------------


def test_the_public_contract_has_only_status_and_checked_at() -> None:
    fields = {f.name for f in telemetry_pb2.GetHealthResponse.DESCRIPTOR.fields}
    assert fields == PUBLIC_FIELDS


async def test_public_answer_is_only_the_status_and_when_it_was_checked() -> None:
    database, redis = CountingProbe("database"), CountingProbe("redis")
    health = system_health(database, redis)
    async with serve(health, CachedHealth(health.report)) as served:
        answer = await get_health(served)
    assert {f.name for f, _ in answer.ListFields()} == PUBLIC_FIELDS
    assert answer.status == "healthy"
    assert answer.checked_at.seconds > 0
    text = rendered(answer)
    assert "database" not in text and "redis" not in text


async def test_public_status_follows_the_report() -> None:
    # Redis down only degrades; the database down makes the system unhealthy.
    redis = CountingProbe("redis", error=ConnectionError("refused"))
    health = system_health(CountingProbe("database"), redis)
    assert (await CachedHealth(health.report).current()).status is Status.DEGRADED
    database = CountingProbe("database", error=ConnectionError("refused"))
    health = system_health(database, CountingProbe("redis"))
    assert (await CachedHealth(health.report).current()).status is Status.UNHEALTHY


# -- (b) a burst shares one check ----------------------------------------------------------


class CountingCallers(CachedHealth):
    """Sets `all_in` once `expected` callers are inside current()."""

    def __init__(self, check: Callable[[], Any], expected: int) -> None:
        super().__init__(check, max_age_seconds=1.0)
        self.expected = expected
        self.callers = 0
        self.all_in = asyncio.Event()

    async def current(self) -> PublicHealth:
        self.callers += 1
        if self.callers == self.expected:
            self.all_in.set()
        return await super().current()


async def test_fifty_concurrent_calls_run_the_probes_once() -> None:
    callers = 50
    database = CountingProbe("database")
    redis = CountingProbe("redis")
    health = system_health(database, redis)
    cached = CountingCallers(health.report, callers)
    # The probes answer only once every caller is waiting: each of them could have started a
    # check of its own by then.
    database.gate = redis.gate = cached.all_in
    async with serve(health, cached) as served:
        answers = await asyncio.gather(*(get_health(served) for _ in range(callers)))
    assert cached.callers == callers
    assert (database.calls, redis.calls) == (1, 1)
    assert {a.status for a in answers} == {"healthy"}
    assert len({a.checked_at.ToNanoseconds() for a in answers}) == 1


async def test_concurrent_callers_share_one_check_of_their_own() -> None:
    # Single flight in the public view itself, not only in SystemHealth.report.
    gate = asyncio.Event()
    health = system_health(CountingProbe("database"))
    calls = 0

    async def check() -> HealthReport:
        nonlocal calls
        calls += 1
        await gate.wait()
        return await health.report()

    cached = CachedHealth(check)
    waiting = [asyncio.create_task(cached.current()) for _ in range(50)]
    while calls == 0:
        await asyncio.sleep(0)
    await asyncio.sleep(0)  # every caller has had its turn to start a check
    gate.set()
    answers = await asyncio.gather(*waiting)
    assert calls == 1
    assert len({id(a) for a in answers}) == 1


async def test_a_caller_going_away_does_not_cancel_the_shared_check() -> None:
    gate = asyncio.Event()
    database = CountingProbe("database", gate=gate)
    cached = CachedHealth(system_health(database).report)
    leaving = asyncio.create_task(cached.current())
    staying = asyncio.create_task(cached.current())
    while database.calls == 0:
        await asyncio.sleep(0)
    leaving.cancel()
    gate.set()
    assert (await staying).status is Status.HEALTHY
    assert database.calls == 1


# -- (c) the freshness window --------------------------------------------------------------


async def test_within_the_window_the_last_result_is_reused_after_it_a_new_check_runs() -> None:
    clock = FakeClock()
    database = CountingProbe("database")
    cached = CachedHealth(system_health(database).report, max_age_seconds=1.0, clock=clock)

    first = await cached.current()
    assert database.calls == 1
    clock.now += 0.9
    assert await cached.current() is first
    assert database.calls == 1

    clock.now += 0.2  # 1.1 s after the first check started
    database.error = ConnectionError("refused")
    second = await cached.current()
    assert database.calls == 2
    assert (first.status, second.status) == (Status.HEALTHY, Status.UNHEALTHY)


async def test_a_zero_window_checks_on_every_call() -> None:
    database = CountingProbe("database")
    cached = CachedHealth(system_health(database).report, max_age_seconds=0, clock=FakeClock())
    for _ in range(3):
        await cached.current()
    assert database.calls == 3


# -- (d) nothing a probe says reaches the public -------------------------------------------


async def test_a_probe_error_does_not_reach_the_public_answer() -> None:
    database = CountingProbe("database", error=RuntimeError(SECRET))
    health = system_health(database, CountingProbe("redis"))
    async with serve(health, CachedHealth(health.report)) as served:
        answer = await get_health(served)
        # The operators' report does carry it: the public answer left it out.
        report = await served.admin.GetHealthReport(
            telemetry_pb2.GetHealthReportRequest(),
            metadata=(("x-admin-token", ADMIN_TOKEN),),
            timeout=10,
        )
    assert answer.status == "unhealthy"
    assert {f.name for f, _ in answer.ListFields()} == PUBLIC_FIELDS
    # checked_at is public by design, and its nanoseconds may spell any digits ("5432").
    untimed = copy.deepcopy(answer)
    untimed.ClearField("checked_at")
    public = rendered(untimed)
    for leak in ("hunter2", "password", "10.0.0.5", "5432", "database", "RuntimeError"):
        assert leak not in public, leak
    assert SECRET in {d.name: d.detail for d in report.dependencies}["database"]


async def test_a_failing_check_answers_unhealthy_without_its_text_and_does_not_stick() -> None:
    clock = FakeClock()
    calls = 0

    async def check() -> HealthReport:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError(SECRET)
        return await system_health(CountingProbe("database")).report()

    cached = CachedHealth(check, max_age_seconds=1.0, clock=clock)
    async with serve(system_health(), cached) as served:
        answer = await get_health(served)
        assert answer.status == "unhealthy"
        assert "hunter2" not in rendered(answer) and "10.0.0.5" not in rendered(answer)
        # The failure is cached like any result: a burst of callers does not retry it.
        await get_health(served)
        assert calls == 1
        clock.now += 1.5
        assert (await get_health(served)).status == "healthy"
    assert calls == 2


async def test_a_hanging_check_is_cut_off_and_does_not_wedge_later_callers() -> None:
    clock = FakeClock()
    never = asyncio.Event()
    calls = 0

    async def check() -> HealthReport:
        nonlocal calls
        calls += 1
        if calls == 1:
            await never.wait()  # ignores the probes' timeouts: only the deadline ends it
        return await system_health(CountingProbe("database")).report()

    cached = CachedHealth(check, max_age_seconds=1.0, deadline_seconds=0.05, clock=clock)
    assert (await cached.current()).status is Status.UNHEALTHY
    clock.now += 1.5
    assert (await cached.current()).status is Status.HEALTHY
    assert calls == 2


# -- (e) the full report is behind the admin credential ------------------------------------


async def test_the_full_report_needs_the_admin_credential() -> None:
    database = CountingProbe("database")
    health = system_health(database, CountingProbe("redis"))
    async with serve(health, CachedHealth(health.report)) as served:
        request = telemetry_pb2.GetHealthReportRequest()
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await served.admin.GetHealthReport(request, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await served.admin.GetHealthReport(
                request, metadata=(("x-admin-token", "nope"),), timeout=10
            )
        assert database.calls == 0  # refused before any probe ran
        report = await served.admin.GetHealthReport(
            request, metadata=(("x-admin-token", ADMIN_TOKEN),), timeout=10
        )
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert wrong.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Only the admin action is an event here; refusals are counted at the edge.
    assert [(e.event_type, e.details.get("method")) for e in served.sink.events] == [
        ("admin_action", "GetHealthReport")
    ]
    assert report.status == "healthy"
    deps = {d.name: d for d in report.dependencies}
    assert set(deps) == {"database", "redis", "openai"}
    assert deps["database"].status == "healthy"
    assert deps["openai"].status == "unknown"  # no replica reported its breaker
    assert list(report.reasons) == []
    assert report.response_time_ms > 0
    assert report.checked_at.seconds > 0
