"""The ceiling and the cache-hit generate path, in `make bench`: REST POST /api/echo (the
trivial grpc.aio echo service, bench/echo_server.py) and cache-hit POST /api/generate, both
through the bench's Envoy (the mesh's config plus the echo route, bench/gateway.py), and,
when the run has one, the shape's floor (bench/floor_server.py: the hops and Redis round
trips of a cache hit with trivial code at each, behind an Envoy of its own with the rate
limit filter on), driven alternately with wrk at the same connection count, after a warm-up
of each.

Per variant: the medians over rounds of requests/s, p50 and p99, the non-2xx answers and
socket errors summed, and the CPU time each process used per request (Envoy, echo, generation,
quota, telemetry, the floor's, wrk itself); then the cache-hit RPS and the floor's as shares of
the ceiling's.
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
from bench.floor_server import CACHED_TEXT
from bench.proc import CpuWindow
from bench.stats import fmt

THREADS = 2
ECHO = "echo (ceiling)"
HIT = "cache-hit generate"
FLOOR = "floor (shape, no code)"
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


def variants(gateway_url: str, workdir: Path, floor_url: str | None = None) -> list[Variant]:
    """The variants, each probed: echo answers, generate answers from its cache (the first
    request fills it), and the floor (when given) answers with its cached text."""
    text = f"bench ceiling {uuid.uuid4().hex[:8]}"
    body = json.dumps({"text": text, "lang": "en"})
    echo_url, generate_url = f"{gateway_url}/api/echo", f"{gateway_url}/api/generate"
    if _probe(echo_url, body).get("text") != text:
        raise BenchError(f"POST {echo_url} did not echo the text")
    _probe(generate_url, body)
    if _probe(generate_url, body).get("cached") is not True:
        raise BenchError(f"POST {generate_url}: the second identical request was not a cache hit")
    chosen = [
        Variant(ECHO, echo_url, wrk.write_post_json_script(workdir / "echo.lua", body, dump=True)),
        Variant(
            HIT, generate_url, wrk.write_post_json_script(workdir / "hit.lua", body, dump=True)
        ),
    ]
    if floor_url is not None:
        url = f"{floor_url}/api/echo"
        if _probe(url, body).get("text") != CACHED_TEXT:
            raise BenchError(f"POST {url} did not answer with the floor's cached text")
        script = wrk.write_post_json_script(workdir / "floor.lua", body, dump=True)
        chosen.append(Variant(FLOOR, url, script))
    return chosen


def measure(
    wrk_binary: str,
    gateway_url: str,
    pids: dict[str, int],
    workdir: Path,
    rounds: int,
    seconds: float,
    warmup: float,
    connections: int,
    floor_url: str | None = None,
) -> list[Run]:
    """Warm each variant up, then alternate them `rounds` times."""
    chosen = variants(gateway_url, workdir, floor_url)

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
    for label in (ECHO, HIT, FLOOR):
        mine = [run for run in runs if run.variant == label]
        if not mine:  # no floor in this run
            continue
        results = [run.result for run in mine]
        out[label] = {
            **wrk.summarize_rounds(results),
            "distribution_ms": wrk.median_distribution(results),
            **wrk.cpu_medians([(run.result, run.cpu) for run in mine]),
        }
    echo, hit = out[ECHO], out[HIT]
    figures: dict[str, Any] = {
        "connections": connections,
        "variants": out,
        "ratio": _share(hit, echo),
        "ratio_rounds": _shares(hit, echo),
    }
    if FLOOR in out:
        figures["floor_ratio"] = _share(out[FLOOR], echo)
        figures["floor_ratio_rounds"] = _shares(out[FLOOR], echo)
    return figures


def _share(variant: dict[str, Any], ceiling: dict[str, Any]) -> float | None:
    rps: float = variant["rps"]
    return rps / ceiling["rps"] if ceiling["rps"] else None


def _shares(variant: dict[str, Any], ceiling: dict[str, Any]) -> list[float]:
    pairs = zip(variant["rps_rounds"], ceiling["rps_rounds"], strict=True)
    return [v / c for v, c in pairs if c]


# Column headings of the CPU table, by variant.
_SHORT = {ECHO: "echo", HIT: "hit", FLOOR: "floor"}


def print_ceiling(figures: dict[str, Any], rounds: int, seconds: float, warmup: float) -> None:
    out = figures["variants"]
    labels = [label for label in (ECHO, HIT, FLOOR) if label in out]
    connections = figures["connections"]
    print(
        f"Ceiling, cache-hit generate and the shape's floor through Envoy (the mesh's config + "
        f"an echo route), wrk -t{THREADS} -c{connections}, {rounds} x {seconds:g} s per variant "
        f"after a {warmup:g} s warm-up of each, alternating; medians"
    )
    header = (
        f"{'variant':<22} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} "
        f"{'socket errors':>13}"
    )
    print(header)
    print("-" * len(header))
    for label in labels:
        v = out[label]
        print(
            f"{label:<22} {v['rps']:>9,.0f} {v['p50_ms']:>8.2f} {v['p99_ms']:>8.2f} "
            f"{v['non_2xx']:>8} {v['socket_errors']:>13}"
        )
    rounds_text = ", ".join(f"{r:.3f}" for r in figures["ratio_rounds"])
    print(f"cache-hit / ceiling = {fmt(figures['ratio'], 0, 3)} (per round: {rounds_text})")
    if "floor_ratio" in figures:
        rounds_text = ", ".join(f"{r:.3f}" for r in figures["floor_ratio_rounds"])
        print(
            f"floor / ceiling     = {fmt(figures['floor_ratio'], 0, 3)} (per round: "
            f"{rounds_text}): the most a cache hit can reach with every hop and Redis round "
            "trip it needs and no code at them"
        )
    print()
    header = f"{'CPU per request, medians':<26}" + "".join(
        f" {_SHORT[label] + ' µs':>9}" for label in labels
    )
    header += "".join(f" {_SHORT[label] + ' % core':>12}" for label in labels)
    print(header)
    print("-" * len(header))
    names = list(dict.fromkeys(n for label in labels for n in out[label]["cpu_us_per_request"]))
    totals = dict.fromkeys(labels, 0.0)
    for name in names:
        cells, shares = "", ""
        for label in labels:
            value = out[label]["cpu_us_per_request"].get(name)
            cells += " " + fmt(value, 9)
            totals[label] += value or 0.0
            shares += " " + fmt(out[label]["cpu_percent"].get(name), 12, 0)
        print(f"{name:<26}{cells}{shares}")
    print(f"{'all of the above':<26}" + "".join(" " + fmt(totals[x], 9) for x in labels))
    print("  % core: CPU time / wall time x 100 (the machine is 100 x its cores)")
