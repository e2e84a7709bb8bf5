"""The short rollout drill (`make rollout-drill` is the long one): two replicas of each service
and two Envoys under steady REST load (cache hits, cache misses, events, quota
reads), each replaced one at a time as a rolling update does. No request may fail, and every
replica must really have been replaced: a new process, SERVING (by its own log) before the old
one was told to stop, the old one exiting cleanly; each Envoy drained before its SIGTERM.

With Podman, each service replica is a container of its image (`podman run --network host`,
non-root, read-only root; the images built or reused as tests/deploy/test_containers.py does:
their tag is a hash of what they are built from) stopped with `podman stop`, and no container
is left afterwards; Envoy stays a process. Without Podman the drill runs on processes, and the
end of the pytest report says that the container drill did not run."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from deploy.podman import images as image_builder
from deploy.podman.engine import EngineError, podman
from devstack import infra
from devstack.rollout.containers import LABEL
from devstack.rollout.drill import PHASES, DrillConfig, run_drill, scratch_data
from devstack.rollout.fleet import SERVICES
from devstack.rollout.load import EVENTS, GENERATE_HIT, GENERATE_MISS, QUOTA

# A cold image build takes minutes; with the images current the drill takes about a minute.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


class NotRunReport:
    """A section at the end of the pytest report: the drill ran on processes only, and why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.write_sep("=", "container rollout drill NOT RUN", yellow=True, bold=True)
        terminalreporter.write_line(f"tests/e2e/test_rollout.py: {self.reason}")


@pytest.fixture(scope="module")
def runtime(request: pytest.FixtureRequest) -> str:
    """`containers` when Podman works (the service images built or reused first), else
    `processes`, said at the end of the report."""
    try:
        engine = podman()
    except EngineError as err:
        reason = f"the drill ran on processes, not on containers: {err}"
        manager = request.config.pluginmanager
        if not manager.has_plugin("genmesh-rollout-containers-not-run"):
            manager.register(NotRunReport(reason), "genmesh-rollout-containers-not-run")
        return "processes"
    began = time.monotonic()
    image_builder.build_all(engine, services=SERVICES)
    print(f"images ready in {time.monotonic() - began:.1f}s")
    return "containers"


def _log_time(log: Path, message: str) -> datetime:
    """When a service's JSON log first says `message`."""
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if message in entry.get("message", ""):
                return datetime.strptime(entry["time"], "%Y-%m-%d %H:%M:%S,%f")
    raise AssertionError(f"{log.name} never says {message!r}")


def test_rolling_every_service_and_envoy_fails_no_request(
    postgres_server: infra.Server, redis_url: str, tmp_path: Path, runtime: str
) -> None:
    started = time.monotonic()
    with scratch_data(postgres_server.url, redis_url) as (database_url, prefix):
        report = run_drill(
            DrillConfig(
                database_url=database_url,
                redis_url=redis_url,
                redis_prefix=prefix,
                log_dir=tmp_path,
                rate=25,
                workers=8,
                baseline_seconds=3,
                pause_seconds=1,
                runtime=runtime,
            )
        )
    elapsed = time.monotonic() - started
    print(report.render())  # shown with -s, and on failure

    # Steady load ran through every phase, and not one request failed.
    by_phase = {p.phase: p for p in report.phases}
    for name in PHASES:
        assert by_phase[name].requests > 0, name
    assert report.failed == 0, report.render()
    # ... of every kind: cache hits and misses, funnel events, quota reads.
    assert all(report.kinds[kind] > 0 for kind in (GENERATE_HIT, GENERATE_MISS, EVENTS, QUOTA))
    assert report.silent_reconnects == 0
    # Both Envoys of each moment served; the two replaced ones and the two new ones.
    assert len(report.connections) == 4

    # Each service's two replicas, then both Envoys, were replaced one at a time.
    assert [r.service for r in report.replacements] == [
        s for s in (*SERVICES, "envoy") for _ in range(2)
    ]
    for step in report.replacements:
        assert step.ok, step
        assert step.new_pid != step.old_pid
        assert step.launched_at < step.serving_at <= step.routed_at <= step.sigterm_at
        assert step.sigterm_at < step.exited_at
        for pid in (step.old_pid, step.new_pid):
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)  # and nothing is left running
        if step.service != "envoy":
            # The services' own logs agree: the new one listened before the old one stopped.
            listening = _log_time(tmp_path / f"{step.new}.log", "listening on")
            stopping = _log_time(tmp_path / f"{step.old}.log", "stopping: draining")
            assert listening < stopping, step
    assert report.runtime.split()[0] == runtime
    if runtime == "containers":
        # Every container of the drill was removed, and none of any drill is left.
        assert report.leftover_containers == []
        left = podman().run("ps", "--all", "--quiet", "--filter", f"label={LABEL}").stdout
        assert left.split() == []
    # Bounded: startup, a 3 s baseline and eight replacements (target: under 90 s).
    assert elapsed < 180
