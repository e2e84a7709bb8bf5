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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.children import Process, spawn_python, wait_grpc_serving
from bench.floor import Floor, start_floor
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
    # The shape's floor (bench/floor.py), when the run asks for it and has a Redis.
    floor: Floor | None = None
    extra: dict[str, int] = field(default_factory=dict)
    # The figures of the sections run so far, by section name (a later section may quote an
    # earlier one's, e.g. validation the ceiling's CPU per cache hit).
    figures: dict[str, Any] = field(default_factory=dict)

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
        if self.floor is not None:
            found.update(self.floor.processes())
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
def private_stack(
    extra_env: dict[str, str], *, with_echo: bool, with_floor: bool = False
) -> Iterator[Stack]:
    """The mesh started and routing (and the echo service behind the bench's Envoy when
    `with_echo`, the shape's floor when `with_floor` and the run has a Redis); everything
    stopped, the database dropped and the Redis keys deleted when the block ends, however it
    ends. The scratch folder (logs, rendered configs) is removed after
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
        if with_floor and config.redis_url:
            stack.floor = start_floor(config, scratch)
        yield stack
        finished = True
    finally:
        if stack is not None and stack.floor is not None:
            stack.floor.stop()
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


# The order devstack's Mesh starts the services in (generation needs the others' addresses,
# not their being up, but this order is the one `make run` logs).
START_ORDER = ("quota", "telemetry", "generation")


def replica_name(service: str, index: int) -> str:
    """The name (and log file) of the `index`th (from 1) process of `service` in a
    replica_mesh."""
    return f"{service}-{index}"


@contextlib.contextmanager
def replica_mesh(
    stack: Stack,
    replicas: Mapping[str, int],
    gateway_overrides: Mapping[str, str],
    tag: str,
    service_env: Mapping[str, str] | None = None,
) -> Iterator[Mesh]:
    """Another mesh beside the stack's, sharing its PostgreSQL server and Redis (with a
    database and a key prefix of its own), its services' environment, and running
    `replicas[service]` processes of each service (1 for those not listed), each on a port of
    its own: the service's *_ADDR is the comma-separated list, which Envoy's cluster and the
    services' gRPC channels (round_robin over an `ipv4:` target) balance over, as they would
    over a headless Service's pods. Its Envoy runs with `gateway_overrides` (e.g.
    GATEWAY_CONCURRENCY) on top of that environment and routes to every replica when the block
    starts; `service_env` is added to every process's environment (e.g. tracing settings).
    The processes are the mesh's children, named by `replica_name` (the Envoy "envoy");
    everything is stopped, the database dropped and the keys deleted when the block
    ends, however it ends. The logs go to the stack's scratch folder, under `tag`."""
    counts = {service: replicas.get(service, 1) for service in START_ORDER}
    if min(counts.values()) < 1:
        raise ValueError(f"every service needs at least one process: {counts}")
    base = stack.config
    db_name = f"genmesh_bench_{uuid.uuid4().hex[:8]}"
    key_prefix = f"genmesh-bench-{uuid.uuid4().hex[:8]}:"
    addrs = {
        service: [f"127.0.0.1:{infra.free_port()}" for _ in range(count)]
        for service, count in counts.items()
    }
    mesh: Mesh | None = None
    try:
        # The stack's database URL names its server: with_database swaps the database.
        database_url = asyncio.run(_prepare_database(base.database_url, db_name))
        config = MeshConfig(
            database_url=database_url,
            redis_url=base.redis_url,
            redis_key_prefix=key_prefix,
            generation_addr=",".join(addrs["generation"]),
            quota_addr=",".join(addrs["quota"]),
            telemetry_addr=",".join(addrs["telemetry"]),
            gateway_port=infra.free_port(),
            gateway_admin_port=infra.free_port(),
            gateway_ops_port=infra.free_port(),
            simulator_port=infra.free_port(),
            metrics_ports={"generation": 0, "quota": 0, "telemetry": 0},
            log_dir=stack.scratch / tag / "logs",
            extra_env={**base.extra_env, **(service_env or {})},
        )
        mesh = Mesh(config)
        if config.uses_simulator:
            mesh.start_simulator()
        for service in START_ORDER:
            # Every replica at once, then wait for each (replicas do not need each other).
            started = [
                (mesh.spawn_service(service, addr, replica_name(service, i)), addr)
                for i, addr in enumerate(addrs[service], start=1)
            ]
            for child, addr in started:
                mesh.wait_grpc_serving(child, addr)
        mesh.start_gateway(
            "envoy",
            config.gateway_port,
            config.gateway_admin_port,
            gateway_overrides,
            ops_port=config.gateway_ops_port,
        )
        yield mesh
    finally:
        if mesh is not None:
            mesh.stop()
        asyncio.run(infra.drop_database(base.database_url, db_name))
        if base.redis_url:
            asyncio.run(infra.delete_keys(base.redis_url, key_prefix))
