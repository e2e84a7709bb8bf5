"""The container engine genmesh builds and runs images with: Podman (what `make k8s-up` needs,
for `podman kube play`), or Docker where a user has a running Docker engine and only builds.

Podman is always pointed at the project's own containers.conf (deploy/podman/containers.conf)
through CONTAINERS_CONF, unless the caller has set CONTAINERS_CONF: the machine's
/etc/containers/containers.conf is never read or edited.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CONTAINERS_CONF = HERE / "containers.conf"

INSTALL_PODMAN = (
    "install Podman with runc (Debian/Ubuntu: `sudo apt-get install -y podman runc "
    "debootstrap`; debootstrap builds the local base image where no registry is reachable; "
    "other systems: see podman.io)"
)


class EngineError(RuntimeError):
    """No usable container engine; the message says what to install or fix."""


class CommandError(RuntimeError):
    """An engine command failed; the message carries its output."""


@dataclass(frozen=True)
class Engine:
    name: str  # "podman" or "docker"
    binary: str

    @property
    def is_podman(self) -> bool:
        return self.name == "podman"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.is_podman:
            env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
        return env

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 600,
        input_text: str | None = None,
        capture: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """`<engine> args...`; raises CommandError (with stderr) when `check` and it fails."""
        try:
            result = subprocess.run(  # noqa: S603 - the engine binary with our own arguments
                [self.binary, *args],
                env=self.env(),
                capture_output=capture,
                text=True,
                input=input_text,
                timeout=timeout,
                check=False,
                cwd=REPO,
            )
        except subprocess.TimeoutExpired as err:
            raise CommandError(
                f"`{self.name} {' '.join(args)}` did not finish within {timeout:g}s"
            ) from err
        if check and result.returncode != 0:
            output = (result.stderr or "").strip() or (result.stdout or "").strip()
            raise CommandError(
                f"`{self.name} {' '.join(args)}` exited {result.returncode}: {output[-3000:]}"
            )
        return result

    def ok(self, *args: str, timeout: float = 120) -> bool:
        return self.run(*args, check=False, timeout=timeout).returncode == 0

    def image_exists(self, ref: str) -> bool:
        return self.ok("image", "inspect", "--format", "{{.Id}}", ref)

    def image_id(self, ref: str) -> str:
        return self.run("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()


def _podman() -> Engine | None:
    binary = shutil.which("podman")
    return Engine("podman", binary) if binary else None


def _docker() -> Engine | None:
    binary = shutil.which("docker")
    if binary is None:
        return None
    engine = Engine("docker", binary)
    # A docker client without a daemon (or without access to it) cannot build.
    return engine if engine.ok("info", "--format", "{{.ServerVersion}}", timeout=20) else None


def _check_podman(engine: Engine) -> Engine:
    result = engine.run("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
    if result.returncode != 0:
        raise EngineError(
            f"podman is installed but does not work with {engine.env()['CONTAINERS_CONF']}: "
            f"{result.stderr.strip()[-1500:]}\n{INSTALL_PODMAN}"
        )
    return engine


def podman() -> Engine:
    """Podman, checked to work; `make k8s-up` needs it (`podman kube play`)."""
    engine = _podman()
    if engine is None:
        raise EngineError(f"podman is not installed: {INSTALL_PODMAN}")
    return _check_podman(engine)


def find_engine() -> Engine:
    """The engine to build with: $CONTAINER_ENGINE if set (podman or docker), else Podman if
    installed, else a Docker whose daemon answers."""
    wanted = os.environ.get("CONTAINER_ENGINE", "").strip()
    if wanted == "podman":
        return podman()
    if wanted == "docker":
        docker = _docker()
        if docker is None:
            raise EngineError("CONTAINER_ENGINE=docker, but no Docker daemon answers `docker info`")
        return docker
    if wanted:
        raise EngineError(f"CONTAINER_ENGINE must be podman or docker, not {wanted!r}")
    engine = _podman()
    if engine is not None:
        return _check_podman(engine)
    docker = _docker()
    if docker is not None:
        return docker
    hint = (
        " (a docker client is installed, but no Docker daemon answers `docker info`)"
        if shutil.which("docker")
        else ""
    )
    raise EngineError(f"no container engine found{hint}: {INSTALL_PODMAN}, or start Docker")
