"""The upstream model, behind a small interface: `OpenAIUpstream` talks to any
OpenAI-compatible chat-completions API through the official SDK (OpenAI itself or the
simulator; it cannot tell which), and maps the SDK's failures to our error model.

Each call here is ONE attempt: the SDK's own retries are off (max_retries=0) and our caller runs
the one retry loop, guided by what an UpstreamError says: whether the failure is transient
(`retryable`), whether it counts against the circuit breaker (`counts_as_failure`), and the
Retry-After the upstream sent (`upstream_retry_after`).

Every attempt is traced and measured after the OpenTelemetry GenAI semantic conventions: a CLIENT
span "chat {model}" with the gen_ai.* attributes, and the Prometheus metrics of `genai_metrics`
(the v1.x GenAI client metrics: gen_ai.client.operation.duration, gen_ai.client.token.usage,
gen_ai.client.operation.time_to_first_chunk).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import math
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import httpx2  # the SDK's HTTP transport (openai 3.x), for errors raised mid-stream
import openai
from openai.types.chat import (
    ChatCompletionContentPartParam,
    ChatCompletionMessageParam,
)
from openai.types.completion_usage import CompletionUsage
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from services.common.errors import Reason, ServiceError
from services.common.perf import PerformanceMonitor
from services.generation import genai_metrics
from services.generation.answer import Answer, Usage
from services.generation.genai_metrics import OperationLabels, TokenUsage

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

OPERATION = "openai.chat.completions"
# The spec's list of upstream failures that count against the circuit breaker (plus
# timeouts and connection errors, handled by exception type).
BREAKER_STATUSES = frozenset({429, 500, 502, 503, 504})
# Transient failures, worth another attempt (plus timeouts and connection errors): the
# breaker's statuses, a request timeout and a conflict.
RETRYABLE_STATUSES = BREAKER_STATUSES | {408, 409}
# When the upstream is unavailable without saying for how long.
DEFAULT_RETRY_AFTER_SECONDS = 2.0
MAX_MESSAGE_CHARS = 300
DEFAULT_PORTS = {"https": 443, "http": 80}


@dataclass(frozen=True)
class ImageInput:
    data: bytes
    mime_type: str

    def data_url(self) -> str:
        return f"data:{self.mime_type};base64,{base64.b64encode(self.data).decode('ascii')}"


@dataclass(frozen=True)
class Prompt:
    model: str
    system: str
    # Already normalized; may be empty when an image is given.
    text: str
    image: ImageInput | None
    max_tokens: int

    def messages(self) -> list[ChatCompletionMessageParam]:
        if self.image is None:
            return [
                {"role": "system", "content": self.system},
                {"role": "user", "content": self.text},
            ]
        parts: list[ChatCompletionContentPartParam] = []
        if self.text:
            parts.append({"type": "text", "text": self.text})
        parts.append({"type": "image_url", "image_url": {"url": self.image.data_url()}})
        return [{"role": "system", "content": self.system}, {"role": "user", "content": parts}]


class UpstreamError(Exception):
    """A failed attempt at the upstream, as the error our caller sees, and:

    - `counts_as_failure`: whether it counts against the circuit breaker (the upstream is
      unhealthy) or not (e.g. it rejected this input);
    - `retryable`: whether it is transient, so another attempt may well succeed (timeouts,
      connection errors, HTTP 408, 409, 429, 500, 502, 503, 504), or not (rejected input,
      our configuration refused, an unusable answer). Defaults to `counts_as_failure`;
    - `upstream_retry_after`: the Retry-After (seconds) the upstream actually sent, None if it
      sent none. (`error.retry_after_seconds` falls back to DEFAULT_RETRY_AFTER_SECONDS for
      our callers; this one does not.)
    """

    def __init__(
        self,
        error: ServiceError,
        *,
        counts_as_failure: bool,
        retryable: bool | None = None,
        upstream_retry_after: float | None = None,
    ) -> None:
        super().__init__(str(error))
        self.error = error
        self.counts_as_failure = counts_as_failure
        self.retryable = counts_as_failure if retryable is None else retryable
        self.upstream_retry_after = upstream_retry_after


class Upstream(Protocol):
    async def complete(self, prompt: Prompt) -> Answer:
        """The whole answer. Raises UpstreamError."""
        ...

    def stream(self, prompt: Prompt) -> AsyncGenerator[str | Answer, None]:
        """Text deltas in order, then the complete Answer (text, model, usage) last.
        Raises UpstreamError, possibly after some deltas."""
        ...


def upstream_unavailable(message: str, retry_after: float | None) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        Reason.UPSTREAM_UNAVAILABLE,
        message,
        retry_after_seconds=retry_after,
    )


def upstream_timeout() -> UpstreamError:
    return UpstreamError(
        ServiceError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            Reason.UPSTREAM_TIMEOUT,
            "the model did not answer in time",
        ),
        counts_as_failure=True,
        retryable=True,
    )


def retry_after_from_headers(headers: Mapping[str, str]) -> float | None:
    """The upstream's Retry-After (or OpenAI's retry-after-ms), in seconds, if usable."""
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            if parsed is None:
                continue
            seconds = email.utils.mktime_tz(parsed) - time.time()
        if math.isfinite(seconds) and seconds > 0:
            return seconds
    return None


def _upstream_message(exc: openai.APIError) -> str:
    return " ".join(str(exc.message).split())[:MAX_MESSAGE_CHARS]


def map_openai_error(exc: openai.OpenAIError) -> UpstreamError:
    """The SDK's exception as our error. An upstream 429 is our dependency's limit, not the
    caller's: it becomes UNAVAILABLE (503) with the upstream's Retry-After, never 429."""
    if isinstance(exc, openai.APITimeoutError):
        return upstream_timeout()
    if isinstance(exc, openai.APIConnectionError):
        return UpstreamError(
            upstream_unavailable("the model API is unreachable", DEFAULT_RETRY_AFTER_SECONDS),
            counts_as_failure=True,
            retryable=True,
        )
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retry_after = retry_after_from_headers(exc.response.headers)
        if status in (400, 413, 422):
            return UpstreamError(
                ServiceError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    Reason.UPSTREAM_REJECTED,
                    f"the model rejected the request: {_upstream_message(exc)}",
                ),
                counts_as_failure=False,
                retryable=False,
                upstream_retry_after=retry_after,
            )
        if status in (401, 403, 404):
            # Our credentials or model name are wrong: an operator problem, not the caller's.
            log.error(
                "the model API refused our configuration (HTTP %d): %s",
                status,
                _upstream_message(exc),
            )
        message = (
            "the model API is rate limiting us"
            if status == 429
            else f"the model API failed (HTTP {status})"
        )
        return UpstreamError(
            upstream_unavailable(message, retry_after or DEFAULT_RETRY_AFTER_SECONDS),
            counts_as_failure=status in BREAKER_STATUSES,
            retryable=status in RETRYABLE_STATUSES,
            upstream_retry_after=retry_after,
        )
    # Malformed responses and the like: the upstream misbehaved, but it answered.
    log.warning("unexpected error from the model API: %r", exc)
    return UpstreamError(
        upstream_unavailable("the model API returned an unusable answer", None),
        counts_as_failure=False,
        retryable=False,
    )


def error_type(exc: BaseException) -> str:
    """The `error.type` of a failed attempt (the values are listed in genai_metrics)."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return genai_metrics.ERROR_CANCELLED
    if isinstance(exc, openai.APITimeoutError):
        return genai_metrics.ERROR_TIMEOUT
    if isinstance(exc, openai.APIStatusError):
        return str(exc.status_code)
    return type(exc).__qualname__


