"""Every REST route of the design through the real Envoy: a success and a bad input each."""

from __future__ import annotations

import base64
import json
import uuid

import asyncpg
import httpx
import pytest

from tests.e2e.conftest import ADMIN_TOKEN, FREE_DAILY_LIMIT, RunningMesh, token_for
from tests.e2e.helpers import reason, violated_fields
from tests.images import tiny_png

pytestmark = pytest.mark.e2e


def auth(user_id: str, email: str = "") -> dict[str, str]:
    return {"authorization": f"Bearer {token_for(user_id, email)}"}


# -- generate ------------------------------------------------------------------------------


def test_generate_text_returns_the_upstream_answer(http: httpx.Client) -> None:
    prompt = f"Name a colour {uuid.uuid4()}"
    r = http.post("/api/generate", json={"text": prompt, "lang": "en"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"]
    assert body["model"]
    assert body["usage"]["total_tokens"] > 0
    assert body["cached"] is False
    assert body["quota"]["plan"] == "guest"
    uuid.UUID(body["generation_id"])
    again = http.post("/api/generate", json={"text": prompt, "lang": "en"}).json()
    assert again["cached"] is True
    assert again["text"] == body["text"]


def test_generate_image_goes_to_the_vision_model(http: httpx.Client) -> None:
    image = base64.b64encode(tiny_png()).decode()
    r = http.post(
        "/api/generate",
        json={"text": "What is this?", "image_data": image, "image_mime_type": "image/png"},
    )
    assert r.status_code == 200, r.text
    assert "image/png" in r.json()["text"]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"text": ""}, "text"),
        ({"text": "x" * 4001}, "text"),
        ({"text": "hi", "lang": "not a lang!"}, "lang"),
        (
            {
                "image_data": base64.b64encode(b"not an image").decode(),
                "image_mime_type": "image/png",
            },
            "image_mime_type",
        ),
        (
            {"image_data": base64.b64encode(tiny_png()).decode(), "image_mime_type": "image/tiff"},
            "image_mime_type",
        ),
    ],
)
def test_generate_rejects_bad_input_with_the_field(
    http: httpx.Client, payload: dict[str, str], field: str
) -> None:
    r = http.post("/api/generate", json=payload)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert field in violated_fields(r)
    assert reason(r) == "INVALID_ARGUMENT"


def test_generate_rejects_malformed_json(http: httpx.Client) -> None:
    r = http.post(
        "/api/generate", content=b'{"text": ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text


def test_stream_generate_sends_deltas_then_done(http: httpx.Client) -> None:
    prompt = f"Tell me a story {uuid.uuid4()}"
    events = []
    with http.stream("POST", "/api/generate:stream", json={"text": prompt}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[len("data:") :]))
    assert len(events) >= 2
    deltas = [e["delta"]["text"] for e in events if "delta" in e]
    assert deltas
    done = events[-1]["done"]
    assert "".join(deltas) == done["text"]
    assert done["usage"]["total_tokens"] > 0


def test_stream_generate_rejects_bad_input(http: httpx.Client) -> None:
    r = http.post("/api/generate:stream", json={"text": ""})
    assert r.status_code == 400
    assert "text" in violated_fields(r)


def test_generate_takes_cache_options_in_the_body_and_as_cache_control(
    http: httpx.Client,
) -> None:
    prompt = f"Name a river {uuid.uuid4()}"
    body = {"text": prompt, "cache": {"noStore": True, "tags": ["e2e-rivers"]}}
    assert http.post("/api/generate", json=body).json()["cached"] is False
    assert http.post("/api/generate", json={"text": prompt}).json()["cached"] is False
    assert http.post("/api/generate", json={"text": prompt}).json()["cached"] is True
    fresh = http.post("/api/generate", json={"text": prompt}, headers={"cache-control": "no-cache"})
    assert fresh.json()["cached"] is False

    mine = {"text": prompt, "cache": {"scope": "CACHE_SCOPE_USER"}}
    as_guest = http.post("/api/generate", json=mine)
    assert as_guest.status_code == 400
    assert violated_fields(as_guest) == {"cache.scope"}
    user = auth(f"cache-{uuid.uuid4()}")
    assert http.post("/api/generate", json=mine, headers=user).json()["cached"] is False
    assert http.post("/api/generate", json=mine, headers=user).json()["cached"] is True


