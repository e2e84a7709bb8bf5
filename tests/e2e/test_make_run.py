"""`make run`'s runner as a user runs it: it starts everything, prints where it listens, and
SIGTERM (what Ctrl-C does) stops every process it started within 15 s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from devstack.infra import free_port
from devstack.mesh import REPO

pytestmark = pytest.mark.e2e


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(line) for line in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (its parent has not reaped it yet).
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_make_run_serves_then_stops_everything(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    gateway = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": f"{redis_prefix}make-run:",
        "GENERATION_ADDR": f"127.0.0.1:{free_port()}",
        "QUOTA_ADDR": f"127.0.0.1:{free_port()}",
        "TELEMETRY_ADDR": f"127.0.0.1:{free_port()}",
        "GATEWAY_PORT": str(gateway),
        "GATEWAY_ADMIN_PORT": str(free_port()),
        "SIM_PORT": str(free_port()),
        "GENERATION_METRICS_PORT": "0",
        "QUOTA_METRICS_PORT": "0",
        "TELEMETRY_METRICS_PORT": "0",
        "OPENAI_API_KEY": "",
    }
    out = tmp_path / "run.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devstack"],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while "genmesh is up" not in out.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, out.read_text()
            time.sleep(0.2)
        printed = out.read_text()
        assert "genmesh is up" in printed, printed
        assert f"http://127.0.0.1:{gateway}" in printed
        assert "curl" in printed
        r = httpx.post(f"http://127.0.0.1:{gateway}/api/generate", json={"text": "hi"}, timeout=30)
        assert r.status_code == 200, r.text
        children = _children(proc.pid)
        assert len(children) == 5  # simulator, quota, telemetry, generation, envoy

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        assert time.monotonic() - started < 15
        assert proc.returncode == 0
        assert not [pid for pid in children if _alive(pid)]
        assert "Stopped every process genmesh started" in out.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
