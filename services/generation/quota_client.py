"""The quota service, seen from generation: reserve one unit before the upstream call, then
commit it on success or refund it on failure; or, for an answer already in hand (a cache hit),
consume one unit in a single call. Uses the generated stubs over one long-lived channel; each
call has its own deadline."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genmesh.quota.v1 import quota_pb2, quota_pb2_grpc
from services.common.errors import Reason, ServiceError, error_info_from_call
from services.common.identity import Identity
from services.common.perf import PerformanceMonitor

log = logging.getLogger(__name__)

QUOTA_SERVICE = "genmesh.quota.v1.QuotaService"
# Settling is idempotent (only the first settlement counts), so it is safe to retry.
SETTLE_ATTEMPTS = 3
SETTLE_BACKOFF_SECONDS = 0.1


@dataclass(frozen=True)
class Reservation:
    reservation_id: str
    # The caller's quota with this reservation counted.
    quota: quota_pb2.Quota


class QuotaReserver(Protocol):
    async def reserve(self, identity: Identity) -> Reservation: ...

    async def consume(self, identity: Identity) -> Reservation: ...

    async def settle(self, reservation_id: str, commit: bool) -> None: ...


def _pairs(metadata: Iterable[Any] | None) -> list[tuple[str, str | bytes]]:
    # At runtime a grpc.aio.Metadata of (key, value) pairs; grpc-stubs type it otherwise.
    return [(str(key), value) for key, value in metadata or ()]


def quota_unavailable() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        Reason.DEPENDENCY_UNAVAILABLE,
        "the quota service is unavailable, try again shortly",
        retry_after_seconds=1,
    )


class QuotaClient:
    def __init__(
        self, channel: grpc.aio.Channel, timeout_seconds: float, perf: PerformanceMonitor
    ) -> None:
        self.channel = channel
        self.timeout_seconds = timeout_seconds
        self.perf = perf
        self._stub = quota_pb2_grpc.QuotaServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)

    async def reserve(self, identity: Identity) -> Reservation:
        """One unit of the caller's quota, pending until settled. The quota service's own
        errors (QUOTA_EXHAUSTED with its RetryInfo, ...) are relayed as they are. Never
        retried: a lost reply would reserve twice (the orphan expires on the quota side, but
        the caller pays meanwhile)."""
        return await self._reserve(identity, consume=False)

    async def consume(self, identity: Identity) -> Reservation:
        """One unit taken for good at once, for an answer already in hand (a cache hit): the
        reservation comes back committed, with nothing to settle. Errors as `reserve`; never
        retried either (a lost reply would take two units)."""
        return await self._reserve(identity, consume=True)

    async def _reserve(self, identity: Identity, *, consume: bool) -> Reservation:
        request = quota_pb2.ReserveQuotaRequest(
            caller=quota_pb2.Caller(
                user_id=identity.user_id, email=identity.email, client_ip=identity.client_ip
            ),
            consume=consume,
        )
        try:
            async with self.perf.track("quota.consume" if consume else "quota.reserve"):
                reply = await self._stub.ReserveQuota(request, timeout=self.timeout_seconds)
        except grpc.aio.AioRpcError as err:
            relayed = error_info_from_call(_pairs(err.trailing_metadata()))
            if relayed is not None:
                raise relayed from None
            log.warning("quota reservation failed: %s %s", err.code().name, err.details())
            raise quota_unavailable() from None
        return Reservation(reply.reservation_id, reply.quota)

    async def settle(self, reservation_id: str, commit: bool) -> None:
        """Commit or refund. Never raises: failures are logged (a reservation left unsettled
        is the quota service's to expire); a successful answer must not fail over it."""
        outcome = quota_pb2.OUTCOME_COMMIT if commit else quota_pb2.OUTCOME_REFUND
        request = quota_pb2.SettleReservationRequest(reservation_id=reservation_id, outcome=outcome)
        for attempt in range(1, SETTLE_ATTEMPTS + 1):
            try:
                async with self.perf.track("quota.settle"):
                    await self._stub.SettleReservation(request, timeout=self.timeout_seconds)
                return
            except grpc.aio.AioRpcError as err:
                retryable = err.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
                if not retryable or attempt == SETTLE_ATTEMPTS:
                    log.error(
                        "could not settle quota reservation",
                        extra={
                            "reservation_id": reservation_id,
                            "outcome": quota_pb2.Outcome.Name(outcome),
                            "grpc_code": err.code().name,
                            "detail": err.details(),
                        },
                    )
                    return
                await asyncio.sleep(SETTLE_BACKOFF_SECONDS * 2 ** (attempt - 1))

    async def check_health(self) -> None:
        """For readiness: raises unless the quota service reports SERVING."""
        reply = await self._health.Check(
            health_pb2.HealthCheckRequest(service=QUOTA_SERVICE), timeout=self.timeout_seconds
        )
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            raise RuntimeError(f"quota service is {status}")
