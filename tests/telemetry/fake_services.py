"""A stand-in for generation or quota on a real grpc.aio server: grpc.health.v1 and
StatsService.GetStats, each of which can be told to answer, fail or never return."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genmesh.stats.v1 import stats_pb2, stats_pb2_grpc
from services.common.replica_stats import timestamp


class FakeHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.status: health_pb2.HealthCheckResponse.ServingStatus.ValueType = (
            health_pb2.HealthCheckResponse.SERVING
        )
        self.hang = False
        self.calls = 0

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        self.calls += 1
        if self.hang:
            await asyncio.Event().wait()
        return health_pb2.HealthCheckResponse(status=self.status)


class FakeStats(stats_pb2_grpc.StatsServiceServicer):
    def __init__(self, service: str, replica: str) -> None:
        self.stats = stats_pb2.ReplicaStats(service=service, replica=replica, serving=True)
        self.hang = False
        self.calls = 0

    async def GetStats(
        self, request: stats_pb2.GetStatsRequest, context: Any
    ) -> stats_pb2.ReplicaStats:
        self.calls += 1
        if self.hang:
            await asyncio.Event().wait()
        stats = stats_pb2.ReplicaStats()
        stats.CopyFrom(self.stats)
        stats.reported_at.CopyFrom(timestamp(time.time()))
        return stats


@dataclass
class FakeService:
    address: str
    health: FakeHealth
    stats: FakeStats
    server: grpc.aio.Server = field(repr=False)

    def hang(self) -> None:
        self.health.hang = self.stats.hang = True


@asynccontextmanager
async def fake_service(service: str, replica: str, port: int = 0) -> AsyncIterator[FakeService]:
    """`service` is the replica's service name in its stats ("generation")."""
    server = grpc.aio.server()
    health, stats = FakeHealth(), FakeStats(service, replica)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    stats_pb2_grpc.add_StatsServiceServicer_to_server(stats, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield FakeService(f"127.0.0.1:{port}", health, stats, server)
    finally:
        await server.stop(None)
