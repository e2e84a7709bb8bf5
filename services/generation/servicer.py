"""Thin gRPC servicers: read the caller, call the domain code, map to and from protos."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from genmesh.generation.v1 import generation_pb2, generation_pb2_grpc
from services.common.admin_auth import AdminGuard
from services.common.identity import Identity, identity_from_metadata, metadata_value
from services.common.perf import PerformanceMonitor
from services.generation.cache import ResilientResponseCache
from services.generation.cache_policy import CacheOptions
from services.generation.pipeline import (
    Delta,
    Done,
    GenerationPipeline,
    GenerationRequest,
    GenerationResult,
    StreamEvent,
    deadline_from_time_remaining,
)

Context = grpc.aio.ServicerContext[Any, Any]


def _metadata(context: Context) -> tuple[Any, ...]:
    return tuple(context.invocation_metadata() or ())


def _identity(context: Context) -> Identity:
    return identity_from_metadata(_metadata(context), context.peer())


def _cache_options(request: generation_pb2.GenerateRequest, context: Context) -> CacheOptions:
    """The request's `cache` field, plus the directives of a standard `Cache-Control` request
    header (no-cache, no-store), which Envoy passes on as metadata."""
    options = request.cache
    directives = {
        part.strip().lower()
        for part in metadata_value(_metadata(context), "cache-control").split(",")
    }
    return CacheOptions(
        no_cache=options.no_cache or "no-cache" in directives,
        no_store=options.no_store or "no-store" in directives,
        per_user=options.scope == generation_pb2.CACHE_SCOPE_USER,
        tags=tuple(options.tags),
    )


def _request(request: generation_pb2.GenerateRequest, context: Context) -> GenerationRequest:
    return GenerationRequest(
        text=request.text,
        image_data=request.image_data,
        image_mime_type=request.image_mime_type,
        lang=request.lang,
        identity=_identity(context),
        deadline=deadline_from_time_remaining(context.time_remaining()),
        cache=_cache_options(request, context),
    )


def _response(result: GenerationResult) -> generation_pb2.GenerateResponse:
    answer, quota = result.answer, result.quota
    response = generation_pb2.GenerateResponse(
        generation_id=result.generation_id,
        text=answer.text,
        model=answer.model,
        usage=generation_pb2.Usage(
            prompt_tokens=answer.usage.prompt_tokens,
            completion_tokens=answer.usage.completion_tokens,
            total_tokens=answer.usage.total_tokens,
        ),
        cached=result.cached,
        quota=generation_pb2.QuotaSnapshot(
            plan=quota.plan, limit=quota.limit, used=quota.used, remaining=quota.remaining
        ),
    )
    if quota.HasField("resets_at"):
        response.quota.resets_at.CopyFrom(quota.resets_at)
    return response


def _stream_event(event: StreamEvent) -> generation_pb2.StreamGenerateResponse:
    if isinstance(event, Delta):
        return generation_pb2.StreamGenerateResponse(
            delta=generation_pb2.TextDelta(text=event.text)
        )
    if isinstance(event, Done):
        return generation_pb2.StreamGenerateResponse(done=_response(event.result))
    error = event.error
    return generation_pb2.StreamGenerateResponse(
        error=generation_pb2.StreamError(
            code=error.code.name, reason=error.reason.value, message=error.message
        )
    )


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, pipeline: GenerationPipeline) -> None:
        self.pipeline = pipeline

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: Context
    ) -> generation_pb2.GenerateResponse:
        return _response(await self.pipeline.generate(_request(request, context)))

    async def StreamGenerate(
        self, request: generation_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[generation_pb2.StreamGenerateResponse]:
        # Closed explicitly so a client that goes away settles its reservation at once.
        async with contextlib.aclosing(self.pipeline.stream(_request(request, context))) as events:
            async for event in events:
                yield _stream_event(event)


class GenerationAdminServicer(generation_pb2_grpc.GenerationAdminServiceServicer):
    def __init__(
        self, guard: AdminGuard, cache: ResilientResponseCache, perf: PerformanceMonitor
    ) -> None:
        self.guard = guard
        self.cache = cache
        self.perf = perf

    def _authorize(self, context: Context, method: str) -> None:
        self.guard.check(_metadata(context), _identity(context), method)

    async def GetCacheStats(
        self, request: generation_pb2.GetCacheStatsRequest, context: Context
    ) -> generation_pb2.CacheStats:
        self._authorize(context, "GetCacheStats")
        stats = await self.cache.stats()
        return generation_pb2.CacheStats(
            hits=stats.hits,
            misses=stats.misses,
            hit_rate=stats.hit_rate,
            entries=stats.entries,
            invalidations=stats.invalidations,
            backend=stats.backend,
        )

    async def InvalidateCache(
        self, request: generation_pb2.InvalidateCacheRequest, context: Context
    ) -> generation_pb2.InvalidateCacheResponse:
        self._authorize(context, "InvalidateCache")
        target = request.WhichOneof("target")
        if target == "tag":
            removed = await self.cache.invalidate_tag(request.tag)
        elif target == "key":
            removed = await self.cache.invalidate_key(request.key)
        else:  # "all" (protovalidate guarantees one target is set)
            removed = await self.cache.invalidate_all()
        return generation_pb2.InvalidateCacheResponse(removed=removed)

    async def GetPerformanceStats(
        self, request: generation_pb2.GetPerformanceStatsRequest, context: Context
    ) -> generation_pb2.PerformanceStats:
        self._authorize(context, "GetPerformanceStats")
        return generation_pb2.PerformanceStats(
            operations=[
                generation_pb2.OperationStats(
                    name=op.name,
                    count=op.count,
                    errors=op.errors,
                    error_rate=op.error_rate,
                    avg_ms=op.avg_ms,
                    max_ms=op.max_ms,
                    slow=op.slow,
                )
                for op in self.perf.snapshot()
            ],
            slow_threshold_ms=self.perf.slow_threshold_ms,
        )