def test_quota_exhaustion_is_429_with_a_real_retry_after(http: httpx.Client) -> None:
    headers = auth(f"user-{uuid.uuid4()}")
    for i in range(FREE_DAILY_LIMIT):
        r = http.post("/api/generate", json={"text": f"q{i} {uuid.uuid4()}"}, headers=headers)
        assert r.status_code == 200, r.text
    r = http.post("/api/generate", json={"text": "one more"}, headers=headers)
    assert r.status_code == 429, r.text
    assert reason(r) == "QUOTA_EXHAUSTED"
    retry_after = int(r.headers["retry-after"])
    assert 0 < retry_after <= 86400
    quota = http.get("/api/quota", headers=headers).json()
    assert quota["remaining"] == 0
    assert quota["used"] == FREE_DAILY_LIMIT


def test_a_client_cannot_pick_its_ip_with_x_forwarded_for(http: httpx.Client) -> None:
    """No proxy is trusted here (GATEWAY_TRUSTED_PROXY_HOPS=0): the guest is the TCP peer,
    whatever X-Forwarded-For says, so a header cannot buy a fresh guest quota."""
    before = http.get("/api/quota").json()["used"]
    for spoofed in ("203.0.113.9", "2001:db8::1", "198.51.100.7, 203.0.113.10"):
        r = http.post(
            "/api/generate",
            json={"text": f"spoof {uuid.uuid4()}"},
            headers={"x-forwarded-for": spoofed},
        )
        assert r.status_code == 200, r.text
    assert http.get("/api/quota", headers={"x-forwarded-for": "203.0.113.9"}).json()["used"] == (
        before + 3
    )


def test_every_response_says_how_much_rate_limit_is_left(http: httpx.Client) -> None:
    r = http.get("/api/quota")
    assert r.headers["x-ratelimit-limit"].startswith("1000000, 1000000;w=60;")
    assert 'name="reads.per_ip"' in r.headers["x-ratelimit-limit"]
    assert int(r.headers["x-ratelimit-remaining"]) > 0
    assert "retry-after" not in r.headers


# -- quota and profile ---------------------------------------------------------------------


def test_quota_for_a_guest(http: httpx.Client) -> None:
    r = http.get("/api/quota")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["plan"] == "guest"
    assert body["remaining"] == body["limit"] - body["used"]
    assert body["resets_at"]


def test_quota_rejects_unknown_query_parameters(http: httpx.Client) -> None:
    assert http.get("/api/quota", params={"user": "someone-else"}).status_code == 400


