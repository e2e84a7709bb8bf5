"""The bench's Envoy: the mesh's own config, rendered by the gateway's renderer from the same
environment, plus one route and one cluster for the echo service (bench/echo_server.py), so
the ceiling and the generate path go through the same Envoy, the same listener and the same
filter chain.

    python -m bench.gateway --echo-addr 127.0.0.1:50070 --out .run/envoy-bench.yaml --exec

What is added, and nothing else (the production template and renderer are not touched):

- genmesh.bench.v1.EchoService in every transcoder's service list, so POST /api/echo is
  transcoded like every other REST route;
- the route of its gRPC path (only for requests the transcoder produced, like the others) to a
  `bench_echo` cluster, a copy of the generation cluster (HTTP/2, health checks, circuit
  breakers) pointing at the echo service;
- the /api/echo marker routes, copies of the /api/ ones (same body limits, same response
  header clean-up) with the rate limit filter disabled: the ceiling is Envoy, its transcoder
  and a trivial Python service, with no call to the quota service. What the limits cost is
  measured on its own (bench/limits_cost.py).

With --rate-limited the echo routes keep the rate limit filter: the shape's floor
(bench/floor_server.py) runs behind such an Envoy, whose quota cluster is the floor's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from bench.children import Process, spawn_python, wait_envoy_routing
from bench.echo_server import SERVICE_NAME as ECHO_SERVICE
from devstack.infra import free_port
from devstack.mesh import MeshConfig
from services.gateway.render import TRANSCODER_TYPE, GatewaySettings, envoy_command, render
from services.gateway.settings import split_addr

ECHO_CLUSTER = "bench_echo"
ECHO_PATH = "/api/echo"
ECHO_RPC = f"/{ECHO_SERVICE}/Echo"
TRANSCODER_FILTER = "envoy.filters.http.grpc_json_transcoder"
RATE_LIMIT_FILTER = "envoy.filters.http.ratelimit"
DISABLED = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _public_hcm(config: dict[str, Any]) -> dict[str, Any]:
    listener = next(x for x in config["static_resources"]["listeners"] if x["name"] == "public")
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def add_echo(config: dict[str, Any], echo_addr: str, rate_limited: bool = False) -> dict[str, Any]:
    """A copy of the rendered mesh config (parsed) with the echo route and cluster added; the
    echo routes ask the rate limit service only when `rate_limited` (the shape's floor)."""
    config = copy.deepcopy(config)
    transcoders = [
        node
        for node in _walk(config)
        if node.get("@type", "").endswith(TRANSCODER_TYPE) and "services" in node
    ]
    if not transcoders:
        raise ValueError("the rendered config has no gRPC-JSON transcoder")
    for transcoder in transcoders:
        transcoder["services"] = [*transcoder["services"], ECHO_SERVICE]

    routes: list[dict[str, Any]] = _public_hcm(config)["route_config"]["virtual_hosts"][0]["routes"]
    api_markers = [r for r in routes if r["match"].get("prefix") == "/api/"]
    if not api_markers:
        raise ValueError("the rendered config has no /api/ marker routes")
    echo_markers = []
    for marker in api_markers:
        echo = copy.deepcopy(marker)
        echo["match"]["prefix"] = ECHO_PATH
        if not rate_limited:
            echo.setdefault("typed_per_filter_config", {})[RATE_LIMIT_FILTER] = DISABLED
        echo_markers.append(echo)
    first_marker = routes.index(api_markers[0])
    routes[first_marker:first_marker] = echo_markers
    routes.insert(
        0,
        {
            "match": {
                "path": ECHO_RPC,
                "headers": [{"name": "x-envoy-original-path", "present_match": True}],
            },
            "route": {"cluster": ECHO_CLUSTER, "timeout": "30s"},
        },
    )

    clusters: list[dict[str, Any]] = config["static_resources"]["clusters"]
    cluster = copy.deepcopy(next(c for c in clusters if c["name"] == "generation"))
    host, port = split_addr(echo_addr)
    cluster["name"] = ECHO_CLUSTER
    cluster["health_checks"][0]["grpc_health_check"] = {"service_name": ECHO_SERVICE}
    cluster["load_assignment"] = {
        "cluster_name": ECHO_CLUSTER,
        "endpoints": [
            {
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {"socket_address": {"address": host, "port_value": port}}
                        }
                    }
                ]
            }
        ],
    }
    clusters.append(cluster)
    return config


def render_with_echo(
    echo_addr: str, settings: GatewaySettings | None = None, rate_limited: bool = False
) -> str:
    """The mesh's Envoy config for these settings (the environment's when omitted), with the
    echo route and cluster; JSON, which Envoy reads as YAML."""
    rendered = yaml.safe_load(render(settings))
    return json.dumps(add_echo(rendered, echo_addr, rate_limited), indent=1)


def gateway_env(config: MeshConfig, port: int, admin_port: int) -> dict[str, str]:
    """The environment the mesh gives its Envoy (devstack.mesh), on other ports."""
    return {
        **os.environ,
        "GENERATION_ADDR": config.generation_addr,
        "QUOTA_ADDR": config.quota_addr,
        "TELEMETRY_ADDR": config.telemetry_addr,
        **config.extra_env,
        "GATEWAY_LISTEN_HOST": config.gateway_host,
        "GATEWAY_PORT": str(port),
        "GATEWAY_ADMIN_PORT": str(admin_port),
        "GATEWAY_OPS_PORT": str(free_port()),
    }


class BenchGateway:
    """The bench's Envoy, started and routing; `url` is its REST listener."""

    def __init__(
        self,
        config: MeshConfig,
        echo_addr: str,
        workdir: Path,
        overrides: Mapping[str, str],
        *,
        rate_limited: bool = False,
        name: str = "envoy-bench",
    ) -> None:
        port, admin_port = free_port(), free_port()
        self.url = f"http://{config.gateway_host}:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        env = {**gateway_env(config, port, admin_port), **overrides}
        out = workdir / f"envoy-bench-{port}.yaml"
        args = ["-m", "bench.gateway", "--echo-addr", echo_addr, "--out", str(out), "--exec"]
        self.process: Process = spawn_python(
            name,
            [*args, "--rate-limited"] if rate_limited else args,
            env,
            workdir / "logs",
        )
        try:
            wait_envoy_routing(self.process, self.admin_url)
        except BaseException:
            self.process.stop()
            raise

    @property
    def pid(self) -> int:
        """Envoy's (the renderer execs it)."""
        return self.process.pid

    def stop(self) -> None:
        self.process.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--echo-addr", required=True, help="where the echo service listens")
    parser.add_argument("--out", type=Path, required=True, help="write the config here")
    parser.add_argument("--exec", action="store_true", help="then replace this process by Envoy")
    parser.add_argument(
        "--rate-limited", action="store_true", help="the echo routes ask the rate limit service"
    )
    args = parser.parse_args(argv)
    settings = GatewaySettings()
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Like the gateway's renderer: the config may hold the JWT secret.
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(render_with_echo(args.echo_addr, settings, args.rate_limited))
    if args.exec:
        command = envoy_command(settings, out.resolve())
        os.execv(command[0], command)  # noqa: S606 - a fixed binary with our own arguments


if __name__ == "__main__":
    main()
