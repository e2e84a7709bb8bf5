"""The REST scenarios of `make bench`: bounded request counts through Envoy with an async
httpx client, reported as throughput and latency percentiles per scenario."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from bench.stats import distribution, percentile
from bench.wrk import LATENCY_POINTS

HEADER = (
    f"{'scenario':<28} {'ok':>6} {'errors':>6} {'req/s':>9} "
    f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
)


@dataclass
class Result:
    name: str
    latencies_ms: list[float]
    errors: int
    seconds: float

    def row(self) -> str:
        lat = self.latencies_ms or [0.0]
        rps = len(self.latencies_ms) / self.seconds if self.seconds else 0.0
        return (
            f"{self.name:<28} {len(self.latencies_ms):>6} {self.errors:>6} {rps:>9.1f} "
            f"{statistics.median(lat):>8.1f} {percentile(lat, 0.95):>8.1f} "
            f"{percentile(lat, 0.99):>8.1f}"
        )

    def figures(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {
            "ok": len(lat),
            "errors": self.errors,
            "rps": len(lat) / self.seconds if self.seconds else 0.0,
            "p50_ms": percentile(lat, 0.50),
            "p95_ms": percentile(lat, 0.95),
            "p99_ms": percentile(lat, 0.99),
            "distribution_ms": distribution(lat, LATENCY_POINTS),
        }


Request = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


async def run_scenario(
    base_url: str, name: str, make: Request, requests: int, concurrency: int
) -> Result:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors
            for i in counter:
                started = time.perf_counter()
                try:
                    r = await make(client, i)
                    ok = r.status_code < 400
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    errors += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return Result(name, latencies, errors, time.perf_counter() - began)


def scenarios(requests: int) -> list[tuple[str, Request, int]]:
    run = uuid.uuid4().hex[:8]

    def events(i: int) -> dict[str, object]:
        return {
            "events": [
                {"event_id": str(uuid.uuid4()), "event": "page_view", "session_id": f"s{i}"}
                for _ in range(10)
            ]
        }

    return [
        ("GET /api/health", lambda c, i: c.get("/api/health"), requests // 4),
        ("GET /api/quota", lambda c, i: c.get("/api/quota"), requests),
        (
            "POST /api/generate (miss)",
            lambda c, i: c.post("/api/generate", json={"text": f"bench {run} {i}"}),
            requests,
        ),
        (
            "POST /api/generate (hit)",
            lambda c, i: c.post("/api/generate", json={"text": f"bench {run} {i % 10}"}),
            requests,
        ),
        (
            "POST /api/feedback",
            lambda c, i: c.post("/api/feedback", json={"rating": 1 + i % 5, "comment": "bench"}),
            requests,
        ),
        ("POST /api/events (10/req)", lambda c, i: c.post("/api/events", json=events(i)), requests),
    ]


def print_scenarios(base_url: str, requests: int, concurrency: int) -> dict[str, Any]:
    """Run and print every scenario; return their figures for the results."""
    print(
        f"REST scenarios through the mesh's Envoy: an httpx client (Python: it is the limit of "
        f"the faster routes), {requests} requests per scenario, concurrency {concurrency}"
    )
    print(HEADER)
    print("-" * len(HEADER))
    figures: dict[str, Any] = {}
    for name, make, count in scenarios(requests):
        result = asyncio.run(run_scenario(base_url, name, make, count, concurrency))
        print(result.row(), flush=True)
        figures[name] = result.figures()
    return {"requests": requests, "concurrency": concurrency, "scenarios": figures}
