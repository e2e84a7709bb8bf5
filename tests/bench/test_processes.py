"""`make bench`'s processes section (bench/processes.py) without a mesh: from fake runs, the
medians, the CPU per request summed by process kind (replicas together, wrk apart), the ratios
to the baseline and the reading; and the table prints."""

from __future__ import annotations

import json

import pytest

from bench import wrk
from bench.processes import (
    BASELINE,
    ONE_WORKER,
    REDIS,
    TWO_PROCESSES,
    VARIANTS,
    WRK,
    Report,
    Run,
    print_processes,
    summarize,
)
from bench.stack import replica_name

SECONDS = 8.0


def _result(rps: float, p99: float, non_2xx: int = 0) -> wrk.WrkResult:
    return wrk.WrkResult(
        requests=int(rps * SECONDS),
        seconds=SECONDS,
        rps=rps,
        p50_ms=p99 / 4,
        p99_ms=p99,
        non_2xx=non_2xx,
        socket_errors=0,
    )


def _kinds(replicas: dict[str, int]) -> dict[str, str]:
    kinds = {"envoy": "envoy", REDIS: REDIS}
    for service in ("quota", "telemetry", "generation"):
        for i in range(1, replicas.get(service, 1) + 1):
            kinds[replica_name(service, i)] = service
    return kinds


def _cpu(kinds: dict[str, str], requests: int, us: dict[str, float]) -> dict[str, float]:
    """CPU seconds per process such that each kind costs `us` µs per request, split evenly
    over its processes."""
    per_kind: dict[str, int] = {}
    for kind in kinds.values():
        per_kind[kind] = per_kind.get(kind, 0) + 1
    return {
        name: us[kind] * requests / 1e6 / per_kind[kind]
        for name, kind in kinds.items()
        if kind in us
    }


# Per variant and round: (rps, p99 ms); the rounds' medians are the middle ones.
ROUNDS = {
    ONE_WORKER.label: [(800.0, 10.0), (780.0, 11.0), (820.0, 9.0)],
    BASELINE.label: [(790.0, 10.0), (800.0, 10.0), (810.0, 10.0)],
    TWO_PROCESSES.label: [(600.0, 20.0), (560.0, 22.0), (580.0, 21.0)],
}
# µs of CPU per request by kind, the same every round.
COSTS = {
    ONE_WORKER.label: {"envoy": 400.0, "generation": 900.0, "quota": 500.0, "telemetry": 100.0},
    BASELINE.label: {"envoy": 500.0, "generation": 900.0, "quota": 500.0, "telemetry": 100.0},
    TWO_PROCESSES.label: {
        "envoy": 500.0,
        "generation": 1200.0,
        "quota": 700.0,
        "telemetry": 200.0,
        REDIS: 0.0,
    },
}


@pytest.fixture
def report() -> Report:
    kinds = {v.label: _kinds(dict(v.replicas)) for v in VARIANTS}
    runs = []
    for round_ in range(3):
        for variant in VARIANTS:  # alternating, as measure() runs them
            rps, p99 = ROUNDS[variant.label][round_]
            result = _result(rps, p99, non_2xx=1 if variant is TWO_PROCESSES else 0)
            cpu = _cpu(kinds[variant.label], result.requests, COSTS[variant.label])
            cpu[WRK] = 300e-6 * result.requests
            runs.append(Run(variant.label, result, cpu))
    workers = {ONE_WORKER.label: 1, BASELINE.label: 2, TWO_PROCESSES.label: 2}
    return Report(list(VARIANTS), kinds, workers, runs, 3, SECONDS, 2.0, cores=2)


def test_medians_and_cpu_by_kind(report: Report) -> None:
    figures = summarize(report)
    json.dumps(figures)  # JSON-able, for bench/results
    two = figures["variants"][TWO_PROCESSES.label]
    assert two["processes"] == {"quota": 2, "telemetry": 1, "generation": 2}
    assert (two["rps"], two["p99_ms"], two["p50_ms"]) == (580.0, 21.0, 5.25)
    assert two["rps_rounds"] == [600.0, 560.0, 580.0]
    assert two["non_2xx"] == 3
    cpu = two["cpu_us_per_request"]
    # The two replicas of a service are one kind; wrk is beside the mesh's total, not in it.
    assert cpu["generation"] == pytest.approx(1200.0)
    assert cpu["quota"] == pytest.approx(700.0)
    assert cpu["total"] == pytest.approx(2600.0)
    assert cpu[WRK] == pytest.approx(300.0)
    by_process = two["cpu_us_per_request_by_process"]
    assert by_process[replica_name("generation", 1)] == pytest.approx(600.0)
    assert by_process[replica_name("generation", 2)] == pytest.approx(600.0)
    one = figures["variants"][ONE_WORKER.label]
    assert one["envoy_workers"] == 1
    assert one["gateway_concurrency"] == 1
    assert one["cpu_us_per_request"]["total"] == pytest.approx(1900.0)
    assert REDIS not in one["cpu_us_per_request"]  # this fake's Redis did no work there


def test_ratios_against_the_baseline_and_the_reading(report: Report) -> None:
    figures = summarize(report)
    assert figures["baseline"] == BASELINE.label
    assert set(figures["ratios"]) == {ONE_WORKER.label, TWO_PROCESSES.label}
    two = figures["ratios"][TWO_PROCESSES.label]
    assert two["rps"] == pytest.approx(580 / 800)
    assert two["p99"] == pytest.approx(2.1)
    assert two["cpu_per_request"] == pytest.approx(2600 / 2000)
    one = figures["ratios"][ONE_WORKER.label]
    assert one["rps"] == pytest.approx(1.0)
    assert one["cpu_per_request"] == pytest.approx(0.95)
    assert figures["reading"] == (
        "on 2 cores, against one process per service and Envoy one worker per core: "
        "Envoy with 1 worker: RPS x1.00, p99 x1.00, CPU/request x0.95; "
        "2 processes of generation and quota: RPS x0.72, p99 x2.10, CPU/request x1.30"
    )


def test_cpu_is_na_without_proc(report: Report) -> None:
    runs = [Run(run.variant, run.result, {WRK: run.cpu[WRK]}) for run in report.runs]
    bare = Report(report.variants, report.kinds, report.workers, runs, 3, SECONDS, 2.0, cores=2)
    figures = summarize(bare)
    assert figures["variants"][BASELINE.label]["cpu_us_per_request"]["total"] is None
    assert figures["ratios"][TWO_PROCESSES.label]["cpu_per_request"] is None
    assert "CPU/request x n/a" in figures["reading"]


def test_the_tables_print(report: Report, capsys: pytest.CaptureFixture[str]) -> None:
    print_processes(summarize(report))
    out = capsys.readouterr().out
    for variant in VARIANTS:
        assert variant.label in out
    assert "2/2/1" in out
    assert out.rstrip().endswith("CPU/request x1.30")
