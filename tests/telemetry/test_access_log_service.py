"""Envoy's access log service (`envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs`)
as telemetry serves it: batches of HTTP entries streamed over real gRPC, as Envoy's
`envoy.access_loggers.http_grpc` sends them, become edge security events."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.message import Message
from prometheus_client import REGISTRY

from genmesh.telemetry.v1 import telemetry_pb2
from services.common.identity import Identity
from services.telemetry.access_log import (
    SERVICE_NAME,
    AccessLogServicer,
    AlsMessages,
    add_access_log_service,
)
from services.telemetry.app import create_service
from services.telemetry.edge_events import EdgeEventAggregator
from services.telemetry.settings import TelemetrySettings
from tests.security_events import RecordedEvents

MESSAGES = AlsMessages()
THRESHOLD = 3


@dataclass
class Entry:
    ip: str | None = "203.0.113.7"
    status: int | None = 401
    path: str = "/api/profile"
    original_path: str = ""
    pipe: bool = False


def als_message(entries: Sequence[Entry], *, first: bool = False, log_name: str = "edge") -> Any:
    """A StreamAccessLogsMessage as Envoy writes it: the identifier on a stream's first one."""
    message: Any = MESSAGES.message()
    if first:
        message.identifier.node.id = "gateway-1"
        message.identifier.node.cluster = "genmesh-gateway"
        message.identifier.log_name = log_name
    for e in entries:
        entry = message.http_logs.log_entry.add()
        entry.protocol_version = 2  # HTTP11
        common = entry.common_properties
        if e.pipe:
            common.downstream_remote_address.pipe.path = "/run/envoy.sock"
        elif e.ip is not None:
            common.downstream_remote_address.socket_address.address = e.ip
            common.downstream_remote_address.socket_address.port_value = 40_000
        common.start_time.GetCurrentTime()
        entry.request.request_method = 2  # POST
        entry.request.path = e.path
        entry.request.original_path = e.original_path
        entry.request.authority = "genmesh.example"
        if e.status is not None:
            entry.response.response_code.value = e.status
        entry.response.response_body_bytes = 120
    return message


def tcp_message() -> Any:
    message: Any = MESSAGES.message()
    entry = message.tcp_logs.log_entry.add()
    entry.common_properties.downstream_remote_address.socket_address.address = "203.0.113.9"
    return message


Call = Callable[..., Any]


def stream_call(channel: grpc.aio.Channel) -> Call:
    return channel.stream_unary(
        f"/{SERVICE_NAME}/StreamAccessLogs",
        request_serializer=MESSAGES.message.SerializeToString,
        response_deserializer=MESSAGES.response.FromString,
    )


@dataclass
class Served:
    sink: RecordedEvents
    call: Call


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    sink = RecordedEvents()
    servicer = AccessLogServicer(
        MESSAGES,
        EdgeEventAggregator(window_seconds=60, threshold=THRESHOLD, max_tracked=1000),
        sink,
    )
    server = grpc.aio.server()
    add_access_log_service(server, servicer)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Served(sink, stream_call(channel))
    finally:
        await server.stop(None)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def send_all(call: Call, messages: Sequence[Message]) -> Any:
    async def requests() -> AsyncIterator[Message]:
        for m in messages:
            yield m

    return await call(requests(), timeout=5)


async def test_a_burst_in_the_stream_becomes_one_security_event(served: Served) -> None:
    call = served.call()
    await call.write(als_message([Entry(path="/api/profile?access_token=x")], first=True))
    await call.write(
        als_message([Entry(status=400), Entry(), Entry(ip="198.51.100.4", original_path="/x")])
    )
    await call.write(als_message([Entry(path="/api/quota"), Entry(), Entry(), Entry()]))
    # Reported while the stream is still open: Envoy never ends it.
    await until(lambda: len(served.sink.events) == 1)
    await call.done_writing()
    response = await call
    assert isinstance(response, MESSAGES.response)

    [event] = served.sink.events
    assert event.event_type == "edge_unauthenticated_burst"
    assert event.severity == telemetry_pb2.SEVERITY_MEDIUM
    assert event.identity == Identity(user_id="", email="", client_ip="203.0.113.7")
    assert event.details == {
        "source": "gateway",
        "status": "401",
        "count": str(THRESHOLD),
        "window_seconds": "60",
        "sample_paths": "/api/profile /api/quota",
    }


async def test_each_client_and_status_is_counted_apart(served: Served) -> None:
    entries = [
        Entry(ip="198.51.100.1", status=400, path="/api/generate"),
        Entry(ip="198.51.100.1", status=413, original_path="/api/generate", path="/generate"),
        Entry(ip="198.51.100.2", status=400),
        Entry(ip="198.51.100.2", status=401),
    ]
    await send_all(served.call, [als_message(entries, first=True), als_message(entries)])
    assert served.sink.events == []
    # Three addresses of one IPv6 /64 count as one client.
    ipv6 = [Entry(ip=f"2001:db8:5:6::{i}", status=401) for i in range(1, THRESHOLD + 1)]
    await send_all(served.call, [als_message([*entries[:3], *ipv6], first=True)])
    got = sorted((e.event_type, e.identity.client_ip) for e in served.sink.events)
    assert got == [
        ("edge_bad_request_burst", "198.51.100.1"),
        ("edge_bad_request_burst", "198.51.100.2"),
        ("edge_oversized_request_burst", "198.51.100.1"),
        ("edge_unauthenticated_burst", "2001:db8:5:6::/64"),
    ]
    oversized = next(e for e in served.sink.events if e.details["status"] == "413")
    assert oversized.details["sample_paths"] == "/api/generate"  # the path before any rewrite


