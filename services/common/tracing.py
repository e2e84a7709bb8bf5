"""OpenTelemetry tracing: one TracerProvider per process, W3C trace context, OTLP export when
OTEL_EXPORTER_OTLP_ENDPOINT is set, and instrumentation of the hops the libraries make: the
grpc.aio server and clients, asyncpg and redis. (The openai SDK runs on httpx2, which no
instrumentation covers; the generation service spans and propagates that call itself.)"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.grpc import (
    GrpcAioInstrumentorClient,
    aio_server_interceptor,
    filters,
)
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_provider: TracerProvider | None = None


def configure_tracing(service: str, otlp_endpoint: str) -> TracerProvider:
    """Install the global tracer provider and instrument client libraries (idempotent)."""
    global _provider  # noqa: PLW0603 - one provider per process, by OpenTelemetry's design
    if _provider is not None:
        return _provider
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    if otlp_endpoint:
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True))
        )
    trace.set_tracer_provider(provider)
    GrpcAioInstrumentorClient().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    RedisInstrumentor().instrument(tracer_provider=provider)
    _provider = provider
    return provider


def server_interceptor(untraced_services: Sequence[str] = ()) -> Any:
    """Starts a server span per RPC, continuing the trace carried in `traceparent` metadata;
    RPCs of `untraced_services` get none."""
    untraced = [filters.service_name(name) for name in untraced_services]
    return aio_server_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider=_provider or trace.get_tracer_provider(),
        filter_=filters.negate(filters.any_of(*untraced)) if untraced else None,
    )


def shutdown_tracing() -> None:
    """Flush spans still buffered so a clean stop loses none."""
    if _provider is not None:
        _provider.shutdown()
