"""Start and stop the whole mesh as child processes: the OpenAI simulator (unless a real
OPENAI_API_KEY is set), quota, telemetry, generation, and Envoy. `make run` and the
end-to-end tests both use it, so what the tests prove is what a developer runs."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.infra import InfraError, die_with_parent, free_port, port_open

REPO = Path(__file__).resolve().parent.parent
STOP_TIMEOUT_SECONDS = 12.0  # each child drains within SHUTDOWN_GRACE_SECONDS; all stop < 15 s
# How long stop() lets each Envoy finish the requests it is serving (after
# /drain_listeners?graceful) before the SIGTERMs: short, since Ctrl-C should be quick, and
# the whole stop stays under 15 s.
GATEWAY_DRAIN_SECONDS = 2.0


def simulator_key() -> str:
    """A fresh API key for one run's simulator. It guards a loopback test tool, nothing of
    value, but it is random so the simulator really checks what generation sends."""
    return f"sk-sim-{secrets.token_hex(16)}"


def _addr(host_port: str) -> tuple[str, int]:
    host, _, port = host_port.rpartition(":")
    return host or "127.0.0.1", int(port)


def grpc_target(addrs: str) -> str:
    """What a service's gRPC channel dials for a *_ADDR: one host:port as it is; several
    (comma-separated IPv4 endpoints: replicas on processes) as gRPC's static `ipv4:` target,
    which the channels' round_robin policy spreads calls over (unreachable ones skipped), as
    it spreads them over the addresses of a headless Service's name in Kubernetes."""
    parts = [part.strip() for part in addrs.split(",") if part.strip()]
    if len(parts) == 1:
        return parts[0]
    for part in parts:
        host, _ = _addr(part)
        if not isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address):
            raise InfraError(f"several endpoints must be IPv4 host:port pairs, got {part!r}")
    return "ipv4:" + ",".join(parts)


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
    # Envoy's admin API port (gateways only): stop() drains them through it.
    admin_port: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


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
                # gRPC targets for the services (the gateway gets the plain lists).
                "GENERATION_ADDR": grpc_target(c.generation_addr),
                "QUOTA_ADDR": grpc_target(c.quota_addr),
                "TELEMETRY_ADDR": grpc_target(c.telemetry_addr),
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

    def service_env(self, name: str, addr: str) -> dict[str, str]:
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

    def _gateway_env(self) -> dict[str, str]:
        c = self.config
        env = self._base_env()
        # Envoy takes every endpoint of a service as a host of its cluster.
        env.update(
            {
                "GENERATION_ADDR": c.generation_addr,
                "QUOTA_ADDR": c.quota_addr,
                "TELEMETRY_ADDR": c.telemetry_addr,
            }
        )
        return env

    # -- processes ---------------------------------------------------------------------------

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str], admin_port: int | None = None
    ) -> Child:
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
        child = Child(name, proc, log, admin_port)
        self.children.append(child)
        return child

    def _check_alive(self, child: Child) -> None:
        if child.process.poll() is not None:
            tail = child.log.read_text(errors="replace")[-3000:]
            raise InfraError(f"{child.name} exited with code {child.process.returncode}:\n{tail}")

    def wait_grpc_serving(self, child: Child, addr: str, timeout: float = 60) -> None:
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
        for addr in (c.generation_addr, c.quota_addr, c.telemetry_addr):
            if port_open(*_addr(addr)):
                raise InfraError(f"{addr} is already in use: is another genmesh running?")
        if c.uses_simulator:
            self.start_simulator()
        for name, addr in (
            ("quota", c.quota_addr),
            ("telemetry", c.telemetry_addr),
            ("generation", c.generation_addr),
        ):
            self.start_service(name, addr)
        self._start_envoy()

    def start_simulator(self) -> Child:
        sim = self._spawn("simulator", [sys.executable, "-m", "simulator"], self._simulator_env())
        self._wait_http(sim, f"{self.config.simulator_url}/healthz")
        return sim

    def start_service(self, service: str, addr: str, name: str = "") -> Child:
        """One replica of `service` listening on `addr`, returned once it is SERVING."""
        child = self.spawn_service(service, addr, name)
        self.wait_grpc_serving(child, addr)
        return child

    def spawn_service(self, service: str, addr: str, name: str = "") -> Child:
        """Start one replica of `service` on `addr` without waiting for it; `name` (its log's
        name) defaults to the service's."""
        return self._spawn(
            name or service,
            [sys.executable, "-m", f"services.{service}"],
            self.service_env(service, addr),
        )

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
        healthy: Collection[str] | None = None,
    ) -> Child:
        """An Envoy in front of the services, run as in the container (render the config from
        the environment, then become Envoy), with `overrides` on top of that environment;
        returned once it routes: once every upstream host its health checks know, or those
        listed in `healthy` ("host:port"), is healthy. The mesh's own is one; `make bench`
        starts another with different settings. `stop()` drains and stops it with the rest,
        `stop_child()` before."""
        c = self.config
        env = self._gateway_env()
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
            admin_port=admin_port,
        )
        self._wait_http(child, f"http://127.0.0.1:{admin_port}/ready", expect="LIVE")
        # Envoy routes only to hosts its gRPC health checks have seen SERVING.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self._check_alive(child)
            hosts = upstream_health(admin_port)
            wanted = hosts if healthy is None else {a: hosts.get(a, False) for a in healthy}
            if wanted and all(wanted.values()):
                return child
            time.sleep(0.2)
        raise InfraError(f"{name}: Envoy's upstream hosts did not all become healthy in 30s")

    def drain_gateway(self, child: Child, limit: float, settle: float = 0.0) -> bool:
        """What the gateway's preStop hook does in Kubernetes: POST /drain_listeners?graceful
        (from then on every response closes its connection, and the listeners still accept),
        then wait `settle` seconds and until no request is in flight, at most `limit` seconds
        in all. True when it drained within the limit."""
        if child.admin_port is None or child.process.poll() is not None:
            return True
        url = f"http://127.0.0.1:{child.admin_port}/drain_listeners?graceful"
        started = time.monotonic()
        try:
            request = urllib.request.Request(url, method="POST")
            urllib.request.urlopen(request, timeout=2).close()  # noqa: S310 - loopback only
        except OSError:
            return False
        while (elapsed := time.monotonic() - started) < limit:
            if elapsed >= settle and gateway_stat(child.admin_port, ACTIVE_REQUESTS) == 0:
                return True
            time.sleep(0.1)
        return False

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
        """Drain every Envoy (each request it serves finishes, for up to GATEWAY_DRAIN_SECONDS),
        then SIGTERM in reverse start order (Envoy first, so no new requests arrive) and wait;
        whatever is still running after the timeout is killed."""
        gateways = [c for c in self.children if c.admin_port is not None]
        deadline = time.monotonic() + GATEWAY_DRAIN_SECONDS
        for gateway in gateways:
            self.drain_gateway(gateway, limit=max(0.0, deadline - time.monotonic()))
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


