"""The ceiling and the cache-hit generate path, in `make bench`: REST POST /api/echo (the
trivial grpc.aio echo service, bench/echo_server.py) and cache-hit POST /api/generate, both
through the bench's Envoy (the mesh's config plus the echo route, bench/gateway.py), driven
alternately with wrk at the same connection count, after a warm-up of each.

Per variant: the medians over rounds of requests/s, p50 and p99, the non-2xx answers and
socket errors summed, and the CPU time each process used per request (Envoy, echo, generation,
quota, telemetry, wrk itself); then the cache-hit RPS as a share of the ceiling's.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import wrk
from bench.errors import BenchError
from bench.proc import CpuWindow
from bench.stats import fmt

THREADS = 2
ECHO = "echo (ceiling)"
HIT = "cache-hit generate"
WRK = "wrk (load generator)"


@dataclass(frozen=True)
class Variant:
    label: str
    url: str
    script: Path


@dataclass(frozen=True)
class Run:
    variant: str
    result: wrk.WrkResult
    # CPU seconds by process name during the run, wrk's included (WRK).
    cpu: dict[str, float]


def _probe(url: str, body: str) -> dict[str, Any]:
    reply = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
    if reply.status_code != 200:
        raise BenchError(f"POST {url} -> {reply.status_code} {reply.text[:300]}")
    answer: dict[str, Any] = reply.json()
    return answer


def variants(gateway_url: str, workdir: Path) -> list[Variant]:
    """The two variants, each probed: echo answers, and generate answers from its cache (the
    first request fills it)."""
    text = f"bench ceiling {uuid.uuid4().hex[:8]}"
    body = json.dumps({"text": text, "lang": "en"})
    echo_url, generate_url = f"{gateway_url}/api/echo", f"{gateway_url}/api/generate"
    if _probe(echo_url, body).get("text") != text:
        raise BenchError(f"POST {echo_url} did not echo the text")
    _probe(generate_url, body)
    if _probe(generate_url, body).get("cached") is not True:
        raise BenchError(f"POST {generate_url}: the second identical request was not a cache hit")
    return [
        Variant(ECHO, echo_url, wrk.write_post_json_script(workdir / "echo.lua", body, dump=True)),
        Variant(
            HIT, generate_url, wrk.write_post_json_script(workdir / "hit.lua", body, dump=True)
        ),
    ]


def measure(
    wrk_binary: str,
    gateway_url: str,
    pids: dict[str, int],
    workdir: Path,
    rounds: int,
    seconds: float,
    warmup: float,
    connections: int,
) -> list[Run]:
    """Warm each variant up, then alternate them `rounds` times."""
    chosen = variants(gateway_url, workdir)

    def drive(variant: Variant, duration: float) -> tuple[wrk.WrkResult, float]:
        return wrk.run_with_cpu(
            wrk_binary, variant.url, variant.script, duration, THREADS, connections
        )

    for variant in chosen:
        drive(variant, warmup)
    runs: list[Run] = []
    for _ in range(rounds):
        for variant in chosen:
            with CpuWindow(pids) as cpu:
                result, wrk_cpu = drive(variant, seconds)
            runs.append(Run(variant.label, result, {**cpu.used, WRK: wrk_cpu}))
    return runs


def summarize(runs: list[Run], connections: int) -> dict[str, Any]:
    """Medians per variant, CPU per request per process, and the ratio to the ceiling."""
    out: dict[str, Any] = {}
    for label in (ECHO, HIT):
        mine = [run for run in runs if run.variant == label]
        results = [run.result for run in mine]
        out[label] = {
            **wrk.summarize_rounds(results),
            "distribution_ms": wrk.median_distribution(results),
            **wrk.cpu_medians([(run.result, run.cpu) for run in mine]),
        }
    echo, hit = out[ECHO], out[HIT]
    per_round = [h / e for h, e in zip(hit["rps_rounds"], echo["rps_rounds"], strict=True) if e]
    return {
        "connections": connections,
        "variants": out,
        "ratio": hit["rps"] / echo["rps"] if echo["rps"] else None,
        "ratio_rounds": per_round,
    }


def print_ceiling(figures: dict[str, Any], rounds: int, seconds: float, warmup: float) -> None:
    out = figures["variants"]
    connections = figures["connections"]
    print(
        f"Ceiling and cache-hit generate: both through the bench's Envoy (the mesh's config + "
        f"an echo route), wrk -t{THREADS} -c{connections}, {rounds} x {seconds:g} s per variant "
        f"after a {warmup:g} s warm-up of each, alternating; medians"
    )
    header = (
        f"{'variant':<22} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} "
        f"{'socket errors':>13}"
    )
    print(header)
    print("-" * len(header))
    for label in (ECHO, HIT):
        v = out[label]
        print(
            f"{label:<22} {v['rps']:>9,.0f} {v['p50_ms']:>8.2f} {v['p99_ms']:>8.2f} "
            f"{v['non_2xx']:>8} {v['socket_errors']:>13}"
        )
    rounds_text = ", ".join(f"{r:.3f}" for r in figures["ratio_rounds"])
    print(f"cache-hit / ceiling = {fmt(figures['ratio'], 0, 3)} (per round: {rounds_text})")
    print()
    header = (
        f"{'CPU per request, medians':<26} {'echo µs':>9} {'hit µs':>9} "
        f"{'echo % core':>11} {'hit % core':>10}"
    )
    print(header)
    print("-" * len(header))
    names = list(out[HIT]["cpu_us_per_request"])
    totals: dict[str, list[float]] = {ECHO: [], HIT: []}
    for name in names:
        cells = []
        for label in (ECHO, HIT):
            value = out[label]["cpu_us_per_request"].get(name)
            cells.append(fmt(value, 9))
            if value is not None:
                totals[label].append(value)
        shares = [
            fmt(out[label]["cpu_percent"].get(name), w, 0) for label, w in ((ECHO, 11), (HIT, 10))
        ]
        print(f"{name:<26} {cells[0]} {cells[1]} {shares[0]} {shares[1]}")
    print(f"{'all of the above':<26} {fmt(sum(totals[ECHO]), 9)} {fmt(sum(totals[HIT]), 9)}")
    print("  % core: CPU time / wall time x 100 (the machine is 100 x its cores)")
