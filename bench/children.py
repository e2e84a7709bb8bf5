"""Processes `make bench` starts beside the mesh (the echo service, the bench's Envoy): spawn
one with its output in a log file, wait until it serves, stop it. devstack's Mesh does the
same for the mesh's own processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.errors import BenchError

REPO = Path(__file__).resolve().parent.parent
STOP_TIMEOUT_SECONDS = 10.0


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise BenchError(f"{self.name} exited with code {self.popen.returncode}:\n{tail}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL (its whole session) after STOP_TIMEOUT_SECONDS."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


def spawn_python(name: str, args: list[str], env: Mapping[str, str], log_dir: Path) -> Process:
    """`python <args>` from the repository root, output appended to <log_dir>/<name>.log, in a
    session of its own (a terminal's Ctrl-C reaches only us; we stop it)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Process(name, popen, log)


def wait_grpc_serving(process: Process, addr: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            process.check_alive()
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.2)
    raise BenchError(f"{process.name} on {addr} is not SERVING after {timeout:.0f}s")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as reply:  # noqa: S310 - loopback only
        body: bytes = reply.read()
        return body.decode()


def wait_envoy_routing(process: Process, admin_url: str, timeout: float = 60) -> None:
    """Until Envoy is LIVE and every upstream cluster's health checks have seen its hosts
    SERVING (Envoy routes only to those)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.check_alive()
        with contextlib.suppress(OSError):
            if "LIVE" in _get(f"{admin_url}/ready"):
                flags = [
                    line
                    for line in _get(f"{admin_url}/clusters").splitlines()
                    if "::health_flags::" in line
                ]
                if flags and all(line.endswith("::healthy") for line in flags):
                    return
        time.sleep(0.2)
    raise BenchError(f"{process.name}: not routing to healthy clusters after {timeout:.0f}s")
