from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.channels import internal_channel
from services.common.server import LIVENESS_SERVICE, Dependency, GrpcService
from services.common.settings import ServiceSettings


async def _check(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)


async def test_health_follows_required_dependencies_but_liveness_does_not() -> None:
    up = {"db": True}

    async def db_check() -> None:
        if not up["db"]:
            raise ConnectionError("down")

    svc = GrpcService(
        "t",
        ServiceSettings(grpc_port=0, shutdown_grace_seconds=0.5),
        ["t.v1.T"],
        register=lambda server: None,
        dependencies=[Dependency("db", db_check), Dependency("cache", db_check, required=False)],
    )
    port = await svc.start()
    try:
        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        assert await _check(port, "") == serving
        assert await _check(port, "t.v1.T") == serving
        up["db"] = False
        statuses = await svc.refresh_health()
        assert {s.name: s.ok for s in statuses} == {"db": False, "cache": False}
        assert await _check(port, "") == not_serving
        assert await _check(port, "t.v1.T") == not_serving
        assert await _check(port, LIVENESS_SERVICE) == serving
        up["db"] = True
        await svc.refresh_health()
        assert await _check(port, "") == serving
    finally:
        await svc.stop()


async def test_stop_drains_then_refuses() -> None:
    svc = GrpcService(
        "t", ServiceSettings(grpc_port=0, shutdown_grace_seconds=0.5), [], lambda s: None
    )
    port = await svc.start()
    await svc.stop()
    with pytest.raises(grpc.aio.AioRpcError):
        await asyncio.wait_for(_check(port, ""), 5)


async def test_sigterm_style_stop_lets_in_flight_rpcs_finish() -> None:
    """NOT_SERVING, then drain: an RPC already running completes within the grace period."""
    release = asyncio.Event()

    async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
        await release.wait()
        return b"done"

    def register(server: grpc.aio.Server) -> None:
        handler = grpc.method_handlers_generic_handler(
            "t.v1.Slow", {"Wait": grpc.unary_unary_rpc_method_handler(slow)}
        )
        server.add_generic_rpc_handlers((handler,))

    svc = GrpcService("t", ServiceSettings(grpc_port=0, shutdown_grace_seconds=5), [], register)
    port = await svc.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        wait = channel.unary_unary(
            "/t.v1.Slow/Wait", request_serializer=None, response_deserializer=None
        )
        call = wait(b"", timeout=10)
        await asyncio.sleep(0.2)  # the RPC is in flight
        stopping = asyncio.create_task(svc.stop())
        await asyncio.sleep(0.2)
        assert not stopping.done()  # draining, not cut off
        release.set()
        assert await call == b"done"
        await asyncio.wait_for(stopping, 5)


async def test_sigterm_style_stop_lets_a_stream_in_flight_keep_streaming() -> None:
    """Streams are drained too (a generation stream runs up to its 60 s deadline): after
    NOT_SERVING the stream still delivers every message and ends normally within the grace."""
    step = asyncio.Event()

    async def chunks(
        request: bytes,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[bytes]:
        for index in range(3):
            await step.wait()
            step.clear()
            yield f"chunk {index}".encode()

    def register(server: grpc.aio.Server) -> None:
        handler = grpc.method_handlers_generic_handler(
            "t.v1.Stream", {"Chunks": grpc.unary_stream_rpc_method_handler(chunks)}
        )
        server.add_generic_rpc_handlers((handler,))

    svc = GrpcService("t", ServiceSettings(grpc_port=0, shutdown_grace_seconds=5), [], register)
    port = await svc.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = channel.unary_stream(
            "/t.v1.Stream/Chunks", request_serializer=None, response_deserializer=None
        )(b"", timeout=10)
        messages = stream.__aiter__()
        step.set()
        assert await messages.__anext__() == b"chunk 0"
        stopping = asyncio.create_task(svc.stop())
        await asyncio.sleep(0.2)
        assert not stopping.done()  # draining, not cut off
        # (The server takes no new call now, so ask its health servicer directly.)
        reply = await svc.health.Check(health_pb2.HealthCheckRequest(service=""), None)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        for expected in (b"chunk 1", b"chunk 2"):
            step.set()
            assert await messages.__anext__() == expected
        with pytest.raises(StopAsyncIteration):  # the end, normally
            await messages.__anext__()
        assert await stream.code() is grpc.StatusCode.OK
        await asyncio.wait_for(stopping, 5)


async def test_drain_delay_keeps_serving_while_reporting_not_serving() -> None:
    """SHUTDOWN_DRAIN_DELAY_SECONDS: after stop() begins, the replica says NOT_SERVING (every
    name, liveness included) yet still answers calls, so its callers can move away first."""
    settings = ServiceSettings(
        grpc_port=0, shutdown_grace_seconds=0.5, shutdown_drain_delay_seconds=1.0
    )
    svc = GrpcService("t", settings, ["t.v1.T"], lambda s: None)
    port = await svc.start()
    stopping = asyncio.create_task(svc.stop())
    await asyncio.sleep(0.3)
    assert not stopping.done()
    for name in ("", "t.v1.T", LIVENESS_SERVICE):
        assert await _check(port, name) == health_pb2.HealthCheckResponse.NOT_SERVING
    await asyncio.wait_for(stopping, 5)
    with pytest.raises(grpc.aio.AioRpcError):
        await asyncio.wait_for(_check(port, ""), 5)


async def test_internal_channels_move_off_a_stopping_replica_without_a_failed_call() -> None:
    """Two replicas behind one internal channel (round_robin over both addresses, as over a
    headless Service's): one stops while calls keep coming. The channel's health watch sees
    its NOT_SERVING during the drain delay and sends nothing more there, so no call fails.
    (A plain round_robin channel keeps sending until the server refuses, and the calls that
    arrive as it stops fail with CANCELLED: this test then fails, most runs.)"""
    settings = ServiceSettings(
        grpc_port=0, shutdown_grace_seconds=1, shutdown_drain_delay_seconds=1.0
    )
    replicas = [GrpcService(f"t{n}", settings, ["t.v1.T"], lambda s: None) for n in (1, 2)]
    ports = [await replica.start() for replica in replicas]
    channel = internal_channel(f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}")
    stub = health_pb2_grpc.HealthStub(channel)
    failures: list[grpc.StatusCode] = []
    answered = 0
    done = asyncio.Event()

    async def caller() -> None:
        nonlocal answered
        while not done.is_set():
            try:
                await stub.Check(health_pb2.HealthCheckRequest(service="t.v1.T"), timeout=5)
                answered += 1
            except grpc.aio.AioRpcError as err:
                failures.append(err.code())
            await asyncio.sleep(0.002)

    try:
        callers = [asyncio.create_task(caller()) for _ in range(10)]
        await asyncio.sleep(0.5)
        before = answered
        await replicas[0].stop()
        await asyncio.sleep(0.5)
        done.set()
        await asyncio.gather(*callers)
        assert failures == []
        assert answered > before
    finally:
        await channel.close(None)
        for replica in replicas:
            await replica.stop()
