"""Generation's deadline and cancellation through Envoy: the gateway's route timeout reaches
the service as its gRPC deadline and bounds the upstream call, and a client that hangs up
cancels the upstream request and gets its quota unit back. A mesh of its own, with a 2 s
generate timeout, so the simulator's faults touch no other test."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import UNLIMITED, RunningMesh, mesh_config, running_mesh
from tests.e2e.helpers import reason

pytestmark = pytest.mark.e2e

ROUTE_TIMEOUT_SECONDS = 2


@pytest.fixture(scope="module")
def short_mesh(
    database_url: str,
    redis_url: str,
    redis_prefix: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningMesh]:
    config = mesh_config(
        database_url,
        redis_url,
        f"{redis_prefix}deadline-{uuid.uuid4().hex[:8]}:",
        tmp_path_factory.mktemp("deadline-mesh-logs"),
        GATEWAY_GENERATE_TIMEOUT_SECONDS=str(ROUTE_TIMEOUT_SECONDS),
        OPENAI_TIMEOUT_SECONDS="30",
        GUEST_DAILY_LIMIT="100000",
        **UNLIMITED,
    )
    with running_mesh(config) as running:
        yield running


def sim(mesh: RunningMesh, method: str, path: str, **kwargs: Any) -> Any:
    response = httpx.request(method, f"{mesh.config.simulator_url}{path}", timeout=5, **kwargs)
    response.raise_for_status()
    return response.json()


def fresh_ip() -> str:
    """A guest no earlier run has used (the database keeps quota rows across runs)."""
    value = uuid.uuid4().int
    return f"198.18.{value % 256}.{(value >> 8) % 254 + 1}"


def guest(ip: str) -> dict[str, str]:
    return {"x-forwarded-for": ip}


def used(mesh: RunningMesh, ip: str) -> int:
    reply = httpx.get(f"{mesh.url}/api/quota", headers=guest(ip), timeout=5)
    return int(reply.json()["used"])


def wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_hanging_upstream_is_cut_at_the_route_timeout(short_mesh: RunningMesh) -> None:
    ip = fresh_ip()
    sim(short_mesh, "POST", "/_sim/faults", json={"hang": True})
    try:
        cancelled = sim(short_mesh, "GET", "/_sim/stats")["cancelled"]
        started = time.monotonic()
        reply = httpx.post(
            f"{short_mesh.url}/api/generate",
            json={"text": f"hello {uuid.uuid4()}"},
            headers=guest(ip),
            timeout=30,
        )
        elapsed = time.monotonic() - started
        # The service's own verdict, just before the deadline Envoy gave it.
        assert reply.status_code == 504, reply.text
        assert reason(reply) == "UPSTREAM_TIMEOUT"
        assert ROUTE_TIMEOUT_SECONDS - 0.6 <= elapsed <= ROUTE_TIMEOUT_SECONDS + 0.5
        wait_for(lambda: sim(short_mesh, "GET", "/_sim/stats")["cancelled"] == cancelled + 1)
        assert used(short_mesh, ip) == 0
    finally:
        sim(short_mesh, "DELETE", "/_sim/faults")


@pytest.mark.parametrize("path", ["/api/generate", "/api/generate:stream"])
def test_a_client_that_hangs_up_cancels_the_upstream_call_and_is_refunded(
    short_mesh: RunningMesh, path: str
) -> None:
    ip = fresh_ip()
    sim(short_mesh, "POST", "/_sim/faults", json={"latency_ms": 10_000})
    try:
        cancelled = sim(short_mesh, "GET", "/_sim/stats")["cancelled"]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{short_mesh.url}{path}",
                json={"text": f"hello {uuid.uuid4()}"},
                headers=guest(ip),
                timeout=httpx.Timeout(5, read=0.8),
            )
        wait_for(lambda: sim(short_mesh, "GET", "/_sim/stats")["cancelled"] == cancelled + 1)
        wait_for(lambda: used(short_mesh, ip) == 0)
        assert sim(short_mesh, "GET", "/_sim/stats")["in_flight"] == 0
    finally:
        sim(short_mesh, "DELETE", "/_sim/faults")
