"""A second Envoy gateway beside the mesh's own, and what Envoy's admin API says about rate
limiting.

The second gateway is started the way devstack/mesh.py starts the first (render the config from
the environment, then exec Envoy on it) with the same environment, so the two differ only in
their ports and in the settings the caller overrides (GATEWAY_RATE_LIMIT=false here).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from devstack.infra import InfraError, free_port
from devstack.mesh import REPO, MeshConfig

READY_TIMEOUT_SECONDS = 60.0
HEALTHY_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
RATE_LIMIT_COUNTERS = ("ok", "over_limit", "error", "failure_mode_allowed")


@dataclass(frozen=True)
class Gateway:
    """An Envoy gateway to drive: where it listens, its admin API, and its process id (the
    render process execs Envoy, so the id is Envoy's)."""

    label: str
    url: str
    admin_url: str
    pid: int


def _get(url: str, timeout: float = 2) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 - loopback only
        status: int = reply.status
        return status, reply.read().decode()


def wait_ready(process: subprocess.Popen[bytes], admin_url: str, log: Path) -> None:
    """Until Envoy is LIVE and every upstream cluster's gRPC health check has passed: Envoy
    routes only to hosts it has seen SERVING, so traffic before that would be 503s."""

    def check_alive() -> None:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise InfraError(f"Envoy exited with code {process.returncode}:\n{tail}")

    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while True:
        check_alive()
        with contextlib.suppress(OSError):
            status, body = _get(f"{admin_url}/ready")
            if status == 200 and "LIVE" in body:
                break
        if time.monotonic() > deadline:
            raise InfraError(f"Envoy not ready at {admin_url} after {READY_TIMEOUT_SECONDS:.0f}s")
        time.sleep(0.2)
    deadline = time.monotonic() + HEALTHY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        check_alive()
        _, clusters = _get(f"{admin_url}/clusters")
        flags = [line for line in clusters.splitlines() if "::health_flags::" in line]
        if flags and all(line.endswith("::healthy") for line in flags):
            return
        time.sleep(0.2)
    raise InfraError(f"Envoy's upstream clusters at {admin_url} did not all become healthy")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL to its whole session (it has its own) if it lingers."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def extra_gateway(
    config: MeshConfig, label: str, overrides: Mapping[str, str], workdir: Path
) -> Iterator[Gateway]:
    """Another Envoy in front of the mesh's services, on free ports, ready to serve; stopped
    (no process left behind) when the block ends, however it ends."""
    port, admin_port = free_port(), free_port()
    env = dict(os.environ)
    env.update(config.extra_env)  # what the mesh gives every process it starts
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "GENERATION_ADDR": config.generation_addr,
            "QUOTA_ADDR": config.quota_addr,
            "TELEMETRY_ADDR": config.telemetry_addr,
            "GATEWAY_LISTEN_HOST": config.gateway_host,
            "GATEWAY_PORT": str(port),
            "GATEWAY_ADMIN_PORT": str(admin_port),
            **overrides,
        }
    )
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / f"envoy-{port}.yaml"
    log = workdir / f"envoy-{port}.log"
    command = [
        sys.executable,
        "-m",
        "services.gateway.render",
        "--out",
        str(config_path),
        "--exec",
    ]
    with log.open("ab") as out:
        # Own session, as in devstack: a terminal's Ctrl-C reaches only us, and we stop it.
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        admin_url = f"http://127.0.0.1:{admin_port}"
        wait_ready(process, admin_url, log)
        yield Gateway(label, f"http://{config.gateway_host}:{port}", admin_url, process.pid)
    finally:
        _stop(process)


def rate_limit_counters(admin_url: str) -> dict[str, int]:
    """Envoy's rate-limit filter counters, summed over its stat prefixes: `ok` and
    `over_limit` are answers; `error` are checks that failed or timed out, which let the
    request through (`failure_mode_allowed`) unless the gateway fails closed."""
    _, text = _get(f"{admin_url}/stats?filter=%5C.ratelimit%5C.")
    counters = dict.fromkeys(RATE_LIMIT_COUNTERS, 0)
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        kind = name.rsplit(".", 1)[-1]
        if ".ratelimit." in name and kind in counters and value.strip().isdigit():
            counters[kind] += int(value)
    return counters
