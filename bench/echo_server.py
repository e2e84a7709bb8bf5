"""The ceiling of `make bench`: a trivial gRPC service (genmesh.bench.v1.EchoService, in
protos/genmesh/bench/v1/echo.proto) that answers each request with its text.

    python -m bench.echo_server 127.0.0.1:50070

It runs as the services do (grpc.aio, the default asyncio loop, one process, the same server
options, the standard gRPC health service Envoy checks) but does nothing else: no interceptors,
no validation, no tracing, no logging per request. REST through Envoy's transcoder to it is
what the machine allows a Python service behind the mesh's Envoy config; the generate path is
measured against it. Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from genmesh.bench.v1 import echo_pb2, echo_pb2_grpc
from services.common.server import SERVER_OPTIONS

SERVICE_NAME = "genmesh.bench.v1.EchoService"


class EchoServicer(echo_pb2_grpc.EchoServiceServicer):
    async def Echo(
        self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> echo_pb2.EchoResponse:
        return echo_pb2.EchoResponse(text=request.text)


async def serve_until_signal(
    addr: str, health_names: Iterable[str], register: Callable[[grpc.aio.Server], None]
) -> None:
    """A grpc.aio server as the services run theirs, with `register`'s services and the gRPC
    health service reporting SERVING for `health_names`, until SIGTERM or SIGINT."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    register(server)
    checks = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    if server.add_insecure_port(addr) == 0:
        sys.exit(f"cannot listen on {addr}")
    await server.start()
    for name in health_names:
        await checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


async def serve(addr: str) -> None:
    def register(server: grpc.aio.Server) -> None:
        echo_pb2_grpc.add_EchoServiceServicer_to_server(EchoServicer(), server)

    await serve_until_signal(addr, ("", SERVICE_NAME), register)


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python -m bench.echo_server HOST:PORT")
    asyncio.run(serve(argv[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
