from __future__ import annotations

import base64
import email.utils
import time
from typing import Any

import grpc
import httpx2
import openai
import pytest

from services.generation.upstream import (
    ImageInput,
    Prompt,
    map_openai_error,
    retry_after_from_headers,
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
    assert f"boom {status}" in mapped.error.message or "Error code" in mapped.error.message
    assert not mapped.counts_as_failure


def test_timeouts_and_connection_errors() -> None:
    timeout = map_openai_error(openai.APITimeoutError(request=REQUEST))
    assert timeout.error.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert timeout.error.reason == "UPSTREAM_TIMEOUT"
    assert timeout.counts_as_failure

    refused = map_openai_error(openai.APIConnectionError(request=REQUEST))
    assert refused.error.code is grpc.StatusCode.UNAVAILABLE
    assert refused.error.reason == "UPSTREAM_UNAVAILABLE"
    assert refused.counts_as_failure


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
