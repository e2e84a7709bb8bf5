"""Running wrk (https://github.com/wg/wrk) and reading its report.

wrk, not a Python client: one Python process cannot load Envoy enough to show a few
microseconds of extra work per request, and its own CPU would compete with the mesh for the
same cores. wrk sends HTTP/1.1 keep-alive requests from a fixed number of connections.
"""

from __future__ import annotations

import re
import resource
import shutil
import statistics
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stats import median_known, per_unit_us, share_percent

INSTALL_HINT = (
    "wrk is not installed, so the sections that load Envoy are skipped: "
    "apt-get install -y wrk (Debian/Ubuntu) or brew install wrk (macOS), then run again"
)

# The latency percentiles a script with `latency_dump()` prints when wrk is done: enough
# points to draw the distribution, the tail included.
LATENCY_POINTS = (0, 1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97.5, 99, 99.5, 99.9, 100)
_DUMP_TAG = "GENMESH_LATENCY"
_DUMP = re.compile(rf"^{_DUMP_TAG} ([\d.]+) (\d+)$", re.MULTILINE)

# wrk prints durations with these units (src/units.c: us, ms, s, then m and h).
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_TIME = r"([\d.]+)(us|ms|s|m|h)"
_PERCENTILE = re.compile(rf"^\s*(50|99)%\s+{_TIME}\s*$", re.MULTILINE)
_REQUESTS = re.compile(rf"^\s*(\d+) requests in {_TIME},", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)\s*$", re.MULTILINE)
# wrk counts a response as an error when its status is above 399 (it calls them "Non-2xx or
# 3xx responses"); this API answers 1xx/3xx never, so the count is the non-2xx count.
_NON_2XX = re.compile(r"^\s*Non-2xx or 3xx responses: (\d+)\s*$", re.MULTILINE)
_SOCKET_ERRORS = re.compile(
    r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)\s*$", re.MULTILINE
)


class WrkError(RuntimeError):
    """wrk failed or printed something this module cannot read; the message holds its output."""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    # connect + read + write errors and timeouts (requests slower than wrk's --timeout).
    socket_errors: int
    # Percentile ("99.9") -> ms, when the script ended with `latency_dump()`.
    distribution_ms: dict[str, float] = field(default_factory=dict)


def binary() -> str | None:
    return shutil.which("wrk")


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNIT_MS[unit]


def parse(output: str) -> WrkResult:
    """Read the report `wrk --latency` prints."""
    percentiles = {m[1]: _ms(m[2], m[3]) for m in _PERCENTILE.finditer(output)}
    requests = _REQUESTS.search(output)
    rps = _RPS.search(output)
    if requests is None or rps is None or set(percentiles) != {"50", "99"}:
        raise WrkError(f"unexpected wrk output (was --latency given?):\n{output}")
    non_2xx = _NON_2XX.search(output)
    socket_errors = _SOCKET_ERRORS.search(output)
    return WrkResult(
        requests=int(requests[1]),
        seconds=_ms(requests[2], requests[3]) / 1000,
        rps=float(rps[1]),
        p50_ms=percentiles["50"],
        p99_ms=percentiles["99"],
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(map(int, socket_errors.groups())) if socket_errors else 0,
        distribution_ms={f"{float(m[1]):g}": int(m[2]) / 1000 for m in _DUMP.finditer(output)},
    )


def post_json_script(body: str) -> str:
    """A wrk Lua script sending `body` as a JSON POST on every request. The body goes in a
    Lua long bracket string (no escapes to get wrong), of a level its text does not close."""
    level = 0
    while f"]{'=' * level}]" in body:
        level += 1
    eq = "=" * level
    return (
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [{eq}[{body}]{eq}]\n"
    )


def latency_dump() -> str:
    """Lua to append to a script (one that defines no `done` of its own): when the run is over,
    wrk prints the latency at each of LATENCY_POINTS, which `parse` reads."""
    points = ", ".join(f"{p:g}" for p in LATENCY_POINTS)
    return (
        "\nfunction done(summary, latency, requests)\n"
        f"  for _, p in ipairs({{{points}}}) do\n"
        f'    io.write(string.format("{_DUMP_TAG} %g %d\\n", p, latency:percentile(p)))\n'
        "  end\n"
        "end\n"
    )


def paced(delay_ms: float) -> str:
    """Lua to append to a script: each connection waits `delay_ms` after every answer before
    its next request, so C connections send about C / (latency + delay) requests a second."""
    return f"\nfunction delay()\n  return {max(0, round(delay_ms))}\nend\n"


def write_post_json_script(path: Path, body: str, *, dump: bool = False) -> Path:
    path.write_text(post_json_script(body) + (latency_dump() if dump else ""))
    return path


def run(
    wrk: str,
    url: str,
    script: Path,
    seconds: float,
    threads: int = 2,
    connections: int = 32,
) -> WrkResult:
    """One wrk run against `url`; raises WrkError when wrk fails."""
    command = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    if done.returncode != 0:
        raise WrkError(f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr}")
    return parse(done.stdout)


def children_cpu_seconds() -> float:
    """User + system CPU time of this process's children that have exited and been waited for
    (getrusage RUSAGE_CHILDREN). A child still running (the mesh's processes) is not counted,
    so the growth across `run` is the CPU of that wrk process."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_with_cpu(
    wrk: str,
    url: str,
    script: Path,
    seconds: float,
    threads: int = 2,
    connections: int = 32,
) -> tuple[WrkResult, float]:
    """`run`, and the CPU seconds wrk itself used: on a machine whose cores the load generator
    shares with the processes it drives, that says how much of them it took."""
    before = children_cpu_seconds()
    result = run(wrk, url, script, seconds, threads=threads, connections=connections)
    return result, children_cpu_seconds() - before


def summarize_rounds(results: Sequence[WrkResult]) -> dict[str, Any]:
    """The figures every wrk-driven table reports for a variant's rounds: medians of RPS, p50
    and p99 (and each round's RPS), the non-2xx answers, socket errors and requests summed."""
    return {
        "rps": statistics.median(r.rps for r in results),
        "rps_rounds": [r.rps for r in results],
        "p50_ms": statistics.median(r.p50_ms for r in results),
        "p99_ms": statistics.median(r.p99_ms for r in results),
        "non_2xx": sum(r.non_2xx for r in results),
        "socket_errors": sum(r.socket_errors for r in results),
        "requests": sum(r.requests for r in results),
    }


def median_distribution(results: Sequence[WrkResult]) -> dict[str, float]:
    """Per latency point of the rounds' dumps, the median over the rounds."""
    points = results[0].distribution_ms.keys()
    return {
        p: statistics.median(r.distribution_ms[p] for r in results if p in r.distribution_ms)
        for p in points
    }


def cpu_medians(rounds: Sequence[tuple[WrkResult, Mapping[str, float]]]) -> dict[str, Any]:
    """Per process, over a variant's rounds (each wrk's result and the CPU seconds each process
    used meanwhile): the median CPU µs per request and the median share of a core."""
    names = list(rounds[0][1])
    return {
        "cpu_us_per_request": {
            n: median_known([per_unit_us(cpu.get(n), result.requests) for result, cpu in rounds])
            for n in names
        },
        "cpu_percent": {
            n: median_known([share_percent(cpu.get(n), result.seconds) for result, cpu in rounds])
            for n in names
        },
    }
