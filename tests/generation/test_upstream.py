from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import time
from typing import Any

import grpc
import httpx2
import openai
import pytest

from services.common.errors import ServiceError
from services.generation.upstream import ImageInput, Prompt
from services.generation.upstream_errors import (
    REJECTED_MESSAGE,
    UpstreamError,
    error_type,
    map_openai_error,
    retry_after_from_headers,
    upstream_timeout,
    upstream_unavailable,
)
from tests.images import tiny_png

REQUEST = httpx2.Request("POST", "http://upstream.test/v1/chat/completions")


def status_error(status: int, headers: dict[str, str] | None = None) -> openai.APIStatusError:
    response = httpx2.Response(status, headers=headers or {}, request=REQUEST)
    body = {"message": f"boom {status}", "type": "server_error"}
    cls = {400: openai.BadRequestError, 429: openai.RateLimitError}.get(
        status, openai.InternalServerError if status >= 500 else openai.APIStatusError
    )
    return cls(f"Error code: {status}", response=response, body=body)


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_breaker_statuses_are_unavailable_and_count(status: int) -> None:
    mapped = map_openai_error(status_error(status))
    assert mapped.counts_as_failure
    assert mapped.error.code is grpc.StatusCode.UNAVAILABLE
    assert mapped.error.reason == "UPSTREAM_UNAVAILABLE"
    assert mapped.error.retry_after_seconds == 2.0  # no Retry-After: a short default


def test_429_carries_the_upstreams_retry_after() -> None:
    mapped = map_openai_error(status_error(429, {"retry-after": "17"}))
    assert mapped.error.code is grpc.StatusCode.UNAVAILABLE  # never RESOURCE_EXHAUSTED
    assert mapped.error.retry_after_seconds == 17


@pytest.mark.parametrize("status", [501, 505, 401, 403, 404, 409])
def test_other_failures_are_unavailable_without_counting(status: int) -> None:
    mapped = map_openai_error(status_error(status))
    assert mapped.error.code is grpc.StatusCode.UNAVAILABLE
    assert not mapped.counts_as_failure


@pytest.mark.parametrize("status", [400, 413, 422])
def test_rejected_input_is_invalid_argument(status: int) -> None:
    mapped = map_openai_error(status_error(status))
    assert mapped.error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert mapped.error.reason == "UPSTREAM_REJECTED"
    assert not mapped.counts_as_failure


# What a model API may say when it refuses input: its model names, limits and internals.
UPSTREAM_WORDS = "Error code: 400 - This model's maximum context length is 8192 tokens (gpt-x-0613)"


