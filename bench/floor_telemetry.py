"""The floor's telemetry role (bench/floor_server.py): POST /api/events with nothing but what
storing a batch of funnel events needs. Each TrackEvents call turns its events into the
column arrays of the statement the telemetry service writes a batch with (services/telemetry/
store.py, INSERT_NEW_EVENTS: the id into funnel_event_ids, the event into its monthly
partition) and runs it on its own; no validation, group commit, idempotency keys, tracing,
metrics or per-request logs. Behind the floor's Envoy (its rate-limit check included), its
events per second are what the mesh's shape allows for events on this machine."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc

from genmesh.telemetry.v1 import telemetry_pb2
from services.telemetry.records import MAX_PROPERTIES_BYTES, struct_json
from services.telemetry.store import INSERT_NEW_EVENTS

# What the floor stores as the sender of every event (the services store the client's).
CLIENT_IP = "127.0.0.1"


SERVICE_NAME = "genmesh.telemetry.v1.TelemetryService"


class FloorTelemetry:
    """TrackEvents alone (the generated servicer would need every other method too)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    def register(self, server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            self.TrackEvents,
            request_deserializer=telemetry_pb2.TrackEventsRequest.FromString,
            response_serializer=telemetry_pb2.TrackEventsResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE_NAME, {"TrackEvents": handler})]
        )

    async def TrackEvents(
        self,
        request: telemetry_pb2.TrackEventsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> telemetry_pb2.TrackEventsResponse:
        if not request.events:
            return telemetry_pb2.TrackEventsResponse()
        now = datetime.now(UTC)
        rows = [
            (
                event.event_id.lower(),
                None,
                event.session_id,
                event.event,
                event.source,
                event.lang,
                struct_json(event.properties, MAX_PROPERTIES_BYTES)[0],
                CLIENT_IP,
                now,
            )
            for event in request.events
        ]
        result = await self.pool.fetchrow(INSERT_NEW_EVENTS, *zip(*rows, strict=True))
        accepted = result["inserted"] if result is not None else 0
        return telemetry_pb2.TrackEventsResponse(accepted=accepted, duplicates=len(rows) - accepted)
