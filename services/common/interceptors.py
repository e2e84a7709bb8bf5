"""The server interceptor every service runs: it validates each request against its
protovalidate rules, turns `ServiceError` into a rich gRPC status, hides unexpected
exceptions behind INTERNAL (logged with the trace id), and records per-RPC metrics."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc
import protovalidate
from google.protobuf.message import Message
from prometheus_client import Counter, Histogram

from services.common.errors import FieldViolation, Reason, ServiceError, invalid_argument

log = logging.getLogger(__name__)

RPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by outcome.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
RPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time to complete an RPC on the server.",
    ["grpc_service", "grpc_method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


def field_path(violation: Any) -> str:
    """protovalidate's field path as `events[0].event_id`. Message-level rules have no
    path; their rule ids start with the field they are about (`text.required`)."""
    proto = violation.proto
    parts: list[str] = []
    for element in proto.field.elements if proto.field else ():
        part = element.field_name
        subscript = getattr(element, "subscript", None)
        value = getattr(subscript, "value", None) if subscript is not None else None
        if value is not None:
            part += f"[{value}]"
        parts.append(part)
    if parts:
        return ".".join(parts)
    return proto.rule_id.split(".", 1)[0] if proto.rule_id else ""


def validate_request(request: object) -> None:
    """INVALID_ARGUMENT for a request that breaks its protovalidate rules. However many rules
    it breaks, the error lists only the first few and counts the rest (`invalid_argument`)."""
    if not isinstance(request, Message):
        return  # a raw-bytes handler: nothing declares rules for it
    try:
        protovalidate.validate(request)
    except protovalidate.ValidationError as err:
        raise invalid_argument(
            *(FieldViolation(field_path(v), v.proto.message) for v in err.violations)
        ) from None


async def _abort(context: grpc.aio.ServicerContext[Any, Any], err: ServiceError) -> None:
    status = err.to_grpc_status()
    await context.abort(status.code, status.details, err.trailing_metadata())


@asynccontextmanager
async def _guarded(
    context: grpc.aio.ServicerContext[Any, Any], full_method: str
) -> AsyncIterator[None]:
    """Map what the handler raises to a status, and count the RPC by its outcome."""
    service, _, method = full_method.lstrip("/").partition("/")
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        yield
    except ServiceError as err:
        code = err.code
        await _abort(context, err)
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED  # the client went away or its deadline passed
        raise
    except Exception as exc:
        code = _code_of(exc, context)
        if code is grpc.StatusCode.UNKNOWN:
            code = grpc.StatusCode.INTERNAL
            log.exception("unhandled error in %s", full_method)
            await _abort(context, _internal())
        raise
    finally:
        RPC_HANDLED.labels(service, method, code.name).inc()
        RPC_SECONDS.labels(service, method).observe(time.perf_counter() - started)


class ServiceInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """`unvalidated_services` carry no protovalidate rules (a contract that is not ours):
    their requests skip validation, which would find nothing to check."""

    def __init__(self, unvalidated_services: Sequence[str] = ()) -> None:
        self._unvalidated = tuple(f"/{name}/" for name in unvalidated_services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        full_method = handler_call_details.method
        validate = not full_method.startswith(self._unvalidated)

        if handler.unary_unary is not None:
            inner_unary: Any = handler.unary_unary

            async def unary(request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                async with _guarded(context, full_method):
                    if validate:
                        validate_request(request)
                    return await inner_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        if handler.unary_stream is not None and not inspect.isasyncgenfunction(
            handler.unary_stream
        ):
            # A streaming handler that writes with `context.write` (grpc.health.v1 Watch, which
            # the services' channels use for client-side health checking), not an async
            # generator: wrap it as one too.
            inner_writer: Any = handler.unary_stream

            async def writer(request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> None:
                async with _guarded(context, full_method):
                    if validate:
                        validate_request(request)
                    await inner_writer(request, context)

            return grpc.unary_stream_rpc_method_handler(
                writer,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        if handler.unary_stream is not None:
            inner_stream: Any = handler.unary_stream

            async def stream(
                request: Message, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                async with _guarded(context, full_method):
                    if validate:
                        validate_request(request)
                    async for response in inner_stream(request, context):
                        yield response

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        # Client- and bidi-streaming RPCs are not part of any genmesh contract.
        return handler


def _internal() -> ServiceError:
    return ServiceError(grpc.StatusCode.INTERNAL, Reason.INTERNAL, "internal error")


def _code_of(exc: Exception, context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """An abort() from the handler surfaces as AbortError; its code is on the context."""
    if isinstance(exc, grpc.aio.AbortError):
        code = context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.UNKNOWN
