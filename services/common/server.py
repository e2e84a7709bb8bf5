"""The server bootstrap every service runs: a grpc.aio server with the shared interceptors,
grpc.health.v1 that follows the service's dependencies, reflection, Prometheus metrics, and a
graceful stop on SIGTERM/SIGINT (NOT_SERVING, drain, `server.stop(grace)`), after grpc's
async graceful-shutdown example."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from pydantic import ValidationError

from services.common.interceptors import ServiceInterceptor
from services.common.logging import configure_logging
from services.common.settings import ServiceSettings
from services.common.tracing import configure_tracing, server_interceptor, shutdown_tracing

log = logging.getLogger(__name__)

# A health service name that is SERVING from start until stop whatever the dependencies say:
# for liveness probes, so a dependency outage takes pods out of rotation (readiness, the
# overall "" status) without also restarting them.
LIVENESS_SERVICE = "liveness"

# Images arrive inline (up to 5 MiB, plus the rest of the request).
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
SERVER_OPTIONS: list[tuple[str, int]] = [
    # Two processes must never silently share a port (grpc turns SO_REUSEPORT on by default).
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


@dataclass(frozen=True)
class Dependency:
    """Something the service needs. `check` raises (or times out) when it is unusable.
    A required dependency that fails makes the service NOT_SERVING; an optional one (with a
    fallback, like Redis) is only reported."""

    name: str
    check: Callable[[], Awaitable[object]]
    required: bool = True


@dataclass(frozen=True)
class DependencyStatus:
    name: str
    ok: bool
    latency_ms: float
    detail: str
    required: bool


async def probe(dep: Dependency, timeout: float = 2.0) -> DependencyStatus:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            await dep.check()
    except Exception as exc:  # any failure means "not usable now", whatever its type
        detail = f"{type(exc).__name__}: {exc}"[:200] or type(exc).__name__
        ok = False
    else:
        detail, ok = "", True
    return DependencyStatus(
        dep.name, ok, (time.perf_counter() - started) * 1000, detail, dep.required
    )


class GrpcService:
    """Owns one grpc.aio server and its lifecycle.

    `on_start` hooks run in order once the server is listening (background work such as
    periodic jobs; each should return promptly, starting a task rather than running the job).
    If one raises, the service is stopped (the `on_stop` hooks run) and `start` raises.
    `on_drain` hooks run once the service reports NOT_SERVING, before the drain: they end
    long-lived streams (which would otherwise hold the drain for the whole grace period) so
    their clients reconnect elsewhere. `on_stop` hooks run in order after the server has
    drained; one that raises is logged and the others still run, so stop a background job
    before closing the clients it uses.

    `lean_services` are served without a trace span and without protovalidate: high-rate
    services called by Envoy itself, whose calls carry no trace context (every call would
    start a new trace) and whose contracts are not ours (nothing to validate), such as the
    rate limit service."""

    def __init__(
        self,
        name: str,
        settings: ServiceSettings,
        service_names: Sequence[str],
        register: Callable[[grpc.aio.Server], None],
        dependencies: Sequence[Dependency] = (),
        on_stop: Sequence[Callable[[], Awaitable[None]]] = (),
        on_start: Sequence[Callable[[], Awaitable[None]]] = (),
        lean_services: Sequence[str] = (),
        on_drain: Sequence[Callable[[], Awaitable[None]]] = (),
    ) -> None:
        self.name = name
        self.settings = settings
        self.service_names = list(service_names)
        self.dependencies = list(dependencies)
        self.on_stop = list(on_stop)
        self.on_start = list(on_start)
        self.on_drain = list(on_drain)
        self.health = AsyncHealthServicer()
        self.server = grpc.aio.server(
            interceptors=[
                # grpc.health.v1 is never traced either: Envoy's checks every 2 s and the
                # channels' Watch streams would each start a trace (and the tracing
                # interceptor cannot wrap Watch, which writes with context.write).
                server_interceptor([*lean_services, health.SERVICE_NAME]),
                ServiceInterceptor(lean_services),
            ],
            options=SERVER_OPTIONS,
        )
        register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.port = 0
        self.last_statuses: list[DependencyStatus] = []
        self._probe_task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> int:
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"{self.name}: cannot listen on {address}")
        if self.settings.metrics_port:
            start_http_server(self.settings.metrics_port, addr=self.settings.metrics_host)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.refresh_health()
        await self.server.start()
        self._probe_task = asyncio.create_task(self._probe_forever(), name="health-probe")
        try:
            for hook in self.on_start:
                await hook()
        except Exception:
            log.exception("%s: a start hook failed; stopping", self.name)
            await self.stop()
            raise
        log.info(
            "%s listening on %s:%d",
            self.name,
            self.settings.grpc_host,
            self.port,
            extra={"grpc_port": self.port, "metrics_port": self.settings.metrics_port},
        )
        return self.port

    async def refresh_health(self) -> list[DependencyStatus]:
        statuses = list(await asyncio.gather(*(probe(d) for d in self.dependencies)))
        self.last_statuses = statuses
        if self._stopping:
            return statuses
        serving = all(s.ok for s in statuses if s.required)
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ["", *self.service_names]:
            await self.health.set(service, status)
        for s in statuses:
            if not s.ok:
                log.warning(
                    "dependency %s unavailable: %s",
                    s.name,
                    s.detail,
                    extra={"dependency": s.name, "required": s.required},
                )
        return statuses

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_probe_interval_seconds)
            await self.refresh_health()

    async def stop(self) -> None:
        """NOT_SERVING first so load balancers stop sending (still serving for
        SHUTDOWN_DRAIN_DELAY_SECONDS while they notice), then drain, then close."""
        if self._stopping:
            return
        self._stopping = True
        log.info(
            "%s stopping: draining for up to %.0fs", self.name, self.settings.shutdown_grace_seconds
        )
        await self.health.enter_graceful_shutdown()
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
        if self.settings.shutdown_drain_delay_seconds > 0:
            # Callers see NOT_SERVING (every name, `liveness` included) and move away; calls
            # that still arrive are served. server.stop() would refuse them.
            await asyncio.sleep(self.settings.shutdown_drain_delay_seconds)
        await self._run_hooks(self.on_drain)
        await self.server.stop(self.settings.shutdown_grace_seconds)
        await self._run_hooks(self.on_stop)
        shutdown_tracing()
        log.info("%s stopped", self.name)

    @staticmethod
    async def _run_hooks(hooks: Sequence[Callable[[], Awaitable[None]]]) -> None:
        """In order; one that raises is logged and the others still run."""
        for hook in hooks:
            try:
                await hook()
            except Exception:
                log.exception("error in %s", getattr(hook, "__qualname__", hook))

    async def serve_until_signalled(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        await self.stop()


S = TypeVar("S", bound=ServiceSettings)


def run_service(
    name: str, settings_type: type[S], create_service: Callable[[S], Awaitable[GrpcService]]
) -> None:
    """Every service's `__main__`: read settings (a bad value is a clear message, not a
    traceback), set up logs and traces, serve until SIGTERM/SIGINT, then stop gracefully."""
    try:
        settings = settings_type()
    except ValidationError as err:
        sys.exit(f"{name}: invalid settings\n{err}")
    configure_logging(name, settings.log_level)
    configure_tracing(name, settings.otel_exporter_otlp_endpoint, settings.otel_traces_sampler)

    async def main() -> None:
        try:
            service = await create_service(settings)
        except ValueError as err:  # configuration beyond the settings, e.g. a rate-limit file
            sys.exit(f"{name}: {err}")
        tune_gc()
        await service.serve_until_signalled()

    asyncio.run(main())


# Collections of the youngest generation: one every this many net container allocations
# (CPython's default is 700). A cache hit allocates a few thousand objects across gRPC,
# protobuf, Redis and OpenTelemetry, nearly none in cycles, so at 700 the collector ran several
# times per request.
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Once the service is built: what exists now (modules, settings, clients) lives as long as
    the process, so it leaves the collector's view (gc.freeze), and young collections run less
    often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
