"""The generation pipeline, shared by Generate and StreamGenerate:

validate -> in-flight slot -> breaker gate -> reserve quota -> response cache -> upstream ->
cache the answer -> commit (or refund on any failure after the reservation).

Plain domain code: the servicer only maps protos in and out, and tests drive it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import grpc
from prometheus_client import Counter

from genmesh.quota.v1 import quota_pb2
from services.common.background import BackgroundTasks
from services.common.breaker import CircuitBreaker
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
from services.generation.images import check_image, sniff_image_type
from services.generation.inflight import InFlightLimiter
from services.generation.quota_client import QuotaReserver, Reservation
from services.generation.settings import DEFAULT_MAX_IMAGE_PIXELS, GenerationSettings
from services.generation.upstream import (
    ImageInput,
    Prompt,
    Upstream,
    UpstreamError,
    upstream_timeout,
    upstream_unavailable,
)

log = logging.getLogger(__name__)

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
    # OPENAI_TIMEOUT_SECONDS: a wait at least this long is the upstream's fault.
    upstream_timeout_seconds: float
    # GEN_MAX_IMAGE_PIXELS.
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    @classmethod
    def from_settings(cls, settings: GenerationSettings) -> PipelineConfig:
        return cls(
            text_model=settings.openai_text_model,
            vision_model=settings.openai_vision_model,
            system_prompt=settings.gen_system_prompt,
            max_tokens=settings.openai_max_tokens,
            upstream_timeout_seconds=settings.openai_timeout_seconds,
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


@dataclass(frozen=True)
class PreparedGeneration:
    prompt: Prompt
    cache_key: str
    tags: tuple[str, ...]


def deadline_from_time_remaining(time_remaining: float | None) -> float | None:
    """The loop-clock deadline for a gRPC call with `time_remaining` seconds left."""
    if time_remaining is None:
        return None
    return asyncio.get_running_loop().time() + max(0.0, time_remaining - DEADLINE_MARGIN_SECONDS)


class GenerationPipeline:
    def __init__(
        self,
        config: PipelineConfig,
        upstream: Upstream | None,
        cache: ResilientResponseCache,
        quota: QuotaReserver,
        breaker: CircuitBreaker,
        limiter: InFlightLimiter,
        background: BackgroundTasks,
        security_events: SecurityEventSink | None = None,
    ) -> None:
        self.config = config
        # None when no API key is configured (see GenerationSettings.openai_api_key).
        self.upstream = upstream
        self.cache = cache
        self.quota = quota
        self.breaker = breaker
        self.limiter = limiter
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
        with self.limiter.slot():
            answer = await self._gate(prepared)
            reservation = await self.quota.reserve(request.identity)
            try:
                if answer is None:
                    answer = await self.cache.get(prepared.cache_key)
                cached = answer is not None
                if answer is None:
                    answer = await self._complete(prepared, request.deadline)
                    await self.cache.put(prepared.cache_key, answer, prepared.tags)
            except BaseException:
                await self.settle(reservation, commit=False)
                raise
            await self.settle(reservation, commit=True)
        return self._result(prepared, answer, cached, reservation)

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
        with self.limiter.slot():
            early = await self._gate(prepared)
            reservation = await self.quota.reserve(request.identity)
            settlement = _Settlement(self, reservation)
            started = False
            try:
                async with contextlib.aclosing(
                    self._stream_reserved(prepared, early, request.deadline, settlement)
                ) as events:
                    async for event in events:
                        started = started or isinstance(event, Delta)
                        yield event
            except Exception as exc:
                await settlement.refund()
                if not started:
                    raise
                yield Failed(_in_band_error(exc))
            except BaseException:
                # Cancelled (the client went away) or closed early: the unit goes back
                # unless the answer was already complete and committed.
                await settlement.refund()
                raise

    async def _stream_reserved(
        self,
        prepared: PreparedGeneration,
        early: Answer | None,
        deadline: float | None,
        settlement: _Settlement,
    ) -> AsyncGenerator[StreamEvent, None]:
        answer = early if early is not None else await self.cache.get(prepared.cache_key)
        if answer is not None:
            await settlement.commit()
            if answer.text:
                yield Delta(answer.text)
            yield Done(self._result(prepared, answer, True, settlement.reservation))
            return
        final: Answer | None = None
        async with contextlib.aclosing(self._stream_upstream(prepared, deadline)) as pieces:
            async for piece in pieces:
                if isinstance(piece, Answer):
                    final = piece
                else:
                    yield Delta(piece)
        if final is None:
            raise upstream_unavailable("the model API ended the stream without an answer", None)
        await self.cache.put(prepared.cache_key, final, prepared.tags)
        await settlement.commit()
        yield Done(self._result(prepared, final, False, settlement.reservation))

    # -- steps ---------------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> PreparedGeneration:
        """Semantic validation (beyond protovalidate) and everything derived from the request:
        the prompt, the cache key and its tags."""
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
        if self.upstream is None:
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
        )
        return PreparedGeneration(
            prompt, key, cache_tags(model=model, lang=lang, has_image=image is not None)
        )

    async def _gate(self, prepared: PreparedGeneration) -> Answer | None:
        """With the breaker open, only a cached answer can be served (the spec's fallback):
        without one, fail fast before taking any quota."""
        if self.breaker.allow():
            return None
        answer = await self.cache.get(prepared.cache_key)
        if answer is None:
            raise self._breaker_open()
        return answer

    def _breaker_open(self) -> ServiceError:
        return upstream_unavailable(
            "the model API is failing; requests are paused while it recovers",
            max(1.0, self.breaker.retry_after()),
        )

    def _upstream(self) -> Upstream:
        if self.upstream is None:  # prepare() already refused; kept for the type checker
            raise upstream_unavailable("the model API is not configured", None)
        return self.upstream

    async def _complete(self, prepared: PreparedGeneration, deadline: float | None) -> Answer:
        # Checked again: the breaker may have opened while we waited for the quota service.
        if not self.breaker.allow():
            raise self._breaker_open()
        upstream = self._upstream()
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout_at(deadline):
                answer = await upstream.complete(prepared.prompt)
        except UpstreamError as err:
            raise self._failure(err) from None
        except TimeoutError:
            raise self._deadline_passed(started) from None
        self.breaker.record_success()
        return answer

    async def _stream_upstream(
        self, prepared: PreparedGeneration, deadline: float | None
    ) -> AsyncGenerator[str | Answer, None]:
        if not self.breaker.allow():
            raise self._breaker_open()
        loop = asyncio.get_running_loop()
        started = loop.time()
        pieces: AsyncGenerator[str | Answer, None] = self._upstream().stream(prepared.prompt)
        try:
            while True:
                # The deadline guards each wait for the upstream, never our own yields: a
                # timeout spanning a generator's yield would cancel whatever our caller does.
                try:
                    async with asyncio.timeout_at(deadline):
                        piece = await anext(pieces)
                except StopAsyncIteration:
                    break
                except UpstreamError as err:
                    raise self._failure(err) from None
                except TimeoutError:
                    raise self._deadline_passed(started) from None
                yield piece
        finally:
            await pieces.aclose()
        self.breaker.record_success()

    def _failure(self, err: UpstreamError) -> ServiceError:
        if not err.counts_as_failure:
            return err.error
        self.breaker.record_failure()
        if self.breaker.allow():
            return err.error
        # This failure opened the breaker: the caller should wait for it, not less.
        wait = max(err.error.retry_after_seconds or 0.0, self.breaker.retry_after())
        return dataclasses.replace(err.error, retry_after_seconds=wait)

    def _deadline_passed(self, started: float) -> ServiceError:
        """The caller's deadline cut the upstream call short. It counts against the upstream
        only if the upstream had its full OPENAI_TIMEOUT_SECONDS: a client with a tight
        deadline must not be able to trip the breaker for everyone."""
        waited = asyncio.get_running_loop().time() - started
        timeout = upstream_timeout()
        if waited < self.config.upstream_timeout_seconds:
            return timeout.error
        return self._failure(timeout)

    async def settle(self, reservation: Reservation, *, commit: bool) -> None:
        """Commit or refund, finishing in the background even if this request is cancelled
        meanwhile; never raises (a successful answer must not fail over its settlement)."""
        task = self.background.spawn(
            self.quota.settle(reservation.reservation_id, commit),
            name="quota-commit" if commit else "quota-refund",
        )
        with contextlib.suppress(Exception):
            await asyncio.shield(task)

    def _result(
        self,
        prepared: PreparedGeneration,
        answer: Answer,
        cached: bool,
        reservation: Reservation,
    ) -> GenerationResult:
        result = GenerationResult(str(uuid.uuid4()), answer, cached, reservation.quota)
        log.info(
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

    async def commit(self) -> None:
        await self._settle(commit=True)

    async def refund(self) -> None:
        await self._settle(commit=False)

    async def _settle(self, *, commit: bool) -> None:
        if not self.settled:
            self.settled = True
            await self.pipeline.settle(self.reservation, commit=commit)


def _in_band_error(exc: Exception) -> ServiceError:
    if isinstance(exc, ServiceError):
        log.warning("stream failed after it started: %s", exc)
        return exc
    log.error("stream failed after it started", exc_info=exc)
    return ServiceError(grpc.StatusCode.INTERNAL, Reason.INTERNAL, "internal error")
