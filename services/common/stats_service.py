"""This replica's stats (`replica_stats.py`) over gRPC, both ways:

- `StatsServicer` answers `genmesh.stats.v1.StatsService.GetStats` (every service registers
  it, and lists `STATS_SERVICE_NAME` among its service names);
- `StatsReporter` pushes them to telemetry's `StatsCollectorService.ReportStats` once right
  after start, then every STATS_PUBLISH_INTERVAL_SECONDS with ttl_seconds = three intervals
  (a replica that stops pushing drops out of the report by itself), and once more with
  ttl_seconds = 0 on a clean stop (it drops out at once).

Reporting is best effort: a push that fails (telemetry down, slow, or not serving the RPC
yet) is skipped until the next tick, logged once per outage, and never raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any

import grpc

from genmesh.stats.v1 import stats_pb2, stats_pb2_grpc
from services.common.replica_stats import ReplicaStatsBuilder

log = logging.getLogger(__name__)

STATS_SERVICE_NAME = stats_pb2.DESCRIPTOR.services_by_name["StatsService"].full_name
# Telemetry keeps a push for this many intervals: one or two lost pushes do not drop a replica.
TTL_INTERVALS = 3
# Deadline of each push; a push that misses it is skipped until the next tick.
REPORT_TIMEOUT_SECONDS = 1.0
# How long stop() may spend on the final push (building it included).
FINAL_REPORT_TIMEOUT_SECONDS = 1.0


def ttl_seconds_for(interval_seconds: float) -> int:
    """ttl_seconds for pushes every `interval_seconds`: three intervals, at least 1 s."""
    return max(1, math.ceil(interval_seconds * TTL_INTERVALS))


class StatsServicer(stats_pb2_grpc.StatsServiceServicer):
    """GetStats: this replica's stats now. `ttl_seconds` is what its pushes carry (so a
    caller that keeps the answer knows for how long it stands); 0 when nothing pushes."""

    def __init__(self, builder: ReplicaStatsBuilder, ttl_seconds: int = 0) -> None:
        self.builder = builder
        self.ttl_seconds = ttl_seconds

    async def GetStats(
        self, request: stats_pb2.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> stats_pb2.ReplicaStats:
        return await self.builder.build(self.ttl_seconds)


def add_stats_service(
    server: grpc.aio.Server, builder: ReplicaStatsBuilder, ttl_seconds: int = 0
) -> None:
    """Serve StatsService from `builder` (in a GrpcService's `register`)."""
    stats_pb2_grpc.add_StatsServiceServicer_to_server(StatsServicer(builder, ttl_seconds), server)


class StatsReporter:
    """Pushes `builder`'s stats to telemetry's StatsCollectorService over `channel` (which
    the service owns and closes after `stop()`). Run `start()` once the server listens (an
    on_start hook) and `stop()` before the channel closes (first among the on_stop hooks)."""

    def __init__(
        self,
        builder: ReplicaStatsBuilder,
        channel: grpc.aio.Channel,
        interval_seconds: float,
        *,
        timeout_seconds: float = REPORT_TIMEOUT_SECONDS,
        final_timeout_seconds: float = FINAL_REPORT_TIMEOUT_SECONDS,
    ) -> None:
        if not interval_seconds > 0:
            raise ValueError("interval_seconds must be positive")
        self.builder = builder
        self.stub = stats_pb2_grpc.StatsCollectorServiceStub(channel)
        self.interval_seconds = interval_seconds
        self.ttl_seconds = ttl_seconds_for(interval_seconds)
        self.timeout_seconds = timeout_seconds
        self.final_timeout_seconds = final_timeout_seconds
        self.reported = 0  # pushes telemetry accepted
        self.failed = 0  # pushes that did not reach it
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    async def start(self) -> None:
        """Returns at once; the first push goes out right away, in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="stats-reporter")

    async def stop(self) -> None:
        """Stop pushing, then push once more with ttl_seconds = 0 (bounded by
        final_timeout_seconds) so telemetry drops this replica at once. Never raises."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:
            async with asyncio.timeout(self.final_timeout_seconds):
                await self.report(0, timeout=self.final_timeout_seconds)
        except TimeoutError:
            self._failed("the final report timed out")

    async def report(self, ttl_seconds: int, *, timeout: float | None = None) -> bool:
        """Push the stats now; True when telemetry accepted them. Never raises (but lets
        cancellation through)."""
        try:
            stats = await self.builder.build(ttl_seconds)
            await self.stub.ReportStats(
                stats_pb2.ReportStatsRequest(stats=stats),
                timeout=self.timeout_seconds if timeout is None else timeout,
            )
        except grpc.aio.AioRpcError as err:
            self._failed(f"{err.code().name}: {err.details()}")
            return False
        except Exception as err:  # a bad provider or a closed channel: the next tick retries
            self._failed(repr(err))
            return False
        self.reported += 1
        if self._failing:
            self._failing = False
            log.info("stats: reporting to telemetry again")
        return True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            await self.report(self.ttl_seconds)
            # On a fixed cadence; a push that ran late is followed by the next one at once,
            # never by a burst of the missed ones.
            next_at = max(next_at + self.interval_seconds, loop.time())
            await asyncio.sleep(next_at - loop.time())

    def _failed(self, reason: str) -> None:
        self.failed += 1
        if self._failing:
            log.debug("stats: not reported to telemetry: %s", reason)
            return
        self._failing = True
        log.warning(
            "stats: not reported to telemetry (%s); retrying every %gs, logged again once it works",
            reason,
            self.interval_seconds,
        )
