"""The upstream model, behind a small interface: the request types (`Prompt`, `ImageInput`),
the `Upstream` protocol, and `OpenAIUpstream`, which talks to any OpenAI-compatible
chat-completions API through the official SDK (OpenAI itself or any compatible server; it
cannot tell which) and raises the SDK's failures as `upstream_errors.UpstreamError`.

Each call here is ONE attempt: the SDK's own retries are off (max_retries=0) and our caller runs
the one retry loop, guided by what the UpstreamError says. Every attempt is traced and measured
by `upstream_telemetry.Attempt` (the OpenTelemetry GenAI conventions).
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

import httpx2  # the SDK's HTTP transport (openai 3.x), for errors raised mid-stream
import openai
from openai.types.chat import (
    ChatCompletionContentPartParam,
    ChatCompletionMessageParam,
)
from openai.types.completion_usage import CompletionUsage
from opentelemetry import propagate, trace

from services.common.perf import PerformanceMonitor
from services.generation.answer import Answer, Usage
from services.generation.genai_metrics import OperationLabels
from services.generation.upstream_errors import as_openai_error, map_openai_error
from services.generation.upstream_telemetry import Attempt

tracer = trace.get_tracer(__name__)

OPERATION = "openai.chat.completions"
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


class Upstream(Protocol):
    async def complete(self, prompt: Prompt) -> Answer:
        """The whole answer. Raises UpstreamError."""
        ...

    def stream(self, prompt: Prompt) -> AsyncGenerator[str | Answer, None]:
        """Text deltas in order, then the complete Answer (text, model, usage) last.
        Raises UpstreamError, possibly after some deltas."""
        ...


def _usage(usage: CompletionUsage | None) -> Usage:
    if usage is None:
        return Usage()
    return Usage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


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

    def _attempt(self, prompt: Prompt, *, stream: bool) -> Attempt:
        labels = OperationLabels(prompt.model, self.server_address, self.server_port)
        return Attempt(self._tracer or tracer, labels, max_tokens=prompt.max_tokens, stream=stream)

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
            error = as_openai_error(exc)
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
