"""The drill: start the fleet, put steady load on it, measure a baseline, roll quota,
telemetry, generation and Envoy one after the other, and report per phase."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from devstack import infra
from devstack.infra import free_port
from devstack.limits import raised_limits_env
from devstack.mesh import Mesh, MeshConfig
from devstack.rollout import containers as runtimes
from devstack.rollout.fleet import ENVOY_STATS, SERVICES, Fleet, Replacement
from devstack.rollout.load import Balancer, Load, Sample
from services.common.migrations import create_database_if_missing, migrate

BASELINE = "baseline"
PHASES = (BASELINE, *(f"roll {s}" for s in SERVICES), "roll envoy")

# All the drill's traffic comes from 127.0.0.1, one client network and one guest: no limit
# may refuse it (the same as the end-to-end tests' mesh).
UNLIMITED = raised_limits_env() | {"GUEST_DAILY_LIMIT": "100000000"}
# Requests sent between the phases (the pauses) are counted too, under this name.
BETWEEN = "between phases"


@dataclass(frozen=True)
class DrillConfig:
    database_url: str
    redis_url: str  # empty: the services' in-memory fallback (each replica its own cache)
    redis_prefix: str
    log_dir: Path
    rate: float = 40.0  # requests per second, in all
    workers: int = 16  # keep-alive connections
    baseline_seconds: float = 15.0
    # Pause between phases, so each phase starts from a settled fleet.
    pause_seconds: float = 2.0
    simulator_latency_ms: int = 50
    # The services' SHUTDOWN_DRAIN_DELAY_SECONDS: at least the 2-3 s Envoy's health checks take to
    # see NOT_SERVING (two failed checks, 1 s apart).
    drain_delay_seconds: float = 3.0
    envoy_settle_seconds: float = 1.0
    # ROLLOUT_RUNTIME: auto (service replicas as containers when Podman is usable and the
    # images are present or build, else processes), containers, or processes.
    runtime: str = "auto"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN without values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass(frozen=True)
class PhaseStats:
    phase: str
    requests: int
    failures: Counter[str]  # "<kind>: <outcome>" -> count
    p50_ms: float
    p99_ms: float
    seconds: float

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @classmethod
    def of(cls, phase: str, samples: list[Sample], seconds: float) -> PhaseStats:
        mine = [s for s in samples if s.phase == phase]
        latencies = [s.latency_ms for s in mine if s.ok]
        failures = Counter(f"{s.kind}: {s.outcome}" for s in mine if not s.ok)
        return cls(
            phase,
            len(mine),
            failures,
            percentile(latencies, 50),
            percentile(latencies, 99),
            seconds,
        )


@dataclass
class Report:
    phases: list[PhaseStats] = field(default_factory=list)
    replacements: list[Replacement] = field(default_factory=list)
    connections: Counter[str] = field(default_factory=Counter)
    silent_reconnects: int = 0
    envoy_stats: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)  # requests sent, per kind
    seconds: float = 0.0
    runtime: str = "processes"  # what the replicas ran on
    leftover_containers: list[str] = field(default_factory=list)  # after the cleanup

    @property
    def failed(self) -> int:
        return sum(p.failed for p in self.phases)

    @property
    def passed(self) -> bool:
        return (
            self.failed == 0
            and all(r.ok for r in self.replacements)
            and not self.leftover_containers
        )

    def render(self) -> str:
        base = next((p for p in self.phases if p.phase == BASELINE), None)
        header = (
            f"{'phase':<16} {'seconds':>7} {'requests':>8} {'failed':>6} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'p99 vs baseline':>15}"
        )
        lines = [f"runtime: {self.runtime}", header, "-" * len(header)]
        for p in self.phases:
            ratio = (
                f"{p.p99_ms / base.p99_ms:.2f}x"
                if base and base.p99_ms > 0 and not math.isnan(p.p99_ms)
                else "-"
            )
            lines.append(
                f"{p.phase:<16} {p.seconds:>7.1f} {p.requests:>8} {p.failed:>6} "
                f"{p.p50_ms:>7.1f} {p.p99_ms:>7.1f} {ratio:>15}"
            )
            for what, count in sorted(p.failures.items()):
                lines.append(f"{'':<16}   {count:>4} x {what}")
        lines.append("")
        lines.append(
            f"failed requests: {self.failed} (goal 0); replicas replaced: "
            f"{sum(r.ok for r in self.replacements)}/{len(self.replacements)} as a rolling "
            "update does (new one SERVING and routed before the old one got SIGTERM, old one "
            "exited 0, Envoys drained first)"
        )
        lines.append(
            "connections opened per Envoy: "
            + ", ".join(f"{url} {n}" for url, n in sorted(self.connections.items()))
            + f"; replaced by httpx before a request was sent on them: {self.silent_reconnects}"
        )
        lines.append(
            "Envoy, towards the services: "
            + ", ".join(f"{label} {self.envoy_stats[name]}" for name, label in ENVOY_STATS.items())
        )
        if self.runtime.startswith("containers"):
            lines.append(
                f"containers left after the cleanup: {len(self.leftover_containers)}"
                + (f" ({', '.join(self.leftover_containers)})" if self.leftover_containers else "")
            )
        lines.append(f"{'PASS' if self.passed else 'FAIL'} in {self.seconds:.0f}s")
        return "\n".join(lines)


@contextmanager
def scratch_data(server_url: str, redis_url: str) -> Iterator[tuple[str, str]]:
    """A migrated database and a Redis key prefix of the drill's own (its guest usage, events
    and rate-limit counters must not mix with anyone's), both removed afterwards."""
    run = uuid.uuid4().hex[:8]
    name = f"genmesh_rollout_{run}"
    database_url = infra.with_database(server_url, name)
    prefix = f"genmesh-rollout-{run}:"

    async def prepare() -> None:
        await create_database_if_missing(database_url)
        await migrate(database_url)

    asyncio.run(prepare())
    try:
        yield database_url, prefix
    finally:
        asyncio.run(infra.drop_database(server_url, name))
        if redis_url:
            asyncio.run(infra.delete_keys(redis_url, prefix))


