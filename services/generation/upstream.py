"""The upstream model, behind a small interface: `OpenAIUpstream` talks to any
OpenAI-compatible chat-completions API through the official SDK (OpenAI itself or the
simulator; it cannot tell which), and maps the SDK's failures to our error model.

The SDK makes its own retries (OPENAI_MAX_RETRIES, exponential backoff honouring Retry-After);
what reaches us is the outcome after them.
"""

from __future__ import annotations

import base64
import email.utils
import logging
import math
import time
from collections.abc import AsyncGenerator, Mapping
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
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.common.errors import Reason, ServiceError
from services.common.perf import PerformanceMonitor
from services.generation.answer import Answer, Usage

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

OPERATION = "openai.chat.completions"
# The spec's list of upstream failures that count against the circuit breaker (plus
# timeouts and connection errors, handled by exception type).
BREAKER_STATUSES = frozenset({429, 500, 502, 503, 504})
# When the upstream is unavailable without saying for how long.
DEFAULT_RETRY_AFTER_SECONDS = 2.0
MAX_MESSAGE_CHARS = 300


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
    """An upstream failure, as the error our caller sees, and whether it counts against the
    circuit breaker (the upstream is unhealthy) or not (e.g. it rejected this input)."""

    def __init__(self, error: ServiceError, *, counts_as_failure: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.counts_as_failure = counts_as_failure


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
        )
    # Malformed responses and the like: the upstream misbehaved, but it answered.
    log.warning("unexpected error from the model API: %r", exc)
    return UpstreamError(
        upstream_unavailable("the model API returned an unusable answer", None),
        counts_as_failure=False,
    )


def _usage(usage: CompletionUsage | None) -> Usage:
    if usage is None:
        return Usage()
    return Usage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


class OpenAIUpstream:
    """The chat-completions API through `openai.AsyncOpenAI`."""

    def __init__(self, client: openai.AsyncOpenAI, perf: PerformanceMonitor) -> None:
        self.client = client
        self.perf = perf

    async def complete(self, prompt: Prompt) -> Answer:
        with tracer.start_as_current_span(OPERATION, kind=SpanKind.CLIENT) as span:
            span.set_attribute("gen_ai.request.model", prompt.model)
            headers: dict[str, str] = {}
            # The SDK's HTTP client is not instrumented: carry the trace by hand.
            propagate.inject(headers)
            try:
                async with self.perf.track(OPERATION):
                    completion = await self.client.chat.completions.create(
                        model=prompt.model,
                        messages=prompt.messages(),
                        max_completion_tokens=prompt.max_tokens,
                        extra_headers=headers,
                    )
            except openai.OpenAIError as exc:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise map_openai_error(exc) from exc
            text = (completion.choices[0].message.content or "") if completion.choices else ""
            answer = Answer(text, completion.model or prompt.model, _usage(completion.usage))
            span.set_attribute("gen_ai.usage.input_tokens", answer.usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", answer.usage.completion_tokens)
            return answer

    async def stream(self, prompt: Prompt) -> AsyncGenerator[str | Answer, None]:
        # A span that is not "current": it would otherwise leak across the generator's yields.
        span = tracer.start_span(OPERATION, kind=SpanKind.CLIENT)
        span.set_attribute("gen_ai.request.model", prompt.model)
        span.set_attribute("gen_ai.request.stream", True)
        headers: dict[str, str] = {}
        propagate.inject(headers, context=trace.set_span_in_context(span))
        started = time.perf_counter()
        outcome: bool | None = None  # True ok, False failed, None abandoned by our caller
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
            model = prompt.model
            usage = Usage()
            async with response:
                async for chunk in response:
                    model = chunk.model or model
                    if chunk.usage is not None:
                        usage = _usage(chunk.usage)
                    for choice in chunk.choices:
                        if choice.delta.content:
                            parts.append(choice.delta.content)
                            yield choice.delta.content
            outcome = True
            span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
            yield Answer("".join(parts), model, usage)
        except (openai.OpenAIError, httpx2.HTTPError) as exc:
            outcome = False
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise map_openai_error(_as_openai_error(exc)) from exc
        finally:
            # Recorded by hand: perf.track cannot span a generator's yields. A stream our
            # caller abandoned (client gone) is neither a success nor an upstream failure.
            if outcome is not None:
                self.perf.record(
                    OPERATION, (time.perf_counter() - started) * 1000, failed=not outcome
                )
            span.end()


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
