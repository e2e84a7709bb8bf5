"""The shape's floor, started beside the bench's mesh: the roles of bench/floor_server.py behind
an Envoy of their own (the mesh's config, the echo route to the floor's generation with the
rate limit filter on, the quota and telemetry clusters the floor's), sharing the run's Redis
under the run's key prefix and the run's database. The ceiling, miss, quota and events
sections drive it beside what they measure of the mesh."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.children import Process, spawn_python, wait_grpc_serving
from bench.gateway import BenchGateway
from devstack.infra import free_port
from devstack.mesh import MeshConfig

# Process names, as the CPU tables print them.
QUOTA = "floor-quota"
GENERATION = "floor-generation"
TELEMETRY = "floor-telemetry"
ENVOY = "envoy-floor"


@dataclass
class Floor:
    quota: Process
    quota_addr: str
    generation: Process
    telemetry: Process
    gateway: BenchGateway

    @property
    def url(self) -> str:
        return self.gateway.url

    def processes(self) -> dict[str, int]:
        return {
            QUOTA: self.quota.pid,
            GENERATION: self.generation.pid,
            TELEMETRY: self.telemetry.pid,
            ENVOY: self.gateway.pid,
        }

    def stop(self) -> None:
        for part in (self.gateway, self.generation, self.telemetry, self.quota):
            part.stop()


def start_floor(config: MeshConfig, workdir: Path) -> Floor:
    """The floor, serving and routing; everything started is stopped if a part fails."""
    if not config.redis_url:
        raise ValueError("the floor needs a Redis (its hops' round trips are the point)")
    logs = config.log_dir
    quota_addr, generation_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    telemetry_addr = f"127.0.0.1:{free_port()}"
    prefix = config.redis_key_prefix
    # The simulator, for the floor's misses, as the mesh gives generation its upstream.
    upstream = {
        "OPENAI_BASE_URL": f"{config.simulator_url}/v1",
        "OPENAI_API_KEY": config.simulator_api_key,
    }
    started: list[Process] = []

    def role(name: str, *args: str, env: Mapping[str, str] = os.environ) -> Process:
        process = spawn_python(name, ["-m", "bench.floor_server", *args], env, logs)
        started.append(process)
        return process

    try:
        quota = role(QUOTA, "quota", quota_addr, config.redis_url, prefix)
        generation = role(
            GENERATION,
            "generation",
            generation_addr,
            quota_addr,
            config.redis_url,
            prefix,
            env={**os.environ, **upstream},
        )
        telemetry = role(TELEMETRY, "telemetry", telemetry_addr, config.database_url)
        wait_grpc_serving(quota, quota_addr)
        wait_grpc_serving(generation, generation_addr)
        wait_grpc_serving(telemetry, telemetry_addr)
        gateway = BenchGateway(
            config,
            generation_addr,
            workdir,
            {"QUOTA_ADDR": quota_addr, "TELEMETRY_ADDR": telemetry_addr},
            rate_limited=True,
            name=ENVOY,
        )
    except BaseException:
        for part in reversed(started):
            part.stop()
        raise
    return Floor(quota, quota_addr, generation, telemetry, gateway)
