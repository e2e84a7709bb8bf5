"""StatsService.GetStats served by any service, and the StatsReporter pushing to a fake of
telemetry's StatsCollectorService: first push at start, one per interval with ttl_seconds of
three intervals, a last one with ttl_seconds 0 on stop, and never an exception or a hang
when telemetry is down, slow or refusing."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import pytest

from genmesh.stats.v1 import stats_pb2, stats_pb2_grpc
from services.common.breaker import CircuitBreaker
from services.common.channels import internal_channel
from services.common.perf import PerformanceMonitor
from services.common.replica_stats import ReplicaStatsBuilder
from services.common.server import Dependency, GrpcService
from services.common.settings import ServiceSettings
from services.common.stats_service import (
    STATS_SERVICE_NAME,
    StatsReporter,
    add_stats_service,
    ttl_seconds_for,
)
from tests.common.stats_collector import running_collector

LOGGER = "services.common.stats_service"


def builder(replica: str = "r1") -> ReplicaStatsBuilder:
    perf = PerformanceMonitor()
    perf.record("op", 12.0)
    return ReplicaStatsBuilder("svc", replica, perf=perf, breakers=[CircuitBreaker("up")])


def test_ttl_is_three_intervals_rounded_up() -> None:
    assert ttl_seconds_for(5) == 15
    assert ttl_seconds_for(0.2) == 1
    assert ttl_seconds_for(1.5) == 5


# -- GetStats ------------------------------------------------------------------------------------


async def test_get_stats_answers_over_grpc_and_follows_health() -> None:
    up = {"db": True}

    async def db() -> None:
        if not up["db"]:
            raise ConnectionError("down")

    stats = builder("replica-a")
    service = GrpcService(
        "svc",
        ServiceSettings(grpc_port=0, shutdown_grace_seconds=0.5),
        [STATS_SERVICE_NAME],
        lambda server: add_stats_service(server, stats, ttl_seconds=15),
        dependencies=[Dependency("db", db)],
    )
    stats.follow_health(service.health)
    port = await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = stats_pb2_grpc.StatsServiceStub(channel)
            reply = await stub.GetStats(stats_pb2.GetStatsRequest(), timeout=5)
            assert (reply.service, reply.replica, reply.serving) == ("svc", "replica-a", True)
            assert reply.ttl_seconds == 15
            assert [b.name for b in reply.breakers] == ["up"]
            assert {(o.name, o.window_seconds) for o in reply.operations} == {
                ("op", 60),
                ("op", 300),
            }

            up["db"] = False
            await service.refresh_health()
            reply = await stub.GetStats(stats_pb2.GetStatsRequest(), timeout=5)
            assert reply.serving is False
    finally:
        await service.stop()


# -- the reporter --------------------------------------------------------------------------------


async def test_reports_at_start_every_interval_and_ttl_zero_on_stop() -> None:
    async with running_collector() as collector:
        channel = internal_channel(collector.addr)
        reporter = StatsReporter(builder(), channel, interval_seconds=0.1)
        try:
            started = time.monotonic()
            await reporter.start()
            first = await collector.recorder.wait_for(lambda r: len(r) >= 1)
            assert time.monotonic() - started < 0.5  # at once, not after an interval
            assert first[0].ttl_seconds == 1  # ceil(3 x 0.1)
            assert (first[0].service, first[0].replica) == ("svc", "r1")

            await collector.recorder.wait_for(lambda r: len(r) >= 4)
            await reporter.stop()
            reports = list(collector.recorder.reports)
            assert all(r.ttl_seconds == 1 for r in reports[:-1])
            assert reports[-1].ttl_seconds == 0
            assert reports[-1].service == "svc"
            stamps = [r.reported_at.ToMicroseconds() for r in reports]
            assert stamps == sorted(stamps)

            await asyncio.sleep(0.3)  # nothing after stop
            assert len(collector.recorder.reports) == len(reports)
            assert not reporter.running
            await reporter.stop()  # twice is fine, and sends nothing more
            assert len(collector.recorder.reports) == len(reports)
        finally:
            await channel.close(grace=None)


async def test_telemetry_down_never_raises_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A port nothing listens on (the collector's, after it stopped).
    async with running_collector() as collector:
        addr = collector.addr
    channel = internal_channel(addr)
    reporter = StatsReporter(builder(), channel, interval_seconds=0.05, timeout_seconds=0.2)
    try:
        with caplog.at_level(logging.DEBUG, logger=LOGGER):
            await reporter.start()
            async with asyncio.timeout(5):
                while reporter.failed < 4:
                    await asyncio.sleep(0.02)
            started = time.monotonic()
            await reporter.stop()
            assert time.monotonic() - started < 2
    finally:
        await channel.close(grace=None)
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "not reported to telemetry" in warnings[0].getMessage()
    assert reporter.reported == 0


async def test_a_refusing_then_recovering_collector(caplog: pytest.LogCaptureFixture) -> None:
    async with running_collector() as collector:
        collector.recorder.refuse = True
        channel = internal_channel(collector.addr)
        reporter = StatsReporter(builder(), channel, interval_seconds=0.05)
        try:
            with caplog.at_level(logging.INFO, logger=LOGGER):
                await reporter.start()
                async with asyncio.timeout(5):
                    while reporter.failed < 3:
                        await asyncio.sleep(0.02)
                collector.recorder.refuse = False
                await collector.recorder.wait_for(lambda r: len(r) >= 2)
                await reporter.stop()
        finally:
            await channel.close(grace=None)
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert sum("not reported to telemetry" in m for m in messages) == 1
    assert any("reporting to telemetry again" in m for m in messages)
    assert collector.recorder.reports[-1].ttl_seconds == 0


async def test_a_slow_collector_is_cut_by_the_timeouts() -> None:
    async with running_collector() as collector:
        collector.recorder.delay = 5.0
        channel = internal_channel(collector.addr)
        reporter = StatsReporter(
            builder(),
            channel,
            interval_seconds=0.1,
            timeout_seconds=0.2,
            final_timeout_seconds=0.3,
        )
        try:
            await reporter.start()
            async with asyncio.timeout(5):
                while reporter.failed < 2:
                    await asyncio.sleep(0.02)
            started = time.monotonic()
            await reporter.stop()
            assert time.monotonic() - started < 1.5
            assert reporter.reported == 0
        finally:
            await channel.close(grace=None)


async def test_a_failing_build_is_a_skipped_report_not_a_crash() -> None:
    async with running_collector() as collector:
        stats = builder()
        channel = internal_channel(collector.addr)
        reporter = StatsReporter(stats, channel, interval_seconds=0.05)

        async def broken(ttl_seconds: int = 0) -> stats_pb2.ReplicaStats:
            raise RuntimeError("bad provider")

        real = stats.build
        stats.build = broken  # type: ignore[method-assign]
        try:
            await reporter.start()
            async with asyncio.timeout(5):
                while reporter.failed < 2:
                    await asyncio.sleep(0.02)
            assert reporter.running
            stats.build = real  # type: ignore[method-assign]
            await collector.recorder.wait_for(lambda r: len(r) >= 1)
            await reporter.stop()
        finally:
            await channel.close(grace=None)
    assert collector.recorder.reports[-1].ttl_seconds == 0
