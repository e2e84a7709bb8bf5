"""Envoy's rate limit service (`envoy.service.ratelimit.v3.RateLimitService`), served by the
quota service: a thin adapter from the RLS messages to the decider and back.

The messages are built at run time (services/common/envoy_api.py).

What Envoy does with the answer (see services/gateway/envoy.yaml.tmpl): OVER_LIMIT becomes a
429 whose body is `raw_body` (the same JSON error shape as every genmesh error) with
`Retry-After` from `response_headers_to_add`; on every answer, the statuses become
`X-RateLimit-Limit`, `-Remaining` and `-Reset` (the descriptor closest to its limit wins).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from opentelemetry.instrumentation.utils import suppress_instrumentation

from services.common.envoy_api import DESCRIPTOR_SET, message_classes
from services.common.errors import retry_after_header
from services.quota.ratelimit.config import Unit
from services.quota.ratelimit.decider import Decision, RateLimitDecider

SERVICE_NAME = "envoy.service.ratelimit.v3.RateLimitService"

# envoy.service.ratelimit.v3.RateLimitResponse.Code / .RateLimit.Unit values.
_OK, _OVER_LIMIT = 1, 2
_UNITS = {Unit.SECOND: 1, Unit.MINUTE: 2, Unit.HOUR: 3, Unit.DAY: 4}


class RlsMessages:
    """RateLimitRequest and RateLimitResponse (services/common/envoy_api.py)."""

    def __init__(self, descriptor_set: Path = DESCRIPTOR_SET) -> None:
        self.request, self.response = message_classes(
            "envoy.service.ratelimit.v3.RateLimitRequest",
            "envoy.service.ratelimit.v3.RateLimitResponse",
            descriptor_set=descriptor_set,
        )


def response_for(messages: RlsMessages, decision: Decision) -> Message:
    """The RateLimitResponse Envoy turns into a 429 or into X-RateLimit-* headers."""
    response: Any = messages.response()
    response.overall_code = _OVER_LIMIT if decision.over_limit else _OK
    for status in decision.statuses:
        out = response.statuses.add()
        result = status.result
        out.code = _OVER_LIMIT if result is not None and result.refused else _OK
        if status.limit is None or result is None:
            continue
        out.current_limit.name = status.name
        out.current_limit.requests_per_unit = status.limit.requests
        out.current_limit.unit = _UNITS[status.limit.unit]
        out.limit_remaining = result.remaining
        # Refused: when a request would pass (what Retry-After says). Allowed: when the limit
        # is whole again.
        wait_ms = result.retry_after_ms if result.refused else result.reset_ms
        out.duration_until_reset.seconds = math.ceil(wait_ms / 1000)
    if decision.refusal is not None:
        error = decision.refusal
        seconds = retry_after_header(error.retry_after_seconds or 0)
        header = response.response_headers_to_add.add()
        header.key, header.value = "retry-after", str(seconds)
        response.raw_body = error.to_json()
    message: Message = response
    return message


def descriptors_of(request: Any) -> list[dict[str, str]]:
    return [{entry.key: entry.value for entry in d.entries} for d in request.descriptors]


def add_rate_limit_service(
    server: grpc.aio.Server, decider: RateLimitDecider, messages: RlsMessages
) -> None:
    async def should_rate_limit(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Message:
        # Envoy sends no trace context and the service is served untraced (lean_services);
        # without this, each Redis call of a decision would start a trace of its own.
        with suppress_instrumentation():
            decision = await decider.decide(descriptors_of(request))
        return response_for(messages, decision)

    handler = grpc.unary_unary_rpc_method_handler(
        should_rate_limit,
        request_deserializer=messages.request.FromString,
        response_serializer=messages.response.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE_NAME, {"ShouldRateLimit": handler})]
    )
