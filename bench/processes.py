"""How many processes each service runs per pod and how many workers Envoy runs, in `make
bench`: the same cache-hit POST /api/generate through three meshes started side by side for
the section, driven alternately with wrk:

- one process per service, Envoy with one worker (GATEWAY_CONCURRENCY=1, what deploy/k8s sets
  for its 1-CPU gateway pods);
- one process per service, Envoy with one worker per core (GATEWAY_CONCURRENCY=0, the
  `make run` default): the baseline of the ratios;
- two processes of generation and of quota, each on a port of its own (comma-separated *_ADDR:
  Envoy's cluster and the services' gRPC channels balance over them, as over a headless
  Service's pods), Envoy with one worker per core.

Each variant is warmed up for at least FRESH_MESH_WARMUP_SECONDS (its mesh is new). Each mesh
has its own database and Redis key prefix on the stack's PostgreSQL server and Redis
(bench/stack.py: replica_mesh), the stack's environment (every limit raised), and its own
simulator (idle: cache hits never reach it). Per variant: the medians over rounds of
requests/s, p50 and p99, the non-2xx answers and socket errors summed, and the CPU time per
request of every process of the mesh, summed by kind (Envoy, generation, quota, telemetry; the
stack's Redis when the bench started it) and in all; wrk's own beside it. PostgreSQL is left
out (the stack's server may be shared with other work).
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench import wrk
from bench.errors import BenchError
from bench.proc import CpuWindow
from bench.stack import START_ORDER, Stack, replica_mesh, replica_name
from bench.stats import fmt, median_known, per_unit_us
from devstack.mesh import Mesh

# A mesh started for the section is cold (connection pools, caches, the allocator): in runs
# with the default 2 s warm-up its first measured round came out 20-30 % slower than the others.
FRESH_MESH_WARMUP_SECONDS = 6.0
WRK_THREADS = 2
WRK_CONNECTIONS = 32
ENVOY = "envoy"
REDIS = "redis"
WRK = "wrk"
# The process kinds of the CPU table, in its order (REDIS only when the bench started it).
KINDS = (ENVOY, "generation", "quota", "telemetry", REDIS)
SERVICES = ("generation", "quota", "telemetry")


@dataclass(frozen=True)
class Variant:
    label: str
    # Processes per service (1 for those not listed).
    replicas: Mapping[str, int]
    # GATEWAY_CONCURRENCY: Envoy's worker threads; 0 = one per core (Envoy's default).
    concurrency: int
    # Added to every process's environment (bench/tracing_cost.py: tracing settings).
    service_env: Mapping[str, str] = field(default_factory=dict)
    # How the reading line names the variant; empty: from its processes and workers.
    summary: str = ""

    def processes(self, service: str) -> int:
        return self.replicas.get(service, 1)


ONE_WORKER = Variant("1 per service, Envoy 1 worker", {}, 1)
PER_CORE = Variant(
    "1 per service, Envoy 1/core",
    {},
    0,
    summary="one process per service and Envoy one worker per core",
)
TWO_PROCESSES = Variant("2 gen + 2 quota, Envoy 1/core", {"generation": 2, "quota": 2}, 0)
VARIANTS = (ONE_WORKER, PER_CORE, TWO_PROCESSES)
BASELINE = PER_CORE


@dataclass(frozen=True)
class Target:
    """A variant's mesh, ready to drive: where to send, and its processes (name -> pid, and
    name -> kind)."""

    variant: Variant
    url: str
    pids: dict[str, int]
    kinds: dict[str, str]
    # Envoy's worker threads as its admin API reports them (None when it does not say).
    workers: int | None


@dataclass(frozen=True)
class Run:
    variant: str
    result: wrk.WrkResult
    # CPU seconds by process name during the run; wrk's own under WRK.
    cpu: dict[str, float]


@dataclass(frozen=True)
class Report:
    variants: list[Variant]
    # By variant label: process name -> kind, and Envoy's workers.
    kinds: Mapping[str, Mapping[str, str]]
    workers: Mapping[str, int | None]
    runs: list[Run]
    rounds: int
    seconds: float
    warmup: float
    cores: int | None = field(default_factory=os.cpu_count)


def envoy_workers(admin_url: str) -> int | None:
    """The worker threads an Envoy runs (its --concurrency, the cores when not given), from
    its admin API; None when it does not answer."""
    try:
        with urllib.request.urlopen(f"{admin_url}/server_info", timeout=2) as reply:  # noqa: S310
            info = json.loads(reply.read())
        return int(info["command_line_options"]["concurrency"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _probe(label: str, url: str, body: str) -> None:
    """Two identical requests: the first fills the variant's cache, the second must hit it."""
    answer: dict[str, Any] = {}
    for _ in range(2):
        reply = httpx.post(
            url, content=body, headers={"content-type": "application/json"}, timeout=60
        )
        if reply.status_code != 200:
            raise BenchError(f"{label}: POST {url} -> {reply.status_code} {reply.text[:300]}")
        answer = reply.json()
    if answer.get("cached") is not True:
        raise BenchError(f"{label}: POST {url}: the second identical request was not a cache hit")


