"""Two replicas of each service and two Envoys, as processes (or each service replica a
container, see containers.py; Envoy stays a process), replaced one at a time the way a
Kubernetes rolling update (maxSurge 1, maxUnavailable 0) replaces pods:

- a service replica: start the new one on the free slot, wait until it is SERVING and every
  Envoy routes to it (its readiness, then its endpoint), then SIGTERM the old one, which goes
  NOT_SERVING, drains and stops (services/common/server.py);
- an Envoy: start the new one, wait until it is LIVE and routes to every replica, add it to
  the load balancer; then take the old one out of the load balancer and drain it as the
  gateway's preStop hook does (POST /drain_listeners?graceful, wait until nothing is in
  flight), then SIGTERM.

Replicas on processes have no DNS name that could follow them, so each service has three
fixed addresses ("slots", one more than the replicas, the surge), all listed in Envoy's cluster
(comma-separated *_ADDR, see services/gateway/settings.py) and in the other services' gRPC
targets (`ipv4:` lists); an empty slot is an endpoint that fails its health checks."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from devstack.infra import InfraError, free_port, port_open
from devstack.mesh import (
    ACTIVE_CONNECTIONS,
    ACTIVE_REQUESTS,
    Child,
    Mesh,
    gateway_stat,
    upstream_health,
)
from devstack.rollout.containers import Container, Containers, container_env

SERVICES = ("quota", "telemetry", "generation")
# How long a step waits for the other services' gRPC clients (see Fleet._wait_clients).
CLIENTS_TIMEOUT_SECONDS = 20.0
REPLICAS = 2
SLOTS = REPLICAS + 1  # maxSurge 1
# How long a replica may take to stop after SIGTERM: the services' grace (10 s locally) + margin.
STOP_TIMEOUT_SECONDS = 20.0
ROUTED_TIMEOUT_SECONDS = 30.0
# A new Envoy's workers balance in panic mode (over every host, the empty slot included) for
# about a health-check interval after it is LIVE and its /clusters shows the replicas healthy
# (measured: up to 1.3 s with 1 s checks). Harmless in Kubernetes, where every endpoint is a
# pod that exists; here the empty slot refuses. So the load balancer gets a new Envoy only
# after this long, as a readiness probe's period would give it.
ENVOY_WARMUP_SECONDS = 2.0
# What each Envoy did for the requests to the services, summed over the drill (read from each
# Envoy just before it stops): retries (and those that succeeded), connections refused or
# failed, hosts ejected by outlier detection.
ENVOY_STATS = {
    "upstream_rq_retry": "retries",
    "upstream_rq_retry_success": "retries that succeeded",
    "upstream_cx_connect_fail": "failed connections",
    "outlier_detection.ejections_enforced_total": "hosts ejected",
    "lb_healthy_panic": "requests routed in panic (under half the hosts healthy)",
}


def slot_port() -> int:
    """A free loopback port below the kernel's ephemeral range, so that while a slot is empty
    no outgoing connection of this machine is given its number."""
    low = 32768
    with (
        contextlib.suppress(OSError, ValueError),
        open("/proc/sys/net/ipv4/ip_local_port_range") as f,
    ):
        low = int(f.read().split()[0])
    for _ in range(200):
        port = random.randrange(20000, max(20001, low))  # noqa: S311 - not a secret
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if not port_open("127.0.0.1", port):
            return port
    return free_port()


@dataclass
class Replica:
    service: str  # "quota", ... or "envoy"
    name: str  # its log's name
    addr: str  # service: its gRPC address; envoy: its URL
    child: Child | None = None  # a process (every Envoy; services in process mode)
    container: Container | None = None  # a service replica in container mode

    @property
    def pid(self) -> int:
        if self.container is not None:
            return self.container.pid
        return self.process.pid

    @property
    def process(self) -> Child:
        assert self.child is not None, self.name
        return self.child


@dataclass
class Replacement:
    """One rolling step: `new` started, then `old` stopped. Times are time.monotonic()."""

    service: str
    old: str
    new: str
    old_pid: int
    new_pid: int
    launched_at: float
    serving_at: float  # the new one is SERVING (Envoy: LIVE, routing to every replica)
    routed_at: float  # every Envoy routes to it (Envoy: the load balancer offers it)
    # Every other service's replica connected to the old one has a connection to another
    # replica too (services only; see Fleet._wait_clients), and when.
    clients_ok: bool = True
    clients_at: float = 0.0
    sigterm_at: float = 0.0  # the old one got SIGTERM
    exited_at: float = 0.0
    exit_code: int | None = None
    # Envoy: the drain before SIGTERM ended with nothing in flight and no client connected.
    drained: bool = True

    @property
    def ok(self) -> bool:
        return (
            self.new_pid != self.old_pid
            and self.serving_at <= self.routed_at <= self.sigterm_at
            and self.exit_code == 0
            and self.drained
            and self.clients_ok
        )


@dataclass
class Fleet:
    mesh: Mesh
    slots: dict[str, list[str]]
    say: Callable[[str], None] = print
    envoy_settle_seconds: float = 1.0
    envoy_drain_limit_seconds: float = 30.0
    # None: every replica a process; else the service replicas are containers.
    containers: Containers | None = None
    replicas: dict[str, list[Replica]] = field(default_factory=dict)
    envoys: list[Replica] = field(default_factory=list)
    envoy_stats: Counter[str] = field(default_factory=Counter)
    _launched: int = 0

    @staticmethod
    def allocate() -> dict[str, list[str]]:
        return {s: [f"127.0.0.1:{slot_port()}" for _ in range(SLOTS)] for s in SERVICES}

    # -- start ---------------------------------------------------------------------------------

    def start(self, envoys: int = 2) -> None:
        """The simulator, REPLICAS replicas of each service and `envoys` Envoys, routing."""
        if self.mesh.config.uses_simulator:
            self.mesh.start_simulator()
        for service in SERVICES:
            # Both replicas at once, then wait for each (the services do not need each other
            # to become SERVING).
            started = [self._spawn(service, addr) for addr in self.slots[service][:REPLICAS]]
            for replica in started:
                self._wait_serving(replica)
            self.replicas[service] = started
        for _ in range(envoys):
            self.envoys.append(self._start_envoy())
        time.sleep(ENVOY_WARMUP_SECONDS)

    def _spawn(self, service: str, addr: str) -> Replica:
        self._launched += 1
        name = f"{service}-{self._launched}"
        if self.containers is None:
            return Replica(service, name, addr, self.mesh.spawn_service(service, addr, name))
        host, _, port = addr.rpartition(":")
        explicit = {"GRPC_HOST": host, "GRPC_PORT": port, "METRICS_PORT": "0"}
        env = container_env(self.mesh.service_env(service, addr), explicit)
        log = self.mesh.config.log_dir / f"{name}.log"
        container = self.containers.run(service, name, env, log)
        return Replica(service, name, addr, container=container)

    def _wait_serving(self, replica: Replica) -> None:
        if replica.container is not None:
            assert self.containers is not None
            self.containers.wait_serving(replica.container, replica.addr)
        else:
            self.mesh.wait_grpc_serving(replica.process, replica.addr)

    def stop_containers(self) -> None:
        """Stop and remove every container of this fleet (none in process mode)."""
        if self.containers is not None:
            live = [r.container for rs in self.replicas.values() for r in rs if r.container]
            self.containers.remove_all(live, STOP_TIMEOUT_SECONDS)

    def _start_envoy(self) -> Replica:
        self._launched += 1
        name = f"envoy-{self._launched}"
        port, admin = free_port(), free_port()
        child = self.mesh.start_gateway(
            name,
            port,
            admin,
            # One worker thread per Envoy: two cores run the whole fleet.
            overrides={"GATEWAY_CONCURRENCY": "1"},
            healthy=self.occupied(),
        )
        return Replica("envoy", name, f"http://127.0.0.1:{port}", child=child)

    def occupied(self) -> list[str]:
        return [r.addr for replicas in self.replicas.values() for r in replicas]

    @property
    def urls(self) -> list[str]:
        return [envoy.addr for envoy in self.envoys]

    # -- rolling -------------------------------------------------------------------------------

    def roll(self, service: str) -> list[Replacement]:
        """Replace every replica of `service`, one at a time."""
        steps = []
        for old in list(self.replicas[service]):
            (free,) = (a for a in self.slots[service] if a not in self.occupied())
            launched = time.monotonic()
            new = self._spawn(service, free)
            self.replicas[service].append(new)  # stopped with the rest should this step fail
            self._wait_serving(new)
            serving = time.monotonic()
            self._wait_routed(new.addr)
            step = Replacement(
                service, old.name, new.name, old.pid, new.pid,
                launched, serving, time.monotonic(),
            )  # fmt: skip
            step.clients_ok = self._wait_clients(old)
            step.clients_at = time.monotonic()
            self._terminate(old, step)
            self.replicas[service].remove(old)
            self.say(f"    {describe(step)}")
            steps.append(step)
        return steps

    def roll_envoys(
        self, add: Callable[[str], None], remove: Callable[[str], None]
    ) -> list[Replacement]:
        """Replace every Envoy, one at a time; `add` and `remove` put an Envoy's URL into the
        load balancer and take it out."""
        steps = []
        for old in list(self.envoys):
            launched = time.monotonic()
            new = self._start_envoy()
            serving = time.monotonic()
            time.sleep(ENVOY_WARMUP_SECONDS)
            add(new.addr)
            self.envoys.append(new)
            step = Replacement(
                "envoy", old.name, new.name, old.pid, new.pid,
                launched, serving, time.monotonic(),
            )  # fmt: skip
            # Terminating: the endpoint leaves the load balancer, and the preStop hook drains.
            remove(old.addr)
            self.envoys.remove(old)
            step.drained = self._drain(old.process)
            self.collect_stats(old.process)
            self._terminate(old, step)
            self.say(f"    {describe(step)}")
            steps.append(step)
        return steps

    def collect_stats(self, child: Child | None = None) -> None:
        """Add an Envoy's ENVOY_STATS (every current Envoy's when None) to envoy_stats."""
        for envoy in [child] if child else [e.process for e in self.envoys]:
            if envoy.admin_port is not None:
                self.envoy_stats.update(envoy_stats(envoy.admin_port))

    def _wait_routed(self, addr: str) -> None:
        """Until every Envoy's health checks have found `addr` SERVING (it is in rotation)."""
        deadline = time.monotonic() + ROUTED_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            admin_ports = [e.process.admin_port for e in self.envoys if e.process.admin_port]
            if all(upstream_health(port).get(addr) for port in admin_ports):
                return
            time.sleep(0.1)
        raise InfraError(f"Envoy does not route to {addr} after {ROUTED_TIMEOUT_SECONDS:.0f}s")

    def _wait_clients(self, old: Replica) -> bool:
        """Until every replica of the other services that is connected to `old` (generation's
        quota channel, ...; round_robin over the slots) also holds a connection to another
        replica of its service, so that SIGTERM leaves none of them without one. In Kubernetes
        a new pod is a new address that a client dials afresh when the old pod's GOAWAY makes
        it resolve the headless Service's name again; here the slots' addresses are fixed,
        and a slot that was empty a while is still in gRPC's reconnect backoff (up to 120 s),
        so a client may not have dialled the new replica yet. False if that took longer than
        CLIENTS_TIMEOUT_SECONDS (the step goes on; the report says so)."""
        others = {int(r.addr.rpartition(":")[2]) for r in self.replicas[old.service]} - {
            int(old.addr.rpartition(":")[2])
        }
        port = int(old.addr.rpartition(":")[2])
        clients = [
            r.pid
            for service, replicas in self.replicas.items()
            if service != old.service
            for r in replicas
        ]
        deadline = time.monotonic() + CLIENTS_TIMEOUT_SECONDS
        while True:
            waiting = [
                pid for pid in clients if port in (ports := peer_ports(pid)) and not ports & others
            ]
            if not waiting:
                return True
            if time.monotonic() > deadline:
                self.say(f"    clients {waiting} reach {old.addr} only: stopping it all the same")
                return False
            time.sleep(0.1)

    def _drain(self, child: Child) -> bool:
        """The gateway's preStop hook: drain, let the load balancer's removal settle, wait for
        the requests in flight, and here also for every client to have moved away."""
        started = time.monotonic()
        limit = self.envoy_drain_limit_seconds
        if not self.mesh.drain_gateway(child, limit=limit, settle=self.envoy_settle_seconds):
            return False
        assert child.admin_port is not None
        while time.monotonic() - started < limit:
            if gateway_stat(child.admin_port, ACTIVE_CONNECTIONS) == 0:
                return gateway_stat(child.admin_port, ACTIVE_REQUESTS) == 0
            time.sleep(0.1)
        return False

    def _terminate(self, old: Replica, step: Replacement) -> None:
        step.sigterm_at = time.monotonic()
        if old.container is not None:
            # As the kubelet stops a pod: SIGTERM, SIGKILL after the grace.
            assert self.containers is not None
            step.exit_code = self.containers.stop(old.container, STOP_TIMEOUT_SECONDS)
            step.exited_at = time.monotonic()
            return
        child = old.process
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(signal.SIGTERM)
        try:
            step.exit_code = child.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait()
            step.exit_code = None
        step.exited_at = time.monotonic()
        if child in self.mesh.children:
            self.mesh.children.remove(child)


