"""Redis stops under a running mesh (a private Redis this test starts, never the machine's):
every request is still answered, without hanging, with rate limits and guest quotas counted
per replica in memory, and health says degraded (the replicas report their Redis fallback
engaged); when Redis is back the services return to it by themselves, the counts are in Redis
again and health says healthy."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from devstack import infra
from devstack.mesh import Mesh
from tests.e2e.conftest import ADMIN_TOKEN, RunningMesh, SpanCollector, mesh_config

pytestmark = pytest.mark.e2e

COOLDOWN_SECONDS = 1.0
PREFIX = "genmesh-outage:"


@dataclass
class OutageMesh:
    mesh: RunningMesh
    scratch: Path
    redis: infra.Server
    port: int

    def stop_redis(self) -> None:
        self.redis.stop()

    def start_redis(self) -> None:
        restarted = infra.private_redis(self.scratch, port=self.port)
        assert restarted is not None
        self.redis = restarted

    def keys(self, pattern: str) -> list[bytes]:
        client = Redis(port=self.port)
        try:
            return list(client.scan_iter(match=f"{PREFIX}{pattern}"))
        finally:
            client.close()


@pytest.fixture(scope="module")
def outage(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OutageMesh]:
    scratch = tmp_path_factory.mktemp("outage-redis")
    redis = infra.private_redis(scratch)
    if redis is None:
        pytest.fail("this test starts a private Redis: install redis-server")
    port = int(redis.url.rsplit(":", 1)[1].split("/")[0])
    config = mesh_config(
        database_url,
        redis.url,
        PREFIX,
        tmp_path_factory.mktemp("outage-mesh-logs"),
        RATE_LIMIT_FEEDBACK_PER_IP="3/minute",
        GATEWAY_TRUSTED_PROXY_HOPS="1",
        REDIS_TIMEOUT_SECONDS="0.2",
        REDIS_ERROR_THRESHOLD="2",
        REDIS_COOLDOWN_SECONDS=str(COOLDOWN_SECONDS),
    )
    running = Mesh(config)
    state = OutageMesh(RunningMesh(config, SpanCollector()), scratch, redis, port)
    try:
        running.start()
        yield state
    finally:
        running.stop()
        state.redis.stop()


def fresh_ip() -> str:
    value = uuid.uuid4().int
    return f"198.19.{value % 256}.{(value >> 8) % 254 + 1}"


def feedback(http: httpx.Client, ip: str) -> httpx.Response:
    started = time.monotonic()
    r = http.post("/api/feedback", json={"rating": 3}, headers={"x-forwarded-for": ip})
    # Nothing waits on a dead Redis: each call is bounded by REDIS_TIMEOUT_SECONDS.
    assert time.monotonic() - started < 3, r.text
    return r


def health_status(http: httpx.Client) -> str:
    status: str = http.get("/api/health").json()["status"]
    return status


def health_report(http: httpx.Client) -> dict[str, Any]:
    # The full report is the operators' (30 admin calls a minute per client network): each
    # poll comes from a network of its own.
    headers = {"x-admin-token": ADMIN_TOKEN, "x-forwarded-for": fresh_ip()}
    report = http.get("/api/admin/health", headers=headers)
    assert report.status_code == 200, report.text
    body: dict[str, Any] = report.json()
    return body


def redis_health(http: httpx.Client) -> str:
    dependencies = health_report(http)["dependencies"]
    status: str = next(d["status"] for d in dependencies if d["name"] == "redis")
    return status


def redis_fallbacks_engaged(http: httpx.Client) -> set[str]:
    """The services with a replica reporting its Redis fallback engaged."""
    return {
        replica["service"]
        for replica in health_report(http)["replicas"]
        if any(f["name"] == "redis" and f["engaged"] for f in replica["fallbacks"])
    }


def redis_findings(report: dict[str, Any]) -> bool:
    return report["status"] == "degraded" and any(
        "redis fallback engaged" in reason or "circuit breaker redis" in reason
        for reason in report["reasons"]
    )


def wait_for(check: object, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(check) and check():
            return True
        time.sleep(0.3)
    return False


def test_requests_are_answered_through_a_redis_outage_and_return_to_redis(
    outage: OutageMesh,
) -> None:
    with httpx.Client(base_url=outage.mesh.url, timeout=30) as http:
        before = fresh_ip()
        assert feedback(http, before).headers["x-ratelimit-remaining"] == "2"
        assert outage.keys(f"rl:{{ip:{before}}}:*")  # counted in Redis

        outage.stop_redis()
        during = fresh_ip()
        statuses = [feedback(http, during) for _ in range(4)]
        # Limits still hold, per replica, from the in-memory fallback.
        assert [r.status_code for r in statuses] == [200, 200, 200, 429]
        assert [r.headers.get("x-ratelimit-remaining") for r in statuses[:3]] == ["2", "1", "0"]
        quota = http.get("/api/quota", headers={"x-forwarded-for": during})
        assert quota.status_code == 200 and quota.json()["plan"] == "guest"
        generated = http.post(
            "/api/generate",
            json={"text": f"outage {uuid.uuid4()}"},
            headers={"x-forwarded-for": during},
        )
        assert generated.status_code == 200, generated.text
        assert wait_for(lambda: health_status(http) == "degraded")
        assert redis_health(http) == "unhealthy"
        # The replicas say why: a Redis fallback engaged, a Redis breaker open or half-open.
        assert wait_for(lambda: bool(redis_fallbacks_engaged(http)))
        assert wait_for(lambda: redis_findings(health_report(http)))

        outage.start_redis()
        after = fresh_ip()

        def counted_in_redis() -> bool:
            feedback(http, after)
            return bool(outage.keys(f"rl:{{ip:{after}}}:*"))

        assert wait_for(counted_in_redis, timeout=COOLDOWN_SECONDS + 15)
        assert wait_for(lambda: redis_health(http) == "healthy", timeout=20)
        assert wait_for(lambda: health_status(http) == "healthy", timeout=30), health_report(http)[
            "reasons"
        ]
