"""Security events, reported to the telemetry service's RecordSecurityEvent RPC by any service
that observes one (admin credential failures, images whose bytes contradict their declared
type, rate-limit bursts and blocks). Shared because every service reports through the same
contract. Best effort: sent in the background with a deadline, never delaying or failing the
request that observed them; dropped when too many are pending."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Protocol

import grpc
from google.protobuf import struct_pb2

from genmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.background import BackgroundTasks
from services.common.identity import Identity

log = logging.getLogger(__name__)

MAX_PENDING = 100

SEVERITY_LOW = telemetry_pb2.SEVERITY_LOW
SEVERITY_MEDIUM = telemetry_pb2.SEVERITY_MEDIUM
SEVERITY_HIGH = telemetry_pb2.SEVERITY_HIGH


class SecurityEventSink(Protocol):
    def report(
        self,
        event_type: str,
        severity: telemetry_pb2.Severity.ValueType,
        identity: Identity,
        details: Mapping[str, str],
    ) -> None: ...


class BackgroundSecurityEvents(ABC):
    """A SecurityEventSink that logs each event and delivers it in the background, at most
    `max_pending` at a time (more are dropped and counted): best effort by design."""

    def __init__(self, background: BackgroundTasks, max_pending: int = MAX_PENDING) -> None:
        self.background = background
        self.max_pending = max_pending
        self.pending = 0
        self.dropped = 0

    def report(
        self,
        event_type: str,
        severity: telemetry_pb2.Severity.ValueType,
        identity: Identity,
        details: Mapping[str, str],
    ) -> None:
        log.warning(
            "security event %s",
            event_type,
            extra={"event_type": event_type, "user_id": identity.user_id, **details},
        )
        if self.pending >= self.max_pending:
            # The store is slow or down: shedding events beats piling up tasks.
            self.dropped += 1
            return
        body = struct_pb2.Struct()
        body.update(dict(details))
        request = telemetry_pb2.RecordSecurityEventRequest(
            event_type=event_type,
            severity=severity,
            user_id=identity.user_id,
            ip=identity.client_ip,
            details=body,
        )
        self.pending += 1
        self.background.spawn(self._deliver_safely(request), name=f"security-event-{event_type}")

    async def _deliver_safely(self, request: telemetry_pb2.RecordSecurityEventRequest) -> None:
        try:
            await self.deliver(request)
        except Exception as exc:  # best effort: a lost event must not surface anywhere else
            log.warning(
                "could not record security event %s: %s", request.event_type, self.describe(exc)
            )
        finally:
            self.pending -= 1

    @abstractmethod
    async def deliver(self, request: telemetry_pb2.RecordSecurityEventRequest) -> None:
        """Store one event (raising on failure)."""

    def describe(self, exc: Exception) -> str:
        return type(exc).__name__


class TelemetrySecurityEvents(BackgroundSecurityEvents):
    """Delivers to the telemetry service's RecordSecurityEvent RPC, with a deadline."""

    def __init__(
        self, channel: grpc.aio.Channel, timeout_seconds: float, background: BackgroundTasks
    ) -> None:
        super().__init__(background)
        self._stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
        self.timeout_seconds = timeout_seconds

    async def deliver(self, request: telemetry_pb2.RecordSecurityEventRequest) -> None:
        await self._stub.RecordSecurityEvent(request, timeout=self.timeout_seconds)

    def describe(self, exc: Exception) -> str:
        return exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else super().describe(exc)
