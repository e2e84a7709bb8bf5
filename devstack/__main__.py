"""`make run`: find or start PostgreSQL and Redis, migrate, start the whole mesh, print where
everything is, and stop every process it started on Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from types import FrameType

from devstack import infra
from devstack.mesh import REPO, Mesh, MeshConfig
from services.common.migrations import create_database_if_missing, migrate

SCRATCH = REPO / ".run"


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def main() -> int:
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    started: list[infra.Server] = []
    mesh: Mesh | None = None
    try:
        step("PostgreSQL")
        pg = infra.postgres(SCRATCH / "data")
        started.append(pg)
        database_url = (
            os.environ["DATABASE_URL"]
            if pg.origin == "environment"
            else infra.with_database(pg.url, "genmesh")
        )
        print(f"    {pg.origin}: {database_url}")
        step("Redis")
        rd = infra.redis(SCRATCH / "data")
        if rd is None:
            print(
                "    WARNING: no Redis (REDIS_URL empty, nothing on 127.0.0.1:6379, no "
                "redis-server installed): quotas, rate limits and the cache use the per-process "
                "in-memory fallback. Install redis-server or set REDIS_URL for real counts."
            )
        else:
            started.append(rd)
            print(f"    {rd.origin}: {rd.url}")
        step("Migrations")

        async def prepare() -> list[str]:
            await create_database_if_missing(database_url)
            return await migrate(database_url)

        applied = asyncio.run(prepare())
        print(f"    applied {', '.join(applied)}" if applied else "    up to date")

        config = MeshConfig.from_env(database_url, rd.url if rd else "")
        mesh = Mesh(config)
        step(
            "Starting the simulator, quota, telemetry, generation and Envoy "
            f"(logs in {config.log_dir.relative_to(REPO)})"
        )
        began = time.monotonic()
        mesh.start()
        print_summary(config, time.monotonic() - began)
        stop.wait()
        step("Stopping (Ctrl-C received)")
        return 0
    except infra.InfraError as err:
        print(f"\nERROR: {err}", file=sys.stderr)
        return 1
    finally:
        if mesh is not None:
            mesh.stop()
        for server in reversed(started):
            server.stop()
        if mesh is not None:
            step("Stopped every process genmesh started")


def print_summary(config: MeshConfig, seconds: float) -> None:
    log_dir = config.log_dir
    # The simulator's key is never printed: it is the developer's SIM_API_KEY, or random.
    key = (
        "your SIM_API_KEY"
        if os.environ.get("SIM_API_KEY")
        else "random per run, set SIM_API_KEY to choose it"
    )
    upstream = (
        f"simulator {config.simulator_url}/v1 (key: {key}; OPENAI_API_KEY for the real API)"
        if config.uses_simulator
        else f"OpenAI {config.openai_base_url or 'api.openai.com'}"
    )
    rows = [
        ("REST gateway (Envoy)", config.gateway_url),
        ("Envoy admin (loopback)", f"http://127.0.0.1:{config.gateway_admin_port}"),
        ("Envoy stats", f"http://{config.gateway_host}:{config.gateway_ops_port}/stats/prometheus"),
        ("generation (gRPC)", config.generation_addr),
        ("quota (gRPC)", config.quota_addr),
        ("telemetry (gRPC)", config.telemetry_addr),
        ("metrics", ", ".join(f"{k} :{v}" for k, v in config.metrics_ports.items())),
        ("upstream model", upstream),
        ("logs", f"{log_dir}/*.log"),
    ]
    print(f"\ngenmesh is up in {seconds:.1f}s\n")
    for name, where in rows:
        print(f"  {name:<22} {where}")
    print(
        f"""
Try it:
  curl -s {config.gateway_url}/api/generate -H 'content-type: application/json' \\
       -d '{{"text": "Write a haiku about gRPC", "lang": "en"}}'
  curl -s {config.gateway_url}/api/quota
  curl -s {config.gateway_url}/api/health
  grpcurl -plaintext {config.generation_addr} list

Press Ctrl-C to stop everything.
""",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
