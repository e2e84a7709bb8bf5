"""Performance monitoring: time named operations, count failures and slow calls, log the slow
ones (with the current trace id), and keep figures for health and admin reports: running totals
since start (`snapshot`) and figures over the last 1 and 5 minutes (`windowed`). Also exported
to Prometheus.

Windowed figures come from a fixed ring of 10-second buckets per operation, so memory per
operation is bounded whatever the traffic. A window of N seconds covers the buckets whose start
lies within the last N seconds of the clock: it spans between N - 10 and N seconds, never more
(≤10 s granularity). Each bucket keeps a log-spaced latency histogram (bounds 1.2 apart), so the
p95 is an estimate: the upper bound of the histogram bucket holding the 95th percentile, clipped
to the window's max, at most ~20% above the true value."""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from opentelemetry import trace
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

WINDOWS = (60, 300)
"""The windows reports use, in seconds."""
BUCKET_SECONDS = 10
"""Width of one time bucket: the granularity of every window."""
RETAINED_SECONDS = max(WINDOWS)
"""The longest window `windowed` accepts."""
RING_SIZE = RETAINED_SECONDS // BUCKET_SECONDS

_LATENCY_MIN_MS = 0.05
_LATENCY_MAX_MS = 600_000.0
_LATENCY_RATIO = 1.2
LATENCY_BOUNDS_MS: tuple[float, ...] = tuple(
    _LATENCY_MIN_MS * _LATENCY_RATIO**i
    for i in range(math.ceil(math.log(_LATENCY_MAX_MS / _LATENCY_MIN_MS, _LATENCY_RATIO)) + 1)
)
"""Upper bounds of the latency histogram's buckets; one more bucket holds anything above."""
_HISTOGRAM_SIZE = len(LATENCY_BOUNDS_MS) + 1
_P95 = 0.95


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


@dataclass(frozen=True)
class WindowedOperation:
    """One operation's figures over the last `window_seconds` (see the module's note on
    granularity). All zeros when the operation had no calls in the window."""

    name: str
    window_seconds: int
    count: int
    errors: int
    slow: int
    avg_ms: float
    p95_ms: float
    max_ms: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.count if self.count else 0.0

    @property
    def rate_per_second(self) -> float:
        return self.count / self.window_seconds


class _Bucket:
    """Calls of one operation whose clock fell in [index * BUCKET_SECONDS, +BUCKET_SECONDS)."""

    __slots__ = ("count", "errors", "histogram", "index", "max_ms", "slow", "total_ms")

    def __init__(self) -> None:
        self.index = -1  # which time bucket this slot holds; -1: none yet
        self.count = 0
        self.errors = 0
        self.slow = 0
        self.total_ms = 0.0
        self.max_ms = 0.0
        self.histogram = [0] * _HISTOGRAM_SIZE

    def reset(self, index: int) -> None:
        self.index = index
        self.count = self.errors = self.slow = 0
        self.total_ms = self.max_ms = 0.0
        histogram = self.histogram
        for i in range(_HISTOGRAM_SIZE):
            histogram[i] = 0


def _current_trace_id() -> str:
    """The current span's trace id as 32 hex digits, or "" outside a valid span."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def _percentile_bound(histogram: list[int], count: int, fraction: float) -> float:
    """Upper bound of the histogram bucket holding the given fraction of `count` calls
    (infinity for the overflow bucket)."""
    rank = max(1, math.ceil(fraction * count))
    seen = 0
    for i, n in enumerate(histogram):
        seen += n
        if seen >= rank:
            return LATENCY_BOUNDS_MS[i] if i < len(LATENCY_BOUNDS_MS) else math.inf
    return math.inf


class PerformanceMonitor:
    def __init__(
        self, slow_threshold_ms: float = 1000.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.slow_threshold_ms = slow_threshold_ms
        self._clock = clock
        self._totals: dict[str, OperationTotals] = {}
        self._rings: dict[str, list[_Bucket]] = {}

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
        slow = elapsed_ms > self.slow_threshold_ms
        totals = self._totals.setdefault(operation, OperationTotals(operation))
        totals.count += 1
        totals.total_ms += elapsed_ms
        totals.max_ms = max(totals.max_ms, elapsed_ms)
        if failed:
            totals.errors += 1
        if slow:
            totals.slow += 1
        self._record_windowed(operation, elapsed_ms, failed=failed, slow=slow)
        OPERATION_SECONDS.labels(operation, "error" if failed else "ok").observe(elapsed_ms / 1000)
        if slow:
            SLOW_OPERATIONS.labels(operation).inc()
            log.warning(
                "slow operation",
                extra={
                    "operation": operation,
                    "elapsed_ms": round(elapsed_ms, 1),
                    "trace_id": _current_trace_id(),
                },
            )

    def _record_windowed(
        self, operation: str, elapsed_ms: float, *, failed: bool, slow: bool
    ) -> None:
        ring = self._rings.get(operation)
        if ring is None:
            ring = self._rings[operation] = [_Bucket() for _ in range(RING_SIZE)]
        index = int(self._clock() // BUCKET_SECONDS)
        bucket = ring[index % RING_SIZE]
        if bucket.index != index:
            if bucket.index > index:  # the clock went back further than the ring reaches
                return
            bucket.reset(index)  # the slot held an expired bucket (or none): reuse it
        bucket.count += 1
        bucket.total_ms += elapsed_ms
        bucket.max_ms = max(bucket.max_ms, elapsed_ms)
        if failed:
            bucket.errors += 1
        if slow:
            bucket.slow += 1
        bucket.histogram[bisect_left(LATENCY_BOUNDS_MS, elapsed_ms)] += 1

    def snapshot(self) -> list[OperationTotals]:
        return sorted(
            (OperationTotals(**vars(t)) for t in self._totals.values()), key=lambda t: t.name
        )

    def windowed(self, window_seconds: int) -> list[WindowedOperation]:
        """Every operation ever recorded, sorted by name, with its figures over the last
        `window_seconds` (1..RETAINED_SECONDS; see the module's note on granularity)."""
        if not 0 < window_seconds <= RETAINED_SECONDS:
            raise ValueError(f"window_seconds must be in 1..{RETAINED_SECONDS}: {window_seconds}")
        now = self._clock()
        newest = int(now // BUCKET_SECONDS)
        indexes = [
            index
            for index in range(newest, newest - RING_SIZE, -1)
            if now - index * BUCKET_SECONDS < window_seconds
        ]
        return [
            self._window(name, self._rings[name], indexes, window_seconds)
            for name in sorted(self._rings)
        ]

    @staticmethod
    def _window(
        name: str, ring: list[_Bucket], indexes: list[int], window_seconds: int
    ) -> WindowedOperation:
        count = errors = slow = 0
        total_ms = max_ms = 0.0
        histogram = [0] * _HISTOGRAM_SIZE
        for index in indexes:
            bucket = ring[index % RING_SIZE]
            if bucket.index != index or not bucket.count:
                continue  # expired or never written: not in this window
            count += bucket.count
            errors += bucket.errors
            slow += bucket.slow
            total_ms += bucket.total_ms
            max_ms = max(max_ms, bucket.max_ms)
            for i, n in enumerate(bucket.histogram):
                histogram[i] += n
        if not count:
            return WindowedOperation(name, window_seconds, 0, 0, 0, 0.0, 0.0, 0.0)
        p95_ms = min(_percentile_bound(histogram, count, _P95), max_ms)
        return WindowedOperation(
            name, window_seconds, count, errors, slow, total_ms / count, p95_ms, max_ms
        )