async def test_the_count_spans_streams_and_log_names(served: Served) -> None:
    # Envoy opens one stream per worker thread; all of them feed the same counts.
    for log_name in ("edge", "another-logger", "edge"):
        await send_all(
            served.call, [als_message([Entry(status=413)], first=True, log_name=log_name)]
        )
    [event] = served.sink.events
    assert event.event_type == "edge_oversized_request_burst"


async def test_entries_missing_fields_are_skipped_and_the_stream_goes_on(served: Served) -> None:
    call = served.call()
    await call.write(
        als_message(
            [
                Entry(ip=None),
                Entry(ip=""),
                Entry(pipe=True),
                Entry(status=None),
                Entry(ip="not an address"),
            ]
            * THRESHOLD,
            first=True,
        )
    )
    await call.write(tcp_message())
    await call.write(MESSAGES.message())  # no entries at all
    await call.write(als_message([Entry(path="")] * THRESHOLD))
    await until(lambda: len(served.sink.events) == 1)
    await call.done_writing()
    await call
    assert served.sink.events[0].details["sample_paths"] == ""


async def test_a_failing_sink_does_not_end_the_stream(served: Served) -> None:
    served.sink.fail = True
    call = served.call()
    # The first burst's event is lost; the rest of its batch is still counted.
    await call.write(
        als_message([Entry()] * THRESHOLD + [Entry(ip="192.0.2.44")] * (THRESHOLD - 1), first=True)
    )
    await until(lambda: served.sink.failures == 1)
    served.sink.fail = False
    await call.write(als_message([Entry(ip="192.0.2.44")]))
    await until(lambda: len(served.sink.events) == 1)
    await call.done_writing()
    await call
    assert served.sink.events[0].identity.client_ip == "192.0.2.44"


# -- the whole telemetry service: registration, lean serving, the store -------------------


@pytest.mark.integration
async def test_the_telemetry_service_stores_edge_events(
    database_url: str, redis_url: str, redis_prefix: str, db: asyncpg.Connection
) -> None:
    values: dict[str, Any] = {
        "grpc_port": 0,
        "metrics_port": 0,
        "database_url": database_url,
        "redis_url": redis_url,
        "redis_key_prefix": f"{redis_prefix}telemetry-{uuid.uuid4().hex[:8]}:",
        "telemetry_batch_max_wait_ms": 5,
        "shutdown_grace_seconds": 1,
        "EDGE_EVENT_THRESHOLD": THRESHOLD,
        "EDGE_EVENT_WINDOW_SECONDS": 30,
        # Counted as the quota service counts clients: here one /48 is one client.
        "CLIENT_IPV6_PREFIX_LENGTH": 48,
    }
    settings = TelemetrySettings(**values)
    group = f"{0x1000 + uuid.uuid4().int % 0xF000:x}"  # four digits: one spelling
    ip = f"2001:db8:{group}::/48"
    # One failure from each of THRESHOLD /64s of that /48: a burst only when the service
    # counts with the configured prefix length.
    sources = [f"2001:db8:{group}:{n:x}::1" for n in range(1, THRESHOLD + 1)]
    since = await db.fetchval("SELECT now()")  # other runs may have used this address before
    service = await create_service(settings)
    port = await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            entries = [Entry(ip=source, status=401, path="/api/profile") for source in sources]
            await send_all(stream_call(channel), [als_message(entries, first=True)])

            async def stored() -> list[asyncpg.Record]:
                return await db.fetch(
                    "SELECT * FROM security_events WHERE ip = $1 AND event_type = $2"
                    " AND created_at >= $3",
                    ip,
                    "edge_unauthenticated_burst",
                    since,
                )

            async with asyncio.timeout(5):
                while not (rows := await stored()):
                    await asyncio.sleep(0.02)
    finally:
        await service.stop()
    [row] = rows
    assert row["severity"] == "medium"
    assert json.loads(row["details"]) == {
        "source": "gateway",
        "status": "401",
        "count": str(THRESHOLD),
        "window_seconds": "30",
        "sample_paths": "/api/profile",
    }


@pytest.mark.integration
async def test_stopping_ends_envoys_open_streams_instead_of_waiting_out_the_grace(
    database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """Envoy never ends its access log streams; without the drain hook the server's stop
    would wait its whole grace period (here 30 s) for them."""
    settings = TelemetrySettings(
        grpc_port=0,
        metrics_port=0,
        database_url=database_url,
        redis_url=redis_url,
        redis_key_prefix=f"{redis_prefix}telemetry-{uuid.uuid4().hex[:8]}:",
        shutdown_grace_seconds=30,
    )
    service = await create_service(settings)
    port = await service.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        # Connected first: a stream still connecting when the server stops is refused
        # instead of opened, and this test is about open streams.
        await asyncio.wait_for(channel.channel_ready(), 5)
        streams = open_streams()
        call = stream_call(channel)()
        await call.write(als_message([Entry()], first=True))
        # Open on the server: a call it has not taken yet when it stops is cancelled instead.
        async with asyncio.timeout(5):
            while open_streams() < streams + 1:
                await asyncio.sleep(0.01)
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(10):
            await service.stop()
            reply = await call  # the stream ends with an answer, so Envoy reconnects elsewhere
        assert isinstance(reply, MESSAGES.response)
        assert asyncio.get_running_loop().time() - started < 10


def open_streams() -> float:
    """Access log streams open in this process (services.telemetry.access_log's gauge)."""
    return REGISTRY.get_sample_value("telemetry_access_log_streams") or 0.0
