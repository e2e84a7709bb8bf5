"""A real Envoy, rendered from the template, in front of small in-test gRPC services that echo
what they receive: identity, errors, limits and routing as a client sees them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import jwt
import pytest
from google.rpc import code_pb2

from genmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from tests.gateway.harness import (
    BODY_BYTES,
    GRPC_PLUMBING,
    ISSUER,
    MAX_BYTES,
    SECRET,
    SECURITY_HEADERS,
    Gateway,
    Upstream,
    assert_json_error,
    b64url,
    echoed,
    hs256,
    post_chunked,
    token,
)


async def test_health_reaches_the_service_with_request_id_and_no_client_trace_context(
    client: httpx.AsyncClient, upstream: Upstream
) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    r = await client.get(
        "/api/health",
        headers={
            "traceparent": traceparent,
            "tracestate": "vendor=value",
            "x-admin-token": "s3cret",
            "x-request-id": "client-chosen",
            "x-genmesh-client-traceparent": "forged",
        },
    )
    seen = echoed(r)
    # A client cannot steer sampling: its trace context does not reach the services as one;
    # it is kept aside (for the access log) under genmesh's own header, never a forged copy.
    assert "traceparent" not in seen
    assert "tracestate" not in seen
    assert seen["x-genmesh-client-traceparent"] == traceparent
    assert seen["x-admin-token"] == "s3cret"
    # Envoy mints the request id, hands it to the service and returns it to the client.
    assert seen["x-request-id"] != "client-chosen"
    assert r.headers["x-request-id"] == seen["x-request-id"]
    assert seen["x-envoy-original-path"] == "/api/health"
    # A guest: no identity headers.
    assert "x-genmesh-user-id" not in seen
    assert "authorization" not in seen


async def test_grpc_control_headers_and_baggage_from_clients_do_not_reach_services(
    client: httpx.AsyncClient,
) -> None:
    seen = echoed(
        await client.get(
            "/api/health",
            headers={
                "grpc-timeout": "1n",
                "grpc-encoding": "gzip",
                "grpc-accept-encoding": "identity",
                "baggage": "user=%%%",
            },
        )
    )
    assert not {"grpc-timeout", "grpc-encoding", "grpc-accept-encoding", "baggage"} & set(seen)


async def test_without_a_client_traceparent_nothing_is_kept_aside(
    client: httpx.AsyncClient,
) -> None:
    seen = echoed(await client.get("/api/health", headers={"x-genmesh-client-traceparent": "x"}))
    assert "x-genmesh-client-traceparent" not in seen
    assert "traceparent" not in seen


async def test_client_ip_is_the_peer_whatever_the_client_claims(client: httpx.AsyncClient) -> None:
    r = await client.get(
        "/api/health",
        headers={"x-genmesh-client-ip": "6.6.6.6", "X-Forwarded-For": "6.6.6.6"},
    )
    assert echoed(r)["x-genmesh-client-ip"] == "127.0.0.1"


async def test_client_sent_identity_headers_are_dropped(client: httpx.AsyncClient) -> None:
    r = await client.get(
        "/api/health",
        headers={
            "x-genmesh-user-id": "someone-else",
            "x-genmesh-user-email": "victim@example.com",
            # Underscore spellings could be folded into the real names by another hop.
            "x_genmesh_user_id": "someone-else",
        },
    )
    seen = echoed(r)
    assert "x-genmesh-user-id" not in seen
    assert "x-genmesh-user-email" not in seen
    assert "x_genmesh_user_id" not in seen


async def test_a_valid_jwt_names_the_user(client: httpx.AsyncClient) -> None:
    bearer = token({"sub": "user-123", "email": "ada@example.com", "aud": "authenticated"})
    r = await client.get(
        "/api/health",
        headers={
            "authorization": f"Bearer {bearer}",
            "x-genmesh-user-id": "someone-else",
            "x-genmesh-user-email": "victim@example.com",
        },
    )
    seen = echoed(r)
    assert seen["x-genmesh-user-id"] == "user-123"
    assert seen["x-genmesh-user-email"] == "ada@example.com"
    # The services get the claims, not the token.
    assert "authorization" not in seen


async def test_a_token_without_email_leaves_no_email_header(client: httpx.AsyncClient) -> None:
    r = await client.get(
        "/api/health",
        headers={
            "authorization": f"Bearer {token({'sub': 'user-9'})}",
            "x-genmesh-user-email": "victim@example.com",
        },
    )
    seen = echoed(r)
    assert seen["x-genmesh-user-id"] == "user-9"
    assert "x-genmesh-user-email" not in seen


def valid_claims(claims: dict[str, Any]) -> dict[str, Any]:
    """`claims` with the issuer, audience and life that `token()` gives a token the gateway
    accepts."""
    now = int(time.time())
    return {"iss": ISSUER, "aud": "authenticated", "iat": now, "exp": now + 600, **claims}


def unsigned(claims: dict[str, Any]) -> str:
    """An `alg: none` token: header, claims and an empty signature."""
    return f"{b64url({'alg': 'none', 'typ': 'JWT'})}.{b64url(claims)}."


@pytest.mark.parametrize(
    "bearer",
    [
        pytest.param(
            token({"sub": "u"}, secret="another-secret-0123456789-abcdefghijkl"), id="key"
        ),
        pytest.param(token({"sub": "u", "exp": int(time.time()) - 3600}), id="expired"),
        pytest.param(jwt.encode({"sub": "u"}, SECRET, algorithm="HS256"), id="no-expiry"),
        # Claims that pass every other check (see the alg-none test below): only the
        # algorithm can refuse it.
        pytest.param(unsigned(valid_claims({"sub": "u"})), id="alg-none"),
        pytest.param("garbage", id="garbage"),
    ],
)
async def test_bad_tokens_are_401_json(
    client: httpx.AsyncClient, upstream: Upstream, bearer: str
) -> None:
    before = len(upstream.telemetry.calls)
    r = await client.get("/api/health", headers={"authorization": f"Bearer {bearer}"})
    assert_json_error(r, 401, 16, "UNAUTHENTICATED")
    assert len(upstream.telemetry.calls) == before


async def test_alg_none_is_refused_for_its_algorithm_alone(
    client: httpx.AsyncClient, upstream: Upstream
) -> None:
    """The same claims are accepted when signed with the secret, so the 401 of the unsigned
    token can only come from `alg: none` (not an issuer, audience or expiry check)."""
    claims = valid_claims({"sub": "user-alg-none", "email": "alg@example.com"})
    signed = jwt.encode(claims, SECRET, algorithm="HS256")
    seen = echoed(await client.get("/api/health", headers={"authorization": f"Bearer {signed}"}))
    assert seen["x-genmesh-user-id"] == "user-alg-none"
    before = len(upstream.telemetry.calls)
    # The signed token's own header and claims with alg none, with and without its signature.
    _, payload, signature = signed.split(".")
    assert jwt.get_unverified_header(signed)["alg"] == "HS256"
    forged = f"{b64url({'alg': 'none', 'typ': 'JWT'})}.{payload}"
    for bearer in (unsigned(claims), f"{forged}.", f"{forged}.{signature}"):
        assert jwt.decode(bearer, options={"verify_signature": False}) == claims
        r = await client.get("/api/health", headers={"authorization": f"Bearer {bearer}"})
        assert_json_error(r, 401, 16, "UNAUTHENTICATED")
    assert len(upstream.telemetry.calls) == before


async def test_without_a_secret_tokens_are_refused_and_guests_pass(
    secretless_gateway: Gateway,
) -> None:
    async with httpx.AsyncClient(base_url=secretless_gateway.url, timeout=20) as http:
        for secret in ("", SECRET):
            bearer = hs256({"sub": "u", "exp": int(time.time()) + 60}, secret)
            r = await http.get("/api/health", headers={"authorization": f"Bearer {bearer}"})
            assert_json_error(r, 401, 16, "UNAUTHENTICATED")
        assert "x-genmesh-user-id" not in echoed(await http.get("/api/health"))


async def test_unknown_paths_are_404_json_with_security_headers(client: httpx.AsyncClient) -> None:
    for r in (
        await client.get("/api/nope"),
        await client.post("/api/nope", json={}),
        await client.get("/"),
        await client.delete("/api/health"),
    ):
        assert_json_error(r, 404, 5, "NOT_FOUND")
        for name, value in SECURITY_HEADERS.items():
            assert r.headers[name] == value
        assert "strict-transport-security" not in r.headers


async def test_security_headers_and_no_grpc_plumbing_on_success(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/health")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    for name, value in SECURITY_HEADERS.items():
        assert r.headers[name] == value
    for name in (*GRPC_PLUMBING, "x-envoy-upstream-service-time"):
        assert name not in r.headers
    assert r.headers["server"] == "genmesh"


async def test_unknown_query_parameters_are_400_json(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/health", params={"access_token": "x"})
    assert_json_error(r, 400, 3, "INVALID_ARGUMENT")


async def test_malformed_json_is_400_json(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/api/feedback", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_json_error(r, 400, 3, "INVALID_ARGUMENT")


async def test_field_violations_come_through_as_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/feedback", json={"rating": 0})
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["code"] == code_pb2.INVALID_ARGUMENT
    assert body["message"] == "invalid rating"
    (bad,) = [d for d in body["details"] if d["@type"].endswith("google.rpc.BadRequest")]
    assert [v["field"] for v in bad["field_violations"]] == ["rating"]
    for name in GRPC_PLUMBING:
        assert name not in r.headers
    assert r.headers["x-content-type-options"] == "nosniff"


async def test_retry_after_from_the_service_reaches_the_client(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/feedback", json={"rating": 9})
    assert r.status_code == 429
    assert r.headers["retry-after"] == "42"
    assert r.json()["code"] == code_pb2.RESOURCE_EXHAUSTED


async def test_generate_takes_a_large_body_up_to_its_limit(client: httpx.AsyncClient) -> None:
    # Over Envoy's default 1 MiB buffer but under the generate limit: accepted whole.
    text = "a" * (2 * 1024 * 1024)
    r = await client.post("/api/generate", json={"text": text})
    assert r.status_code == 200, r.text
    assert r.json()["text"] == text.upper()
    r = await client.post("/api/generate", json={"text": "a" * (MAX_BYTES + 1)})
    assert_json_error(r, 413, 3, "REQUEST_TOO_LARGE")
    assert str(MAX_BYTES) in r.json()["message"]
    assert r.headers["x-frame-options"] == "DENY"


async def chunks(body: bytes, size: int = 16 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


@pytest.mark.parametrize("path", ["/api/feedback", "/api/wishlist", "/api/events"])
async def test_every_other_route_takes_a_small_body(
    client: httpx.AsyncClient, gateway: Gateway, upstream: Upstream, path: str
) -> None:
    calls = len(upstream.telemetry.calls)
    r = await client.post(path, json={"comment": "a" * (BODY_BYTES + 1)})
    assert_json_error(r, 413, 3, "REQUEST_TOO_LARGE")
    assert str(BODY_BYTES) in r.json()["message"]
    assert r.headers["x-content-type-options"] == "nosniff"
    # Chunked (no Content-Length): what arrives is counted, and the chunk that ends the body
    # too, when it crosses the limit by one byte.
    over = b'{"comment": "' + b"a" * (BODY_BYTES - 14) + b'"}'
    assert len(over) == BODY_BYTES + 1
    for body, size in [(over * 2, 16 * 1024), (over, BODY_BYTES - 10)]:
        status, head = await post_chunked(gateway.port, path, body, size)
        assert status == 413, head
        assert b"x-content-type-options: nosniff" in head
    assert len(upstream.telemetry.calls) == calls
    # Exactly at the limit it goes through, in one piece or in chunks.
    exact = b'{"rating": 5, "comment": "' + b"a" * (BODY_BYTES - 28) + b'"}'
    assert len(exact) == BODY_BYTES
    headers = {"content-type": "application/json"}
    r = await client.post("/api/feedback", content=exact, headers=headers)
    assert r.status_code == 200, r.text
    r = await client.post("/api/feedback", content=chunks(exact, size=4096), headers=headers)
    assert r.status_code == 200, r.text


async def test_internal_rpcs_are_not_reachable_as_rest(
    client: httpx.AsyncClient, upstream: Upstream
) -> None:
    for path in (
        "/genmesh.telemetry.v1.TelemetryService/RecordSecurityEvent",
        "/genmesh.quota.v1.QuotaService/ReserveQuota",
        "/genmesh.telemetry.v1.TelemetryService/GetHealth",
    ):
        r = await client.post(path, json={"event_type": "x", "severity": "SEVERITY_HIGH"})
        assert_json_error(r, 404, 5, "NOT_FOUND")
    assert "RecordSecurityEvent" not in upstream.telemetry.calls


async def test_raw_grpc_is_refused(gateway: Gateway, upstream: Upstream) -> None:
    """The gateway speaks REST only: gRPC over HTTP/2 to any gRPC path, internal or public, is
    refused before it reaches a service."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as internal:
            await stub.RecordSecurityEvent(
                telemetry_pb2.RecordSecurityEventRequest(
                    event_type="forged", severity=telemetry_pb2.SEVERITY_CRITICAL
                ),
                timeout=10,
            )
        with pytest.raises(grpc.aio.AioRpcError) as public:
            await stub.GetHealth(
                telemetry_pb2.GetHealthRequest(),
                metadata=(("x-envoy-original-path", "/api/health"),),
                timeout=10,
            )
    for caught in (internal, public):
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert json.loads(caught.value.details() or "")["code"] == 5
    assert "RecordSecurityEvent" not in upstream.telemetry.calls


