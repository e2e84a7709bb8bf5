"""What tracing costs on the cache-hit path, in `make bench`: the same cache-hit POST
/api/generate through three meshes started for the section (bench/processes.py's machinery),
alternately, with wrk:

- tracing as deployed without a collector (no exporter: no trace recorded, trace ids still in
  the logs): the baseline;
- one trace in ten recorded and exported (parent-based trace-id ratio 0.1, the prod overlay's
  sampler, deploy/k8s/overlays/prod), spans of gRPC, Redis and PostgreSQL calls included;
- every trace recorded and exported (always on, the dev overlay's otel component).

The exporter sends OTLP/gRPC to a sink the bench starts (bench/span_sink.py), which counts the
spans it receives (so the table shows that tracing was on) and keeps none; its CPU is not the
mesh's.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench import processes
from bench.errors import BenchError
from bench.stack import Stack
from devstack.infra import free_port, port_open

UNTRACED = processes.Variant(
    "no exporter (default)",
    {},
    0,
    summary="tracing as deployed without a collector (nothing recorded)",
)


def _traced(label: str, summary: str, sink: str, sampler: str, arg: str = "") -> processes.Variant:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink,
        "OTEL_TRACES_SAMPLER": sampler,
        # Export at the SDK's default pace; the sink answers at once.
        **({"OTEL_TRACES_SAMPLER_ARG": arg} if arg else {}),
    }
    return processes.Variant(label, {}, 0, env, summary)


@contextmanager
def span_sink() -> Iterator[tuple[Callable[[], int], str]]:
    """The sink (bench/span_sink.py) as a process of its own on a free loopback port: a gRPC
    server in the bench's process would make every later fork (each mesh process started)
    log gRPC's fork warning. Yields a function that stops it and returns the spans it counted,
    and its OTLP endpoint URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.span_sink", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    stopped: list[int] = []

    def stop() -> int:
        if not stopped:
            process.send_signal(signal.SIGTERM)
            out, _ = process.communicate(timeout=10)
            stopped.append(int(out.strip().splitlines()[-1]) if out.strip() else 0)
        return stopped[0]

    try:
        wait_port(port)
        yield stop, f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not port_open("127.0.0.1", port):
        if time.monotonic() > deadline:
            raise BenchError(f"the span sink is not listening on {port} after {timeout:.0f} s")
        time.sleep(0.05)


def measure(
    wrk_binary: str, stack: Stack, rounds: int, seconds: float, warmup: float
) -> dict[str, Any]:
    with span_sink() as (stop_sink, endpoint):
        variants = [
            UNTRACED,
            _traced(
                "1 in 10 exported (prod)",
                "one trace in ten exported",
                endpoint,
                "parentbased_traceidratio",
                "0.1",
            ),
            _traced("every trace exported", "every trace exported", endpoint, "always_on"),
        ]
        report = processes.measure(wrk_binary, stack, rounds, seconds, warmup, variants, "tracing")
        spans = stop_sink()
    figures = processes.summarize(report, baseline=UNTRACED)
    figures["spans_received"] = spans
    return figures


def print_tracing(figures: dict[str, Any]) -> None:
    processes.print_processes(figures, title="Tracing on and off")
    print(f"  spans the bench's OTLP sink received over the section: {figures['spans_received']:,}")
