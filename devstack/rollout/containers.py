"""The drill's service replicas as containers: each one `podman run -d --network host` of its
service's image (deploy/podman/images.py, genmesh/<service>:src-<hash>), hardened as the pod
specs are (non-root uid 10001, read-only root, no capabilities, no-new-privileges, a tmpfs
/tmp), with the environment a process replica gets (Mesh.service_env) and listening on the
same 127.0.0.1 slot. Stopped as the kubelet stops a pod: `podman stop -t <grace>` (SIGTERM,
then SIGKILL after the grace). Every container carries the label genmesh.rollout=<run>, and
`remove_all` removes whatever carries it (`podman rm -f`), on success and on failure.

Envoy stays a process (see fleet.py): its container would run the same render-then-exec."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.podman import images as image_builder
from deploy.podman.engine import CommandError, Engine, EngineError, podman
from devstack.infra import InfraError

LABEL = "genmesh.rollout"
UID = "10001"
RUNTIMES = ("auto", "containers", "processes")
# Variables of the runner's own environment that mean nothing inside an image.
HOST_ONLY = {"PATH", "HOME", "VIRTUAL_ENV", "PYTHONPATH", "PWD", "OLDPWD", "SHLVL", "_"}


@dataclass
class Container:
    name: str  # the replica's name ("quota-3"); the container's is Containers.prefix + name
    cid: str
    pid: int  # its PID 1 as this machine sees it
    log: Path


def container_env(env: Mapping[str, str], explicit: Mapping[str, str]) -> dict[str, str]:
    """What a process replica's environment `env` adds to this process's own (the mesh's
    settings), plus the `explicit` ones in any case; never host-only variables."""
    chosen = {k: v for k, v in env.items() if os.environ.get(k) != v}
    chosen.update(explicit)
    return {k: v for k, v in chosen.items() if k not in HOST_ONLY}


def choose(mode: str, services: tuple[str, ...], say: Callable[[str], None]) -> Containers | None:
    """ROLLOUT_RUNTIME: `containers` (Podman must work and the images build), `processes`,
    or `auto` (containers when Podman is usable and the images are present or build, else
    processes). Says which, and why."""
    mode = mode.strip() or "auto"
    if mode not in RUNTIMES:
        raise InfraError(f"ROLLOUT_RUNTIME must be one of {', '.join(RUNTIMES)}, not {mode!r}")
    if mode == "processes":
        say("==> runtime: processes (ROLLOUT_RUNTIME=processes)")
        return None
    try:
        engine = podman()
        built = image_builder.build_all(engine, services=services)
    except (EngineError, CommandError) as err:
        if mode == "containers":
            raise InfraError(f"ROLLOUT_RUNTIME=containers, but: {err}") from err
        say(f"==> runtime: processes (no containers: {str(err).splitlines()[0]})")
        return None
    say("==> runtime: containers (podman run --network host, one per service replica)")
    return Containers(engine, {s: built[s].ref for s in services})


class Containers:
    def __init__(self, engine: Engine, refs: Mapping[str, str]) -> None:
        self.engine = engine
        self.refs = dict(refs)
        self.run_id = uuid.uuid4().hex[:8]
        self.prefix = f"genmesh-rollout-{self.run_id}-"

    def describe(self) -> str:
        return "containers (" + ", ".join(self.refs.values()) + "); Envoy: processes"

    def run(self, service: str, name: str, env: Mapping[str, str], log: Path) -> Container:
        args = [
            "run",
            "--detach",
            "--name",
            self.prefix + name,
            "--label",
            f"{LABEL}={self.run_id}",
            "--network",
            "host",
            "--read-only",
            "--tmpfs",
            "/tmp",  # noqa: S108 - a tmpfs of the container's own, as the pods' emptyDir
            "--user",
            UID,
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
        ]
        for key, value in sorted(env.items()):
            args += ["--env", f"{key}={value}"]
        cid = self.engine.run(*args, self.refs[service], timeout=120).stdout.strip()
        pid = int(self.engine.run("inspect", "--format", "{{.State.Pid}}", cid).stdout.strip())
        return Container(name, cid, pid, log)

    def running(self, container: Container) -> bool:
        result = self.engine.run(
            "inspect", "--format", "{{.State.Running}}", container.cid, check=False
        )
        return result.stdout.strip() == "true"

    def save_log(self, container: Container) -> None:
        result = self.engine.run("logs", container.cid, check=False)
        container.log.write_text((result.stdout or "") + (result.stderr or ""))

    def wait_serving(self, container: Container, addr: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last, checked = "no answer", 0.0
        with grpc.insecure_channel(addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if time.monotonic() - checked > 1:
                    checked = time.monotonic()
                    if not self.running(container):
                        self.save_log(container)
                        tail = container.log.read_text(errors="replace")[-3000:]
                        raise InfraError(f"container {container.name} exited:\n{tail}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as err:
                    last = str(err.code())
                time.sleep(0.2)
        raise InfraError(f"container {container.name} on {addr} not SERVING ({last})")

    def stop(self, container: Container, grace: float) -> int | None:
        """`podman stop -t grace` (SIGTERM, SIGKILL after grace), its log kept, removed; its
        exit code (None when it had to be killed)."""
        self.engine.run("stop", "--time", str(round(grace)), container.cid, timeout=grace + 60)
        code = self.engine.run(
            "inspect", "--format", "{{.State.ExitCode}}", container.cid
        ).stdout.strip()
        self.save_log(container)
        self.engine.run("rm", "--force", container.cid, check=False)
        return None if code in ("137", "") else int(code)

    def remove_all(self, live: list[Container], grace: float) -> None:
        """Stop the `live` ones as `stop` does and keep their logs, then remove every container
        of this run."""
        if live:
            self.engine.run(
                "stop",
                "--time",
                str(round(grace)),
                *(c.cid for c in live),
                check=False,
                timeout=grace + 60,
            )
        for container in live:
            with contextlib.suppress(OSError, CommandError):
                self.save_log(container)
        self.engine.run(
            "rm",
            "--force",
            "--time",
            str(round(grace)),
            "--filter",
            f"label={LABEL}={self.run_id}",
            check=False,
            timeout=grace + 120,
        )

    def leftovers(self) -> list[str]:
        result = self.engine.run(
            "ps", "--all", "--quiet", "--filter", f"label={LABEL}={self.run_id}", check=False
        )
        return result.stdout.split()
