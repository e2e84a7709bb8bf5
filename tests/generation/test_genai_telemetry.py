"""GenAI telemetry of the upstream calls: the CLIENT span of each attempt and the Prometheus
metrics (the GenAI client metrics of the OpenTelemetry semantic conventions v1.x), against the
simulator in-process."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import REGISTRY

from services.common.perf import PerformanceMonitor
from services.generation import genai_metrics
from services.generation.answer import Answer
from services.generation.genai_metrics import OperationLabels, TokenUsage
from services.generation.upstream import ImageInput, OpenAIUpstream, Prompt
from services.generation.upstream_errors import UpstreamError
from tests.generation.conftest import Sim, running_sim
from tests.generation.upstreams import running_broken_stream_upstream
from tests.images import tiny_png

# gen_ai.client.operation.duration, gen_ai.client.token.usage and
# gen_ai.client.operation.time_to_first_chunk, as Prometheus names them.
DURATION = "gen_ai_client_operation_duration_seconds"
TOKEN_USAGE = "gen_ai_client_token_usage"
FIRST_CHUNK = "gen_ai_client_operation_time_to_first_chunk_seconds"
DURATION_BUCKETS = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
]  # fmt: skip
TOKEN_BUCKETS = [
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
]  # fmt: skip


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    """The simulator, taking any API key."""
    async with running_sim(api_key=None) as running:
        yield running


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@dataclass
class Target:
    upstream: OpenAIUpstream
    host: str
    port: int
    exporter: InMemorySpanExporter

    def only_span(self) -> ReadableSpan:
        spans = self.exporter.get_finished_spans()
        assert len(spans) == 1, [s.name for s in spans]
        return spans[0]


def target_at(base_url: str, exporter: InMemorySpanExporter, *, timeout: float = 10.0) -> Target:
    client = openai.AsyncOpenAI(
        api_key="test-key", base_url=base_url, max_retries=0, timeout=timeout
    )
    # A tracer provider of the test's own: the global one is left alone.
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    upstream = OpenAIUpstream(client, PerformanceMonitor(), tracer=provider.get_tracer("test"))
    url = urlsplit(base_url)
    assert url.hostname is not None and url.port is not None
    return Target(upstream, url.hostname, url.port, exporter)


@pytest.fixture
async def target(sim: Sim, exporter: InMemorySpanExporter) -> AsyncIterator[Target]:
    yield target_at(sim.base_url, exporter)


def a_model() -> str:
    """A model name of this test's own, so its metric series start empty."""
    return f"telemetry-{uuid.uuid4().hex[:8]}"


def labels(
    t: Target, model: str, *, response_model: str | None = None, **extra: str
) -> dict[str, str]:
    return {
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": "openai",
        "gen_ai_request_model": model,
        "gen_ai_response_model": model if response_model is None else response_model,
        "server_address": t.host,
        "server_port": str(t.port),
        **extra,
    }


def sample(name: str, label_values: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, label_values) or 0.0


def token_labels(
    t: Target, model: str, token_type: str, *, response_model: str | None = None
) -> dict[str, str]:
    return labels(t, model, response_model=response_model, gen_ai_token_type=token_type)


@dataclass
class Readings:
    """The samples of one test's series, read before the calls: `delta` gives what they added."""

    before: dict[tuple[str, tuple[tuple[str, str], ...]], float]

    @classmethod
    def of(cls, *series: tuple[str, dict[str, str]]) -> Readings:
        return cls({(name, tuple(sorted(lv.items()))): sample(name, lv) for name, lv in series})

    def delta(self, name: str, label_values: dict[str, str]) -> float:
        return sample(name, label_values) - self.before[(name, tuple(sorted(label_values.items())))]


def token_series(
    t: Target, model: str, *, response_model: str | None = None
) -> list[tuple[str, dict[str, str]]]:
    return [
        (f"{TOKEN_USAGE}_{suffix}", token_labels(t, model, kind, response_model=response_model))
        for kind in ("input", "output")
        for suffix in ("count", "sum")
    ]


async def drain(pieces: AsyncIterator[str | Answer]) -> tuple[list[str], Answer]:
    deltas: list[str] = []
    async for piece in pieces:
        if isinstance(piece, Answer):
            return deltas, piece
        deltas.append(piece)
    raise AssertionError("the stream ended without an Answer")


def assert_request_attributes(t: Target, span: ReadableSpan, model: str) -> None:
    assert span.name == f"chat {model}"
    assert span.kind is SpanKind.CLIENT
    attrs = span.attributes or {}
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert "gen_ai.system" not in attrs  # deprecated for gen_ai.provider.name
    assert attrs["gen_ai.request.model"] == model
    assert attrs["gen_ai.request.max_tokens"] == 50
    assert attrs["server.address"] == t.host
    assert attrs["server.port"] == t.port


