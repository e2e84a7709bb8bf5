"""What `make bench` and `make soak` measure, started for the run and stopped after it: a
private mesh (its own PostgreSQL database, its own Redis key prefix, free ports, the simulator
as the upstream) and, for the ceiling, the echo service behind the bench's Envoy.

The services run with their deployed defaults (LOG_LEVEL=INFO, GEN_MAX_INFLIGHT=25: see
deploy/k8s/base) except where the bench must differ: every rate limit and the guests' daily
quota are raised, since all bench traffic comes from one client (127.0.0.1); the simulator
answers after a fixed BENCH_SIM_LATENCY_MS.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.children import Process, spawn_python, wait_grpc_serving
from bench.gateway import BenchGateway
from devstack import infra
from devstack.limits import raised_limits_env
from devstack.mesh import Mesh, MeshConfig
from services.common.migrations import create_database_if_missing, migrate

# Daily guest quota: every generate request, cache hits included, reserves a unit, and the
# load generator sends hundreds of thousands from 127.0.0.1.
GUEST_DAILY_LIMIT = 1_000_000_000
# The services of the memory goal (each one's RSS at most 120 MB).
SERVICES = ("generation", "quota", "telemetry")


@dataclass
class Stack:
    mesh: Mesh
    scratch: Path
    redis: infra.Server | None
    echo: Process | None = None
    gateway: BenchGateway | None = None
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def config(self) -> MeshConfig:
        return self.mesh.config

    def pid(self, name: str) -> int:
        if name in self.extra:
            return self.extra[name]
        return next(c.process.pid for c in self.mesh.children if c.name == name)

    def processes(self) -> dict[str, int]:
        """Every process of the run by name: the mesh's children, then the bench's own (the
        echo service, the bench's Envoy) and Redis when this run started it."""
        found = {child.name: child.process.pid for child in self.mesh.children}
        if self.echo is not None:
            found["echo"] = self.echo.pid
        if self.gateway is not None:
            found["envoy-bench"] = self.gateway.pid
        if self.redis is not None and self.redis.process is not None:
            # Only a Redis we started: a shared one's figures include other people's work.
            found["redis"] = self.redis.process.pid
        return found


async def _prepare_database(server_url: str, name: str) -> str:
    url = infra.with_database(server_url, name)
    await create_database_if_missing(url)
    await migrate(url)
    return url


def mesh_env(
    sim_latency_ms: int, gen_max_inflight: str | None, log_level: str | None
) -> dict[str, str]:
    env = {
        "GUEST_DAILY_LIMIT": str(GUEST_DAILY_LIMIT),
        "SIM_LATENCY_MS": str(sim_latency_ms),
        "SIM_STREAM_CHUNK_DELAY_MS": "0",
        # The mesh's Envoy asks for rate-limit decisions whatever the caller's environment
        # says (bench/limits_cost.py starts a second Envoy without).
        "GATEWAY_RATE_LIMIT": "true",
        **raised_limits_env(),
    }
    if gen_max_inflight is not None:
        env["GEN_MAX_INFLIGHT"] = gen_max_inflight
    if log_level is not None:
        env["LOG_LEVEL"] = log_level
    return env


@contextlib.contextmanager
def private_stack(extra_env: dict[str, str], *, with_echo: bool) -> Iterator[Stack]:
    """The mesh started and routing (and the echo service behind the bench's Envoy when
    `with_echo`); everything stopped, the database dropped and the Redis keys deleted when the
    block ends, however it ends. The scratch folder (logs, rendered configs) is removed after
    a run that finished, unless BENCH_KEEP_LOGS=1; after a failure it is kept."""
    scratch = Path(tempfile.mkdtemp(prefix="genmesh-bench-"))
    pg = infra.postgres(scratch)
    rd = infra.redis(scratch)
    db_name = f"genmesh_bench_{uuid.uuid4().hex[:8]}"
    key_prefix = f"genmesh-bench-{uuid.uuid4().hex[:8]}:"
    mesh: Mesh | None = None
    stack: Stack | None = None
    finished = False
    try:
        database_url = asyncio.run(_prepare_database(pg.url, db_name))
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
            extra_env=extra_env,
        )
        print("==> starting a private mesh", flush=True)
        mesh = Mesh(config)
        mesh.start()
        stack = Stack(mesh, scratch, rd)
        if with_echo:
            echo_addr = f"127.0.0.1:{infra.free_port()}"
            stack.echo = spawn_python(
                "echo", ["-m", "bench.echo_server", echo_addr], os.environ, config.log_dir
            )
            wait_grpc_serving(stack.echo, echo_addr)
            stack.gateway = BenchGateway(config, echo_addr, scratch, {})
        yield stack
        finished = True
    finally:
        if stack is not None and stack.gateway is not None:
            stack.gateway.stop()
        if stack is not None and stack.echo is not None:
            stack.echo.stop()
        if mesh is not None:
            mesh.stop()
        asyncio.run(infra.drop_database(pg.url, db_name))
        if rd is not None:
            asyncio.run(infra.delete_keys(rd.url, key_prefix))
            rd.stop()
        pg.stop()
        if finished and os.environ.get("BENCH_KEEP_LOGS", "").lower() not in ("1", "true"):
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"==> logs kept in {scratch / 'logs'}", flush=True)
