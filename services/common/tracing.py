"""OpenTelemetry tracing: one TracerProvider per process, W3C trace context, OTLP export when
OTEL_EXPORTER_OTLP_ENDPOINT is set, and instrumentation of the hops the libraries make: the
grpc.aio server and clients, asyncpg and redis. (The openai SDK runs on httpx2, which no
instrumentation covers; the generation service spans and propagates that call itself.)

Without an exporter nothing would receive a span, and recording them cost a cache hit about a
fifth of its CPU (make bench). So a process without one records no trace it starts (unless
OTEL_TRACES_SAMPLER names a sampler), and asyncpg and redis are not instrumented. Trace context
still flows (trace ids in logs, traceparent to the next service), and a caller's sampled
decision is still followed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, aio_server_interceptor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler

_provider: TracerProvider | None = None


def default_sampler(otlp_endpoint: str, sampler_name: str) -> Sampler | None:
    """The sampler when none is named: parent-based, never starting a recorded trace, when no
    exporter is set. None lets the SDK read OTEL_TRACES_SAMPLER (its default: parent-based,
    always on)."""
    if otlp_endpoint or sampler_name:
        return None
    return ParentBased(ALWAYS_OFF)


def configure_tracing(service: str, otlp_endpoint: str, sampler_name: str = "") -> TracerProvider:
    """Install the global tracer provider and instrument client libraries (idempotent)."""
    global _provider  # noqa: PLW0603 - one provider per process, by OpenTelemetry's design
    if _provider is not None:
        return _provider
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: service}),
        sampler=default_sampler(otlp_endpoint, sampler_name),
    )
    trace.set_tracer_provider(provider)
    # gRPC clients carry the trace context to the next service, exporter or not.
    GrpcAioInstrumentorClient().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    if otlp_endpoint:
        _export_and_instrument(provider, otlp_endpoint)
    _provider = provider
    return provider


def _export_and_instrument(provider: TracerProvider, otlp_endpoint: str) -> None:
    """OTLP export, and a span per query and per Redis command: only worth their cost (a tenth
    of a cache hit's CPU in generation) when something receives the spans. Imported here, not
    at the top: a process without an exporter saves their memory too (about 5 MB)."""
    # Deferred imports, on purpose (see above).
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor  # noqa: PLC0415
    from opentelemetry.instrumentation.redis import RedisInstrumentor  # noqa: PLC0415

    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True))
    )
    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    RedisInstrumentor().instrument(tracer_provider=provider)


def server_interceptor(untraced_services: Sequence[str] = ()) -> Any:
    """Starts a server span per RPC, continuing the trace carried in `traceparent` metadata;
    RPCs of `untraced_services` get none."""
    return aio_server_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider=_provider or trace.get_tracer_provider(),
        filter_=traced_method_filter(untraced_services) if untraced_services else None,
    )


def traced_method_filter(untraced_services: Sequence[str]) -> Callable[[Any], bool]:
    """True for a call whose service is not in `untraced_services`. A prefix test of the
    method path: OpenTelemetry's own `filters` run typing-Protocol isinstance checks and path
    normalisation on every call, about 4 % of a quota process's CPU under load."""
    prefixes = tuple(f"/{name}/" for name in untraced_services)

    def traced(details: Any) -> bool:
        method = details.method
        if isinstance(method, bytes):
            method = method.decode()
        return not str(method).startswith(prefixes)

    return traced


def shutdown_tracing() -> None:
    """Flush spans still buffered so a clean stop loses none."""
    if _provider is not None:
        _provider.shutdown()
