"""What request validation costs, in `make bench`: protovalidate, which every service runs on
every request it receives (services/common/interceptors.py), timed in this process on the
messages of a cache hit, in microseconds of CPU per call. Beside the CPU per cache hit of the
`ceiling` section, it says what share of a request the validation is.

Measured in-process rather than as a mesh with validation off: the services have no switch to
skip validation, and should not have one.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import protovalidate
from google.protobuf.message import Message

from bench.stats import fmt
from genmesh.generation.v1 import generation_pb2
from genmesh.quota.v1 import quota_pb2

CALLS = 20_000
REPEATS = 5


def cache_hit_messages() -> dict[str, Message]:
    """The messages the services validate for one cache hit of the bench's shape: the
    GenerateRequest generation receives, the ReserveQuotaRequest quota receives. (Envoy's
    rate-limit check carries no protovalidate rules and is not validated.)"""
    return {
        "generation GenerateRequest": generation_pb2.GenerateRequest(
            text="bench ceiling 1a2b3c4d", lang="en"
        ),
        "quota ReserveQuotaRequest": quota_pb2.ReserveQuotaRequest(
            caller=quota_pb2.Caller(client_ip="127.0.0.1"), consume=True
        ),
    }


def cpu_us_per_call(call: Callable[[], Any], calls: int = CALLS, repeats: int = REPEATS) -> float:
    """The median over `repeats` of the process CPU time per call, in microseconds, after one
    call that warms caches (protovalidate compiles a message's rules on first use)."""
    call()
    samples = []
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(calls):
            call()
        samples.append((time.process_time() - started) / calls * 1e6)
    return statistics.median(samples)


def measure() -> dict[str, float]:
    return {
        name: cpu_us_per_call(functools.partial(protovalidate.validate, message))
        for name, message in cache_hit_messages().items()
    }


def print_validation(per_call_us: dict[str, float], hit_cpu_us: dict[str, float] | None) -> None:
    """`hit_cpu_us`: the services' CPU per cache hit from the `ceiling` section, when it ran."""
    print(
        f"protovalidate.validate in this process, median of {REPEATS} x {CALLS:,} calls, "
        "CPU µs per call"
    )
    header = f"{'message':32} {'µs/call':>8} {'service µs/hit':>15} {'share':>7}"
    print(header)
    print("-" * len(header))
    for name, us in per_call_us.items():
        service = name.split()[0]
        per_hit = (hit_cpu_us or {}).get(service)
        share = us / per_hit * 100 if per_hit else None
        print(f"{name:32} {fmt(us, 8)} {fmt(per_hit, 15)} {fmt(share, 6)}%")
