"""Envoy's rate limit filter as configured by the template, in front of a scripted rate limit
service: what Envoy asks (descriptors), what a client sees when allowed and when refused, that
a refused request never reaches a service nor has its body read, and what happens when the
rate limit service cannot answer (fail open, or fail closed when configured)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.gateway.harness import (
    BODY_BYTES,
    MAX_BYTES,
    SECRET,
    SECURITY_HEADERS,
    FakeRateLimitService,
    Gateway,
    Upstream,
    assert_json_error,
    post_in_two_parts,
    start_gateway,
    stop,
    token,
)


@pytest.fixture
async def limited(limited_gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=limited_gateway.url, timeout=20) as http:
        yield http


def last_call(ratelimit: FakeRateLimitService) -> list[dict[str, str]]:
    assert ratelimit.calls, "the rate limit service was not asked"
    return ratelimit.calls[-1]


async def test_envoy_asks_per_client_ip_and_per_verified_user(
    limited: httpx.AsyncClient, upstream: Upstream
) -> None:
    await limited.get("/api/health", headers={"x-forwarded-for": "6.6.6.6"})
    assert last_call(upstream.ratelimit) == [
        {"path": "/api/health", "remote_address": "127.0.0.1"}  # the peer, never the header
    ]
    bearer = token({"sub": "user-42"})
    await limited.post(
        "/api/feedback?x=1",
        json={"rating": 5},
        headers={"authorization": f"Bearer {bearer}", "x-genmesh-user-id": "forged"},
    )
    assert last_call(upstream.ratelimit) == [
        {"path": "/api/feedback?x=1", "remote_address": "127.0.0.1"},
        {"path": "/api/feedback?x=1", "user": "user-42"},
    ]
    # A forged identity header without a token is no user.
    await limited.get("/api/health", headers={"x-genmesh-user-id": "forged"})
    assert last_call(upstream.ratelimit) == [{"path": "/api/health", "remote_address": "127.0.0.1"}]


async def test_allowed_responses_carry_the_x_ratelimit_headers(limited: httpx.AsyncClient) -> None:
    r = await limited.get("/api/health")
    assert r.status_code == 200
    assert r.headers["x-ratelimit-limit"] == '10, 10;w=60;name="test.per_ip"'
    assert r.headers["x-ratelimit-remaining"] == "7"
    assert r.headers["x-ratelimit-reset"] == "30"
    assert "retry-after" not in r.headers


async def test_a_refused_request_gets_the_services_429_and_never_reaches_a_service(
    limited: httpx.AsyncClient, upstream: Upstream
) -> None:
    before = upstream.telemetry.calls.count("JoinWishlist")
    r = await limited.post("/api/wishlist", json={"email": "ada@example.com"})
    assert r.status_code == 429
    assert r.headers["content-type"] == "application/json"
    assert r.content == FakeRateLimitService.REFUSAL  # the body as the service wrote it
    assert r.headers["retry-after"] == "17"
    assert r.headers["x-ratelimit-remaining"] == "0"
    assert r.headers["x-ratelimit-reset"] == "17"
    assert "x-envoy-ratelimited" not in r.headers  # nothing advertises Envoy
    for name, value in SECURITY_HEADERS.items():
        assert r.headers[name] == value
    assert upstream.telemetry.calls.count("JoinWishlist") == before


async def test_a_refused_request_is_refused_before_its_body_is_read(
    limited_gateway: Gateway, upstream: Upstream
) -> None:
    """The refusal comes at the headers: the client gets its 429 without sending the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", limited_gateway.port)
    try:
        writer.write(
            b"POST /api/wishlist HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {BODY_BYTES - 1}\r\n\r\n".encode()
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=10)
    finally:
        writer.close()
    assert status_line.startswith(b"HTTP/1.1 429")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(
    ("path", "limit"), [("/api/events", BODY_BYTES), ("/api/generate", MAX_BYTES)]
)
async def test_a_body_over_the_limit_that_came_before_the_decision_is_413(
    limited_gateway: Gateway, upstream: Upstream, path: str, limit: int, chunked: bool
) -> None:
    """Part of the body is in Envoy when the rate limit answer comes: more than the limit, less
    or more than twice the limit. Envoy used to stop reading such a body and never answer
    (found by tests/e2e/test_fuzz.py: a truncated events body, no answer in 90 s)."""
    body = b'{"events": [{"properties": {"a": "' + b"y" * (3 * limit)
    calls = len(upstream.telemetry.calls)
    for first in (limit + 4096, 2 * limit + 4096, len(body) - 1):
        status, head = await post_in_two_parts(
            limited_gateway.port, path, body, first, chunked=chunked
        )
        assert status == 413, head
        assert b"x-content-type-options: nosniff" in head
    assert len(upstream.telemetry.calls) == calls


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(
    ("path", "limit"), [("/api/events", BODY_BYTES), ("/api/generate", MAX_BYTES)]
)
async def test_a_body_within_the_limit_that_came_before_the_decision_is_judged(
    limited_gateway: Gateway, path: str, limit: int, chunked: bool
) -> None:
    """Up to the limit, all but its last byte in Envoy before the answer: judged on its
    content (truncated JSON: 400), neither refused for its size nor left without an answer."""
    body = (b'{"events": [{"properties": {"a": "' + b"y" * limit)[:limit]
    for first in (limit // 2, limit - 1):
        status, head = await post_in_two_parts(
            limited_gateway.port, path, body, first, chunked=chunked
        )
        assert status == 400, head


async def test_without_an_answer_requests_pass_and_carry_no_limit_headers(
    client: httpx.AsyncClient,
) -> None:
    """`client` talks to the gateway whose quota (the rate limit service) is down: fail open."""
    r = await client.get("/api/health")
    assert r.status_code == 200
    assert "x-ratelimit-limit" not in r.headers


@pytest.fixture(scope="module")
async def fail_closed_gateway(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory, descriptor_set: Path
) -> AsyncIterator[Gateway]:
    running, process = await start_gateway(
        tmp_path_factory.mktemp("envoy-fail-closed"),
        upstream.port,
        SECRET,
        MAX_BYTES,
        GATEWAY_RATE_LIMIT_FAIL_CLOSED=True,
    )
    yield running
    stop(process)


async def test_fail_closed_refuses_with_503_json(
    fail_closed_gateway: Gateway, upstream: Upstream
) -> None:
    async with httpx.AsyncClient(base_url=fail_closed_gateway.url, timeout=20) as http:
        before = len(upstream.telemetry.calls)
        r = await http.get("/api/health")
    assert_json_error(r, 503, 14, "UPSTREAM_UNAVAILABLE")
    assert len(upstream.telemetry.calls) == before


@pytest.fixture(scope="module")
async def unlimited_gateway(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory, descriptor_set: Path
) -> AsyncIterator[Gateway]:
    running, process = await start_gateway(
        tmp_path_factory.mktemp("envoy-unlimited"),
        upstream.port,
        SECRET,
        MAX_BYTES,
        upstream.port,
        GATEWAY_RATE_LIMIT=False,
    )
    yield running
    stop(process)


async def test_limits_off_asks_nothing(unlimited_gateway: Gateway, upstream: Upstream) -> None:
    asked = len(upstream.ratelimit.calls)
    async with httpx.AsyncClient(base_url=unlimited_gateway.url, timeout=20) as http:
        r = await http.post("/api/wishlist", json={"email": "ada@example.com"})
    assert r.status_code == 200, r.text
    assert json.loads(r.content) == {"created": True}
    assert "x-ratelimit-limit" not in r.headers
    assert len(upstream.ratelimit.calls) == asked
