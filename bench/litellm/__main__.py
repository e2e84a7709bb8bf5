"""`make bench-litellm` (python -m bench.litellm): the LiteLLM proxy beside genmesh, measured the
same way in the same run. It starts bench.stack's private mesh (whose simulator answers after
BENCH_SIM_LATENCY_MS) and, pointed at that same simulator, the LiteLLM proxy from .venv-litellm
(one uvicorn worker, its response cache in the mesh's Redis under a namespace of the run's own,
no master key, no database); then prints:

- genmesh: `make bench`'s own `ceiling` (echo and cache-hit generate through Envoy) and `miss`
  sections (bench/sections.py), unless BENCH_LITELLM_GENMESH=0;
- LiteLLM cache hit: one cached chat completion, wrk at BENCH_CONNECTIONS connections,
  BENCH_ROUNDS x BENCH_WRK_SECONDS after a BENCH_WARMUP_SECONDS warm-up: req/s, p50, p99,
  non-2xx, CPU per request (bench/litellm/cache_hits.py);
- LiteLLM miss: BENCH_MISSES sequential new prompts through the proxy against the same chat
  completion sent to the simulator directly, after 20 warm-up pairs: the latency the proxy
  adds, median and p99 (bench/misses.py's pairs, bench/litellm/cache_misses.py);
- both side by side.

Results: bench/results/<UTC time>-litellm.json and latest-litellm.json. Everything started is
stopped and the cache entries deleted at the end, after an error or Ctrl-C too.

Settings (environment): the BENCH_* of `make bench` above (bench/__main__.py), and
  BENCH_LITELLM_BIN       the proxy's CLI (default: .venv-litellm/bin/litellm)
  BENCH_LITELLM_GENMESH   1: also genmesh's ceiling and miss sections (default); 0: LiteLLM only
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

from bench import results, wrk
from bench.errors import BenchError
from bench.litellm import cache_hits, cache_misses, report
from bench.litellm.settings import LitellmSettings
from bench.litellm.stack import LitellmSide, litellm_beside
from bench.sections import SECTIONS
from bench.settings import BenchSettings, SettingError
from bench.stack import Stack, mesh_env, private_stack
from devstack.infra import InfraError

# genmesh's sections the comparison needs, in the order they run.
GENMESH_SECTIONS = ("ceiling", "miss")
Figures = dict[str, Any]


def _title(name: str) -> None:
    line = f"== {name} "
    print(f"\n{line}{'=' * max(0, 96 - len(line))}", flush=True)


def _timed(name: str, measure: Callable[[], Figures]) -> Figures:
    _title(name)
    began = time.monotonic()
    figures = measure()
    figures["elapsed_seconds"] = round(time.monotonic() - began, 1)
    print(f"({name}: {figures['elapsed_seconds']:.0f} s)", flush=True)
    return figures


def _litellm_hits(wrk_binary: str, stack: Stack, side: LitellmSide, s: BenchSettings) -> Figures:
    runs, upstream = cache_hits.measure(
        wrk_binary,
        side.url,
        stack.config.simulator_url,
        side.pids,
        stack.scratch,
        s.rounds,
        s.wrk_seconds,
        s.warmup_seconds,
        s.connections,
    )
    figures = cache_hits.summarize(runs, s.connections, upstream)
    cache_hits.print_hits(figures, s.rounds, s.wrk_seconds, s.warmup_seconds)
    return figures


def _litellm_miss(stack: Stack, side: LitellmSide, s: BenchSettings) -> Figures:
    # The simulator serves both calls of a pair: its CPU is shown, not compared.
    pids = {**side.pids, "simulator": stack.pid("simulator")}
    config = stack.config
    return cache_misses.measure(
        side.url, config.simulator_url, config.simulator_api_key, s.misses, pids, s.sim_latency_ms
    )


def run(settings: BenchSettings, lite: LitellmSettings) -> Figures:
    if not lite.binary.exists():
        raise BenchError(f"{lite.binary} is missing: `make bench-litellm` builds .venv-litellm")
    wrk_binary = wrk.binary()
    if wrk_binary is None:
        print(f"NOTE: {wrk.INSTALL_HINT}")
    chosen = [
        name
        for name in GENMESH_SECTIONS
        if lite.with_genmesh and (wrk_binary is not None or name != "ceiling")
    ]
    s = settings
    env = mesh_env(s.sim_latency_ms, s.gen_max_inflight, s.log_level)
    document: Figures = {
        "started": datetime.now(UTC).isoformat(),
        "machine": results.machine(),
        "settings": {
            **{k: str(v) for k, v in vars(s).items() if k not in ("sections", "results_dir")},
            "genmesh_sections": chosen,
        },
    }
    genmesh: Figures = {}
    litellm: Figures = {}
    with (
        private_stack(env, with_echo="ceiling" in chosen) as stack,
        litellm_beside(stack, lite) as side,
    ):
        print(
            f"==> LiteLLM {side.version} at {side.url} (one worker, Redis cache) and genmesh, "
            f"against the same simulator ({s.sim_latency_ms} ms); {os.cpu_count()} cores",
            flush=True,
        )
        document["machine"]["litellm"] = side.version
        for name in chosen:
            genmesh[name] = _timed(f"genmesh: {name}", partial(SECTIONS[name], stack, s))
        if wrk_binary is not None:
            litellm["cache_hit"] = _timed(
                "LiteLLM: cache hit", partial(_litellm_hits, wrk_binary, stack, side, s)
            )
        litellm["miss"] = _timed("LiteLLM: miss", partial(_litellm_miss, stack, side, s))
    _title("genmesh and LiteLLM side by side")
    rows = report.comparison(genmesh, litellm)
    report.print_comparison(rows, side.version)
    document.update(
        {
            "litellm": {"version": side.version, "config": side.config, **litellm},
            "genmesh": genmesh,
            "comparison": rows,
            "finished": datetime.now(UTC).isoformat(),
        }
    )
    return document


def main() -> int:
    try:
        settings, lite = BenchSettings.from_env(), LitellmSettings.from_env()
    except SettingError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    try:
        document = run(settings, lite)
    except (InfraError, BenchError, wrk.WrkError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: everything the run started is stopped", file=sys.stderr)
        return 130
    started = datetime.fromisoformat(document["started"])
    print(f"\nresults: {report.write(settings.results_dir, started, document)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
