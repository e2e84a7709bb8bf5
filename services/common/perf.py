"""Performance monitoring: time named operations, count failures and slow calls, log the slow
ones, and keep running totals for health and admin reports. Also exported to Prometheus."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

log = logging.getLogger(__name__)

OPERATION_SECONDS = Histogram(
    "genmesh_operation_seconds",
    "Duration of monitored operations.",
    ["operation", "outcome"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
SLOW_OPERATIONS = Counter(
    "genmesh_slow_operations_total", "Operations slower than the threshold.", ["operation"]
)


@dataclass
class OperationTotals:
    name: str
    count: int = 0
    errors: int = 0
    total_ms: float = 0.0
    max_ms: float = 0.0
    slow: int = 0

    @property
    def avg_ms(self) -> float:
        return self.total_ms / self.count if self.count else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.count if self.count else 0.0


class PerformanceMonitor:
    def __init__(self, slow_threshold_ms: float = 1000.0) -> None:
        self.slow_threshold_ms = slow_threshold_ms
        self._totals: dict[str, OperationTotals] = {}

    @asynccontextmanager
    async def track(self, operation: str) -> AsyncIterator[None]:
        started = time.perf_counter()
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            self.record(operation, (time.perf_counter() - started) * 1000, failed=failed)

    def record(self, operation: str, elapsed_ms: float, *, failed: bool = False) -> None:
        totals = self._totals.setdefault(operation, OperationTotals(operation))
        totals.count += 1
        totals.total_ms += elapsed_ms
        totals.max_ms = max(totals.max_ms, elapsed_ms)
        if failed:
            totals.errors += 1
        OPERATION_SECONDS.labels(operation, "error" if failed else "ok").observe(elapsed_ms / 1000)
        if elapsed_ms > self.slow_threshold_ms:
            totals.slow += 1
            SLOW_OPERATIONS.labels(operation).inc()
            log.warning(
                "slow operation",
                extra={"operation": operation, "elapsed_ms": round(elapsed_ms, 1)},
            )

    def snapshot(self) -> list[OperationTotals]:
        return sorted(
            (OperationTotals(**vars(t)) for t in self._totals.values()), key=lambda t: t.name
        )