@pytest.mark.parametrize("status", [400, 413, 422])
def test_the_upstreams_refusal_text_is_logged_and_never_reaches_the_client(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    response = httpx2.Response(status, request=REQUEST)
    body = {"message": "maximum context length is 8192 tokens", "type": "invalid_request_error"}
    exc = openai.APIStatusError(UPSTREAM_WORDS, response=response, body=body)
    with caplog.at_level(logging.WARNING, logger="services.generation.upstream_errors"):
        mapped = map_openai_error(exc)
    assert mapped.error.message == REJECTED_MESSAGE == "the model refused the request"
    client_sees = str(mapped.error.to_status_proto())  # all the client gets
    for leak in ("8192", "gpt-x", "context length", "Error code"):
        assert leak not in client_sees
        assert leak not in str(mapped)
    # Operators still see what the upstream said, once, with the status.
    (record,) = [r for r in caplog.records if r.name == "services.generation.upstream_errors"]
    assert record.levelno == logging.WARNING
    assert UPSTREAM_WORDS in record.getMessage()
    assert f"HTTP {status}" in record.getMessage()


def test_timeouts_and_connection_errors() -> None:
    timeout = map_openai_error(openai.APITimeoutError(request=REQUEST))
    assert timeout.error.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert timeout.error.reason == "UPSTREAM_TIMEOUT"
    assert timeout.counts_as_failure

    refused = map_openai_error(openai.APIConnectionError(request=REQUEST))
    assert refused.error.code is grpc.StatusCode.UNAVAILABLE
    assert refused.error.reason == "UPSTREAM_UNAVAILABLE"
    assert refused.counts_as_failure


async def _sdk_error(transport: str, base_url: str, timeout: float = 5.0) -> openai.OpenAIError:
    """What the SDK raises for one chat completion against `base_url` through `transport`."""
    http_client = openai.DefaultAioHttpClient() if transport == "aiohttp" else None
    client = openai.AsyncOpenAI(
        api_key="k", base_url=base_url, timeout=timeout, max_retries=0, http_client=http_client
    )
    try:
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
    except openai.OpenAIError as err:
        return err
    finally:
        await client.close()
    raise AssertionError("the call succeeded")


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_refused_connection_is_unavailable_whatever_the_transport(transport: str) -> None:
    # Nothing listens on port 1. The aiohttp transport reports this as a connect timeout.
    err = await _sdk_error(transport, "http://127.0.0.1:1/v1")
    mapped = map_openai_error(err)
    assert mapped.error.reason == "UPSTREAM_UNAVAILABLE"
    assert error_type(err) == "APIConnectionError"


async def _error_from_server(transport: str, *, silent: bool) -> openai.OpenAIError:
    """The SDK's error from an upstream that reads the request, then says nothing until the
    call has failed (`silent`) or closes the connection at once."""
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        if silent:
            await done.wait()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await _sdk_error(transport, f"http://127.0.0.1:{port}/v1", timeout=0.3)
    finally:
        done.set()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_silent_upstream_is_a_timeout_whatever_the_transport(transport: str) -> None:
    err = await _error_from_server(transport, silent=True)
    assert map_openai_error(err).error.reason == "UPSTREAM_TIMEOUT"
    assert error_type(err) == "timeout"


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_connection_closed_without_an_answer_is_unavailable(transport: str) -> None:
    err = await _error_from_server(transport, silent=False)
    assert map_openai_error(err).error.reason == "UPSTREAM_UNAVAILABLE"
    assert error_type(err) == "APIConnectionError"


@pytest.mark.parametrize(
    ("status", "headers", "retryable", "upstream_retry_after", "retry_after_seconds"),
    [
        # Transient: worth another attempt, after the upstream's Retry-After when it sent one.
        (429, {"retry-after": "17"}, True, 17.0, 17.0),
        (429, None, True, None, 2.0),  # our callers still get a default
        (500, None, True, None, 2.0),
        (502, None, True, None, 2.0),
        (503, {"retry-after-ms": "1500"}, True, 1.5, 1.5),
        (504, None, True, None, 2.0),
        (408, None, True, None, 2.0),
        (409, None, True, None, 2.0),
        # Permanent: rejected input, our configuration refused, or not a transient failure.
        (400, None, False, None, None),
        (413, None, False, None, None),
        (422, None, False, None, None),
        (401, None, False, None, 2.0),
        (403, None, False, None, 2.0),
        (404, None, False, None, 2.0),
        (501, None, False, None, 2.0),
    ],
)
def test_retryable_and_upstream_retry_after(
    status: int,
    headers: dict[str, str] | None,
    retryable: bool,
    upstream_retry_after: float | None,
    retry_after_seconds: float | None,
) -> None:
    mapped = map_openai_error(status_error(status, headers))
    assert mapped.retryable is retryable
    assert mapped.upstream_retry_after == upstream_retry_after
    assert mapped.error.retry_after_seconds == retry_after_seconds
    # Unchanged: what counts against the breaker.
    assert mapped.counts_as_failure is (status in (429, 500, 502, 503, 504))


def test_timeouts_and_connection_errors_are_retryable() -> None:
    for exc in (
        openai.APITimeoutError(request=REQUEST),
        openai.APIConnectionError(request=REQUEST),
    ):
        mapped = map_openai_error(exc)
        assert mapped.retryable
        assert mapped.counts_as_failure
        assert mapped.upstream_retry_after is None  # the upstream said nothing
    assert upstream_timeout().retryable


def test_an_unusable_answer_is_not_retryable() -> None:
    response = httpx2.Response(200, request=REQUEST)
    mapped = map_openai_error(openai.APIResponseValidationError(response, body=None))
    assert mapped.error.code is grpc.StatusCode.UNAVAILABLE
    assert not mapped.retryable
    assert not mapped.counts_as_failure
    assert mapped.upstream_retry_after is None


def test_upstream_error_defaults() -> None:
    error: ServiceError = upstream_unavailable("down", 2.0)
    # Without a word on it, a failure that counts against the breaker is transient.
    assert UpstreamError(error, counts_as_failure=True).retryable
    assert not UpstreamError(error, counts_as_failure=False).retryable
    assert UpstreamError(error, counts_as_failure=True).upstream_retry_after is None
    explicit = UpstreamError(
        error, counts_as_failure=False, retryable=True, upstream_retry_after=3.0
    )
    assert explicit.retryable
    assert explicit.upstream_retry_after == 3.0


def test_error_types() -> None:
    assert error_type(status_error(429)) == "429"
    assert error_type(status_error(500)) == "500"
    assert error_type(openai.APITimeoutError(request=REQUEST)) == "timeout"
    assert error_type(openai.APIConnectionError(request=REQUEST)) == "APIConnectionError"
    assert error_type(asyncio.CancelledError()) == "cancelled"
    assert error_type(GeneratorExit()) == "cancelled"


def test_retry_after_forms() -> None:
    assert retry_after_from_headers({"retry-after": "3"}) == 3
    assert retry_after_from_headers({"retry-after": "1.5"}) == 1.5
    assert retry_after_from_headers({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 < (retry_after_from_headers({"retry-after": in_a_minute}) or 0) <= 61
    assert retry_after_from_headers({"retry-after": "0"}) is None
    assert retry_after_from_headers({"retry-after": "soon"}) is None
    assert retry_after_from_headers({}) is None


def test_prompt_messages() -> None:
    text = Prompt("m", "Be brief. Answer in en.", "Hi there", None, 10)
    assert text.messages() == [
        {"role": "system", "content": "Be brief. Answer in en."},
        {"role": "user", "content": "Hi there"},
    ]

    png = tiny_png()
    image = Prompt("v", "sys", "What is it?", ImageInput(png, "image/png"), 10)
    system, user = image.messages()
    assert system == {"role": "system", "content": "sys"}
    parts: Any = user["content"]
    assert parts[0] == {"type": "text", "text": "What is it?"}
    url = parts[1]["image_url"]["url"]
    assert url == "data:image/png;base64," + base64.b64encode(png).decode()

    only_image: Any = Prompt("v", "sys", "", ImageInput(png, "image/png"), 10).messages()
    assert [p["type"] for p in only_image[1]["content"]] == ["image_url"]
