"""`make run`'s runner as a user runs it: it starts everything, prints where it listens, and
SIGTERM (what Ctrl-C does) stops every process it started within 15 s. Also how the mesh hands
the simulator and generation one API key (the services never learn that a simulator exists)."""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from devstack.infra import free_port
from devstack.mesh import REPO, Mesh, MeshConfig

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
    simulator = free_port()
    sim_key = f"sk-sim-e2e-{secrets.token_hex(8)}"
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
        "SIM_PORT": str(simulator),
        "SIM_API_KEY": sim_key,
        "GENERATION_METRICS_PORT": "0",
        "QUOTA_METRICS_PORT": "0",
        "TELEMETRY_METRICS_PORT": "0",
        "OPENAI_API_KEY": "",
        "OPENAI_BASE_URL": "",
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
        assert "SIM_API_KEY" in printed
        assert sim_key not in printed  # said to be set, never shown
        # The simulator checks the key, and generation was given the same one.
        models = f"http://127.0.0.1:{simulator}/v1/models"
        assert httpx.get(models, timeout=5).status_code == 401
        authorized = {"Authorization": f"Bearer {sim_key}"}
        assert httpx.get(models, headers=authorized, timeout=5).status_code == 200
        r = httpx.post(f"http://127.0.0.1:{gateway}/api/generate", json={"text": "hi"}, timeout=30)
        assert r.status_code == 200, r.text
        stats = httpx.get(f"http://127.0.0.1:{simulator}/_sim/stats", timeout=5).json()
        assert stats["completions"] >= 1  # generation got past the key check
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


# -- the simulator's key (no processes started) --------------------------------------------------


def _config(tmp_path: Path) -> MeshConfig:
    return MeshConfig(database_url="postgresql://x", redis_url="", log_dir=tmp_path)


def test_simulator_and_generation_share_a_fresh_key(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert config.uses_simulator
    assert config.simulator_api_key.startswith("sk-sim-")
    assert config.simulator_api_key != _config(tmp_path).simulator_api_key  # one per run
    assert config.simulator_api_key not in repr(config)

    mesh = Mesh(config)
    simulator = mesh._simulator_env()
    generation = mesh._service_env("generation", config.generation_addr)
    assert simulator["SIM_API_KEY"] == generation["OPENAI_API_KEY"] == config.simulator_api_key
    assert simulator["SIM_PORT"] == str(config.simulator_port)
    assert generation["OPENAI_BASE_URL"] == f"{config.simulator_url}/v1"


def test_the_developers_sim_api_key_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "")
    monkeypatch.setenv("SIM_API_KEY", "sk-sim-mine")
    config = dataclasses.replace(MeshConfig.from_env("postgresql://x", ""), log_dir=tmp_path)
    assert config.simulator_api_key == "sk-sim-mine"
    generation = Mesh(config)._service_env("generation", config.generation_addr)
    assert generation["OPENAI_API_KEY"] == "sk-sim-mine"

    monkeypatch.setenv("SIM_API_KEY", "")  # empty counts as unset, as in the simulator
    assert MeshConfig.from_env("postgresql://x", "").simulator_api_key.startswith("sk-sim-")


def test_a_real_openai_key_replaces_the_simulator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real")
    monkeypatch.setenv("OPENAI_BASE_URL", "https://llm.example/v1")
    config = dataclasses.replace(MeshConfig.from_env("postgresql://x", ""), log_dir=tmp_path)
    assert not config.uses_simulator
    generation = Mesh(config)._service_env("generation", config.generation_addr)
    assert generation["OPENAI_API_KEY"] == "sk-real"
    assert generation["OPENAI_BASE_URL"] == "https://llm.example/v1"