def _target(variant: Variant, mesh: Mesh, body: str) -> Target:
    kinds = {
        replica_name(service, i): service
        for service in START_ORDER
        for i in range(1, variant.processes(service) + 1)
    }
    kinds[ENVOY] = ENVOY
    pids = {child.name: child.pid for child in mesh.children if child.name in kinds}
    if set(pids) != set(kinds):
        raise BenchError(f"{variant.label}: missing processes {sorted(set(kinds) - set(pids))}")
    url = f"{mesh.config.gateway_url}/api/generate"
    _probe(variant.label, url, body)
    workers = envoy_workers(f"http://127.0.0.1:{mesh.config.gateway_admin_port}")
    if variant.concurrency and workers is not None and workers != variant.concurrency:
        raise BenchError(
            f"{variant.label}: Envoy runs {workers} workers, not {variant.concurrency}: "
            "the variant is not what its label says"
        )
    return Target(variant, url, pids, kinds, workers)


def measure(
    wrk_binary: str,
    stack: Stack,
    rounds: int,
    seconds: float,
    warmup: float,
    variants: Sequence[Variant] = VARIANTS,
    name: str = "processes",
) -> Report:
    """Start a mesh per variant, probe each, warm each up, then drive them alternately
    `rounds` times each, with the CPU every process used during each run. Alternating spreads
    the machine's drift over every variant instead of loading it onto whichever ran last; the
    meshes not driven meanwhile are idle (health checks only)."""
    warmup = max(warmup, FRESH_MESH_WARMUP_SECONDS)
    body = json.dumps({"text": f"bench processes {uuid.uuid4().hex[:8]}", "lang": "en"})
    workdir = stack.scratch / name
    workdir.mkdir(parents=True, exist_ok=True)
    script = wrk.write_post_json_script(workdir / "hit.lua", body)
    shared: dict[str, int] = {}
    if stack.redis is not None and stack.redis.process is not None:
        # Only a Redis this run started: a shared one's CPU includes other people's work.
        shared[REDIS] = stack.redis.process.pid
    with contextlib.ExitStack() as meshes:
        targets: list[Target] = []
        for n, variant in enumerate(variants, start=1):
            print(f"==> starting the mesh of {variant.label}", flush=True)
            mesh = meshes.enter_context(
                replica_mesh(
                    stack,
                    variant.replicas,
                    {"GATEWAY_CONCURRENCY": str(variant.concurrency)},
                    f"{workdir.name}-{n}",
                    variant.service_env,
                )
            )
            targets.append(_target(variant, mesh, body))

        def drive(target: Target, duration: float) -> tuple[wrk.WrkResult, float]:
            return wrk.run_with_cpu(
                wrk_binary, target.url, script, duration, WRK_THREADS, WRK_CONNECTIONS
            )

        for target in targets:
            drive(target, warmup)
        runs: list[Run] = []
        for _ in range(rounds):
            for target in targets:
                with CpuWindow({**target.pids, **shared}) as cpu:
                    result, wrk_cpu = drive(target, seconds)
                runs.append(Run(target.variant.label, result, {**cpu.used, WRK: wrk_cpu}))
    kinds = {t.variant.label: {**t.kinds, **{name: name for name in shared}} for t in targets}
    workers = {t.variant.label: t.workers for t in targets}
    return Report(list(variants), kinds, workers, runs, rounds, seconds, warmup)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _by_kind(run: Run, kinds: Mapping[str, str]) -> dict[str, float | None]:
    """µs of CPU per request by process kind (replicas summed) for one run, then "total" (the
    mesh's processes, wrk's excluded) and WRK."""
    requests = run.result.requests
    if not run.cpu.keys() - {WRK}:  # no /proc: every figure n/a
        return {"total": None, WRK: per_unit_us(run.cpu.get(WRK), requests)}
    seconds: dict[str, float] = {}
    for name, kind in kinds.items():
        if name in run.cpu:
            seconds[kind] = seconds.get(kind, 0.0) + run.cpu[name]
    rows = {kind: per_unit_us(seconds[kind], requests) for kind in KINDS if kind in seconds}
    rows["total"] = per_unit_us(sum(seconds.values()), requests)
    rows[WRK] = per_unit_us(run.cpu.get(WRK), requests)
    return rows


