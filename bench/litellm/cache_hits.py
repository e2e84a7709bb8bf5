"""Cache-hit chat completions through the LiteLLM proxy, measured as bench/ceiling.py measures
genmesh's cache-hit generate: one fixed prompt, cached by a first request, then wrk at
BENCH_CONNECTIONS connections, a warm-up, BENCH_ROUNDS rounds of BENCH_WRK_SECONDS; the medians
of requests/s, p50 and p99, the non-2xx answers, and the CPU per request of each process.

Every answer must come from LiteLLM's cache: the simulator's request counter, read before and
after the rounds, says how many reached it (0 when every one was a hit)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import wrk
from bench.ceiling import THREADS, WRK
from bench.errors import BenchError
from bench.misses import upstream_body
from bench.proc import CpuWindow
from bench.stats import fmt

LABEL = "LiteLLM cache hit"
PATH = "/v1/chat/completions"
# LiteLLM names the cache entry it answered from in this header, on hits only.
CACHE_KEY_HEADER = "x-litellm-cache-key"


@dataclass(frozen=True)
class Round:
    result: wrk.WrkResult
    # CPU seconds by process name during the round, wrk's included (WRK).
    cpu: dict[str, float]


def _post(url: str, body: str) -> httpx.Response:
    reply = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
    if reply.status_code != 200:
        raise BenchError(f"POST {url} -> {reply.status_code} {reply.text[:300]}")
    return reply


def upstream_requests(simulator_url: str) -> int:
    """Chat completions the simulator has been asked for since it started."""
    count: int = httpx.get(f"{simulator_url}/_sim/stats", timeout=10).json()["requests"]
    return count


def measure(
    wrk_binary: str,
    proxy_url: str,
    simulator_url: str,
    pids: dict[str, int],
    workdir: Path,
    rounds: int,
    seconds: float,
    warmup: float,
    connections: int,
) -> tuple[list[Round], int]:
    """The rounds, and how many requests reached the simulator during them."""
    body = json.dumps(upstream_body(f"bench litellm hit {uuid.uuid4().hex[:8]}"))
    url = f"{proxy_url}{PATH}"
    _post(url, body)  # fills the cache
    if CACHE_KEY_HEADER not in _post(url, body).headers:
        raise BenchError(f"POST {url}: the second identical request was not a cache hit")
    script = wrk.write_post_json_script(workdir / "litellm-hit.lua", body, dump=True)
    wrk.run(wrk_binary, url, script, warmup, THREADS, connections)
    before = upstream_requests(simulator_url)
    runs: list[Round] = []
    for _ in range(rounds):
        with CpuWindow(pids) as cpu:
            result, wrk_cpu = wrk.run_with_cpu(
                wrk_binary, url, script, seconds, THREADS, connections
            )
        runs.append(Round(result, {**cpu.used, WRK: wrk_cpu}))
    return runs, upstream_requests(simulator_url) - before


def summarize(runs: list[Round], connections: int, upstream: int) -> dict[str, Any]:
    """The same figures bench/ceiling.py gives each of its variants."""
    results = [run.result for run in runs]
    return {
        "connections": connections,
        **wrk.summarize_rounds(results),
        "upstream_requests": upstream,
        "distribution_ms": wrk.median_distribution(results),
        **wrk.cpu_medians([(run.result, run.cpu) for run in runs]),
    }


def print_hits(figures: dict[str, Any], rounds: int, seconds: float, warmup: float) -> None:
    print(
        f"Cache-hit POST {PATH} through the LiteLLM proxy (Redis cache), wrk -t{THREADS} "
        f"-c{figures['connections']}, {rounds} x {seconds:g} s after a {warmup:g} s warm-up; "
        "medians"
    )
    header = (
        f"{'variant':<22} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} "
        f"{'socket errors':>13}"
    )
    print(header)
    print("-" * len(header))
    print(
        f"{LABEL:<22} {figures['rps']:>9,.0f} {figures['p50_ms']:>8.2f} "
        f"{figures['p99_ms']:>8.2f} {figures['non_2xx']:>8} {figures['socket_errors']:>13}"
    )
    rounds_text = ", ".join(f"{r:,.0f}" for r in figures["rps_rounds"])
    print(
        f"  req/s per round: {rounds_text}; requests that reached the simulator during the "
        f"rounds: {figures['upstream_requests']}"
    )
    cpu = ", ".join(
        f"{name} {fmt(us, 0)} µs ({fmt(figures['cpu_percent'].get(name), 0, 0)} % core)"
        for name, us in figures["cpu_us_per_request"].items()
    )
    print(f"  CPU per request, medians: {cpu}")
