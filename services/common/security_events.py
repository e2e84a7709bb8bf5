"""Security events, reported to the telemetry service's RecordSecurityEvent RPC by any service
that observes one (admin credential failures, images whose bytes contradict their declared
type, rate-limit bursts and blocks). Shared because every service reports through the same
contract. Best effort: sent in the background with a deadline, never delaying or failing the
request that observed them; dropped when too many are pending."""

from __future__ import annotations

import logging
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


class TelemetrySecurityEvents:
    def __init__(
        self, channel: grpc.aio.Channel, timeout_seconds: float, background: BackgroundTasks
    ) -> None:
        self._stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
        self.timeout_seconds = timeout_seconds
        self.background = background
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
        if self.pending >= MAX_PENDING:
            # Telemetry is slow or down: shedding events beats piling up tasks.
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
        self.background.spawn(self._send(request), name=f"security-event-{event_type}")

    async def _send(self, request: telemetry_pb2.RecordSecurityEventRequest) -> None:
        try:
            await self._stub.RecordSecurityEvent(request, timeout=self.timeout_seconds)
        except grpc.aio.AioRpcError as err:
            log.warning(
                "could not record security event %s: %s", request.event_type, err.code().name
            )
        finally:
            self.pending -= 1
