"""The error model of upstream calls: `UpstreamError`, what a failed attempt at the model API
means to our caller, and the mapping of the OpenAI SDK's failures (and of the transport errors
it leaves unwrapped mid-stream) to it.

An UpstreamError guides our caller's one retry loop: whether the failure is transient
(`retryable`), whether it counts against the circuit breaker (`counts_as_failure`), and the
Retry-After the upstream sent (`upstream_retry_after`). `error_type` names a failed attempt
for the GenAI telemetry (`error.type`).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import time
from collections.abc import Mapping

import aiohttp  # the SDK's transport here (DefaultAioHttpClient): its errors are causes
import grpc
import httpx2  # the SDK's HTTP transport (openai 3.x), for errors raised mid-stream
import openai

from services.common.errors import Reason, ServiceError
from services.generation import genai_metrics

log = logging.getLogger(__name__)

# The spec's list of upstream failures that count against the circuit breaker (plus
# timeouts and connection errors, handled by exception type).
BREAKER_STATUSES = frozenset({429, 500, 502, 503, 504})
# Transient failures, worth another attempt (plus timeouts and connection errors): the
# breaker's statuses, a request timeout and a conflict.
RETRYABLE_STATUSES = BREAKER_STATUSES | {408, 409}
# When the upstream is unavailable without saying for how long.
DEFAULT_RETRY_AFTER_SECONDS = 2.0
MAX_MESSAGE_CHARS = 300
# What a client is told when the model API refuses its input (400, 413, 422): fixed text,
# never the upstream's own message, which is logged instead.
REJECTED_MESSAGE = "the model refused the request"


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


def timed_out(exc: BaseException) -> bool:
    """Whether the SDK's (or its transport's) error is a timeout. The aiohttp transport
    reports every failed connection (refused, reset, closed by the server) as a connect
    timeout; what caused it, somewhere down the chain, tells them apart: a connection error
    (an OSError or aiohttp's) that is not itself a timeout."""
    if not isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
        return False
    seen: set[int] = set()
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        failed = isinstance(cause, OSError | aiohttp.ClientConnectionError)
        if failed and not isinstance(cause, TimeoutError):
            return False
        cause = cause.__cause__ or cause.__context__
    return True


def map_openai_error(exc: openai.OpenAIError) -> UpstreamError:
    """The SDK's exception as our error. An upstream 429 is our dependency's limit, not the
    caller's: it becomes UNAVAILABLE (503) with the upstream's Retry-After, never 429."""
    if timed_out(exc):
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
            # The upstream's own words stay in our logs (with the trace and span ids): they
            # may name the model, its limits or the provider, none of the client's business.
            log.warning(
                "the model API rejected the request (HTTP %d): %s",
                status,
                _upstream_message(exc),
            )
            return UpstreamError(
                ServiceError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    Reason.UPSTREAM_REJECTED,
                    REJECTED_MESSAGE,
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
    if timed_out(exc):
        return genai_metrics.ERROR_TIMEOUT
    if isinstance(exc, openai.APIConnectionError):  # a failed connection reported as a timeout
        return openai.APIConnectionError.__qualname__
    if isinstance(exc, openai.APIStatusError):
        return str(exc.status_code)
    return type(exc).__qualname__


def as_openai_error(exc: openai.OpenAIError | httpx2.HTTPError) -> openai.OpenAIError:
    """Once a stream has started the SDK no longer wraps transport errors (the connection
    dropped or a read timed out between chunks): wrap them the way it does for requests."""
    if isinstance(exc, openai.OpenAIError):
        return exc
    try:
        request = exc.request
    except RuntimeError:  # httpx raises when the error carries no request
        request = httpx2.Request("POST", "http://upstream.invalid/chat/completions")
    if timed_out(exc):
        return openai.APITimeoutError(request=request)
    return openai.APIConnectionError(message=str(exc) or type(exc).__name__, request=request)
