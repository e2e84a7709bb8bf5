"""Group commit: concurrent submissions are gathered into one batch, the batch is written in
ONE call of the writer (one transaction), and each submitter is answered only after that write
returned, with its own result, or with the write's error if the batch failed.

A submission (the rows of one request) is never split across batches, so a request is
all-or-nothing. A batch holds at most `max_rows` rows, except that a single larger submission
goes alone. The first submission of a batch waits at most `max_wait` seconds for company; while
`max_in_flight` batches are being written, new submissions gather for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
from prometheus_client import Counter, Histogram

from services.common.errors import Reason, ServiceError

log = logging.getLogger(__name__)

RowT = TypeVar("RowT")
ResultT = TypeVar("ResultT")

# The writer gets one sequence of rows per submission and returns one result per submission,
# in the same order. It must write everything in one transaction, or raise.
BatchWriter = Callable[[Sequence[Sequence[RowT]]], Awaitable[Sequence[ResultT]]]

BATCH_ROWS = Histogram(
    "telemetry_batch_rows",
    "Rows per group-commit batch.",
    ["committer"],
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
)
BATCH_SUBMISSIONS = Histogram(
    "telemetry_batch_submissions",
    "Requests per group-commit batch.",
    ["committer"],
    buckets=(1, 2, 3, 5, 10, 25, 50, 100, 250),
)
REJECTED = Counter(
    "telemetry_batch_rejected_total",
    "Submissions refused because too many rows were waiting.",
    ["committer"],
)
BATCHES = Counter(
    "telemetry_batches_total", "Group-commit batches written, by outcome.", ["committer", "outcome"]
)


@dataclass(frozen=True)
class BatchLimits:
    # Rows one batch holds at most (a single larger submission still goes, alone).
    max_rows: int = 500
    # How long the first submission of a batch waits for company.
    max_wait_seconds: float = 0.005
    # Batches being written at once.
    max_in_flight: int = 1
    # Rows allowed to wait for a batch; beyond that (the database cannot keep up) new
    # submissions fail fast with UNAVAILABLE instead of queueing without bound.
    max_pending_rows: int = 10_000

    def __post_init__(self) -> None:
        if min(self.max_rows, self.max_in_flight, self.max_pending_rows) < 1:
            raise ValueError("max_rows, max_in_flight and max_pending_rows must be >= 1")
        if self.max_wait_seconds < 0:
            raise ValueError("max_wait_seconds must be >= 0")


DEFAULT_LIMITS = BatchLimits()


@dataclass
class CommitterStats:
    """Running totals, for health reports and for tests to observe batching."""

    batches: int = 0
    failed_batches: int = 0
    submissions: int = 0
    rows: int = 0
    # Batches that carried more than one submission: proof that group commit happened.
    shared_batches: int = 0
    largest_batch_submissions: int = 0
    # Submissions refused because too many rows were already waiting.
    rejected_submissions: int = 0


@dataclass
class _Submission(Generic[RowT, ResultT]):
    rows: Sequence[RowT]
    future: asyncio.Future[ResultT]
    arrived: float


class GroupCommitter(Generic[RowT, ResultT]):
    def __init__(
        self,
        name: str,
        writer: BatchWriter[RowT, ResultT],
        limits: BatchLimits = DEFAULT_LIMITS,
    ) -> None:
        self.name = name
        self.max_rows = limits.max_rows
        self.max_wait_seconds = limits.max_wait_seconds
        self.max_pending_rows = limits.max_pending_rows
        self.stats = CommitterStats()
        self._writer = writer
        self._pending: deque[_Submission[RowT, ResultT]] = deque()
        self._pending_rows = 0
        self._full = asyncio.Event()
        self._slots = asyncio.Semaphore(limits.max_in_flight)
        self._leader: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._closed = False

    async def submit(self, rows: Sequence[RowT]) -> ResultT:
        """Queue `rows` for the next batch and return this submission's result once the batch
        is committed. Raises the writer's error if the batch failed."""
        if self._closed:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.OVERLOADED,
                "the service is shutting down, try again",
                retry_after_seconds=1,
            )
        if self._pending and self._pending_rows + len(rows) > self.max_pending_rows:
            self.stats.rejected_submissions += 1
            REJECTED.labels(self.name).inc()
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.OVERLOADED,
                "too many writes are waiting for the database, try again shortly",
                retry_after_seconds=1,
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ResultT] = loop.create_future()
        self._pending.append(_Submission(list(rows), future, loop.time()))
        self._pending_rows += len(rows)
        if self._pending_rows >= self.max_rows:
            self._full.set()
        if self._leader is None or self._leader.done():
            self._leader = asyncio.create_task(self._lead(), name=f"group-commit-{self.name}")
        # A cancelled caller cancels its future; _take() then drops its rows if not yet taken.
        return await future

    async def close(self) -> None:
        """Refuse new submissions, write the pending ones, and wait for every write."""
        self._closed = True
        if self._leader is not None:
            await self._leader
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def _lead(self) -> None:
        """Form batches while submissions are pending, one at a time, each as soon as it is
        full or its first submission has waited `max_wait_seconds`, and a write slot is free."""
        loop = asyncio.get_running_loop()
        while self._pending:
            if self._pending_rows < self.max_rows:
                self._full.clear()
                wait = self._pending[0].arrived + self.max_wait_seconds - loop.time()
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._full.wait()
            # Submissions arriving while every slot is busy join this batch.
            await self._slots.acquire()
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._write(batch), name=f"group-commit-{self.name}-write")
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    def _take(self) -> list[_Submission[RowT, ResultT]]:
        batch: list[_Submission[RowT, ResultT]] = []
        rows = 0
        while self._pending:
            head = self._pending[0]
            if head.future.done():  # its caller went away before the write: skip its rows
                self._pending.popleft()
                self._pending_rows -= len(head.rows)
                continue
            if batch and rows + len(head.rows) > self.max_rows:
                break
            self._pending.popleft()
            self._pending_rows -= len(head.rows)
            batch.append(head)
            rows += len(head.rows)
        return batch

    async def _write(self, batch: list[_Submission[RowT, ResultT]]) -> None:
        rows = sum(len(s.rows) for s in batch)
        try:
            results = await self._writer([s.rows for s in batch])
            if len(results) != len(batch):
                raise RuntimeError(
                    f"{self.name} writer returned {len(results)} results for {len(batch)} requests"
                )
        except asyncio.CancelledError:
            for s in batch:
                s.future.cancel()
            raise
        except Exception as err:
            self._count(batch, rows, ok=False)
            log.warning(
                "group commit batch failed: %s",
                err,
                extra={"committer": self.name, "requests": len(batch), "rows": rows},
            )
            for s in batch:
                if not s.future.done():
                    s.future.set_exception(err)
        else:
            self._count(batch, rows, ok=True)
            for s, result in zip(batch, results, strict=True):
                if not s.future.done():
                    s.future.set_result(result)
        finally:
            self._slots.release()

    def _count(self, batch: list[_Submission[RowT, ResultT]], rows: int, *, ok: bool) -> None:
        stats = self.stats
        stats.batches += 1
        stats.submissions += len(batch)
        if ok:
            stats.rows += rows
        else:
            stats.failed_batches += 1
        if len(batch) > 1:
            stats.shared_batches += 1
        stats.largest_batch_submissions = max(stats.largest_batch_submissions, len(batch))
        BATCHES.labels(self.name, "ok" if ok else "error").inc()
        BATCH_ROWS.labels(self.name).observe(rows)
        BATCH_SUBMISSIONS.labels(self.name).observe(len(batch))
