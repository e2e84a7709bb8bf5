"""A recording fake of telemetry's StatsCollectorService (genmesh.stats.v1), on a real grpc.aio
server, for the tests of the replicas' stats pushes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc

from genmesh.stats.v1 import stats_pb2, stats_pb2_grpc
from services.common.server import GrpcService
from services.common.settings import ServiceSettings

COLLECTOR_SERVICE_NAME = stats_pb2.DESCRIPTOR.services_by_name["StatsCollectorService"].full_name


class RecordingCollector(stats_pb2_grpc.StatsCollectorServiceServicer):
    """Keeps every report. `refuse` makes it answer UNAVAILABLE, `delay` makes it slow."""

    def __init__(self) -> None:
        self.reports: list[stats_pb2.ReplicaStats] = []
        self.refuse = False
        self.delay = 0.0
        self._arrived = asyncio.Condition()

    async def ReportStats(
        self, request: stats_pb2.ReportStatsRequest, context: Any
    ) -> stats_pb2.ReportStatsResponse:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.refuse:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "refusing on purpose")
        async with self._arrived:
            self.reports.append(request.stats)
            self._arrived.notify_all()
        return stats_pb2.ReportStatsResponse()

    def of(self, service: str, replica: str = "") -> list[stats_pb2.ReplicaStats]:
        return [
            r
            for r in self.reports
            if r.service == service and (not replica or r.replica == replica)
        ]

    async def wait_for(
        self, check: Callable[[list[stats_pb2.ReplicaStats]], bool], timeout: float = 5.0
    ) -> list[stats_pb2.ReplicaStats]:
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: check(self.reports))
        return list(self.reports)


@dataclass
class Collector:
    addr: str
    recorder: RecordingCollector
    service: GrpcService = field(repr=False)


@asynccontextmanager
async def running_collector() -> AsyncIterator[Collector]:
    recorder = RecordingCollector()
    service = GrpcService(
        "stats-collector-fake",
        ServiceSettings(grpc_port=0, shutdown_grace_seconds=0.5),
        [COLLECTOR_SERVICE_NAME],
        lambda server: stats_pb2_grpc.add_StatsCollectorServiceServicer_to_server(recorder, server),
    )
    port = await service.start()
    try:
        yield Collector(f"127.0.0.1:{port}", recorder, service)
    finally:
        await service.stop()
