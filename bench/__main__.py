"""`make bench` (python -m bench): the project's measuring instrument. It starts what it
measures — a private mesh (its own PostgreSQL database and Redis key prefix, free ports, the
simulator as the upstream with a fixed latency) and, for the ceiling, a trivial echo gRPC
service behind an Envoy running the mesh's own config plus an echo route — and prints, from one
run, with a warm-up and the median of alternating rounds:

- ceiling: REST POST /api/echo to the echo service and cache-hit POST /api/generate, both
  through that Envoy, and the shape's floor (a cache hit's hops and Redis round trips with no
  code at them, bench/floor_server.py), wrk at BENCH_CONNECTIONS connections, alternating:
  RPS, p50, p99, non-2xx, the cache-hit's and the floor's RPS as shares of the ceiling's, and
  each process's CPU per request (bench/ceiling.py);
- miss: sequential cache misses through the mesh, then through the shape's floor, against the
  same chat completion sent to the simulator directly: the latency each adds, median and p99
  (bench/misses.py);
- quota: reserve + settle pairs (a miss's), consumes (a hit's) and the floor's quota call, per
  second of one process over gRPC, for guests, alternating (bench/quota.py);
- ratelimit: ShouldRateLimit decisions per second of one quota process (bench/ratelimit.py);
- limits: cache-hit generate through the mesh's Envoy and a second one with
  GATEWAY_RATE_LIMIT=false, alternating: what the limits cost (bench/limits_cost.py);
- processes: cache-hit generate through three meshes started for the section, alternating:
  one process per service with Envoy at 1 worker (GATEWAY_CONCURRENCY=1, as deploy/k8s) and
  at one worker per core (0, the `make run` default), and two processes of generation and of
  quota: RPS, p50, p99 and the CPU per request of each kind of process (bench/processes.py);
- tracing: the same with tracing as deployed without a collector, one trace in ten exported
  and every trace exported to a sink in the bench: what tracing costs (bench/tracing_cost.py);
- validation: protovalidate's CPU per call on a cache hit's messages, in-process, beside each
  service's CPU per hit from the ceiling section (bench/validation_cost.py);
- events: committed funnel events per second through POST /api/events, through the floor's,
  and INSERTed one row at a time (bench/events.py);
- scenarios: every REST scenario through Envoy with an httpx client (bench/scenarios.py);
- singleflight: bursts of identical against distinct cache misses (bench/singleflight.py);

then the RSS of every process at the start and the end, and each figure against the goals of
issue 9 (met / NOT met). The results are also written as JSON to bench/results/<UTC time>.json
and bench/results/latest.json, and drawn (latency distributions, the ratio to the ceiling) to
the .png beside them. `make soak` (bench/soak.py) is the long-running variant.

The services run with their deployed defaults (LOG_LEVEL=INFO, GEN_MAX_INFLIGHT=25), every
rate limit and the guests' daily quota raised so that nothing is refused for policy. The
machine is shared by the load generator and every process: quote the ratios.

Settings (environment):
  BENCH_SECTIONS          comma list of sections to run (default: all, in the order above)
  BENCH_ROUNDS            alternating rounds per variant, medians reported (3)
  BENCH_WRK_SECONDS       each wrk run of the ceiling, limits, processes and tracing sections (8)
  BENCH_WARMUP_SECONDS    warm-up of each variant before its rounds (2)
  BENCH_CONNECTIONS       wrk connections of the ceiling section (32)
  BENCH_SIM_LATENCY_MS    fixed latency of the simulator's answers (50)
  BENCH_MISSES            sequential miss pairs measured, after 20 warm-up pairs (200)
  BENCH_QUOTA_SECONDS     each quota-reservation round (4)
  BENCH_QUOTA_INFLIGHT    reservation pairs in flight (16)
  BENCH_RLS_SECONDS       each rate-limit decisions round (4)
  BENCH_EVENTS_SECONDS    each funnel-events round (8)
  BENCH_REQUESTS          requests per REST scenario (400)
  BENCH_CONCURRENCY       concurrency of the REST scenarios (16)
  BENCH_BURST             concurrent misses per single-flight burst (16)
  BENCH_BURST_ROUNDS      single-flight rounds (5)
  BENCH_GEN_MAX_INFLIGHT  generation's GEN_MAX_INFLIGHT (default: the service's, 25)
  BENCH_LOG_LEVEL         the services' LOG_LEVEL (default: the services', INFO)
  BENCH_RESULTS_DIR       where the JSON and PNG go (bench/results)
  BENCH_KEEP_LOGS         1: keep the run's logs and rendered configs (kept after a failure)

wrk (apt-get install -y wrk; brew install wrk) loads Envoy; without it the ceiling, limits,
processes, tracing and events sections are skipped and the hint says how to install it.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

from bench import goals, memory, plot, results, wrk
from bench.bounds import print_bounds
from bench.errors import BenchError
from bench.proc import rss_snapshot
from bench.sections import NEEDS_WRK, SECTIONS
from bench.settings import BenchSettings, SettingError
from bench.stack import mesh_env, private_stack
from devstack.infra import InfraError


def _title(name: str) -> None:
    line = f"== {name} "
    print(f"\n{line}{'=' * max(0, 96 - len(line))}", flush=True)


def run(settings: BenchSettings) -> dict[str, Any]:
    chosen = list(settings.sections)
    if wrk.binary() is None and NEEDS_WRK & set(chosen):
        print(f"NOTE: {wrk.INSTALL_HINT}")
        chosen = [name for name in chosen if name not in NEEDS_WRK]
    started = datetime.now(UTC)
    env = mesh_env(settings.sim_latency_ms, settings.gen_max_inflight, settings.log_level)
    document: dict[str, Any] = {
        "started": started.isoformat(),
        "machine": results.machine(),
        "settings": {k: str(v) for k, v in vars(settings).items()},
        "sections": {},
    }
    sections: dict[str, Any] = document["sections"]
    with private_stack(
        env,
        with_echo="ceiling" in chosen,
        with_floor=bool({"ceiling", "miss", "quota", "events"} & set(chosen)),
    ) as stack:
        print(
            f"==> sections: {', '.join(chosen) or 'none'}; {os.cpu_count()} cores; simulated "
            f"upstream latency {settings.sim_latency_ms} ms; every rate limit raised",
            flush=True,
        )
        stack.figures = sections
        rss_start = rss_snapshot(stack.processes())
        for name in chosen:
            _title(name)
            began = time.monotonic()
            sections[name] = SECTIONS[name](stack, settings)
            sections[name]["elapsed_seconds"] = round(time.monotonic() - began, 1)
            print(f"({name}: {sections[name]['elapsed_seconds']:.0f} s)", flush=True)
        rss_end = rss_snapshot(stack.processes())
        _title("memory")
        rss = memory.table({"start": rss_start, "end": rss_end})
        memory.print_rss(rss)
    document["rss"] = rss
    verdicts = goals.judge(sections, rss)
    _title("goals")
    goals.print_goals(verdicts, os.cpu_count())
    print("  RSS growth after 10 minutes at half capacity: make soak")
    document["goals"] = goals.as_json(verdicts)
    document["bounds"] = print_bounds(sections, os.cpu_count())
    document["finished"] = datetime.now(UTC).isoformat()
    return document


def main() -> int:
    try:
        settings = BenchSettings.from_env()
    except SettingError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    try:
        document = run(settings)
    except (InfraError, BenchError, wrk.WrkError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    name = results.stamp(datetime.fromisoformat(document["started"]))
    path = results.write(settings.results_dir, name, document)
    png = plot.draw(document["sections"], document["machine"], path.with_suffix(".png"))
    if png is not None:
        (settings.results_dir / "latest.png").write_bytes(png.read_bytes())
    print(f"\nresults: {path}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