def test_profile_for_a_signed_in_user(http: httpx.Client) -> None:
    user = f"user-{uuid.uuid4()}"
    r = http.get("/api/profile", headers=auth(user, "ada@example.com"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user_id"] == user
    assert body["email"] == "ada@example.com"
    assert body["plan"] == "free"
    assert body["quota"]["limit"] == FREE_DAILY_LIMIT


def test_a_user_reads_only_its_own_profile_and_quota(http: httpx.Client) -> None:
    """Who a request is about comes from the verified token alone: there is no parameter
    that names another user."""
    alice, bob = f"alice-{uuid.uuid4()}", f"bob-{uuid.uuid4()}"
    generated = http.post(
        "/api/generate", json={"text": f"spend one {uuid.uuid4()}"}, headers=auth(alice)
    )
    assert generated.status_code == 200, generated.text
    for user, used in ((alice, 1), (bob, 0)):
        profile = http.get("/api/profile", headers=auth(user)).json()
        assert profile["user_id"] == user
        assert profile["quota"]["used"] == used
        assert http.get("/api/quota", headers=auth(user)).json()["used"] == used
    # Asking for the other one's is not a thing the API understands.
    for params in ({"user_id": alice}, {"user": alice}):
        assert http.get("/api/profile", params=params, headers=auth(bob)).status_code == 400
        assert http.get("/api/quota", params=params, headers=auth(bob)).status_code == 400


def test_a_token_claim_longer_than_genmesh_keeps_is_a_400_naming_it(http: httpx.Client) -> None:
    for headers, claim in [
        (auth("u" * 129), "sub"),
        (auth(f"user-{uuid.uuid4()}", "a" * 320 + "@example.com"), "email"),
    ]:
        for path in ("/api/profile", "/api/quota"):
            r = http.get(path, headers=headers)
            assert r.status_code == 400, (path, r.text)
            assert claim in r.json()["message"]


def test_profile_needs_a_signed_in_user(http: httpx.Client) -> None:
    assert http.get("/api/profile").status_code == 401


def test_a_bad_token_is_401_not_a_guest(http: httpx.Client) -> None:
    r = http.get("/api/quota", headers={"authorization": "Bearer not.a.jwt"})
    assert r.status_code == 401


def test_a_client_cannot_claim_a_user_id_by_header(http: httpx.Client) -> None:
    r = http.get("/api/profile", headers={"x-genmesh-user-id": "admin"})
    assert r.status_code == 401


# -- telemetry -----------------------------------------------------------------------------


async def test_feedback_is_stored(http: httpx.Client, database_url: str) -> None:
    comment = f"great {uuid.uuid4()}"
    r = http.post("/api/feedback", json={"rating": 5, "comment": comment, "lang": "en"})
    assert r.status_code == 200, r.text
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT rating, lang FROM feedback WHERE comment = $1", comment)
    finally:
        await conn.close()
    assert row is not None
    assert (row["rating"], row["lang"]) == (5, "en")


@pytest.mark.parametrize("rating", [0, 6])
def test_feedback_rejects_a_rating_out_of_range(http: httpx.Client, rating: int) -> None:
    r = http.post("/api/feedback", json={"rating": rating})
    assert r.status_code == 400
    assert "rating" in violated_fields(r)


def test_wishlist_is_idempotent_per_email(http: httpx.Client) -> None:
    email = f"pro-{uuid.uuid4().hex[:8]}@example.com"
    first = http.post("/api/wishlist", json={"email": email, "lang": "en"})
    assert first.status_code == 200, first.text
    assert first.json()["created"] is True
    again = http.post("/api/wishlist", json={"email": email.upper(), "lang": "en"})
    assert again.status_code == 200
    assert again.json()["created"] is False


def test_wishlist_rejects_a_bad_email(http: httpx.Client) -> None:
    r = http.post("/api/wishlist", json={"email": "not-an-email"})
    assert r.status_code == 400
    assert "email" in violated_fields(r)


def test_events_are_stored_once(http: httpx.Client) -> None:
    events = [
        {"event_id": str(uuid.uuid4()), "event": "page_view", "session_id": "s1"},
        {
            "event_id": str(uuid.uuid4()),
            "event": "generate_clicked",
            "session_id": "s1",
            "properties": {"button": "primary"},
        },
    ]
    r = http.post("/api/events", json={"events": events})
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 2, "duplicates": 0}
    retried = http.post("/api/events", json={"events": events})
    assert retried.json() == {"accepted": 0, "duplicates": 2}


def test_events_reject_a_bad_event_id(http: httpx.Client) -> None:
    r = http.post("/api/events", json={"events": [{"event_id": "nope", "event": "x"}]})
    assert r.status_code == 400
    assert "events[0].event_id" in violated_fields(r)


def test_public_health_is_only_the_status_and_when(http: httpx.Client) -> None:
    r = http.get("/api/health")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"status", "checked_at"}
    assert body["status"] in {"healthy", "degraded"}


