"""`make bench`: start a private mesh (own database, own Redis prefix, free ports, the
simulator as upstream) and print, from one run:

1. the REST scenarios: bounded request counts through Envoy on 127.0.0.1, throughput and
   latency percentiles per scenario (bench/scenarios.py);
2. rate-limit decisions per second of one quota process, over gRPC (bench/ratelimit.py);
3. the cost of the rate limits on the cache-hit generate path: the mesh's Envoy (limits on)
   against a second Envoy with GATEWAY_RATE_LIMIT=false, driven alternately with wrk, with
   each process's CPU time per request (bench/ratelimit.py; skipped without wrk);
4. single-flight: bursts of identical cache misses against bursts of distinct ones, upstream
   calls and latency per burst (bench/singleflight.py);
5. funnel events: committed events per second through POST /api/events via Envoy (wrk,
   batches of 50 new events) against the same events INSERTed into PostgreSQL one per
   statement, alternately, with their ratio and the goals (bench/events.py; skipped without
   wrk).

Every rate limit is raised so that no bench request is refused.

Settings: BENCH_REQUESTS (per scenario, default 400), BENCH_CONCURRENCY (default 16),
BENCH_SIM_LATENCY_MS (upstream latency the simulator adds, default 50), BENCH_RLS_SECONDS
(each decisions run, default 4), BENCH_WRK_SECONDS (each wrk run, default 8),
BENCH_BURST (concurrent misses per single-flight burst, default 16), BENCH_BURST_ROUNDS
(default 5), BENCH_EVENTS_SECONDS (each funnel-events run, default 8)."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import uuid
from pathlib import Path

from bench import events, ratelimit, wrk
from bench.envoy import Gateway, extra_gateway
from bench.scenarios import print_scenarios
from bench.singleflight import print_single_flight
from devstack import infra
from devstack.mesh import Mesh, MeshConfig
from services.common.migrations import create_database_if_missing, migrate

REQUESTS = int(os.environ.get("BENCH_REQUESTS", "400"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "16"))
SIM_LATENCY_MS = int(os.environ.get("BENCH_SIM_LATENCY_MS", "50"))
RLS_SECONDS = float(os.environ.get("BENCH_RLS_SECONDS", "4"))
WRK_SECONDS = float(os.environ.get("BENCH_WRK_SECONDS", "8"))
BURST = int(os.environ.get("BENCH_BURST", "16"))
BURST_ROUNDS = int(os.environ.get("BENCH_BURST_ROUNDS", "5"))
EVENTS_SECONDS = float(os.environ.get("BENCH_EVENTS_SECONDS", "8"))
# Alternating runs per variant: the medians of 3 resist one disturbed run.
ROUNDS = 3
RLS_WARMUP_SECONDS = 1.0
WRK_WARMUP_SECONDS = 2.0
# Daily guest quota: every generate request, cache hits included, reserves a unit, and the
# wrk runs send tens of thousands from 127.0.0.1.
GUEST_DAILY_LIMIT = 1_000_000_000


async def prepare_database(server_url: str, name: str) -> str:
    url = infra.with_database(server_url, name)
    await create_database_if_missing(url)
    await migrate(url)
    return url


def pid_of(mesh: Mesh, name: str) -> int:
    return next(child.process.pid for child in mesh.children if child.name == name)


def bench_rate_limits(mesh: Mesh, redis: infra.Server | None, scratch: Path) -> None:
    config = mesh.config
    print(ratelimit.NOTE.format(cores=os.cpu_count()))
    print()
    runs = asyncio.run(
        ratelimit.measure_decisions(
            config.quota_addr, pid_of(mesh, "quota"), ROUNDS, RLS_SECONDS, RLS_WARMUP_SECONDS
        )
    )
    ratelimit.print_decisions(runs, RLS_SECONDS)
    print()

    wrk_binary = wrk.binary()
    if wrk_binary is None:
        print(wrk.INSTALL_HINT)
        return
    on = Gateway(
        "limits on",
        config.gateway_url,
        f"http://127.0.0.1:{config.gateway_admin_port}",
        pid_of(mesh, "envoy"),
    )
    services = {name: pid_of(mesh, name) for name in ("quota", "generation")}
    if redis is not None and redis.process is not None:
        # Only a Redis we started: a shared one's CPU would include other people's traffic.
        services["redis"] = redis.process.pid
    overrides = {"GATEWAY_RATE_LIMIT": "false"}
    with extra_gateway(mesh, "limits off", overrides) as off:
        report = ratelimit.measure_cost(
            wrk_binary,
            on,
            off,
            services,
            scratch,
            ROUNDS,
            WRK_SECONDS,
            WRK_WARMUP_SECONDS,
        )
    ratelimit.print_cost(report)


def bench_events(mesh: Mesh, scratch: Path) -> None:
    wrk_binary = wrk.binary()
    if wrk_binary is None:
        print(
            "Funnel events: skipped, wrk is not installed (apt-get install wrk, brew install wrk)"
        )
        return
    config = mesh.config
    services = {name: pid_of(mesh, name) for name in ("envoy", "quota", "telemetry")}
    report = asyncio.run(
        events.measure(
            wrk_binary,
            config.gateway_url,
            config.database_url,
            services,
            scratch,
            ROUNDS,
            EVENTS_SECONDS,
            WRK_WARMUP_SECONDS,
        )
    )
    events.print_events(report, os.cpu_count())


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
            gateway_ops_port=infra.free_port(),
            simulator_port=infra.free_port(),
            metrics_ports={"generation": 0, "quota": 0, "telemetry": 0},
            log_dir=scratch / "logs",
            extra_env={
                "GUEST_DAILY_LIMIT": str(GUEST_DAILY_LIMIT),
                # wrk keeps WRK_CONNECTIONS generations in flight; none may be shed (503).
                "GEN_MAX_INFLIGHT": str(max(25, CONCURRENCY * 2, ratelimit.WRK_CONNECTIONS * 2)),
                "SIM_LATENCY_MS": str(SIM_LATENCY_MS),
                "SIM_STREAM_CHUNK_DELAY_MS": "0",
                "LOG_LEVEL": "WARNING",
                # The mesh's Envoy asks for rate-limit decisions whatever the caller's
                # environment says; the second Envoy turns them off.
                "GATEWAY_RATE_LIMIT": "true",
                **ratelimit.raised_limits_env(),
            },
        )
        print(f"==> starting a private mesh (logs in {config.log_dir})", flush=True)
        mesh = Mesh(config)
        mesh.start()
        print(
            f"==> {REQUESTS} requests per scenario, concurrency {CONCURRENCY}, "
            f"simulated upstream latency {SIM_LATENCY_MS} ms, {os.cpu_count()} cores, "
            f"every rate limit raised to {ratelimit.RAISED_LIMIT}\n"
        )
        print_scenarios(config.gateway_url, REQUESTS, CONCURRENCY)
        print()
        bench_rate_limits(mesh, rd, scratch)
        print()
        print_single_flight(
            config.gateway_url, config.simulator_url, BURST, BURST_ROUNDS, SIM_LATENCY_MS
        )
        print()
        bench_events(mesh, scratch)
        return 0
    except (infra.InfraError, ratelimit.BenchError, wrk.WrkError) as err:
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
