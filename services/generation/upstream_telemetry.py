"""The telemetry of one attempt at the upstream, after the OpenTelemetry GenAI semantic
conventions: `Attempt` starts a CLIENT span "chat {model}" with the gen_ai.* attributes and,
once the attempt is over, ends it and records the Prometheus metrics of `genai_metrics`
(gen_ai.client.operation.duration, gen_ai.client.token.usage,
gen_ai.client.operation.time_to_first_chunk).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from openai.types.completion_usage import CompletionUsage
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from services.generation import genai_metrics
from services.generation.genai_metrics import OperationLabels, TokenUsage
from services.generation.upstream_errors import error_type


class Attempt:
    """The telemetry of one attempt at a chat completion: its CLIENT span (started here, never
    made current by this class) and its GenAI metrics, finished exactly once."""

    def __init__(
        self, tracer: trace.Tracer, labels: OperationLabels, *, max_tokens: int, stream: bool
    ) -> None:
        self.labels = labels
        # Known before the call, so given at the span's start (they matter for sampling).
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": labels.operation,
            "gen_ai.provider.name": labels.provider,
            "gen_ai.request.model": labels.request_model,
            "gen_ai.request.max_tokens": max_tokens,
            "server.address": labels.server_address,
        }
        if labels.server_port is not None:
            attributes["server.port"] = labels.server_port
        if stream:
            attributes["gen_ai.request.stream"] = True
        self.span = tracer.start_span(
            f"{labels.operation} {labels.request_model}",
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        self.started = time.perf_counter()
        self.first_chunk_seconds: float | None = None
        self.finished = False

    @property
    def context(self) -> Context:
        return trace.set_span_in_context(self.span)

    def first_chunk(self, response_model: str | None) -> None:
        """A content delta arrived: the first one sets the time to first chunk."""
        if self.first_chunk_seconds is not None:
            return
        self.first_chunk_seconds = time.perf_counter() - self.started
        self.span.set_attribute("gen_ai.response.time_to_first_chunk", self.first_chunk_seconds)
        genai_metrics.record_time_to_first_chunk(
            self.labels, response_model, self.first_chunk_seconds
        )

    def succeeded(
        self,
        *,
        response_id: str | None,
        response_model: str | None,
        finish_reasons: Sequence[str],
        usage: CompletionUsage | None,
    ) -> None:
        self._finish(response_id, response_model, finish_reasons, usage, None)

    def failed(
        self,
        exc: BaseException,
        *,
        response_id: str | None = None,
        response_model: str | None = None,
        finish_reasons: Sequence[str] = (),
        usage: CompletionUsage | None = None,
    ) -> None:
        self._finish(response_id, response_model, finish_reasons, usage, exc)

    def _finish(
        self,
        response_id: str | None,
        response_model: str | None,
        finish_reasons: Sequence[str],
        usage: CompletionUsage | None,
        exc: BaseException | None,
    ) -> None:
        if self.finished:
            return
        self.finished = True
        seconds = time.perf_counter() - self.started
        span = self.span
        if response_id:
            span.set_attribute("gen_ai.response.id", response_id)
        if response_model:
            span.set_attribute("gen_ai.response.model", response_model)
        if finish_reasons:
            span.set_attribute("gen_ai.response.finish_reasons", list(finish_reasons))
        tokens: TokenUsage | None = None  # none reported: no token usage recorded
        if usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
            tokens = TokenUsage(usage.prompt_tokens, usage.completion_tokens)
        kind = None
        if exc is not None:
            kind = error_type(exc)
            span.set_attribute("error.type", kind)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        genai_metrics.record_operation(
            self.labels,
            response_model=response_model,
            seconds=seconds,
            usage=tokens,
            error_type=kind,
        )
        span.end()
