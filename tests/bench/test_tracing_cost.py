"""The tracing section's span sink: a process of its own that counts what an OTLP exporter
sends it, and reports the count when stopped."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from bench.tracing_cost import span_sink


def test_the_sink_counts_every_span_exported_to_it() -> None:
    with span_sink() as (stop, endpoint):
        provider = TracerProvider()
        provider.add_span_processor(
            SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True))
        )
        tracer = provider.get_tracer("bench-test")
        for n in range(7):
            with tracer.start_as_current_span(f"span {n}"):
                pass
        provider.shutdown()
        assert stop() == 7
        assert stop() == 7  # stopping twice reports the same count