async def test_stream_generate_is_server_sent_events(client: httpx.AsyncClient) -> None:
    async with client.stream("POST", "/api/generate:stream", json={"text": "hi"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        body = (await r.aread()).decode()
    events = [
        json.loads(line.removeprefix("data:").strip())
        for line in body.splitlines()
        if line.startswith("data:")
    ]
    assert [e.get("delta", {}).get("text") for e in events[:2]] == ["Hel", "lo"]
    assert events[2]["done"]["text"] == "Hello"
    assert r.headers["x-content-type-options"] == "nosniff"


async def test_unary_generate(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/generate", json={"text": "hi", "lang": "en"})
    assert r.status_code == 200
    body = r.json()
    assert body["text"] == "HI"
    # Primitive fields are printed even at their defaults, with proto field names.
    assert body["cached"] is False
    assert body["generation_id"] == ""


async def test_a_service_that_is_down_is_503_json(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/quota")
    assert_json_error(r, 503, 14, "UPSTREAM_UNAVAILABLE")
    assert r.headers["x-content-type-options"] == "nosniff"


async def test_the_route_timeout_is_504_json(client: httpx.AsyncClient) -> None:
    # GetHealth's route allows 5 s.
    started = time.monotonic()
    r = await client.get("/api/health", headers={"x-test-delay": "8"})
    assert_json_error(r, 504, 4, "UPSTREAM_TIMEOUT")
    assert 4.5 < time.monotonic() - started < 7.5


async def test_access_log_is_json_lines(gateway: Gateway, client: httpx.AsyncClient) -> None:
    r = await client.get("/api/health")
    request_id = r.headers["x-request-id"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for line in gateway.log.read_text().splitlines():
            if request_id in line and line.startswith("{"):
                entry = json.loads(line)
                assert entry["logger"] == "gateway.access"
                assert entry["path"] == "/api/health"
                assert entry["rpc"] == "/genmesh.telemetry.v1.TelemetryService/GetHealth"
                assert entry["status"] == 200
                assert entry["client_ip"] == "127.0.0.1"
                return
        # Envoy flushes access logs every few seconds.
        await asyncio.sleep(0.2)
    raise AssertionError("no access log line for the request")