def envoy_stats(admin_port: int) -> Counter[str]:
    """ENVOY_STATS of one Envoy, summed over the service clusters."""
    names = "|".join(re.escape(name) for name in ENVOY_STATS)
    query = urllib.parse.quote(rf"^cluster\.(generation|quota|telemetry)\.({names})$")
    found: Counter[str] = Counter()
    url = f"http://127.0.0.1:{admin_port}/stats?filter={query}"
    with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(url, timeout=2) as reply:
        for line in reply.read().decode().splitlines():
            name, _, value = line.partition(": ")
            found[name.split(".", 2)[2]] += int(value)
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    return inodes


# 127.0.0.1 as /proc/net/tcp and /proc/net/tcp6 write it (gRPC dials IPv4 addresses from
# dual-stack IPv6 sockets, as ::ffff:127.0.0.1).
_LOOPBACK = ("0100007F:", "0000000000000000FFFF00000100007F:")


def peer_ports(pid: int) -> set[int]:
    """The ports on 127.0.0.1 that process `pid` has an established TCP connection to
    (Linux: /proc/net/tcp and tcp6, matched to the process's sockets by inode)."""
    inodes = _socket_inodes(pid)
    ports = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as table:
            next(table)
            for line in table:
                fields = line.split()
                # local address, remote address (hex ip:port), state (01: established), ...,
                # inode
                remote, state, inode = fields[2], fields[3], fields[9]
                if state == "01" and inode in inodes and remote.startswith(_LOOPBACK):
                    ports.add(int(remote.rpartition(":")[2], 16))
    return ports


def describe(step: Replacement) -> str:
    t = step.launched_at

    def at(moment: float) -> str:
        return f"+{moment - t:.1f}s"

    if step.service == "envoy":
        before = ", drained" if step.drained else ", NOT drained"
    else:
        before = f", clients {at(step.clients_at)}" + ("" if step.clients_ok else " (timed out)")
    return (
        f"{step.service:<10} {step.old} (pid {step.old_pid}) -> {step.new} (pid {step.new_pid}): "
        f"new SERVING {at(step.serving_at)}, routed {at(step.routed_at)}{before}; old SIGTERM "
        f"{at(step.sigterm_at)}, exited {at(step.exited_at)} with {step.exit_code}"
    )
