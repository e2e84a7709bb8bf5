"""`make run`: find or start PostgreSQL and Redis, migrate, start the whole mesh, print where
everything is, and stop every process it started on Ctrl-C, SIGTERM or SIGHUP (its terminal
closing). Should it die without that chance (SIGKILL), every child gets a signal as it dies
(infra.die_with_parent) and stops too."""

from __future__ import annotations

import asyncio
import contextlib
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


# What stops the runner (gracefully: every child stopped in order). SIGHUP: the terminal that
# runs `make run` was closed.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def step(message: str) -> None:
    say(f"==> {message}")


def say(message: str) -> None:
    """Print, unless the terminal is gone (SIGHUP): stopping the children must not fail on it."""
    with contextlib.suppress(OSError, ValueError):
        print(message, flush=True)


def main() -> int:
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)

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
        say(f"    {pg.origin}: {database_url}")
        step("Redis")
        rd = infra.redis(SCRATCH / "data")
        if rd is None:
            say(
                "    WARNING: no Redis (REDIS_URL empty, nothing on 127.0.0.1:6379, no "
                "redis-server installed): quotas, rate limits and the cache use the per-process "
                "in-memory fallback. Install redis-server or set REDIS_URL for real counts."
            )
        else:
            started.append(rd)
            say(f"    {rd.origin}: {rd.url}")
        step("Migrations")

        async def prepare() -> list[str]:
            await create_database_if_missing(database_url)
            return await migrate(database_url)

        applied = asyncio.run(prepare())
        say(f"    applied {', '.join(applied)}" if applied else "    up to date")

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
        step(f"Stopping ({signal.Signals(received[0]).name} received)")
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
    say(f"\ngenmesh is up in {seconds:.1f}s\n")
    for name, where in rows:
        say(f"  {name:<22} {where}")
    say(
        f"""
Try it:
  curl -s {config.gateway_url}/api/generate -H 'content-type: application/json' \\
       -d '{{"text": "Write a haiku about gRPC", "lang": "en"}}'
  curl -s {config.gateway_url}/api/quota
  curl -s {config.gateway_url}/api/health
  grpcurl -plaintext {config.generation_addr} list

Press Ctrl-C to stop everything.
"""
    )


if __name__ == "__main__":
    sys.exit(main())
