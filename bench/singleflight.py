"""Single-flight in `make bench`: bursts of concurrent cache misses through Envoy, each burst
either one prompt sent N times (identical: they should share one upstream call) or N
different prompts (each needs its own call), alternated round by round. Reports, per variant,
the median of upstream calls per burst (the simulator's own request counter), of the burst's
wall time, and of the requests' latencies."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.stats import percentile

NOTE = (
    "Single-flight: {rounds} alternating rounds of {burst} concurrent cache misses through "
    "Envoy, identical prompts against distinct ones (upstream latency {latency} ms)"
)
HEADER = (
    f"{'burst of misses':<22} {'upstream calls':>15} {'burst ms':>9} {'p50 ms':>8} "
    f"{'p95 ms':>8} {'errors':>7}"
)


@dataclass
class Variant:
    name: str
    calls: list[int] = field(default_factory=list)
    burst_ms: list[float] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0

    def row(self) -> str:
        lat = self.latencies_ms or [0.0]
        return (
            f"{self.name:<22} {statistics.median(self.calls):>15.0f} "
            f"{statistics.median(self.burst_ms):>9.1f} {statistics.median(lat):>8.1f} "
            f"{percentile(lat, 0.95):>8.1f} {self.errors:>7}"
        )


async def _upstream_requests(client: httpx.AsyncClient, simulator_url: str) -> int:
    reply = await client.get(f"{simulator_url}/_sim/stats")
    return int(reply.json()["requests"])


async def _burst(
    client: httpx.AsyncClient, base_url: str, simulator_url: str, texts: list[str], v: Variant
) -> None:
    before = await _upstream_requests(client, simulator_url)

    async def one(text: str) -> None:
        started = time.perf_counter()
        reply = await client.post(f"{base_url}/api/generate", json={"text": text})
        if reply.status_code == 200:
            v.latencies_ms.append((time.perf_counter() - started) * 1000)
        else:
            v.errors += 1

    began = time.perf_counter()
    await asyncio.gather(*(one(text) for text in texts))
    v.burst_ms.append((time.perf_counter() - began) * 1000)
    v.calls.append(await _upstream_requests(client, simulator_url) - before)


async def measure(base_url: str, simulator_url: str, burst: int, rounds: int) -> list[Variant]:
    identical, distinct = Variant("identical prompts"), Variant("distinct prompts")
    limits = httpx.Limits(max_connections=burst + 2, max_keepalive_connections=burst + 2)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        for _ in range(rounds):
            run = uuid.uuid4().hex[:8]
            same = f"single-flight bench {run}"
            await _burst(client, base_url, simulator_url, [same] * burst, identical)
            texts = [f"single-flight bench {run} {i}" for i in range(burst)]
            await _burst(client, base_url, simulator_url, texts, distinct)
    return [identical, distinct]


def print_single_flight(
    base_url: str, simulator_url: str, burst: int, rounds: int, latency_ms: int
) -> dict[str, Any]:
    """Run and print; return the medians per variant for the results."""
    print(NOTE.format(rounds=rounds, burst=burst, latency=latency_ms))
    print(HEADER)
    print("-" * len(HEADER))
    variants = asyncio.run(measure(base_url, simulator_url, burst, rounds))
    for variant in variants:
        print(variant.row(), flush=True)
    identical, distinct = variants
    saved = statistics.median(distinct.calls) / max(1.0, statistics.median(identical.calls))
    print(f"identical bursts made {saved:.0f}x fewer upstream calls (medians)")
    return {
        "burst": burst,
        "rounds": rounds,
        "variants": {
            v.name: {
                "upstream_calls": statistics.median(v.calls),
                "burst_ms": statistics.median(v.burst_ms),
                "p50_ms": statistics.median(v.latencies_ms or [0.0]),
                "p95_ms": percentile(v.latencies_ms, 0.95),
                "errors": v.errors,
            }
            for v in variants
        },
        "fewer_calls": saved,
    }
