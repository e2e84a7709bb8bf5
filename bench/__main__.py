"""`make bench`: start a private mesh (own database, own Redis prefix, free ports, the
simulator as upstream) and drive the REST surface through Envoy on 127.0.0.1 with bounded
request counts, then print throughput and latency percentiles per scenario.

Settings: BENCH_REQUESTS (per scenario, default 400), BENCH_CONCURRENCY (default 16),
BENCH_SIM_LATENCY_MS (upstream latency the simulator adds, default 50)."""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from devstack import infra
from devstack.mesh import Mesh, MeshConfig
from services.common.migrations import create_database_if_missing, migrate

REQUESTS = int(os.environ.get("BENCH_REQUESTS", "400"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "16"))
SIM_LATENCY_MS = int(os.environ.get("BENCH_SIM_LATENCY_MS", "50"))


@dataclass
class Result:
    name: str
    latencies_ms: list[float]
    errors: int
    seconds: float

    def row(self) -> str:
        lat = sorted(self.latencies_ms) or [0.0]

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))]

        rps = len(self.latencies_ms) / self.seconds if self.seconds else 0.0
        return (
            f"{self.name:<28} {len(self.latencies_ms):>6} {self.errors:>6} {rps:>9.1f} "
            f"{statistics.median(lat):>8.1f} {pct(0.95):>8.1f} {pct(0.99):>8.1f}"
        )


Request = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


async def run_scenario(base_url: str, name: str, make: Request, requests: int) -> Result:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)

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
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return Result(name, latencies, errors, time.perf_counter() - began)


def scenarios() -> list[tuple[str, Request, int]]:
    run = uuid.uuid4().hex[:8]

    def events(i: int) -> dict[str, object]:
        return {
            "events": [
                {"event_id": str(uuid.uuid4()), "event": "page_view", "session_id": f"s{i}"}
                for _ in range(10)
            ]
        }

    return [
        ("GET /api/health", lambda c, i: c.get("/api/health"), REQUESTS // 4),
        ("GET /api/quota", lambda c, i: c.get("/api/quota"), REQUESTS),
        (
            "POST /api/generate (miss)",
            lambda c, i: c.post("/api/generate", json={"text": f"bench {run} {i}"}),
            REQUESTS,
        ),
        (
            "POST /api/generate (hit)",
            lambda c, i: c.post("/api/generate", json={"text": f"bench {run} {i % 10}"}),
            REQUESTS,
        ),
        (
            "POST /api/feedback",
            lambda c, i: c.post("/api/feedback", json={"rating": 1 + i % 5, "comment": "bench"}),
            REQUESTS,
        ),
        ("POST /api/events (10/req)", lambda c, i: c.post("/api/events", json=events(i)), REQUESTS),
    ]


async def prepare_database(server_url: str, name: str) -> str:
    url = infra.with_database(server_url, name)
    await create_database_if_missing(url)
    await migrate(url)
    return url


def main() -> int:
    scratch = Path(tempfile.mkdtemp(prefix="genmesh-bench-"))
    pg = infra.postgres(scratch)
    rd = infra.redis(scratch)
    db_name = f"genmesh_bench_{uuid.uuid4().hex[:8]}"
    key_prefix = f"genmesh-bench-{uuid.uuid4().hex[:8]}:"
    mesh: Mesh | None = None
    try:
        database_url = asyncio.run(prepare_database(pg.url, db_name))
        config = MeshConfig(
            database_url=database_url,
            redis_url=rd.url if rd else "",
            redis_key_prefix=key_prefix,
            generation_addr=f"127.0.0.1:{infra.free_port()}",
            quota_addr=f"127.0.0.1:{infra.free_port()}",
            telemetry_addr=f"127.0.0.1:{infra.free_port()}",
            gateway_port=infra.free_port(),
            gateway_admin_port=infra.free_port(),
            simulator_port=infra.free_port(),
            metrics_ports={"generation": 0, "quota": 0, "telemetry": 0},
            log_dir=scratch / "logs",
            extra_env={
                "GUEST_DAILY_LIMIT": str(REQUESTS * 10),
                "GEN_MAX_INFLIGHT": str(max(25, CONCURRENCY * 2)),
                "SIM_LATENCY_MS": str(SIM_LATENCY_MS),
                "SIM_STREAM_CHUNK_DELAY_MS": "0",
                "LOG_LEVEL": "WARNING",
            },
        )
        print(f"==> starting a private mesh (logs in {config.log_dir})", flush=True)
        mesh = Mesh(config)
        mesh.start()
        print(
            f"==> {REQUESTS} requests per scenario, concurrency {CONCURRENCY}, "
            f"simulated upstream latency {SIM_LATENCY_MS} ms, {os.cpu_count()} cores\n"
        )
        header = (
            f"{'scenario':<28} {'ok':>6} {'errors':>6} {'req/s':>9} "
            f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
        )
        print(header)
        print("-" * len(header))
        for name, make, count in scenarios():
            result = asyncio.run(run_scenario(config.gateway_url, name, make, count))
            print(result.row(), flush=True)
        return 0
    except infra.InfraError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    finally:
        if mesh is not None:
            mesh.stop()
        asyncio.run(infra.drop_database(pg.url, db_name))
        if rd is not None:
            asyncio.run(infra.delete_keys(rd.url, key_prefix))
            rd.stop()
        pg.stop()


if __name__ == "__main__":
    sys.exit(main())
