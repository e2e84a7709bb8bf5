"""Rate limits, blocks and quotas through the real Envoy, with real Redis and PostgreSQL.

The mesh here trusts one proxy hop (GATEWAY_TRUSTED_PROXY_HOPS=1) and the test plays that
proxy: it appends each simulated client's address to X-Forwarded-For, so every test is its
own client network. Limits are tight (see LIMITS) so they are reached in a few requests."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import asyncpg
import grpc
import httpx
import pytest

from genmesh.quota.v1 import quota_pb2, quota_pb2_grpc
from tests.e2e.conftest import (
    ADMIN_TOKEN,
    RunningMesh,
    mesh_config,
    running_mesh,
    token_for,
)
from tests.e2e.helpers import detail_of, reason

pytestmark = pytest.mark.e2e

GUEST_DAILY_LIMIT = 2
RESERVATION_TTL_SECONDS = 2.0
BLOCK_AFTER = 3
LIMITS = {
    "GATEWAY_TRUSTED_PROXY_HOPS": "1",
    "RATE_LIMIT_FEEDBACK_PER_IP": "2/minute",
    "RATE_LIMIT_WISHLIST_PER_IP": "1000/minute",
    "RATE_LIMIT_WISHLIST_PER_USER": "2/minute",
    "RATE_LIMIT_EVENTS_PER_IP": "5/second",
    # No limit on /api/health and unknown paths: a block must refuse there all the same.
    "RATE_LIMIT_DEFAULT_PER_IP": "off",
    "RATE_LIMIT_DEFAULT_PER_USER": "off",
    "RATE_LIMIT_BLOCK_AFTER": str(BLOCK_AFTER),
    "RATE_LIMIT_BLOCK_STEPS": "30s,60s",
    "GUEST_DAILY_LIMIT": str(GUEST_DAILY_LIMIT),
    "QUOTA_RESERVATION_TTL_SECONDS": str(RESERVATION_TTL_SECONDS),
    "QUOTA_SWEEP_INTERVAL_SECONDS": "0.5",
}


@pytest.fixture(scope="module")
def limited_mesh(
    database_url: str,
    redis_url: str,
    redis_prefix: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningMesh]:
    config = mesh_config(
        database_url,
        redis_url,
        f"{redis_prefix}limits:",
        tmp_path_factory.mktemp("limited-mesh-logs"),
        **LIMITS,
    )
    with running_mesh(config) as running:
        yield running


@pytest.fixture(scope="module")
def gateway(limited_mesh: RunningMesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limited_mesh.url, timeout=30) as client:
        yield client


def fresh_ipv4() -> str:
    value = uuid.uuid4().int
    return f"198.18.{value % 256}.{(value >> 8) % 254 + 1}"


def fresh_ipv6_network() -> str:
    """The first four groups of a /64 nobody else uses."""
    h = uuid.uuid4().hex
    return f"2001:db8:{h[:4]}:{h[4:8]}"


def as_client(ip: str, **headers: str) -> dict[str, str]:
    """What the trusted proxy in front of Envoy sends for a client at `ip`."""
    return {"x-forwarded-for": ip, **headers}


def feedback(gateway: httpx.Client, ip: str, **headers: str) -> httpx.Response:
    return gateway.post("/api/feedback", json={"rating": 4}, headers=as_client(ip, **headers))


def metadata(response: httpx.Response) -> dict[str, str]:
    info: dict[str, str] = detail_of(response, "google.rpc.ErrorInfo")["metadata"]
    return info


def exhaust(gateway: httpx.Client, ip: str) -> list[httpx.Response]:
    """Feedback from `ip` until its first refusal (the limit is 2 a minute)."""
    responses = [feedback(gateway, ip) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429], [r.text for r in responses]
    return responses


def block(gateway: httpx.Client, ip: str) -> httpx.Response:
    """Refusals until the escalation blocks `ip`; returns the refusal that started it."""
    exhaust(gateway, ip)
    for _ in range(BLOCK_AFTER - 2):
        assert feedback(gateway, ip).status_code == 429
    started = feedback(gateway, ip)
    assert started.status_code == 429
    assert metadata(started)["limit"] == "block", started.text
    return started


async def rows(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def db_now(database_url: str) -> datetime:
    conn = await asyncpg.connect(database_url)
    try:
        now: datetime = await conn.fetchval("SELECT now()")
        return now
    finally:
        await conn.close()


async def wait_for_rows(
    database_url: str, query: str, *args: Any, count: int = 1, timeout: float = 15
) -> list[asyncpg.Record]:
    deadline = time.monotonic() + timeout
    found: list[asyncpg.Record] = []
    while time.monotonic() < deadline:
        found = await rows(database_url, query, *args)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.2)
    return found


# -- limits --------------------------------------------------------------------------------------


def test_per_ip_limit_with_headers_and_a_retry_after_that_counts_down(
    gateway: httpx.Client,
) -> None:
    ip = fresh_ipv4()
    first, second, refused = exhaust(gateway, ip)
    assert first.headers["x-ratelimit-limit"] == '2, 2;w=60;name="feedback.per_ip"'
    assert [first.headers["x-ratelimit-remaining"], second.headers["x-ratelimit-remaining"]] == [
        "1",
        "0",
    ]
    assert 0 < int(second.headers["x-ratelimit-reset"]) <= 60
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert reason(refused) == "RATE_LIMITED"  # not QUOTA_EXHAUSTED
    assert metadata(refused) == {"limit": "feedback", "scope": "ip", "policy": "2/minute"}
    waited = int(refused.headers["retry-after"])
    assert 20 <= waited <= 30  # one request comes back every 30 s
    time.sleep(1.2)
    later = feedback(gateway, ip)
    assert later.status_code == 429
    assert waited - 5 <= int(later.headers["retry-after"]) < waited  # it counts down
    # Another client network is not affected.
    assert feedback(gateway, fresh_ipv4()).status_code == 200


def test_per_user_limit_follows_the_user_across_networks(gateway: httpx.Client) -> None:
    user = f"user-{uuid.uuid4()}"
    bearer = {"authorization": f"Bearer {token_for(user)}"}

    def join(ip: str) -> httpx.Response:
        return gateway.post(
            "/api/wishlist",
            json={"email": f"{uuid.uuid4().hex[:10]}@example.com"},
            headers=as_client(ip, **bearer),
        )

    allowed = [join(fresh_ipv4()) for _ in range(2)]
    assert [r.status_code for r in allowed] == [200, 200], [r.text for r in allowed]
    assert 'name="wishlist.per_user"' in allowed[0].headers["x-ratelimit-limit"]
    refused = join(fresh_ipv4())
    assert refused.status_code == 429
    assert metadata(refused)["scope"] == "user"
    assert 20 <= int(refused.headers["retry-after"]) <= 30
    # A guest on the same network is not that user.
    assert gateway.post(
        "/api/wishlist", json={"email": f"{uuid.uuid4().hex[:10]}@example.com"}
    ).status_code in (200, 201)


def test_no_fresh_burst_at_a_window_edge(gateway: httpx.Client) -> None:
    """5 a second: 5 just before a whole second and 5 just after would all pass with fixed
    windows; here only what refilled in between passes."""
    ip = fresh_ipv4()

    def events() -> httpx.Response:
        batch = {"events": [{"event_id": str(uuid.uuid4()), "event": "page_view"}]}
        return gateway.post("/api/events", json=batch, headers=as_client(ip))

    fraction = time.time() % 1
    time.sleep((1.8 if fraction > 0.5 else 0.8) - fraction)
    started = time.monotonic()
    before = [events().status_code for _ in range(5)]
    time.sleep(max(0.0, 0.3 - (time.monotonic() - started)))  # past the whole second
    after = [events().status_code for _ in range(5)]
    elapsed = time.monotonic() - started
    assert before == [200] * 5
    # Only what refilled since the burst began (one every 0.2 s), never a fresh 5: with
    # fixed windows all 5 would pass after the whole second.
    admitted = after.count(200)
    assert admitted <= int(elapsed * 5) + 1, (elapsed, after)
    assert set(after) <= {200, 429}


def test_a_spoofed_x_forwarded_for_changes_nothing(gateway: httpx.Client) -> None:
    """Only the trusted proxy's entry (the last) counts; what the client put before it is
    ignored, so it cannot pick a fresh identity per request."""
    real = fresh_ipv4()
    statuses = [
        feedback(gateway, f"{fresh_ipv4()}, {fresh_ipv4()}, {real}").status_code for _ in range(3)
    ]
    assert statuses == [200, 200, 429]


# -- blocks --------------------------------------------------------------------------------------


async def test_repeated_violations_block_the_network_and_are_security_events(
    gateway: httpx.Client, database_url: str
) -> None:
    ip = fresh_ipv4()
    since = await db_now(database_url)  # other runs may have used this address before
    started = block(gateway, ip)
    assert metadata(started)["block_level"] == "1"
    assert 29 <= int(started.headers["retry-after"]) <= 30
    blocks = await wait_for_rows(
        database_url,
        "SELECT severity, user_id, details FROM security_events"
        " WHERE event_type = 'rate_limit_block' AND ip = $1 AND created_at >= $2",
        ip,
        since,
    )
    assert len(blocks) == 1
    assert blocks[0]["severity"] == "high"
    assert '"level": "1"' in blocks[0]["details"]
    # The refusals before it were one burst: one row, not one per request.
    bursts = await rows(
        database_url,
        "SELECT 1 FROM security_events WHERE event_type = 'rate_limit_exceeded' AND ip = $1"
        " AND created_at >= $2",
        ip,
        since,
    )
    assert len(bursts) == 1


def test_a_blocked_caller_is_refused_on_every_route(gateway: httpx.Client) -> None:
    ip = fresh_ipv4()
    block(gateway, ip)
    headers = as_client(ip)
    user = {"authorization": f"Bearer {token_for(f'user-{uuid.uuid4()}')}"}
    responses = [
        gateway.post("/api/generate", json={"text": "hi"}, headers=headers),
        gateway.post("/api/generate:stream", json={"text": "hi"}, headers=headers),
        gateway.get("/api/quota", headers=headers),
        gateway.get("/api/profile", headers={**headers, **user}),
        gateway.post("/api/wishlist", json={"email": "a@example.com"}, headers=headers),
        gateway.post("/api/events", json={"events": []}, headers=headers),
        gateway.get("/api/health", headers=headers),
        gateway.get("/api/admin/cache", headers={**headers, "x-admin-token": ADMIN_TOKEN}),
        gateway.get("/api/nope", headers=headers),
    ]
    for r in responses:
        assert r.status_code == 429, (r.request.url, r.text)
        assert metadata(r)["limit"] == "block"
        assert 0 < int(r.headers["retry-after"]) <= 30
    # The routes without a limit (the default route is `off` here): refused by the block
    # alone, so there is no limit to describe in X-RateLimit-*.
    for r in responses[-3:-2] + responses[-1:]:
        assert r.request.url.path in ("/api/health", "/api/nope")
        assert "x-ratelimit-limit" not in r.headers
    # Unblocked, those routes count nothing and refuse nobody.
    other = as_client(fresh_ipv4())
    statuses = [gateway.get("/api/health", headers=other).status_code for _ in range(5)]
    assert 429 not in statuses, statuses


async def test_operators_list_and_lift_blocks(gateway: httpx.Client, database_url: str) -> None:
    ip = fresh_ipv4()
    since = await db_now(database_url)
    block(gateway, ip)
    operator = as_client(fresh_ipv4(), **{"x-admin-token": ADMIN_TOKEN})
    listed = gateway.get("/api/admin/blocks", headers=operator)
    assert listed.status_code == 200, listed.text
    mine = [b for b in listed.json()["blocks"] if b["subject"] == ip]
    assert len(mine) == 1
    assert (mine[0]["scope"], mine[0]["level"], mine[0]["backend"]) == ("ip", 1, "redis")
    assert 0 < int(mine[0]["remaining_seconds"]) <= 30

    lifted = gateway.post(
        "/api/admin/blocks:lift", json={"scope": "ip", "subject": ip}, headers=operator
    )
    assert lifted.status_code == 200, lifted.text
    assert lifted.json() == {"lifted": True}
    assert gateway.get("/api/quota", headers=as_client(ip)).status_code == 200
    listed = gateway.get("/api/admin/blocks", headers=operator)
    assert ip not in {b["subject"] for b in listed.json()["blocks"]}
    events = await wait_for_rows(
        database_url,
        "SELECT details FROM security_events WHERE event_type = 'rate_limit_block_lifted'"
        " AND details->>'subject' = $1 AND created_at >= $2",
        ip,
        since,
    )
    assert len(events) == 1


def test_the_block_admin_needs_the_credential(gateway: httpx.Client) -> None:
    operator = as_client(fresh_ipv4())
    missing = gateway.get("/api/admin/blocks", headers=operator)
    assert missing.status_code == 401
    wrong = gateway.post(
        "/api/admin/blocks:lift",
        json={"scope": "ip", "subject": "192.0.2.1"},
        headers={**operator, "x-admin-token": "guess"},
    )
    assert wrong.status_code == 403
    bad = gateway.post(
        "/api/admin/blocks:lift",
        json={"scope": "galaxy", "subject": "x"},
        headers={**operator, "x-admin-token": ADMIN_TOKEN},
    )
    assert bad.status_code == 400
    assert "scope" in bad.text


# -- quotas --------------------------------------------------------------------------------------


def test_two_ipv6_addresses_in_one_64_share_a_guest_quota(gateway: httpx.Client) -> None:
    network = fresh_ipv6_network()

    def generate(host: str) -> httpx.Response:
        return gateway.post(
            "/api/generate",
            json={"text": f"hello {uuid.uuid4()}"},
            headers=as_client(f"{network}:{host}"),
        )

    assert generate(":1").status_code == 200
    assert generate("abcd:ef01:2345:6789").status_code == 200
    exhausted = generate("ffff:ffff:ffff:fffe")
    assert exhausted.status_code == 429
    assert reason(exhausted) == "QUOTA_EXHAUSTED"  # the daily quota, not a rate limit
    seen = gateway.get("/api/quota", headers=as_client(f"{network}::9")).json()
    assert (seen["used"], seen["remaining"]) == (GUEST_DAILY_LIMIT, 0)
    neighbour = gateway.get("/api/quota", headers=as_client(f"{fresh_ipv6_network()}::1")).json()
    assert neighbour["used"] == 0


async def test_unsettled_reservations_expire_and_give_their_unit_back(
    limited_mesh: RunningMesh, gateway: httpx.Client
) -> None:
    """A caller that reserved and crashed: the unit is back after the TTL, for a guest (in
    Redis) and for a signed-in user (in PostgreSQL)."""
    ip = fresh_ipv4()
    user = f"user-{uuid.uuid4()}"
    bearer = {"authorization": f"Bearer {token_for(user)}"}
    async with grpc.aio.insecure_channel(limited_mesh.config.quota_addr) as channel:
        quota = quota_pb2_grpc.QuotaServiceStub(channel)
        for caller in (quota_pb2.Caller(client_ip=ip), quota_pb2.Caller(user_id=user)):
            await quota.ReserveQuota(quota_pb2.ReserveQuotaRequest(caller=caller), timeout=10)
    assert gateway.get("/api/quota", headers=as_client(ip)).json()["used"] == 1
    assert gateway.get("/api/quota", headers=as_client(ip, **bearer)).json()["used"] == 1

    deadline = time.monotonic() + RESERVATION_TTL_SECONDS + 8
    used = {"guest": 1, "user": 1}
    while time.monotonic() < deadline and any(used.values()):
        await asyncio.sleep(0.5)
        used["guest"] = gateway.get("/api/quota", headers=as_client(ip)).json()["used"]
        used["user"] = gateway.get("/api/quota", headers=as_client(ip, **bearer)).json()["used"]
    assert used == {"guest": 0, "user": 0}


# -- failed admin attempts and edge events -----------------------------------------------------


async def test_admin_guessing_is_throttled_then_blocked_and_reported_once(
    gateway: httpx.Client, database_url: str
) -> None:
    """A guesser gets its 401/403s for the first few tries (admin_failures: 5 a minute by
    default), then 429 before the service is asked, then a block; the database gets one
    aggregated event per burst, not a row per guess."""
    ip = fresh_ipv4()
    since = await db_now(database_url)  # other runs may have used this address before
    statuses = [
        gateway.get("/api/admin/blocks", headers=as_client(ip, **{"x-admin-token": f"g{n}"}))
        for n in range(5)
    ]
    assert [r.status_code for r in statuses] == [403] * 5, [r.text for r in statuses]
    refused = gateway.get("/api/admin/blocks", headers=as_client(ip, **{"x-admin-token": "g5"}))
    assert refused.status_code == 429
    assert reason(refused) == "RATE_LIMITED"
    assert metadata(refused)["limit"] == "admin_failures"
    assert int(refused.headers["retry-after"]) > 0
    # Only failures are counted: the right token still works from the same network.
    with_token = gateway.get(
        "/api/admin/blocks", headers=as_client(ip, **{"x-admin-token": ADMIN_TOKEN})
    )
    assert with_token.status_code == 200, with_token.text
    for n in range(BLOCK_AFTER):
        gateway.get("/api/admin/blocks", headers=as_client(ip, **{"x-admin-token": f"h{n}"}))
    blocked = feedback(gateway, ip)
    assert blocked.status_code == 429
    assert metadata(blocked)["limit"] == "block"
    found = await wait_for_rows(
        database_url,
        "SELECT event_type FROM security_events WHERE ip = $1 AND created_at >= $2"
        " ORDER BY created_at",
        ip,
        since,
        count=4,
    )
    kinds = [r["event_type"] for r in found]
    assert kinds.count("admin_auth_failed") == 1, kinds
    assert kinds.count("rate_limit_exceeded") == 1, kinds
    assert kinds.count("rate_limit_block") == 1, kinds
    assert kinds.count("admin_action") == 1, kinds  # the call with the right token
    await asyncio.sleep(1)
    again = await rows(
        database_url, "SELECT 1 FROM security_events WHERE ip = $1 AND created_at >= $2", ip, since
    )
    assert len(again) == len(found)  # 9 failed attempts, 3 rows about them


def test_admin_with_the_role_claim_or_the_token_and_not_with_a_users_token(
    gateway: httpx.Client,
) -> None:
    user = token_for(f"user-{uuid.uuid4()}")
    admin = token_for(f"admin-{uuid.uuid4()}", app_metadata={"role": "admin"})
    cases = [
        ({}, 401),
        ({"authorization": f"Bearer {user}"}, 403),
        ({"authorization": f"Bearer {admin}"}, 200),
        ({"x-admin-token": ADMIN_TOKEN}, 200),
    ]
    for headers, status in cases:
        for path in ("/api/admin/blocks", "/api/admin/health", "/api/admin/cache"):
            # Each from its own network: failed attempts are counted per network.
            r = gateway.get(path, headers=as_client(fresh_ipv4(), **headers))
            assert r.status_code == status, (path, headers, r.text)


async def test_a_burst_of_bad_tokens_becomes_one_edge_security_event(
    gateway: httpx.Client, database_url: str
) -> None:
    """401s never reach a service: Envoy ships them to telemetry's access log service, which
    records one event per burst from a client network (20 in a minute by default)."""
    ip = fresh_ipv4()
    since = await db_now(database_url)  # other runs may have used this address before
    for _ in range(25):
        r = gateway.get("/api/quota", headers=as_client(ip, authorization="Bearer not-a-jwt"))
        assert r.status_code == 401
    found = await wait_for_rows(
        database_url,
        "SELECT event_type, details FROM security_events WHERE ip = $1 AND created_at >= $2",
        ip,
        since,
        timeout=20,
    )
    assert [r["event_type"] for r in found] == ["edge_unauthenticated_burst"]
    await asyncio.sleep(2)  # Envoy flushes its access log every second: nothing more comes
    later = "SELECT 1 FROM security_events WHERE ip = $1 AND created_at >= $2"
    assert len(await rows(database_url, later, ip, since)) == 1
