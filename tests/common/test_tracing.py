"""Tracing set-up: the sampler a process gets when none is named (without an exporter it records
no trace it starts, yet trace context still flows: ids for logs, a caller's sampled decision
kept), and which calls the server interceptor leaves untraced."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from services.common.tracing import default_sampler, traced_method_filter


def test_an_exporter_or_a_named_sampler_leaves_the_choice_to_the_sdk() -> None:
    assert default_sampler("http://127.0.0.1:4317", "") is None
    assert default_sampler("", "always_on") is None


def test_without_an_exporter_a_root_span_is_not_recorded_but_has_a_trace_id() -> None:
    sampler = default_sampler("", "")
    assert isinstance(sampler, ParentBased)
    tracer = TracerProvider(sampler=sampler).get_tracer("t")
    with tracer.start_as_current_span("root") as span:
        assert not span.is_recording()
        context = span.get_span_context()
        assert context.is_valid
        assert not context.trace_flags.sampled


def test_without_an_exporter_a_callers_sampled_decision_is_kept() -> None:
    tracer = TracerProvider(sampler=default_sampler("", "")).get_tracer("t")
    parent = SpanContext(
        trace_id=0x1234, span_id=0x99, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)
    )
    context = trace.set_span_in_context(NonRecordingSpan(parent))
    with tracer.start_as_current_span("child", context=context) as span:
        assert span.is_recording()
        assert span.get_span_context().trace_id == 0x1234


class _Details:
    def __init__(self, method: str | bytes) -> None:
        self.method = method


def test_calls_of_untraced_services_are_filtered_out_by_their_service_only() -> None:
    traced = traced_method_filter(["grpc.health.v1.Health", "genmesh.quota.v1.Internal"])
    assert not traced(_Details("/grpc.health.v1.Health/Check"))
    assert not traced(_Details(b"/genmesh.quota.v1.Internal/Stats"))
    assert traced(_Details("/genmesh.quota.v1.QuotaService/ReserveQuota"))
    # A service whose name merely starts like an untraced one is still traced.
    assert traced(_Details("/grpc.health.v1.HealthX/Check"))
