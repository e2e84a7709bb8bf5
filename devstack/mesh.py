"""Start and stop the whole mesh as child processes: the OpenAI simulator (unless a real
OPENAI_API_KEY is set), quota, telemetry, generation, and Envoy. `make run` and the
end-to-end tests both use it, so what the tests prove is what a developer runs."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.infra import InfraError, die_with_parent, free_port, port_open

REPO = Path(__file__).resolve().parent.parent
STOP_TIMEOUT_SECONDS = 12.0  # each child drains within SHUTDOWN_GRACE_SECONDS; all stop < 15 s


def simulator_key() -> str:
    """A fresh API key for one run's simulator. It guards a loopback test tool, nothing of
    value, but it is random so the simulator really checks what generation sends."""
    return f"sk-sim-{secrets.token_hex(16)}"


def _addr(host_port: str) -> tuple[str, int]:
    host, _, port = host_port.rpartition(":")
    return host or "127.0.0.1", int(port)


@dataclass
class MeshConfig:
    """Where everything listens and what it talks to. Defaults are the documented local ports;
    each can be overridden from the environment (see README)."""

    database_url: str
    redis_url: str  # empty: in-memory fallback
    redis_key_prefix: str = "genmesh:"
    generation_addr: str = "127.0.0.1:50051"
    quota_addr: str = "127.0.0.1:50052"
    telemetry_addr: str = "127.0.0.1:50053"
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    gateway_admin_port: int = 9901
    gateway_ops_port: int = 9902
    simulator_port: int = 8900
    metrics_ports: dict[str, int] = field(
        default_factory=lambda: {"generation": 9101, "quota": 9102, "telemetry": 9103}
    )
    openai_api_key: str = ""
    openai_base_url: str = ""
    # The key the simulator requires (SIM_API_KEY) and generation sends (OPENAI_API_KEY) when
    # the simulator stands in for OpenAI; unused with a real OPENAI_API_KEY. Never printed.
    simulator_api_key: str = field(default_factory=simulator_key, repr=False)
    log_dir: Path = REPO / ".run" / "logs"
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def uses_simulator(self) -> bool:
        return not self.openai_api_key

    @property
    def gateway_url(self) -> str:
        return f"http://{self.gateway_host}:{self.gateway_port}"

    @property
    def simulator_url(self) -> str:
        return f"http://127.0.0.1:{self.simulator_port}"

    @classmethod
    def from_env(cls, database_url: str, redis_url: str) -> MeshConfig:
        env = os.environ
        defaults = cls(database_url=database_url, redis_url=redis_url)
        metrics = {
            name: int(env.get(f"{name.upper()}_METRICS_PORT", port))
            for name, port in defaults.metrics_ports.items()
        }
        return cls(
            database_url=database_url,
            redis_url=redis_url,
            redis_key_prefix=env.get("REDIS_KEY_PREFIX", defaults.redis_key_prefix),
            generation_addr=env.get("GENERATION_ADDR", defaults.generation_addr),
            quota_addr=env.get("QUOTA_ADDR", defaults.quota_addr),
            telemetry_addr=env.get("TELEMETRY_ADDR", defaults.telemetry_addr),
            gateway_host=env.get("GATEWAY_LISTEN_HOST", defaults.gateway_host),
            gateway_port=int(env.get("GATEWAY_PORT", defaults.gateway_port)),
            gateway_admin_port=int(env.get("GATEWAY_ADMIN_PORT", defaults.gateway_admin_port)),
            gateway_ops_port=int(env.get("GATEWAY_OPS_PORT", defaults.gateway_ops_port)),
            simulator_port=int(env.get("SIM_PORT", defaults.simulator_port)),
            metrics_ports=metrics,
            openai_api_key=env.get("OPENAI_API_KEY", ""),
            openai_base_url=env.get("OPENAI_BASE_URL", ""),
            # The developer's own SIM_API_KEY, to call the simulator with a key they know.
            simulator_api_key=env.get("SIM_API_KEY") or defaults.simulator_api_key,
        )


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


class Mesh:
    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.children: list[Child] = []
        config.log_dir.mkdir(parents=True, exist_ok=True)

    # -- environment -------------------------------------------------------------------------

    def _base_env(self) -> dict[str, str]:
        c = self.config
        env = dict(os.environ)
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "DATABASE_URL": c.database_url,
                "REDIS_URL": c.redis_url,
                "REDIS_KEY_PREFIX": c.redis_key_prefix,
                "GENERATION_ADDR": c.generation_addr,
                "QUOTA_ADDR": c.quota_addr,
                "TELEMETRY_ADDR": c.telemetry_addr,
            }
        )
        if c.uses_simulator:
            # Generation is told about an OpenAI-compatible upstream and its key, nothing more;
            # the simulator is started requiring that same key (see _simulator_env).
            env["OPENAI_BASE_URL"] = f"{c.simulator_url}/v1"
            env["OPENAI_API_KEY"] = c.simulator_api_key
        env.update(c.extra_env)
        return env

    def _simulator_env(self) -> dict[str, str]:
        c = self.config
        env = self._base_env()
        env["SIM_PORT"] = str(c.simulator_port)
        env["SIM_API_KEY"] = c.simulator_api_key
        return env

    def _service_env(self, name: str, addr: str) -> dict[str, str]:
        host, port = _addr(addr)
        env = self._base_env()
        env.update(
            {
                "GRPC_HOST": host,
                "GRPC_PORT": str(port),
                "METRICS_PORT": str(self.config.metrics_ports.get(name, 0)),
            }
        )
        return env

    # -- processes ---------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        log = self.config.log_dir / f"{name}.log"
        with log.open("ab") as out:
            # Own session: a terminal's Ctrl-C reaches only us, and we stop children in order.
            # Should we die without stopping them (SIGKILL), they get SIGTERM and stop too.
            proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),  # noqa: PLW1509 - see die_with_parent
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def _check_alive(self, child: Child) -> None:
        if child.process.poll() is not None:
            tail = child.log.read_text(errors="replace")[-3000:]
            raise InfraError(f"{child.name} exited with code {child.process.returncode}:\n{tail}")

    def _wait_grpc_serving(self, child: Child, addr: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        with grpc.insecure_channel(addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                self._check_alive(child)
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as err:
                    last = str(err.code())
                time.sleep(0.2)
        raise InfraError(f"{child.name} on {addr} is not SERVING after {timeout:.0f}s ({last})")

    def _wait_http(self, child: Child, url: str, timeout: float = 60, expect: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(child)
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(url, timeout=1) as reply,  # noqa: S310 - loopback only
            ):
                if reply.status == 200 and expect in reply.read().decode():
                    return
            time.sleep(0.2)
        raise InfraError(f"{child.name} not ready at {url} after {timeout:.0f}s")

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        c = self.config
        python = sys.executable
        for addr in (c.generation_addr, c.quota_addr, c.telemetry_addr):
            if port_open(*_addr(addr)):
                raise InfraError(f"{addr} is already in use: is another genmesh running?")
        if c.uses_simulator:
            sim = self._spawn("simulator", [python, "-m", "simulator"], self._simulator_env())
            self._wait_http(sim, f"{c.simulator_url}/healthz")
        for name, addr in (("quota", c.quota_addr), ("telemetry", c.telemetry_addr)):
            child = self._spawn(
                name, [python, "-m", f"services.{name}"], self._service_env(name, addr)
            )
            self._wait_grpc_serving(child, addr)
        gen = self._spawn(
            "generation",
            [python, "-m", "services.generation"],
            self._service_env("generation", c.generation_addr),
        )
        self._wait_grpc_serving(gen, c.generation_addr)
        self._start_envoy()

    def _start_envoy(self) -> None:
        c = self.config
        self.start_gateway(
            "envoy", c.gateway_port, c.gateway_admin_port, ops_port=c.gateway_ops_port
        )

    def start_gateway(
        self,
        name: str,
        port: int,
        admin_port: int,
        overrides: Mapping[str, str] | None = None,
        ops_port: int | None = None,
    ) -> Child:
        """An Envoy in front of the services, run as in the container (render the config from
        the environment, then become Envoy), with `overrides` on top of that environment;
        returned once it routes. The mesh's own is one; `make bench` starts another with
        different settings. `stop()` stops it with the rest, `stop_child()` before."""
        c = self.config
        env = self._base_env()
        env.update(
            {
                "GATEWAY_LISTEN_HOST": c.gateway_host,
                "GATEWAY_PORT": str(port),
                "GATEWAY_ADMIN_PORT": str(admin_port),
                # Another Envoy of this machine may hold the default: pick a free port.
                "GATEWAY_OPS_PORT": str(ops_port or free_port()),
                **(overrides or {}),
            }
        )
        config_path = c.log_dir.parent / f"envoy-{port}.yaml"
        child = self._spawn(
            name,
            [
                sys.executable,
                "-m",
                "services.gateway.render",
                "--out",
                str(config_path),
                "--exec",
            ],
            env,
        )
        admin = f"http://127.0.0.1:{admin_port}"
        self._wait_http(child, f"{admin}/ready", expect="LIVE")
        # Envoy routes only to hosts its gRPC health checks have seen SERVING.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{admin}/clusters", timeout=2) as reply:  # noqa: S310
                lines = reply.read().decode().splitlines()
            flags = [line for line in lines if "::health_flags::" in line]
            if flags and all(line.endswith("::healthy") for line in flags):
                return child
            time.sleep(0.2)
        raise InfraError(f"{name}: Envoy's upstream clusters did not all become healthy in 30s")

    def stop_child(self, child: Child) -> None:
        """Stop one child now (SIGTERM, then SIGKILL after the timeout)."""
        if child.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        try:
            child.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait()
        if child in self.children:
            self.children.remove(child)

    def stop(self) -> None:
        """SIGTERM in reverse start order (Envoy first, so no new requests arrive), then wait;
        whatever is still running after the timeout is killed."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for child in reversed(self.children):
            remaining = max(0.1, deadline - time.monotonic())
            try:
                child.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()
        self.children.clear()
