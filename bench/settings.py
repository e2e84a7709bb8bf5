"""Every BENCH_* and SOAK_* setting, read once from the environment (documented in
bench/__main__.py, bench/soak.py and the README's bench section)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# In the order they run. `make bench` runs them all unless BENCH_SECTIONS lists some.
SECTIONS = (
    "ceiling",  # echo ceiling vs cache-hit generate (wrk), CPU per request
    "miss",  # sequential added latency of cache misses over the simulator
    "quota",  # ReserveQuota + SettleReservation per second over gRPC
    "ratelimit",  # ShouldRateLimit decisions per second
    "limits",  # cache-hit generate with the rate limits on and off (wrk)
    "processes",  # processes per service and Envoy workers, a mesh each (wrk)
    "tracing",  # cache-hit generate with tracing off, 1 in 10 and every trace exported (wrk)
    "validation",  # protovalidate's CPU per message of a cache hit, in-process
    "events",  # committed funnel events per second vs row at a time (wrk)
    "scenarios",  # every REST scenario through Envoy (httpx)
    "singleflight",  # bursts of identical vs distinct misses
)
REPO = Path(__file__).resolve().parent.parent


class SettingError(ValueError):
    """A BENCH_* or SOAK_* variable has a value that cannot be used; the message names it."""


def _number(name: str, default: float, minimum: float = 0) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise SettingError(f"{name}={raw!r} is below {minimum:g}")
    return value


def _int(name: str, default: int, minimum: int = 1) -> int:
    value = _number(name, default, minimum)
    if value != int(value):
        raise SettingError(f"{name}={value:g} is not a whole number")
    return int(value)


def _optional(name: str) -> str | None:
    return os.environ.get(name, "").strip() or None


def sections(raw: str | None) -> tuple[str, ...]:
    """BENCH_SECTIONS: a comma list of SECTIONS (any order, run in SECTIONS order); empty or
    "all" means every one."""
    if raw is None or raw.strip().lower() in ("", "all"):
        return SECTIONS
    wanted = {part.strip().lower() for part in raw.split(",") if part.strip()}
    unknown = wanted - set(SECTIONS)
    if unknown:
        raise SettingError(
            f"BENCH_SECTIONS: unknown {', '.join(sorted(unknown))} (known: {', '.join(SECTIONS)})"
        )
    return tuple(s for s in SECTIONS if s in wanted)


@dataclass(frozen=True)
class BenchSettings:
    sections: tuple[str, ...]
    rounds: int
    wrk_seconds: float
    warmup_seconds: float
    connections: int
    sim_latency_ms: int
    misses: int
    quota_seconds: float
    quota_inflight: int
    rls_seconds: float
    events_seconds: float
    requests: int
    concurrency: int
    burst: int
    burst_rounds: int
    gen_max_inflight: str | None
    log_level: str | None
    results_dir: Path

    @classmethod
    def from_env(cls) -> BenchSettings:
        return cls(
            sections=sections(os.environ.get("BENCH_SECTIONS")),
            rounds=_int("BENCH_ROUNDS", 3),
            wrk_seconds=_number("BENCH_WRK_SECONDS", 8, 1),
            warmup_seconds=_number("BENCH_WARMUP_SECONDS", 2, 1),
            connections=_int("BENCH_CONNECTIONS", 32),
            sim_latency_ms=_int("BENCH_SIM_LATENCY_MS", 50, 0),
            misses=_int("BENCH_MISSES", 200, 10),
            quota_seconds=_number("BENCH_QUOTA_SECONDS", 4, 1),
            quota_inflight=_int("BENCH_QUOTA_INFLIGHT", 16),
            rls_seconds=_number("BENCH_RLS_SECONDS", 4, 1),
            events_seconds=_number("BENCH_EVENTS_SECONDS", 8, 1),
            requests=_int("BENCH_REQUESTS", 400, 4),
            concurrency=_int("BENCH_CONCURRENCY", 16),
            burst=_int("BENCH_BURST", 16),
            burst_rounds=_int("BENCH_BURST_ROUNDS", 5),
            gen_max_inflight=_optional("BENCH_GEN_MAX_INFLIGHT"),
            log_level=_optional("BENCH_LOG_LEVEL"),
            results_dir=Path(_optional("BENCH_RESULTS_DIR") or REPO / "bench" / "results"),
        )


@dataclass(frozen=True)
class SoakSettings:
    minutes: float
    rate: float | None
    probe_seconds: float
    report_seconds: float

    @classmethod
    def from_env(cls) -> SoakSettings:
        rate = _number("SOAK_RATE", 0, 0)
        return cls(
            minutes=_number("SOAK_MINUTES", 10, 0.1),
            rate=rate or None,
            probe_seconds=_number("SOAK_PROBE_SECONDS", 10, 2),
            report_seconds=_number("SOAK_REPORT_SECONDS", 60, 5),
        )
