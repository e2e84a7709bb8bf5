"""The generation pipeline, shared by Generate and StreamGenerate:

validate -> breaker gate -> response cache. A hit consumes one quota unit (one call: the unit
is taken committed, since nothing can fail after it) and answers. A miss reserves one unit ->
single-flight (join an identical call in progress, here or on another replica, or lead one:
in-flight slot -> upstream behind the breaker and retries -> cache the answer) -> commit (or
refund on any failure after the reservation), settled in the background, off the reply's path.

Plain domain code: the servicer only maps protos in and out, and tests drive it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from opentelemetry import trace
from prometheus_client import Counter

from genmesh.quota.v1 import quota_pb2
from services.common.background import BackgroundTasks
from services.common.errors import FieldViolation, Reason, ServiceError, invalid_argument
from services.common.identity import Identity
from services.common.security_events import SEVERITY_LOW, SecurityEventSink
from services.generation.answer import Answer
from services.generation.cache import (
    ResilientResponseCache,
    cache_key,
    cache_tags,
    normalize_text,
)
from services.generation.cache_policy import CacheOptions, cache_policy
from services.generation.images import check_image, sniff_image_type
from services.generation.quota_client import QuotaReserver, Reservation
from services.generation.settings import DEFAULT_MAX_IMAGE_PIXELS, GenerationSettings
from services.generation.shared_calls import (
    SUBSCRIBER_GRACE_SECONDS,
    PreparedGeneration,
    SharedCalls,
    within,
)
from services.generation.upstream import ImageInput, Prompt
from services.generation.upstream_errors import upstream_unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_LANG = "en"
# Stop waiting for the upstream this long before the caller's deadline, so the caller gets
# our UPSTREAM_TIMEOUT rather than a bare DEADLINE_EXCEEDED from its own side.
DEADLINE_MARGIN_SECONDS = 0.25

GENERATIONS = Counter(
    "genmesh_generations_total",
    "Generations by mode (unary/stream) and outcome (upstream, cache, or the error reason).",
    ["mode", "outcome"],
)


@dataclass(frozen=True)
class GenerationRequest:
    text: str
    image_data: bytes
    image_mime_type: str
    lang: str
    identity: Identity
    # When the caller stops waiting, in the event loop's clock (loop.time()); None = never.
    deadline: float | None = None
    cache: CacheOptions = field(default_factory=CacheOptions)


@dataclass(frozen=True)
class GenerationResult:
    generation_id: str
    answer: Answer
    cached: bool
    quota: quota_pb2.Quota


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    result: GenerationResult


@dataclass(frozen=True)
class Failed:
    """The stream failed after it started; always the last event."""

    error: ServiceError


StreamEvent = Delta | Done | Failed


@dataclass(frozen=True)
class PipelineConfig:
    text_model: str
    vision_model: str
    system_prompt: str
    max_tokens: int
    # GEN_MAX_IMAGE_PIXELS.
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    @classmethod
    def from_settings(cls, settings: GenerationSettings) -> PipelineConfig:
        return cls(
            text_model=settings.openai_text_model,
            vision_model=settings.openai_vision_model,
            system_prompt=settings.gen_system_prompt,
            max_tokens=settings.openai_max_tokens,
            max_image_pixels=settings.gen_max_image_pixels,
        )

    @property
    def prompt_version(self) -> str:
        """Part of every cache key: editing the system prompt or the token limit changes the
        answers, so old entries must not be served."""
        material = f"{self.system_prompt}\0{self.max_tokens}"
        return hashlib.sha256(material.encode()).hexdigest()[:16]

    def system_message(self, lang: str) -> str:
        if "{lang}" in self.system_prompt:
            return self.system_prompt.replace("{lang}", lang)
        return f"{self.system_prompt.rstrip()} Answer in {lang}."


def deadline_from_time_remaining(time_remaining: float | None) -> float | None:
    """The loop-clock deadline for a gRPC call with `time_remaining` seconds left."""
    if time_remaining is None:
        return None
    return asyncio.get_running_loop().time() + max(0.0, time_remaining - DEADLINE_MARGIN_SECONDS)


class GenerationPipeline:
    def __init__(
        self,
        config: PipelineConfig,
        calls: SharedCalls | None,
        cache: ResilientResponseCache,
        quota: QuotaReserver,
        background: BackgroundTasks,
        security_events: SecurityEventSink | None = None,
    ) -> None:
        self.config = config
        # None when no API key is configured (see GenerationSettings.openai_api_key).
        self._calls = calls
        self.cache = cache
        self.quota = quota
        self.background = background
        self.security_events = security_events

    # -- the two entry points ----------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        try:
            result = await self._generate(request)
        except ServiceError as err:
            GENERATIONS.labels("unary", err.reason.value).inc()
            raise
        except Exception:
            GENERATIONS.labels("unary", Reason.INTERNAL.value).inc()
            raise
        GENERATIONS.labels("unary", "cache" if result.cached else "upstream").inc()
        return result

    async def _generate(self, request: GenerationRequest) -> GenerationResult:
        prepared = self.prepare(request)
        hit = await self._gate(prepared) or await self._cached(prepared)
        if hit is not None:
            # The answer is in hand and nothing can fail after the quota call: one call takes
            # the unit committed (QUOTA_EXHAUSTED is relayed exactly as a reservation's).
            reservation = await self.quota.consume(request.identity)
            return self._result(prepared, hit, True, reservation)
        reservation = await self.quota.reserve(request.identity)
        try:
            flight = self.calls.flight(prepared, request.deadline, streaming=False)
            async with self.calls.subscribe(flight):
                answer = await within(
                    request.deadline, flight.result(), grace=SUBSCRIBER_GRACE_SECONDS
                )
        except BaseException:
            self.settle(reservation, commit=False)
            raise
        self.settle(reservation, commit=True)
        return self._result(prepared, answer, False, reservation)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        """Deltas, then Done. A failure before the first delta raises ServiceError (the RPC
        fails with a normal status); after it, Failed is the last event and the reservation
        is refunded (a client may not see the status once the stream has started)."""
        outcome = "cancelled"  # unless an event or an error says otherwise
        try:
            # Every nested generator is closed explicitly (aclosing): when our consumer stops
            # early, settlement must run now, not whenever the garbage collector finalizes.
            async with contextlib.aclosing(self._stream(request)) as events:
                async for event in events:
                    if isinstance(event, Done):
                        outcome = "cache" if event.result.cached else "upstream"
                    elif isinstance(event, Failed):
                        outcome = event.error.reason.value
                    yield event
        except ServiceError as err:
            outcome = err.reason.value
            raise
        except Exception:
            outcome = Reason.INTERNAL.value
            raise
        finally:
            GENERATIONS.labels("stream", outcome).inc()

    async def _stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        prepared = self.prepare(request)
        hit = await self._gate(prepared) or await self._cached(prepared)
        if hit is not None:
            # As in _generate: one call takes the unit committed before the replay, so a
            # client leaving mid-replay has paid for the answer it was given, as before.
            reservation = await self.quota.consume(request.identity)
            for delta in hit.deltas():
                yield Delta(delta)
            yield Done(self._result(prepared, hit, True, reservation))
            return
        reservation = await self.quota.reserve(request.identity)
        settlement = _Settlement(self, reservation)
        started = False
        try:
            async with contextlib.aclosing(
                self._stream_miss(prepared, request.deadline, settlement)
            ) as events:
                async for event in events:
                    started = started or isinstance(event, Delta)
                    yield event
        except Exception as exc:
            settlement.refund()
            if not started:
                raise
            yield Failed(_in_band_error(exc))
        except BaseException:
            # Cancelled (the client went away) or closed early: the unit goes back
            # unless the answer was already complete and committed.
            settlement.refund()
            raise

    async def _stream_miss(
        self,
        prepared: PreparedGeneration,
        deadline: float | None,
        settlement: _Settlement,
    ) -> AsyncGenerator[StreamEvent, None]:
        flight = self.calls.flight(prepared, deadline, streaming=True)
        async with self.calls.subscribe(flight):
            pieces = flight.pieces()
            streamed = False
            while True:
                try:
                    piece = await within(deadline, anext(pieces), grace=SUBSCRIBER_GRACE_SECONDS)
                except StopAsyncIteration:  # pragma: no cover - pieces() ends with the Answer
                    break
                if isinstance(piece, Answer):
                    if not streamed:  # the call was unary, or ran on another replica
                        for delta in piece.deltas():
                            yield Delta(delta)
                    settlement.commit()
                    yield Done(self._result(prepared, piece, False, settlement.reservation))
                    return
                streamed = True
                yield Delta(piece)
        raise upstream_unavailable("the model API ended the stream without an answer", None)

    # -- steps ---------------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> PreparedGeneration:
        """Semantic validation (beyond protovalidate) and everything derived from the request:
        the prompt, the cache policy, the cache key and its tags."""
        text = normalize_text(request.text)
        image: ImageInput | None = None
        if request.image_data:
            error = check_image(
                request.image_data,
                request.image_mime_type,
                max_pixels=self.config.max_image_pixels,
            )
            if error is not None:
                self._report_image_mismatch(request)
                raise error
            image = ImageInput(request.image_data, request.image_mime_type)
        elif not text:
            raise invalid_argument(FieldViolation("text", "must not be blank"))
        policy = cache_policy(request.cache, request.identity)
        if self._calls is None:
            raise upstream_unavailable(
                "the model API is not configured (OPENAI_API_KEY is not set)", None
            )
        lang = request.lang or DEFAULT_LANG
        model = self.config.vision_model if image is not None else self.config.text_model
        prompt = Prompt(
            model=model,
            system=self.config.system_message(lang),
            text=text,
            image=image,
            max_tokens=self.config.max_tokens,
        )
        key = cache_key(
            model=model,
            text=text,
            image_sha256=hashlib.sha256(request.image_data).hexdigest() if image else "",
            lang=lang,
            prompt_version=self.config.prompt_version,
            owner=policy.owner,
        )
        tags = cache_tags(model=model, lang=lang, has_image=image is not None)
        return PreparedGeneration(prompt, key, tags + policy.extra_tags, policy)

    @property
    def calls(self) -> SharedCalls:
        if self._calls is None:  # prepare() already refused; kept for the type checker
            raise upstream_unavailable("the model API is not configured", None)
        return self._calls

    async def _cached(self, prepared: PreparedGeneration) -> Answer | None:
        if not prepared.policy.read:
            return None
        return await self.cache.get(prepared.cache_key)

    async def _gate(self, prepared: PreparedGeneration) -> Answer | None:
        """While the breaker refuses calls, only a cached answer or a call already in flight
        can serve (the spec's fallback): otherwise fail fast, before taking any quota."""
        caller = self.calls.caller
        if caller.breaker.retry_after() <= 0 or self.calls.in_flight(prepared):
            return None
        answer = await self._cached(prepared)
        if answer is None:
            raise caller.refusal()
        return answer

    def settle(self, reservation: Reservation, *, commit: bool) -> None:
        """Commit or refund in the background: neither the answer nor the error reply waits
        for it, it finishes even if this request is cancelled, and it never fails an answer.
        The task is held in `self.background`, which the service drains at shutdown. A
        settlement that never lands (quota unreachable past its retries, the process killed
        before the drain) loses nothing either: by design an unsettled reservation expires on
        the quota side after QUOTA_RESERVATION_TTL_SECONDS and gives its unit back by itself
        (for a lost commit, that generation is free). Until a commit lands, the reserved unit
        counts as used exactly like a committed one, so counts read right after an answer are
        already final; a refund shows once it lands."""
        self.background.spawn(
            self.quota.settle(reservation.reservation_id, commit),
            name="quota-commit" if commit else "quota-refund",
        )

    def _result(
        self,
        prepared: PreparedGeneration,
        answer: Answer,
        cached: bool,
        reservation: Reservation,
    ) -> GenerationResult:
        result = GenerationResult(str(uuid.uuid4()), answer, cached, reservation.quota)
        # The per-request record is Envoy's access log and this RPC's span: the span gets the
        # ids an operator needs (the cache key for InvalidateCache); the log line is DEBUG.
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(
                {
                    "genmesh.generation.id": result.generation_id,
                    "genmesh.cache.key": prepared.cache_key,
                    "genmesh.cache.hit": cached,
                    "genmesh.quota.reservation_id": reservation.reservation_id,
                }
            )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "generation complete",
                extra={
                    "generation_id": result.generation_id,
                    "cache_key": prepared.cache_key,
                    "cached": cached,
                    "model": answer.model,
                    "total_tokens": answer.usage.total_tokens,
                    "reservation_id": reservation.reservation_id,
                },
            )
        return result

    def _report_image_mismatch(self, request: GenerationRequest) -> None:
        if self.security_events is None:
            return
        self.security_events.report(
            "image_type_mismatch",
            SEVERITY_LOW,
            request.identity,
            {
                "declared": request.image_mime_type,
                "detected": sniff_image_type(request.image_data) or "unknown",
                "size": str(len(request.image_data)),
            },
        )


class _Settlement:
    """Settles one reservation exactly once: commit or refund, whichever comes first."""

    def __init__(self, pipeline: GenerationPipeline, reservation: Reservation) -> None:
        self.pipeline = pipeline
        self.reservation = reservation
        self.settled = False

    def commit(self) -> None:
        self._settle(commit=True)

    def refund(self) -> None:
        self._settle(commit=False)

    def _settle(self, *, commit: bool) -> None:
        if not self.settled:
            self.settled = True
            self.pipeline.settle(self.reservation, commit=commit)


def _in_band_error(exc: Exception) -> ServiceError:
    if isinstance(exc, ServiceError):
        log.warning("stream failed after it started: %s", exc)
        return exc
    log.error("stream failed after it started", exc_info=exc)
    return ServiceError(grpc.StatusCode.INTERNAL, Reason.INTERNAL, "internal error")
