"""`make run`'s runner as a user runs it: it starts everything, prints where it listens, and
SIGTERM (what Ctrl-C does) or SIGHUP (its terminal closing) stops every process it started
within 15 s; SIGKILL, which it cannot handle, leaves no process behind either (each child dies
with it), nor do the private PostgreSQL and Redis servers it may start. Also how the mesh hands
the simulator and generation one API key (the services never learn that a simulator exists)."""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pytest

from devstack.infra import free_port, port_open
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


def _descendants(pid: int) -> list[int]:
    """Every process under `pid`, children first."""
    found = []
    for child in _children(pid):
        found += [child, *_descendants(child)]
    return found


def _kill_survivors(pids: list[int]) -> list[int]:
    """SIGKILL whichever of `pids` still runs (so a failing test leaves nothing behind)."""
    survivors = [pid for pid in pids if _alive(pid)]
    for pid in survivors:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return survivors


def _wait_dead(pids: list[int], timeout: float) -> list[int]:
    """The pids still alive after `timeout` seconds (none, if all stopped sooner)."""
    deadline = time.monotonic() + timeout
    while (alive := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def _runner_env(database_url: str, redis_url: str, redis_prefix: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": f"{redis_prefix}make-run:",
        "GENERATION_ADDR": f"127.0.0.1:{free_port()}",
        "QUOTA_ADDR": f"127.0.0.1:{free_port()}",
        "TELEMETRY_ADDR": f"127.0.0.1:{free_port()}",
        "GATEWAY_PORT": str(free_port()),
        "GATEWAY_ADMIN_PORT": str(free_port()),
        "GATEWAY_OPS_PORT": str(free_port()),
        "SIM_PORT": str(free_port()),
        "SIM_API_KEY": f"sk-sim-e2e-{secrets.token_hex(8)}",
        "GENERATION_METRICS_PORT": "0",
        "QUOTA_METRICS_PORT": "0",
        "TELEMETRY_METRICS_PORT": "0",
        "OPENAI_API_KEY": "",
        "OPENAI_BASE_URL": "",
    }


@dataclasses.dataclass
class Runner:
    proc: subprocess.Popen[bytes]
    out: Path
    # Every process it started, once it is up.
    children: list[int] = dataclasses.field(default_factory=list)

    def printed(self) -> str:
        return self.out.read_text()


@contextmanager
def running_runner(env: dict[str, str], tmp_path: Path) -> Iterator[Runner]:
    """`python -m devstack` (what `make run` runs), up; afterwards nothing it started is left,
    whatever the test did or how it failed."""
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
    runner = Runner(proc, out)
    try:
        deadline = time.monotonic() + 90
        while "genmesh is up" not in runner.printed() and time.monotonic() < deadline:
            assert proc.poll() is None, runner.printed()
            time.sleep(0.2)
        assert "genmesh is up" in runner.printed(), runner.printed()
        runner.children = _descendants(proc.pid)
        yield runner
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_survivors(runner.children or _descendants(proc.pid))


def test_make_run_serves_then_stops_everything(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    env = _runner_env(database_url, redis_url, redis_prefix)
    gateway, simulator, sim_key = env["GATEWAY_PORT"], env["SIM_PORT"], env["SIM_API_KEY"]
    with running_runner(env, tmp_path) as runner:
        printed = runner.printed()
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
        children = _children(runner.proc.pid)
        assert len(children) == 5  # simulator, quota, telemetry, generation, envoy
        assert sorted(children) == sorted(runner.children)  # and nothing under them

        started = time.monotonic()
        runner.proc.send_signal(signal.SIGTERM)
        runner.proc.wait(timeout=15)
        assert time.monotonic() - started < 15
        assert runner.proc.returncode == 0
        assert not [pid for pid in children if _alive(pid)]
        assert "Stopping (SIGTERM received)" in runner.printed()
        assert "Stopped every process genmesh started" in runner.printed()


def test_closing_the_terminal_stops_everything_like_ctrl_c(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """SIGHUP (the terminal that runs `make run` closed) is a stop like Ctrl-C, not a kill."""
    env = _runner_env(database_url, redis_url, redis_prefix)
    with running_runner(env, tmp_path) as runner:
        assert len(runner.children) == 5
        runner.proc.send_signal(signal.SIGHUP)
        runner.proc.wait(timeout=15)
        assert runner.proc.returncode == 0
        assert _wait_dead(runner.children, 1) == []
        assert "Stopping (SIGHUP received)" in runner.printed()
        assert "Stopped every process genmesh started" in runner.printed()


def test_sigkill_on_the_runner_leaves_no_child(
    database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """The runner cannot handle SIGKILL; its children notice it die and stop by themselves."""
    env = _runner_env(database_url, redis_url, redis_prefix)
    with running_runner(env, tmp_path) as runner:
        assert len(runner.children) == 5  # simulator, quota, telemetry, generation, envoy
        runner.proc.kill()
        runner.proc.wait()
        started = time.monotonic()
        assert _wait_dead(runner.children, 10) == []
        assert time.monotonic() - started < 10
        # Their ports are free again for the next `make run`.
        for key in ("GATEWAY_PORT", "SIM_PORT"):
            assert not port_open("127.0.0.1", int(env[key])), key


def test_private_servers_die_with_the_process_that_started_them(tmp_path: Path) -> None:
    """The private PostgreSQL and Redis that `make run` starts when the machine has none."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is installed on this machine")
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from devstack import infra\n"
            "scratch = Path(sys.argv[1])\n"
            "for server in (infra.private_redis(scratch), infra.private_postgres(scratch)):\n"
            "    print(server.process.pid, server.workdir, flush=True)\n"
            "time.sleep(600)\n",
            str(tmp_path),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    servers: list[tuple[int, Path]] = []
    try:
        assert starter.stdout is not None
        for _ in range(2):
            pid, where = starter.stdout.readline().split(maxsplit=1)
            servers.append((int(pid), Path(where.strip())))
        pids = [pid for pid, _ in servers]
        assert all(_alive(pid) for pid in pids)
        starter.kill()
        starter.wait()
        assert _wait_dead(pids, 10) == []
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()
        _kill_survivors([pid for pid, _ in servers])
        for _, workdir in servers:
            shutil.rmtree(workdir, ignore_errors=True)


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
    generation = mesh.service_env("generation", config.generation_addr)
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
    generation = Mesh(config).service_env("generation", config.generation_addr)
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
    generation = Mesh(config).service_env("generation", config.generation_addr)
    assert generation["OPENAI_API_KEY"] == "sk-real"
    assert generation["OPENAI_BASE_URL"] == "https://llm.example/v1"