def mesh_config(config: DrillConfig, slots: dict[str, list[str]]) -> MeshConfig:
    return MeshConfig(
        database_url=config.database_url,
        redis_url=config.redis_url,
        redis_key_prefix=config.redis_prefix,
        generation_addr=",".join(slots["generation"]),
        quota_addr=",".join(slots["quota"]),
        telemetry_addr=",".join(slots["telemetry"]),
        simulator_port=free_port(),
        metrics_ports={},  # replicas share no port: no metrics listener
        log_dir=config.log_dir,
        extra_env={
            **UNLIMITED,
            "SIM_LATENCY_MS": str(config.simulator_latency_ms),
            "HEALTH_PROBE_INTERVAL_SECONDS": "1",
            # After SIGTERM a replica says NOT_SERVING and keeps serving this long: Envoy's
            # health checks (every second) and the other services' channels (their health watch)
            # take it out of rotation before it stops taking calls.
            "SHUTDOWN_DRAIN_DELAY_SECONDS": str(config.drain_delay_seconds),
        },
    )


def _phase(name: str, config: DrillConfig, fleet: Fleet, balancer: Balancer) -> list[Replacement]:
    if name == BASELINE:
        time.sleep(config.baseline_seconds)
        return []
    if name == "roll envoy":
        return fleet.roll_envoys(balancer.add, balancer.remove)
    return fleet.roll(name.removeprefix("roll "))


def _stop_fleet(fleet: Fleet, mesh: Mesh, report: Report) -> None:
    """Envoys drained and every process stopped, then every container removed (by label)."""
    try:
        fleet.collect_stats()
        mesh.stop()
    finally:
        fleet.stop_containers()
        if fleet.containers is not None:
            report.leftover_containers = fleet.containers.leftovers()


def run_drill(config: DrillConfig, say: Callable[[str], None] = print) -> Report:
    """Run the whole drill; every process it started is stopped when it returns or raises."""
    began = time.monotonic()
    containers = runtimes.choose(config.runtime, SERVICES, say)
    slots = Fleet.allocate()
    mesh = Mesh(mesh_config(config, slots))
    fleet = Fleet(
        mesh,
        slots,
        say=say,
        envoy_settle_seconds=config.envoy_settle_seconds,
        containers=containers,
    )
    report = Report(runtime=containers.describe() if containers else "processes")
    load: Load | None = None
    load_started = 0.0
    seconds: dict[str, float] = {}
    try:
        what = "containers" if containers else "processes"
        say(
            f"==> Starting the simulator, {len(SERVICES)} services x 2 replicas ({what}) and "
            f"2 Envoys (processes; logs in {config.log_dir})"
        )
        fleet.start()
        balancer = Balancer(fleet.urls)
        load = Load(balancer, config.rate, config.workers)
        load.warm()
        say(f"==> Load: {config.rate:g} requests/s over {config.workers} keep-alive connections")
        load.phase = BETWEEN
        load.start()
        load_started = time.monotonic()
        for name in PHASES:
            time.sleep(config.pause_seconds)
            say(f"==> {name}")
            load.phase = name
            started = time.monotonic()
            report.replacements += _phase(name, config, fleet, balancer)
            seconds[name] = time.monotonic() - started
            load.phase = BETWEEN
    finally:
        try:
            if load is not None:
                load.stop()  # every request in flight gets its outcome
            if load_started:
                seconds[BETWEEN] = time.monotonic() - load_started - sum(seconds.values())
        finally:
            _stop_fleet(fleet, mesh, report)
    assert load is not None
    report.envoy_stats = fleet.envoy_stats
    report.phases = [PhaseStats.of(name, load.samples, seconds.get(name, 0.0)) for name in PHASES]
    between = PhaseStats.of(BETWEEN, load.samples, seconds.get(BETWEEN, 0.0))
    if between.requests:
        report.phases.append(between)
    report.kinds = Counter(s.kind for s in load.samples)
    report.connections = load.connections
    report.silent_reconnects = load.silent_reconnects
    report.seconds = time.monotonic() - began
    return report
