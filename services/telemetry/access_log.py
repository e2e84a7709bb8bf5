"""Envoy's access log service (`envoy.service.accesslog.v3.AccessLogService`), served by
telemetry: the gateway's `envoy.access_loggers.http_grpc` access log streams the requests it
answered with a failure (its status-code filter ships only those), and each one goes to the
edge-event aggregator (services/telemetry/edge_events.py); a completed burst becomes a
security event, stored in the background.

The messages are built at run time (services/common/envoy_api.py), as for the quota service's
rate limit service.

What is read of each `HTTPAccessLogEntry` in `http_logs.log_entry` (anything missing is
tolerated; an entry without a client address or a response code is skipped):
- client: `common_properties.downstream_remote_address.socket_address.address`, which Envoy
  has already resolved from X-Forwarded-For as far as its trusted hops allow;
- status: `response.response_code.value`;
- path: `request.original_path` (the path before any rewrite), else `request.path`.
Any `log_name` is accepted; TCP entries are ignored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from prometheus_client import Gauge

from services.common.envoy_api import DESCRIPTOR_SET, message_classes
from services.common.identity import Identity
from services.common.security_events import SEVERITY_MEDIUM, SecurityEventSink
from services.telemetry.edge_events import EdgeEvent, EdgeEventAggregator

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.accesslog.v3.AccessLogService"


class AlsMessages:
    """StreamAccessLogsMessage and StreamAccessLogsResponse (services/common/envoy_api.py)."""

    def __init__(self, descriptor_set: Path = DESCRIPTOR_SET) -> None:
        self.message, self.response = message_classes(
            "envoy.service.accesslog.v3.StreamAccessLogsMessage",
            "envoy.service.accesslog.v3.StreamAccessLogsResponse",
            descriptor_set=descriptor_set,
        )


@dataclass(frozen=True)
class EdgeFailure:
    """One request the gateway answered, as the access log reports it."""

    ip: str
    status: int
    path: str


def failures_of(message: Any) -> Iterator[EdgeFailure]:
    """The HTTP entries of one StreamAccessLogsMessage that name a client and a status."""
    if message.WhichOneof("log_entries") != "http_logs":
        return
    for entry in message.http_logs.log_entry:
        ip = entry.common_properties.downstream_remote_address.socket_address.address
        status = entry.response.response_code.value
        if not ip or not status:
            continue
        request = entry.request
        yield EdgeFailure(ip, status, request.original_path or request.path)


def details_of(event: EdgeEvent) -> dict[str, str]:
    return {
        "source": "gateway",
        "status": str(event.status),
        "count": str(event.count),
        "window_seconds": f"{event.window_seconds:g}",
        "sample_paths": " ".join(event.sample_paths),
    }


# Envoy holds one stream per access logger and worker: fewer than expected means logs are lost.
OPEN_STREAMS = Gauge(
    "telemetry_access_log_streams", "Envoy access log streams open on this replica."
)


class AccessLogServicer:
    def __init__(
        self, messages: AlsMessages, aggregator: EdgeEventAggregator, events: SecurityEventSink
    ) -> None:
        self.messages = messages
        self.aggregator = aggregator
        self.events = events
        self._closing = asyncio.Event()

    def observe(self, message: Any) -> None:
        """Feed one batch to the aggregator and report the bursts it completes. Synchronous
        and without I/O: events are stored in the background, so the stream never waits."""
        for failure in failures_of(message):
            event = self.aggregator.observe(failure.ip, failure.status, failure.path)
            if event is None:
                continue
            try:
                self.events.report(
                    event.event_type,
                    SEVERITY_MEDIUM,
                    Identity(user_id="", email="", client_ip=event.network),
                    details_of(event),
                )
            except Exception:  # best effort: one lost event must not lose the batch's counts
                log.exception("could not report security event %s", event.event_type)

    async def stream_access_logs(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Message:
        # Envoy keeps one stream open per access logger and worker; it sends the identifier
        # (node and log name) with the first message only. The stream ends when Envoy closes
        # it, or when this replica stops (`close_streams`): Envoy then opens a new one.
        closing = asyncio.ensure_future(self._closing.wait())
        incoming = aiter(requests)
        OPEN_STREAMS.inc()
        try:
            while True:
                receiving = asyncio.ensure_future(anext(incoming))
                await asyncio.wait({receiving, closing}, return_when=asyncio.FIRST_COMPLETED)
                if not receiving.done():
                    receiving.cancel()
                    break
                try:
                    message = receiving.result()
                except StopAsyncIteration:
                    break
                try:
                    self.observe(message)
                except Exception:  # nothing in a batch may end the stream (Envoy drops logs)
                    log.exception("could not process an access log batch")
        finally:
            closing.cancel()
            OPEN_STREAMS.dec()
        response: Message = self.messages.response()
        return response

    async def close_streams(self) -> None:
        """End every open stream (a drain hook): Envoy holds them open for ever, and they
        would hold the server's drain for its whole grace period."""
        self._closing.set()


def add_access_log_service(server: grpc.aio.Server, servicer: AccessLogServicer) -> None:
    messages = servicer.messages
    handler = grpc.stream_unary_rpc_method_handler(
        servicer.stream_access_logs,
        request_deserializer=messages.message.FromString,
        response_serializer=messages.response.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE_NAME, {"StreamAccessLogs": handler})]
    )