def _usage(usage: CompletionUsage | None) -> Usage:
    if usage is None:
        return Usage()
    return Usage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


class _Attempt:
    """The telemetry of one attempt at a chat completion: its CLIENT span (started here, never
    made current by this class) and its GenAI metrics, finished exactly once."""

    def __init__(
        self, tracer: trace.Tracer, labels: OperationLabels, prompt: Prompt, *, stream: bool
    ) -> None:
        self.labels = labels
        # Known before the call, so given at the span's start (they matter for sampling).
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": labels.operation,
            "gen_ai.provider.name": labels.provider,
            "gen_ai.request.model": prompt.model,
            "gen_ai.request.max_tokens": prompt.max_tokens,
            "server.address": labels.server_address,
        }
        if labels.server_port is not None:
            attributes["server.port"] = labels.server_port
        if stream:
            attributes["gen_ai.request.stream"] = True
        self.span = tracer.start_span(
            f"{labels.operation} {prompt.model}", kind=SpanKind.CLIENT, attributes=attributes
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


class OpenAIUpstream:
    """The chat-completions API through `openai.AsyncOpenAI`. Spans go to `tracer` if given,
    else to this module's `tracer` (the global tracer provider's)."""

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        perf: PerformanceMonitor,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.client = client
        self.perf = perf
        self._tracer = tracer
        url = client.base_url
        self.server_address: str = url.host
        self.server_port: int | None = url.port or DEFAULT_PORTS.get(url.scheme)

    def _attempt(self, prompt: Prompt, *, stream: bool) -> _Attempt:
        labels = OperationLabels(prompt.model, self.server_address, self.server_port)
        return _Attempt(self._tracer or tracer, labels, prompt, stream=stream)

    async def complete(self, prompt: Prompt) -> Answer:
        attempt = self._attempt(prompt, stream=False)
        headers: dict[str, str] = {}
        # The SDK's HTTP client is not instrumented: carry the trace by hand.
        propagate.inject(headers, context=attempt.context)
        try:
            # Current while we wait (there are no yields here); `attempt` ends it.
            with trace.use_span(
                attempt.span, record_exception=False, set_status_on_exception=False
            ):
                async with self.perf.track(OPERATION):
                    completion = await self.client.chat.completions.create(
                        model=prompt.model,
                        messages=prompt.messages(),
                        max_completion_tokens=prompt.max_tokens,
                        extra_headers=headers,
                    )
        except openai.OpenAIError as exc:
            attempt.failed(exc)
            raise map_openai_error(exc) from exc
        except BaseException as exc:
            attempt.failed(exc)  # cancelled by our caller, or a bug
            raise
        text = (completion.choices[0].message.content or "") if completion.choices else ""
        answer = Answer(text, completion.model or prompt.model, _usage(completion.usage))
        attempt.succeeded(
            response_id=completion.id,
            response_model=completion.model,
            finish_reasons=[c.finish_reason for c in completion.choices if c.finish_reason],
            usage=completion.usage,
        )
        return answer

    async def stream(self, prompt: Prompt) -> AsyncGenerator[str | Answer, None]:
        # The span is never "current": it would otherwise leak across the generator's yields.
        attempt = self._attempt(prompt, stream=True)
        headers: dict[str, str] = {}
        propagate.inject(headers, context=attempt.context)
        started = time.perf_counter()
        outcome: bool | None = None  # True ok, False failed, None abandoned by our caller
        response_id: str | None = None
        model: str | None = None
        usage: CompletionUsage | None = None
        # By choice index: None until the choice's finish_reason arrives.
        finish: dict[int, str | None] = {}

        def finish_reasons() -> list[str]:
            # A choice whose finish_reason never came ended abnormally: "error", as the
            # conventions ask.
            return [finish[i] or "error" for i in sorted(finish)]

        try:
            response = await self.client.chat.completions.create(
                model=prompt.model,
                messages=prompt.messages(),
                max_completion_tokens=prompt.max_tokens,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers=headers,
            )
            parts: list[str] = []
            async with response:
                async for chunk in response:
                    model = chunk.model or model
                    response_id = chunk.id or response_id
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for choice in chunk.choices:
                        finish[choice.index] = choice.finish_reason or finish.get(choice.index)
                        if choice.delta.content:
                            attempt.first_chunk(model)
                            parts.append(choice.delta.content)
                            yield choice.delta.content
            outcome = True
            # Finished before the Answer is handed over: the attempt ends with the stream.
            attempt.succeeded(
                response_id=response_id,
                response_model=model,
                finish_reasons=finish_reasons(),
                usage=usage,
            )
            yield Answer("".join(parts), model or prompt.model, _usage(usage))
        except (openai.OpenAIError, httpx2.HTTPError) as exc:
            outcome = False
            error = _as_openai_error(exc)
            attempt.failed(
                error,
                response_id=response_id,
                response_model=model,
                finish_reasons=finish_reasons(),
                usage=usage,
            )
            raise map_openai_error(error) from exc
        except BaseException as exc:
            # Abandoned by our caller (GeneratorExit, CancelledError; a no-op once the Answer
            # is out), or a bug.
            attempt.failed(
                exc,
                response_id=response_id,
                response_model=model,
                finish_reasons=finish_reasons(),
                usage=usage,
            )
            raise
        finally:
            # Recorded by hand: perf.track cannot span a generator's yields. A stream our
            # caller abandoned (client gone) is neither a success nor an upstream failure.
            if outcome is not None:
                self.perf.record(
                    OPERATION, (time.perf_counter() - started) * 1000, failed=not outcome
                )


def _as_openai_error(exc: openai.OpenAIError | httpx2.HTTPError) -> openai.OpenAIError:
    """Once a stream has started the SDK no longer wraps transport errors (the connection
    dropped or a read timed out between chunks): wrap them the way it does for requests."""
    if isinstance(exc, openai.OpenAIError):
        return exc
    try:
        request = exc.request
    except RuntimeError:  # httpx raises when the error carries no request
        request = httpx2.Request("POST", "http://upstream.invalid/chat/completions")
    if isinstance(exc, httpx2.TimeoutException):
        return openai.APITimeoutError(request=request)
    return openai.APIConnectionError(message=str(exc) or type(exc).__name__, request=request)