def summarize(report: Report, baseline: Variant = BASELINE) -> dict[str, Any]:
    """Medians per variant, CPU per request by process kind and by process, the ratios to the
    baseline (by default one process per service, Envoy one worker per core), and the
    reading."""
    out: dict[str, Any] = {}
    for variant in report.variants:
        mine = [run for run in report.runs if run.variant == variant.label]
        if not mine:
            raise BenchError(f"no runs of {variant.label}")
        results = [run.result for run in mine]
        kinds = report.kinds[variant.label]
        per_run = [_by_kind(run, kinds) for run in mine]
        columns = list(dict.fromkeys(key for rows in per_run for key in rows))
        out[variant.label] = {
            "summary": variant.summary,
            "processes": {s: variant.processes(s) for s in SERVICES},
            "gateway_concurrency": variant.concurrency,
            "envoy_workers": report.workers.get(variant.label),
            **wrk.summarize_rounds(results),
            "cpu_us_per_request": {
                key: median_known([rows.get(key) for rows in per_run]) for key in columns
            },
            "cpu_us_per_request_by_process": {
                name: median_known(
                    [per_unit_us(run.cpu.get(name), run.result.requests) for run in mine]
                )
                for name in kinds
            },
        }
    base = out.get(baseline.label)
    ratios: dict[str, dict[str, float | None]] = {}
    if base is not None:
        for label, v in out.items():
            if label != baseline.label:
                ratios[label] = {
                    "rps": _ratio(v["rps"], base["rps"]),
                    "p99": _ratio(v["p99_ms"], base["p99_ms"]),
                    "cpu_per_request": _ratio(
                        v["cpu_us_per_request"].get("total"),
                        base["cpu_us_per_request"].get("total"),
                    ),
                }
    figures: dict[str, Any] = {
        "cores": report.cores,
        "threads": WRK_THREADS,
        "connections": WRK_CONNECTIONS,
        "rounds": report.rounds,
        "seconds": report.seconds,
        "warmup_seconds": report.warmup,
        "baseline": baseline.label,
        "variants": out,
        "ratios": ratios,
    }
    figures["reading"] = reading(figures)
    return figures


def _x(value: float | None) -> str:
    return "x n/a" if value is None else f"x{value:.2f}"


def _describe(variant: Mapping[str, Any]) -> str:
    if variant.get("summary"):
        return str(variant["summary"])
    extra = [s for s, n in variant["processes"].items() if n > 1]
    if extra:
        counts = sorted({variant["processes"][s] for s in extra})
        many = "/".join(str(n) for n in counts)
        return f"{many} processes of {' and '.join(extra)}"
    workers = variant["gateway_concurrency"]
    return f"Envoy with {workers} worker{'s' if workers != 1 else ''}"


def reading(figures: Mapping[str, Any]) -> str:
    """One line: each variant against the baseline, in RPS, p99 and CPU per request."""
    cores = figures["cores"]
    parts = [
        f"{_describe(figures['variants'][label])}: RPS {_x(r['rps'])}, p99 {_x(r['p99'])}, "
        f"CPU/request {_x(r['cpu_per_request'])}"
        for label, r in figures["ratios"].items()
    ]
    base = figures["variants"].get(figures["baseline"], {})
    against = base.get("summary") or figures["baseline"]
    return f"on {cores if cores else '?'} cores, against {against}: " + "; ".join(parts)


def print_processes(
    figures: Mapping[str, Any], title: str = "Processes per service and Envoy workers"
) -> None:
    variants: dict[str, Any] = figures["variants"]
    print(
        f"{title}: cache-hit POST /api/generate through a mesh "
        f"per variant,\nwrk -t{figures['threads']} -c{figures['connections']}, "
        f"{figures['rounds']} x {figures['seconds']:g} s per variant after a "
        f"{figures['warmup_seconds']:g} s warm-up of each, alternating; medians; "
        f"{figures['cores']} cores"
    )
    width = max(len("variant"), *(len(label) for label in variants))
    header = (
        f"{'variant':<{width}} {'gen/quo/tel':>11} {'envoy wk':>8} {'req/s':>8} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>7} {'sock err':>8}"
    )
    print(header)
    print("-" * len(header))
    for label, v in variants.items():
        procs = "/".join(str(v["processes"][s]) for s in SERVICES)
        workers = "n/a" if v["envoy_workers"] is None else str(v["envoy_workers"])
        print(
            f"{label:<{width}} {procs:>11} {workers:>8} {v['rps']:>8,.0f} {v['p50_ms']:>7.2f} "
            f"{v['p99_ms']:>7.2f} {v['non_2xx']:>7} {v['socket_errors']:>8}"
        )
    print()
    columns = [k for k in KINDS if any(k in v["cpu_us_per_request"] for v in variants.values())]
    columns += ["total", WRK]
    names = {"generation": "gen", "telemetry": "telem", "total": "mesh"}
    header = f"{'CPU µs per request':<{width}} " + " ".join(
        f"{names.get(c, c):>7}" for c in columns
    )
    print(header)
    print("-" * len(header))
    for label, v in variants.items():
        cells = " ".join(fmt(v["cpu_us_per_request"].get(c), 7, 0) for c in columns)
        print(f"{label:<{width}} {cells}")
    print(
        "  medians over the rounds; each kind sums its processes; mesh = every kind but wrk "
        "(the simulator and PostgreSQL left out)"
    )
    print(figures["reading"])
