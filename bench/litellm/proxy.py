"""The LiteLLM proxy process: its own venv's `litellm` CLI on loopback and a free port, one
uvicorn worker, output to a log file, in a session of its own; stopped with the run."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.children import Process
from bench.errors import BenchError
from bench.litellm.config import SIM_KEY_ENV
from devstack.infra import die_with_parent, free_port

# LiteLLM imports a great deal before it listens (about 6 s on a 2-core machine).
READY_TIMEOUT_SECONDS = 120.0
# What the proxy keeps of the caller's environment: nothing else, so that a DATABASE_URL,
# REDIS_URL, LITELLM_MASTER_KEY or HTTP proxy of the caller's cannot change what is measured.
_KEPT = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")


@dataclass(frozen=True)
class Proxy:
    url: str
    process: Process

    @property
    def pid(self) -> int:
        return self.process.pid


def proxy_env(sim_api_key: str) -> dict[str, str]:
    env = {name: os.environ[name] for name in _KEPT if name in os.environ}
    env.update(
        {
            SIM_KEY_ENV: sim_api_key,
            # The price list packaged with LiteLLM, instead of fetching it at start-up.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            # Also uvicorn's level: no access-log line per request (genmesh's Envoy writes
            # none to a file either).
            "LITELLM_LOG": "ERROR",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def version(binary: Path) -> str:
    """The litellm release installed beside `binary` (its venv's python asks the metadata)."""
    done = subprocess.run(
        [
            str(binary.parent / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout.strip() or "unknown"


def _wait_ready(process: Process, url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        process.check_alive()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health/liveliness", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise BenchError(f"the LiteLLM proxy is not up at {url} after {READY_TIMEOUT_SECONDS:.0f}s")


@contextlib.contextmanager
def running(binary: Path, config: Path, env: dict[str, str], log_dir: Path) -> Iterator[Proxy]:
    """The proxy, once it answers; stopped (SIGTERM, then SIGKILL) when the block ends, however
    it ends. It runs in the config's folder, so no .env file of the repository reaches it."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "litellm.log"
    port = free_port()
    command = [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    with log.open("ab") as out:
        popen = subprocess.Popen(
            [*command, "--num_workers", "1"],
            cwd=config.parent,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Own session: a terminal's Ctrl-C reaches only the runner, which stops it; should
            # the runner die without stopping it, it gets SIGTERM.
            start_new_session=True,
            preexec_fn=die_with_parent(),  # noqa: PLW1509 - see devstack.infra.die_with_parent
        )
    process = Process("litellm", popen, log)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(process, url)
        yield Proxy(url, process)
    finally:
        process.stop()