# Envoy's count of requests in flight on the public listener.
ACTIVE_REQUESTS = "http.public.downstream_rq_active"
# ... and of client connections open to it.
ACTIVE_CONNECTIONS = "http.public.downstream_cx_active"


def gateway_stat(admin_port: int, name: str) -> int | None:
    """One counter or gauge from an Envoy's admin API; None when it does not answer."""
    query = urllib.parse.quote(f"^{name.replace('.', '[.]')}$")
    url = f"http://127.0.0.1:{admin_port}/stats?filter={query}"
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            line = reply.read().decode().strip()
        return int(line.rpartition(":")[2] or 0)
    except (OSError, ValueError):
        return None


def upstream_health(admin_port: int) -> dict[str, bool]:
    """Every upstream host of an Envoy ("host:port") and whether it is healthy (routed to: no
    health flag set, e.g. its gRPC health checks found it SERVING); empty when Envoy does not
    answer."""
    url = f"http://127.0.0.1:{admin_port}/clusters"
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            lines = reply.read().decode().splitlines()
    except OSError:
        return {}
    health: dict[str, bool] = {}
    for line in lines:
        # <cluster>::<host:port>::health_flags::<flags>; "healthy" when no flag is set.
        _, _, rest = line.partition("::")
        host, _, flags = rest.partition("::health_flags::")
        if flags:
            health[host] = flags == "healthy"
    return health