async def test_unary_call_span_and_metrics(target: Target) -> None:
    model = a_model()
    ok = labels(target, model, error_type="")
    readings = Readings.of(
        (f"{DURATION}_count", ok),
        (f"{FIRST_CHUNK}_count", labels(target, model)),
        *token_series(target, model),
    )
    answer = await target.upstream.complete(Prompt(model, "Be brief.", "Hello there", None, 50))

    span = target.only_span()
    assert_request_attributes(target, span, model)
    attrs = span.attributes or {}
    assert str(attrs["gen_ai.response.id"]).startswith("chatcmpl-")
    assert attrs["gen_ai.response.model"] == model
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert attrs["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens > 0
    assert attrs["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens > 0
    for absent in ("error.type", "gen_ai.request.stream", "gen_ai.response.time_to_first_chunk"):
        assert absent not in attrs
    assert span.status.status_code is StatusCode.UNSET

    assert readings.delta(f"{DURATION}_count", ok) == 1
    assert 0 < sample(f"{DURATION}_sum", ok) < 10
    # One observation per token type, of the tokens the response reported.
    inputs = token_labels(target, model, "input")
    outputs = token_labels(target, model, "output")
    assert readings.delta(f"{TOKEN_USAGE}_count", inputs) == 1
    assert readings.delta(f"{TOKEN_USAGE}_sum", inputs) == answer.usage.prompt_tokens
    assert readings.delta(f"{TOKEN_USAGE}_count", outputs) == 1
    assert readings.delta(f"{TOKEN_USAGE}_sum", outputs) == answer.usage.completion_tokens
    # Time to first chunk is for streams only.
    assert readings.delta(f"{FIRST_CHUNK}_count", labels(target, model)) == 0


async def test_streamed_call_span_and_metrics(target: Target) -> None:
    model = a_model()
    ok = labels(target, model, error_type="")
    readings = Readings.of(
        (f"{DURATION}_count", ok),
        (f"{FIRST_CHUNK}_count", labels(target, model)),
        (f"{FIRST_CHUNK}_sum", labels(target, model)),
        *token_series(target, model),
    )

    deltas, answer = await drain(
        target.upstream.stream(Prompt(model, "Be brief.", "Tell me more", None, 50))
    )
    assert len(deltas) > 1
    assert "".join(deltas) == answer.text

    span = target.only_span()
    assert_request_attributes(target, span, model)
    attrs = span.attributes or {}
    assert attrs["gen_ai.request.stream"] is True
    assert str(attrs["gen_ai.response.id"]).startswith("chatcmpl-")
    assert attrs["gen_ai.response.model"] == model
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert attrs["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens > 0
    assert attrs["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens > 0
    assert "error.type" not in attrs
    assert span.start_time is not None and span.end_time is not None
    first_chunk = attrs["gen_ai.response.time_to_first_chunk"]
    assert isinstance(first_chunk, float)
    assert 0 < first_chunk <= (span.end_time - span.start_time) / 1e9

    assert readings.delta(f"{DURATION}_count", ok) == 1
    assert readings.delta(f"{FIRST_CHUNK}_count", labels(target, model)) == 1
    assert readings.delta(f"{FIRST_CHUNK}_sum", labels(target, model)) == pytest.approx(first_chunk)
    # The usage the stream's last chunk reported (stream_options.include_usage).
    inputs = token_labels(target, model, "input")
    outputs = token_labels(target, model, "output")
    assert readings.delta(f"{TOKEN_USAGE}_count", inputs) == 1
    assert readings.delta(f"{TOKEN_USAGE}_sum", inputs) == answer.usage.prompt_tokens
    assert readings.delta(f"{TOKEN_USAGE}_count", outputs) == 1
    assert readings.delta(f"{TOKEN_USAGE}_sum", outputs) == answer.usage.completion_tokens


async def test_histograms_use_the_conventions_buckets(target: Target) -> None:
    model = a_model()
    deltas, _ = await drain(target.upstream.stream(Prompt(model, "sys", "Hi", None, 50)))
    assert deltas

    def bucket_bounds(name: str, label_values: dict[str, str]) -> list[float]:
        bounds = [
            float(s.labels["le"])
            for metric in REGISTRY.collect()
            for s in metric.samples
            if s.name == f"{name}_bucket"
            and all(s.labels.get(k) == v for k, v in label_values.items())
        ]
        return sorted(b for b in bounds if b != float("inf"))

    assert bucket_bounds(DURATION, labels(target, model, error_type="")) == DURATION_BUCKETS
    assert bucket_bounds(FIRST_CHUNK, labels(target, model)) == DURATION_BUCKETS
    inputs = token_labels(target, model, "input")
    assert bucket_bounds(TOKEN_USAGE, inputs) == [float(b) for b in TOKEN_BUCKETS]


async def test_only_the_v1_metric_names_are_exported(target: Target) -> None:
    """The semantic-conventions-genai v0.1.0 names (gen_ai.client.inference.*) are gone."""
    await target.upstream.complete(Prompt(a_model(), "sys", "Hi", None, 50))
    names = {metric.name for metric in REGISTRY.collect() if metric.name.startswith("gen_ai_")}
    assert names == {
        "gen_ai_client_operation_duration_seconds",
        "gen_ai_client_token_usage",
        "gen_ai_client_operation_time_to_first_chunk_seconds",
    }


async def test_image_prompt_tokens_are_input_tokens(target: Target) -> None:
    model = a_model()
    readings = Readings.of(*token_series(target, model))
    image = ImageInput(tiny_png(), "image/png")
    answer = await target.upstream.complete(Prompt(model, "sys", "What is it?", image, 50))
    inputs = token_labels(target, model, "input")
    assert readings.delta(f"{TOKEN_USAGE}_sum", inputs) == answer.usage.prompt_tokens
    assert readings.delta(f"{TOKEN_USAGE}_count", token_labels(target, model, "output")) == 1
    # No modality split any more (that was semantic-conventions-genai v0.1.0).
    unknown = labels(target, model, gen_ai_token_modality="unknown")
    assert REGISTRY.get_sample_value(f"{TOKEN_USAGE}_count", unknown) is None


async def test_unary_failure_sets_error_type(sim: Sim, target: Target) -> None:
    model = a_model()
    failed = labels(target, model, response_model="", error_type="500")
    readings = Readings.of(
        (f"{DURATION}_count", failed),
        (f"{DURATION}_count", labels(target, model, error_type="")),
        *token_series(target, model, response_model=""),
    )
    await sim.set_faults(status=500)
    with pytest.raises(UpstreamError):
        await target.upstream.complete(Prompt(model, "sys", "Hi", None, 50))

    span = target.only_span()
    assert_request_attributes(target, span, model)
    attrs = span.attributes or {}
    assert attrs["error.type"] == "500"
    assert span.status.status_code is StatusCode.ERROR
    assert "gen_ai.response.model" not in attrs

    assert readings.delta(f"{DURATION}_count", failed) == 1
    assert readings.delta(f"{DURATION}_count", labels(target, model, error_type="")) == 0
    # No usage reported: no token usage recorded (not even 0).
    for kind in ("input", "output"):
        unreported = token_labels(target, model, kind, response_model="")
        assert readings.delta(f"{TOKEN_USAGE}_count", unreported) == 0
        assert REGISTRY.get_sample_value(f"{TOKEN_USAGE}_count", unreported) is None


async def test_stream_refused_with_429(sim: Sim, target: Target) -> None:
    model = a_model()
    failed = labels(target, model, response_model="", error_type="429")
    readings = Readings.of(
        (f"{DURATION}_count", failed),
        (f"{FIRST_CHUNK}_count", labels(target, model)),
        (f"{FIRST_CHUNK}_count", labels(target, model, response_model="")),
        *token_series(target, model, response_model=""),
    )
    await sim.set_faults(status=429, retry_after=7)
    with pytest.raises(UpstreamError) as caught:
        await drain(target.upstream.stream(Prompt(model, "sys", "Hi", None, 50)))
    assert caught.value.upstream_retry_after == 7
    assert caught.value.retryable

    attrs = target.only_span().attributes or {}
    assert attrs["error.type"] == "429"
    assert attrs["gen_ai.request.stream"] is True
    assert "gen_ai.response.time_to_first_chunk" not in attrs
    assert readings.delta(f"{DURATION}_count", failed) == 1
    # No content arrived: no time to first chunk.
    assert readings.delta(f"{FIRST_CHUNK}_count", labels(target, model)) == 0
    assert readings.delta(f"{FIRST_CHUNK}_count", labels(target, model, response_model="")) == 0
    for kind in ("input", "output"):
        unreported = token_labels(target, model, kind, response_model="")
        assert readings.delta(f"{TOKEN_USAGE}_count", unreported) == 0


async def test_timeout_is_error_type_timeout(sim: Sim, exporter: InMemorySpanExporter) -> None:
    t = target_at(sim.base_url, exporter, timeout=0.2)
    model = a_model()
    failed = labels(t, model, response_model="", error_type="timeout")
    readings = Readings.of((f"{DURATION}_count", failed))
    await sim.set_faults(latency_ms=2_000)
    with pytest.raises(UpstreamError) as caught:
        await t.upstream.complete(Prompt(model, "sys", "Hi", None, 50))
    assert caught.value.retryable and caught.value.counts_as_failure
    assert caught.value.upstream_retry_after is None
    assert (t.only_span().attributes or {})["error.type"] == "timeout"
    assert readings.delta(f"{DURATION}_count", failed) == 1


async def test_stream_dropped_mid_way(exporter: InMemorySpanExporter) -> None:
    model = a_model()
    async with running_broken_stream_upstream() as base_url:
        t = target_at(base_url, exporter)
        failed = labels(t, model, error_type="APIConnectionError")
        readings = Readings.of(
            (f"{DURATION}_count", failed),
            (f"{FIRST_CHUNK}_count", labels(t, model)),
            *token_series(t, model),
        )
        pieces = t.upstream.stream(Prompt(model, "sys", "Hi", None, 50))
        assert await anext(pieces) == "Hello "
        with pytest.raises(UpstreamError) as caught:
            await anext(pieces)
    assert caught.value.retryable and caught.value.counts_as_failure

    attrs = t.only_span().attributes or {}
    assert attrs["error.type"] == "APIConnectionError"
    assert attrs["gen_ai.response.id"] == "chatcmpl-broken"
    # The choice never got its finish_reason.
    assert attrs["gen_ai.response.finish_reasons"] == ("error",)
    assert "gen_ai.response.time_to_first_chunk" in attrs
    assert readings.delta(f"{FIRST_CHUNK}_count", labels(t, model)) == 1
    assert readings.delta(f"{DURATION}_count", failed) == 1
    for kind in ("input", "output"):
        assert readings.delta(f"{TOKEN_USAGE}_count", token_labels(t, model, kind)) == 0


async def test_stream_abandoned_by_our_caller(target: Target) -> None:
    model = a_model()
    cancelled = labels(target, model, error_type="cancelled")
    readings = Readings.of((f"{DURATION}_count", cancelled), *token_series(target, model))
    pieces = target.upstream.stream(Prompt(model, "sys", "Tell me a long story", None, 50))
    await anext(pieces)
    await pieces.aclose()

    span = target.only_span()
    assert (span.attributes or {})["error.type"] == "cancelled"
    assert readings.delta(f"{DURATION}_count", cancelled) == 1
    for kind in ("input", "output"):
        assert readings.delta(f"{TOKEN_USAGE}_count", token_labels(target, model, kind)) == 0


async def test_unary_call_cancelled(sim: Sim, target: Target) -> None:
    model = a_model()
    cancelled = labels(target, model, response_model="", error_type="cancelled")
    readings = Readings.of((f"{DURATION}_count", cancelled))
    await sim.set_faults(latency_ms=5_000)
    call = asyncio.create_task(target.upstream.complete(Prompt(model, "sys", "Hi", None, 50)))
    await asyncio.sleep(0.1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert (target.only_span().attributes or {})["error.type"] == "cancelled"
    assert readings.delta(f"{DURATION}_count", cancelled) == 1


def test_failed_operation_records_no_token_usage_even_if_reported() -> None:
    """Token usage is recorded only for an operation that succeeded and reported its usage."""
    model = a_model()
    op = OperationLabels(model, "upstream.test", 443)
    common = op.values(model)
    series = [
        (f"{TOKEN_USAGE}_{suffix}", {**common, "gen_ai_token_type": kind})
        for kind in ("input", "output")
        for suffix in ("count", "sum")
    ]
    readings = Readings.of(*series, (f"{DURATION}_count", {**common, "error_type": "cancelled"}))

    genai_metrics.record_operation(
        op, response_model=model, seconds=0.5, usage=TokenUsage(7, 3), error_type="cancelled"
    )
    assert readings.delta(f"{DURATION}_count", {**common, "error_type": "cancelled"}) == 1
    for name, label_values in series:
        assert readings.delta(name, label_values) == 0

    genai_metrics.record_operation(op, response_model=model, seconds=0.5, usage=None)
    for name, label_values in series:
        assert readings.delta(name, label_values) == 0

    genai_metrics.record_operation(op, response_model=model, seconds=0.5, usage=TokenUsage(7, 3))
    inputs = {**common, "gen_ai_token_type": "input"}
    outputs = {**common, "gen_ai_token_type": "output"}
    assert readings.delta(f"{TOKEN_USAGE}_count", inputs) == 1
    assert readings.delta(f"{TOKEN_USAGE}_sum", inputs) == 7
    assert readings.delta(f"{TOKEN_USAGE}_count", outputs) == 1
    assert readings.delta(f"{TOKEN_USAGE}_sum", outputs) == 3
