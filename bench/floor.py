"""The shape's floor, started beside the bench's mesh: the two roles of bench/floor_server.py
behind an Envoy of their own (the mesh's config, the echo route to the floor's generation with
the rate limit filter on, the quota cluster the floor's quota), sharing the run's Redis under
the run's key prefix. The ceiling section drives it beside the echo service and the real
cache hit (bench/ceiling.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bench.children import Process, spawn_python, wait_grpc_serving
from bench.gateway import BenchGateway
from devstack.infra import free_port
from devstack.mesh import MeshConfig

# Process names, as the CPU tables print them.
QUOTA = "floor-quota"
GENERATION = "floor-generation"
ENVOY = "envoy-floor"


@dataclass
class Floor:
    quota: Process
    quota_addr: str
    generation: Process
    gateway: BenchGateway

    @property
    def url(self) -> str:
        return self.gateway.url

    def processes(self) -> dict[str, int]:
        return {
            QUOTA: self.quota.pid,
            GENERATION: self.generation.pid,
            ENVOY: self.gateway.pid,
        }

    def stop(self) -> None:
        for part in (self.gateway, self.generation, self.quota):
            part.stop()


def start_floor(config: MeshConfig, workdir: Path) -> Floor:
    """The floor, serving and routing; everything started is stopped if a part fails."""
    if not config.redis_url:
        raise ValueError("the floor needs a Redis (its hops' round trips are the point)")
    logs = config.log_dir
    quota_addr, generation_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    prefix = config.redis_key_prefix
    started: list[Process | BenchGateway] = []
    try:
        quota = spawn_python(
            QUOTA,
            ["-m", "bench.floor_server", "quota", quota_addr, config.redis_url, prefix],
            os.environ,
            logs,
        )
        started.append(quota)
        # The simulator, for the floor's misses, as the mesh gives generation its upstream.
        upstream = {
            "OPENAI_BASE_URL": f"{config.simulator_url}/v1",
            "OPENAI_API_KEY": config.simulator_api_key,
        }
        generation = spawn_python(
            GENERATION,
            [
                "-m",
                "bench.floor_server",
                "generation",
                generation_addr,
                quota_addr,
                config.redis_url,
                prefix,
            ],
            {**os.environ, **upstream},
            logs,
        )
        started.append(generation)
        wait_grpc_serving(quota, quota_addr)
        wait_grpc_serving(generation, generation_addr)
        gateway = BenchGateway(
            config,
            generation_addr,
            workdir,
            {"QUOTA_ADDR": quota_addr},
            rate_limited=True,
            name=ENVOY,
        )
    except BaseException:
        for part in reversed(started):
            part.stop()
        raise
    return Floor(quota, quota_addr, generation, gateway)
