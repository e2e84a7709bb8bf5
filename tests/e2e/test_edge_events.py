"""Bursts of 400s and 413s that Envoy answers itself, through the real mesh: its access log
ships them to telemetry (services/telemetry/access_log.py), which records ONE security event
per burst from a client network (services/telemetry/edge_events.py), never a row per request.
tests/e2e/test_rate_limits.py does the same for 401s.

The mesh here trusts one proxy hop and the test plays that proxy, so each test is a client
network of its own: the session mesh sees every test's traffic from 127.0.0.1, whose windows
other tests' failures would already have opened."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import asyncpg
import httpx
import pytest

from tests.e2e.conftest import UNLIMITED, RunningMesh, mesh_config, running_mesh

pytestmark = pytest.mark.e2e

# Failures from one network within the window that make a burst (EDGE_EVENT_THRESHOLD), set
# here so the test does not depend on the default; the window is the default minute.
THRESHOLD = 10
# Every route but generate takes at most this much body (GATEWAY_MAX_BODY_BYTES, default).
BODY_LIMIT = 64 * 1024
# Envoy's gRPC access log flushes every second; telemetry stores events in the background.
SETTLE_SECONDS = 2.5


@pytest.fixture(scope="module")
def edge_mesh(
    database_url: str,
    redis_url: str,
    redis_prefix: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningMesh]:
    config = mesh_config(
        database_url,
        redis_url,
        f"{redis_prefix}edge-events:",
        tmp_path_factory.mktemp("edge-mesh-logs"),
        GATEWAY_TRUSTED_PROXY_HOPS="1",
        EDGE_EVENT_THRESHOLD=str(THRESHOLD),
        **UNLIMITED,  # no 429 gets in the way of the failures counted here
    )
    with running_mesh(config) as running:
        yield running


@pytest.fixture(scope="module")
def gateway(edge_mesh: RunningMesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=edge_mesh.url, timeout=30) as client:
        yield client


def fresh_ipv4() -> str:
    """A client address no other test or run uses (198.18.0.0/15 is for benchmarks)."""
    value = uuid.uuid4().int
    return f"198.19.{value % 256}.{(value >> 8) % 254 + 1}"


def as_client(ip: str) -> dict[str, str]:
    """What the trusted proxy in front of Envoy sends for a client at `ip`."""
    return {"x-forwarded-for": ip, "content-type": "application/json"}


def oversized(gateway: httpx.Client, ip: str) -> httpx.Response:
    """Feedback one KiB over the body limit: Envoy refuses it with 413 before any service."""
    body = b'{"rating": 4, "comment": "' + b"a" * BODY_LIMIT + b'"}'
    r = gateway.post("/api/feedback", content=body, headers=as_client(ip))
    assert r.status_code == 413, r.text[:300]
    return r


def malformed(gateway: httpx.Client, ip: str) -> httpx.Response:
    """Feedback that is not JSON: Envoy's transcoder refuses it with 400."""
    r = gateway.post("/api/feedback", content=b'{"rating": 4, "comment": ', headers=as_client(ip))
    assert r.status_code == 400, r.text[:300]
    assert r.headers["content-type"].startswith("application/json")
    return r


async def db_now(database_url: str) -> datetime:
    conn = await asyncpg.connect(database_url)
    try:
        now: datetime = await conn.fetchval("SELECT now()")
        return now
    finally:
        await conn.close()


async def events_of(database_url: str, ip: str, since: datetime) -> list[asyncpg.Record]:
    """The security events recorded about `ip` since `since`, oldest first."""
    conn = await asyncpg.connect(database_url)
    try:
        return list(
            await conn.fetch(
                "SELECT event_type, severity, details FROM security_events"
                " WHERE ip = $1 AND created_at >= $2 ORDER BY created_at",
                ip,
                since,
            )
        )
    finally:
        await conn.close()


async def wait_for_events(
    database_url: str, ip: str, since: datetime, count: int, timeout: float = 20
) -> list[asyncpg.Record]:
    """The events about `ip`, once there are `count` of them or at the timeout."""
    deadline = time.monotonic() + timeout
    found: list[asyncpg.Record] = []
    while time.monotonic() < deadline:
        found = await events_of(database_url, ip, since)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.2)
    return found


def details(row: asyncpg.Record) -> dict[str, Any]:
    value = row["details"]
    loaded: dict[str, Any] = json.loads(value) if isinstance(value, str) else dict(value)
    return loaded


async def test_bursts_of_413s_and_400s_from_one_client_are_one_event_each(
    gateway: httpx.Client, database_url: str
) -> None:
    """Twice the threshold and more of each failure, interleaved, from one client: one
    `edge_oversized_request_burst` and one `edge_bad_request_burst`, and nothing else."""
    ip = fresh_ipv4()
    since = await db_now(database_url)
    sent = 2 * THRESHOLD + 5
    for _ in range(sent):
        oversized(gateway, ip)
        malformed(gateway, ip)

    found = await wait_for_events(database_url, ip, since, count=2)
    assert sorted(r["event_type"] for r in found) == [
        "edge_bad_request_burst",
        "edge_oversized_request_burst",
    ], [r["event_type"] for r in found]
    by_type = {r["event_type"]: r for r in found}
    for event_type, status in (
        ("edge_oversized_request_burst", "413"),
        ("edge_bad_request_burst", "400"),
    ):
        row = by_type[event_type]
        assert row["severity"] == "medium"
        info = details(row)
        assert info["source"] == "gateway"
        assert info["status"] == status
        # Reported when the count reached the threshold; the rest of the window adds nothing.
        assert info["count"] == str(THRESHOLD)
        assert info["sample_paths"] == "/api/feedback"
    # Envoy flushes its access log every second: more than the threshold again went after the
    # event, and none of it makes another row.
    await asyncio.sleep(SETTLE_SECONDS)
    assert len(await events_of(database_url, ip, since)) == 2


async def test_fewer_failures_than_the_threshold_are_no_event(
    gateway: httpx.Client, database_url: str
) -> None:
    """Just under the threshold of each is no burst; the next failure completes it."""
    ip = fresh_ipv4()
    since = await db_now(database_url)
    for _ in range(THRESHOLD - 1):
        oversized(gateway, ip)
        malformed(gateway, ip)
    await asyncio.sleep(SETTLE_SECONDS)
    assert await events_of(database_url, ip, since) == []
    # One more of each: the burst is complete, so the count above was not lost on the way.
    oversized(gateway, ip)
    malformed(gateway, ip)
    found = await wait_for_events(database_url, ip, since, count=2)
    assert sorted(r["event_type"] for r in found) == [
        "edge_bad_request_burst",
        "edge_oversized_request_burst",
    ]