def test_the_health_report_reports_every_dependency_to_operators(http: httpx.Client) -> None:
    assert http.get("/api/admin/health").status_code == 401
    assert http.get("/api/admin/health", headers={"x-admin-token": "wrong"}).status_code == 403
    r = http.get("/api/admin/health", headers={"x-admin-token": ADMIN_TOKEN})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] in {"healthy", "degraded"}
    names = {d["name"]: d for d in body["dependencies"]}
    assert {"database", "redis", "generation", "quota", "openai"} <= set(names)
    assert names["database"]["status"] == "healthy"
    # Every replica of every service (pushed to telemetry, pulled from GetStats, its own).
    replicas = body["replicas"]
    assert {x["service"] for x in replicas} == {"generation", "quota", "telemetry"}
    generation = next(x for x in replicas if x["service"] == "generation")
    assert generation["serving"] is True
    assert generation["reported_at"] and generation["replica"]
    assert "openai" in {b["name"] for b in generation["breakers"]}
    assert {"redis"} <= {f["name"] for f in generation["fallbacks"]}
    # Each operation over the last 1 and 5 minutes, merged per service across its replicas.
    assert {o["window_seconds"] for o in body["operations"]} == {60, 300}
    assert {
        "service",
        "operation",
        "count",
        "errors",
        "error_rate",
        "requests_per_second",
        "avg_ms",
        "p95_ms",
        "max_ms",
    } <= set(body["operations"][0])
    breakers = {(b["service"], b["name"]) for b in body["circuit_breakers"]}
    assert ("generation", "openai") in breakers
    # Why it is not healthy, if it is not.
    assert (body["reasons"] == []) == (body["status"] == "healthy"), body["reasons"]


def test_health_rejects_unknown_query_parameters(http: httpx.Client) -> None:
    assert http.get("/api/health", params={"verbose": "1"}).status_code == 400


# -- admin ---------------------------------------------------------------------------------


def test_admin_needs_the_credential(http: httpx.Client) -> None:
    assert http.get("/api/admin/cache").status_code == 401
    assert http.get("/api/admin/cache", headers={"x-admin-token": "wrong"}).status_code == 403


def test_admin_cache_stats_and_invalidation(http: httpx.Client) -> None:
    admin = {"x-admin-token": ADMIN_TOKEN}
    stats = http.get("/api/admin/cache", headers=admin)
    assert stats.status_code == 200, stats.text
    assert {"hits", "misses", "hit_rate", "entries"} <= set(stats.json())
    r = http.post("/api/admin/cache:invalidate", json={"all": True}, headers=admin)
    assert r.status_code == 200, r.text
    assert "removed" in r.json()
    perf = http.get("/api/admin/performance", headers=admin)
    assert perf.status_code == 200
    assert "operations" in perf.json()


def test_admin_invalidation_needs_a_target(http: httpx.Client) -> None:
    r = http.post("/api/admin/cache:invalidate", json={}, headers={"x-admin-token": ADMIN_TOKEN})
    assert r.status_code == 400


# -- the gateway itself --------------------------------------------------------------------


def test_unknown_routes_are_404_json(http: httpx.Client) -> None:
    r = http.get("/api/nope")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/json")


def test_security_headers_on_every_response(http: httpx.Client) -> None:
    for r in (http.get("/api/quota"), http.get("/api/nope")):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "content-security-policy" in r.headers
        assert r.headers["x-frame-options"] == "DENY"
    ok = http.get("/api/quota")
    assert "grpc-status" not in ok.headers
    assert "grpc-message" not in ok.headers


def test_mesh_fixture_uses_the_simulator(mesh: RunningMesh) -> None:
    stats = httpx.get(f"{mesh.config.simulator_url}/_sim/stats").json()
    assert stats["requests"] >= 0
